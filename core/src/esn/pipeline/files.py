"""Crash-safe files: every artifact appears complete or not at all (write to a temp file, fsync, rename).

The mechanisms (temp names, checksums, OSError -> EsnError) live in ``esn.files``; these are the
pipeline's JSON, text and wav forms of them.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from esn.errors import EsnError
from esn.files import atomic_write_bytes, is_temp, os_error, read_bytes, sha256

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_write_text", "atomic_write_wav", "read_json",
           "read_sealed", "refuse_non_file", "seal", "unseal"]


def dumps(obj: Any) -> str:
    """Canonical JSON: sorted keys, so equal content gives equal bytes."""
    return json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as JSON so that readers see the old file or the new one, never half of it."""
    return atomic_write_bytes(path, dumps(obj).encode("utf-8"))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) atomically: a temporary file renamed over ``path``."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def read_json(path: str | Path, hint: str = "delete it to recompute it") -> Any:
    """A JSON file esn wrote; damage (bad JSON, not UTF-8, a folder in its place) is an EsnError naming the
    file, with ``hint`` saying what to do about it."""
    path = Path(path)
    raw = read_bytes(path)
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EsnError(f"{path} is not valid UTF-8 JSON ({exc}); {hint}") from None


SEAL = "sha256"  # the key of a sealed JSON object's checksum


def seal(obj: dict) -> dict:
    """``obj`` with the sha256 of its canonical JSON under ``"sha256"``: a file esn reads back is checked
    against it (``unseal``), so a damaged or hand-edited file is never trusted."""
    return {**obj, SEAL: sha256(dumps(obj).encode("utf-8"))}


def unseal(data: Any, path: str | Path, fix: str) -> dict:
    """The object ``seal`` made, checked; an EsnError naming ``path`` (``fix``: what to do) if it is not a
    sealed object or its content is not the one sealed."""
    if not isinstance(data, dict) or not isinstance(data.get(SEAL), str):
        raise EsnError(f"{path} has no esn checksum (it was not written by this esn, or was replaced); {fix}")
    body = {k: v for k, v in data.items() if k != SEAL}
    if sha256(dumps(body).encode("utf-8")) != data[SEAL]:
        raise EsnError(f"{path} is damaged or was edited (its content is not the one esn wrote); {fix}")
    return body


def read_sealed(path: str | Path, fix: str) -> dict:
    """A sealed JSON object esn wrote (``atomic_write_json(path, seal(obj))``), checked; damage is an EsnError."""
    return unseal(read_json(path, fix), path, fix)


def refuse_non_file(path: str | Path, what: str) -> None:
    """Something other than a regular file where esn keeps ``what`` is refused before any work: esn would
    fail to replace it only after computing it again, and never deletes what it did not write."""
    path = Path(path)
    if os.path.lexists(path) and (path.is_symlink() or not path.is_file()):
        kind = "a folder" if path.is_dir() and not path.is_symlink() else "not a regular file"
        raise EsnError(f"{path} is {kind}, where esn keeps {what}: move it away (esn deletes nothing it did "
                       "not write) and run again, which computes it again")


def wav_bytes(wave: np.ndarray, sample_rate: int) -> bytes:
    """16-bit PCM wav bytes (they depend only on the samples and the rate)."""
    buf = io.BytesIO()
    sf.write(buf, np.asarray(wave, dtype=np.float32), int(sample_rate), subtype="PCM_16", format="WAV")
    return buf.getvalue()


def atomic_write_wav(path: str | Path, wave: np.ndarray, sample_rate: int) -> str:
    """Write a 16-bit PCM wav atomically (fsynced); returns the sha256 of its bytes, for the record naming it."""
    data = wav_bytes(wave, sample_rate)
    atomic_write_bytes(path, data)
    return sha256(data)


def remove_temp(folders: Iterable[Path]) -> None:
    """Remove the temp files a killed write left directly in ``folders``: esn's own temp-name pattern only."""
    for folder in folders:
        try:
            leftovers = [p for p in folder.iterdir() if is_temp(p.name) and p.is_file()] if folder.is_dir() else []
            for path in leftovers:
                path.unlink(missing_ok=True)
        except OSError as exc:
            raise os_error(exc, folder, "clean up") from None
