"""Per-attempt activation statistics on disk, so success filters can be re-applied without generating.

A run directory::

    run/
      layout.json                          hook-point names and widths, fingerprint, architecture
      shards/<worker>-<seq>.safetensors    counts [B, N] (uint16, or int32 when a count exceeds 65535),
                                           tokens [B, G] int64 (positions seen per hook point, or per
                                           expert of a routed one: G position groups),
                                           optional sums / sumsq [B, N] float32,
                                           optional prompt_counts [B, N] / prompt_tokens [B, G]: the
                                           part of counts / tokens at prompt (prefill) positions
      shards/<worker>-<seq>.json           the B attempt records of that shard, size and sha256 of the
                                           tensor file

A shard written with ``compress=True`` (format ``esn-shard/2``) holds counts and prompt_counts as
``<name>.zrows`` (uint8: each row's bytes split by significance, "byte shuffle", then zlib) with
``<name>.zoffsets [B + 1]`` int64, so a reader decodes only the rows it needs; the values are the same
integers, bit for bit. Raw shards are ``esn-shard/1``, as every esn wrote before; both are read.

Every file is written to a temporary name and renamed into place, the sidecar last: a shard whose sidecar
is missing was interrupted, and is ignored with a warning. Many processes may write one directory as
long as each uses its own ``worker`` name. Aggregates are integer sums, so stores merge exactly. Nothing
is ever pickled. The format is described in ``docs/artifacts.md``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import safetensors.numpy

from esn.emotions import EMOTIONS, normalize_emotion
from esn.errors import EsnError
from esn.files import atomic_write_bytes
from esn.hookpoints import HookPoint, Layout

STORE_FORMAT = "esn-attempts/1"
SHARD_FORMAT = "esn-shard/1"  # raw tensors
SHARD_FORMAT_COMPRESSED = "esn-shard/2"  # counts / prompt_counts row by row compressed
SHARD_FORMATS = (SHARD_FORMAT, SHARD_FORMAT_COMPRESSED)
_COMPRESSED = ("counts", "prompt_counts")  # integers of [B, N]: about half their size compressed
_ZLIB_LEVEL = 1  # level 6 saves ~3% more bytes at 2.5x the time
_WORKER = re.compile(r"^[A-Za-z0-9_.]+$")


class StoreWarning(UserWarning):
    """Part of a store was skipped (an interrupted write); the rest is intact."""


@dataclass
class AttemptRecord:
    """One conversion attempt: its id, target emotion, reference transcript and the decoded text."""

    id: str
    emotion: str
    transcript: str
    text: str
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict, where: str = "record") -> AttemptRecord:
        """An attempt record from its JSON object, checked (missing or unknown keys are an EsnError)."""
        if not isinstance(d, dict):
            raise EsnError(f"{where}: an attempt record must be an object, got {type(d).__name__}")
        missing = [k for k in ("id", "emotion", "transcript", "text") if k not in d]
        if missing:
            raise EsnError(f"{where}: attempt record lacks {', '.join(missing)}")
        unknown = set(d) - {"id", "emotion", "transcript", "text", "meta"}
        if unknown:
            raise EsnError(f"{where}: unknown attempt record field(s) {sorted(unknown)}")
        rec = cls(d["id"], d["emotion"], d["transcript"], d["text"], dict(d.get("meta") or {}))
        if not isinstance(rec.id, str) or not rec.id:
            raise EsnError(f"{where}: attempt id must be a non-empty string, got {rec.id!r}")
        if not isinstance(rec.transcript, str) or not isinstance(rec.text, str):
            raise EsnError(f"{where}: transcript and text of attempt {rec.id!r} must be strings")
        rec.emotion = normalize_emotion(rec.emotion, EMOTIONS)
        return rec

    def to_dict(self) -> dict:
        """The JSON object of this record."""
        return asdict(self)


@dataclass
class AttemptStats:
    """Statistics of some attempts, rows in ``ids`` order."""

    ids: list[str]
    counts: np.ndarray  # [B, N] unsigned/signed integer: positions where the gate was > 0
    tokens: np.ndarray  # [B, G] int64: positions seen per group (hook point; expert when routed)
    sums: np.ndarray | None = None  # [B, N] float32: sum of gate values
    sumsq: np.ndarray | None = None  # [B, N] float32: sum of squared gate values
    prompt_counts: np.ndarray | None = None  # [B, N]: the part of counts at prompt (prefill) positions
    prompt_tokens: np.ndarray | None = None  # [B, G] int64: the part of tokens at prompt positions

    def rows(self, which: Sequence[int]) -> AttemptStats:
        """The statistics of rows ``which`` only, in that order."""
        pick = np.asarray(which, dtype=np.int64)
        opt = (None if a is None else a[pick] for a in (self.sums, self.sumsq, self.prompt_counts, self.prompt_tokens))
        return AttemptStats([self.ids[i] for i in pick], self.counts[pick], self.tokens[pick], *opt)

    def positions(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        """``(counts, tokens)`` over ``"all"`` recorded positions or the ``"generated"`` ones alone."""
        if which == "all":
            return self.counts, self.tokens
        if which != "generated":
            raise EsnError(f"positions must be 'all' or 'generated', got {which!r}")
        if self.prompt_counts is None:
            raise EsnError("these attempts were stored without the prompt/generated split of their counts "
                           "(recorded by an older esn, or with positions='generated'); record them again")
        return (self.counts.astype(np.int64) - self.prompt_counts.astype(np.int64),
                self.tokens - self.prompt_tokens)

    def same_row(self, i: int, other: AttemptStats, j: int) -> bool:
        """True if row ``i`` here and row ``j`` of ``other`` are identical (counts, tokens and moments)."""
        def eq(a, b):
            return (a is None) == (b is None) and (a is None or np.array_equal(a[i], b[j]))
        return all(eq(a, b) for a, b in ((self.counts, other.counts), (self.tokens, other.tokens),
                                         (self.sums, other.sums), (self.sumsq, other.sumsq),
                                         (self.prompt_counts, other.prompt_counts),
                                         (self.prompt_tokens, other.prompt_tokens)))


# --- layout files ------------------------------------------------------------------------------------

def layout_to_dict(layout: Layout) -> dict:
    """``{"fingerprint", "hook_points"}``: how files store a layout."""
    return {"fingerprint": layout.fingerprint, "hook_points": layout.describe()}


def layout_from_dict(d: dict, where: str) -> Layout:
    """The layout stored in a file (names and widths; module paths are not stored), checked."""
    try:
        hps = []
        for hp in d["hook_points"]:
            stream, layer, part = HookPoint.parse_name(hp["name"])
            hps.append(HookPoint(stream, layer, int(hp["width"]), module="", part=part,
                                 experts=int(hp.get("experts", 0)), top_k=int(hp.get("top_k", 0)),
                                 indices=int(hp.get("indices", 0))))
        layout = Layout(hps)
        fingerprint = d["fingerprint"]
    except EsnError as exc:
        raise EsnError(f"{where}: bad hook-point layout: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise EsnError(f"{where}: bad hook-point layout ({type(exc).__name__}: {exc})") from None
    if layout.fingerprint != fingerprint:
        raise EsnError(f"{where}: layout fingerprint {fingerprint} does not match its hook points "
                       f"({layout.fingerprint}); the file was edited or damaged")
    return layout


def read_json(path: Path, what: str) -> dict:
    """A JSON object from ``path``; EsnError naming ``what`` if it is missing or damaged."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise EsnError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EsnError(f"{path}: unreadable {what} ({exc}); the file is damaged") from None
    if not isinstance(data, dict):
        raise EsnError(f"{path}: {what} must be a JSON object")
    return data


def attempt_bytes(layout: Layout, *, moments: bool, prompt_split: bool = True) -> int:
    """Bytes one attempt takes in a raw shard (counts as uint16; the sidecar's JSON record not included):
    per neuron 2 (counts) + 2 (prompt_counts) + 8 (sums, sumsq as float32) with moments."""
    n, g = layout.n_neurons, layout.n_groups
    per_neuron = 2 + (2 if prompt_split else 0) + (8 if moments else 0)
    return n * per_neuron + g * 8 * (2 if prompt_split else 1)


def _shuffle(row: np.ndarray) -> bytes:
    """A row's bytes grouped by significance (all low bytes, then all high ones): compresses far better."""
    return np.ascontiguousarray(row).view(np.uint8).reshape(-1, row.dtype.itemsize).T.tobytes()


def _unshuffle(raw: bytes, dtype: np.dtype, n: int) -> np.ndarray:
    return np.frombuffer(raw, np.uint8).reshape(dtype.itemsize, n).T.copy().view(dtype).reshape(n)


def encode_rows(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[B, N]`` integers -> (compressed bytes of every row, uint8; offsets ``[B + 1]`` int64)."""
    parts = [zlib.compress(_shuffle(row), _ZLIB_LEVEL) for row in a]
    offsets = np.zeros(len(parts) + 1, np.int64)
    np.cumsum([len(p) for p in parts], out=offsets[1:])
    return np.frombuffer(b"".join(parts), np.uint8), offsets


def decode_rows(data: np.ndarray, offsets: np.ndarray, rows: Sequence[int], dtype, n: int) -> np.ndarray:
    """Rows ``rows`` of an ``encode_rows`` array, ``[len(rows), n]`` of ``dtype``; ValueError if damaged."""
    dtype = np.dtype(dtype).newbyteorder("<")
    out = np.empty((len(rows), n), dtype)
    raw = data.tobytes() if not data.flags.c_contiguous else memoryview(data)
    for k, r in enumerate(rows):
        part = zlib.decompress(raw[int(offsets[r]):int(offsets[r + 1])], bufsize=n * dtype.itemsize)
        if len(part) != n * dtype.itemsize:
            raise ValueError(f"row {r} decodes to {len(part)} bytes, expected {n * dtype.itemsize}")
        out[k] = _unshuffle(part, dtype, n)
    return out


def _header(blob: bytes) -> dict:
    """The ``esn`` metadata of a safetensors blob (its JSON header), ``{}`` if absent."""
    (size,) = struct.unpack("<Q", blob[:8])
    meta = json.loads(blob[8:8 + size]).get("__metadata__") or {}
    return json.loads(meta.get("esn", "{}"))


def as_numpy(x) -> np.ndarray:
    """numpy view of an array or a (possibly CUDA) torch tensor."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


# --- the store ---------------------------------------------------------------------------------------

@dataclass
class _Shard:
    name: str  # file stem, "<worker>-<seq>"
    records: list[AttemptRecord]
    size: int
    sha256: str


class AttemptStore:
    """A run directory of per-attempt statistics. Opens an existing store, or creates one given a layout.

    ``AttemptStore(path)`` opens; ``AttemptStore(path, layout, architecture=...)`` creates, or opens and
    checks that the stored layout is ``layout`` (``LayoutMismatchError`` otherwise).
    """

    def __init__(self, root: str | os.PathLike, layout: Layout | None = None, *, architecture: str | None = None):
        self.root = Path(root)
        self.shard_dir = self.root / "shards"
        meta_path = self.root / "layout.json"
        if meta_path.exists():
            meta = read_json(meta_path, "attempt store layout")
            if meta.get("format") != STORE_FORMAT:
                raise EsnError(f"{meta_path}: not an esn attempt store (format {meta.get('format')!r}, "
                               f"expected {STORE_FORMAT!r})")
            self.layout = layout_from_dict(meta, str(meta_path))
            self.architecture = meta.get("architecture")
            if layout is not None:
                layout.check_compatible(self.layout.fingerprint, f"attempt store {self.root}")
                self.layout = layout  # same names and widths, and the caller's module paths
            if architecture is not None and self.architecture not in (None, architecture):
                raise EsnError(f"{self.root} holds attempts of {self.architecture!r}, not {architecture!r}")
        elif layout is None:
            raise EsnError(f"{self.root} is not an attempt store (no layout.json); give a layout to create one")
        else:
            self.layout, self.architecture = layout, architecture
            self.shard_dir.mkdir(parents=True, exist_ok=True)
            from esn import __version__

            meta = {"format": STORE_FORMAT, "architecture": architecture, "esn_version": __version__,
                    **layout_to_dict(layout)}
            atomic_write_bytes(meta_path, json.dumps(meta, indent=1).encode())
        self.shard_dir.mkdir(exist_ok=True)
        # Parsed sidecars by file name, with the (size, mtime_ns, inode) they were parsed at: a sidecar is written
        # once, atomically, so each is parsed once per store object instead of on every append/read
        # (a paper-size study holds thousands; re-parsing them all per append outgrew a batch).
        self._parsed: dict[str, tuple[tuple[int, int, int], _Shard]] = {}

    def __repr__(self) -> str:
        return f"AttemptStore({str(self.root)!r}, {self.layout.n_neurons} neurons)"

    # --- writing ---

    def append(self, records: Iterable[AttemptRecord | dict], counts, tokens, sums=None, sumsq=None,
               *, prompt_counts=None, prompt_tokens=None, worker: str = "0", compress: bool = False) -> Path:
        """Write one shard: ``records`` (B of them) with ``counts [B, N]``, ``tokens [B, G]``, optional
        ``sums``/``sumsq [B, N]`` and optional ``prompt_counts [B, N]``/``prompt_tokens [B, G]`` (the part of
        counts/tokens at prompt positions). ``compress`` stores the counts compressed row by row (about
        half the bytes, read back identical). Returns the shard's sidecar path. Ids must be new to this store."""
        records = [AttemptRecord.from_dict(r.to_dict() if isinstance(r, AttemptRecord) else r, "append")
                   for r in records]
        stats = self._check_stats(records, counts, tokens, sums, sumsq)
        stats.prompt_counts, stats.prompt_tokens = self._check_prompt(stats, prompt_counts, prompt_tokens)
        seen = self.done_ids()
        ids = [r.id for r in records]
        dup = sorted({i for i in ids if ids.count(i) > 1} | (set(ids) & seen))
        if dup:
            raise EsnError(f"attempt id(s) already stored or repeated in this batch: {dup[:5]}; "
                           "skip the ids in done_ids() when resuming")
        return self._write(records, stats, worker, compress)

    def _check_stats(self, records, counts, tokens, sums, sumsq) -> AttemptStats:
        b, n, h = len(records), self.layout.n_neurons, self.layout.n_groups
        counts, tokens = as_numpy(counts), as_numpy(tokens)
        if counts.shape != (b, n) or not np.issubdtype(counts.dtype, np.integer):
            raise EsnError(f"counts must be an integer array [{b} attempts, {n} neurons], got {counts.dtype} {counts.shape}")
        if tokens.shape != (b, h) or not np.issubdtype(tokens.dtype, np.integer):
            raise EsnError(f"tokens must be an integer array [{b} attempts, {h} position groups], got {tokens.dtype} {tokens.shape}")
        if b and (counts.min() < 0 or tokens.min() < 0):
            raise EsnError("counts and tokens must be non-negative")
        starts = np.concatenate([[0], np.cumsum(self.layout.group_widths)[:-1]])
        if b and np.any(np.maximum.reduceat(counts, starts, axis=1) > tokens):
            raise EsnError("a neuron's positive count exceeds the positions seen at its hook point")
        if counts.size and counts.max() > np.iinfo(np.int32).max:
            raise EsnError("a count exceeds int32")
        if (sums is None) != (sumsq is None):
            raise EsnError("give both sums and sumsq, or neither")
        opt = []
        for name, a in (("sums", sums), ("sumsq", sumsq)):
            if a is None:
                opt.append(None)
                continue
            a = as_numpy(a)
            if a.shape != (b, n) or not np.all(np.isfinite(a)):
                raise EsnError(f"{name} must be a finite array [{b}, {n}], got shape {a.shape}")
            opt.append(a.astype(np.float32, copy=False))
        compact = np.uint16 if counts.size == 0 or counts.max() <= np.iinfo(np.uint16).max else np.int32
        return AttemptStats([r.id for r in records], counts.astype(compact, copy=False),
                            tokens.astype(np.int64, copy=False), *opt)

    def _check_prompt(self, stats: AttemptStats, prompt_counts, prompt_tokens) -> tuple:
        """The prompt share of counts/tokens: same shapes, integers, never more than the totals."""
        if prompt_counts is None and prompt_tokens is None:
            return None, None
        if prompt_counts is None or prompt_tokens is None:
            raise EsnError("give both prompt_counts and prompt_tokens, or neither")
        pc, pt = as_numpy(prompt_counts), as_numpy(prompt_tokens)
        for name, a, full in (("prompt_counts", pc, stats.counts), ("prompt_tokens", pt, stats.tokens)):
            if a.shape != full.shape or not np.issubdtype(a.dtype, np.integer):
                raise EsnError(f"{name} must be an integer array of shape {full.shape}, got {a.dtype} {a.shape}")
            if a.size and (a.min() < 0 or np.any(a.astype(np.int64) > full.astype(np.int64))):
                raise EsnError(f"{name} must lie between 0 and the matching total (its prompt share)")
        return pc.astype(stats.counts.dtype), pt.astype(np.int64)

    def _write(self, records: list[AttemptRecord], stats: AttemptStats, worker: str, compress: bool = False) -> Path:
        if not _WORKER.match(worker):
            raise EsnError(f"worker name {worker!r} must be letters, digits, '_' or '.'")
        tensors = {"counts": stats.counts, "tokens": stats.tokens}
        if stats.sums is not None:
            tensors |= {"sums": stats.sums, "sumsq": stats.sumsq}
        if stats.prompt_counts is not None:
            tensors |= {"prompt_counts": stats.prompt_counts, "prompt_tokens": stats.prompt_tokens}
        fmt = SHARD_FORMAT_COMPRESSED if compress else SHARD_FORMAT
        meta = {"format": fmt, "fingerprint": self.layout.fingerprint}
        if compress:
            meta["dtypes"] = {}
            for name in _COMPRESSED:
                if name in tensors:
                    a = tensors.pop(name)
                    meta["dtypes"][name] = np.dtype(a.dtype).newbyteorder("<").str
                    tensors[f"{name}.zrows"], tensors[f"{name}.zoffsets"] = encode_rows(a.astype(meta["dtypes"][name]))
        blob = safetensors.numpy.save(tensors, metadata={"esn": json.dumps(meta)})
        stems = (n.rsplit(".", 1)[0] for n in self._names() if n.startswith(f"{worker}-"))
        seq = 1 + max((int(t[len(worker) + 1:]) for t in stems if t[len(worker) + 1:].isdigit()), default=-1)
        while (self.shard_dir / f"{worker}-{seq:06d}.safetensors").exists():
            seq += 1
        stem = f"{worker}-{seq:06d}"
        atomic_write_bytes(self.shard_dir / f"{stem}.safetensors", blob)
        sidecar = {"format": fmt, "tensors": f"{stem}.safetensors", "size": len(blob),
                   "sha256": hashlib.sha256(blob).hexdigest(), "records": [r.to_dict() for r in records]}
        path = self.shard_dir / f"{stem}.json"
        atomic_write_bytes(path, json.dumps(sidecar, ensure_ascii=False).encode())
        return path

    # --- reading ---

    def _names(self) -> list[str]:
        """File names in the shard folder, sorted (strings: sorting Path objects costs more than the rest)."""
        with os.scandir(self.shard_dir) as entries:
            return sorted(e.name for e in entries if not e.name.startswith("."))

    def _shards(self) -> list[_Shard]:
        shards = []
        names = self._names()
        folder = str(self.shard_dir)
        stems = set()
        parsed: dict[str, tuple[tuple[int, int, int], _Shard]] = {}
        for name in names:
            if not name.endswith(".json"):
                continue
            try:
                st = os.stat(os.path.join(folder, name))  # strings: a Path per file costs more than the stat
            except OSError as exc:
                raise EsnError(f"{self.shard_dir / name}: cannot read shard sidecar ({exc})") from None
            key = (st.st_size, st.st_mtime_ns, st.st_ino)  # a rewrite is a rename: a new inode
            cached = self._parsed.get(name)
            shard = cached[1] if cached is not None and cached[0] == key else self._parse_sidecar(self.shard_dir / name)
            parsed[name] = (key, shard)
            shards.append(shard)
            stems.add(name[:-len(".json")])
        self._parsed = parsed  # sidecars removed from disk are forgotten too
        orphans = [n for n in names if n.endswith(".safetensors") and n[:-len(".safetensors")] not in stems]
        if orphans:
            warnings.warn(f"{self.shard_dir}: ignoring {len(orphans)} shard(s) without a sidecar, left by an "
                          f"interrupted write: {', '.join(orphans[:5])}", StoreWarning, stacklevel=3)
        return shards

    @staticmethod
    def _parse_sidecar(path: Path) -> _Shard:
        side = read_json(path, "shard sidecar")
        if side.get("format") not in SHARD_FORMATS or side.get("tensors") != f"{path.stem}.safetensors":
            raise EsnError(f"{path}: not an esn shard sidecar (format {side.get('format')!r})")
        try:
            recs = [AttemptRecord.from_dict(d, f"{path} record {i}") for i, d in enumerate(side["records"])]
            return _Shard(path.stem, recs, int(side["size"]), str(side["sha256"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise EsnError(f"{path}: damaged shard sidecar ({type(exc).__name__}: {exc})") from None

    def _load(self, shard: _Shard, rows: Sequence[int] | None = None) -> AttemptStats:
        """A shard's statistics (of ``rows`` only, in that order, if given), checked against its sidecar."""
        path = self.shard_dir / f"{shard.name}.safetensors"
        try:
            blob = path.read_bytes()
        except OSError as exc:
            raise EsnError(f"{path}: cannot read shard ({exc})") from None
        if len(blob) != shard.size or hashlib.sha256(blob).hexdigest() != shard.sha256:
            raise EsnError(f"{path}: shard is truncated or damaged ({len(blob)} bytes, sidecar says "
                           f"{shard.size}, checksum {'differs' if len(blob) == shard.size else 'not checked'})")
        b, n, h = len(shard.records), self.layout.n_neurons, self.layout.n_groups
        if rows is not None and any(not 0 <= r < b for r in rows):
            raise EsnError(f"{path}: rows {list(rows)} outside its {b} attempts")
        try:
            t = safetensors.numpy.load(blob)
            decoded = _decode(t, _header(blob), b, n, rows)  # compressed counts, already of ``rows`` only
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise EsnError(f"{path}: not a readable safetensors file ({exc})") from None
        shape = {k: v.shape for k, v in t.items()} | {k: (b, n) for k in decoded}
        pairs = ({"sums", "sumsq"}, {"prompt_counts", "prompt_tokens"})  # optional, each all or nothing
        ok = ({"counts", "tokens"} <= set(shape) and all(not (p & set(shape)) or p <= set(shape) for p in pairs)
              and set(shape) <= {"counts", "tokens"}.union(*pairs)
              and shape["counts"] == (b, n) and shape["tokens"] == (b, h)
              and all(shape[k] == (b, n) for k in ("sums", "sumsq", "prompt_counts") if k in shape)
              and ("prompt_tokens" not in shape or shape["prompt_tokens"] == (b, h)))
        if not ok:
            raise EsnError(f"{path}: shard tensors {shape} do not fit {b} attempts of {n} neurons / {h} position groups")
        ids = [r.id for r in shard.records]
        if rows is not None:
            pick = np.asarray(rows, dtype=np.int64)
            t = {k: v[pick] for k, v in t.items()}
            ids = [ids[i] for i in pick]
        t |= decoded
        return AttemptStats(ids, t["counts"], t["tokens"], t.get("sums"), t.get("sumsq"), t.get("prompt_counts"),
                            t.get("prompt_tokens"))

    def _index(self) -> tuple[list[_Shard], dict[str, tuple[int, int]]]:
        """Shards, and id -> (shard number, row) with duplicate ids resolved (identical: first kept)."""
        shards = self._shards()
        where: dict[str, tuple[int, int]] = {}
        for s, shard in enumerate(shards):
            for row, rec in enumerate(shard.records):
                if rec.id in where:
                    s0, row0 = where[rec.id]
                    _check_same(self, shards[s0], row0, self, shard, row)
                    continue
                where[rec.id] = (s, row)
        return shards, where

    def damaged_shards(self, record_ok: Callable[[AttemptRecord], bool] | None = None) -> list[str]:
        """Names (``<worker>-<seq>``) of the shards whose tensor file is not the one their sidecar names
        (size and sha256), or holding a record that ``record_ok`` rejects (e.g. a damaged wav)."""
        from esn.files import sha256_file

        bad = []
        for shard in self._shards():
            path = self.shard_dir / f"{shard.name}.safetensors"
            try:
                ok = path.stat().st_size == shard.size and sha256_file(path) == shard.sha256
            except (OSError, EsnError):
                ok = False
            if not ok or (record_ok is not None and not all(record_ok(r) for r in shard.records)):
                bad.append(shard.name)
        return bad

    def records(self) -> list[AttemptRecord]:
        """Every stored attempt record once, in shard order."""
        shards, where = self._index()
        return [shards[s].records[row] for s, row in where.values()]

    def done_ids(self) -> set[str]:
        """Ids of the attempts already stored (skip them when resuming a run)."""
        return {rec.id for shard in self._shards() for rec in shard.records}

    def has_moments(self) -> bool | None:
        """Whether every stored attempt has sums and sums of squares (None: nothing stored yet). Reads the
        tensor files' headers only."""
        shards = self._shards()
        if not shards:
            return None
        return all("sums" in self._tensor_names(shard) for shard in shards)

    def _tensor_names(self, shard: _Shard) -> set[str]:
        path = self.shard_dir / f"{shard.name}.safetensors"
        try:
            with open(path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                return set(json.loads(f.read(min(size, shard.size))) or {}) - {"__metadata__"}
        except (OSError, struct.error, ValueError, TypeError) as exc:
            raise EsnError(f"{path}: cannot read shard header ({exc})") from None

    def iter_stats(self, ids: Iterable[str] | None = None) -> Iterator[AttemptStats]:
        """Statistics of ``ids`` (default: all), one shard at a time; unknown ids are an error."""
        shards, where = self._index()
        wanted = list(where) if ids is None else list(dict.fromkeys(ids))
        unknown = [i for i in wanted if i not in where]
        if unknown:
            raise EsnError(f"{len(unknown)} attempt id(s) are not in {self.root}: {unknown[:5]}")
        by_shard: dict[int, list[int]] = {}
        for i in wanted:
            s, row = where[i]
            by_shard.setdefault(s, []).append(row)
        for s in sorted(by_shard):
            yield self._load(shards[s], sorted(by_shard[s]))

    def merge_from(self, *others: AttemptStore, worker: str = "merged", compress: bool = False) -> int:
        """Copy the attempts of ``others`` into this store, exactly. An id stored twice must hold identical
        content (the copy is skipped); a conflicting id is an error, raised before anything is written.
        ``compress`` writes the copies compressed (the same values). Returns the number of attempts copied."""
        for other in others:
            self.layout.check_compatible(other.layout.fingerprint, f"attempt store {other.root}")
        shards, where = self._index()
        have = {i: (self, shards[s], row) for i, (s, row) in where.items()}
        plan: list[tuple[AttemptStore, _Shard, list[int]]] = []
        for other in others:
            o_shards, o_where = other._index()
            rows_by_shard: dict[int, list[int]] = {}
            for rec_id, (s, row) in o_where.items():
                if rec_id in have:
                    store0, shard0, row0 = have[rec_id]
                    _check_same(store0, shard0, row0, other, o_shards[s], row)
                    continue
                have[rec_id] = (other, o_shards[s], row)
                rows_by_shard.setdefault(s, []).append(row)
            plan += [(other, o_shards[s], rows) for s, rows in sorted(rows_by_shard.items())]
        for other, shard, rows in plan:
            self._write([shard.records[r] for r in rows], other._load(shard, rows), worker, compress)
        return sum(len(rows) for _, _, rows in plan)


def _decode(t: dict, header: dict, b: int, n: int, rows: Sequence[int] | None) -> dict:
    """A compressed shard's counts, decoded (of ``rows`` only if given), their parts popped from ``t``; a raw
    shard: ``{}``."""
    if header.get("format") != SHARD_FORMAT_COMPRESSED:
        return {}
    out = {}
    for name, dtype in header["dtypes"].items():
        if name not in _COMPRESSED or np.dtype(dtype).kind not in "ui":
            raise ValueError(f"{name!r} of {dtype!r} is not a compressed integer tensor")
        data, offsets = t.pop(f"{name}.zrows"), t.pop(f"{name}.zoffsets")
        if offsets.shape != (b + 1,) or offsets[0] != 0 or np.any(np.diff(offsets) < 0) or offsets[-1] != data.size:
            raise ValueError(f"{name}: row offsets do not fit {b} rows of {data.size} bytes")
        out[name] = decode_rows(data, offsets, range(b) if rows is None else rows, dtype, n)
    return out


def _check_same(store_a: AttemptStore, shard_a: _Shard, row_a: int,
                store_b: AttemptStore, shard_b: _Shard, row_b: int) -> None:
    """Two stored copies of one attempt must be identical: record and every statistic."""
    rec_a, rec_b = shard_a.records[row_a], shard_b.records[row_b]
    if rec_a.to_dict() != rec_b.to_dict() or not store_a._load(shard_a).same_row(row_a, store_b._load(shard_b), row_b):
        raise EsnError(f"attempt {rec_a.id!r} is stored twice with different content "
                       f"({store_a.shard_dir / shard_a.name} and {store_b.shard_dir / shard_b.name}); "
                       "remove one of the two shards")
