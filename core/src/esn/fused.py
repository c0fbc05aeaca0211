"""Fused gates: an identity hook module injected where a gated MLP computes its gate inside its forward.

Moshi's MLP computes ``z = fc1(x)`` ``[batch, pos, 2d]``, then ``fc2(act(z[..., :d]) * z[..., d:])``; a
functional gated MLP computes ``down_proj(F.silu(gate_proj(x)) * up_proj(x))``. Neither has a module whose
output is the post-activation gate. For the block of :func:`injected`, esn adds a :class:`GateHookPoint`
(an identity ``nn.Module``, as TransformerLens's ``HookPoint``) as the child ``hp.module`` of the MLP, and
three hooks: a forward hook on ``hp.fused`` keeps its output ``z``, one on ``hp.up`` (when the up
projection is separate) keeps ``u``, and a forward pre-hook on ``hp.down_proj`` computes the gate
``g = act(gate part of z)`` ``[batch, pos, d]`` and calls the GateHookPoint on it. Recording and steering
hook the GateHookPoint as they hook a dense ``act_fn``. Only when a hook replaced ``g`` does ``down_proj``
get ``g' * u`` instead of the model's own product, so outputs are the model's own bits otherwise. The
module and the hooks are removed on exit, also on error; nested blocks share one injection.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from esn.errors import EsnError
from esn.hookpoints import HookPoint
from esn.hooks import submodule

# transformers' ACT2FN names of the activations a gated MLP uses, as the functions its modules call
ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}


class GateHookPoint(nn.Module):
    """Identity on the post-activation gate ``[batch, pos, d]`` of one fused hook point; hook its forward."""

    def __init__(self, hp: HookPoint):
        super().__init__()
        if hp.activation not in ACTIVATIONS:
            raise EsnError(f"hook point {hp.name}: activation {hp.activation!r} is not one of {', '.join(ACTIVATIONS)}")
        self.name = hp.name
        self.act = ACTIVATIONS[hp.activation]
        self.d = hp.unit_width
        self.separate_up = hp.up is not None
        self.users = 0
        self.handles: list[Any] = []
        self._z: torch.Tensor | None = None
        self._u: torch.Tensor | None = None

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        """The gate itself (hooks on this module see and may replace it)."""
        return g

    def keep_gate(self, module, args, out) -> None:
        """Forward hook on the projection holding the pre-activation gate."""
        self._z = out

    def keep_up(self, module, args, out) -> None:
        """Forward hook on a separate up projection."""
        self._u = out

    def feed(self, module, args) -> tuple | None:
        """Forward pre-hook on ``down_proj``: run the gate through this module; feed an edited product."""
        z, u, self._z, self._u = self._z, self._u, None, None
        if z is None or not self._forward_hooks:  # nothing hooks the gate: leave the model alone
            return None
        if not isinstance(z, torch.Tensor) or (self.separate_up and not isinstance(u, torch.Tensor)):
            raise EsnError(f"hook point {self.name}: its projections gave {type(z).__name__} / {type(u).__name__}, "
                           "expected tensors (the pre-activation gate, and the up half when it is separate)")
        if self.separate_up:
            gate = z
        else:
            if z.shape[-1] != 2 * self.d:
                raise EsnError(f"hook point {self.name}: the fused projection gave {tuple(z.shape)}, expected "
                               f"[..., {2 * self.d}] (gate and up halves of {self.d})")
            gate, u = z[..., :self.d], z[..., self.d:]
        if gate.shape[-1] != self.d:
            raise EsnError(f"hook point {self.name}: the gate projection gave {tuple(gate.shape)}, expected [..., {self.d}]")
        g = self.act(gate)
        out = self(g)
        if out is g:
            return None
        return (out * u, *args[1:])


def _module(model: nn.Module, path: str | None, hp: HookPoint, what: str) -> nn.Module:
    try:
        return submodule(model, path or "")
    except AttributeError:
        raise EsnError(f"hook point {hp.name}: {what} module {path!r} not found in the model") from None


def _inject(model: nn.Module, hp: HookPoint) -> tuple[nn.Module, str, GateHookPoint]:
    parent_path, _, name = hp.module.rpartition(".")
    parent = _module(model, parent_path, hp, "the fused gate's parent")
    existing = parent._modules.get(name)
    if isinstance(existing, GateHookPoint):  # an enclosing block injected it
        existing.users += 1
        return parent, name, existing
    if existing is not None or hasattr(parent, name):
        raise EsnError(f"hook point {hp.name}: {hp.module!r} already exists in the model; a fused gate's module "
                       "must be a free name (e.g. '...mlp.esn_gate') where esn injects its identity module")
    gate = GateHookPoint(hp)
    sites = [(hp.fused, "register_forward_hook", gate.keep_gate), (hp.up, "register_forward_hook", gate.keep_up),
             (hp.down_proj, "register_forward_pre_hook", gate.feed)]
    modules = [(_module(model, path, hp, "fused projection" if fn is gate.keep_gate else "up projection"
                        if fn is gate.keep_up else "down_proj"), method, fn) for path, method, fn in sites if path]
    for module, method, fn in modules:
        gate.handles.append(getattr(module, method)(fn))
    parent.add_module(name, gate)
    gate.users = 1
    return parent, name, gate


def _release(parent: nn.Module, name: str, gate: GateHookPoint) -> None:
    gate.users -= 1
    if gate.users:
        return
    for handle in gate.handles:
        handle.remove()
    if parent._modules.get(name) is gate:
        del parent._modules[name]


@contextlib.contextmanager
def injected(model: nn.Module, hook_points: Iterable[HookPoint]) -> Iterator[list[GateHookPoint]]:
    """Inject the identity gate module of every fused hook point for the block (others are ignored)."""
    done: list[tuple[nn.Module, str, GateHookPoint]] = []
    try:
        for hp in hook_points:
            if hp.fused:
                done.append(_inject(model, hp))
        yield [gate for _, _, gate in done]
    finally:
        for parent, name, gate in reversed(done):
            _release(parent, name, gate)
