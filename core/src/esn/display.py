"""A model's decoded text made safe to show: on a terminal (no control sequences) and in an HTTP header
(bounded). Decoded text is model output: a random or steered model can emit any token, ESC included."""

from __future__ import annotations

import unicodedata
from urllib.parse import quote

# Kept as they are: they lay text out and cannot start a terminal control sequence.
_LAYOUT = {"\n", "\t"}
HEADER_BYTES = 512  # of the percent-encoded text in a header; the JSON answer carries the whole text


def printable(text: str) -> str:
    """``text`` with every control, format (bidi overrides, zero-width) and unassigned character shown as
    its escape (``\\x1b``, ``\\u202e``) instead of sent to the terminal; newlines and tabs kept."""
    return "".join(c if c in _LAYOUT or not _hidden(c) else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def _hidden(c: str) -> bool:
    category = unicodedata.category(c)
    return category[0] == "C" or category in ("Zl", "Zp")  # control, format, unassigned; line separators


def header_text(text: str, limit: int = HEADER_BYTES) -> tuple[str, bool]:
    """``(value, cut)``: ``text`` percent-encoded (UTF-8) for a header, cut at a character boundary so the
    value stays within ``limit`` bytes; ``cut`` says whether it was."""
    out, size = [], 0
    for c in text:
        part = quote(c, safe="")
        if size + len(part) > limit:
            return "".join(out), True
        out.append(part)
        size += len(part)
    return "".join(out), False
