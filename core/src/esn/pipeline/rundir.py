"""The run directory: where each stage's files go, the manifest, the locks, and a killed run's temp files.

Layout::

    manifest.json            config, versions, seeds, git hash, per-stage config fingerprints
    record/                  per-attempt records + gate counts (AttemptStore), record/audio/*.wav
    select/                  activation statistics and masks (one file per mask recipe), summary.json
    evaluate/batches/*.json  one file per batch of the grid; evaluate/audio/*.wav; evaluate/results.json
    report.md, report.html, figures/*.png

What esn writes into: a folder that does not exist yet, an empty one, or one with esn's
``manifest.json``; anything else is refused before a file is written. A folder whose stage results have
no fingerprint in the manifest (e.g. a deleted ``manifest.json``) is refused too: nothing could tell which
config made them.

What esn never does: write, lock or read back through a symbolic link. A run directory holding a link
anywhere inside is refused before any work (the run directory itself may be a link); lock files are opened
with ``O_NOFOLLOW`` and never truncated, and every other file is written by renaming a new file into place,
so neither a link nor a hard link to an outside file can make esn change it.

What esn deletes: only its own temp files (``esn.files.is_temp``: ``.<name>.<8 chars>.esn-tmp``) directly
in the folders of the layout above (``LAYOUT``), which a write killed half-way leaves behind; nothing else.

Locks: an unsharded process (a torchrun group's rank 0) holds ``.lock`` exclusively from ``open`` to ``close`` (a whole command, every
stage); a shard holds it shared, plus ``.lock-shard-K-of-N`` exclusively (the same shard twice is refused),
and shards of different N or config never mix. Opening takes turns through ``.lock-open``; only a process
alone in the directory removes temporary files and rewrites the manifest, so a live shard's half-written
files are never touched.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import platform
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from esn.errors import EsnError
from esn.files import is_temp, open_nofollow, os_error, refuse_links
from esn.pipeline.files import atomic_write_json, dumps, read_json, remove_temp

RESULT_STAGES = ("record", "select", "evaluate")  # the stages whose folders hold results a config change voids
# The folders esn writes files into (relative to the run directory): the only places it removes temp files.
LAYOUT = ("", "record", "record/shards", "record/audio", "select", "evaluate", "evaluate/batches",
          "evaluate/audio", "figures", "human", "human/ab-kit", "human/ab-kit/clips", "human/labels-kit",
          "human/labels-kit/clips")


def fingerprint(obj: Any) -> str:
    """sha256 (16 hex digits) of an object's canonical JSON: ties a run directory to its configuration."""
    return hashlib.sha256(dumps(obj).encode()).hexdigest()[:16]


def _lock_file(path: Path):
    """A lock file, opened without following a link and never truncated (``esn.files.open_nofollow``)."""
    return os.fdopen(open_nofollow(path), "w")


@contextlib.contextmanager
def _flock(path: Path, mode: int) -> Iterator[None]:
    """Hold a blocking flock on ``path`` for the block."""
    with _lock_file(path) as fh:
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

    def open(self, config: dict, stage_config: dict[str, Any], shard: tuple[int, int] | None = None,
             inputs: dict[str, Any] | None = None) -> None:
        """Create or reopen the directory for ``config`` (its JSON form); refuse one made by a different config.

        ``stage_config`` holds the config parts each stage's results depend on (``inputs``: digests of
        input files among them, by config field, shown when they change). Unsharded: the directory to
        itself. A shard: beside other shards of the same N and config only.
        """
        self.claim()
        fingerprints = {k: fingerprint(v) for k, v in stage_config.items()}
        # Opens take turns (a few milliseconds each), so lock checks, clean-up and manifest are one step.
        try:
            with _flock(self.root / ".lock-open", fcntl.LOCK_EX):
                try:
                    self.claim()  # again, now that no other process is opening
                    if self._take_locks(shard):
                        self._prepare(config, fingerprints, inputs or {})
                        if shard is not None:  # let further shards in
                            fcntl.flock(self._lock, fcntl.LOCK_SH)
                    else:
                        self._join(config, fingerprints, shard)
                except BaseException:
                    self.close()
                    raise
        except OSError as exc:  # a read-only or foreign folder: the lock files cannot be made
            raise os_error(exc, self.root, "open run directory") from None

    def claim(self, *, mark: bool = False) -> None:
        """Make sure the directory is esn's to write: absent (created here), empty, or holding a manifest.

        ``mark`` writes a placeholder manifest into a new or empty folder, so that it stays a run directory
        while other files are written into it before the first ``open`` (the demo's inputs).
        """
        try:
            if self.root.exists() and not self.root.is_dir():
                raise EsnError(f"run directory {self.root} is a file, not a folder")
            self.root.mkdir(parents=True, exist_ok=True)
            refuse_links(self.root)  # before any file in it is read, locked or written
            if self.manifest.exists() or self.manifest.is_symlink():
                self._read_manifest()  # a damaged manifest is an error here, before anything else
                return
            # esn's own temp files do not make a folder foreign: a shard starting beside another sees the
            # other's manifest being written (under the open lock), and a killed first write leaves one
            found = sorted(p.name for p in self.root.iterdir() if not p.name.startswith(".lock") and not is_temp(p.name))
        except OSError as exc:
            raise os_error(exc, self.root, "open run directory") from None
        results = [s for s in RESULT_STAGES if self.has_results(s)]
        if results:
            raise EsnError(
                f"run directory {self.root} holds {', '.join(results)} results but no manifest.json, so nothing "
                "tells which configuration made them and esn will not mix them with this one. Restore "
                f"manifest.json, or move {', '.join(s + '/' for s in results)} away (or use a new run_dir)."
            )
        if found:
            shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
            raise EsnError(
                f"{self.root} is not an esn run directory (no manifest.json) and not empty ({shown}): esn writes "
                "only into a new or empty folder, or a run directory it made. Choose another run_dir (or --run-dir)."
            )
        if mark:
            atomic_write_json(self.manifest, {"config": None, "fingerprints": {},
                                              "note": "a new run directory: no stage has run yet"})

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
        data = self._read_manifest()
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
        data = self._read_manifest()
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
        self._lock = _lock_file(self.root / ".lock")
        if shard is None:
            if not _try_lock(self._lock, fcntl.LOCK_EX):
                raise EsnError(f"another esn process is using run directory {self.root}")
            return True
        alone = _try_lock(self._lock, fcntl.LOCK_EX)
        if not alone and not _try_lock(self._lock, fcntl.LOCK_SH):
            raise EsnError(f"an esn process without --shard is using run directory {self.root}; shards run only "
                           "beside other shards")
        k, n = shard
        self._shard_lock = _lock_file(self.root / f".lock-shard-{k}-of-{n}")
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
            with _lock_file(path) as fh:
                if not _try_lock(fh, fcntl.LOCK_EX):
                    raise EsnError(f"shard {other[1]}/{other[2]} is running on run directory {self.root}: every "
                                   f"shard running at once must use the same N (got --shard {k}/{n})")
        old = self._read_manifest().get("fingerprints") if self.manifest.exists() else None
        if old != fingerprints:
            changed = ", ".join(self._changed(config)) if self.manifest.exists() else "?"
            raise EsnError(f"shards with another configuration are running on run directory {self.root} (the parts "
                           f"that differ: {changed}); every shard of a run takes the same config")

    def _prepare(self, config: dict, fingerprints: dict[str, str], inputs: dict[str, Any]) -> None:
        """Alone in the directory: remove a killed run's temp files, check and write the manifest."""
        remove_temp(self.root / folder for folder in LAYOUT)
        old = self._read_manifest() if self.manifest.exists() else {"fingerprints": {}}
        for stage in RESULT_STAGES:
            recorded = old["fingerprints"].get(stage)
            if recorded == fingerprints[stage] or not self.has_results(stage):
                continue
            if recorded is None:
                raise EsnError(
                    f"run directory {self.root} holds {stage} results, but its manifest.json has no fingerprint "
                    f"for them, so nothing tells which configuration made them. Use a new run_dir, or delete "
                    f"{self.root / stage} to recompute that stage and the ones after it."
                )
            raise EsnError(
                f"run directory {self.root} holds {stage} results made with a different configuration "
                f"(the parts that changed: {', '.join(self._changed(config, inputs))}). Use a new run_dir, "
                f"or delete {self.root / stage} to recompute that stage and the ones after it."
            )
        fresh = manifest(config, fingerprints, inputs)
        # stages under way stay so (see ``begin``), unless their results were deleted
        unfinished = {k: v for k, v in (old.get("unfinished") or {}).items() if self.has_results(k)}
        if unfinished:
            fresh["unfinished"] = unfinished
        atomic_write_json(self.manifest, fresh)

    def _read_manifest(self) -> dict:
        """The manifest, checked; damage is an error that keeps the file (it is the run's only record of
        which configuration made the results next to it)."""
        hint = ("it records which configuration made the results in this run directory, so esn will not "
                "go on without it: restore it from a backup, or use a new run_dir")
        data = read_json(self.manifest, hint)
        if not isinstance(data, dict) or not isinstance(data.get("fingerprints"), dict):
            raise EsnError(f"{self.manifest} is not an esn manifest (no fingerprints object); {hint}")
        return data

    def _changed(self, config: dict, inputs: dict[str, Any] | None = None) -> list[str]:
        manifest = self._read_manifest()
        old, old_inputs = manifest.get("config") or {}, manifest.get("inputs") or {}
        changed = [k for k in config if old.get(k) != config.get(k)]
        changed += [f"the content of {k}" for k, v in (inputs or {}).items() if old_inputs.get(k) != v]
        return changed or ["?"]


def manifest(config: dict, fingerprints: dict[str, str], inputs: dict[str, Any] | None = None) -> dict:
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
        "inputs": inputs or {},
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
