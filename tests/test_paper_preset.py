"""The paper preset: it parses, it holds exactly the values docs/paper.md lists, and `esn init` writes it."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from esn.pipeline.config import load_config, settings
from esn.pipeline.presets import paper_config, paper_text

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\| [^|]+ \| `([a-z_.]+)` \| `(.+?)` \|", re.M)


def doc_rows() -> list[tuple[str, object]]:
    """``(dotted config key, value)`` for each row of the docs table whose value is a TOML literal."""
    text = (ROOT / "docs" / "paper.md").read_text().split("## Where the paper is open")[0]
    return [(key, tomllib.loads(f"v = {value}")["v"]) for key, value in ROW.findall(text)]


def lookup(tree: dict, key: str):
    for part in key.split("."):
        tree = tree[part]
    return tree


def test_the_docs_table_lists_the_protocol():
    keys = [k for k, _ in doc_rows()]
    assert len(keys) == 22 and len(set(keys)) == len(keys)
    for key in ("anchor.rate", "anchor.c", "sweep.rates", "sweep.c", "sweep.alphas", "sweep.interventions",
                "sweep.selectors", "judges.emotion", "filter.tau_wer", "evaluate.splits"):
        assert key in keys, key


@pytest.mark.parametrize("key,value", doc_rows(), ids=[k for k, _ in doc_rows()])
def test_the_preset_holds_the_papers_value(key, value):
    raw = tomllib.loads(paper_text())
    assert lookup(raw, key) == value
    parsed = paper_config().model_dump(mode="json")
    got = lookup(parsed, key)
    def given(g, w):  # validated tables gain their defaults: compare the keys the paper gives
        return {k: v for k, v in g.items() if k in w} if isinstance(w, dict) else g

    got = [given(g, w) for g, w in zip(got, value, strict=True)] if isinstance(value, list) else given(got, value)
    assert got == value


def test_the_preset_is_the_whole_grid_of_the_paper():
    cfg = paper_config()
    assert cfg.data.splits is None and cfg.data.kind == "esd"  # Table 1, esn's default split
    sts = settings(cfg)
    lm = [s for s in sts if s.stream == "lm"]
    # anchor, 4 other selectors, 3 r, 3 c, 3 alpha, 3 methods on lm; the 5 selectors on synth (Table 6)
    assert len(lm) == 17 and len([s for s in sts if s.stream == "synth"]) == 5
    assert sts[0].key == "cas_r0.005_c50_steer_a1"


def test_esn_init_writes_the_preset_and_a_minimal_config(tmp_path):
    def esn(*args):
        return subprocess.run([sys.executable, "-m", "esn", *args], capture_output=True, text=True, timeout=120)

    out = tmp_path / "study.toml"
    done = esn("init", str(out), "--paper", "--source", "/models/qwen", "--data-root", "/data/ESD")
    assert done.returncode == 0, done.stderr
    cfg = load_config(out)
    assert cfg.model.source == "/models/qwen" and cfg.data.root == Path("/data/ESD")
    assert cfg.sweep.alphas == [0.3, 0.5, 2.0] and "OPEN" in out.read_text()  # the comments stay
    assert esn("init", str(out)).returncode == 1  # no overwrite without --force (the file is there: runtime)
    done = esn("init", str(out), "--force", "--adapter", "kimi_audio")
    assert done.returncode == 0, done.stderr
    minimal = load_config(out)
    assert minimal.model.adapter == "kimi_audio" and minimal.sweep.rates == []
