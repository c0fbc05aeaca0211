"""Steering during generation: gate interventions through plain torch hooks, or folded into weights.

Three context managers; ``target`` is an adapter or an ``esn.hooks.ModelTarget`` (anything with
``model``, ``layout(streams)``, ``module(hp)`` and ``stream_specs()``):

- ``steer(target, mask, method, alpha)``: one mask, every row, every forward of generation.
- ``steer_rows(target, conditions)``: row ``b`` of the batch gets ``conditions[b]`` (or nothing).
- ``folded(target, mask, method, alpha)``: ``steer``/``deactivate`` by scaling ``down_proj`` columns.

Why it is fast: every built-in intervention is ``max(g * scale + shift, floor)`` (``Affine``). On entering
the context, dense tensors are built once, on the device, for the hook points some row touches only:
``[D]`` for a uniform mask, ``[B, 1, D]`` per row. A hook is then one kernel (``g * scale``, ``g + shift``
or ``addcmul``) plus ``maximum`` only when a floor is set, and never syncs with the host. The neutral
values are exact identities (``x * 1``, ``x + (-0.0)``, ``max(x, -inf)``), so untouched neurons and
rows without a condition stay bit-identical, and ``alpha = 0`` steering equals no intervention.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from esn.errors import EsnError, LayoutMismatchError
from esn.fused import injected
from esn.hookpoints import HookPoint, Layout, describe_difference
from esn.hooks import apply_affine, installed, submodule
from esn.indexed import fold as indexed_fold
from esn.indexed import steer_hooks as indexed_steer_hooks
from esn.interventions import Affine, Intervention, Method, resolve
from esn.masks import Mask
from esn.plugins import Registry
from esn.routing import fold as routing_fold
from esn.routing import steer_hooks as routing_steer_hooks
from esn.routing import unfold as routing_unfold

Positions = Literal["all", "generated"]


@dataclass(frozen=True)
class Condition:
    """What one batch row gets: ``method`` with ``alpha`` on the neurons of ``mask``."""

    mask: Mask
    method: Method = "steer"
    alpha: float | None = None  # None: 1.0 for methods that take an alpha


# -- checks -----------------------------------------------------------------------------------------


def check_mask(target: Any, mask: Mask, what: str = "mask") -> Layout:
    """The target's layout for the mask's streams; ``LayoutMismatchError`` if the mask was made elsewhere."""
    if not isinstance(mask, Mask):
        raise EsnError(f"{what} must be an esn.masks.Mask, got {type(mask).__name__}")
    if len(mask) == 0:  # would silently turn the intervention into a no-op
        raise EsnError(f"{what} selects no neurons; use no condition (None) for an unsteered run")
    streams = mask.layout.streams
    try:
        mine = target.layout(streams)
    except EsnError:
        mine = None
    if mine is None:
        have = target.layout().streams
        raise LayoutMismatchError(f"{what} is for stream(s) {streams}, but this model has only {have}")
    theirs = mask.layout
    if mine.describe() != theirs.describe():
        raise LayoutMismatchError(
            f"{what} was made for another hook-point layout: {len(theirs)} hook points / {theirs.n_neurons} "
            f"neurons (fingerprint {theirs.fingerprint}) vs this model's {len(mine)} / {mine.n_neurons} "
            f"({mine.fingerprint}) for stream(s) {streams}. First difference at "
            f"{describe_difference(theirs, mine, what)}. Was it made for another model?"
        )
    return mine


def _check_positions(positions: str) -> None:
    if positions not in ("all", "generated"):
        raise EsnError(f"positions must be 'all' or 'generated', got {positions!r}")


# -- the dense edit of one hook point --------------------------------------------------------------


@dataclass
class _Extra:
    """An intervention with no affine form (third-party ``apply`` only), on some rows (None: all)."""

    cls: type[Intervention]
    alpha: float
    indices: torch.Tensor  # [k] local neuron indices, on the device
    rows: torch.Tensor | None  # [r] batch rows, on the device


_NEUTRAL = {"scale": 1.0, "shift": -0.0, "floor": -math.inf}  # exact identities; -0.0 keeps -0.0


class _Edit:
    """``g -> max(g * scale + shift, floor)`` for one hook point; absent tensors are skipped.

    Dense tensors are ``[D]`` (uniform) or ``[B, 1, D]`` (per row), in the gate's dtype and device.
    They are built from a sparse spec ``{kind: (flat indices, float64 values)}`` (CPU): the neutral
    value everywhere, then one indexed write (:func:`_place_all`, for all hook points at once; ``_place``
    rebuilds one edit's if its gate turns out to have another dtype than expected).
    """

    def __init__(self, name: str, shape: tuple[int, ...], spec: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 rows: int | None, extra: list[_Extra], dtype: torch.dtype, device: torch.device):
        self.name = name
        self.rows = rows
        self.extra = extra
        self._shape = shape
        self._spec = spec
        self.dtype, self.device = dtype, device
        self.scale = self.shift = self.floor = None  # placed by _place_all (or _place)

    def _place(self, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype, self.device = dtype, device
        _place_all([self])

    def __call__(self, g: torch.Tensor) -> torch.Tensor:
        """``g``: the gate ``[batch, pos, d_mlp]``; returns the edited gate (a new tensor)."""
        if self.rows is not None and g.shape[0] != self.rows:
            raise EsnError(
                f"steer_rows got {self.rows} conditions but {self.name} saw a batch of {g.shape[0]} rows; "
                "give exactly one condition (or None) per row of the generate call "
                "(beam search and num_return_sequences multiply rows)"
            )
        if g.dtype is not self.dtype or g.device != self.device:
            self._place(g.dtype, g.device)
        y = apply_affine(g, self.scale, self.shift, self.floor)
        for ex in self.extra:
            if ex.rows is None:
                y = ex.cls.apply(y, ex.indices, ex.alpha)
            else:
                y = y.index_copy(0, ex.rows, ex.cls.apply(y.index_select(0, ex.rows), ex.indices, ex.alpha))
        return y

    # graph-aware decode (esn.decode) ------------------------------------------------------------------
    @property
    def graph_key(self) -> tuple:
        kinds = tuple(k for k in ("scale", "shift", "floor") if getattr(self, k) is not None)
        # a third-party apply() may bake anything into its kernels: its class, alpha and index shapes
        extra = tuple(
            (id(ex.cls), ex.alpha, tuple(ex.indices.shape), None if ex.rows is None else tuple(ex.rows.shape))
            for ex in self.extra
        )
        return ("esn.steer.edit", self._shape, str(self.dtype), str(self.device), kinds, extra)

    def graph_state(self) -> tuple:
        return (self.scale, self.shift, self.floor, [(ex.indices, ex.rows) for ex in self.extra])

    def graph_adopt(self, state: tuple) -> None:
        """Use the tensors of an edit with the same ``graph_key``, holding this edit's values."""
        scale, shift, floor, extra = state
        self.scale = None if scale is None else scale.copy_(self.scale)
        self.shift = None if shift is None else shift.copy_(self.shift)
        self.floor = None if floor is None else floor.copy_(self.floor)
        for ex, (indices, rows) in zip(self.extra, extra, strict=True):
            ex.indices = indices.copy_(ex.indices)
            ex.rows = None if rows is None else rows.copy_(ex.rows)


def _place_all(edits: Sequence[_Edit]) -> None:
    """Place the dense tensors of many edits with a few kernels in all, not a few per hook point: per
    (dtype, device, kind), one neutral buffer, one upload of all indices and values, one indexed write;
    each edit's tensor is a view of its stretch of the buffer. Kinds absent from an edit's spec stay None."""
    groups: dict[tuple[torch.dtype, torch.device], list[_Edit]] = {}
    for e in edits:
        groups.setdefault((e.dtype, e.device), []).append(e)
    for (dtype, device), group in groups.items():
        for kind in ("scale", "shift", "floor"):
            users = [e for e in group if kind in e._spec]
            if not users:
                continue
            sizes = [math.prod(e._shape) for e in users]
            starts = np.cumsum([0, *sizes[:-1]]).tolist()
            flat = torch.cat([e._spec[kind][0] + start for e, start in zip(users, starts, strict=True)])
            values = torch.cat([e._spec[kind][1] for e in users]).to(dtype=dtype)
            buffer = torch.full((sum(sizes),), _NEUTRAL[kind], dtype=dtype, device=device)
            buffer[flat.to(device)] = values.to(device)
            for e, start, size in zip(users, starts, sizes, strict=True):
                setattr(e, kind, buffer[start:start + size].view(e._shape))


def _placement(target: Any, hp: HookPoint) -> tuple[torch.dtype, torch.device]:
    """The dtype and device the gate of ``hp`` will most likely have: those of its MLP's weights."""
    model = target.model
    # a routed point's down_proj is a 3-D parameter, not a module: its experts module holds it
    for path in (None if hp.routed else hp.down_proj, hp.module.rpartition(".")[0]):
        if not path:
            continue
        with contextlib.suppress(AttributeError):
            p = next(submodule(model, path).parameters(), None)
            if p is not None and p.dtype.is_floating_point:
                return p.dtype, p.device
    p = next((p for p in model.parameters() if p.dtype.is_floating_point), None)
    return (p.dtype, p.device) if p is not None else (torch.float32, torch.device("cpu"))


@dataclass
class _Row:
    """One resolved condition: which rows, the intervention, and its mask split per hook point."""

    rows: list[int] | None  # None: every row (a uniform mask)
    cls: type[Intervention]
    alpha: float
    form: Affine | None
    split: dict[str, np.ndarray]


def _build(target: Any, layout: Layout, items: list[_Row], n_rows: int | None) -> dict[str, _Edit]:
    """Dense edits for every hook point some item touches (built once, on entering the context)."""
    edits: dict[str, _Edit] = {}
    for name in (n for n in layout.names if any(n in it.split for it in items)):
        hp = layout[name]
        width = hp.width
        dtype, device = _placement(target, hp)
        sparse: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
        extra: list[_Extra] = []
        for it in items:
            local = it.split.get(name)
            if local is None:
                continue
            if it.form is None:
                rows = None if it.rows is None else torch.tensor(it.rows, device=device)
                extra.append(_Extra(it.cls, it.alpha, torch.as_tensor(local, device=device), rows))
                continue
            # Flat offsets into [D] or [B, 1, D]: row * D + neuron.
            flat = local if it.rows is None else (np.asarray(it.rows)[:, None] * width + local[None, :]).ravel()
            for kind in ("scale", "shift", "floor"):
                value = getattr(it.form, kind)
                if value != _NEUTRAL[kind]:
                    idx, vals = sparse.setdefault(kind, ([], []))
                    idx.append(flat)
                    vals.append(np.full(flat.size, value, dtype=np.float64))
        spec = {k: (torch.from_numpy(np.concatenate(i)), torch.from_numpy(np.concatenate(v)))
                for k, (i, v) in sparse.items()}
        shape = (width,) if n_rows is None else (n_rows, 1, width)
        edits[name] = _Edit(name, shape, spec, n_rows, extra, dtype, device)
    _place_all(list(edits.values()))
    return edits


def _row_items(target: Any, conditions: Sequence[Condition | None], registry: Registry | None) -> list[_Row]:
    """Validate per-row conditions; rows that share (mask, method, alpha) share one item."""
    if isinstance(conditions, Condition) or not isinstance(conditions, Sequence) or not conditions:
        raise EsnError("steer_rows needs a non-empty list with one Condition (or None) per batch row")
    groups: dict[tuple, _Row] = {}
    for row, cond in enumerate(conditions):
        if cond is None:
            continue
        if not isinstance(cond, Condition):
            raise EsnError(f"conditions[{row}] must be an esn.steering.Condition or None, got {type(cond).__name__}")
        cls, alpha = resolve(cond.method, cond.alpha, registry)
        key = (id(cond.mask), cls, alpha)
        if key not in groups:
            check_mask(target, cond.mask, f"conditions[{row}].mask")
            groups[key] = _Row([], cls, alpha, cls.affine(alpha), cond.mask.split())
        groups[key].rows.append(row)
    return list(groups.values())


# -- installing the hooks --------------------------------------------------------------------------


class _Prefill:
    """Per stream: is the current forward a prefill? Set by a pre-hook on the stream's root module.

    A root call is a prefill if it is the first one in the context or feeds more than one position
    (a later generate call in the same context). Without a root, a gate call over more than one
    position counts as prefill (a one-token prompt is then steered: documented fallback).
    """

    def __init__(self) -> None:
        self.calls = 0
        self.prefill = True
        self.tracked = False

    graph_key = ("esn.steer.prefill",)  # in a decode step: host-side only, nothing captured

    def graph_state(self) -> tuple:
        return ()

    def graph_adopt(self, state: tuple) -> None:
        pass

    def __call__(self, module, args, kwargs) -> None:
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None and args:
            x = args[0]
        self.calls += 1
        longer = isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[1] > 1
        self.prefill = self.calls == 1 or longer

    def skip(self, g: torch.Tensor) -> bool:
        return self.prefill if self.tracked else g.shape[1] > 1


class _EditHook:
    """Forward hook on a gate module: ``out`` ``[batch, pos, d_mlp]`` -> the edited gate (None: unchanged).

    ``flat``: the module outputs ``[batch * pos, d_mlp]`` (a shared expert); per-row edits view it as
    ``[batch, pos, d_mlp]``.
    """

    def __init__(self, edit: _Edit, prefill: _Prefill | None, flat: bool = False):
        self.edit = edit
        self.prefill = prefill
        self.flat = flat
        self.began = False  # without a stream root: this hook point ran a decode call (one position)
        self.one_generation = False  # set while each call is one request's generation (batched = False)

    def __call__(self, module, args, out):
        if self.one_generation and out.dim() >= 2:
            if out.shape[1] == 1:
                self.began = True
            elif self.began:  # as recording: a sub-generation per step would be skipped as "the prompt"
                raise EsnError(f"hook point {self.edit.name} (stream without a stream spec) ran a second prefill "
                               f"({out.shape[1]} positions) after it began decoding: positions='generated' would "
                               "leave that sub-generation unsteered. If this module runs a sub-generation per step "
                               "of another decoder (a depth decoder, once per frame), declare it in that stream's "
                               "spec: StreamSpec(root=<the decoder whose steps run it>, substeps=(<this sub-model's "
                               "path>,))")
        if self.prefill is not None and self.prefill.skip(out):
            return None
        if self.flat and self.edit.rows is not None:
            return self.edit(out.view(self.edit.rows, -1, out.shape[-1])).view(out.shape)
        return self.edit(out)

    # graph-aware decode (esn.decode): the edit's kernels read only its dense tensors, so another block
    # with the same structure reuses a captured graph by copying its values into them.
    @property
    def graph_key(self) -> tuple:
        """The edit's structure (kinds, shapes, dtypes): equal keys, one captured graph."""
        return self.edit.graph_key if not self.flat else ("flat", self.edit.graph_key)

    def graph_state(self) -> tuple:
        """The tensors the edit's captured kernels read."""
        return self.edit.graph_state()

    def graph_adopt(self, state: tuple) -> None:
        """Copy this edit's values into a captured graph's tensors and use those."""
        self.edit.graph_adopt(state)


def _in_substep(specs: dict, hp: HookPoint) -> bool:
    """Inside a substep module (``StreamSpec.substeps``): only ever runs in the root's decode steps."""
    spec = specs.get(hp.stream)
    return spec is not None and spec.substep_of(hp.module) is not None


@contextlib.contextmanager
def _install(target: Any, layout: Layout, edits: dict[str, _Edit], positions: str) -> Iterator[tuple[str, ...]]:
    # esn.fused: the identity modules of gates computed inside a forward, for the block (removed last)
    with injected(target.model, [layout[n] for n in edits]), _install_hooks(target, layout, edits, positions) as names:
        yield names


@contextlib.contextmanager
def _install_hooks(target: Any, layout: Layout, edits: dict[str, _Edit], positions: str) -> Iterator[tuple[str, ...]]:
    _check_positions(positions)
    states: dict[str, _Prefill] = {}
    roots = []
    specs = target.stream_specs() or {}  # once: adapters build them on every call
    if positions == "generated":
        for stream in sorted({layout[n].stream for n in edits}):
            state = states[stream] = _Prefill()
            spec = specs.get(stream)
            if spec is not None and getattr(spec, "root", None):
                try:
                    root = submodule(target.model, spec.root)
                except AttributeError:
                    raise EsnError(f"stream spec {stream!r}: root module {spec.root!r} not found in the model") from None
                state.tracked = True
                roots.append((root, state))
    hooks, pre = [], []
    for name, edit in edits.items():
        hp = layout[name]
        state = None if _in_substep(specs, hp) else states.get(hp.stream)
        if hp.routed:  # esn.routing: each routed row gets its expert's edit
            if state is not None and not state.tracked:
                raise EsnError(f"hook point {name} is routed: positions='generated' needs a stream spec root "
                               f"for stream {hp.stream!r}")
            routing, forward = routing_steer_hooks(target, hp, edit, None if state is None else lambda s=state: s.prefill)
            pre += routing
            hooks += forward
        elif hp.indexed:  # esn.indexed: each position gets its index's edit; all positions are generated ones
            routing, forward = indexed_steer_hooks(target, hp, edit)
            pre += routing
            hooks += forward
        else:
            hooks.append((target.module(hp), _EditHook(edit, state, hp.flat)))
    untracked = [h for _, h in hooks if isinstance(h, _EditHook) and h.prefill is not None and not h.prefill.tracked]
    with _each_request(target, untracked), installed(roots + pre, kind="pre", with_kwargs=True), installed(hooks):
        yield tuple(edits)


@contextlib.contextmanager
def _each_request(target: Any, hooks: list[_EditHook]) -> Iterator[None]:
    """For an adapter that runs its requests one by one (``batched = False``), route ``generate`` through
    one call per request, so that a hook point without a stream root knows its generation's prefill (and
    refuses a second one). Unmarked unless it wraps a recorder's split, so a recorder inside still splits."""
    generate = getattr(target, "generate", None)
    if not hooks or getattr(target, "batched", True) is not False or not callable(generate):
        yield
        return
    had_own = "generate" in vars(target)

    def each(requests, *args, **kwargs):
        out = []
        for request in requests:
            for h in hooks:
                h.began, h.one_generation = False, True
            out += generate([request], *args, **kwargs)
        return out

    if getattr(generate, "_esn_each", False):  # a recorder around the block already splits requests:
        each._esn_each = True  # its per-request recorders inside must see the split as theirs
    target.generate = each
    try:
        yield
    finally:
        if had_own:
            target.generate = generate
        else:
            del target.generate


# -- public API ------------------------------------------------------------------------------------


@contextlib.contextmanager
def steer(
    target: Any,
    mask: Mask,
    method: Method = "steer",
    alpha: float | None = None,
    *,
    positions: Positions = "all",
    registry: Registry | None = None,
) -> Iterator[tuple[str, ...]]:
    """Apply ``method`` with ``alpha`` to the neurons of ``mask`` in every forward inside the block.

    ``positions="all"`` (default) edits every position of every forward: the prompt (prefill) and each
    generated token. ``"generated"`` skips the prefill forward. Every hook is removed on exit, also when
    the block raises. Yields the names of the hook points that carry a hook.
    """
    _check_positions(positions)
    cls, alpha = resolve(method, alpha, registry)
    layout = check_mask(target, mask)
    item = _Row(None, cls, alpha, cls.affine(alpha), mask.split())
    with _install(target, layout, _build(target, layout, [item], None), positions) as names:
        yield names


@contextlib.contextmanager
def steer_rows(
    target: Any,
    conditions: Sequence[Condition | None],
    *,
    positions: Positions = "all",
    registry: Registry | None = None,
) -> Iterator[tuple[str, ...]]:
    """One batched generate where row ``b`` gets ``conditions[b]`` (``None``: no intervention).

    Every forward inside the block must have exactly ``len(conditions)`` rows, in the same order as the
    conditions (padding does not matter: padded positions are edited too, and attention ignores them).
    Masks of different rows may cover different streams and hook points. Yields the hooked hook points.
    """
    _check_positions(positions)
    items = _row_items(target, conditions, registry)
    if not items:  # nothing to do: no hooks at all
        yield ()
        return
    layout = target.layout()
    edits = _build(target, layout, items, len(conditions))
    with _install(target, layout, edits, positions) as names:
        yield names


@contextlib.contextmanager
def folded(
    target: Any,
    mask: Mask,
    method: Method = "steer",
    alpha: float | None = None,
    *,
    registry: Registry | None = None,
) -> Iterator[tuple[str, ...]]:
    """Apply a gain intervention (``steer``, ``deactivate``) by scaling ``down_proj`` weight columns.

    Column ``n`` of ``down_proj.weight`` ``[hidden, d_mlp]`` multiplies gate neuron ``n``, so scaling it by
    the gain equals scaling the gate, with no hook at all (routed neurons ``(e, u)``: the slice
    ``down_proj[e, :, u]`` of the experts' 3-D parameter; indexed neurons ``(k, u)``: ``down_proj.weight[k, :, u]``
    of the per-index weight; a fused gate enters ``down_proj`` as a dense one does). Always every position. Exact (bit-identical
    to hook steering) when the gain is a power of two or zero, in any dtype; otherwise the product is
    rounded in another place (``(g * s) * w`` vs ``g * (w * s)``), which in bf16 can differ visibly.
    The original columns are saved and written back bit for bit on exit, also when the block raises.
    """
    cls, alpha = resolve(method, alpha, registry)
    form = cls.affine(alpha)
    if not cls.foldable or form is None or form.shift != 0.0 or form.floor != -math.inf:
        raise EsnError(
            f"intervention {cls.name!r} cannot be folded into weights: only per-neuron gains can "
            "(steer, deactivate); use esn.steering.steer() for it"
        )
    layout = check_mask(target, mask)
    saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    routed: list = []  # esn.routing.fold's saved slices of 3-D experts down_proj
    try:
        with torch.no_grad():
            for name, local in mask.split().items():
                hp = layout[name]
                if hp.indexed and hp.down_proj:  # per-index 3-D weight [K, hidden, d]
                    indexed_fold(target, hp, local, form.scale, routed)
                    continue
                if hp.routed and hp.down_proj:
                    routing_fold(target, hp, local, form.scale, routed)
                    continue
                if not hp.down_proj:
                    raise EsnError(f"hook point {name} has no down_proj path, so it cannot be folded; use steer()")
                try:
                    weight = submodule(target.model, hp.down_proj).weight  # [hidden, d_mlp]
                except AttributeError:
                    raise EsnError(f"{name}: down_proj module {hp.down_proj!r} (with a weight) not found") from None
                if weight.dim() != 2 or weight.shape[1] != hp.width or weight.device.type == "meta":
                    raise EsnError(f"{name}: {hp.down_proj}.weight has shape {tuple(weight.shape)} on "
                                   f"{weight.device}; folding needs a materialised [hidden, {hp.width}] weight")
                idx = torch.as_tensor(local, device=weight.device)
                cols = weight.index_select(1, idx)  # a copy: the original columns, restored on exit
                saved.append((weight, idx, cols))
                weight.index_copy_(1, idx, cols * form.scale)
        yield tuple(mask.split())
    finally:
        with torch.no_grad():
            routing_unfold(routed)
            for weight, idx, cols in reversed(saved):
                weight.index_copy_(1, idx, cols)
