"""Indexed hook points: one MLP weight set per index (a depth decoder's codebook position, a substep index).

Moshi's depth decoder runs, per audio frame, ``K`` positions (one per codebook); position ``s`` goes
through weight set ``codebook_idx[s]`` of every layer's MLP (``MoshiFlexibleLinear``), which is called as
``mlp(x, codebook_idx)``. Unit ``u`` of index ``k`` is a neuron of its own: width ``K x d``, local neuron
``k * d + u``, one position group per index (``tokens [B, K]``: positions that ran through index ``k``).

A forward pre-hook on ``hp.index_from`` reads each position's index: its second positional argument, or
the keyword ``layer_idx``/``codebook_idx`` (a ``[pos]`` tensor or an int; None: position ``s`` is index
``s``). The gate hook (on ``act_fn``, or the injected ``esn.fused.GateHookPoint`` of a fused gate) sees
``g [batch, pos, d]`` and adds position ``s`` to group ``idx[s]``.

Positions: an indexed decoder runs for generated frames only (Moshi: inside each decode step of the
temporal transformer, and once after it), so all its positions are generated speech tokens: counted
under ``positions="all"`` and ``"generated"`` alike, none in the prompt's share, and never skipped by
steering with ``positions="generated"``. Every row's positions count; a stream spec (padding rules) for
an indexed stream is refused rather than half-applied.

Steering views the edit tensors ``[K*d]`` (one mask) or ``[B, 1, K*d]`` (per row) as ``[K, d]`` /
``[B, K, d]`` and gives position ``s`` the row of its index. Folding scales ``down_proj.weight[k, :, u]``
of the per-index 3-D weight ``[K, hidden, d]`` (Moshi's ``fc2``).
"""

from __future__ import annotations

from typing import Any

import torch

from esn.errors import EsnError
from esn.hookpoints import HookPoint
from esn.hooks import apply_affine, scale_grouped_columns, submodule


def index_of(args: tuple, kwargs: dict) -> Any:
    """The index argument of a forward call: second positional, or ``layer_idx`` / ``codebook_idx``."""
    if len(args) > 1:
        return args[1]
    return kwargs.get("layer_idx", kwargs.get("codebook_idx"))


_UNSET = object()  # the index_from module has not run since the last gate


def positions_of(index: Any, pos: int, hp: HookPoint, device: torch.device) -> torch.Tensor:
    """``[pos]`` int64: the index of each of the ``pos`` positions of this call."""
    if index is _UNSET:
        raise EsnError(f"hook point {hp.name}: its gate ran without a call of its index_from module "
                       f"{hp.index_from!r} before it; index_from must be the module (the MLP) whose forward "
                       "receives the index and runs the gate")
    if index is None:
        index = torch.arange(pos, device=device)
    elif isinstance(index, int):
        index = torch.full((pos,), index, dtype=torch.long, device=device)
    elif isinstance(index, torch.Tensor) and index.numel() in (1, pos) and not index.dtype.is_floating_point:
        index = index.reshape(-1).to(device=device, dtype=torch.long).expand(pos)
    else:
        shape = tuple(index.shape) if isinstance(index, torch.Tensor) else type(index).__name__
        raise EsnError(f"hook point {hp.name}: {hp.index_from!r} was called with index {shape} for {pos} "
                       f"positions; expected an int or an integer tensor [{pos}]")
    if index.device.type == "cpu" and pos and not 0 <= int(index.min()) <= int(index.max()) < hp.indices:
        raise EsnError(f"hook point {hp.name}: index {index.tolist()} outside 0..{hp.indices - 1} "
                       f"(the hook point declares {hp.indices} indices)")  # on CPU: free to check, no sync
    return index


def _check_gate(hp: HookPoint, g: Any) -> None:
    if not isinstance(g, torch.Tensor) or g.dim() != 3 or g.shape[-1] != hp.unit_width:
        shape = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
        raise EsnError(f"hook point {hp.name}: indexed gate of shape {shape}, expected [batch, pos, "
                       f"{hp.unit_width}] ({hp.indices} indices x {hp.unit_width} units)")


def index_module(model: Any, hp: HookPoint) -> Any:
    """The module whose forward receives the index tensor (``hp.index_from``)."""
    try:
        return submodule(model, hp.index_from or "")
    except AttributeError:
        raise EsnError(f"hook point {hp.name}: its index_from module {hp.index_from!r} not found") from None


# -- recording ---------------------------------------------------------------------------------------


class _Rows:
    """What the recorder reads of a point's root: the batch size. Indexed points count every position."""

    implicit = True

    def __init__(self, path: str):
        self.path = path
        self.batch: int | None = None


class IndexedPoint:
    """Recorder state of one indexed hook point: ``counts [B, K, d]`` int32, ``tokens [B, K]`` int64 and
    (with moments) float64 ``sums``/``sumsq``, on the device; two ``index_add_`` kernels per forward."""

    def __init__(self, hp: HookPoint, moments: bool, spec: Any = None):
        if spec is not None:
            raise EsnError(f"hook point {hp.name} is indexed: its stream {hp.stream!r} must have no StreamSpec "
                           "(indexed positions are all generated and all counted)")
        if not hp.index_from:
            raise EsnError(f"hook point {hp.name} is indexed but names no index_from module")
        self.hp = hp
        self.moments = moments
        self.root = _Rows(hp.name)
        self.index: Any = _UNSET
        self.calls = 0
        self.counts: torch.Tensor | None = None
        self.tokens: torch.Tensor | None = None
        self.sums: torch.Tensor | None = None
        self.sumsq: torch.Tensor | None = None

    def pre_hook(self, module, args, kwargs) -> None:
        """Forward pre-hook (with kwargs) on ``index_from``: this call's index argument."""
        self.index = index_of(args, kwargs)

    def __call__(self, module, args, g: torch.Tensor) -> None:
        # g: [batch, pos, d], position s through weight set idx[s]
        hp = self.hp
        _check_gate(hp, g)
        b, pos = g.shape[0], g.shape[1]
        if self.counts is None:
            self.root.batch = b
            self.counts = torch.zeros((b, hp.indices, hp.unit_width), dtype=torch.int32, device=g.device)
            self.tokens = torch.zeros((b, hp.indices), dtype=torch.int64, device=g.device)
            if self.moments:
                self.sums = torch.zeros(self.counts.shape, dtype=torch.float64, device=g.device)
                self.sumsq = torch.zeros(self.counts.shape, dtype=torch.float64, device=g.device)
        elif b != self.root.batch:
            raise EsnError(f"hook point {hp.name} ran with batch {b} after batch {self.root.batch}: "
                           "use one GateRecorder per generate call")
        idx = positions_of(self.index, pos, hp, g.device)
        self.index = _UNSET
        self.calls += 1
        self.counts.index_add_(1, idx, (g > 0).to(torch.int32))
        self.tokens.add_(torch.bincount(idx, minlength=hp.indices))
        if self.moments:
            x = g.double()
            self.sums.index_add_(1, idx, x)
            self.sumsq.index_add_(1, idx, x.square_())

    def flush(self) -> None:
        """Nothing is buffered: every forward is reduced at once."""

    @property
    def graph_key(self) -> tuple:
        """Indexed points are recorded eagerly; a capturing decoder is refused here."""
        raise EsnError(f"hook point {self.hp.name} is indexed: it is recorded eagerly, not inside esn.decode")

    def result(self, batch: int) -> tuple[torch.Tensor | None, ...]:
        """``(counts [B, K*d], tokens [B, K], sums, sumsq, prompt_counts, prompt_tokens)``; the prompt's
        share is zero (indexed positions are generated ones)."""
        w, k = self.hp.width, self.hp.indices
        device = None if self.counts is None else self.counts.device
        zero = (torch.zeros((batch, w), dtype=torch.int32, device=device),
                torch.zeros((batch, k), dtype=torch.int64, device=device))
        if self.counts is None:
            zeros = torch.zeros((batch, w), dtype=torch.float64) if self.moments else None
            return *zero, zeros, zeros, *zero
        moments = (self.sums.reshape(batch, w), self.sumsq.reshape(batch, w)) if self.moments else (None, None)
        return self.counts.reshape(batch, w), self.tokens, *moments, *zero


# -- steering ----------------------------------------------------------------------------------------


class _IndexedEdit:
    """Steering of one indexed hook point: ``pre`` on ``index_from`` reads the index, ``hook`` edits
    ``g [batch, pos, d]`` with each position's index row of the edit (``esn.steering._Edit``)."""

    def __init__(self, hp: HookPoint, edit: Any):
        if edit.extra:
            raise EsnError(f"hook point {hp.name} is indexed: only interventions with an affine form "
                           f"(steer, add, clamp, deactivate, or a plugin's affine()) can be applied to it")
        self.hp = hp
        self.edit = edit
        self.index: Any = _UNSET

    def pre(self, module, args, kwargs) -> None:
        """Forward pre-hook (with kwargs) on ``index_from``."""
        self.index = index_of(args, kwargs)

    def hook(self, module, args, g: torch.Tensor) -> torch.Tensor:
        """Forward hook on the gate module: the edited gate."""
        hp, edit = self.hp, self.edit
        _check_gate(hp, g)
        rows = edit.rows
        if rows is not None and g.shape[0] != rows:
            raise EsnError(f"steer_rows got {rows} conditions but {hp.name} saw a batch of {g.shape[0]} rows; "
                           "give exactly one condition (or None) per row of the generate call")
        if g.dtype is not edit.dtype or g.device != edit.device:
            edit._place(g.dtype, g.device)
        idx = positions_of(self.index, g.shape[1], hp, g.device)
        self.index = _UNSET
        k, d = hp.indices, hp.unit_width

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:  # [pos, d] or [B, pos, d]
            if t is None:
                return None
            return t.view(k, d).index_select(0, idx) if rows is None else t.view(rows, k, d).index_select(1, idx)

        return apply_affine(g, pick(edit.scale), pick(edit.shift), pick(edit.floor))


def steer_hooks(target: Any, hp: HookPoint, edit: Any) -> tuple[list, list]:
    """``(pre-hooks with kwargs, forward hooks)`` that apply ``edit`` to an indexed hook point."""
    indexed = _IndexedEdit(hp, edit)
    return [(index_module(target.model, hp), indexed.pre)], [(target.module(hp), indexed.hook)]


# -- folding -----------------------------------------------------------------------------------------


def fold(target: Any, hp: HookPoint, local, scale: float, saved: list) -> None:
    """Scale ``down_proj.weight[k, :, u]`` for local neurons ``k * d + u``; the original slices go to
    ``saved`` as ``esn.routing.unfold`` restores them."""
    try:
        weight = submodule(target.model, hp.down_proj or "").weight
    except AttributeError:
        raise EsnError(f"{hp.name}: down_proj module {hp.down_proj!r} (with a weight) not found") from None
    d = hp.unit_width
    if weight.dim() != 3 or (weight.shape[0], weight.shape[2]) != (hp.indices, d) or weight.device.type == "meta":
        raise EsnError(f"{hp.name}: {hp.down_proj}.weight has shape {tuple(weight.shape)} on {weight.device}; "
                       f"folding needs a materialised per-index [{hp.indices}, hidden, {d}] weight")
    scale_grouped_columns(weight, local, d, scale, saved)
