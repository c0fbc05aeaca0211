"""The README's Python tour runs as written (on the tiny Qwen2.5-Omni checkpoint it writes)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_tour_runs(tmp_path):
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    code = code.replace('"/tmp/tiny-qwen"', repr(str(tmp_path / "tiny-qwen")))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("24000")  # text, waveform shape, sample rate


def _curl_line(text: str) -> str:
    return next(line for line in text.splitlines() if line.startswith("curl ") and "/v1/convert" in line)


def test_readme_curl_line_never_writes_an_error_into_the_wav(tmp_path):
    """The README's curl line against a real `esn serve` (tiny Qwen2.5-Omni, no masks): asking for a mask the
    service lacks fails (non-zero exit, the JSON error on stderr, no out.wav); without alpha it writes speech.
    The home page gives the same line."""
    pytest.importorskip("fastapi")
    from esn.serve.server import launch
    from esn_qwen_omni import QwenOmniAdapter

    line = _curl_line(README.read_text())
    assert "--fail-with-body" in line and line == _curl_line((README.parent / "docs" / "index.md").read_text())
    checkpoint = QwenOmniAdapter.write_tiny(tmp_path / "tiny", seed=0)
    sf.write(tmp_path / "in.wav", (0.1 * np.sin(np.arange(16_000) / 8)).astype(np.float32), 16_000)
    args = ["serve", "--adapter", "qwen_omni", "--model", str(checkpoint), "--port", "0", "--max-new-tokens", "4",
            "--max-audio-tokens", "6"]
    with launch(args, env={**os.environ, "OMP_NUM_THREADS": "1"}) as server:
        command = line.replace("http://127.0.0.1:8000", server.url)
        done = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode != 0 and not (tmp_path / "out.wav").exists()
        assert '"error"' in done.stderr and "mask" in done.stderr, done.stderr
        done = subprocess.run(["bash", "-c", command.replace(" -F alpha=0.5", "")], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        wave, rate = sf.read(tmp_path / "out.wav")
        assert rate == 24_000 and wave.size > 0
        head = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-D", "-", "-F", "audio=@in.wav", "-F", "emotion=sad",
                               server.url + "/v1/convert"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert "x-esn-text-truncated: false" in head.stdout.lower() and "x-esn-text:" in head.stdout.lower()
