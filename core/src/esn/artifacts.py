"""Statistics and mask files: safetensors tensors + JSON metadata in the safetensors header.

A safetensors header's ``__metadata__`` holds only strings, so esn keeps one key, ``"esn"``, whose value
is a JSON object: the format name, the hook-point layout (names, widths, fingerprint), the model
architecture, the provenance (selector, r, c, tau_wer, judge, seed, source run) and the esn version.
Loading checks the layout against the model's and names the file on any damage. Nothing is pickled.
The formats are described in ``docs/artifacts.md``.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import safetensors.numpy

from esn.errors import EsnError
from esn.files import atomic_write_bytes, read_bytes, tensor_digest
from esn.hookpoints import Layout
from esn.masks import Mask
from esn.statistics import ActivationStats
from esn.store import layout_from_dict, layout_to_dict

STATS_FORMAT = "esn-stats/1"
MASKS_FORMAT = "esn-masks/1"
# Provenance keys every file carries (None when unknown); callers may add other JSON values.
PROVENANCE = ("architecture", "selector", "r", "c", "tau_wer", "judge", "seed", "source_run")


@dataclass
class MaskSet:
    """One mask per emotion over one layout, and where the masks came from (``meta``: PROVENANCE keys
    and any other JSON values)."""

    masks: dict[str, Mask]
    layout: Layout
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_indices(cls, indices: Mapping[str, np.ndarray], layout: Layout, **meta) -> MaskSet:
        """From ``select_neurons``' output, e.g. ``MaskSet.from_indices(sel, layout, selector="cas", r=0.005)``."""
        return cls({e: Mask(np.asarray(i), layout) for e, i in indices.items()}, layout, meta)

    @property
    def emotions(self) -> list[str]:
        """The emotions that have a mask, in file order."""
        return list(self.masks)

    @property
    def indices(self) -> dict[str, np.ndarray]:
        """``{emotion: sorted int64 flat indices}``, the shape ``select_neurons`` returns."""
        return {e: m.indices for e, m in self.masks.items()}

    def __getitem__(self, emotion: str) -> Mask:
        try:
            return self.masks[emotion]
        except KeyError:
            raise EsnError(f"no mask for emotion {emotion!r} (masks for: {', '.join(self.masks)})") from None


def _header(kind: str, layout: Layout, meta: dict, extra: dict, tensors: dict[str, np.ndarray]) -> dict[str, str]:
    from esn import __version__

    # esn's own fields win over same-named caller keys (e.g. meta read back from an older file);
    # sha256 covers the tensors (names, dtypes, shapes, bytes): damage to the data is caught on loading
    body = {**dict.fromkeys(PROVENANCE), **meta, "format": kind, "esn_version": __version__,
            **layout_to_dict(layout), **extra, "sha256": tensor_digest(tensors)}
    try:
        return {"esn": json.dumps(body, allow_nan=False)}
    except (TypeError, ValueError) as exc:
        raise EsnError(f"artifact metadata must be plain JSON values ({exc})") from None


def _read(path: str | os.PathLike, *kinds: str) -> tuple[Path, dict, dict[str, np.ndarray]]:
    """Tensors and the esn metadata of ``path``; every kind of damage is an EsnError naming the file."""
    path = Path(path)
    blob = read_bytes(path)
    try:
        (n,) = struct.unpack("<Q", blob[:8])
        header = json.loads(blob[8:8 + n]) if 8 + n <= len(blob) else None
        tensors = safetensors.numpy.load(blob)
    except Exception as exc:  # struct.error, JSONDecodeError, SafetensorError: all mean "not this format"
        raise EsnError(f"{path}: not a valid safetensors file, truncated or damaged ({exc})") from None
    try:
        meta = json.loads(header["__metadata__"]["esn"])
        if not isinstance(meta, dict):
            raise TypeError("not an object")
    except (KeyError, TypeError, json.JSONDecodeError):
        raise EsnError(f"{path}: a safetensors file without esn metadata; not an esn artifact") from None
    if meta.get("format") not in kinds:
        raise EsnError(f"{path}: holds {meta.get('format')!r}, expected {' or '.join(map(repr, kinds))}")
    if "sha256" in meta and meta["sha256"] != tensor_digest(tensors):  # files of esn < 0.2 carry none
        raise EsnError(f"{path}: the tensors do not match the checksum in the file's metadata: the file is damaged "
                       "or was edited (`esn select` writes statistics and masks again)")
    return path, meta, tensors


def _layout(path: Path, meta: dict, layout: Layout | None) -> Layout:
    stored = layout_from_dict(meta, str(path))
    if layout is None:
        return stored
    layout.check_compatible(stored.fingerprint, f"{path}", stored)
    return layout


def _provenance(meta: dict) -> dict:
    """The caller-facing metadata of a file: everything but what esn derives from the file itself."""
    return {k: v for k, v in meta.items() if k not in {"format", "fingerprint", "hook_points", "emotions", "sha256"}}


# --- masks -------------------------------------------------------------------------------------------

def save_masks(path: str | os.PathLike, masks: MaskSet | Mapping[str, np.ndarray], *,
               layout: Layout | None = None, meta: Mapping | None = None) -> None:
    """Write a mask set: one int64 tensor ``mask.<emotion>`` of sorted flat indices per emotion.

    ``masks`` is a ``MaskSet``, or ``select_neurons``' ``{emotion: indices}`` with ``layout`` given;
    ``meta`` adds to (and overrides) the mask set's own metadata.
    """
    if not isinstance(masks, MaskSet):
        if layout is None:
            raise EsnError("save_masks needs the layout the indices refer to (layout=...)")
        masks = MaskSet.from_indices(masks, layout)
    elif layout is not None and layout != masks.layout:
        raise EsnError("save_masks: the layout given is not the mask set's layout")
    masks = MaskSet(masks.masks, masks.layout, {**masks.meta, **(meta or {})})
    tensors = {}
    for emotion, mask in masks.masks.items():
        if mask.layout != masks.layout:
            raise EsnError(f"the mask for {emotion!r} is over another layout than the mask set")
        tensors[f"mask.{emotion}"] = np.ascontiguousarray(mask.indices, dtype=np.int64)
    header = _header(MASKS_FORMAT, masks.layout, masks.meta, {"emotions": list(masks.masks)}, tensors)
    atomic_write_bytes(Path(path), safetensors.numpy.save(tensors, metadata=header))


def load_masks(path: str | os.PathLike, layout: Layout | None = None) -> MaskSet:
    """Read a mask file. With ``layout`` (the model's), a file made for another layout raises
    ``LayoutMismatchError`` and the masks use the given layout (with its module paths)."""
    path, meta, tensors = _read(path, MASKS_FORMAT)
    layout = _layout(path, meta, layout)
    emotions = meta.get("emotions")
    if not isinstance(emotions, list) or set(tensors) != {f"mask.{e}" for e in emotions}:
        raise EsnError(f"{path}: tensors {sorted(tensors)} do not match the emotions {emotions!r} of its metadata")
    masks = {}
    for e in emotions:
        idx = tensors[f"mask.{e}"]
        if idx.dtype != np.int64 or idx.ndim != 1:
            raise EsnError(f"{path}: mask.{e} must be a 1-D int64 tensor, got {idx.dtype} {idx.shape}")
        try:
            masks[e] = Mask(idx, layout)
        except EsnError as exc:
            raise EsnError(f"{path}: mask.{e}: {exc}") from None
    return MaskSet(masks, layout, _provenance(meta))


# --- statistics --------------------------------------------------------------------------------------

def save_stats(path: str | os.PathLike, stats: ActivationStats, *, meta: Mapping | None = None) -> None:
    """Write ``K [E, N]``, ``T [E, G]`` (G position groups), ``n_attempts [E]`` (int64) and, when present, ``S``/``SS``;
    ``meta`` adds to the statistics' own metadata."""
    tensors = {"K": stats.K.astype(np.int64), "T": stats.T.astype(np.int64),
               "n_attempts": stats.n_attempts.astype(np.int64)}
    if stats.S is not None:
        tensors |= {"S": stats.S.astype(np.float64), "SS": stats.SS.astype(np.float64)}
    header = _header(STATS_FORMAT, stats.layout, {**stats.meta, **(meta or {})}, {"emotions": list(stats.emotions)},
                     tensors)
    atomic_write_bytes(Path(path), safetensors.numpy.save(tensors, metadata=header))


def load_stats(path: str | os.PathLike, layout: Layout | None = None) -> ActivationStats:
    """Read a statistics file, checking it against ``layout`` when one is given."""
    path, meta, t = _read(path, STATS_FORMAT)
    layout = _layout(path, meta, layout)
    emotions = meta.get("emotions")
    if not isinstance(emotions, list) or not {"K", "T", "n_attempts"} <= set(t) or ("S" in t) != ("SS" in t):
        raise EsnError(f"{path}: expected tensors K, T, n_attempts (and S with SS), got {sorted(t)}")
    if any(t[k].dtype != np.int64 for k in ("K", "T", "n_attempts")):
        raise EsnError(f"{path}: K, T and n_attempts must be int64")
    try:
        return ActivationStats(list(emotions), layout, t["K"], t["T"], t["n_attempts"], t.get("S"), t.get("SS"),
                               _provenance(meta))
    except EsnError as exc:
        raise EsnError(f"{path}: {exc}") from None


def read_metadata(path: str | os.PathLike) -> dict:
    """The esn metadata of a mask or statistics file, without checking it against any layout."""
    return _read(path, MASKS_FORMAT, STATS_FORMAT)[1]
