"""Checking a torch device name before anything slow happens (a model load takes seconds to minutes)."""

from __future__ import annotations

import re

from esn.errors import EsnError

# What torch.device accepts that people type: cpu, cuda, cuda:1, mps, xpu:0 ...
_DEVICE = re.compile(r"^(?P<kind>[a-z]+)(?::(?P<index>\d+))?$")
EXAMPLES = "cpu, cuda, cuda:1 or mps"


def check_device(device: str, *, setting: str = "--device") -> str:
    """``device`` if this torch can use it, else an EsnError that says why (unknown name, no such backend
    in this torch build, no device visible, index out of range). ``setting`` is where the user gives the
    device (a flag, or a config key such as ``model.device``): the fix names it. Imports torch."""
    import torch

    text = str(device).strip()
    match = _DEVICE.match(text)
    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        match = None
    if match is None:
        raise EsnError(f"unknown device {device!r}: use {EXAMPLES}")
    kind, index = match["kind"], match["index"]
    if kind == "cpu":
        return text
    if kind == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise EsnError(f"device {text!r}: torch {torch.__version__} is {build} and sees no CUDA device; "
                           f"{_use_cpu(setting)}, or install a CUDA build of torch (docs/install.md)")
        count = torch.cuda.device_count()
        if index is not None and int(index) >= count:
            raise EsnError(f"device {text!r}: only {count} CUDA device(s) are visible (cuda:0..cuda:{count - 1})")
        return text
    backend = getattr(torch, kind, None) if kind != "mps" else getattr(torch.backends, "mps", None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise EsnError(f"device {text!r}: this torch {torch.__version__} has no usable {kind} backend; use {EXAMPLES}")
    return text


def _use_cpu(setting: str) -> str:
    return f"use {setting} cpu" if setting.startswith("-") else f'set {setting} = "cpu"'
