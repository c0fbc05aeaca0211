"""Recording hook points of a *substep* decoder: a model run inside every decode step of a stream root.

Qwen3-Omni's talker, before each of its decode steps, runs a small generate of its code predictor on the
token it is about to feed (one 2-position prefill and ``num_code_groups - 2`` one-position steps) to add
the residual code groups. Those positions belong to the talker's step: in a batch, a row whose talker
has already fed its stop token still runs through the code predictor, and a solo run would not have.
The substep's own inputs cannot tell (it decodes from embeddings), and the talker decides a step's
validity only in its forward pre-hook, which runs after the code predictor. So a substep's gates are
buffered (one copy per hook point and forward, ``[Q, B, d]``) and their validity is written when the
root's next step begins; buffered positions are reduced in bulk.

A stream declares substeps in its :class:`~esn.adapters.StreamSpec` (``substeps=("talker.code_predictor",)``);
hook points whose module lies under one are recorded here. Their positions are counted in decode steps
of the root only, so ``positions="generated"`` counts them all.
"""

from __future__ import annotations

from typing import Any

import torch

from esn.errors import EsnError
from esn.hookpoints import HookPoint

_MIN_CAPACITY = 64  # buffered positions per hook point before a bulk reduction (grows if a step needs more)


class SubstepRoot:
    """One substep module (e.g. ``talker.code_predictor``) under a recorder stream root ``parent``."""

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
        self.vbuf: torch.Tensor | None = None  # [Q, B] bool
        self.tokens_dev: torch.Tensor | None = None  # [B] int64
        self.done = False
        parent.followers.append(self.on_root_step)

    @property
    def batch(self) -> int | None:
        """The stream root's batch size (None before its first call)."""
        return self.parent.batch

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
        if self.vbuf is None:
            self.capacity = max(_MIN_CAPACITY, 4 * (self.chunk_fn(x.shape[0]) or 0))
            self.vbuf = torch.empty((self.capacity, x.shape[0]), dtype=torch.bool, device=x.device)
            self.tokens_dev = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
        if self.q + pos > self.capacity:
            self._grow(self.q + pos)
        self.calls += 1
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
        """The root began a step; ``rows [B]`` bool says which rows it is real for (None: all). Every
        buffered position without a validity belongs to this step."""
        if self.q > self.resolved:
            self.vbuf[self.resolved:self.q] = True if rows is None else rows
            self.resolved = self.q
        if self.resolved * 2 >= self.capacity:
            self._reduce()

    def _reduce(self) -> None:
        n = self.resolved
        if n:
            valid = self.vbuf[:n]
            self.tokens_dev.add_(valid.sum(0))
            for p in self.points:
                p.reduce(n, valid)
        self.q = self.resolved = 0

    def finish(self) -> None:
        """At the end of recording: positions still without validity take the root's last known one
        (a row that has fed a stop token is padding), then everything is reduced."""
        if self.done:
            return
        self.done = True
        if self.q > self.resolved:
            finished = self.parent.finished
            self.on_root_step(None if finished is None else ~finished)
        self._reduce()

    def tokens(self, batch: int) -> torch.Tensor:
        """``[B]`` int64 on CPU: the substep positions counted per row."""
        if self.tokens_dev is None:
            return torch.zeros(batch, dtype=torch.int64)
        return self.tokens_dev.cpu()


class SubstepPoint:
    """A dense hook point (``[batch, pos, d]``) inside a substep module; statistics ``[B, d]`` on the device."""

    def __init__(self, hp: HookPoint, root: SubstepRoot, moments: bool):
        if hp.routed or hp.flat:
            raise EsnError(f"hook point {hp.name}: routed or flattened gates inside a substep "
                           f"({root.path!r}) are not supported")
        self.hp = hp
        self.root = root
        self.moments = moments
        self.calls = 0
        self.buf: torch.Tensor | None = None  # [Q, B, d], the gate's dtype
        self.slots: list[torch.Tensor] = []  # its positions as [B, 1, d] views, made once (one-position forwards)
        self.counts: torch.Tensor | None = None
        self.sums: torch.Tensor | None = None
        self.sumsq: torch.Tensor | None = None
        root.points.append(self)

    def hook(self, module, args, g: torch.Tensor) -> None:
        """Forward hook on ``act_fn``: ``g [batch, pos, d_mlp]`` of one substep forward, one copy into the buffer."""
        root = self.root
        self.calls += 1
        b, pos = root.batch, root.q - root.start
        if g.dim() != 3 or g.shape[0] != b or g.shape[1] != pos or g.shape[2] != self.hp.width:
            raise EsnError(f"hook point {self.hp.name}: gate of shape {tuple(g.shape)} does not match its "
                           f"substep {root.path!r} (batch {b}, {pos} positions, width {self.hp.width})")
        if self.buf is None:
            self.buf = torch.empty((root.capacity, b, self.hp.width), dtype=g.dtype, device=g.device)
            self._views()
            self.counts = torch.zeros((b, self.hp.width), dtype=torch.int32, device=g.device)
            if self.moments:
                self.sums = torch.zeros((b, self.hp.width), dtype=torch.float64, device=g.device)
                self.sumsq = torch.zeros_like(self.sums)
        if pos == 1:  # the hot path: a decode step of the substep, one copy into a view made once
            self.slots[root.start].copy_(g)
        else:
            self.buf[root.start:root.q].copy_(g.transpose(0, 1))  # the one kernel per forward

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

    def reduce(self, n: int, valid: torch.Tensor) -> None:
        """Add the first ``n`` buffered positions, ``valid [n, B]``."""
        if self.buf is None:
            return
        g = self.buf[:n]
        keep = valid.unsqueeze(-1)
        self.counts.add_(((g > 0) & keep).sum(0, dtype=torch.int32))
        if self.moments:
            x = torch.where(keep, g.double(), 0.0)
            self.sums.add_(x.sum(0))
            self.sumsq.add_(x.square_().sum(0))

    def flush(self) -> None:
        """At the end of recording: reduce everything still buffered (through the substep root)."""
        self.root.finish()

    def result(self, batch: int) -> tuple[torch.Tensor, ...]:
        """``(counts [B, d] int32, tokens [B, 1] int64, sums, sumsq)`` on CPU."""
        if self.calls != self.root.calls:
            raise EsnError(f"hook point {self.hp.name} ran in {self.calls} of the {self.root.calls} forwards of "
                           f"its substep {self.root.path!r}: the stream spec does not match the model")
        d = self.hp.width
        tokens = self.root.tokens(batch)[:, None]
        # a substep runs in decode steps only: its prompt share is zero
        prompt = torch.zeros((batch, d), dtype=torch.int32), torch.zeros((batch, 1), dtype=torch.int64)
        if self.counts is None:
            zeros = torch.zeros((batch, d), dtype=torch.float64) if self.moments else None
            return torch.zeros((batch, d), dtype=torch.int32), tokens, zeros, zeros, *prompt
        moments = (self.sums.cpu(), self.sumsq.cpu()) if self.moments else (None, None)
        return self.counts.cpu(), tokens, *moments, *prompt
