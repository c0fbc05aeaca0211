"""The report's building block, shared by the report (``esn.pipeline.report``) and the views and
openings it assembles from (``report_views``, ``demo``), so none of them imports the report."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Block:
    """One report element: a heading, paragraph, table, image or code block, rendered to Markdown and HTML."""
    kind: str  # "h1" | "h2" | "h3" | "p" | "table" | "img" | "code" | "clips" (a table with audio cells)
    body: Any
