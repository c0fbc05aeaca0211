"""Files esn writes and reads back: crash-safe writes, checksums, and file names made from ids.

* A write goes to a temp file in the target's folder, named ``.<name>.<8 random chars>.esn-tmp``; it is
  fsynced, renamed into place, and the folder fsynced, so a file appears complete or not at all. That
  temp name is esn's own pattern (``is_temp``): a killed run's leftovers are recognised by it, and
  nothing else is ever removed as a leftover.
* Files get the permissions the umask gives (as ``open`` would), not ``mkstemp``'s 0600.
* An ``OSError`` (a full disk, a read-only folder, a folder where a file should be) becomes an
  ``EsnError`` that names the file (``os_error``).
* Nothing is written through a symbolic link: a write replaces the link itself (the rename), lock files
  are opened with ``O_NOFOLLOW`` and never truncated (``open_nofollow``), and a run directory holding a
  link anywhere inside is refused before any work (``refuse_links``), so a link (or a hard link) to an
  outside file can never make esn change that file.
* Ids become file names through ``id_to_name``: injective, reversible (``name_to_id``) and safe on every
  filesystem, case-insensitive ones included.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
import tempfile
import urllib.parse
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from esn.errors import EsnError

TEMP_SUFFIX = ".esn-tmp"
_TEMP = re.compile(r"\..+\.[a-z0-9_]{8}" + re.escape(TEMP_SUFFIX))  # mkstemp's 8 random characters
# File names are limited to 255 bytes; the temp name adds 2 dots, 8 random characters and TEMP_SUFFIX.
MAX_NAME_BYTES = 255 - 10 - len(TEMP_SUFFIX)
_KEEP = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-")


def is_temp(name: str) -> bool:
    """Whether ``name`` is an esn temp file name (what a write killed half-way leaves behind)."""
    return _TEMP.fullmatch(name) is not None


def os_error(exc: OSError, path: str | os.PathLike, action: str = "write") -> EsnError:
    """One clear line for an OSError on ``path``; the caller raises it ``from None``."""
    code, text = exc.errno, (exc.strerror or str(exc)).lower()
    if code in (errno.ENOSPC, errno.EDQUOT):
        why = ("no space left on the device: free some space and run the same command again (what was "
               "finished is kept)")
    elif code in (errno.EROFS, errno.EACCES, errno.EPERM):
        why = f"{text} (is the folder read-only or someone else's?)"
    elif code == errno.EISDIR:
        why = "it is a folder, not a file"
    elif code == errno.ENOTDIR:
        why = "a part of the path is a file, not a folder"
    elif code == errno.ENAMETOOLONG:
        why = "the file name is too long for the filesystem"
    else:
        why = text
    return EsnError(f"cannot {action} {path}: {why}")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where the filesystem cannot fsync folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- no writes through links ---------------------------------------------------------------------------
def find_links(root: str | os.PathLike, limit: int = 5) -> list[Path]:
    """Up to ``limit`` symbolic links inside ``root`` (``root`` itself may be one), found without following any."""
    found: list[Path] = []
    folders = [os.fspath(root)]
    while folders and len(found) < limit:
        with os.scandir(folders.pop()) as entries:
            for entry in entries:
                if entry.is_symlink():
                    found.append(Path(entry.path))
                elif entry.is_dir(follow_symlinks=False):
                    folders.append(entry.path)
    return sorted(found[:limit])


def refuse_links(root: str | os.PathLike, what: str = "run directory") -> None:
    """An EsnError if ``root`` holds a symbolic link anywhere inside: esn writes and locks files there, and a
    link would carry a write (or a truncating lock) to a file outside it."""
    try:
        links = find_links(root)
    except OSError as exc:
        raise os_error(exc, root, f"check {what}") from None
    if links:
        shown = ", ".join(f"{p.relative_to(root)} -> {_target(p)}" for p in links)
        raise EsnError(f"{what} {root} holds symbolic links ({shown}): esn never writes, reads back or locks "
                       "through a link (it could change a file outside the run directory). Remove the links "
                       "(put the files themselves there), or use a new run_dir")


def _target(link: Path) -> str:
    try:
        return os.readlink(link)
    except OSError:
        return "?"


def open_nofollow(path: str | os.PathLike, flags: int = os.O_WRONLY | os.O_CREAT) -> int:
    """A file descriptor of ``path`` opened without following a symbolic link (``O_NOFOLLOW``) and never
    truncated; a link, a folder or anything but a regular file there is an EsnError."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise EsnError(f"{path} is a symbolic link: esn does not write or lock through links (it could "
                           f"change the file it points to, {_target(Path(path))}); remove the link") from None
        if exc.errno == errno.ENXIO:  # a FIFO or socket with no reader
            raise EsnError(f"{path} is not a regular file: remove it and run again") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise EsnError(f"{path} is not a regular file: remove it and run again")
    return fd


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through an esn temp file in the same folder (removed on error)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    except OSError as exc:
        raise os_error(exc, path) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o666 & ~_umask())
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise os_error(exc, path) from None
        raise
    return path


def read_bytes(path: str | os.PathLike, what: str = "file") -> bytes:
    """The bytes of ``path``; a missing file, a folder in its place or an unreadable one is an EsnError."""
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise EsnError(f"{path}: {what} not found") from None
    except OSError as exc:
        raise os_error(exc, path, "read") from None


# -- checksums ----------------------------------------------------------------------------------------
def sha256(data: bytes) -> str:
    """The sha256 of ``data`` as 64 hex digits (what manifests, records and file metadata store)."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, what: str = "file") -> str:
    """The sha256 of a file's bytes, read in chunks; errors as ``read_bytes``."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except FileNotFoundError:
        raise EsnError(f"{path}: {what} not found") from None
    except OSError as exc:
        raise os_error(exc, path, "read") from None
    return digest.hexdigest()


def check_sha256(path: str | os.PathLike, expected: str, fix: str) -> None:
    """Refuse a file whose bytes are not the ones recorded when it was written; ``fix`` says what to do."""
    if sha256_file(path) != expected:
        raise EsnError(f"{path} is damaged or was replaced (its sha256 is not the one recorded when esn wrote "
                       f"it); {fix}")


def tensor_digest(tensors: Mapping[str, np.ndarray]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order (independent of the file format)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        digest.update(f"{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


# -- ids as file names --------------------------------------------------------------------------------
def id_to_name(ident: str, suffix: str = "") -> str:
    """``ident`` as a file name plus ``suffix``: injective and reversible (``name_to_id``).

    Lower-case letters, digits, ``_`` and ``-`` stay; every other character becomes ``%XX`` per UTF-8
    byte: ``/`` and ``|`` (no folders, ``s/1`` and ``s_1`` stay apart), ``.`` (no hidden or special
    names), control characters, and upper case (names stay distinct on case-insensitive filesystems).
    A name longer than ``MAX_NAME_BYTES`` is an EsnError: the caller checks ids before any work.
    """
    if not isinstance(ident, str) or not ident:
        raise EsnError(f"an id must be a non-empty string, got {ident!r}")
    try:
        name = "".join(c if c in _KEEP else "".join(f"%{b:02X}" for b in c.encode("utf-8")) for c in ident)
    except UnicodeEncodeError:
        raise EsnError(f"id {ident!r} is not valid Unicode text") from None
    name += suffix
    if len(name.encode()) > MAX_NAME_BYTES:
        raise EsnError(f"id {ident[:40]!r}... is too long for a file name ({len(name)} characters once encoded, "
                       f"at most {MAX_NAME_BYTES}): use shorter ids")
    return name


def name_to_id(name: str, suffix: str = "") -> str:
    """The id ``id_to_name`` made ``name`` from."""
    return urllib.parse.unquote(name.removesuffix(suffix), errors="strict")
