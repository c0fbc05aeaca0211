"""Routed (mixture-of-experts) hook points: gate rows mapped back to (batch, position, expert).

transformers 5.x fuses the ``E`` experts of a MoE layer into one module with 3-D parameters
(``gate_up_proj [E, 2d, h]``, ``down_proj [E, h, d]``) and one ``act_fn``. Its forward receives the
layer's tokens flattened, ``hidden [T, h]`` with ``T = batch * pos`` (token ``t`` is row ``t // pos``,
position ``t % pos``), and the routing ``top_k_index [T, k]``. *Routing entry* ``n = t * k + j`` sends
token ``t`` to expert ``top_k_index[t, j]``. ``act_fn`` then sees one row of ``d`` units per entry, in an
order set by ``config._experts_implementation``:

* ``grouped_mm`` (the default): once, ``[T * k, d]``, rows sorted by expert:
  ``expert, entry = torch.sort(top_k_index.reshape(-1))``; the same call on the same tensor gives the
  same order, ties included (sorting has no atomics), so esn repeats it exactly;
* ``batched_mm``: once, ``[T * k, d]``, rows in entry order;
* ``eager``: once per routed-to expert, in increasing expert order, each with that expert's entries in
  ``torch.where(one_hot(top_k_index).permute(2, 1, 0)[e])`` order, i.e. by slot ``j`` then token ``t``.

A forward pre-hook on the experts module computes, per row, the expert and the entry (:func:`row_order`);
the ``act_fn`` hook then maps its rows to groups ``b * E + e``. Recording (:class:`RoutedPoint`) keeps
``counts [B, E, d]``, sums and the per-expert position counts ``tokens [B, E]`` on the device: a
routed neuron's denominator is the number of positions routed to its expert. Steering (:func:`steer_hooks`)
gathers each row's edit by expert (uniform masks, ``[E, d]``) or by group (per-row conditions,
``[B * E, d]``). Folding (:func:`fold`) writes into slices of the 3-D ``down_proj``. Other experts
implementations (``deepgemm``, ``sonicmoe``, ...) do not call ``act_fn`` as a module: refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from esn.errors import EsnError
from esn.hookpoints import HookPoint
from esn.hooks import apply_affine, scale_grouped_columns, submodule

IMPLEMENTATIONS: tuple[str, ...] = ("grouped_mm", "batched_mm", "eager")
_SLICE_BYTES = 64 * 2**20  # float64 copies of prefill rows are summed in slices this small


def implementation(experts: Any, hp: HookPoint) -> str:
    """The experts implementation ``experts`` runs with; EsnError for one esn cannot follow."""
    config = getattr(experts, "config", None)
    impl = getattr(config, "_experts_implementation", None) or "eager"  # None: the class's own eager forward
    if impl not in IMPLEMENTATIONS:
        raise EsnError(
            f"hook point {hp.name}: experts implementation {impl!r} is not supported for routed neurons "
            f"(supported: {', '.join(IMPLEMENTATIONS)}); load the model with experts_implementation='grouped_mm'"
        )
    return impl


def capturable(experts: Any, hp: HookPoint) -> str:
    """The experts implementation of ``experts`` if a CUDA graph can capture it (``esn.decode``); EsnError
    for ``eager``, whose host loop over the routed-to experts (found with ``nonzero``) syncs with the host."""
    impl = implementation(experts, hp)
    if impl == "eager":
        raise EsnError(f"hook point {hp.name}: experts implementation 'eager' loops over the experts on the host, "
                       "which a CUDA graph cannot capture; load the model with experts_implementation='grouped_mm' "
                       "(or 'batched_mm'), or decode with capture=False")
    return impl


class _Hook:
    """A routed hook function with esn.decode's graph-aware protocol (``esn.decode.graphs``) for ``owner``:
    the pre-hook on the experts module (``role="pre"``) adds the owner's key, the ``act_fn`` hook
    (``"forward"``) also carries its tensors."""

    def __init__(self, fn: Callable, owner: Any, role: str):
        self.fn = fn
        self.owner = owner
        self.role = role

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)

    @property
    def graph_key(self) -> tuple:
        """The owner's structure (read only by a capturing decoder)."""
        return (self.role, self.owner.graph_key)

    def graph_state(self) -> Any:
        """The tensors the owner's captured kernels use (on the forward hook only)."""
        return self.owner.graph_state() if self.role == "forward" else None

    def graph_adopt(self, state: Any) -> None:
        """Let the owner take over a captured graph's tensors (on the forward hook only)."""
        if self.role == "forward":
            self.owner.graph_adopt(state)


def routing_of(args: tuple, kwargs: dict, hp: HookPoint) -> torch.Tensor:
    """``top_k_index [T, k]`` from the arguments of an experts module's forward."""
    index = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
    if not isinstance(index, torch.Tensor) or index.dim() != 2 or index.shape[1] != hp.top_k:
        shape = tuple(index.shape) if isinstance(index, torch.Tensor) else type(index).__name__
        raise EsnError(f"hook point {hp.name}: its experts module {hp.router!r} got routing {shape}, expected "
                       f"top_k_index [tokens, {hp.top_k}]")
    return index


def row_order(index: torch.Tensor, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(expert [T*k], entry [T*k])`` of each row ``act_fn`` sees, in its order (all calls of one forward
    concatenated for ``eager``). ``index`` is ``top_k_index [T, k]``."""
    ids = index.reshape(-1)
    if impl == "grouped_mm":
        return torch.sort(ids)  # exactly the model's call (same input, same order, ties included)
    if impl == "batched_mm":
        return ids, torch.arange(ids.numel(), device=ids.device)
    t, k = index.shape  # eager: by expert, then slot j, then token t; keys are unique, so any sort agrees
    entry = torch.arange(t * k, device=ids.device)
    key = ids * (t * k) + (entry % k) * t + entry // k
    order = torch.argsort(key)
    return ids[order], order


def _gate_rows(g: torch.Tensor, hp: HookPoint) -> None:
    if g.dim() != 2 or g.shape[1] != hp.unit_width:
        raise EsnError(f"hook point {hp.name}: routed gate of shape {tuple(g.shape)}, expected "
                       f"[rows, {hp.unit_width}] ({hp.experts} experts x {hp.unit_width} units)")


# -- recording ---------------------------------------------------------------------------------------


class RoutedPoint:
    """Recorder state of one routed hook point; ``root`` is the recorder's stream root (``esn.recording``).

    Statistics ``counts [B, E, d]`` int32, ``sums``/``sumsq`` float64 and ``tokens [B, E]`` int64 stay on
    the device. A decode step of the chunk strategy costs two kernels: one copy of the gate rows and
    one of the routing (batch 1: ``top_k_index`` as it is, ordered at the flush, no ties possible with
    one token) or one ``sort`` into the chunk buffer (batch > 1), each into a slot view made once (on
    the host, indexing a buffer costs about as much as the copy). The chunk is reduced with
    ``index_add_`` at once, and nothing waits for the device.

    Inside ``esn.decode`` (the root's ``engine`` is set) a step does device work only, so it can be
    captured: the copies go to the slot ``state.step % S`` the root keeps on the device, each row's
    validity is the root's per-step ``valid_buf``, and the root flushes filled halves between steps
    (``reduce_chunk``). With the ``step`` strategy the rows are reduced inside the step.
    """

    def __init__(self, hp: HookPoint, root: Any, moments: bool, strategy: str):
        if root.implicit:
            raise EsnError(f"hook point {hp.name} is routed: its stream {hp.stream!r} needs a StreamSpec "
                           "(the recorder maps routed rows back to batch rows through the stream root)")
        self.hp = hp
        self.root = root
        self.moments = moments
        self.chunked = strategy != "step"  # "ref" keeps no references for routed points: it copies
        self.experts: Any = None  # the experts module (set by recorder_hooks): its implementation
        self.calls = 0
        self.forwards = 0
        self.base_forwards = 0  # forwards before esn.decode began (a replayed step runs no Python)
        self.counts: torch.Tensor | None = None  # [B, E, d] int32
        self.tokens: torch.Tensor | None = None  # [B, E] int64
        self.prompt: tuple[torch.Tensor, torch.Tensor] | None = None  # (counts, tokens) right after the prefill
        self.snapped = False  # the prompt snapshot was taken (None there: the prefill was not counted)
        self.sums: torch.Tensor | None = None  # [B, E, d] float64
        self.sumsq: torch.Tensor | None = None
        self.impl = ""
        self.gate_dtype: torch.dtype | None = None  # the gate rows' dtype, seen in the prefill
        self.row = 0  # rows of this forward already seen by act_fn (eager calls it once per expert)
        self.mode = "skip"
        # this forward, dense mode: per row group b*E + e and validity
        self.group: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None
        # chunk buffers of S = halves * chunk slots: gate rows [S, R, d]; routing ids [S, R] (batch 1 and
        # batched_mm in decode: top_k_index as it is) or expert/entry [S, R] in act_fn's row order
        self.gbuf: torch.Tensor | None = None
        self.ebuf: torch.Tensor | None = None
        self.nbuf: torch.Tensor | None = None
        # their per-slot views for eager steps, made once: gate rows [R, d]; batch 1: routing [1, k]
        # (top_k_index's shape, so the copy needs no reshape); batch > 1: expert and entry [R]
        self.gslots: list[torch.Tensor] = []
        self.grows: list[list[torch.Tensor]] = []  # each slot's rows as [1, d] views (eager, one token)
        self.eslots: list[torch.Tensor] = []
        self.nslots: list[torch.Tensor] = []
        self.pending = 0
        self.pending_impl = ""

    # one forward of the experts module: (hidden [T, h], top_k_index [T, k], top_k_weights [T, k])
    def pre_hook(self, module, args, kwargs) -> None:
        """Forward pre-hook (with kwargs) on the experts module: read ``top_k_index [T, k]``, decide this
        forward's mode (skip, dense, or a decode slot) and where each row ``act_fn`` sees will go."""
        root = self.root
        self.forwards += 1
        self.row = 0
        self.mode = root.mode
        if not self.snapped and root.calls > 1:
            self._snapshot()  # the prefill is over: keep what the prompt counted (device copies, once)
        index = routing_of(args, kwargs, self.hp)
        b, p = root.batch, root.pos
        if index.shape[0] != b * p:
            raise EsnError(f"hook point {self.hp.name}: {index.shape[0]} routed tokens, but its stream root "
                           f"{root.path!r} runs batch {b} x {p} positions")
        self._allocate(index.device)  # also when skipped: a graph-aware decode needs them before its steps
        if self.mode == "skip":
            return
        impl = implementation(module, self.hp)
        if root.engine is not None:
            self._decode_pre(index, impl)
            return
        if self.mode == "slot" and self.chunked:
            if self.pending and impl != self.pending_impl:
                self.flush()
            self.pending_impl = impl
            slot = root.slot
            if b == 1:  # one token: its k experts differ, so the order can be made at the flush
                self.eslots[slot].copy_(index)
            elif impl == "grouped_mm":
                torch.sort(index.reshape(-1), out=(self.eslots[slot], self.nslots[slot]))
            else:
                expert, entry = row_order(index, impl)
                self.eslots[slot].copy_(expert)
                self.nslots[slot].copy_(entry)
            return
        self.mode = "dense"
        self._groups(index, impl, root.valid)

    def _groups(self, index: torch.Tensor, impl: str, valid: torch.Tensor | None) -> None:
        """Each row's group ``b * E + e`` and validity (from ``valid [B, pos]``) for a dense forward."""
        expert, entry = row_order(index, impl)
        token = entry // self.hp.top_k
        row = token // self.root.pos
        self.group = row * self.hp.experts + expert
        self.valid = None if valid is None else valid.reshape(-1)[token]  # [B, pos] -> per row

    def _decode_pre(self, index: torch.Tensor, impl: str) -> None:
        """A step inside esn.decode: device work only (sort, copies at the device-side slot)."""
        root = self.root
        self.impl = impl  # the flush orders rows as this forward ran (generate may switch it for decode)
        if self.mode == "step":  # reduced in the step, each row counted if its batch row is real
            self.mode = "dense"
            self._groups(index, impl, root.valid_col)  # [B, 1]: one position per row
            return
        if root.batch == 1 or impl == "batched_mm":  # rows in entry order, or ordered at the flush
            self.ebuf.index_copy_(0, root.slot_dev, index.reshape(1, -1))
            return
        expert, entry = row_order(index, impl)  # grouped_mm: torch.sort, exactly the model's call
        self.ebuf.index_copy_(0, root.slot_dev, expert.unsqueeze(0))
        self.nbuf.index_copy_(0, root.slot_dev, entry.unsqueeze(0))

    def hook(self, module, args, g: torch.Tensor) -> None:
        """Forward hook on ``act_fn``: ``g [rows, d]``, this forward's rows in ``row_order``'s order (eager:
        one expert's rows per call), copied into the chunk slot or reduced at once."""
        self.calls += 1
        self.gate_dtype = g.dtype
        if self.mode == "skip":
            return
        _gate_rows(g, self.hp)
        n, start = g.shape[0], self.row
        self.row += n
        if self.mode == "slot" and self.root.engine is not None:  # [S, R, d] at the step's slot, on the device
            self._gates(g).narrow(1, start, n).index_copy_(0, self.root.slot_dev, g.unsqueeze(0))
            return
        if self.mode == "slot":
            self._gates(g)
            dst = self.gslots[self.root.slot]
            if n == dst.shape[0]:
                dst.copy_(g)
            elif n == 1:  # eager, one token (batch-1 decode): one row per routed expert, into a view made once
                if not self.grows:
                    self.grows = [list(s.split(1)) for s in self.gslots]
                self.grows[self.root.slot][start].copy_(g)
            else:  # eager: one expert's rows per call
                dst[start:start + n].copy_(g)
            if self.row == self.gbuf.shape[1]:  # the step's last rows
                self.pending = self.root.slot + 1
                if self.pending == self.root.chunk:
                    self.flush()
            return
        valid = None if self.valid is None else self.valid[start:start + n]
        self._reduce(g, self.group[start:start + n], valid)

    def _gates(self, g: torch.Tensor) -> torch.Tensor:
        """The gate-row chunk buffer ``[S, B * k, d]`` in the gate's dtype, made on first use (a graph
        replay writes the buffer of the graph it replays: graph_adopt)."""
        if self.gbuf is None:
            rows = self.root.batch * self.hp.top_k
            self.gbuf = torch.empty((self._slots(), rows, g.shape[1]), dtype=g.dtype, device=g.device)
            self.gslots = list(self.gbuf.unbind(0))
        return self.gbuf

    def _slots(self) -> int:
        return self.root.halves * self.root.chunk

    def _allocate(self, device) -> None:
        if self.counts is not None:
            return
        b, e, d = self.root.batch, self.hp.experts, self.hp.unit_width
        self.counts = torch.zeros((b, e, d), dtype=torch.int32, device=device)
        self.tokens = torch.zeros((b, e), dtype=torch.int64, device=device)
        if self.moments:
            self.sums = torch.zeros((b, e, d), dtype=torch.float64, device=device)
            self.sumsq = torch.zeros((b, e, d), dtype=torch.float64, device=device)
        if self.chunked and self.root.chunk:
            rows, slots = b * self.hp.top_k, self._slots()
            self.ebuf = torch.empty((slots, rows), dtype=torch.int64, device=device)
            self.nbuf = torch.empty((slots, rows), dtype=torch.int64, device=device) if b > 1 else None
            self.eslots = list(self.ebuf.view(slots, 1, rows).unbind(0) if b == 1 else self.ebuf.unbind(0))
            self.nslots = [] if self.nbuf is None else list(self.nbuf.unbind(0))

    def _reduce(self, g: torch.Tensor, group: torch.Tensor, valid: torch.Tensor | None) -> None:
        """Add rows ``g [R, d]`` of groups ``group [R]`` (``b * E + e``) where ``valid [R]`` (None: all)."""
        d = self.hp.unit_width
        counts, tokens = self.counts.view(-1, d), self.tokens.view(-1)
        pos = g > 0
        if valid is not None:
            pos &= valid.unsqueeze(-1)
        counts.index_add_(0, group, pos.to(torch.int32))
        tokens.index_add_(0, group, torch.ones_like(group) if valid is None else valid.to(torch.int64))
        if not self.moments:
            return
        step = max(1, _SLICE_BYTES // (d * 8))
        for start in range(0, g.shape[0], step):
            x = g[start:start + step].double()
            if valid is not None:
                x = torch.where(valid[start:start + step].unsqueeze(-1), x, 0.0)
            idx = group[start:start + step]
            self.sums.view(-1, d).index_add_(0, idx, x)
            self.sumsq.view(-1, d).index_add_(0, idx, x.square_())

    def flush(self) -> None:
        """Reduce the buffered decode steps into the statistics (on the device)."""
        n = self.pending
        if not n:
            return
        self.pending = 0
        k, e = self.hp.top_k, self.hp.experts
        if self.nbuf is None:  # batch 1: order each step's k distinct experts now
            ids = self.ebuf[:n]
            expert = ids if self.pending_impl == "batched_mm" else torch.sort(ids, dim=-1).values
            group, valid = expert, None
        else:
            expert, entry = self.ebuf[:n], self.nbuf[:n]
            row = entry // k  # decode: one position, so token = batch row
            group = row * e + expert
            vb = self.root.valid_buf
            valid = None if vb is None else vb[:n].gather(1, row)
        self._reduce(self.gbuf[:n].reshape(-1, self.hp.unit_width), group.reshape(-1),
                     None if valid is None else valid.reshape(-1))

    # -- graph-aware decode (esn.decode; the root drives it, see esn.recording._Root) ---------------------
    def decode_begin(self, state: Any) -> None:
        """A decoder starts stepping: the prefill is over (keep the prompt's share)."""
        if not self.snapped:
            self._snapshot()
        self.impl = implementation(self.experts, self.hp)
        self.base_forwards = self.forwards

    def reduce_chunk(self, start: int, steps: int, valid: torch.Tensor) -> None:
        """Reduce decode slots ``start`` to ``start + steps``; ``valid [steps, B]`` says which batch rows
        were real at each step (the root's ``valid_buf``)."""
        if self.gbuf is None:  # no step wrote a slot
            return
        k, e = self.hp.top_k, self.hp.experts
        ids = self.ebuf[start:start + steps]  # [steps, R]
        if self.root.batch == 1:  # one token's k distinct experts, in act_fn's order
            expert = ids if self.impl == "batched_mm" else torch.sort(ids, dim=-1).values
            row = torch.zeros_like(expert)
        elif self.impl == "batched_mm":  # entry order: row r is token r // k
            expert = ids
            row = (torch.arange(ids.shape[1], device=ids.device) // k).expand_as(ids)
        else:
            expert, row = ids, self.nbuf[start:start + steps] // k
        self._reduce(self.gbuf[start:start + steps].reshape(-1, self.hp.unit_width), (row * e + expert).reshape(-1),
                     valid.gather(1, row).reshape(-1))

    def decode_end(self, done: int) -> None:
        """The decoder ran ``done`` steps: the experts module ran once in each (replays run no hook)."""
        self.forwards = self.base_forwards + done

    @property
    def graph_key(self) -> tuple:
        """The kernels a decode step issues: shapes, dtypes, implementation, chunk (EsnError for ``eager``)."""
        impl = capturable(self.experts, self.hp)
        kind = ("chunk", self._slots(), str(self.gate_dtype)) if self.root.chunk else ("step", self.moments)
        return ("esn.recorder.routed", self.hp.experts, self.hp.top_k, self.hp.unit_width, self.root.batch, impl, kind)

    def graph_state(self) -> tuple:
        """The tensors a captured step writes: the chunk buffers, or (step strategy) the statistics."""
        if self.root.chunk:
            return self.gbuf, self.ebuf, self.nbuf
        return self.counts, self.tokens, self.sums, self.sumsq

    def graph_adopt(self, state: tuple) -> None:
        """Write into a captured graph's tensors from now on (``step``: carrying this recording's totals)."""
        if self.root.chunk:
            self.gbuf, self.ebuf, self.nbuf = state
            self.gslots, self.grows, self.eslots, self.nslots = [], [], [], []  # eager views of the old buffers
            return
        counts, tokens, sums, sumsq = state
        self.counts, self.tokens = counts.copy_(self.counts), tokens.copy_(self.tokens)
        if sums is not None:
            self.sums, self.sumsq = sums.copy_(self.sums), sumsq.copy_(self.sumsq)

    def _snapshot(self) -> None:
        self.snapped = True
        if self.counts is None:  # the prefill was skipped (positions="generated") or never ran
            return
        self.prompt = (self.counts.clone(), self.tokens.clone())

    def result(self, batch: int) -> tuple[torch.Tensor | None, ...]:
        """``(counts [B, E*d] int32, tokens [B, E] int64, sums, sumsq, prompt_counts [B, E*d], prompt_tokens
        [B, E])`` on the statistics' device (sums and sumsq None without moments). The recorder brings all
        points' statistics to the host at once through page-locked memory: a ``.cpu()`` per point and
        tensor here cost ~0.2 s per call at Qwen3-Omni's 5.7 M neurons (pageable copies, one wait each)."""
        if self.forwards != self.root.calls:
            raise EsnError(f"hook point {self.hp.name}: its experts module ran in {self.forwards} of the "
                           f"{self.root.calls} calls of its stream root {self.root.path!r}: the stream spec "
                           "does not match the model")
        w, g = self.hp.width, self.hp.groups

        def zero(device=None) -> tuple[torch.Tensor, torch.Tensor]:  # counts and tokens of no position
            return (torch.zeros((batch, w), dtype=torch.int32, device=device),
                    torch.zeros((batch, g), dtype=torch.int64, device=device))

        if self.counts is None:
            zeros = torch.zeros((batch, w), dtype=torch.float64) if self.moments else None
            return *zero(), zeros, zeros, *zero()
        if not self.snapped and self.root.calls == 1:
            self._snapshot()  # a generation of the prefill alone
        prompt = zero(self.counts.device) if self.prompt is None else (self.prompt[0].reshape(batch, w), self.prompt[1])
        moments = (self.sums.reshape(batch, w), self.sumsq.reshape(batch, w)) if self.moments else (None, None)
        return self.counts.reshape(batch, w), self.tokens, *moments, *prompt


def recorder_hooks(point: RoutedPoint, model: Any) -> tuple[tuple[Any, Callable], tuple[Any, Callable]]:
    """``((experts module, pre-hook with kwargs), (act_fn module, forward hook))`` of a routed point, both
    graph-aware (``esn.decode``)."""
    hp = point.hp
    point.experts = _module(model, hp.router, hp)
    return (point.experts, _Hook(point.pre_hook, point, "pre")), (_module(model, hp.module, hp), _Hook(point.hook, point, "forward"))


def _module(model: Any, path: str | None, hp: HookPoint) -> Any:
    try:
        return submodule(model, path or "")
    except AttributeError:
        raise EsnError(f"hook point {hp.name}: module {path!r} not found in the model") from None


# -- steering ----------------------------------------------------------------------------------------


class _Rows:
    """Per forward of the experts module: each row's index into the edit tensors viewed ``[-1, d]``:
    the expert (uniform masks, ``[E, d]``) or ``b * E + e`` (per-row conditions, ``[B * E, d]``)."""

    def __init__(self, hp: HookPoint, rows: int | None):
        self.hp = hp
        self.rows = rows
        self.index: torch.Tensor | None = None
        self.impl = ""
        self.start = 0
        self.skip = False
        self.calls: list[tuple] | None = None  # eager, one token: each act_fn call's (scale, shift, floor) rows

    def pre_hook(self, module, args, kwargs) -> None:
        """On the experts module's forward: each row's index into the edit, in ``act_fn``'s row order."""
        self.start = 0
        if self.skip:
            return
        index = routing_of(args, kwargs, self.hp)
        impl = self.impl = implementation(module, self.hp)
        if self.rows is None and impl == "batched_mm":  # rows in entry order: the routing itself
            self.index = index.reshape(-1)
            return
        expert, entry = row_order(index, impl)
        if self.rows is None:
            self.index = expert
            return
        t = index.shape[0]
        if t % self.rows:
            raise EsnError(f"steer_rows got {self.rows} conditions but {self.hp.name} routed {t} tokens; give "
                           "exactly one condition (or None) per row of the generate call")
        per_row = self.hp.top_k * (t // self.rows)  # routing entries of one batch row
        self.index = (entry // per_row) * self.hp.experts + expert

    def take(self, n: int) -> torch.Tensor:
        """The indices of the next ``n`` rows (all of them in one call, except with ``eager``)."""
        start, self.start = self.start, self.start + n
        return self.index if start == 0 and n == self.index.shape[0] else self.index[start:start + n]


class _RoutedEdit:
    """Steering of one routed hook point: ``pre`` on the experts module finds each row's index into the
    edit, ``hook`` on ``act_fn`` edits the rows ``g [rows, d]``. Graph-aware (``esn.decode``): a step
    issues only device work (sort, gathers, the affine edit), reading the edit's dense tensors, so another
    block with the same structure reuses a captured graph by copying its values into them."""

    def __init__(self, hp: HookPoint, edit: Any, skip: Callable[[], bool] | None, experts: Any):
        if edit.extra:
            raise EsnError(f"hook point {hp.name} is routed: only interventions with an affine form "
                           f"(steer, add, clamp, deactivate, or a plugin's affine()) can be applied to it")
        self.hp = hp
        self.edit = edit
        self.skip = skip
        self.experts = experts
        self.rows = _Rows(hp, edit.rows)
        self.table = self._tables()

    def _tables(self) -> list[torch.Tensor | None]:
        """The edit's tensors as ``[groups, d]`` views, made once per placement."""
        return [None if t is None else t.view(-1, self.hp.unit_width)
                for t in (self.edit.scale, self.edit.shift, self.edit.floor)]

    def pre(self, module, args, kwargs) -> None:
        """Forward pre-hook (with kwargs) on the experts module: ``top_k_index [T, k]`` -> each row's index."""
        rows, k = self.rows, self.hp.top_k
        rows.skip = self.skip is not None and self.skip()
        rows.pre_hook(module, args, kwargs)
        rows.calls = None
        if not rows.skip and rows.impl == "eager" and rows.index.shape[0] == k:
            # One token (batch-1 decode): eager calls act_fn once per routed expert with one row. Gather
            # all k rows' edits now (one kernel per edit tensor) instead of one gather per call. A host-side
            # path of the eager implementation only, which a decoder never captures (capturable()).
            picked = [[None] * k if t is None else t.index_select(0, rows.index).unbind(0) for t in self.table]
            rows.calls = list(zip(*picked, strict=True))

    def hook(self, module, args, g: torch.Tensor) -> torch.Tensor | None:
        """Forward hook on ``act_fn``: ``g [rows, d]`` in ``row_order`` -> the edited rows."""
        rows, edit = self.rows, self.edit
        if rows.skip:
            return None
        _gate_rows(g, self.hp)
        if g.dtype is not edit.dtype or g.device != edit.device:
            edit._place(g.dtype, g.device)
            self.table = self._tables()
            rows.calls = None  # gathered from the old placement
        if rows.calls is not None and g.shape[0] == 1:
            scale, shift, floor = rows.calls[rows.start]  # [d] each: broadcast over the row
            rows.start += 1
        else:
            idx = rows.take(g.shape[0])
            scale, shift, floor = (None if t is None else t.index_select(0, idx) for t in self.table)
        return apply_affine(g, scale, shift, floor)

    # graph-aware decode (esn.decode)
    @property
    def graph_key(self) -> tuple:
        """The edit's structure, the routing's shape and implementation (EsnError for ``eager``)."""
        hp = self.hp
        impl = capturable(self.experts, hp)
        return ("esn.steer.routed", hp.experts, hp.top_k, hp.unit_width, self.rows.rows, impl, self.edit.graph_key)

    def graph_state(self) -> tuple:
        """The edit's dense tensors, which the captured gathers read."""
        return self.edit.graph_state()

    def graph_adopt(self, state: tuple) -> None:
        """Copy this edit's values into a captured graph's tensors and use those."""
        self.edit.graph_adopt(state)
        self.table = self._tables()


def steer_hooks(target: Any, hp: HookPoint, edit: Any, skip: Callable[[], bool] | None) -> tuple[list, list]:
    """``(pre-hooks, forward hooks)`` that apply ``edit`` (``esn.steering._Edit``, dense tensors ``[E*d]``
    or ``[B, 1, E*d]``) to routed rows, each row getting its expert's (and batch row's) values.
    ``skip()`` says whether the current forward is a prefill to leave alone (``positions="generated"``).
    Both hooks are graph-aware (``esn.decode``)."""
    model = target.model
    experts = _module(model, hp.router, hp)
    routed = _RoutedEdit(hp, edit, skip, experts)
    return ([(experts, _Hook(routed.pre, routed, "pre"))],
            [(_module(model, hp.module, hp), _Hook(routed.hook, routed, "forward"))])


# -- folding -----------------------------------------------------------------------------------------


def fold(target: Any, hp: HookPoint, local, scale: float, saved: list) -> None:
    """Scale ``down_proj[e, :, u]`` of the 3-D experts parameter for local neurons ``e * d + u``; the
    original slices are appended to ``saved`` as ``(weight, (experts, units), values)``."""
    try:
        weight = target.model.get_parameter(hp.down_proj or "")
    except AttributeError:
        raise EsnError(f"{hp.name}: experts down_proj parameter {hp.down_proj!r} not found") from None
    d = hp.unit_width
    if weight.dim() != 3 or tuple(weight.shape[::2]) != (hp.experts, d) or weight.device.type == "meta":
        raise EsnError(f"{hp.name}: {hp.down_proj} has shape {tuple(weight.shape)} on {weight.device}; folding "
                       f"needs a materialised [{hp.experts}, hidden, {d}] parameter")
    scale_grouped_columns(weight, local, d, scale, saved)


def unfold(saved: list) -> None:
    """Write back the ``down_proj`` slices :func:`fold` saved, last fold first."""
    for weight, index, values in reversed(saved):
        weight[index[0], :, index[1]] = values
