"""Crash-safe files: every artifact appears complete or not at all (write to a temp file, fsync, rename)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from esn.errors import EsnError
from esn.files import atomic_write_bytes

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_write_text", "atomic_write_wav", "read_json"]


def dumps(obj: Any) -> str:
    """Canonical JSON: sorted keys, so equal content gives equal bytes."""
    return json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as JSON so that readers see the old file or the new one, never half of it."""
    return atomic_write_bytes(path, dumps(obj).encode("utf-8"))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) atomically: a temporary file renamed over ``path``."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def read_json(path: str | Path) -> Any:
    """A JSON file's content; EsnError if it is missing or not valid JSON."""
    path = Path(path)
    if not path.is_file():
        raise EsnError(f"file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise EsnError(f"{path} is not valid JSON ({exc}); delete it to recompute it") from None


def atomic_write_wav(path: str | Path, wave: np.ndarray, sample_rate: int) -> Path:
    """16-bit PCM wav, written atomically (the bytes depend only on the samples)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".wav")
    os.close(fd)
    try:
        sf.write(tmp, np.asarray(wave, dtype=np.float32), int(sample_rate), subtype="PCM_16", format="WAV")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def clean_temp(folder: Path) -> None:
    """Remove temp files a killed run left behind."""
    if folder.is_dir():
        for tmp in folder.rglob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        for tmp in folder.rglob(".*.wav"):
            tmp.unlink(missing_ok=True)
