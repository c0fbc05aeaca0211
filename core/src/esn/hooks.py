"""Installing torch hooks on gate modules so that they are always removed, also on error."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from torch import nn


@contextlib.contextmanager
def installed(
    hooks: Iterable[tuple[nn.Module, Callable[..., Any]]],
    *,
    kind: str = "forward",
    with_kwargs: bool = False,
) -> Iterator[list[Any]]:
    """Register ``fn`` on each module for the duration of the block; remove every handle on exit.

    ``kind`` is ``"forward"`` (``fn(module, args, output) -> output | None``) or ``"pre"``
    (``fn(module, args[, kwargs])``). If registration fails half-way, the hooks already added are removed.
    """
    handles: list[Any] = []
    try:
        for module, fn in hooks:
            if kind == "forward":
                handles.append(module.register_forward_hook(fn, with_kwargs=with_kwargs))
            elif kind == "pre":
                handles.append(module.register_forward_pre_hook(fn, with_kwargs=with_kwargs))
            else:
                raise ValueError(f"unknown hook kind {kind!r}")
        yield handles
    finally:
        for handle in handles:
            handle.remove()


def has_hooks(model: nn.Module) -> bool:
    """True if any submodule still carries a forward or pre-forward hook (a leak check for tests)."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
