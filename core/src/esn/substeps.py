"""Recording hook points of a *substep* decoder: a model run inside every decode step of a stream root.

Qwen3-Omni's talker, before each of its decode steps, runs a small generate of its code predictor on the
token it is about to feed (one 2-position prefill and ``num_code_groups - 2`` one-position steps) to add
the residual code groups. Those positions belong to the talker's step: in a batch, a row whose talker
has already fed its stop token still runs through the code predictor, and a solo run would not have.
The substep's own inputs cannot tell (it decodes from embeddings), and the talker decides a step's
validity only in its forward pre-hook, which runs after the code predictor. So a substep's gates are
buffered (one copy per hook point and forward, ``[Q, B, d]``) and their validity is written when the
root's next step begins; buffered positions are reduced in bulk, every ``chunk`` root steps (the root's
decode chunk; every step with the ``step`` strategy), through ``esn.gate_reduce``.

Inside ``esn.decode`` the substep's forwards per root step are fixed (Qwen3-Omni: 16 positions in 15
forwards), so each forward ``f`` has a buffer ``[S, pos_f, B, d]`` written at the slot ``state.step % S``
on the device, and the root flushes them with its own chunk (validity: the root step's real rows). The
reductions group positions exactly as the eager path does, so the statistics are the same bits.

A stream declares substeps in its :class:`~esn.adapters.StreamSpec` (``substeps=("talker.code_predictor",)``);
hook points whose module lies under one are recorded here. Their positions are counted in decode steps
of the root only, so ``positions="generated"`` counts them all.
"""

from __future__ import annotations

from typing import Any

import torch

from esn.errors import EsnError
from esn.gate_reduce import reduce_gates
from esn.hookpoints import HookPoint

_MIN_CAPACITY = 64  # buffered positions per hook point (grows when a chunk of steps needs more)


class SubstepRoot:
    """One substep module (e.g. ``talker.code_predictor``) under a recorder stream root ``parent``.

    Called as the forward pre-hook (with kwargs) of the substep module; graph-aware (``esn.decode``)."""

    implicit = False

    def __init__(self, path: str, parent: Any, chunk_fn: Any):
        self.path = path
        self.parent = parent
        self.chunk_fn = chunk_fn  # batch -> the recorder's decode chunk length (None: no chunks)
        self.capacity = _MIN_CAPACITY
        self.points: list[SubstepPoint] = []
        self.calls = 0
        self.start = 0  # buffer position of the current forward
        self.q = 0  # positions buffered
        self.resolved = 0  # of them, with their validity written
        self.steps = 0  # root decode steps whose positions were resolved
        self.vbuf: torch.Tensor | None = None  # [Q, B] bool
        self.tokens_dev: torch.Tensor | None = None  # [B] int64
        self.done = False
        # esn.decode: forwards of one root step (positions each), the current forward, the device slot
        self.engine: Any = None
        self.forwards: tuple[int, ...] | None = None  # fixed after the first step (or adopted)
        self.seen: list[int] = []  # positions of this step's forwards so far
        self.slot_dev: torch.Tensor | None = None  # [1] int64: state.step % S
        self.slots = 1  # S: the root's halves * chunk (1: "step", reduced in the step)
        self.base_calls = 0
        parent.followers.append(self)

    @property
    def batch(self) -> int | None:
        """The stream root's batch size (None before its first call)."""
        return self.parent.batch

    def __call__(self, module, args, kwargs) -> None:
        self.pre_hook(module, args, kwargs)

    def pre_hook(self, module, args, kwargs) -> None:
        """Forward pre-hook on the substep module: reserve buffer positions for this forward's inputs."""
        x = kwargs.get("inputs_embeds")
        if x is None:
            x = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise EsnError(f"substep {self.path!r} received neither input_ids nor inputs_embeds")
        if self.parent.batch is None:
            raise EsnError(f"substep {self.path!r} ran before its stream root {self.parent.path!r}: a substep "
                           "must run inside the root's decode steps")
        if x.shape[0] != self.parent.batch:
            raise EsnError(f"substep {self.path!r} ran with batch {x.shape[0]}, its stream root "
                           f"{self.parent.path!r} with {self.parent.batch}")
        pos = int(x.shape[1])
        self.calls += 1
        if self.engine is not None:
            self._decode_forward(pos)
            return
        if self.vbuf is None:
            self.vbuf = torch.empty((self.capacity, x.shape[0]), dtype=torch.bool, device=x.device)
            self.tokens_dev = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
        if self.q + pos > self.capacity:
            self._grow(self.q + pos)
        self.start, self.q = self.q, self.q + pos

    def _grow(self, need: int) -> None:
        while self.capacity < need:
            self.capacity *= 2
        vbuf = torch.empty((self.capacity, self.vbuf.shape[1]), dtype=torch.bool, device=self.vbuf.device)
        vbuf[: self.resolved] = self.vbuf[: self.resolved]
        self.vbuf = vbuf
        for p in self.points:
            p.grow(self.capacity, self.q)

    def on_root_step(self, rows: torch.Tensor | None) -> None:
        """The root began a call; ``rows [B]`` bool says which rows it is real for (None: all). Every
        buffered position without a validity belongs to this step."""
        if self.q > self.resolved:
            self.vbuf[self.resolved:self.q] = True if rows is None else rows
            self.resolved = self.q
        if self.parent.calls > 1:  # a decode step of the root: reduce every `chunk` steps (as esn.decode)
            self.steps += 1
            if self.steps % (self.parent.chunk or 1) == 0:
                self._reduce()

    def _reduce(self) -> None:
        n = self.resolved
        if n:
            valid = self.vbuf[:n]
            self.tokens_dev.add_(valid.sum(0))
            for p in self.points:
                p.reduce(None if p.buf is None else p.buf[:n], valid)
        self.q = self.resolved = 0

    def finish(self) -> None:
        """At the end of recording: positions still without validity take the root's last known one
        (a row that has fed a stop token is padding), then everything is reduced."""
        if self.done:
            return
        self.done = True
        if self.q > self.resolved:
            finished = self.parent.finished
            rows = None if finished is None else ~finished
            self.vbuf[self.resolved:self.q] = True if rows is None else rows
            self.resolved = self.q
        self._reduce()

    def tokens(self, batch: int) -> torch.Tensor:
        """``[B]`` int64 on the statistics' device (CPU before any forward): the substep positions counted per row."""
        if self.tokens_dev is None:
            return torch.zeros(batch, dtype=torch.int64)
        return self.tokens_dev

    # -- esn.decode (driven by the stream root, esn.recording._Root) -----------------------------------
    def decode_begin(self, state: Any) -> None:
        """A decoder starts stepping the root: forwards write device-side slots from now on."""
        self._reduce()
        self.engine = state
        self.slots = self.parent.halves * self.parent.chunk if self.parent.chunk else 1
        self.slot_dev = torch.zeros(1, dtype=torch.long, device=state.device)
        if self.tokens_dev is None:
            self.tokens_dev = torch.zeros(self.parent.batch, dtype=torch.int64, device=state.device)
        self.seen = []
        self.base_calls = self.calls
        for p in self.points:
            p.decode_begin(state)

    def _decode_forward(self, pos: int) -> None:
        f = len(self.seen)
        if f == 0:  # the step's first forward: its slot
            torch.remainder(self.engine.step, self.slots, out=self.slot_dev)
        if self.forwards is not None and (f >= len(self.forwards) or self.forwards[f] != pos):
            raise EsnError(f"substep {self.path!r}: forward {f} of a decode step fed {pos} positions, the first "
                           f"step's forwards fed {list(self.forwards)}; esn.decode needs the same forwards in "
                           "every step (decode eagerly otherwise)")
        self.seen.append(pos)
        self.start = f

    def on_root_step_device(self, valid: torch.Tensor) -> None:
        """The root's step began on the device (after this step's forwards); ``valid [B]`` its real rows.
        With the ``step`` strategy the step's positions are reduced here, inside the step."""
        if self.engine is None:
            return
        if self.forwards is None:
            self.forwards = tuple(self.seen)
        elif tuple(self.seen) != self.forwards:
            raise EsnError(f"substep {self.path!r}: a decode step ran forwards of {self.seen} positions, the first "
                           f"step {list(self.forwards)}; esn.decode needs the same forwards in every step")
        self.seen = []
        if self.slots == 1:
            self.reduce_chunk(0, 1, valid.unsqueeze(0))

    def reduce_chunk(self, start: int, steps: int, valid: torch.Tensor) -> None:
        """Reduce slots ``start`` to ``start + steps``; ``valid [steps, B]``: the root steps' real rows."""
        q = sum(self.forwards or ())
        if not q:
            return
        per_position = valid.unsqueeze(1).expand(steps, q, valid.shape[1]).reshape(steps * q, -1)  # [steps*Q, B]
        self.tokens_dev.add_(per_position.sum(0))
        for p in self.points:
            p.reduce(p.chunk(start, steps), per_position)

    def decode_end(self, done: int) -> None:
        """The decoder ran ``done`` steps: the substep's forwards ran in each (replays run no hook)."""
        per_step = len(self.forwards or ())
        self.calls = self.base_calls + done * per_step
        for p in self.points:
            p.decode_end(done * per_step)
        self.engine, self.seen = None, []

    @property
    def graph_key(self) -> tuple:
        """Batch and slots (the forwards per step are the model's, fixed for a decoder's scope)."""
        return ("esn.recorder.substep", self.parent.batch, self.slots)

    def graph_state(self) -> tuple:
        """The slot tensor, the forwards per step, and (step strategy) the position counts."""
        return self.slot_dev, self.forwards, self.tokens_dev

    def graph_adopt(self, state: tuple) -> None:
        """Use a captured graph's slot tensor (and, stepping, its counts, carrying this recording's)."""
        self.slot_dev, self.forwards, tokens_dev = state
        if self.slots == 1:
            self.tokens_dev = tokens_dev.copy_(self.tokens_dev)


class SubstepPoint:
    """A dense hook point (``[batch, pos, d]``) inside a substep module; statistics ``[B, d]`` on the device.

    Called as the forward hook of its ``act_fn``; graph-aware (``esn.decode``)."""

    def __init__(self, hp: HookPoint, root: SubstepRoot, moments: bool):
        if hp.routed or hp.flat:
            raise EsnError(f"hook point {hp.name}: routed or flattened gates inside a substep "
                           f"({root.path!r}) are not supported")
        self.hp = hp
        self.root = root
        self.moments = moments
        self.calls = 0
        self.base_calls = 0
        self.buf: torch.Tensor | None = None  # [Q, B, d], the gate's dtype
        self.slots: list[torch.Tensor] = []  # its positions as [B, 1, d] views, made once (one-position forwards)
        self.dbufs: list[torch.Tensor] = []  # esn.decode: per forward of a step, [S, pos_f, B, d]
        self.counts: torch.Tensor | None = None
        self.sums: torch.Tensor | None = None
        self.sumsq: torch.Tensor | None = None
        root.points.append(self)

    def __call__(self, module, args, g: torch.Tensor) -> None:
        self.hook(module, args, g)

    def hook(self, module, args, g: torch.Tensor) -> None:
        """Forward hook on ``act_fn``: ``g [batch, pos, d_mlp]`` of one substep forward, one copy into the buffer."""
        root = self.root
        self.calls += 1
        b = root.batch
        pos = root.seen[-1] if root.engine is not None else root.q - root.start
        if g.dim() != 3 or g.shape[0] != b or g.shape[1] != pos or g.shape[2] != self.hp.width:
            raise EsnError(f"hook point {self.hp.name}: gate of shape {tuple(g.shape)} does not match its "
                           f"substep {root.path!r} (batch {b}, {pos} positions, width {self.hp.width})")
        self._statistics(b, g.device)
        if root.engine is not None:  # [S, pos, B, d] of this forward, at the step's slot (on the device)
            f = root.start
            if f == len(self.dbufs):
                self.dbufs.append(torch.empty((root.slots, pos, b, self.hp.width), dtype=g.dtype, device=g.device))
            self.dbufs[f].index_copy_(0, root.slot_dev, g.transpose(0, 1).unsqueeze(0))
            return
        if self.buf is None:
            self.buf = torch.empty((root.capacity, b, self.hp.width), dtype=g.dtype, device=g.device)
            self._views()
        if pos == 1:  # the hot path: a decode step of the substep, one copy into a view made once
            self.slots[root.start].copy_(g)
        else:
            self.buf[root.start:root.q].copy_(g.transpose(0, 1))  # the one kernel per forward

    def _statistics(self, b: int, device) -> None:
        if self.counts is None:
            self.counts = torch.zeros((b, self.hp.width), dtype=torch.int32, device=device)
            if self.moments:
                self.sums = torch.zeros((b, self.hp.width), dtype=torch.float64, device=device)
                self.sumsq = torch.zeros_like(self.sums)

    def grow(self, capacity: int, used: int) -> None:
        """Re-allocate the buffer to ``capacity`` positions, keeping the first ``used``."""
        if self.buf is None:
            return
        buf = self.buf.new_empty((capacity, *self.buf.shape[1:]))
        buf[:used] = self.buf[:used]
        self.buf = buf
        self._views()

    def _views(self) -> None:
        self.slots = list(self.buf.unsqueeze(2).unbind(0))  # [B, 1, d] each, g's shape in a decode step

    def chunk(self, start: int, steps: int) -> torch.Tensor | None:
        """esn.decode: slots ``start`` to ``start + steps`` as positions ``[steps * Q, B, d]`` in step order."""
        if not self.dbufs:
            return None
        g = torch.cat([b[start:start + steps] for b in self.dbufs], dim=1)  # [steps, Q, B, d]
        return g.view(-1, *g.shape[2:])

    def reduce(self, g: torch.Tensor | None, valid: torch.Tensor) -> None:
        """Add buffered positions ``g [n, B, d]`` (``valid [n, B]``), one partial sum (esn.gate_reduce)."""
        if g is None:
            return
        reduce_gates(g, valid, 0, self.counts, self.sums, self.sumsq)

    def flush(self) -> None:
        """At the end of recording: reduce everything still buffered (through the substep root)."""
        self.root.finish()

    def decode_begin(self, state: Any) -> None:
        """A decoder starts: statistics exist before any step (a replayed step runs no hook)."""
        self._statistics(self.root.batch, state.device)
        self.base_calls = self.calls

    def decode_end(self, forwards: int) -> None:
        """The decoder's steps ran ``forwards`` substep forwards (a replayed step runs no hook)."""
        self.calls = self.base_calls + forwards

    @property
    def graph_key(self) -> tuple:
        """Width and what a step does: copies only, or (step strategy) the reduction too."""
        return ("esn.recorder.substep_point", self.hp.width, self.root.slots, self.moments)

    def graph_state(self) -> tuple:
        """The per-forward buffers and the statistics (written in the step by the step strategy)."""
        return list(self.dbufs), self.counts, self.sums, self.sumsq

    def graph_adopt(self, state: tuple) -> None:
        """Write a captured graph's buffers from now on (stepping: its statistics, carrying this one's)."""
        dbufs, counts, sums, sumsq = state
        self.dbufs = list(dbufs)
        if self.root.slots == 1:
            self.counts = counts.copy_(self.counts)
            if sums is not None:
                self.sums, self.sumsq = sums.copy_(self.sums), sumsq.copy_(self.sumsq)

    def result(self, batch: int) -> tuple[torch.Tensor, ...]:
        """``(counts [B, d] int32, tokens [B, 1] int64, sums, sumsq, prompt_counts, prompt_tokens)`` on the
        statistics' device (the recorder brings every point to the host at once, through page-locked memory)."""
        if self.calls != self.root.calls:
            raise EsnError(f"hook point {self.hp.name} ran in {self.calls} of the {self.root.calls} forwards of "
                           f"its substep {self.root.path!r}: the stream spec does not match the model")
        d = self.hp.width
        tokens = self.root.tokens(batch)[:, None]
        device = tokens.device
        # a substep runs in decode steps only: its prompt share is zero
        prompt = (torch.zeros((batch, d), dtype=torch.int32, device=device),
                  torch.zeros((batch, 1), dtype=torch.int64, device=device))
        if self.counts is None:
            zeros = torch.zeros((batch, d), dtype=torch.float64, device=device) if self.moments else None
            return torch.zeros((batch, d), dtype=torch.int32, device=device), tokens, zeros, zeros, *prompt
        moments = (self.sums, self.sumsq) if self.moments else (None, None)
        return self.counts, tokens, *moments, *prompt
