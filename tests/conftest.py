"""Fixtures the process tests share: the demo run (built once per session; tests/test_demo.py checks it,
tests/test_listening.py exports listening kits from it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


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
