"""Fixtures the process tests share, each made once per session because each costs a minute of CPU: the
demo run (tests/test_demo.py checks it, tests/test_listening.py exports listening kits from it), and the
pipeline's tiny study with its reference run (test_resume, test_shards, test_distributed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pipeline_study import ENV, files, make_study


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> Path:
    """``esn demo --out DIR`` run once: a tiny study with recorded and evaluated audio."""
    pytest.importorskip("esn_qwen_omni")
    pytest.importorskip("esn_emotion2vec")
    out = tmp_path_factory.mktemp("demo")
    done = subprocess.run([sys.executable, "-m", "esn", "demo", "--out", str(out), "--threads", "1"],
                          env=ENV, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def study(tmp_path_factory) -> Path:
    """The tiny study (tests/pipeline_study.py) written once."""
    pytest.importorskip("esn_qwen_omni")
    pytest.importorskip("esn_emotion2vec")
    return make_study(tmp_path_factory.mktemp("study"))


@pytest.fixture(scope="session")
def whole_dir(study, tmp_path_factory) -> Path:
    """The run directory of ``whole`` (copy it before changing anything in it)."""
    run_dir = tmp_path_factory.mktemp("whole") / "run"
    cmd = [sys.executable, "-m", "esn", "run", str(study / "study.toml"), "--run-dir", str(run_dir), "--threads", "1"]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="session")
def whole(whole_dir) -> dict[str, bytes]:
    """One process, no interruption: the reference every other way of running the study must equal."""
    out = files(whole_dir)
    assert len([n for n in out if n.startswith("record/shards/b") and n.endswith(".json")]) == 4
    assert len([n for n in out if n.startswith("evaluate/batches/")]) == 9
    assert "report.md" in out and "evaluate/results.json" in out
    return out
