"""``esn run`` end to end on the tiny Moshi with two judges: the report shows the index x layer view of the
per-codebook (indexed) depth-decoder neurons, and says that no instruction was sent."""

import os
import subprocess
import sys

import pytest

CONFIG = """
seed = 3
[model]
adapter = "moshi"
source = "checkpoint"
streams = ["lm", "synth"]
[generation]
max_new_tokens = 4
max_audio_tokens = 4
[data]
root = "esd"
splits.identification = [{speakers = ["0011"], first = 1, last = 2}]
splits.test_seen = [{speakers = ["0011"], first = 3, last = 3}]
[judges]
emotion = [{name = "emotion2vec", source = "e2v", options = {mapping = "five"}}, {name = "lalm_judge", source = "lalm"}]
loudness_dbfs = -23.0
min_seconds = 0.3
[record]
batch_size = 4
[filter]
require_match = false
tau_wer = 1000.0
[anchor]
rate = 0.05
c = 2
[sweep]
selectors = ["cas"]
[evaluate]
splits = ["test_seen"]
batch_size = 10
bootstrap = 20
"""


@pytest.mark.slow
def test_esn_run_reports_the_index_view(tmp_path):
    from esn.pipeline.synthetic import write_esd
    from esn.plugins import registry

    registry().adapter("moshi").write_tiny(tmp_path / "checkpoint", seed=0)
    registry().judge("emotion2vec").write_tiny(tmp_path / "e2v", seed=0)
    registry().judge("lalm_judge").write_tiny(tmp_path / "lalm", seed=0)
    write_esd(tmp_path / "esd", speakers=[11], indices=[1, 2, 3], emotions=["neutral"], seconds=0.4)
    (tmp_path / "study.toml").write_text(CONFIG)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    proc = subprocess.run([sys.executable, "-m", "esn", "run", "study.toml", "--run-dir", "run"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Index × layer view" in report and "figures/index_layers.png" in report
    assert (tmp_path / "run" / "figures" / "index_layers.png").stat().st_size > 1000
    section = report[report.index("Index × layer view"):]
    assert "| emotion | index 0 | index 1 | index 2 |" in section
    for emotion in ("Happy", "Angry", "Sad", "Surprise"):
        assert f"| {emotion} |" in section
    assert "no instruction channel" in report
