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

Statistics stay on the device; hooks never synchronise. On CUDA every reduction runs on a side stream
of the recorder's (``_Lane``), so it overlaps the model's next kernels instead of delaying them; the
inputs it reads are protected (``record_stream``, events) until it has read them. Strategies, same counts:

* ``"chunk"`` (default): each decode step costs one copy kernel per hook point, into a preallocated
  ``[chunk_steps, batch, d_mlp]`` buffer in the gate's own dtype; a full chunk is reduced at once. On
  CUDA the buffer has two halves of ``chunk_steps``: inside ``esn.decode`` the steps fill one while the
  side stream reduces the other.
* ``"ref"``: no kernel at all per decode step: the hook keeps a reference to the gate tensor and the
  chunk is concatenated and reduced when full. Same memory as ``"chunk"``. The gate must not be modified
  in place after the hook (checked through the tensor's version counter, except under inference_mode).
* ``"step"``: the straightforward per-step reduction (compare, mask, add; more with moments).

Float accumulation order (sums only; counts and tokens are exact): every gate value is exact in float64,
and so is its square. A prefill's positions, or a chunk's decode steps (``"chunk"``, ``"ref"``), are added
one after another to a partial sum, which is added to the running float64 total (``esn.gate_reduce``: a
Triton kernel on CUDA, torch ops elsewhere, the same bits); ``"step"`` adds every step to the total.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from esn import gate_reduce
from esn.errors import EsnError
from esn.fused import injected
from esn.gate_reduce import reduce_gates
from esn.hookpoints import HookPoint, Layout
from esn.hooks import installed
from esn.indexed import IndexedPoint, index_module
from esn.routing import RoutedPoint, recorder_hooks
from esn.substeps import SubstepPoint, SubstepRoot

Positions = Literal["all", "generated"]
Strategy = Literal["chunk", "ref", "step"]
STRATEGIES: tuple[str, ...] = ("chunk", "ref", "step")
# Decode-chunk buffers of all hook points together stay under this many bytes (chunk_steps=None).
CHUNK_BUDGET_BYTES = 256 * 2**20
MAX_CHUNK_STEPS = 64


class _Lane:
    """Where a recorder's reductions run: with ``overlap`` on CUDA a side stream, so they overlap the model's
    own kernels; and how many chunks a decode-chunk buffer holds (``halves``: 2 with ``overlap``, so
    decode steps fill one while the other is reduced).

    ``run(*inputs)`` is a context: the side stream first waits for what the current stream has queued (so
    it reads finished gates), then runs the block; ``inputs`` (tensors made on the current stream) are
    marked as used by it, so the allocator does not hand their memory out before it has read them.
    ``join()`` makes the current stream wait for every reduction issued so far. Without a stream (CPU, or
    ``overlap=False``) both do nothing and reductions run in order on the current stream.
    """

    def __init__(self, overlap: bool | None) -> None:
        self.overlap = overlap  # None: on CUDA
        self.stream: torch.cuda.Stream | None = None
        self.halves = 1

    def attach(self, device: torch.device) -> None:
        on = device.type == "cuda" if self.overlap is None else self.overlap
        self.halves = 2 if on else 1
        if on and device.type == "cuda" and self.stream is None:
            self.stream = torch.cuda.Stream(device)

    @property
    def overlaps(self) -> bool:
        return self.stream is not None

    @contextlib.contextmanager
    def run(self, *inputs: torch.Tensor | None):
        if self.stream is None:
            yield
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            yield
        for t in inputs:
            if t is not None:
                t.record_stream(self.stream)

    def event(self) -> torch.cuda.Event | None:
        """An event after the reductions issued so far (None on CPU)."""
        if self.stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    def join(self) -> None:
        if self.stream is not None:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)


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
        if len(parts) == 1:  # nothing to stack: no copy of a batch's (large) statistics
            return first
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
        chunk_fn: Callable[[int, int], int | None],
        implicit: bool,
        lane: _Lane,
    ):
        self.path = path
        self.lane = lane  # the recorder's: where reductions run
        self.stop_ids = tuple(int(i) for i in stop_ids)
        self.positions = positions
        self.chunk_fn = chunk_fn  # (batch, halves) -> decode steps per chunk (chunk strategy), or None
        self.chunk: int | None = None
        self.halves = 1  # chunk buffers hold this many chunks: 2 with overlap (fill one, reduce the other)
        self.freed: list[torch.cuda.Event | None] = []  # per half: its last reduction has read it
        self.implicit = implicit  # no spec: driven by the hook point itself, every position real
        self.stream = ""  # the stream whose spec (or, implicit, whose hook point) this is: for messages
        self.decoded = False  # a one-position call has run since the prefill
        self.calls = 0
        self.batch: int | None = None
        self.mode = "skip"  # this call: "skip" | "dense" (reduce now) | "slot" (chunk buffer)
        self.pos = 0  # positions in this call
        self.valid: torch.Tensor | None = None  # [B, pos] bool for "dense"; None = all real
        self.slot = -1  # chunk slot of this decode step
        self.valid_buf: torch.Tensor | None = None  # [halves * chunk, B] bool, per decode slot
        self._valid_slots: list[torch.Tensor] | None = None  # its [B] rows: made once, when eager decoding needs them
        self.finished: torch.Tensor | None = None  # [B] bool: row has fed a stop token
        self.stop: torch.Tensor | None = None
        self.masked_decode = False  # decode validity tracked on the device (B > 1 and stop ids)
        self.tokens_dev: torch.Tensor | None = None  # [B] int64, positions counted under a mask
        self.tokens_all = 0  # positions counted in calls where every row was real
        self.prompt: tuple[int, torch.Tensor | None] = (0, None)  # (tokens_all, tokens_dev) after the prefill
        self.followers: list[SubstepRoot] = []  # substeps (esn.substeps): told each step's real rows [B]
        # Graph-aware decode (esn.decode): set from decode_begin to decode_end.
        self.engine: Any = None  # the decoder's DecodeState: its step counter and "running" flag
        self.points: list[Any] = []  # what this root flushes: its _Point, RoutedPoint and SubstepRoot objects
        self.slot_dev: torch.Tensor | None = None  # [1] int64: this step's slot (step % (halves * chunk))
        self.valid_col: torch.Tensor | None = None  # [B, 1] bool: this step's real rows ("step" strategy)
        self.base_calls = 0
        self._totals: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # stats(): per (batch, device)

    @property
    def valid_slots(self) -> list[torch.Tensor]:
        """``valid_buf``'s rows as ``[B]`` views, for eager decode steps (indexing a step costs more than
        writing into a view made once). Made on first use: graph decoding never needs them."""
        if self._valid_slots is None:
            self._valid_slots = list(self.valid_buf.unbind(0))
        return self._valid_slots

    def tokens(self, batch: int, device=None, *, prompt: bool = False) -> torch.Tensor:
        """``[B]`` int64 on ``device`` (CPU by default): positions counted per row (``prompt=True``: in the
        prefill only)."""
        every, dev = self.prompt if prompt else (self.tokens_all, self.tokens_dev)
        if dev is None:
            return torch.full((batch,), every, dtype=torch.int64, device=device)
        return dev.to(device) + every

    def totals(self, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens [B, 1], prompt_tokens [B, 1])`` int64 on ``device``, made once for all the root's hook
        points (call when recording has ended: they are kept)."""
        key = (batch, str(device))
        if key not in self._totals:
            tokens = (self.tokens(batch, device) if self.calls
                      else torch.zeros(batch, dtype=torch.int64, device=device))
            self._totals[key] = tokens[:, None], self.tokens(batch, device, prompt=True)[:, None]
        return self._totals[key]

    def begin(self, input_ids: torch.Tensor | None, mask: Any, pos: int, batch: int, device) -> None:
        """Decide this call's real positions. Only shapes are inspected on the host: no sync."""
        if self.engine is not None:  # a step inside esn.decode: device-side bookkeeping only
            self.pos = pos
            self._step_on_device(input_ids)
            return
        prefill = self.calls == 0
        self.calls += 1
        if prefill:
            self.batch = batch
            self.lane.attach(torch.device(device))
            self.halves = self.lane.halves
            self.freed = [None] * self.halves
            self.chunk = self.chunk_fn(batch, self.halves)
            self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
            self.masked_decode = batch > 1 and bool(self.stop_ids) and not self.implicit
            if self.masked_decode:
                self.stop = torch.tensor(self.stop_ids, dtype=torch.long, device=device)
        elif batch != self.batch:
            raise EsnError(
                f"stream root {self.path!r} was called with batch {batch} after batch {self.batch}: "
                "use one GateRecorder per generate call"
            )
        elif pos > 1 and (self.decoded or (isinstance(mask, torch.Tensor) and mask.dim() == 2
                                           and mask.shape[-1] == pos)):
            raise EsnError(self._second_prefill(pos))
        self.decoded = self.decoded or (self.calls > 1 and pos == 1)
        self.pos = pos
        if prefill:
            self.mode = "skip" if self.positions == "generated" else "dense"
            self.valid = None if self.implicit else _prefill_valid(mask, pos, self.path, self.batch, self.stream)
        elif not self.masked_decode:
            self.valid = None
            self.mode = "slot" if (self.chunk and pos == 1) else "dense"
        else:
            # A row that has fed a stop token (now or earlier) is padding from this position on.
            if pos == 1 and self.chunk:  # the hot path: a few kernels per step, no indexing but one
                self.mode = "slot"
                self.slot = self.slot + 1 if self.slot + 1 < self.chunk else 0
                if self.valid_buf is None:
                    self._allocate_valid(device)
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

    def _second_prefill(self, pos: int) -> str:
        """Why a call of ``pos`` positions after the prefill (a new prefill, not a decode step) is refused."""
        where = (f"hook point {self.path} (stream {self.stream!r} has no stream spec, so each hook point "
                 "counts its own calls)") if self.implicit else f"stream {self.stream!r}: root {self.path!r}"
        return (f"{where} ran a second prefill ({pos} positions) after its first (or generated without a KV "
                "cache): positions would be miscounted and the prompt split wrong. If this module runs a "
                "sub-generation per step of another decoder (a depth decoder or code predictor, once per frame), "
                "declare it in that stream's spec: StreamSpec(root=<the decoder whose steps run it>, "
                "substeps=(<this sub-model's path>,), substep_positions=<its positions per step>); otherwise use "
                "one GateRecorder per generate call, with use_cache=True")

    def _tell(self, rows: torch.Tensor | None) -> None:
        for follow in self.followers:  # substeps that ran before this step belong to it
            follow.on_root_step(rows)

    def _count(self, valid: torch.Tensor | None) -> None:
        if valid is None:
            self.tokens_all += self.pos
            return
        n = valid.sum(-1) if valid.dim() == 2 else valid
        if self.tokens_dev is None:
            self.tokens_dev = torch.zeros(self.batch, dtype=torch.int64, device=n.device)
        self.tokens_dev.add_(n)

    # -- graph-aware decode (esn.decode) ------------------------------------------------------------
    # Inside a decoder every step may be a CUDA-graph replay, which runs no Python: the chunk slot, the
    # "finished" flags and the token counts live on the device, written in place at static addresses;
    # the host flushes full chunks between steps (decode_step) and the rest at the end (decode_end).
    # A row is real at a step if it has not fed a stop token and the step is one generate would run
    # (state.running): the few steps a decoder runs past the end count nowhere.

    def decode_begin(self, state: Any, points: list[Any]) -> None:
        if self.calls == 0:
            raise EsnError(f"stream root {self.path!r}: decoding began before its prefill ran through the root")
        if state.batch != self.batch:
            raise EsnError(f"stream root {self.path!r}: decoding batch {state.batch} after a prefill of batch {self.batch}")
        device = state.device
        self.engine, self.points, self.base_calls = state, points, self.calls
        for p in points:
            p.decode_begin(state)
        if self.stop is None and self.stop_ids and not self.implicit:  # tracked at batch 1 too: steps past the end
            self.stop = torch.tensor(self.stop_ids, dtype=torch.long, device=device)
        if self.tokens_dev is None:
            self.tokens_dev = torch.zeros(self.batch, dtype=torch.int64, device=device)
        if self.chunk:
            if self.valid_buf is None:
                self._allocate_valid(device)
            self.slot_dev = torch.zeros(1, dtype=torch.long, device=device)
        else:
            self.valid_col = torch.empty((self.batch, 1), dtype=torch.bool, device=device)
            self.lane.join()  # "step" accumulates inside the step, on the current stream: after the prefill's

    def _allocate_valid(self, device) -> None:
        self.valid_buf = torch.empty((self.halves * self.chunk, self.batch), dtype=torch.bool, device=device)
        self._valid_slots = None

    def _step_on_device(self, input_ids: torch.Tensor | None) -> None:
        s = self.engine
        if self.stop is not None and input_ids is not None:
            torch.logical_or(self.finished, (input_ids[:, -1:] == self.stop).any(-1), out=self.finished)
        valid = torch.logical_and(torch.logical_not(self.finished), s.running)  # [B]
        for follow in self.followers:  # substeps that ran in this step, before the root
            follow.on_root_step_device(valid)
        if self.chunk:
            self.mode = "slot"
            torch.remainder(s.step, self.halves * self.chunk, out=self.slot_dev)
            self.valid_buf.index_copy_(0, self.slot_dev, valid.unsqueeze(0))
        else:
            self.mode = "step"
            self.valid_col.copy_(valid.unsqueeze(1))
        self.tokens_dev.add_(valid)

    def decode_step(self, done: int) -> None:
        if not self.chunk or done % self.chunk:
            return
        half = (done // self.chunk - 1) % self.halves  # the half the last `chunk` steps filled
        self._flush_half(half, self.chunk)
        # The next steps overwrite the other half: not before its last reduction has read it (long done).
        nxt = self.freed[(half + 1) % self.halves]
        if nxt is not None and self.lane.stream is not None:
            torch.cuda.current_stream(self.lane.stream.device).wait_event(nxt)

    def _flush_half(self, half: int, steps: int) -> None:
        start = half * self.chunk
        valid = self.valid_buf[start : start + steps]  # [S, B]
        with self.lane.run():  # one wait for the reductions of every hook point
            for p in self.points:
                p.reduce_chunk(start, steps, valid)
        self.freed[half] = self.lane.event()

    def decode_end(self, done: int) -> None:
        rest = done % self.chunk if self.chunk else 0
        if rest:
            self._flush_half((done // self.chunk) % self.halves, rest)
        for p in self.points:
            p.decode_end(done)  # the hooks ran once per capture, not once per replay
        self.calls = self.base_calls + done
        self.decoded = self.decoded or done > 0
        self.engine, self.points = None, []

    @property
    def graph_key(self) -> tuple:
        return ("esn.recorder.root", self.batch, self.chunk, self.halves, 0 if self.stop is None else len(self.stop_ids))

    def graph_state(self) -> tuple:
        return (self.finished, self.stop, self.tokens_dev, self.valid_buf, self.slot_dev, self.valid_col)

    def graph_adopt(self, state: tuple) -> None:
        finished, stop, tokens_dev, self.valid_buf, self.slot_dev, self.valid_col = state
        self.finished = finished.copy_(self.finished)
        self.tokens_dev = tokens_dev.copy_(self.tokens_dev)
        if stop is not None:
            self.stop = stop.copy_(self.stop)
        self._valid_slots = None


def _prefill_valid(mask: Any, pos: int, root: str, batch: int = 2, stream: str = "") -> torch.Tensor | None:
    """``[B, pos]`` bool: the prefill's real positions, from the 2-D mask (None: all real). A batch of one row
    has no padding, whatever mask form it gets (transformers 5 hands inner models 4-D masks or None)."""
    if mask is None or batch == 1:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise EsnError(
            f"stream {stream!r}: root {root!r} received an attention_mask of shape {shape} in a prefill of "
            f"batch {batch}; recording needs the 2-D [batch, positions] mask to tell padding apart: point the "
            "StreamSpec's root at the module that receives the 2-D mask (the model around the layers, not a "
            "layer), and use a dynamic KV cache, not a static one"
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
        # "chunk": decode steps go into buf [halves * chunk, B, 1, D] in the gate's dtype. It is made when a
        # step first writes it: a graph replay writes the buffer of the graph it replays (graph_adopt).
        self.chunked = False
        self.buf_spec: tuple | None = None  # (shape, dtype, device) of buf
        self.buf: torch.Tensor | None = None
        self._slots: list[torch.Tensor] | None = None  # buf's [B, 1, D] views, for eager steps
        self.refs: list[torch.Tensor] = []  # the gates themselves, [B, 1, D] each ("ref")
        self.versions: list[int] | None = None  # their version counters, to detect in-place edits
        self.pending = 0  # filled chunk slots not yet reduced
        self.base_calls = 0
        self.decode_listener: Any = None  # the GateRecorder (esn.decode tells it about steps)

    def __call__(self, module, args, g: torch.Tensor) -> None:
        # g: [batch, pos, d_mlp], the post-SiLU gate.
        root = self.root
        if self.hp.flat:  # [batch * pos, d_mlp], tokens flattened inside a MoE block (a shared expert)
            g = g.view(1, *g.shape) if root.implicit else g.view(root.batch, -1, g.shape[-1])
        if root.implicit:
            _check_rank(self.hp, g)
            root.begin(None, None, g.shape[1], g.shape[0], g.device)
        self.calls += 1
        if g.shape[1] != root.pos or self.counts is None:
            self._check(g)
            self._allocate(g)  # also when skipped: a graph-aware decode needs the buffers before its steps
        if root.mode == "skip":
            return
        if root.engine is not None:  # a step inside esn.decode (maybe captured): no host-side state
            if self.chunked:
                self._buffer().index_copy_(0, root.slot_dev, g.unsqueeze(0))  # [S, B, 1, D] <- [1, B, 1, D]
            else:
                self._reduce_step(g[:, 0], root.valid_col)
            return
        if root.mode == "slot":
            if self.chunked:
                self.slots[root.slot].copy_(g)  # the one kernel of a decode step
            else:
                self.refs.append(g)  # no kernel: keep the tensor until the chunk is reduced
                if self.versions is not None:
                    self.versions.append(g._version)
            self.pending = root.slot + 1
            if self.pending == root.chunk:
                self.flush()
                root.lane.join()  # the next step overwrites the slots just reduced
        elif self.strategy == "step" and g.shape[1] == 1:
            root.lane.join()  # per-step sums on the current stream, after the lane's earlier ones
            self._reduce_step(g[:, 0], root.valid)
        elif root.lane.overlaps and not gate_reduce.kernel_available():
            # torch ops cost ~50 bytes per gate value: the lane reduces them in parallel, from a private copy
            # (padding zeroed in g's dtype, exact) made here in stream order, so that an in-place edit of g
            # by a later hook cannot race it. The kernel reads g once: it runs here, in order.
            g = g.clone() if root.valid is None else torch.where(root.valid.unsqueeze(-1), g, 0)
            with root.lane.run(g):
                self._reduce_dense(g, None)
                self._keep_prompt()  # in the lane's order, after its reduction
            return
        else:
            self._reduce_dense(g, root.valid)
        self._keep_prompt()

    def _keep_prompt(self) -> None:
        if self.root.calls == 1:  # the prefill: keep what the prompt counted (one copy per generation)
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
            self.chunked = True
            self.buf_spec = ((self.root.halves * self.root.chunk, b, 1, d), g.dtype, g.device)
        if self.strategy == "ref" and not g.is_inference():  # inference tensors have no version counter
            self.versions = []

    def _buffer(self) -> torch.Tensor:
        """The decode-chunk buffer, made on first use."""
        if self.buf is None:
            shape, dtype, device = self.buf_spec
            self.buf = torch.empty(shape, dtype=dtype, device=device)
        return self.buf

    @property
    def slots(self) -> list[torch.Tensor]:
        """The buffer's ``[B, 1, D]`` views, one per slot, made on first use (eager decoding): a step copies
        into a view made once, which costs less than indexing. Graph decoding never needs them."""
        if self._slots is None:
            self._slots = list(self._buffer().unbind(0))
        return self._slots

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
        reduce_gates(g, valid, dim, self.counts, self.sums, self.sumsq)

    def result(self, batch: int) -> tuple[torch.Tensor | None, ...]:
        """``(counts [B, D] int32, tokens [B, 1] int64, sums, sumsq, prompt_counts [B, D], prompt_tokens
        [B, 1])`` on the statistics' device (sums and sumsq None without moments); call after ``join``."""
        if self.calls != self.root.calls and not self.root.implicit:
            raise EsnError(
                f"hook point {self.hp.name} ran in {self.calls} of the {self.root.calls} calls of its stream root "
                f"{self.root.path!r}: the stream spec does not match the model"
            )
        d = self.hp.width
        device = self.counts.device if self.counts is not None else None

        def zeros(dtype: torch.dtype) -> torch.Tensor:  # a hook point that never ran counted nothing
            return torch.zeros((batch, d), dtype=dtype, device=device)

        tokens, prompt_tokens = self.root.totals(batch, device)
        counts = self.counts if self.counts is not None else zeros(torch.int32)
        prompt_counts = self.prompt_counts if self.prompt_counts is not None else zeros(torch.int32)
        if not self.moments:
            return counts, tokens, None, None, prompt_counts, prompt_tokens
        sums = self.sums if self.sums is not None else zeros(torch.float64)
        sumsq = self.sumsq if self.sumsq is not None else zeros(torch.float64)
        return counts, tokens, sums, sumsq, prompt_counts, prompt_tokens

    def flush(self, start: int = 0) -> None:
        """Reduce the ``pending`` chunk slots from ``start`` (on the lane; the caller orders reuse)."""
        if not self.pending:
            return
        vb = self.root.valid_buf
        valid = None if vb is None else vb[start : start + self.pending]  # [S, B]
        if self.chunked:
            with self.root.lane.run():
                self.reduce_chunk(start, self.pending, valid)
        else:
            if self.versions is not None:
                if any(g._version != v for g, v in zip(self.refs, self.versions, strict=True)):
                    raise EsnError(
                        f"hook point {self.hp.name}: the gate was modified in place after it was recorded "
                        "(by the model or a later hook); use strategy='chunk'"
                    )
                self.versions.clear()
            with self.root.lane.run(*self.refs):
                self._reduce_dense(torch.cat(self.refs, dim=1), None if valid is None else valid.T, dim=1)
            self.refs.clear()
        self.pending = 0

    def reduce_chunk(self, start: int, steps: int, valid: torch.Tensor | None) -> None:
        """Reduce chunk slots ``start`` to ``start + steps`` (``valid`` ``[steps, B]``), where the caller runs it."""
        self._reduce_dense(self._buffer()[start : start + steps, :, 0], valid, dim=0)

    def decode_begin(self, state: Any) -> None:
        """A decoder starts stepping (see _Root)."""
        self.base_calls = self.calls

    def decode_end(self, done: int) -> None:
        """The decoder ran ``done`` steps; the hook ran once per step (a replay runs no Python)."""
        self.calls = self.base_calls + done

    # -- graph-aware decode (esn.decode): see _Root ---------------------------------------------------
    @property
    def graph_key(self) -> tuple:
        kind = ("chunk", self.buf_spec[0], str(self.buf_spec[1])) if self.chunked else ("step", self.moments)
        implicit = self.root.graph_key if self.root.implicit else None  # its per-step work runs in this hook
        return ("esn.recorder.point", self.hp.width, kind, implicit)

    def graph_state(self) -> tuple:
        own = (self._buffer(),) if self.chunked else (self.counts, self.sums, self.sumsq)
        return own, (self.root.graph_state() if self.root.implicit else None)

    def graph_adopt(self, state: tuple) -> None:
        own, root_state = state
        if self.chunked:  # the captured graph's buffer: this recording's was never made
            (self.buf,) = own
            self._slots = None
        else:  # "step" accumulates inside the step: carry this recording's prefill totals over
            counts, sums, sumsq = own
            self.counts = counts.copy_(self.counts)
            if sums is not None:
                self.sums, self.sumsq = sums.copy_(self.sums), sumsq.copy_(self.sumsq)
        if root_state is not None:
            self.root.graph_adopt(root_state)


class _RootHook:
    """Forward pre-hook on a stream root: tells its ``_Root`` what this call feeds (shapes only, no sync)."""

    def __init__(self, root: _Root, recorder: GateRecorder):
        self.root = root
        self.decode_listener = recorder

    def __call__(self, module, args, kwargs) -> None:
        root = self.root
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        embeds = kwargs.get("inputs_embeds")
        if not isinstance(ids, torch.Tensor) or ids.numel() == 0:
            ids = None  # an empty [B, 0] placeholder beside inputs_embeds is no input
        x = embeds if isinstance(embeds, torch.Tensor) else ids  # embeds are [batch, positions, hidden]
        if x is None:
            raise EsnError(f"stream {root.stream!r}: root {root.path!r} received neither input_ids nor "
                           "inputs_embeds; point the StreamSpec's root at the module that receives them")
        if ids is not None and ids.dim() != 2 and root.stop_ids and (x.shape[0] > 1 or root.engine is not None):
            raise EsnError(
                f"stream {root.stream!r}: root {root.path!r} receives input_ids of shape {tuple(ids.shape)} "
                "(several codes per position), and stop_token_ids are matched against 2-D [batch, positions] "
                "ids: point the StreamSpec's root at a module that receives the 2-D token ids, or record batch 1 "
                "without stop_token_ids (a solo run stops when it stops)"
            )
        if ids is None and root.calls > 0 and x.shape[0] > 1 and root.stop_ids:
            raise EsnError(
                f"stream {root.stream!r}: root {root.path!r} decodes from inputs_embeds: stop tokens cannot be "
                "seen; point the stream spec at a module that receives input_ids"
            )
        root.begin(ids, mask, x.shape[1], x.shape[0], x.device)

    # graph-aware decode (esn.decode): the root's per-step work is captured with this hook
    @property
    def graph_key(self) -> tuple:
        return self.root.graph_key

    def graph_state(self) -> tuple:
        return self.root.graph_state()

    def graph_adopt(self, state: tuple) -> None:
        self.root.graph_adopt(state)


class GateRecorder:
    """Context manager that records per-row gate statistics of everything generated inside it.

    ``target`` is an adapter or :class:`esn.hooks.ModelTarget`. ``streams`` selects hook points
    (default: all). ``positions="generated"`` skips the prefill (prompt) positions; ``"all"`` counts them
    and also keeps their share apart (``prompt_counts``/``prompt_tokens``). ``moments`` adds float64 sums
    and sums of squares. ``strategy`` is ``"chunk"``, ``"ref"`` or ``"step"`` (same counts; see the
    module docstring); ``chunk_steps`` sets the decode chunk length (default: fit a 256 MiB budget).
    ``overlap`` (default: on CUDA) reduces on a side stream, overlapping the model, with decode-chunk
    buffers of two halves (the budget covers both); ``False`` reduces in order on the current stream. The
    statistics are the same either way, bit for bit.

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
        overlap: bool | None = None,
    ):
        if positions not in ("all", "generated"):
            raise EsnError(f"positions must be 'all' or 'generated', got {positions!r}")
        if strategy not in STRATEGIES:
            raise EsnError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if chunk_steps is not None and (not isinstance(chunk_steps, int) or chunk_steps < 1):
            raise EsnError(f"chunk_steps must be a positive integer, got {chunk_steps!r}")
        if overlap not in (None, True, False):
            raise EsnError(f"overlap must be True, False or None (on CUDA), got {overlap!r}")
        self.target = target
        self.layout: Layout = target.layout(streams)
        self.positions = positions
        self.moments = moments
        self.strategy = strategy
        self.chunk_steps = chunk_steps
        self._specs = dict(target.stream_specs() or {})
        self._stack: contextlib.ExitStack | None = None
        self._points: list[_Point | RoutedPoint | SubstepPoint | IndexedPoint] = []
        self._homes: list[Any] = []  # per point: the module whose presence in a decoded scope decode_begin checks
        self._roots: dict[str, _Root] = {}
        self._substeps: dict[str, SubstepRoot] = {}
        self._decoding: list[_Root] = []
        self._lane = _Lane(overlap)  # where reductions run (a side stream on CUDA)
        self._done = False
        self._rows: list[BatchStats] | None = None  # one per request of a batched = False adapter
        self._options = {"streams": streams, "positions": positions, "moments": moments,
                         "strategy": strategy, "chunk_steps": chunk_steps, "overlap": overlap}

    # -- context -----------------------------------------------------------------------------------
    def __enter__(self) -> GateRecorder:
        if self._stack is not None or self._done:
            raise EsnError("a GateRecorder records one generation: make a new one for the next")
        if _one_request_at_a_time(self.target):
            self._rows = []
            self._stack = contextlib.ExitStack()
            self._stack.enter_context(_generate_wrapped(self.target, self._record_each))
            return self
        inject = contextlib.ExitStack()  # esn.fused: identity modules for gates computed inside a forward
        inject.enter_context(injected(self.target.model, self.layout))
        try:
            return self._install(inject)
        except BaseException:
            inject.close()
            raise

    def _install(self, inject: contextlib.ExitStack) -> GateRecorder:
        self._points, self._homes, self._roots, self._substeps = [], [], {}, {}
        forward, pre, seen = [], [], set()
        for hp in self.layout:
            module = self.target.module(hp)
            if id(module) in seen:
                raise EsnError(
                    f"hook point {hp.name}: module {hp.module!r} is shared with another hook point"
                )
            seen.add(id(module))
            home = module
            root = None if hp.indexed else self._root_for(hp)
            if hp.indexed:  # esn.indexed: each position counted in its index's group
                point = IndexedPoint(hp, self.moments, self._specs.get(hp.stream))
                pre.append((index_module(self.target.model, hp), point.pre_hook))
                hook, root = point, point.root
            elif hp.routed:  # esn.routing: rows mapped to (batch, position, expert) by a pre-hook on the experts
                point = RoutedPoint(hp, root, self.moments, self.strategy)
                routing, (module, hook) = recorder_hooks(point, self.target.model)
                pre.append(routing)
            elif isinstance(root, SubstepRoot):
                point = SubstepPoint(hp, root, self.moments)
                hook = point  # graph-aware (esn.decode)
            else:
                point = _Point(hp, root, self.moments, self.strategy)
                point.decode_listener = self
                hook = point  # the object itself: graph-aware (esn.decode reads its graph_key)
            self._points.append(point)
            self._homes.append(home if root.implicit else root.path)
            forward.append((module, hook))
        stack = contextlib.ExitStack()
        stack.enter_context(inject)  # closed last: after every hook is off
        try:
            model = self.target.model
            modules = {path: model.get_submodule(path) for path in [*self._roots, *self._substeps]}
            self._homes = [modules[h] if isinstance(h, str) else h for h in self._homes]
            roots = [(modules[path], _RootHook(r, self)) for path, r in self._roots.items()]
            roots += [(modules[path], sub) for path, sub in self._substeps.items()]  # graph-aware
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
        try:
            stack.close()  # hooks off first, whatever happens below
            if exc_type is None and self._rows is None:
                # Buffers made under generate's inference_mode can only be updated in inference mode.
                with torch.inference_mode():
                    for p in self._points:
                        p.flush()
        finally:
            # Later work on the current stream (which may reuse the statistics' memory) comes after the lane's.
            self._lane.join()

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
            root = _Root(
                hp.name, (), self.positions, lambda b, h=1, w=hp.step_width: self._chunk_len(w, b, h), implicit=True,
                lane=self._lane,
            )
            root.stream = hp.stream
            return root
        substep = spec.substep_of(hp.module)
        if spec.root not in self._roots:
            try:
                self.target.model.get_submodule(spec.root)
            except AttributeError:
                raise EsnError(
                    f"stream {hp.stream!r}: root module {spec.root!r} not found in the model"
                ) from None
            # gate values one decode step buffers: a substep point holds all its positions of the step
            width = sum(p.step_width * (spec.substep_positions if spec.substep_of(p.module) else 1)
                        for p in self.layout if self._specs.get(p.stream) == spec)
            chunk_fn = lambda b, h=1, w=width: self._chunk_len(w, b, h)  # noqa: E731
            self._roots[spec.root] = _Root(
                spec.root, spec.stop_token_ids, self.positions, chunk_fn, implicit=False, lane=self._lane
            )
            self._roots[spec.root].stream = hp.stream
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

    def _chunk_len(self, width: int, batch: int, halves: int = 1) -> int | None:
        """Decode steps per chunk for hook points of total ``width`` at this batch size (a buffer holds
        ``halves`` chunks; the budget covers all of them)."""
        if self.strategy == "step":
            return None
        if self.chunk_steps is not None:
            return self.chunk_steps
        try:  # the gates' dtype is the model's (bf16 on accelerators)
            itemsize = next(self.target.model.parameters()).element_size()
        except (StopIteration, AttributeError):
            itemsize = 4
        halves = halves if self.strategy == "chunk" else 1
        return max(1, min(MAX_CHUNK_STEPS, CHUNK_BUDGET_BYTES // max(1, halves * batch * width * itemsize)))

    # -- graph-aware decode (esn.decode calls these; see _Root) ------------------------------------
    def decode_begin(self, state: Any) -> None:
        """A decoder starts stepping ``state.scope``: its roots switch to device-side bookkeeping."""
        if self.strategy == "ref":
            raise EsnError(
                "GateRecorder strategy 'ref' keeps references to gate tensors, which a captured decode step "
                "overwrites; use strategy 'chunk' or 'step' (or decode eagerly)"
            )
        by_root: dict[int, tuple[_Root, list[Any]]] = {}
        for p, home in zip(self._points, self._homes, strict=True):
            if not state.holds(home):
                continue
            if isinstance(p, SubstepPoint):  # runs in decode steps only: its substep root is flushed as one
                root, item = p.root.parent, p.root
            else:
                if p.counts is None:
                    raise EsnError(f"hook point {p.hp.name} did not run in the prefill of the decoded stream")
                root, item = p.root, p
            points = by_root.setdefault(id(root), (root, []))[1]
            if item not in points:
                points.append(item)
        self._decoding = [root for root, _ in by_root.values()]
        for root, points in by_root.values():
            root.decode_begin(state, points)

    def decode_step(self, done: int) -> None:
        """``done`` decode steps have run: reduce the chunks they filled (on the side stream)."""
        for root in self._decoding:
            root.decode_step(done)

    def decode_end(self, done: int) -> None:
        """Decoding stopped after ``done`` steps: reduce the part-filled chunk, count the hooks' calls."""
        decoding, self._decoding = self._decoding, []
        for root in decoding:
            root.decode_end(done)

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
        self._lane.join()  # the side stream's reductions are done (on the device) before anything reads them
        # per point: (counts [B, W], tokens [B, groups], sums, sumsq, prompt_counts [B, W], prompt_tokens [B, groups])
        parts = [p.result(batch) for p in self._points]
        names = ["counts", "tokens"] + (["sums", "sumsq"] if self.moments else [])
        names += ["prompt_counts", "prompt_tokens"] if self.positions == "all" else []
        index = {"counts": 0, "tokens": 1, "sums": 2, "sumsq": 3, "prompt_counts": 4, "prompt_tokens": 5}
        columns = [[part[index[n]] for part in parts] for n in names]
        devices = {t.device for column in columns for t in column}
        if len(devices) > 1:  # a point that never ran gives CPU zeros: move those (small) to the device
            device = next(d for d in devices if d.type != "cpu")
            columns = [[t.to(device) for t in column] for column in columns]
        # concatenated where they are, then one transfer per statistic (not one per hook point)
        host = dict(zip(names, _to_host([torch.cat(column, dim=1) for column in columns]), strict=True))
        return BatchStats(self.layout, host["counts"], host["tokens"], host.get("sums"), host.get("sumsq"),
                          self.positions, host.get("prompt_counts"), host.get("prompt_tokens"))

def _to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors on the CPU. From CUDA through page-locked memory, copied asynchronously, one wait for all:
    a copy to ordinary (pageable) memory is staged by the driver and ran at ~1.3 GB/s on an H200 host,
    0.24 s for a batch of 16's statistics. The page-locked blocks come from torch's caching host allocator,
    so later batches reuse them once the earlier statistics are freed."""
    if not tensors or tensors[0].device.type != "cuda":
        return [t.cpu() for t in tensors]
    host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for h, t in zip(host, tensors, strict=True):
        h.copy_(t, non_blocking=True)
    torch.cuda.current_stream(tensors[0].device).synchronize()
    return host


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
