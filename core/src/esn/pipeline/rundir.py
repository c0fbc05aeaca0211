"""The run directory: where each stage's files go, the manifest, the locks, and a killed run's temp files.

Layout::

    manifest.json            config, versions, seeds, git hash, per-stage config fingerprints
    record/                  per-attempt records + gate counts (AttemptStore), record/audio/*.wav
    select/                  activation statistics and masks (one file per mask recipe), summary.json
    evaluate/batches/*.json  one file per batch of the grid; evaluate/audio/*.wav; evaluate/results.json
    report.md, report.html, figures/*.png

Locks: an unsharded process holds ``.lock`` exclusively; a shard holds it shared, plus
``.lock-shard-K-of-N`` exclusively (the same shard twice is refused), and shards of different N or config
never mix. Opening takes turns through ``.lock-open``; only a process alone in the directory removes
temporary files and rewrites the manifest, so a live shard's half-written files are never touched.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import platform
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from esn.errors import EsnError
from esn.pipeline.files import atomic_write_json, clean_temp, dumps, read_json

RESULT_STAGES = ("record", "select", "evaluate")  # the stages whose folders hold results a config change voids


def fingerprint(obj: Any) -> str:
    """sha256 (16 hex digits) of an object's canonical JSON: ties a run directory to its configuration."""
    return hashlib.sha256(dumps(obj).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _flock(path: Path, mode: int) -> Iterator[None]:
    """Hold a blocking flock on ``path`` for the block."""
    with open(path, "w") as fh:
        fcntl.flock(fh, mode)
        yield


def _try_lock(fh, mode: int) -> bool:
    try:
        fcntl.flock(fh, mode | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


class RunDir:
    """One run directory: its layout, its manifest and this process's locks on it."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.record = self.root / "record"
        self.select = self.root / "select"
        self.evaluate = self.root / "evaluate"
        self.figures = self.root / "figures"
        self.manifest = self.root / "manifest.json"
        self._lock = None
        self._shard_lock = None

    def open(self, config: dict, stage_config: dict[str, Any], shard: tuple[int, int] | None = None) -> None:
        """Create or reopen the directory for ``config`` (its JSON form); refuse one made by a different config.

        ``stage_config`` holds the config parts each stage's results depend on. Unsharded: the directory to
        itself. A shard: beside other shards of the same N and config only.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        fingerprints = {k: fingerprint(v) for k, v in stage_config.items()}
        # Opens take turns (a few milliseconds each), so lock checks, clean-up and manifest are one step.
        with _flock(self.root / ".lock-open", fcntl.LOCK_EX):
            try:
                if self._take_locks(shard):
                    self._prepare(config, fingerprints)
                    if shard is not None:  # let further shards in
                        fcntl.flock(self._lock, fcntl.LOCK_SH)
                else:
                    self._join(config, fingerprints, shard)
            except BaseException:
                self.close()
                raise

    def close(self) -> None:
        """Release this process's locks on the run directory."""
        for name in ("_shard_lock", "_lock"):
            if getattr(self, name) is not None:
                getattr(self, name).close()
                setattr(self, name, None)

    def begin(self, stage: str, processes: int, *, resize: bool = False) -> None:
        """Note in the manifest that ``stage`` is under way with ``processes`` processes. A stage left
        unfinished by another number of processes is refused unless ``resize``: torch's CPU results depend
        on the threads per process, which launchers derive from the number of processes (torchrun sets
        OMP_NUM_THREADS=1 for several), so one stage's batches come from one launch shape."""
        data = read_json(self.manifest)
        unfinished = data.setdefault("unfinished", {})
        started = unfinished.get(stage)
        if started not in (None, processes) and not resize:
            raise EsnError(
                f"{stage} in run directory {self.root} was started by {started} process(es) and is not finished; "
                f"this launch has {processes}. Resume it with {started} (the same --nnodes x --nproc-per-node), "
                f"or pass --resize to finish it with {processes}")
        if started != processes:
            unfinished[stage] = processes
            atomic_write_json(self.manifest, data)

    def end(self, stage: str) -> None:
        """``stage`` is complete: any number of processes may run it (or the next ones) from now on."""
        data = read_json(self.manifest)
        if stage in data.get("unfinished", {}):
            del data["unfinished"][stage]
            if not data["unfinished"]:
                del data["unfinished"]
            atomic_write_json(self.manifest, data)

    def has_results(self, stage: str) -> bool:
        """True if the stage's folder exists and holds anything."""
        folder = self.root / stage
        return folder.is_dir() and any(folder.iterdir())

    def _take_locks(self, shard: tuple[int, int] | None) -> bool:
        """Take this process's locks; True when no other process is in the run directory."""
        self._lock = open(self.root / ".lock", "w")
        if shard is None:
            if not _try_lock(self._lock, fcntl.LOCK_EX):
                raise EsnError(f"another esn process is using run directory {self.root}")
            return True
        alone = _try_lock(self._lock, fcntl.LOCK_EX)
        if not alone and not _try_lock(self._lock, fcntl.LOCK_SH):
            raise EsnError(f"an esn process without --shard is using run directory {self.root}; shards run only "
                           "beside other shards")
        k, n = shard
        self._shard_lock = open(self.root / f".lock-shard-{k}-of-{n}", "w")
        if not _try_lock(self._shard_lock, fcntl.LOCK_EX):
            raise EsnError(f"shard {k}/{n} is already running on run directory {self.root}")
        return alone

    def _join(self, config: dict, fingerprints: dict[str, str], shard: tuple[int, int]) -> None:
        """Shards already run here: this one must split the same batches (same N) of the same config."""
        k, n = shard
        for path in self.root.glob(".lock-shard-*-of-*"):
            other = re.fullmatch(r"\.lock-shard-(\d+)-of-(\d+)", path.name)
            if other is None or int(other[2]) == n:
                continue
            with open(path, "w") as fh:
                if not _try_lock(fh, fcntl.LOCK_EX):
                    raise EsnError(f"shard {other[1]}/{other[2]} is running on run directory {self.root}: every "
                                   f"shard running at once must use the same N (got --shard {k}/{n})")
        old = read_json(self.manifest).get("fingerprints") if self.manifest.exists() else None
        if old != fingerprints:
            changed = ", ".join(self._changed(config)) if self.manifest.exists() else "?"
            raise EsnError(f"shards with another configuration are running on run directory {self.root} (the parts "
                           f"that differ: {changed}); every shard of a run takes the same config")

    def _prepare(self, config: dict, fingerprints: dict[str, str]) -> None:
        """Alone in the directory: remove a killed run's temp files, check and write the manifest."""
        clean_temp(self.root)
        fresh = manifest(config, fingerprints)
        if self.manifest.exists():
            before = read_json(self.manifest)
            old = before.get("fingerprints", {})
            for stage in RESULT_STAGES:
                if old.get(stage) not in (None, fingerprints[stage]) and self.has_results(stage):
                    raise EsnError(
                        f"run directory {self.root} holds {stage} results made with a different configuration "
                        f"(the parts that changed: {', '.join(self._changed(config))}). Use a new run_dir, "
                        f"or delete {self.root / stage} to recompute that stage and the ones after it."
                    )
            # stages under way stay so (see ``begin``), unless their results were deleted
            unfinished = {k: v for k, v in before.get("unfinished", {}).items() if self.has_results(k)}
            if unfinished:
                fresh["unfinished"] = unfinished
        atomic_write_json(self.manifest, fresh)

    def _changed(self, config: dict) -> list[str]:
        old = read_json(self.manifest).get("config", {})
        return [k for k in config if old.get(k) != config.get(k)] or ["?"]


def manifest(config: dict, fingerprints: dict[str, str]) -> dict:
    """What made a run: the config, per-stage fingerprints, seeds, package versions and the git hash."""
    from importlib.metadata import version

    from esn import __version__

    versions = {"esn-core": __version__, "python": platform.python_version()}
    for dist in ("torch", "transformers", "numpy", "nnsight", "funasr"):
        with contextlib.suppress(Exception):
            versions[dist] = version(dist)
    return {
        "config": config,
        "fingerprints": fingerprints,
        "seeds": {"run": config["seed"], "batch": "derive_seed(run seed, stage, first attempt id of the batch)"},
        "versions": versions,
        "git": _git_hash(Path(__file__).resolve().parent),
    }


def _git_hash(where: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
