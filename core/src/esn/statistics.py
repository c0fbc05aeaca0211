"""Activation statistics over success sets (the paper's equations 2-3): K, T and P = K / T.

``K[e, n]`` counts the positions where neuron ``n``'s gate was positive over emotion ``e``'s successful
attempts; ``T[e, g]`` counts the positions seen by position group ``g``: a dense hook point (the LM and
synthesis streams run over different positions, so T is kept per hook point), or one expert of a routed
hook point (the positions routed to that expert). Both are int64 sums, exact and independent of the
order in which attempts, shards or stores are added up. ``positions="generated"`` sums the generated
positions alone (the stored counts minus their prompt share), so one recording gives P both ways.

For a routed neuron (expert ``x``, unit ``u``), ``P = K / T[expert x]``: how often the unit is positive
when its expert runs. An expert never routed to under an emotion has ``T = 0`` and ``P = 0`` (it never
fired). How often the expert runs at all is :meth:`ActivationStats.routing`; ``P * routing`` is the
share of all the layer's positions in which the unit was positive.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from esn.emotions import normalize_emotion
from esn.errors import EsnError
from esn.hookpoints import Layout
from esn.store import AttemptStore


@dataclass
class ActivationStats:
    """Summed statistics per emotion; rows in ``emotions`` order."""

    emotions: list[str]
    layout: Layout
    K: np.ndarray  # [E, N] int64: positive-gate positions
    T: np.ndarray  # [E, G] int64: positions per group (hook point; per expert when routed)
    n_attempts: np.ndarray  # [E] int64: attempts summed
    S: np.ndarray | None = None  # [E, N] float64: sum of gate values, when every attempt had sums
    SS: np.ndarray | None = None  # [E, N] float64: sum of squared gate values
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        e, n, g = len(self.emotions), self.layout.n_neurons, self.layout.n_groups
        if self.K.shape != (e, n) or self.T.shape != (e, g) or self.n_attempts.shape != (e,):
            raise EsnError(f"statistics shapes K {self.K.shape}, T {self.T.shape} do not fit {e} emotions, "
                           f"{n} neurons, {g} position groups")

    def positions(self) -> np.ndarray:
        """``T`` broadcast to neurons: ``[E, N]``, each neuron's column holds its group's T (hook point,
        or expert)."""
        return np.repeat(self.T, self.layout.group_widths, axis=1)

    def hook_point_positions(self) -> np.ndarray:
        """``[E, H]``: positions seen per hook point (a routed one: its experts' T summed over top_k; an
        indexed one: its indices' T summed)."""
        out = np.zeros((len(self.emotions), len(self.layout)), np.int64)
        for i, hp in enumerate(self.layout):
            cols = self.T[:, self.layout.group_offsets[i]:self.layout.group_offsets[i + 1]]
            out[:, i] = cols.sum(1) // hp.top_k if hp.routed else cols.sum(1)  # indexed: over its indices
        return out

    def _check_positions(self) -> None:
        per_hp = self.hook_point_positions()
        bad = [
            f"{e!r} at {self.layout.hook_points[int(np.argmax(per_hp[k] == 0))].name} "
            f"({self.n_attempts[k]} successful attempts)"
            for k, e in enumerate(self.emotions) if np.any(per_hp[k] == 0)
        ]
        if bad:
            raise EsnError(f"no positions for emotion {'; '.join(bad)}: P is undefined; relax the success "
                           "filter or record more attempts")

    def probs(self) -> np.ndarray:
        """``P[e, n] = K[e, n] / T[e, group of n]``, ``[E, N]`` float64; a routed neuron whose expert was
        never routed to under an emotion has ``P = 0`` there."""
        self._check_positions()
        t = self.positions()
        return np.divide(self.K, t, out=np.zeros(self.K.shape), where=t > 0)

    def mean(self) -> np.ndarray:
        """Mean gate value per emotion and neuron ``[E, N]`` over its positions (needs sums; 0 where T = 0)."""
        if self.S is None:
            raise EsnError("these statistics were recorded without sums; record with sums to get means")
        self._check_positions()
        t = self.positions()
        return np.divide(self.S, t, out=np.zeros(self.S.shape), where=t > 0)

    def moments(self):
        """``GateMoments`` (mean and mean square of the gate, ``[E, N]``) for selectors that declare them."""
        from esn.selection import GateMoments

        if self.S is None:
            raise EsnError("these statistics have no gate moments: their attempts were recorded without sums "
                           "and sums of squares (record.moments)")
        t = self.positions()
        self._check_positions()
        return GateMoments(np.divide(self.S, t, out=np.zeros(self.S.shape), where=t > 0),
                           np.divide(self.SS, t, out=np.zeros(self.SS.shape), where=t > 0))

    def routing(self) -> dict[str, np.ndarray]:
        """Routing frequency: per routed hook point, ``[E, experts]`` float64, the share of the emotion's
        positions at that layer that were routed to each expert (a position goes to ``top_k`` experts, so
        a row sums to ``top_k``; 0 where the emotion has no positions)."""
        per_hp = self.hook_point_positions()
        out = {}
        for i, hp in enumerate(self.layout):
            if hp.routed:
                cols = self.T[:, self.layout.group_offsets[i]:self.layout.group_offsets[i + 1]]
                total = per_hp[:, i:i + 1]
                out[hp.name] = np.divide(cols, total, out=np.zeros(cols.shape), where=total > 0)
        return out

    def select_streams(self, streams: Sequence[str]) -> ActivationStats:
        """The statistics of the given streams' hook points only (their neurons renumbered from 0)."""
        sub = self.layout.select(streams)
        cols = np.concatenate([np.arange(self.layout.slice(hp.name).start, self.layout.slice(hp.name).stop)
                               for hp in sub])
        groups = np.concatenate([np.arange(self.layout.group_slice(hp.name).start,
                                           self.layout.group_slice(hp.name).stop) for hp in sub])
        pick = (lambda a: None if a is None else a[:, cols])  # noqa: E731
        return ActivationStats(list(self.emotions), sub, self.K[:, cols], self.T[:, groups], self.n_attempts.copy(),
                               pick(self.S), pick(self.SS), dict(self.meta))

    def __add__(self, other: ActivationStats) -> ActivationStats:
        """Statistics of two disjoint attempt sets, summed exactly."""
        if other.emotions != self.emotions or other.layout != self.layout:
            raise EsnError("only statistics over the same emotions and layout can be added")
        both = self.S is not None and other.S is not None
        return ActivationStats(
            self.emotions, self.layout, self.K + other.K, self.T + other.T, self.n_attempts + other.n_attempts,
            self.S + other.S if both else None, self.SS + other.SS if both else None, dict(self.meta),
        )


def aggregate(store: AttemptStore, ids_by_emotion: Mapping[str, Sequence[str]], *,
              positions: str = "all", progress: bool = False) -> ActivationStats:
    """Sum the statistics of each emotion's attempts (e.g. ``FilterResult.success``) from ``store``.

    Every id must be in the store, belong to one emotion only, and target that emotion. ``positions``:
    ``"all"`` recorded positions, or ``"generated"`` ones only (needs the stored prompt split; the sums of
    gate values are then left out: they are stored for all positions only).
    """
    (out,) = aggregate_each(store, [(ids_by_emotion, positions)], progress=progress)
    if isinstance(out, EsnError):
        raise out
    return out


class _Sums:
    """One request of ``aggregate_each``: its ids' rows and running sums."""

    def __init__(self, store: AttemptStore, ids_by_emotion: Mapping[str, Sequence[str]], positions: str,
                 targets: Mapping[str, str]):
        if positions not in ("all", "generated"):
            raise EsnError(f"positions must be 'all' or 'generated', got {positions!r}")
        self.emotions = [normalize_emotion(e) for e in ids_by_emotion]
        if len(set(self.emotions)) != len(self.emotions):
            raise EsnError(f"an emotion is listed twice: {list(ids_by_emotion)}")
        self.row_of: dict[str, int] = {}
        for e, ids in enumerate(ids_by_emotion.values()):
            for i in ids:
                if self.row_of.setdefault(i, e) != e:
                    raise EsnError(f"attempt {i!r} is listed under {self.emotions[self.row_of[i]]!r} and "
                                   f"{self.emotions[e]!r}")
        for i, e in self.row_of.items():
            if i in targets and targets[i] != self.emotions[e]:
                raise EsnError(f"attempt {i!r} targets {targets[i]!r} but is listed under {self.emotions[e]!r}")
        n_e, n, h = len(self.emotions), store.layout.n_neurons, store.layout.n_groups
        self.positions = positions
        self.K = np.zeros((n_e, n), np.int64)
        self.T = np.zeros((n_e, h), np.int64)
        self.S = np.zeros((n_e, n), np.float64)
        self.SS = np.zeros((n_e, n), np.float64)
        self.has_sums = positions == "all"
        self.n_attempts = np.zeros(n_e, np.int64)
        self.error: EsnError | None = None

    def add(self, part) -> None:
        """Add the rows of ``part`` (one shard's, rows in stored order) that this request lists."""
        mine = [k for k, i in enumerate(part.ids) if i in self.row_of]
        if not mine or self.error is not None:
            return
        if len(mine) != len(part.ids):
            part = part.rows(mine)  # the rows, in the order a request of its own would read them
        rows = np.array([self.row_of[i] for i in part.ids], dtype=np.int64)
        self.has_sums = self.has_sums and part.sums is not None
        try:
            counts, tokens = part.positions(self.positions)
        except EsnError as exc:
            self.error = exc
            return
        for e in np.unique(rows):
            pick = rows == e
            self.K[e] += counts[pick].sum(axis=0, dtype=np.int64)
            self.T[e] += tokens[pick].sum(axis=0, dtype=np.int64)
            self.n_attempts[e] += int(pick.sum())
            if self.has_sums:
                self.S[e] += part.sums[pick].sum(axis=0, dtype=np.float64)
                self.SS[e] += part.sumsq[pick].sum(axis=0, dtype=np.float64)

    def result(self, store: AttemptStore) -> ActivationStats | EsnError:
        if self.error is not None:
            return self.error
        return ActivationStats(self.emotions, store.layout, self.K, self.T, self.n_attempts,
                               self.S if self.has_sums else None, self.SS if self.has_sums else None,
                               {"source_run": str(store.root), "positions": self.positions})


def aggregate_each(store: AttemptStore, requests: Sequence[tuple[Mapping[str, Sequence[str]], str]], *,
                   progress: bool = False) -> list[ActivationStats | EsnError]:
    """``aggregate`` of several ``(ids_by_emotion, positions)`` requests in one pass over the store: each shard
    is read once, for all of them. The results equal separate ``aggregate`` calls bit for bit (each request
    adds its own rows of a shard in the same order). A request whose attempts cannot give its positions
    (stored without the prompt split) yields its EsnError in its place; a bad request raises."""
    targets = {r.id: r.emotion for r in store.records()}
    sums = [_Sums(store, ids, positions, targets) for ids, positions in requests]
    wanted = list(dict.fromkeys(i for s in sums for i in s.row_of))
    parts = store.iter_stats(wanted)
    if progress:
        from rich.progress import track

        parts = track(parts, description="aggregating shards", transient=True)
    for part in parts:
        for s in sums:
            s.add(part)
    return [s.result(store) for s in sums]
