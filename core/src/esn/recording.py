"""Recording gate statistics during generation: per attempt, how often each neuron's gate is positive.

While a :class:`GateRecorder` is active, a forward hook on every selected hook point's ``act_fn`` sees
the post-SiLU gate ``g`` ``[batch, pos, d_mlp]`` and accumulates, for each batch row (one conversion
attempt) separately:

* ``counts[b, n]``: positions where ``g[b, :, n] > 0`` (exact integers),
* ``tokens[b, h]``: positions counted at hook point ``h``,
* ``sums``/``sumsq`` ``[b, n]`` (optional): sum of ``g`` and of ``g**2`` over the same positions, in float64.
* ``prompt_counts[b, n]``/``prompt_tokens[b, h]`` (with ``positions="all"``): the part of ``counts``/``tokens``
  at prompt (prefill) positions, so that the generated positions alone are ``counts - prompt_counts``: one
  recording gives P both ways (a snapshot of the running counts right after the prefill).

Padding is never counted. Each stream's :class:`~esn.adapters.StreamSpec` names a root module whose
forward receives ``input_ids``/``attention_mask``; a pre-hook there decides, per step, which positions
of which rows are real: in the first call (the prefill) the last ``pos`` columns of ``attention_mask``;
in every later call (decode) the rows that have not yet *fed* one of ``stop_token_ids``. transformers'
``generate`` keeps feeding a row that finished (eos, then pad tokens) while others continue; a solo run
would have stopped, so those positions are padding. A batch of one row is never padded in decode (its
generation stops when it stops). A stream without a spec counts every position.

Statistics stay on the device; hooks never synchronise. Two strategies, same counts:

* ``"chunk"`` (default): each decode step costs one copy kernel per hook point, into a preallocated
  ``[chunk_steps, batch, d_mlp]`` buffer in the gate's own dtype; a full chunk is reduced at once.
* ``"ref"``: no kernel at all per decode step: the hook keeps a reference to the gate tensor and the
  chunk is concatenated and reduced when full. Same memory as ``"chunk"``. The gate must not be modified
  in place after the hook (checked through the tensor's version counter, except under inference_mode).
* ``"step"``: the straightforward per-step reduction (compare, mask, add; more with moments).

Float accumulation order (sums only; counts and tokens are exact): every gate value is converted to
float64 first; prefill positions are summed in slices of positions, decode steps one chunk (``"chunk"``)
or one step (``"step"``) at a time, each partial sum added to the running float64 total.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from esn.errors import EsnError
from esn.hookpoints import HookPoint, Layout
from esn.hooks import installed
from esn.routing import RoutedPoint, recorder_hooks
from esn.substeps import SubstepPoint, SubstepRoot

Positions = Literal["all", "generated"]
Strategy = Literal["chunk", "ref", "step"]
STRATEGIES: tuple[str, ...] = ("chunk", "ref", "step")
# Decode-chunk buffers of all hook points together stay under this many bytes (chunk_steps=None).
CHUNK_BUDGET_BYTES = 256 * 2**20
MAX_CHUNK_STEPS = 64
# Prefill moments are summed over slices of positions so the float64 copy stays this small.
_SLICE_BYTES = 64 * 2**20


@dataclass
class BatchStats:
    """Per-attempt gate statistics of one batch, on CPU. Row ``b`` is batch row ``b`` (one attempt).

    Neurons are flat in ``layout`` order (``layout.slice(name)`` gives a hook point's columns).
    """

    layout: Layout
    counts: torch.Tensor  # [B, N] int32: positions with g > 0
    tokens: torch.Tensor  # [B, G] int64: positions counted per group (hook point; per expert if routed)
    sums: torch.Tensor | None = None  # [B, N] float64: sum of g over counted positions
    sumsq: torch.Tensor | None = None  # [B, N] float64: sum of g**2
    positions: str = "all"
    prompt_counts: torch.Tensor | None = None  # [B, N] int32: the part of counts at prompt (prefill) positions
    prompt_tokens: torch.Tensor | None = None  # [B, G] int64: the part of tokens at prompt positions

    def __post_init__(self) -> None:
        b, n = self.counts.shape
        if n != self.layout.n_neurons or tuple(self.tokens.shape) != (b, self.layout.n_groups):
            raise EsnError(
                f"statistics shapes counts {tuple(self.counts.shape)}, tokens {tuple(self.tokens.shape)} "
                f"do not fit the layout ({self.layout.n_groups} position groups, {self.layout.n_neurons} neurons)"
            )
        if (self.sums is None) != (self.sumsq is None):
            raise EsnError("sums and sumsq must both be present or both absent")
        if (self.prompt_counts is None) != (self.prompt_tokens is None):
            raise EsnError("prompt_counts and prompt_tokens must both be present or both absent")
        if self.prompt_counts is not None and (self.prompt_counts.shape != self.counts.shape
                                               or self.prompt_tokens.shape != self.tokens.shape):
            raise EsnError("prompt_counts and prompt_tokens must have the shapes of counts and tokens")

    @property
    def batch_size(self) -> int:
        """B, the number of rows (attempts)."""
        return int(self.counts.shape[0])

    @property
    def has_moments(self) -> bool:
        """True if ``sums`` and ``sumsq`` were recorded."""
        return self.sums is not None

    @property
    def has_prompt_split(self) -> bool:
        """Whether the prompt's share of counts and tokens was kept apart (recorded with positions="all")."""
        return self.prompt_counts is not None

    def generated(self) -> BatchStats:
        """The statistics of the generated positions only (``counts - prompt_counts``); no moments."""
        if self.positions == "generated":
            return self
        if not self.has_prompt_split:
            raise EsnError("these statistics have no prompt/generated split; record with positions='all'")
        return BatchStats(self.layout, self.counts - self.prompt_counts, self.tokens - self.prompt_tokens,
                          positions="generated")

    def tokens_per_neuron(self) -> torch.Tensor:
        """``[B, N]`` int64: each neuron's position count (the denominator of its probability): its hook
        point's, or for a routed neuron its expert's (positions routed to that expert)."""
        return self.tokens.repeat_interleave(torch.as_tensor(self.layout.group_widths), dim=1)

    @classmethod
    def concat(cls, parts: Sequence[BatchStats]) -> BatchStats:
        """Stack the rows of several batches (same layout, positions and moments)."""
        if not parts:
            raise EsnError("BatchStats.concat needs at least one batch")
        first = parts[0]
        for p in parts[1:]:
            if p.layout != first.layout:
                raise EsnError("cannot concatenate statistics recorded on different hook-point layouts")
            if (p.positions, p.has_moments, p.has_prompt_split) != (
                    first.positions, first.has_moments, first.has_prompt_split):
                raise EsnError(
                    f"cannot concatenate statistics with positions={p.positions!r}, moments={p.has_moments}, "
                    f"prompt split={p.has_prompt_split} and positions={first.positions!r}, "
                    f"moments={first.has_moments}, prompt split={first.has_prompt_split}"
                )

        def cat(name: str) -> torch.Tensor | None:
            return None if getattr(first, name) is None else torch.cat([getattr(p, name) for p in parts])

        return cls(first.layout, cat("counts"), cat("tokens"), cat("sums"), cat("sumsq"), first.positions,
                   cat("prompt_counts"), cat("prompt_tokens"))

    def select_rows(self, idx: Sequence[int] | np.ndarray | torch.Tensor) -> BatchStats:
        """The statistics of rows ``idx`` only, in that order."""
        idx = torch.as_tensor(np.asarray(idx, dtype=np.int64))

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.index_select(0, idx)

        return BatchStats(
            self.layout,
            pick(self.counts),
            pick(self.tokens),
            pick(self.sums),
            pick(self.sumsq),
            self.positions,
            pick(self.prompt_counts),
            pick(self.prompt_tokens),
        )

    def numpy(self) -> dict[str, np.ndarray]:
        """``{"counts", "tokens"[, "sums", "sumsq"][, "prompt_counts", "prompt_tokens"]}`` as numpy arrays."""
        out = {"counts": self.counts.numpy(), "tokens": self.tokens.numpy()}
        if self.has_moments:
            out["sums"] = self.sums.numpy()
            out["sumsq"] = self.sumsq.numpy()
        if self.has_prompt_split:
            out["prompt_counts"] = self.prompt_counts.numpy()
            out["prompt_tokens"] = self.prompt_tokens.numpy()
        return out


class _Root:
    """Per stream root: which positions of the current call are real. One per root module."""

    def __init__(
        self,
        path: str,
        stop_ids: Sequence[int],
        positions: str,
        chunk_fn: Callable[[int], int | None],
        implicit: bool,
    ):
        self.path = path
        self.stop_ids = tuple(int(i) for i in stop_ids)
        self.positions = positions
        self.chunk_fn = chunk_fn  # batch -> decode steps per chunk (chunk strategy), or None
        self.chunk: int | None = None
        self.implicit = implicit  # no spec: driven by the hook point itself, every position real
        self.calls = 0
        self.batch: int | None = None
        self.mode = "skip"  # this call: "skip" | "dense" (reduce now) | "slot" (chunk buffer)
        self.pos = 0  # positions in this call
        self.valid: torch.Tensor | None = None  # [B, pos] bool for "dense"; None = all real
        self.slot = -1  # chunk slot of this decode step
        self.valid_buf: torch.Tensor | None = None  # [chunk, B] bool, per decode slot
        self.valid_slots: list[torch.Tensor] = []  # its [B] rows, made once
        self.finished: torch.Tensor | None = None  # [B] bool: row has fed a stop token
        self.stop: torch.Tensor | None = None
        self.masked_decode = False  # decode validity tracked on the device (B > 1 and stop ids)
        self.tokens_dev: torch.Tensor | None = None  # [B] int64, positions counted under a mask
        self.tokens_all = 0  # positions counted in calls where every row was real
        self.prompt: tuple[int, torch.Tensor | None] = (0, None)  # (tokens_all, tokens_dev) after the prefill
        self.followers: list[Callable] = []  # substeps (esn.substeps): told each step's real rows [B]

    def tokens(self, batch: int, *, prompt: bool = False) -> torch.Tensor:
        """``[batch]`` positions counted so far (``prompt=True``: in the prefill only)."""
        every, dev = self.prompt if prompt else (self.tokens_all, self.tokens_dev)
        out = torch.full((batch,), every, dtype=torch.int64)
        if dev is not None:
            out += dev.cpu()
        return out

    def begin(self, input_ids: torch.Tensor | None, mask: Any, pos: int, batch: int, device) -> None:
        """Decide this call's real positions. Only shapes are inspected on the host: no sync."""
        prefill = self.calls == 0
        self.calls += 1
        if prefill:
            self.batch = batch
            self.chunk = self.chunk_fn(batch)
            self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
            self.masked_decode = batch > 1 and bool(self.stop_ids) and not self.implicit
            if self.masked_decode:
                self.stop = torch.tensor(self.stop_ids, dtype=torch.long, device=device)
        elif batch != self.batch:
            raise EsnError(
                f"stream root {self.path!r} was called with batch {batch} after batch {self.batch}: "
                "use one GateRecorder per generate call"
            )
        elif isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[-1] == pos and pos > 1:
            raise EsnError(
                f"stream root {self.path!r} saw a second prefill (or generation without a KV cache): "
                "use one GateRecorder per generate call, with use_cache=True"
            )
        self.pos = pos
        if prefill:
            self.mode = "skip" if self.positions == "generated" else "dense"
            self.valid = None if self.implicit else _prefill_valid(mask, pos, self.path)
        elif not self.masked_decode:
            self.valid = None
            self.mode = "slot" if (self.chunk and pos == 1) else "dense"
        else:
            # A row that has fed a stop token (now or earlier) is padding from this position on.
            if pos == 1 and self.chunk:  # the hot path: a few kernels per step, no indexing but one
                self.mode = "slot"
                self.slot = self.slot + 1 if self.slot + 1 < self.chunk else 0
                if self.valid_buf is None:
                    self.valid_buf = torch.empty((self.chunk, batch), dtype=torch.bool, device=device)
                    self.valid_slots = list(self.valid_buf.unbind(0))
                torch.logical_or(self.finished, torch.isin(input_ids[:, -1], self.stop), out=self.finished)
                self._count(torch.logical_not(self.finished, out=self.valid_slots[self.slot]))  # [B]
                self._tell(self.valid_slots[self.slot])
                return
            hit = torch.isin(input_ids[:, -pos:], self.stop).cumsum(1, dtype=torch.int32) > 0
            fed = hit | self.finished[:, None]  # [B, pos]
            self.finished = fed[:, -1].clone()
            self.mode = "dense"
            self.valid = ~fed
        if self.mode == "slot":
            self.slot = self.slot + 1 if self.slot + 1 < self.chunk else 0
        if self.mode != "skip":
            self._count(self.valid)
        if prefill:  # what the prompt alone counted (device copy, no sync)
            self.prompt = (self.tokens_all, None if self.tokens_dev is None else self.tokens_dev.clone())
        self._tell(None if self.valid is None or prefill else self.valid[:, -1])

    def _tell(self, rows: torch.Tensor | None) -> None:
        for follow in self.followers:  # substeps that ran before this step belong to it
            follow(rows)

    def _count(self, valid: torch.Tensor | None) -> None:
        if valid is None:
            self.tokens_all += self.pos
            return
        n = valid.sum(-1) if valid.dim() == 2 else valid
        if self.tokens_dev is None:
            self.tokens_dev = torch.zeros(self.batch, dtype=torch.int64, device=n.device)
        self.tokens_dev.add_(n)


def _prefill_valid(mask: Any, pos: int, root: str) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise EsnError(
            f"stream root {root!r} received an attention_mask of shape {shape}; recording needs the 2D "
            "[batch, positions] mask to tell padding apart (use a dynamic KV cache, not a static one)"
        )
    if mask.shape[-1] < pos:
        raise EsnError(
            f"stream root {root!r}: attention_mask has {mask.shape[-1]} columns for {pos} positions"
        )
    return mask[:, -pos:].bool()


def _check_rank(hp: HookPoint, g: Any) -> None:
    if not isinstance(g, torch.Tensor) or g.dim() != 3:
        shape = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
        raise EsnError(
            f"hook point {hp.name}: module {hp.module!r} outputs {shape}; recording needs the gate as "
            f"[batch, pos, {hp.width}]. A model that flattens batch and positions (e.g. [tokens, d_mlp] in "
            "routed or packed MLPs) needs its hook point on a module that still sees [batch, pos, d_mlp]"
        )


class _Point:
    """Per hook point: running statistics ``[B, d_mlp]`` on the device, and the decode chunk buffer."""

    def __init__(self, hp: HookPoint, root: _Root, moments: bool, strategy: str):
        self.hp = hp
        self.root = root
        self.moments = moments
        self.strategy = strategy
        self.calls = 0
        self.counts: torch.Tensor | None = None  # [B, D] int32
        self.sums: torch.Tensor | None = None  # [B, D] float64
        self.sumsq: torch.Tensor | None = None
        self.prompt_counts: torch.Tensor | None = None  # [B, D] int32: counts right after the prefill
        self.buf: torch.Tensor | None = None  # [chunk, B, 1, D], gate dtype ("chunk")
        self.slots: list[
            torch.Tensor
        ] = []  # buf's [B, 1, D] views, made once: indexing costs more than copying
        self.refs: list[torch.Tensor] = []  # the gates themselves, [B, 1, D] each ("ref")
        self.versions: list[int] | None = None  # their version counters, to detect in-place edits
        self.pending = 0  # filled chunk slots not yet reduced

    def hook(self, module, args, g: torch.Tensor) -> None:
        # g: [batch, pos, d_mlp], the post-SiLU gate.
        root = self.root
        if self.hp.flat:  # [batch * pos, d_mlp], tokens flattened inside a MoE block (a shared expert)
            g = g.view(1, *g.shape) if root.implicit else g.view(root.batch, -1, g.shape[-1])
        if root.implicit:
            _check_rank(self.hp, g)
            root.begin(None, None, g.shape[1], g.shape[0], g.device)
        self.calls += 1
        if root.mode == "skip":
            return
        if g.shape[1] != root.pos or self.counts is None:
            self._check(g)
            self._allocate(g)
        if root.mode == "slot":
            if self.buf is not None:
                self.slots[root.slot].copy_(g)  # the one kernel of a decode step
            else:
                self.refs.append(g)  # no kernel: keep the tensor until the chunk is reduced
                if self.versions is not None:
                    self.versions.append(g._version)
            self.pending = root.slot + 1
            if self.pending == root.chunk:
                self.flush()
        elif self.strategy == "step" and g.shape[1] == 1:
            self._reduce_step(g[:, 0], root.valid)
        else:
            self._reduce_dense(g, root.valid)
        if root.calls == 1:  # the prefill: keep what the prompt counted (one copy per generation)
            self.prompt_counts = self.counts.clone()

    def _check(self, g: torch.Tensor) -> None:
        _check_rank(self.hp, g)
        root = self.root
        if g.dim() != 3 or g.shape[1] != root.pos or g.shape[0] != root.batch or g.shape[2] != self.hp.width:
            raise EsnError(
                f"hook point {self.hp.name}: gate of shape {tuple(g.shape)} does not match its stream root "
                f"{root.path!r} (batch {root.batch}, {root.pos} positions, width {self.hp.width})"
            )

    def _allocate(self, g: torch.Tensor) -> None:
        if self.counts is not None:
            return
        b, _, d = g.shape
        self.counts = torch.zeros((b, d), dtype=torch.int32, device=g.device)
        if self.moments:
            self.sums = torch.zeros((b, d), dtype=torch.float64, device=g.device)
            self.sumsq = torch.zeros((b, d), dtype=torch.float64, device=g.device)
        if self.root.chunk and self.strategy == "chunk":
            self.buf = torch.empty((self.root.chunk, b, 1, d), dtype=g.dtype, device=g.device)
            self.slots = list(self.buf.unbind(0))
        if self.strategy == "ref" and not g.is_inference():  # inference tensors have no version counter
            self.versions = []

    def _reduce_step(self, g: torch.Tensor, valid: torch.Tensor | None) -> None:
        # g: [B, D] (one decode position); valid: [B, 1] or None
        pos = g > 0
        self.counts.add_(pos if valid is None else pos & valid)
        if self.moments:
            x = g.double()
            if valid is not None:
                x = torch.where(valid, x, 0.0)
            self.sums.add_(x)
            self.sumsq.addcmul_(x, x)

    def _reduce_dense(self, g: torch.Tensor, valid: torch.Tensor | None, dim: int = 1) -> None:
        # g: [B, P, D] with valid [B, P] (dim=1), or a chunk [S, B, D] with valid [S, B] (dim=0)
        pos = g > 0
        if valid is not None:
            pos &= valid.unsqueeze(-1)
        self.counts.add_(pos.sum(dim, dtype=torch.int32))
        if not self.moments:
            return
        n = g.shape[dim]
        step = max(1, _SLICE_BYTES // max(1, g.numel() // n * 8))
        for start in range(0, n, step):
            x = g.narrow(dim, start, min(step, n - start)).double()
            if valid is not None:
                x = torch.where(valid.narrow(dim, start, x.shape[dim]).unsqueeze(-1), x, 0.0)
            self.sums.add_(x.sum(dim))
            self.sumsq.add_(x.square_().sum(dim))

    def result(self, batch: int) -> tuple[torch.Tensor | None, ...]:
        """``(counts [B, D] int32, tokens [B, 1] int64, sums, sumsq, prompt_counts [B, D], prompt_tokens
        [B, 1])`` on CPU (sums and sumsq None without moments)."""
        if self.calls != self.root.calls and not self.root.implicit:
            raise EsnError(
                f"hook point {self.hp.name} ran in {self.calls} of the {self.root.calls} calls of its stream root "
                f"{self.root.path!r}: the stream spec does not match the model"
            )
        d = self.hp.width
        zero_counts = torch.zeros((batch, d), dtype=torch.int32)
        counts = self.counts.cpu() if self.counts is not None else zero_counts
        tokens = self.root.tokens(batch) if self.root.calls else torch.zeros(batch, dtype=torch.int64)
        prompt_counts = self.prompt_counts.cpu() if self.prompt_counts is not None else zero_counts
        prompt_tokens = self.root.tokens(batch, prompt=True)[:, None]
        if not self.moments:
            return counts, tokens[:, None], None, None, prompt_counts, prompt_tokens
        zero = torch.zeros((batch, d), dtype=torch.float64)
        sums = self.sums.cpu() if self.sums is not None else zero
        sumsq = self.sumsq.cpu() if self.sumsq is not None else zero
        return counts, tokens[:, None], sums, sumsq, prompt_counts, prompt_tokens

    def flush(self) -> None:
        if not self.pending:
            return
        vb = self.root.valid_buf
        valid = None if vb is None else vb[: self.pending]  # [S, B]
        if self.buf is not None:
            self._reduce_dense(self.buf[: self.pending, :, 0], valid, dim=0)
        else:
            if self.versions is not None:
                if any(g._version != v for g, v in zip(self.refs, self.versions, strict=True)):
                    raise EsnError(
                        f"hook point {self.hp.name}: the gate was modified in place after it was recorded "
                        "(by the model or a later hook); use strategy='chunk'"
                    )
                self.versions.clear()
            self._reduce_dense(torch.cat(self.refs, dim=1), None if valid is None else valid.T, dim=1)
            self.refs.clear()
        self.pending = 0


class GateRecorder:
    """Context manager that records per-row gate statistics of everything generated inside it.

    ``target`` is an adapter or :class:`esn.hooks.ModelTarget`. ``streams`` selects hook points
    (default: all). ``positions="generated"`` skips the prefill (prompt) positions; ``"all"`` counts them
    and also keeps their share apart (``prompt_counts``/``prompt_tokens``). ``moments`` adds float64 sums
    and sums of squares. ``strategy`` is ``"chunk"``, ``"ref"`` or ``"step"`` (same counts; see the
    module docstring); ``chunk_steps`` sets the decode chunk length (default: fit a 256 MiB budget).

    Use one recorder per ``generate`` call::

        with GateRecorder(adapter) as rec:
            model.generate(**inputs)
        stats = rec.stats()  # BatchStats, one row per batch row

    An adapter with ``batched = False`` runs its requests one after another, each a generation of its
    own; recording it gives one row per request all the same: every request that its ``generate`` runs
    inside the block is recorded separately (prefill and decode of its own) and becomes the next row.
    """

    def __init__(
        self,
        target: Any,
        *,
        streams: Sequence[str] | None = None,
        positions: Positions = "all",
        moments: bool = True,
        strategy: Strategy = "chunk",
        chunk_steps: int | None = None,
    ):
        if positions not in ("all", "generated"):
            raise EsnError(f"positions must be 'all' or 'generated', got {positions!r}")
        if strategy not in STRATEGIES:
            raise EsnError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if chunk_steps is not None and (not isinstance(chunk_steps, int) or chunk_steps < 1):
            raise EsnError(f"chunk_steps must be a positive integer, got {chunk_steps!r}")
        self.target = target
        self.layout: Layout = target.layout(streams)
        self.positions = positions
        self.moments = moments
        self.strategy = strategy
        self.chunk_steps = chunk_steps
        self._specs = dict(target.stream_specs() or {})
        self._stack: contextlib.ExitStack | None = None
        self._points: list[_Point | RoutedPoint | SubstepPoint] = []
        self._roots: dict[str, _Root] = {}
        self._substeps: dict[str, SubstepRoot] = {}
        self._done = False
        self._rows: list[BatchStats] | None = None  # one per request of a batched = False adapter
        self._options = {"streams": streams, "positions": positions, "moments": moments,
                         "strategy": strategy, "chunk_steps": chunk_steps}

    # -- context -----------------------------------------------------------------------------------
    def __enter__(self) -> GateRecorder:
        if self._stack is not None or self._done:
            raise EsnError("a GateRecorder records one generation: make a new one for the next")
        if _one_request_at_a_time(self.target):
            self._rows = []
            self._stack = contextlib.ExitStack()
            self._stack.enter_context(_generate_wrapped(self.target, self._record_each))
            return self
        self._points, self._roots, self._substeps = [], {}, {}
        forward, pre, seen = [], [], set()
        for hp in self.layout:
            module = self.target.module(hp)
            if id(module) in seen:
                raise EsnError(
                    f"hook point {hp.name}: module {hp.module!r} is shared with another hook point"
                )
            seen.add(id(module))
            root = self._root_for(hp)
            if hp.routed:  # esn.routing: rows mapped to (batch, position, expert) by a pre-hook on the experts
                point = RoutedPoint(hp, root, self.moments, self.strategy)
                routing, (module, _) = recorder_hooks(point, self.target.model)
                pre.append(routing)
            elif isinstance(root, SubstepRoot):
                point = SubstepPoint(hp, root, self.moments)
            else:
                point = _Point(hp, root, self.moments, self.strategy)
            self._points.append(point)
            forward.append((module, point.hook))
        stack = contextlib.ExitStack()
        try:
            model = self.target.model
            roots = [(model.get_submodule(path), self._pre_hook(r)) for path, r in self._roots.items()]
            roots += [(model.get_submodule(path), sub.pre_hook) for path, sub in self._substeps.items()]
            stack.enter_context(installed(roots + pre, kind="pre", with_kwargs=True))
            stack.enter_context(installed(forward))
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        stack, self._stack = self._stack, None
        self._done = True
        stack.close()  # hooks off first, whatever happens below
        if exc_type is None and self._rows is None:
            # Buffers made under generate's inference_mode can only be updated in inference mode.
            with torch.inference_mode():
                for p in self._points:
                    p.flush()

    def _record_each(self, generate: Callable, requests: Sequence, *args: Any, **kwargs: Any) -> list:
        """The adapter's own ``generate``, one request at a time, each under a recorder of its own."""
        results = []
        for request in requests:
            with GateRecorder(self.target, **self._options) as one:
                results += generate([request], *args, **kwargs)
            self._rows.append(one.stats())
        return results

    def _root_for(self, hp: HookPoint) -> _Root | SubstepRoot:
        spec = self._specs.get(hp.stream)
        if spec is None:  # no spec: this hook point is its own root, every position counts
            return _Root(
                hp.name, (), self.positions, lambda b, w=hp.step_width: self._chunk_len(w, b), implicit=True
            )
        substep = next((s for s in getattr(spec, "substeps", ()) if hp.module.startswith(s + ".")), None)
        if spec.root not in self._roots:
            try:
                self.target.model.get_submodule(spec.root)
            except AttributeError:
                raise EsnError(
                    f"stream {hp.stream!r}: root module {spec.root!r} not found in the model"
                ) from None
            width = sum(p.step_width for p in self.layout if self._specs.get(p.stream) == spec)
            chunk_fn = lambda b, w=width: self._chunk_len(w, b)  # noqa: E731
            self._roots[spec.root] = _Root(
                spec.root, spec.stop_token_ids, self.positions, chunk_fn, implicit=False
            )
        root = self._roots[spec.root]
        if substep is None:
            return root
        if substep not in self._substeps:
            try:
                self.target.model.get_submodule(substep)
            except AttributeError:
                raise EsnError(f"stream {hp.stream!r}: substep module {substep!r} not found in the model") from None
            self._substeps[substep] = SubstepRoot(substep, root, root.chunk_fn)
        return self._substeps[substep]

    def _pre_hook(self, root: _Root) -> Callable:
        def pre(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
            embeds = kwargs.get("inputs_embeds")
            x = ids if ids is not None else embeds
            if x is None:
                raise EsnError(f"stream root {root.path!r} received neither input_ids nor inputs_embeds")
            if ids is None and root.calls > 0 and x.shape[0] > 1 and root.stop_ids:
                raise EsnError(
                    f"stream root {root.path!r} decodes from inputs_embeds: stop tokens cannot be seen; "
                    "point the stream spec at a module that receives input_ids"
                )
            root.begin(ids, mask, x.shape[1], x.shape[0], x.device)

        return pre

    def _chunk_len(self, width: int, batch: int) -> int | None:
        """Decode steps per chunk for hook points of total ``width`` at this batch size."""
        if self.strategy == "step":
            return None
        if self.chunk_steps is not None:
            return self.chunk_steps
        try:  # the gates' dtype is the model's (bf16 on accelerators)
            itemsize = next(self.target.model.parameters()).element_size()
        except (StopIteration, AttributeError):
            itemsize = 4
        return max(1, min(MAX_CHUNK_STEPS, CHUNK_BUDGET_BYTES // max(1, batch * width * itemsize)))

    # -- results -----------------------------------------------------------------------------------
    def stats(self) -> BatchStats:
        """Per-row statistics on CPU (call after the ``with`` block)."""
        if self._stack is not None:
            raise EsnError("GateRecorder.stats() is available after the with-block has ended")
        if self._rows is not None:
            if not self._rows:
                raise EsnError(
                    f"nothing was recorded: {type(self.target).__name__} generates one request at a time "
                    "(batched = False), and its rows come from its generate() calls inside the with-block"
                )
            return BatchStats.concat(self._rows)
        batches = {p.root.batch for p in self._points if p.root.batch is not None}
        if not batches:
            raise EsnError(
                f"nothing was recorded: no selected hook point ran (streams {self.layout.streams})"
            )
        if len(batches) > 1:
            raise EsnError(f"hook points saw different batch sizes {sorted(batches)} in one recording")
        batch = batches.pop()
        # per point: (counts [B, W], tokens [B, groups], sums, sumsq, prompt_counts [B, W], prompt_tokens [B, groups])
        parts = [p.result(batch) for p in self._points]
        split = self.positions == "all"
        return BatchStats(
            self.layout,
            torch.cat([part[0] for part in parts], dim=1),
            torch.cat([part[1] for part in parts], dim=1),
            torch.cat([part[2] for part in parts], dim=1) if self.moments else None,
            torch.cat([part[3] for part in parts], dim=1) if self.moments else None,
            self.positions,
            torch.cat([part[4] for part in parts], dim=1) if split else None,
            torch.cat([part[5] for part in parts], dim=1) if split else None,
        )


def _one_request_at_a_time(target: Any) -> bool:
    """An adapter whose generate() runs its requests one by one (``batched = False``), not yet wrapped."""
    generate = getattr(target, "generate", None)
    return getattr(target, "batched", True) is False and callable(generate) and not hasattr(generate, "_esn_each")


@contextlib.contextmanager
def _generate_wrapped(target: Any, each: Callable):
    """Route ``target.generate(requests, ...)`` through ``each(original, requests, ...)`` inside the block."""
    original = target.generate
    had_own = "generate" in vars(target)

    def generate(requests, *args, **kwargs):
        return each(original, requests, *args, **kwargs)

    generate._esn_each = True
    target.generate = generate
    try:
        yield
    finally:
        if had_own:
            target.generate = original
        else:
            del target.generate


def record(target: Any, generate_fn: Callable[[], Any], **options: Any) -> tuple[Any, BatchStats]:
    """Run ``generate_fn()`` under a :class:`GateRecorder`; return its output and the statistics."""
    with GateRecorder(target, **options) as rec:
        out = generate_fn()
    return out, rec.stats()
