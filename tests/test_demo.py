"""`esn demo --out DIR` (what `make demo` runs) ends with report.md, its tables and PNG figures; the human
kit exports blind A/B pairs from it and imports responses into win/tie/loss and the report."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("esn_qwen_omni")
pytest.importorskip("esn_emotion2vec")

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    done = subprocess.run([sys.executable, "-m", "esn", "demo", "--out", str(out), "--threads", "1"],
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.slow
def test_demo_report(demo):
    report = (demo / "report.md").read_text()
    assert "RANDOM weights" in report and "meaningless" in report and "Run it for real" in report
    for heading in ("Table 2", "Table 3", "Table 4", "Figure 3", "Figure 9", "Figure 10"):
        assert heading in report, heading
    for row in ("| CAS |", "| Random |", "| LAP |", "| LAPE |", "| MAD |", "| α = 2 |"):
        assert row in report, row
    for png in ("heatmap_selectors", "heatmap_alpha", "layers", "seen_unseen"):
        data = (demo / "figures" / f"{png}.png").read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000
        assert f"figures/{png}.png" in report
    assert (demo / "report.html").read_text().count("<table>") >= 4


@pytest.mark.slow
def test_human_ab_kit_round_trip(demo):
    cfg = str(demo / "demo.toml")
    done = subprocess.run([sys.executable, "-m", "esn", "human", "export", cfg, "--per-emotion", "2"],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    kit = demo / "human" / "ab-kit"
    trials = list(csv.DictReader((kit / "trials.csv").open()))
    key = {r["trial"]: r for r in csv.DictReader((kit / "key.csv").open())}
    assert len(trials) == 8 and set(key) == {t["trial"] for t in trials}
    assert "intervened" not in (kit / "trials.csv").read_text()  # blind
    import numpy as np
    import soundfile as sf

    wave, rate = sf.read(kit / trials[0]["clip_a"])
    assert rate == 16000 and abs(20 * np.log10(np.sqrt(np.mean(wave**2))) + 23) < 1.5
    # a rater who always prefers the intervened clip, except one tie
    rows = []
    for n, t in enumerate(trials):
        choice = "tie" if n == 0 else ("A" if key[t["trial"]]["a"] == "intervened" else "B")
        rows.append(f"r1,{t['trial']},{choice}")
    (demo / "resp.csv").write_text("rater,trial,choice\n" + "\n".join(rows) + "\n")
    done = subprocess.run([sys.executable, "-m", "esn", "human", "import", cfg, str(demo / "resp.csv")],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    import json

    res = json.loads((demo / "human" / "results.json").read_text())
    assert res["counts"]["average"] == {"win": 7, "tie": 1, "loss": 0, "n": 8}
    (demo / "bad.csv").write_text("rater,trial,choice\nr1,1,maybe\n")
    done = subprocess.run([sys.executable, "-m", "esn", "human", "import", cfg, str(demo / "bad.csv")],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "bad.csv line 2" in done.stderr
    done = subprocess.run([sys.executable, "-m", "esn", "report", cfg], env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = (demo / "report.md").read_text()
    assert "Figure 8" in report and "RANDOM weights" in report
