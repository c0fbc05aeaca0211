"""Greedy decoding through one static step, captured once as a CUDA graph and replayed every step.

Eager decoding of a 7B model is launch-bound: the host issues ~1000 small kernels per token while the
GPU waits. Here the adapter supplies a *step*: a function that runs one decode forward reading and
writing only static device buffers (a static KV cache, ``DecodeState``). The ``Decoder`` wraps it with
greedy token selection (transformers' processors for ``do_sample=False``: repetition penalty,
suppressed tokens, ``min_new_tokens``), pads rows that have finished, and records the tokens, all on
the device. On CUDA that whole step is captured as one ``torch.cuda.CUDAGraph`` and replayed; on CPU
(or with ``capture=False``) the same step runs eagerly, so CPU tests check the very code that is
captured.

What the loop does per run:

1. The adapter runs the prefill eagerly and hands the decoder the last position's logits.
2. ``decode_begin`` on every hook listener (see ``esn.decode.graphs``); the recorder switches to its
   device-side bookkeeping.
3. Steps: a graph already captured for the same hook fingerprint is reused (graph-aware hooks adopt its
   tensors); otherwise one or two eager warm-up steps run on a side stream, then the step is captured.
   After each step the listeners hear ``decode_step(done)`` (the recorder flushes a full chunk).
4. Whether every row has finished is read from the device every ``check_every`` steps, one check late
   and without blocking (a pinned flag and an event), so the host never drains the GPU's queue. The
   few steps past the end are harmless: finished rows are fed ``pad`` and listeners see them as
   padding (``state.running`` is false).
5. ``decode_end(done)``; the tokens up to where transformers' ``generate`` would have stopped.

Rows that finish early stay in the static batch: they are masked (fed ``pad``, not counted), never
recomputed or removed.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from esn.decode import graphs
from esn.decode.capture import capture
from esn.decode.policy import capture_default
from esn.errors import EsnError


@dataclass(frozen=True)
class Greedy:
    """Greedy decoding, as transformers' ``generate(do_sample=False, ...)`` with these settings."""

    max_new_tokens: int
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    min_new_tokens: int = 0
    repetition_penalty: float = 1.0
    suppress_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise EsnError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not isinstance(self.min_new_tokens, int) or self.min_new_tokens < 0:
            raise EsnError(f"min_new_tokens must be a non-negative integer, got {self.min_new_tokens!r}")
        penalty = self.repetition_penalty
        if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not math.isfinite(penalty) or penalty <= 0:
            raise EsnError(f"repetition_penalty must be a positive number, got {penalty!r}")


def _is_in(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``x`` is one of ``ids`` (elementwise); a broadcast compare, so no host sync (unlike some isin paths)."""
    return (x.unsqueeze(-1) == ids).any(-1)


class DecodeState:
    """The static device buffers of one decoding session; a captured step reads and writes only these.

    - ``ids`` ``[B, 1]`` long: the token fed to the current step;
    - ``step`` ``[1]`` long: index of the current decode step (0 = the first forward after the prefill);
    - ``finished`` ``[B]`` bool: the row produced a stop token before this step;
    - ``running`` ``[]`` bool: some row was unfinished before this step (false only in steps past the end,
      which ``generate`` would not have run);
    - ``tokens`` ``[B, max_new_tokens]`` long: generated tokens, column 0 from the prefill.

    ``modules`` lists the scope's module tree once: a decoder serves one fixed tree (its captured graphs
    replay that tree's kernels), so each run finds the hooks in it without walking the model again.
    """

    def __init__(self, scope: nn.Module, batch: int, vocab: int, greedy: Greedy, device: torch.device):
        self.scope = scope
        self.batch = batch
        self.vocab = vocab
        self.device = device
        self.ids = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.running = torch.ones((), dtype=torch.bool, device=device)
        self.tokens = torch.full((batch, greedy.max_new_tokens), greedy.pad_token_id, dtype=torch.long, device=device)

        def ids_tensor(ids: tuple[int, ...]) -> torch.Tensor | None:
            return torch.tensor(ids, dtype=torch.long, device=device) if ids else None

        self.eos = ids_tensor(greedy.eos_token_ids)
        self.suppress = ids_tensor(greedy.suppress_token_ids)
        self.seen = torch.zeros((batch, vocab), dtype=torch.bool, device=device) if greedy.repetition_penalty != 1.0 else None
        # [B] long: generated tokens before this index are not penalised (transformers' prompt_ignore_length)
        self.penalty_from = torch.zeros(batch, dtype=torch.long, device=device)
        self.eos_column = None  # [V] bool: the ids min_new_tokens holds back
        if greedy.min_new_tokens > 0 and self.eos is not None:
            self.eos_column = torch.zeros(vocab, dtype=torch.bool, device=device)
            self.eos_column[self.eos] = True
        self._tree: tuple[list[tuple[str, nn.Module]], frozenset[int]] | None = None

    def _listed(self) -> tuple[list[tuple[str, nn.Module]], frozenset[int]]:
        if self._tree is None:
            modules = list(self.scope.named_modules())
            self._tree = modules, frozenset(id(m) for _, m in modules)
        return self._tree

    @property
    def modules(self) -> list[tuple[str, nn.Module]]:
        """``scope.named_modules()`` as a list, made on first use and kept."""
        return self._listed()[0]

    def holds(self, module: nn.Module) -> bool:
        """Whether ``module`` is the scope or one of its submodules (a hook on it runs in every step)."""
        return id(module) in self._listed()[1]


@dataclass
class Decoded:
    """What one run produced: ``tokens`` ``[B, length]`` on the device, as ``generate`` returns them after
    the prompt (rows that finished early are padded), and how it ran."""

    tokens: torch.Tensor
    length: int
    steps: int  # decode steps run (>= length - 1: a few may run past the end)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Captured:
    graph: Any  # torch.cuda.CUDAGraph
    states: list[Any]  # per scoped hook, the tensors its captured kernels use
    keep: list[Any]  # hooks that are not graph-aware: their closures must outlive the graph


class _FinishCheck:
    """Reads "every row finished" every ``every`` steps, one check late, without blocking the GPU queue."""

    def __init__(self, state: DecodeState, every: int):
        self.state = state
        self.every = every
        self.cuda = state.device.type == "cuda"
        self.flags = [torch.zeros((), dtype=torch.bool, pin_memory=self.cuda) for _ in range(2)]
        self.pending: deque = deque()
        self.count = 0

    def poll(self, done: int) -> bool:
        """True when every row had finished at the previous check (so the loop may stop)."""
        if done % self.every:
            return False
        flag = self.flags[self.count % 2]
        self.count += 1
        flag.copy_(self.state.finished.all(), non_blocking=self.cuda)
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
        self.pending.append((flag, event))
        if len(self.pending) < 2:
            return False
        flag, event = self.pending.popleft()
        if event is not None:
            event.synchronize()  # recorded `every` steps ago: the GPU still has that many queued
        return bool(flag)


StepFn = Callable[[DecodeState], torch.Tensor]


class Decoder:
    """Greedy decoding of one stream of a model, through the adapter's static ``step``.

    ``scope`` is the module whose forward the step runs (its hooks are captured with it); ``step(state)``
    returns the logits ``[B, V]`` (or ``[B, 1, V]``) for the tokens ``state.ids`` at decode step
    ``state.step``. ``capture`` defaults to True on CUDA. One decoder serves many runs of the same batch
    size; it keeps up to ``max_graphs`` captured graphs, one per hook fingerprint.
    """

    def __init__(
        self,
        scope: nn.Module,
        step: StepFn,
        *,
        batch: int,
        vocab: int,
        greedy: Greedy,
        device: torch.device | str | None = None,
        capture: bool | None = None,
        check_every: int = 4,
        max_graphs: int = 8,
    ):
        if device is None:
            device = next(scope.parameters()).device
        device = torch.device(device)
        capture = capture_default(device) if capture is None else bool(capture)
        if capture and device.type != "cuda":
            raise EsnError(f"CUDA graphs need a CUDA device; the model is on {device} (decode eagerly)")
        if batch < 1 or check_every < 1 or max_graphs < 1:
            raise EsnError(f"batch, check_every and max_graphs must be positive, got {batch}, {check_every}, {max_graphs}")
        self.scope = scope
        self.step_fn = step
        self.greedy = greedy
        self.batch = batch
        self.capture = capture
        self.check_every = check_every
        self.max_graphs = max_graphs
        with torch.inference_mode():
            self.state = DecodeState(scope, batch, vocab, greedy, device)
        self._graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self.capture_seconds: list[float] = []  # one entry per capture, host wall time incl. instantiation

    # -- the step ----------------------------------------------------------------------------------
    def _choose(self, scores: torch.Tensor, index: torch.Tensor) -> None:
        """Pick the next tokens from ``scores`` ``[B, V]`` float32 and store them at column ``index`` ``[1]``.

        The processors are transformers' for greedy search, value for value: repetition penalty over
        every id seen so far (prompt included), suppressed ids, end ids held back below ``min_new_tokens``.
        """
        s, g = self.state, self.greedy
        if s.seen is not None:
            p = g.repetition_penalty
            scores = torch.where(s.seen, torch.where(scores < 0, scores * p, scores / p), scores)
        if s.suppress is not None:
            scores = scores.index_fill(1, s.suppress, -math.inf)
        if s.eos_column is not None:
            scores = scores.masked_fill(s.eos_column & (index < g.min_new_tokens), -math.inf)
        nxt = scores.argmax(-1)  # [B]
        nxt = torch.where(s.finished, g.pad_token_id, nxt)  # finished rows are fed pad, as in generate
        s.tokens.index_copy_(1, index, nxt.unsqueeze(1))
        if s.eos is not None:
            torch.logical_or(s.finished, _is_in(nxt, s.eos), out=s.finished)
        if s.seen is not None:
            at = nxt.unsqueeze(1)
            s.seen.scatter_(1, at, s.seen.gather(1, at) | (index >= s.penalty_from).unsqueeze(1))
        s.ids.copy_(nxt.unsqueeze(1))

    def _advance(self) -> None:
        """One decode step: no host sync, no branch on a device value (this is what gets captured)."""
        s = self.state
        torch.logical_not(s.finished.all(), out=s.running)
        logits = self.step_fn(s)
        if logits.dim() == 3:
            logits = logits[:, -1]
        self._choose(logits.float(), s.step + 1)
        s.step.add_(1)

    # -- a run -------------------------------------------------------------------------------------
    def run(self, first_logits: torch.Tensor, prompt_ids: torch.Tensor | None = None,
            penalty_ignore: torch.Tensor | None = None) -> Decoded:
        """Decode after a prefill whose last-position logits are ``first_logits`` ``[B, V]``.

        ``prompt_ids`` ``[B, P]`` seed the repetition penalty (transformers penalises prompt ids too).
        ``penalty_ignore`` ``[B]``: per row, the leading columns of prompt + generated ids the penalty
        ignores (transformers' ``prompt_ignore_length``: ``generate`` passes each row's left padding of the
        attention mask, also when the prompt came as ``inputs_embeds`` and the columns are generated ones).
        """
        if first_logits.dim() != 2 or first_logits.shape[0] != self.batch:
            raise EsnError(f"first_logits must be [batch={self.batch}, vocab], got {tuple(first_logits.shape)}")
        with torch.inference_mode():
            return self._run(first_logits, prompt_ids, penalty_ignore)

    def _run(self, first_logits: torch.Tensor, prompt_ids: torch.Tensor | None,
             penalty_ignore: torch.Tensor | None) -> Decoded:
        s, g = self.state, self.greedy
        p = 0 if prompt_ids is None else prompt_ids.shape[1]
        ignore = torch.zeros(s.batch, dtype=torch.long, device=s.device) if penalty_ignore is None else penalty_ignore.to(s.device)
        s.penalty_from.copy_(ignore - p)
        s.finished.zero_()
        s.step.zero_()
        s.running.fill_(True)
        s.tokens.fill_(g.pad_token_id)
        if s.seen is not None:
            s.seen.zero_()
            if prompt_ids is not None:
                ids = prompt_ids.to(s.device)
                keep = torch.arange(p, device=s.device) >= ignore.unsqueeze(1)  # [B, P]
                hits = torch.zeros(s.seen.shape, dtype=torch.int32, device=s.device).scatter_add_(1, ids, keep.int())
                torch.logical_or(s.seen, hits > 0, out=s.seen)
        self._choose(first_logits.float(), torch.zeros(1, dtype=torch.long, device=s.device))

        hooks = graphs.scoped_hooks(self.scope, s.modules)
        listeners = graphs.listeners(hooks)
        total = g.max_new_tokens - 1
        info: dict[str, Any] = {"decode": "graph" if self.capture else "eager", "captured": False, "reused": False}
        done = 0
        for listener in listeners:
            listener.decode_begin(s)
        try:
            done = self._loop(hooks, total, info)
        finally:
            for listener in listeners:
                listener.decode_end(done)
        info["steps"] = done
        hit = _is_in(s.tokens, s.eos) if s.eos is not None else torch.zeros_like(s.tokens, dtype=torch.bool)
        # generate stops once every row has produced a stop token: the longest row sets the length
        ends = torch.where(hit.any(1), hit.int().argmax(1) + 1, g.max_new_tokens)
        length = int(ends.max())
        return Decoded(s.tokens[:, :length].clone(), length, done, info)

    def _loop(self, hooks: list[graphs.ScopedHook], total: int, info: dict) -> int:
        replay: Callable[[], None] | None = None
        key = graphs.fingerprint(hooks) if self.capture else None
        if self.capture and key in self._graphs:
            entry = self._graphs[key]
            self._graphs.move_to_end(key)
            graphs.adopt(hooks, entry.states)
            replay = entry.graph.replay
            info["reused"] = True
        warm = 2 if not self.capture_seconds else 1  # lazy initialisations happen before the first capture
        check = _FinishCheck(self.state, self.check_every)
        listeners = graphs.listeners(hooks)
        current = torch.cuda.current_stream() if self.capture else None
        side = None
        done = 0
        while done < total:
            if self.capture and replay is None and done >= warm and total - done >= 2:
                if side is not None:
                    current.wait_stream(side)
                    side = None
                replay = self._capture(key, hooks)
                info["captured"] = True
                info["capture_s"] = round(self.capture_seconds[-1], 4)
            if self.capture and replay is None and side is None:
                side = torch.cuda.Stream()  # warm-up steps run on a side stream, as torch's docs ask
                side.wait_stream(current)
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                if replay is not None:
                    replay()
                else:
                    self._advance()
                done += 1
                for listener in listeners:
                    listener.decode_step(done)
                stop = check.poll(done)
            if stop:
                break
        if side is not None:
            current.wait_stream(side)
        return done

    def _capture(self, key: tuple, hooks: list[graphs.ScopedHook]) -> Callable[[], None]:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        graph, _ = capture(self._advance, f"the decode step of {type(self.scope).__name__}",
                           "something in the step or a hook synchronises with the host. Decode with transformers' "
                           "generate instead (adapter option decode='generate')")
        torch.cuda.synchronize()
        self.capture_seconds.append(time.perf_counter() - t0)
        self._graphs[key] = _Captured(graph, graphs.states(hooks), [h.hook for h in hooks if not h.aware])
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return graph.replay

    @property
    def graphs(self) -> int:
        """Captured graphs held (one per distinct hook fingerprint seen, at most ``max_graphs``)."""
        return len(self._graphs)
