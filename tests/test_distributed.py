"""The study as ranks of a torch.distributed group (gloo, CPU): under torchrun it writes exactly the files of
one process, also when ranks are SIGKILLed mid-record and mid-evaluate and torchrun restarts the group;
srun-style launches work from Slurm's variables; bad launches are refused with one clear line."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from esn.errors import EsnError
from esn.pipeline.parallel import Launch, detect_launch, rank_device
from pipeline_study import CONFIG, ENV, files

# No launcher variables from the environment pytest runs in: each test sets the ones it means.
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_LOCALID",
               "SLURM_STEP_NUM_TASKS", "TORCHELASTIC_RESTART_COUNT")
CLEAN = {k: v for k, v in ENV.items() if k not in LAUNCH_VARS}


def esn_args(study: Path, run_dir: Path, *extra: str, command: str = "run", config: str = "study.toml") -> list[str]:
    return [command, str(study / config), "--run-dir", str(run_dir), "--threads", "1", *extra]


def torchrun(n: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", "esn", *args]


def assert_same(a: dict[str, bytes], b: dict[str, bytes]) -> None:
    assert sorted(a) == sorted(b)
    assert [name for name in a if a[name] != b[name]] == []


@pytest.mark.slow
def test_two_ranks_under_torchrun_equal_one_process(study, whole, tmp_path):
    run_dir = tmp_path / "run"
    done = subprocess.run(torchrun(2, *esn_args(study, run_dir)), env=CLEAN, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same(whole, files(run_dir))
    # one voice: rank 0 prints, with the group's bars (every rank's batches, the time left); the other rank
    # stays quiet; at the end of a stage rank 0 says where each rank's time went
    out = " ".join(done.stdout.split())
    assert out.count("loading qwen_omni") == 1
    for stage, n in (("record", 4), ("evaluate", 9)):
        assert re.findall(rf"{stage} \(2 ranks\) \S+ (\d+)/(\d+) batches [\d:]+ ETA", out) == [(str(n), str(n))]
        assert re.search(rf"{stage} \(2 ranks\): \d+ conversions in [\d.]+ s", out), out
        assert out.count(f"{stage} rank 0: ") == out.count(f"{stage} rank 1: ") == 1


# -- killed ranks, restarted group ----------------------------------------------------------------------
def _workers(root: int) -> dict[int, dict[str, str]]:
    """The esn ranks below process ``root``: pid -> their launcher variables."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = {}, [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            todo.append(pid)
            try:
                env = dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in v)
            except OSError:
                continue
            if "RANK" in env and "TORCHELASTIC_RESTART_COUNT" in env:
                found[pid] = env
    return found


def _kill_rank(proc: subprocess.Popen, rank: int, ready, timeout: float = 600) -> dict[str, str]:
    """SIGKILL the worker of ``rank`` as soon as ``ready()``; returns its launcher variables."""
    t0 = time.time()
    while not ready():
        assert proc.poll() is None, f"ended (rc {proc.returncode}) before the kill point"
        assert time.time() - t0 < timeout, "timed out waiting for the kill point"
        time.sleep(0.05)
    victims = {pid: env for pid, env in _workers(proc.pid).items() if env["RANK"] == str(rank)}
    assert victims, "no worker of that rank"
    pid, env = max(victims.items(), key=lambda kv: int(kv[1]["TORCHELASTIC_RESTART_COUNT"]))
    os.kill(pid, signal.SIGKILL)
    return env


@pytest.mark.slow
def test_killed_ranks_restart_and_resume_to_identical_artifacts(study, whole, tmp_path):
    run_dir = tmp_path / "run"
    shards, batches = run_dir / "record" / "shards", run_dir / "evaluate" / "batches"
    cmd = [sys.executable, "-m", "esn", *esn_args(study, run_dir, "--workers", "2", "--max-restarts", "2", "--all-ranks")]
    proc = subprocess.Popen(cmd, env=CLEAN, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # rank 1 dies mid-record: torchrun stops rank 0 too and starts the group again
        first = _kill_rank(proc, 1, lambda: len(list(shards.glob("b*.json"))) >= 1)
        kept = {p.name: p.stat() for p in shards.glob("b*")}
        assert first["TORCHELASTIC_RESTART_COUNT"] == "0" and 1 <= len(kept) // 2 < 4
        # rank 0 dies mid-evaluate, in the restarted group
        second = _kill_rank(proc, 0, lambda: len(list(batches.glob("0*.json"))) >= 2)
        assert second["TORCHELASTIC_RESTART_COUNT"] == "1"
        evaluated = {p.name: p.stat() for p in batches.glob("0*.json")}
        out, err = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "2 workers done" in out and "evaluate rank 1/2:" in err  # --all-ranks: rank 1 reports its batches
    assert_same(whole, files(run_dir))
    # nothing finished was done again: the files written before each kill are the very same files
    for folder, before in ((shards, kept), (batches, evaluated)):
        for name, st in before.items():
            now = (folder / name).stat()
            assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), name


# -- refusals -------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def srun(n: int, argv_of_rank) -> list[subprocess.CompletedProcess]:
    """``n`` processes with the variables srun gives a job step's tasks (and the sbatch script's
    MASTER_ADDR/MASTER_PORT), each running ``esn <argv_of_rank(rank)>``."""
    port = _free_port()
    procs = []
    for rank in range(n):
        env = {**CLEAN, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_STEP_NUM_TASKS": str(n),
               "SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "esn", *argv_of_rank(rank)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = [(p, *p.communicate(timeout=300)) for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, o, e) for p, o, e in out]


def error_lines(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_bad_launches_are_refused(study, tmp_path):
    from esn.pipeline.run import load_run

    (study / "longer.toml").write_text(CONFIG.replace("max_new_tokens = 6", "max_new_tokens = 7"))
    # ranks given different configs (or commands): every rank refuses (exit 1: found at run time), nothing is written
    run_dir = tmp_path / "a"
    for done in srun(2, lambda r: esn_args(study, run_dir, command="record", config=("study.toml", "longer.toml")[r])):
        assert done.returncode == 1 and error_lines(done) == [
            "error: the 2 ranks were not given the same command and configuration (rank 1 differs from rank 0 in "
            "config generation); launch every rank with the same arguments and config file"], done.stderr[-2000:]
    assert not run_dir.exists()
    for done in srun(2, lambda r: esn_args(study, run_dir, command=("record", "evaluate")[r])):
        assert done.returncode == 1 and "rank 1 differs from rank 0 in stages" in done.stderr, done.stderr[-2000:]
    # a record stage one process left unfinished (as a killed `esn record` leaves it) is not resumed by two
    run_dir = tmp_path / "b"
    with load_run(study / "study.toml", run_dir=run_dir) as run:
        run.begin("record", under_way=True)
    (run_dir / "record" / "shards").mkdir(parents=True)
    for done in srun(2, lambda r: esn_args(study, run_dir, command="record")):
        assert done.returncode == 1 and error_lines(done) == [
            f"error: record in run directory {run_dir} was started by 1 process(es) and is not finished; this launch "
            "has 2. Resume it with 1 (the same --nnodes x --nproc-per-node), or pass --resize to finish it with 2"
        ], done.stderr[-2000:]


@pytest.mark.parametrize("extra, message", [
    (["--workers", "2"], "--workers starts torch's launcher itself; this process already is rank 0 of 2 under srun"),
    (["--shard", "0/2"], "--shard 0/2 is for job arrays without a rendezvous; under srun the ranks share"),
])
def test_workers_and_shards_are_refused_under_a_launcher(study, tmp_path, monkeypatch, capsys, extra, message):
    from esn.cli import main

    for k, v in {"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(k, v)
    for k in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert main(esn_args(study, tmp_path / "run", *extra, command="record")) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "run").exists()


# -- launchers' environments, devices, the --workers command ----------------------------------------------
@pytest.mark.parametrize("env, launch", [
    ({}, None),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1",
      "TORCHELASTIC_RESTART_COUNT": "3", "TORCHELASTIC_RUN_ID": "x"}, Launch("torchrun", 1, 2, 1, 3, "x")),
    ({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}, None),  # one process: no group
    ({"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "4", "SLURM_JOB_ID": "9",
      "SLURM_STEP_ID": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, Launch("srun", 3, 4, 1, 0, "9.0")),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}, None),  # the sbatch script itself, not a job step
    ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"}, None),
])
def test_launches_are_read_from_the_launchers_variables(env, launch):
    assert detect_launch(env) == launch


@pytest.mark.parametrize("env, message", [
    ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"}, "srun started 2 processes but MASTER_ADDR and MASTER_PORT"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "torchrun gave rank 2 of world size 2"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "variable RANK is 'x'; expected an integer"),
])
def test_bad_launcher_variables_are_refused(env, message):
    with pytest.raises(EsnError, match=message):
        detect_launch(env)


def test_ranks_take_their_gpu_or_share_one():
    assert [rank_device(r, 1, 2) for r in range(2)] == ["cuda:0", "cuda:1"]
    assert [rank_device(r, 2, 2) for r in range(4)] == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]
    with pytest.raises(EsnError, match=r"local rank 2 needs cuda:2 but this machine shows 2 GPU\(s\).*--ranks-per-gpu 2"):
        rank_device(2, 1, 2)
    with pytest.raises(EsnError, match="shows no GPU"):
        rank_device(0, 1, 0)


def test_workers_are_torchrun_ranks(tmp_path):
    from esn.cli import build_parser
    from esn.cli.pipeline_cmd import workers_command

    args = build_parser().parse_args(["run", "s.toml", "--workers", "4", "--devices", "0,1", "--max-restarts", "3",
                                      "--threads", "2"])
    cmd, env = workers_command(args, ["record", "select"], tmp_path, 4, ["0", "1"], {"PATH": "/bin"})
    assert cmd == [sys.executable, "-P", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
                   "--max-restarts=3", "--no-python", sys.executable, "-P", "-m", "esn", "run", "s.toml", "--run-dir", str(tmp_path), "--stages",
                   "record,select", "--threads", "2", "--ranks-per-gpu", "2"]  # four workers on two GPUs
    assert env == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0,1"}  # --threads given: torchrun's OMP default stays
    args = build_parser().parse_args(["record", "s.toml", "--workers", "2", "--resize"])
    cmd, env = workers_command(args, ["record"], tmp_path, 2, None, {})
    assert cmd[-3:] == ["--stages", "record", "--resize"] and "--ranks-per-gpu" not in cmd
    assert env == {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // 2))}  # each rank's share of the cores


def test_an_unfinished_stage_keeps_its_number_of_processes(tmp_path):
    from esn.pipeline.rundir import RunDir

    rd = RunDir(tmp_path / "run")
    config = {"seed": 0}
    rd.open(config, {"record": {}, "select": {}, "evaluate": {}})
    rd.begin("record", 2)
    rd.begin("record", 2)  # the same launch shape resumes
    with pytest.raises(EsnError, match=r"record in run directory .* was started by 2 process"):
        rd.begin("record", 1)
    rd.close()
    rd.record.mkdir()
    (rd.record / "layout.json").write_text("{}")
    rd.open(config, {"record": {}, "select": {}, "evaluate": {}})  # reopening keeps the note: record has results
    with pytest.raises(EsnError, match="pass --resize"):
        rd.begin("record", 3)
    rd.begin("record", 3, resize=True)
    rd.end("record")
    rd.begin("record", 1)  # finished: any number may run it again
    rd.end("record")
    assert "unfinished" not in rd.manifest.read_text()
    rd.close()
