"""How several processes share a run: the one place that knows about ranks, shards and launchers.

A process belongs to one *team*:

* ``Solo``: alone; it does every batch.
* ``Shard``: a static shard ``K/N`` of a job array without a rendezvous (``--shard K/N``): the batches ``k``
  with ``k % N == K``. Shards never talk to each other; the run directory's locks keep them apart.
* ``Group``: a rank of a torch.distributed group started by ``torchrun`` (or ``accelerate launch``, which
  runs torchrun's agent) or ``srun``. Ranks claim batches dynamically from an atomic counter in the group's
  store, so a slow rank never holds the others up; rank 0 alone opens the run directory, runs select and
  report and writes ``results.json``; barriers order the stages. Coordination goes through the group
  (gloo, on the CPU: no collective ever touches a GPU), never through file locks, so no lock has to hold
  across machines.

Batch files are named after the batch alone, so every team writes exactly the files of one process.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from esn.errors import EsnError

SHARDED_STAGES = ("record", "evaluate")  # lists of independent batches; select and report run once
# Ranks wait at barriers while rank 0 alone runs select, report or the grid's metrics, which can take a
# while on a full study. A rank that dies is the launcher's to notice (torchrun stops the group; srun with
# --kill-on-bad-exit=1 does too), not this timeout's.
GROUP_TIMEOUT = timedelta(hours=6)
SETTLE_SECONDS = 300.0
T = TypeVar("T")
log = logging.getLogger(__name__)


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> ``(K, N)``: the process takes the batches ``k`` with ``k % N == K``."""
    k, sep, n = str(text).partition("/")
    try:
        if not sep:
            raise ValueError
        kk, nn = int(k), int(n)
    except ValueError:
        raise EsnError(f"--shard {text!r}: expected K/N with integers K and N, e.g. 0/2 and 1/2 for two "
                       "processes") from None
    if nn < 1 or not 0 <= kk < nn:
        raise EsnError(f"--shard {text!r}: need N >= 1 and 0 <= K < N (the shards of N=2 are 0/2 and 1/2)")
    return kk, nn


# -- where a launcher put this process ------------------------------------------------------------------
@dataclass(frozen=True)
class Launch:
    """This process's place in a launch, as the launcher's environment variables tell it."""

    launcher: str  # "torchrun" (also accelerate launch) or "srun"
    rank: int
    world_size: int
    local_rank: int
    restart: int = 0  # torchrun: how many times the group was restarted (--max-restarts)
    run_id: str = ""


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except (KeyError, ValueError):
        raise EsnError(f"the launcher's environment variable {name} is {env.get(name)!r}; expected an "
                       "integer") from None


def detect_launch(env: Mapping[str, str] = os.environ) -> Launch | None:
    """The launch this process is a rank of, or None when it runs on its own.

    torchrun and ``accelerate launch`` set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
    ``MASTER_PORT``. ``srun`` sets ``SLURM_PROCID``, ``SLURM_LOCALID`` and ``SLURM_STEP_NUM_TASKS`` for each
    task of a job step (``SLURM_NTASKS`` alone, as a batch script sees it, is not a launch); the rendezvous
    address, ``MASTER_ADDR`` and ``MASTER_PORT``, comes from the sbatch script. One process (world size 1)
    is no launch at all.
    """
    if "RANK" in env and "WORLD_SIZE" in env:
        launch = Launch("torchrun", _int(env, "RANK"), _int(env, "WORLD_SIZE"),
                        _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
                        int(env.get("TORCHELASTIC_RESTART_COUNT") or 0), env.get("TORCHELASTIC_RUN_ID", ""))
    elif "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        launch = Launch("srun", _int(env, "SLURM_PROCID"), _int(env, "SLURM_STEP_NUM_TASKS"),
                        _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
                        run_id=f"{env.get('SLURM_JOB_ID', '')}.{env.get('SLURM_STEP_ID', '')}")
    else:
        return None
    if launch.world_size < 1 or not 0 <= launch.rank < launch.world_size or launch.local_rank < 0:
        raise EsnError(f"{launch.launcher} gave rank {launch.rank} of world size {launch.world_size} (local rank "
                       f"{launch.local_rank}): need 0 <= rank < world size")
    if launch.world_size == 1:
        return None
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not env.get(v)]
    if missing:
        raise EsnError(f"{launch.launcher} started {launch.world_size} processes but {' and '.join(missing)} "
                       "is not set: export the rendezvous host and port before srun (see docs/pipeline.md)")
    return launch


# -- teams ------------------------------------------------------------------------------------------------
class Solo:
    """One process, every batch."""

    rank = 0
    world_size = 1
    is_leader = True
    shard: tuple[int, int] | None = None
    tag = ""
    launcher = "none"

    def mine(self, k: int) -> bool:
        """Whether batch ``k`` is this process's to consider (a static shard's; all of them otherwise)."""
        return True

    def device(self, configured: str) -> str:
        """The device this process uses for the config's ``model.device`` (alone: that device itself)."""
        return configured

    def same_everywhere(self, what: dict[str, Any]) -> None:
        """Refuse ranks that were given different configurations or commands (nothing to compare alone)."""

    def on_leader(self, fn: Callable[[], T]) -> T | None:
        """Run ``fn`` on the leader; the others wait for it and raise its error too."""
        return fn()

    def agree(self, fn: Callable[[], T]) -> T:
        """``fn()`` computed by the leader and handed to every rank (e.g. the batches still to do)."""
        return fn()

    @contextlib.contextmanager
    def share(self, name: str, todo: Sequence[T], *, total: int, conversions: int,
              console: Console) -> Iterator[Claims[T]]:
        """Work through ``todo`` (this team's share of it), with the progress bar of a stage of ``total``
        batches; ``conversions`` is the size of ``todo`` in attempts. On a normal exit every rank's share
        is done, and the leader prints the throughput."""
        t0 = time.perf_counter()
        with _bar(console, f"{name}{self.tag}", total, total - len(todo)) as bar:
            claims = Claims(iter(todo), lambda: bar.advance(bar.task_ids[0]), rank=0, t0=t0)
            yield claims
        _throughput(console, f"{name}{self.tag}", conversions, time.perf_counter() - t0, claims.times)

    def settle(self, paths: Sequence[Path]) -> None:
        """The leader waits until it sees every one of ``paths`` (files other ranks wrote); nothing to wait
        for alone."""

    def close(self) -> None:
        """Leave the team (alone: nothing to leave)."""


class Shard(Solo):
    """A static shard ``K/N`` of a job array: the batches ``k % N == K``, no communication."""

    def __init__(self, k: int, n: int):
        parse_shard(f"{k}/{n}")
        self.shard = (k, n)
        self.tag = f" {k}/{n}"

    def mine(self, k: int) -> bool:
        return k % self.shard[1] == self.shard[0]


class Group(Solo):
    """A rank of a torch.distributed group: batches claimed from a counter in the group's store."""

    def __init__(self, launch: Launch, *, ranks_per_gpu: int = 1, talkative: bool = False):
        import torch.distributed as dist

        if ranks_per_gpu < 1:
            raise EsnError(f"--ranks-per-gpu {ranks_per_gpu}: need at least 1")
        self.launch = launch
        self.launcher = launch.launcher
        self.rank, self.world_size = launch.rank, launch.world_size
        self.is_leader = launch.rank == 0
        self.tag = f" rank {launch.rank}/{launch.world_size}"
        self.ranks_per_gpu = ranks_per_gpu
        self.talkative = talkative  # non-leader ranks print a line per batch
        # The store torchrun's agent (or rank 0 under srun) hosts; its keys outlive a restarted group
        # (pytorch/pytorch#135712), so every key carries the restart count: our counters', and gloo's own
        # (without it a restarted rank can read the address a killed rank published, and fail to connect).
        store, _, _ = next(dist.rendezvous("env://", rank=launch.rank, world_size=launch.world_size,
                                           timeout=GROUP_TIMEOUT))
        self.prefix = f"esn/{launch.run_id}/{launch.restart}"
        dist.init_process_group("gloo", store=dist.PrefixStore(f"{self.prefix}/group", store), rank=launch.rank,
                                world_size=launch.world_size, timeout=GROUP_TIMEOUT)
        self.store = store
        self._rounds = 0

    def device(self, configured: str) -> str:
        """``cuda`` is this rank's GPU: ``cuda:LOCAL_RANK`` (``LOCAL_RANK // M`` with ``--ranks-per-gpu M``)."""
        if configured != "cuda":
            return configured
        import torch

        device = rank_device(self.launch.local_rank, self.ranks_per_gpu, torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device

    def same_everywhere(self, what: dict[str, Any]) -> None:
        import torch.distributed as dist

        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, what)
        odd = [(r, [k for k in what if other.get(k) != everyone[0].get(k)]) for r, other in enumerate(everyone)
               if other != everyone[0]]
        if odd:
            detail = "; ".join(f"rank {r} differs from rank 0 in {', '.join(keys) or '?'}" for r, keys in odd)
            raise EsnError(f"the {self.world_size} ranks were not given the same command and configuration "
                           f"({detail}); launch every rank with the same arguments and config file")

    def on_leader(self, fn: Callable[[], T]) -> T | None:
        import torch.distributed as dist

        outcome: list[Any] = [None]
        result = None
        if self.is_leader:
            try:
                result = fn()
            except Exception as exc:
                outcome[0] = f"{exc}" if isinstance(exc, EsnError) else f"rank 0 failed: {type(exc).__name__}: {exc}"
                dist.broadcast_object_list(outcome, src=0)
                raise
        dist.broadcast_object_list(outcome, src=0)
        if outcome[0] is not None:
            raise EsnError(outcome[0])
        return result

    def agree(self, fn: Callable[[], T]) -> T:
        import torch.distributed as dist

        box: list[Any] = [None]
        box[0] = self.on_leader(fn)
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @contextlib.contextmanager
    def share(self, name: str, todo: Sequence[T], *, total: int, conversions: int,
              console: Console) -> Iterator[Claims[T]]:
        import torch.distributed as dist

        dist.barrier()  # every rank has loaded its model: the clock and the claims start together
        t0 = time.perf_counter()
        self._rounds += 1
        key = f"{self.prefix}/{self._rounds}-{name}"
        store = self.store
        done_before = total - len(todo)

        def claims() -> Iterator[T]:
            while (i := store.add(f"{key}/next", 1) - 1) < len(todo):
                yield todo[i]

        if self.is_leader:  # the global bar: every rank's finished batches, counted in the store
            with _bar(console, f"{name} ({self.world_size} ranks)", total, done_before) as bar:
                def finished() -> None:
                    bar.update(bar.task_ids[0], completed=done_before + store.add(f"{key}/done", 1))

                mine = Claims(claims(), finished, rank=self.rank, t0=t0)
                yield mine
                while (n := store.add(f"{key}/done", 0)) < len(todo):  # the others' last batches
                    bar.update(bar.task_ids[0], completed=done_before + n)
                    time.sleep(0.2)
                bar.update(bar.task_ids[0], completed=total)
        else:
            def finished() -> None:
                store.add(f"{key}/done", 1)
                if self.talkative:
                    print(f"{name}{self.tag}: {len(mine.times)} batches done", file=sys.stderr, flush=True)

            mine = Claims(claims(), finished, rank=self.rank, t0=t0)
            yield mine
        dist.barrier()
        seconds = time.perf_counter() - t0
        everyone: list[Any] = [None] * self.world_size
        dist.gather_object(mine.times, everyone if self.is_leader else None, dst=0)  # a few numbers per batch
        if self.is_leader:
            _throughput(console, f"{name} ({self.world_size} ranks)", conversions, seconds,
                        [t for times in everyone for t in times])

    def settle(self, paths: Sequence[Path], timeout: float = SETTLE_SECONDS) -> None:
        # A shared filesystem may show another machine's new files late (NFS caches directory lookups
        # for up to a minute); the ranks said they are written, so wait for them rather than fail.
        if not self.is_leader:
            return
        deadline = time.monotonic() + timeout
        while missing := [p for p in paths if not p.exists()]:
            if time.monotonic() > deadline:
                raise EsnError(f"{len(missing)} file(s) the other ranks wrote are still not visible to rank 0 after "
                               f"{timeout:.0f} s, e.g. {missing[0]}: every rank must write to the same run directory "
                               "(a filesystem shared by all machines; see docs/pipeline.md)")
            time.sleep(0.5)

    def close(self) -> None:
        """Leave the process group."""
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


@dataclass(frozen=True)
class BatchTime:
    """When one batch was claimed and done (seconds since its stage's clock started) and where its time
    went (``phases``: seconds per step, e.g. generate, judge, store)."""

    rank: int
    start: float
    end: float
    conversions: int
    phases: dict[str, float]


class Claims(Iterator[T]):
    """The batches a team member takes, one at a time. Call ``done(conversions, **phases)`` once a batch's
    files are written, in the order the batches were claimed (a background writer finishes them in that
    order), with its number of conversions and the seconds of its steps: the stage's report uses them."""

    def __init__(self, items: Iterator[T], finished: Callable[[], None], *, rank: int = 0,
                 t0: float | None = None):
        self._items, self._finished, self.rank = items, finished, rank
        self._t0 = time.perf_counter() if t0 is None else t0
        self._claimed: deque[float] = deque()
        self.times: list[BatchTime] = []

    def __next__(self) -> T:
        item = next(self._items)
        self._claimed.append(time.perf_counter() - self._t0)
        return item

    def done(self, conversions: int, *, at: float | None = None, **phases: float) -> None:
        """The oldest claimed batch not yet done is written (now, or at ``time.perf_counter()`` ``at``):
        count it."""
        start = self._claimed.popleft()
        end = (time.perf_counter() if at is None else at) - self._t0
        self.times.append(BatchTime(self.rank, start, end, conversions, {k: round(v, 4) for k, v in phases.items()}))
        self._finished()


def rank_device(local_rank: int, ranks_per_gpu: int, gpus: int) -> str:
    """The GPU of the rank with ``local_rank`` on its machine: ``cuda:(local_rank // ranks_per_gpu)``."""
    index = local_rank // ranks_per_gpu
    if gpus == 0:
        raise EsnError("model.device is cuda but this machine shows no GPU (CUDA_VISIBLE_DEVICES, drivers?)")
    if index >= gpus:
        share = max(2, math.ceil((local_rank + 1) / gpus))
        raise EsnError(f"local rank {local_rank} needs cuda:{index} but this machine shows {gpus} GPU(s): start at "
                       f"most {gpus * ranks_per_gpu} processes per machine, or let several share a GPU with "
                       f"--ranks-per-gpu {share}")
    return f"cuda:{index}"


def check_shard_launch(shard: tuple[int, int] | None, launch: Launch | None) -> None:
    """``--shard`` is for job arrays: under a launcher (``launch``) the ranks share the batches themselves."""
    if launch is not None and shard is not None:
        raise EsnError(f"--shard {shard[0]}/{shard[1]} is for job arrays without a rendezvous; under "
                       f"{launch.launcher} the ranks share the batches themselves: drop --shard")


def team(*, shard: tuple[int, int] | None = None, launch: Launch | None = None, ranks_per_gpu: int = 1,
         talkative: bool = False) -> Solo:
    """The team of this process: a ``Group`` under a launcher, a ``Shard`` with ``shard``, else ``Solo``."""
    check_shard_launch(shard, launch)
    if launch is not None:
        return Group(launch, ranks_per_gpu=ranks_per_gpu, talkative=talkative)
    return Solo() if shard is None else Shard(*shard)


def steady_rate(times: Sequence[BatchTime], seconds: float) -> float | None:
    """Conversions/s once every rank has finished its first batch (which carries the process's CUDA
    warm-up: first kernels, allocator growth) until the stage's end at ``seconds``. A batch counts with
    the part of its claim-to-done interval inside that window. None if a rank did fewer than 2 batches."""
    per_rank: dict[int, list[BatchTime]] = {}
    for t in times:
        per_rank.setdefault(t.rank, []).append(t)
    if not per_rank or any(len(ts) < 2 for ts in per_rank.values()):
        return None
    start = max(min(t.end for t in ts) for ts in per_rank.values())
    if seconds <= start:
        return None
    inside = sum(t.conversions * max(0.0, min(t.end, seconds) - max(t.start, start)) / max(t.end - t.start, 1e-9)
                 for t in times)
    return inside / (seconds - start)


def _throughput(console: Console, what: str, conversions: int, seconds: float,
                times: Sequence[BatchTime] = ()) -> None:
    """``record: 128 conversions in 51.2 s, 2.50 conversions/s`` (model loading not included), the rate
    after every rank's first batch, and per rank the median seconds per batch of each step; each batch's
    times go to the log (``esn -v``)."""
    line = f"{what}: {conversions} conversions in {seconds:.1f} s, {conversions / max(seconds, 1e-9):.2f} conversions/s"
    steady = steady_rate(times, seconds)
    if steady is not None:
        line += f"; after every rank's first batch {steady:.2f} conversions/s"
    console.print(line, soft_wrap=True)
    ranks = sorted({t.rank for t in times})
    for rank in ranks:
        mine = [t for t in times if t.rank == rank]
        phases = {p: statistics.median(t.phases.get(p, 0.0) for t in mine) for p in mine[0].phases}
        who = f"{what.split(' ')[0]} rank {rank}" if len(ranks) > 1 else what
        steps = ", ".join(f"{p} {v:.2f}" for p, v in phases.items())
        console.print(f"{who}: {len(mine)} batches; median s per batch: {steps}", soft_wrap=True)
        for i, t in enumerate(mine):
            steps = ", ".join(f"{p} {v:.3f}" for p, v in t.phases.items())
            log.info("%s batch: rank %d #%d, claimed %.2f s, done %.2f s, %d conversions; %s",
                     what.split(" ")[0], rank, i, t.start, t.end, t.conversions, steps)


def progress_bar(console: Console) -> Progress:
    """The bar of a loop over batches (a stage's, judge-eval's), with the time left."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("batches"),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False)


@contextlib.contextmanager
def _bar(console: Console, description: str, total: int, completed: int) -> Iterator[Progress]:
    """The progress bar of a stage's batches, with the time left."""
    with progress_bar(console) as bar:
        bar.add_task(description, total=total, completed=completed)
        yield bar
