"""Capturing a static piece of work as a CUDA graph: the one utility behind ``Decoder``'s decode steps and
an adapter's own captured evaluations (e.g. a DiT's ODE function)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from esn.errors import EsnError


def warm_up(fn: Callable[[], Any]) -> Any:
    """Run ``fn()`` once on a side stream, as torch's docs ask before a capture; its output."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = fn()
    torch.cuda.current_stream().wait_stream(side)
    return out


def capture(fn: Callable[[], Any], what: str, advice: str) -> tuple[torch.cuda.CUDAGraph, Any]:
    """``fn()`` captured as a CUDA graph: the graph and ``fn``'s output (the tensors each replay rewrites).
    EsnError naming ``what`` and giving ``advice`` if the capture fails (something synchronises)."""
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            out = fn()
    except Exception as exc:
        raise EsnError(f"capturing {what} as a CUDA graph failed ({type(exc).__name__}: {exc}); {advice}") from exc
    return graph, out
