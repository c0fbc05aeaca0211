"""Which hooks a captured decode step contains, and how a new hook takes over a captured one's tensors.

A CUDA graph replays the kernels that ran while it was captured, on the same memory addresses, without
running any Python. So every forward hook and pre-hook inside the decoded module is baked into the graph
as it behaved at capture time, and each replay reads the tensors it read then.

esn's own hooks (steering edits, the recorder's per-step work) are *graph-aware*: besides being called
they offer

- ``graph_key``: a hashable description of the kernels they issue in one decode step (kinds, shapes,
  dtypes, and any Python scalar baked into a kernel). Two hooks with equal keys issue the same kernels,
  differing only in the values of their tensors.
- ``graph_state()``: the tensors those kernels read or write.
- ``graph_adopt(state)``: copy this hook's values into ``state`` (tensors of an earlier hook with the
  same key) and use them from now on, so that a graph captured with the earlier hook computes exactly what
  this one would.

So a new ``steer_rows`` block or a new ``GateRecorder`` with the same structure as a captured one reuses
its graph: no second capture. A hook without ``graph_key`` (a user's or transformers' own) is keyed by
its identity: captured as it behaved, reused only while that very hook is installed. It must not keep
per-step Python state (run such hooks with eager decoding).

Hooks that need host-side work around the steps (the recorder's chunk flush) also name a
``decode_listener`` with ``decode_begin(state)``, ``decode_step(done)`` and ``decode_end(done)``; the
decoder calls each distinct listener once per event.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class ScopedHook:
    """One hook inside the decoded module: where it sits, which kind, and the hook itself."""

    path: str  # module path relative to the scope ("" = the scope itself)
    kind: str  # "pre" | "forward" | "global-pre" | "global-forward"
    hook: Any

    @property
    def key(self) -> Hashable:
        """The hook's ``graph_key``, or its identity if it is not graph-aware."""
        key = getattr(self.hook, "graph_key", None)
        return ("foreign", id(self.hook)) if key is None else key

    @property
    def aware(self) -> bool:
        """Whether the hook is graph-aware (has a ``graph_key``)."""
        return getattr(self.hook, "graph_key", None) is not None


def scoped_hooks(scope: nn.Module, modules: Sequence[tuple[str, nn.Module]] | None = None) -> list[ScopedHook]:
    """Every forward pre-hook and forward hook that a forward of ``scope`` can run, in a fixed order.

    ``modules``: ``scope.named_modules()`` listed already (``DecodeState.modules``), to skip the walk."""
    from torch.nn.modules import module as torch_module

    out = [ScopedHook("", "global-pre", h) for h in torch_module._global_forward_pre_hooks.values()]
    out += [ScopedHook("", "global-forward", h) for h in torch_module._global_forward_hooks.values()]
    for path, m in scope.named_modules() if modules is None else modules:
        out += [ScopedHook(path, "pre", h) for h in m._forward_pre_hooks.values()]
        out += [ScopedHook(path, "forward", h) for h in m._forward_hooks.values()]
    return out


def fingerprint(hooks: list[ScopedHook]) -> tuple:
    """What the hooks contribute to a captured step: equal fingerprints -> one graph serves both."""
    return tuple((h.path, h.kind, h.key) for h in hooks)


def listeners(hooks: list[ScopedHook]) -> list[Any]:
    """The distinct ``decode_listener`` objects of the hooks, in first-seen order."""
    seen: dict[int, Any] = {}
    for h in hooks:
        listener = getattr(h.hook, "decode_listener", None)
        if listener is not None and id(listener) not in seen:
            seen[id(listener)] = listener
    return list(seen.values())


def states(hooks: list[ScopedHook]) -> list[Any]:
    """Per hook, the tensors its captured kernels use (None for hooks that are not graph-aware)."""
    return [h.hook.graph_state() if h.aware else None for h in hooks]


def adopt(hooks: list[ScopedHook], captured: list[Any]) -> None:
    """Let every graph-aware hook take over the tensors of its counterpart in a captured graph."""
    for h, state in zip(hooks, captured, strict=True):
        if h.aware:
            h.hook.graph_adopt(state)
