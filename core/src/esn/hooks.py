"""Installing torch hooks on gate modules so that they are always removed, also on error."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
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


class ModelTarget:
    """The part of an adapter that recording and steering need, for a plain ``nn.Module``.

    Adapters provide the same three members (``model``, ``layout()``, ``stream_specs()``), so engine
    code takes either. Useful for tests and for models that have no adapter yet.
    """

    def __init__(self, model: nn.Module, hook_points, stream_specs: dict | None = None):
        from esn.hookpoints import Layout

        self.model = model
        self._layout = Layout(hook_points)
        self._specs = dict(stream_specs or {})

    def layout(self, streams=None):
        """The hook points, or the sub-layout of ``streams``."""
        return self._layout.select(streams)

    def stream_specs(self) -> dict:
        """Per stream, the ``StreamSpec`` recording uses to skip padding (as given; may be empty)."""
        return self._specs

    def module(self, hook_point) -> nn.Module:
        """The module of a hook point (its output is the gate ``[batch, pos, d_mlp]``)."""
        hp = self._layout[hook_point] if isinstance(hook_point, str) else hook_point
        return submodule(self.model, hp.module)


def submodule(model: nn.Module, path: str) -> nn.Module:
    """``model.get_submodule(path)``, walking the child dicts directly: torch's version goes through
    ``hasattr``/``getattr`` at every level, which cost ~13 ms of the 20 ms that entering ``steer()`` takes on
    Qwen3-Omni's 93 hook points. A path that is not a chain of child modules gets torch's own error."""
    module = model
    for name in path.split(".") if path else ():
        child = module._modules.get(name)
        if child is None:
            return model.get_submodule(path)  # torch's error (or whatever else it resolves)
        module = child
    return module


def gate_hook_points(model: nn.Module, layers_path: str, stream: str, *, mlp: str = "mlp", act_fn: str = "act_fn",
                     gate_proj: str = "gate_proj", down_proj: str = "down_proj") -> list:
    """Hook points for every gated MLP under ``layers_path`` (``{layers_path}.{l}.{mlp}.{act_fn}``).

    The module names are the model's (defaults: transformers' SwiGLU ``mlp.act_fn``/``gate_proj``/
    ``down_proj``; a model that calls them ``activation_fn``, ``w1``, ``fc2`` passes those). The width is
    ``gate_proj.out_features``; ``down_proj`` is recorded for weight folding.
    """
    from esn.errors import EsnError
    from esn.hookpoints import HookPoint

    try:
        layers = model.get_submodule(layers_path)
    except AttributeError:
        raise EsnError(f"model {type(model).__name__} has no module {layers_path!r}") from None
    points = []
    for i, layer in enumerate(layers):
        block = getattr(layer, mlp, None)
        if block is None or not hasattr(block, act_fn) or not hasattr(block, gate_proj):
            raise EsnError(f"{layers_path}.{i} has no gated MLP {mlp!r} with modules {act_fn!r} and {gate_proj!r} "
                           "(pass the model's own names: mlp=, act_fn=, gate_proj=, down_proj=)")
        points.append(
            HookPoint(
                stream=stream,
                layer=i,
                width=int(getattr(block, gate_proj).out_features),
                module=f"{layers_path}.{i}.{mlp}.{act_fn}",
                down_proj=f"{layers_path}.{i}.{mlp}.{down_proj}" if hasattr(block, down_proj) else None,
            )
        )
    return points


def mlp_hook_points(model: nn.Module, layers_path: str, stream: str, *, first_layer: int = 0) -> list:
    """Hook points of decoder layers whose MLPs are dense SwiGLU or transformers' mixture-of-experts blocks.

    Per layer ``l`` (numbered from ``first_layer``, for a stream made of several layer lists):

    * dense ``mlp`` (``act_fn``, ``gate_proj``): ``{stream}.layers.{l}.mlp.gate`` as in :func:`gate_hook_points`;
    * MoE ``mlp`` with fused ``experts`` (3-D ``gate_up_proj [E, 2d, h]``, ``down_proj [E, h, d]``, one
      ``act_fn``): a routed ``{stream}.layers.{l}.mlp.gate`` of width ``E * d`` (``esn.routing``), top-k
      from the router ``mlp.gate.top_k`` (or the experts' ``config.num_experts_per_tok``);
    * its ``shared_expert`` (dense SwiGLU run on the block's flattened tokens):
      ``{stream}.layers.{l}.mlp.shared_expert.gate``, ``[batch * pos, d]``.
    """
    from esn.errors import EsnError
    from esn.hookpoints import HookPoint

    try:
        layers = model.get_submodule(layers_path)
    except AttributeError:
        raise EsnError(f"model {type(model).__name__} has no module {layers_path!r}") from None
    points = []
    for i, layer in enumerate(layers):
        mlp, at, n = getattr(layer, "mlp", None), f"{layers_path}.{i}.mlp", first_layer + i
        experts = getattr(mlp, "experts", None)
        if experts is not None:
            up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
            if not (isinstance(up, torch.Tensor) and isinstance(down, torch.Tensor) and up.dim() == down.dim() == 3
                    and hasattr(experts, "act_fn")):
                raise EsnError(f"{at}.experts is not a fused experts module (3-D gate_up_proj/down_proj, act_fn)")
            n_experts, d = int(down.shape[0]), int(down.shape[2])
            top_k = getattr(getattr(mlp, "gate", None), "top_k", None)
            if top_k is None:
                top_k = getattr(getattr(experts, "config", None), "num_experts_per_tok", None)
            if top_k is None:
                raise EsnError(f"{at}: cannot tell how many experts each token uses (no gate.top_k)")
            points.append(HookPoint(stream, n, n_experts * d, f"{at}.experts.act_fn", f"{at}.experts.down_proj",
                                    experts=n_experts, top_k=int(top_k), router=f"{at}.experts"))
            shared = getattr(mlp, "shared_expert", None)
            if shared is not None:
                points.append(HookPoint(stream, n, int(shared.gate_proj.out_features), f"{at}.shared_expert.act_fn",
                                        f"{at}.shared_expert.down_proj", part="shared_expert", flat=True))
        elif mlp is not None and hasattr(mlp, "act_fn") and hasattr(mlp, "gate_proj"):
            points.append(HookPoint(stream, n, int(mlp.gate_proj.out_features), f"{at}.act_fn", f"{at}.down_proj"))
        else:
            raise EsnError(f"{layers_path}.{i} has neither a SwiGLU mlp (act_fn, gate_proj) nor fused experts")
    return points


def scale_grouped_columns(weight: torch.Tensor, local, d: int, scale: float, saved: list) -> None:
    """Fold a gain into a grouped down projection ``weight [groups, hidden, d]`` (experts or indices): scale
    ``weight[k, :, u]`` for local neurons ``k * d + u``, appending ``(weight, (groups, units), values)`` to
    ``saved`` so that ``esn.routing.unfold`` writes the originals back."""
    local = torch.as_tensor(local, dtype=torch.long)
    index = (local // d).to(weight.device), (local % d).to(weight.device)
    values = weight[index[0], :, index[1]]  # [n, hidden], a copy
    saved.append((weight, index, values))
    weight[index[0], :, index[1]] = values * scale


def apply_affine(g: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None,
                 floor: torch.Tensor | None) -> torch.Tensor:
    """``max(g * scale + shift, floor)``, skipping the parts that are ``None``: the steering edit of a gate.

    ``g`` is ``[..., d]`` and each part broadcasts to it; one fused kernel when both scale and shift are set.
    """
    if scale is not None and shift is not None:
        y = torch.addcmul(shift, g, scale)
    elif scale is not None:
        y = g * scale
    elif shift is not None:
        y = g + shift
    else:
        y = g
    return y if floor is None else torch.maximum(y, floor)
