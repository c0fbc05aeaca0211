"""Record and evaluate as static shards of a job array over one run directory (`--shard K/N`) end with
exactly the files of one process (tiny random Qwen2.5-Omni, tiny random emotion2vec, synthetic ESD); the
locks keep the same shard, an unsharded process, another N and another config out. Bad --shard, --workers
and related arguments are refused before anything is touched. (torchrun and --workers: test_distributed.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("esn_qwen_omni")
pytest.importorskip("esn_emotion2vec")

from pipeline_study import CONFIG, ENV, files, kill_when


def esn(command: str, study: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "esn", command, str(study / "study.toml"), "--run-dir", str(run_dir),
            "--threads", "1", *extra]


def check(cmd: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return out


def assert_same(a: dict[str, bytes], b: dict[str, bytes]) -> None:
    assert sorted(a) == sorted(b)
    assert [name for name in a if a[name] != b[name]] == []


@pytest.mark.slow
def test_shards_by_hand_with_kills_equal_one_process(study, whole, tmp_path):
    run_dir = tmp_path / "run"
    shards = run_dir / "record" / "shards"
    # record: two shards at once; shard 0 (batches 0 and 2) is killed after its first batch and rerun
    s0, s1 = start(esn("record", study, run_dir, "--shard", "0/2")), start(esn("record", study, run_dir, "--shard", "1/2"))
    kill_when(s0, lambda: (shards / "b000000-000000.json").exists())
    finish(s1)
    assert not (shards / "b000002-000000.json").exists()
    assert (shards / "b000001-000000.json").exists() and (shards / "b000003-000000.json").exists()
    finish(start(esn("record", study, run_dir, "--shard", "0/2")))
    check(esn("select", study, run_dir))
    # evaluate: shard 1 (batches 1, 3, 5, 7) is killed after its first batch; shard 0 then finishes first
    batches = run_dir / "evaluate" / "batches"
    e0, e1 = start(esn("evaluate", study, run_dir, "--shard", "0/2")), start(esn("evaluate", study, run_dir, "--shard", "1/2"))
    kill_when(e1, lambda: (batches / "000001.json").exists())
    out = finish(e0)
    assert "results.json will be written by the last shard" in " ".join(out.split())
    assert not (run_dir / "evaluate" / "results.json").exists()
    out = finish(start(esn("evaluate", study, run_dir, "--shard", "1/2")))
    assert "the grid is complete" in out
    check(esn("report", study, run_dir))
    assert_same(whole, files(run_dir))


@pytest.mark.parametrize("argv, message", [
    (["record", "--shard", "2/2"], "--shard '2/2': need N >= 1 and 0 <= K < N"),
    (["record", "--shard=-1/2"], "--shard '-1/2': need N >= 1 and 0 <= K < N"),
    (["evaluate", "--shard", "0/0"], "--shard '0/0': need N >= 1"),
    (["evaluate", "--shard", "one/2"], "--shard 'one/2': expected K/N with integers"),
    (["record", "--shard", "1"], "--shard '1': expected K/N with integers"),
    (["select", "--shard", "0/2"], "--shard 0/2: select cannot run as a shard"),
    (["report", "--shard", "1/2"], "--shard 1/2: report cannot run as a shard"),
    (["run", "--shard", "0/2"], "--shard 0/2: select, report cannot run as a shard"),
    (["record", "--shard", "0/2", "--workers", "2"], "--shard and --workers exclude each other"),
    (["record", "--workers", "0"], "--workers 0: need at least 1 process"),
    (["report", "--workers", "2"], "--workers 2: report runs as one process"),
    (["record", "--devices", "0,1"], "--devices needs --workers"),
    (["record", "--workers", "2", "--devices", "0,,1"], "--devices '0,,1': expected a comma-separated list"),
    (["record", "--max-restarts", "2"], "--max-restarts 2: needs --workers"),
    (["record", "--workers", "2", "--max-restarts=-1"], "--max-restarts -1: needs --workers and R >= 0"),
    (["record", "--ranks-per-gpu", "0"], "--ranks-per-gpu 0: need at least 1"),
])
def test_bad_shard_and_workers_arguments(study, tmp_path, capsys, argv, message):
    from esn.cli import main

    run_dir = tmp_path / "run"
    assert main([argv[0], str(study / "study.toml"), "--run-dir", str(run_dir), *argv[1:]]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not run_dir.exists()  # refused before touching anything


def test_a_bad_shard_exits_2_from_the_command_line(study, tmp_path):
    cmd = [sys.executable, "-m", "esn", "record", str(study / "study.toml"), "--run-dir", str(tmp_path), "--shard", "3/2"]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip() == "error: --shard '3/2': need N >= 1 and 0 <= K < N (the " \
        "shards of N=2 are 0/2 and 1/2)", done.stderr


def test_locks_admit_shards_of_one_n_and_config_only(study, tmp_path):
    from esn.errors import EsnError
    from esn.pipeline.run import load_run

    cfg, run_dir = study / "study.toml", tmp_path / "run"
    changed = study / "changed.toml"
    changed.write_text(CONFIG.replace("max_new_tokens = 6", "max_new_tokens = 7"))

    def shard(k: int | None, n: int = 2, config: Path = cfg):
        return load_run(config, run_dir=run_dir, shard=None if k is None else (k, n))

    first = shard(0).open()
    leftover = run_dir / "evaluate" / "batches" / ".000001.json.k2x9q0ab.esn-tmp"  # as if another shard were writing it
    leftover.parent.mkdir(parents=True)
    leftover.write_text("half")
    with pytest.raises(EsnError, match="shard 0/2 is already running"):
        shard(0).open()
    with pytest.raises(EsnError, match="another esn process is using run directory"):
        shard(None).open()
    with pytest.raises(EsnError, match="must use the same N"):
        shard(0, 3).open()
    with pytest.raises(EsnError, match=r"shards with another configuration .* generation"):
        shard(1, config=changed).open()
    second = shard(1).open()  # a shard that joins running ones leaves their temp files alone
    assert leftover.exists()
    second.close()
    first.close()
    with shard(1):  # alone again: the temp files of killed processes go
        assert not leftover.exists()
        with pytest.raises(EsnError, match="another esn process is using run directory"):
            shard(None).open()
    with shard(None), pytest.raises(EsnError, match="an esn process without --shard is using"):
        shard(0).open()
