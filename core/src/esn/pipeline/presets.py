"""Config files to start from: the paper's full protocol (``paper.toml``, shipped with esn) or a minimal one.

``esn init study.toml --paper`` writes the preset with the model and data filled in. A minimal config runs
the anchor and the selector comparison only (Table 3); the preset adds every sweep the paper reports.
"""

from __future__ import annotations

import re
import tomllib
from importlib.resources import files
from pathlib import Path

from esn.pipeline.config import RunConfig, parse_config
from esn.pipeline.files import atomic_write_text

MINIMAL = """\
# A minimal esn run: the paper's anchor (CAS, r = 0.5%, c = 50, steering alpha = 1) and its selector
# comparison (Table 3). `esn init --paper` writes every sweep of the paper instead (docs/paper.md).
[model]
adapter = "qwen_omni"
source = "Qwen/Qwen2.5-Omni-7B"
dtype = "bfloat16"
device = "cuda"

[data]
root = "/data/ESD"

[judges]
emotion = [{name = "emotion2vec"}]
"""


def paper_text() -> str:
    """The shipped preset, as written (with its comments)."""
    return files("esn.pipeline").joinpath("paper.toml").read_text(encoding="utf-8")


def paper_config(base: Path | None = None) -> RunConfig:
    """The preset parsed and validated (paths resolved against ``base``)."""
    return parse_config(tomllib.loads(paper_text()), where="esn paper preset", base=base, stem="paper")


def _set(text: str, section: str, key: str, value: str) -> str:
    """Replace ``key = ...`` inside ``[section]`` (keeping the line's comment) with a TOML string value."""
    quoted = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    head = re.search(rf"^\[{re.escape(section)}\]\s*$", text, re.M)
    if head is None:
        raise ValueError(f"no [{section}] in the template")
    end = re.search(r"^\[", text[head.end():], re.M)
    stop = head.end() + (end.start() if end else len(text) - head.end())
    body = re.sub(rf'^({re.escape(key)}\s*=\s*)"[^"\n]*"', lambda m: m.group(1) + quoted,
                  text[head.end():stop], count=1, flags=re.M)
    return text[:head.end()] + body + text[stop:]


def render(*, paper: bool, adapter: str | None = None, source: str | None = None,
           data_root: str | None = None) -> str:
    """The config text with the given model and data filled in (checked: it must parse)."""
    text = paper_text() if paper else MINIMAL
    for section, key, value in (("model", "adapter", adapter), ("model", "source", source),
                                ("data", "root", data_root)):
        if value is not None:
            text = _set(text, section, key, value)
    parse_config(tomllib.loads(text), where="esn init")
    return text


def write_config(out: str | Path, *, paper: bool, adapter: str | None = None, source: str | None = None,
                 data_root: str | None = None) -> Path:
    """``render`` into the file ``out`` (written atomically); returns its path."""
    return atomic_write_text(Path(out), render(paper=paper, adapter=adapter, source=source, data_root=data_root))
