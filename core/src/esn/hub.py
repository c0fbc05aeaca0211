"""Models named by a hub id: know at once whether the Hugging Face hub can be reached.

Without a network, ``huggingface_hub`` retries for half a minute before the real message appears.
Before a command loads a model by hub id, :func:`prepare_source` probes the hub once (DNS and one TCP
connect, ``PROBE_SECONDS`` at most). When the hub cannot be reached it switches this process to offline
mode (``HF_HUB_OFFLINE=1``: the local cache only), and when the model is not in the cache either it
raises an :class:`~esn.errors.EsnError` that says so.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
from pathlib import Path
from urllib.parse import urlsplit

from esn.errors import EsnError

DEFAULT_ENDPOINT = "https://huggingface.co"
PROBE_SECONDS = 3.0
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def is_hub_id(source: str) -> bool:
    """``org/name`` (the form of ``Qwen/Qwen2.5-Omni-7B``) that is not an existing local path."""
    return bool(_HUB_ID.match(source)) and not Path(source).exists()


def endpoint() -> str:
    """The hub endpoint ``huggingface_hub`` would use (``HF_ENDPOINT`` or huggingface.co)."""
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


def cache_dir() -> Path:
    """The hub cache folder, found the way ``huggingface_hub`` finds it."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def in_cache(repo_id: str) -> bool:
    """True if a snapshot of model ``repo_id`` lies in the hub cache."""
    snapshots = cache_dir() / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def offline() -> bool:
    """True if ``HF_HUB_OFFLINE`` is set to a true value."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def reachable(url: str | None = None, timeout: float = PROBE_SECONDS) -> bool:
    """Whether a TCP connection to the hub's host opens within ``timeout`` seconds.

    Behind a proxy (``HTTPS_PROXY`` and friends) a direct connection says nothing: assume reachable and
    let ``huggingface_hub`` go through the proxy.
    """
    if any(os.environ.get(var) for var in _PROXY_VARS):
        return True
    parts = urlsplit(url or endpoint())
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def go_offline() -> None:
    """Make ``huggingface_hub`` (and transformers) use only the local cache in this process."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:  # already imported: it read the variable at import time
        constants.HF_HUB_OFFLINE = True


def prepare_source(source: str | Path) -> None:
    """Check a model source before loading it: an existing path passes; a hub id passes if the hub answers
    or the model is cached (then offline mode is switched on); anything else is an EsnError."""
    text = str(source)
    if Path(text).expanduser().exists():
        return
    if not is_hub_id(text):
        raise EsnError(f"model {text!r} not found: no such file or folder, and not a hub id like Qwen/Qwen2.5-Omni-7B")
    if offline():
        why = "HF_HUB_OFFLINE is set"
    elif reachable():
        return
    else:
        go_offline()
        why = f"the hub ({endpoint()}) cannot be reached"
    if not in_cache(text):
        raise EsnError(f"model {text!r} is not a local folder and not in the hub cache ({cache_dir()}), and {why}: "
                       f"download it where the hub is reachable (`hf download {text}`) and give its folder")


def checkpoint_file(source: str | Path, name: str) -> Path | None:
    """``name`` inside a local checkpoint folder, or inside hub repository ``source`` (from the cache, or
    downloaded); None when it is not there or the hub cannot serve it."""
    local = Path(source)
    if local.is_dir():
        path = local / name
        return path if path.is_file() else None
    if not is_hub_id(str(source)):
        return None
    from transformers.utils import cached_file

    try:
        found = cached_file(str(source), name, _raise_exceptions_for_missing_entries=False)
    except Exception:  # offline, no such repository, no access
        return None
    return Path(found) if found else None


def read_checkpoint_config(source: str | Path, example: str) -> dict:
    """``config.json`` of a checkpoint folder or hub id, read before any weight; every failure is one
    EsnError naming the source (``example``: a hub id to suggest, like ``Qwen/Qwen2.5-Omni-7B``)."""
    text = str(source)
    local = Path(text)
    if local.exists() and not local.is_dir():
        raise EsnError(f"model {text!r} is a file; give the checkpoint directory")
    if not local.exists() and not is_hub_id(text):
        raise EsnError(f"model {text!r} not found: give a checkpoint directory or a hub id like {example}")
    path = checkpoint_file(text, "config.json")
    if path is None:
        raise EsnError(f"{text}: no config.json (not a transformers checkpoint, or the hub is unreachable)")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EsnError(f"{path}: unreadable config.json ({exc})") from None
    if not isinstance(config, dict):
        raise EsnError(f"{path}: config.json is not a JSON object")
    return config
