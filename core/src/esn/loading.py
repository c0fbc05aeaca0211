"""Loading boilerplate every transformers-based adapter shares: seeding, quiet logging, device placement,
dtypes, and the guard before running code shipped inside a checkpoint."""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from typing import Any

from esn.errors import EsnError


@contextlib.contextmanager
def seeded(seed: int, device: Any) -> Iterator[None]:
    """Run under ``torch.manual_seed(seed)`` and restore the caller's RNG state (CPU, and ``device`` if CUDA)."""
    import torch

    cuda = [device] if getattr(device, "type", "cpu") == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' logging at error level and no progress bars inside the block, restored afterwards
    (checkpoint configs of released models warn about keys and ids by design)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def placement(device: Any) -> dict[str, Any]:
    """``from_pretrained`` keywords: straight onto an accelerator when accelerate is installed, else none
    (load on the CPU, then :func:`place`)."""
    if str(device) == "cpu" or importlib.util.find_spec("accelerate") is None:
        return {}
    return {"device_map": str(device)}


def place(model: Any, device: Any) -> Any:
    """Move a model that :func:`placement` did not load onto ``device`` there; ``model`` in eval mode."""
    if not placement(device):
        model.to(device)
    return model.eval()


def torch_dtype(dtype: str) -> Any:
    """``"auto"`` as is, else the torch dtype of that name (``check_dtype`` has checked the name)."""
    import torch

    return dtype if dtype == "auto" else getattr(torch, dtype)


def require_remote_code(trust_remote_code: bool, what: str) -> None:
    """EsnError unless the user opted in to running ``what`` (code shipped inside a checkpoint)."""
    if not trust_remote_code:
        raise EsnError(f"{what}, and esn runs such code only when you opt in: pass trust_remote_code=True "
                       "(command line: --trust-remote-code) if you trust that checkpoint")
