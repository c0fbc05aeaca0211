"""Neuron selectors of the paper (section 3.3.2): LAP, LAPE, MAD, CAS and Random.

Input is the activation-probability matrix ``P`` ``[E, N]`` (rows in ``emotions`` order, neurons flat
over the layout). Every selector keeps ``N_sel = floor(r * N)`` neurons per emotion (CAS and LAPE may keep
fewer when they have fewer candidates) and breaks ties towards the lower flat index. ``N_sel = 0`` is an
error: a mask that selects nothing would silently turn every intervention into a no-op.

Selectors are plugins: ``register(name, fn)`` with
``fn(probs, n_select, *, rate, seed, emotions, **options) -> list[np.ndarray]`` (one index array per
row). A selector's options are its other keyword parameters (``selector_options``), e.g. LAPE's
``quantile`` and Random's ``shared``; a run config sets them under ``[selectors.<name>]``. A selector that
also declares a keyword parameter ``moments`` gets the gate moments (``GateMoments``: mean and mean square
of the gate per emotion and neuron): only then does the record stage store sums and sums of squares (12
bytes a neuron instead of 4). None of the built-ins needs them. The exact rules, with the edge cases, are
in ``docs/selection.md``.
"""

from __future__ import annotations

import inspect
import math
import numbers
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from esn.errors import EsnError
from esn.plugins import Registry, hookimpl


def n_selected(rate: float, n_neurons: int) -> int:
    """``floor(rate * n_neurons)`` on the rate as written: 0.29 * 100 is 29 (floats say 28.999...), 1/6 * 6 is 1."""
    return math.floor(Fraction(repr(float(rate))).limit_denominator(10**12) * n_neurons)


def _top(score: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest finite scores, ties to the lower index, returned sorted."""
    finite = np.flatnonzero(np.isfinite(score))
    order = finite[np.argsort(-score[finite], kind="stable")]
    return np.sort(order[:k]).astype(np.int64)


def emotion_seed(seed: int, emotion: str) -> list[int]:
    """A seed sequence for ``emotion``'s own draw: independent of the other emotions and of row order."""
    return [int(seed), zlib.crc32(emotion.encode())]


def lap(probs: np.ndarray, n_select: int, **_) -> list[np.ndarray]:
    """Top ``n_select`` neurons by activation probability P_e."""
    return [_top(row, n_select) for row in probs]


def entropy(probs: np.ndarray) -> np.ndarray:
    """``H[n] = -sum_e P~ log P~`` with ``P~ = P / sum_e P`` (natural log, 0 log 0 = 0; all-zero -> 0)."""
    total = probs.sum(axis=0)
    norm = np.divide(probs, total, out=np.zeros_like(probs), where=total > 0)
    logs = np.log(norm, out=np.zeros_like(norm), where=norm > 0)
    return -(norm * logs).sum(axis=0)


def lape(probs: np.ndarray, n_select: int, *, rate: float, quantile: float = 0.95, **_) -> list[np.ndarray]:
    """Low-entropy pool of active neurons, then top P_e within the pool.

    ``tau_p`` is the ``quantile`` (linear interpolation) of all ``E * N`` values of P; a neuron survives
    if ``max_e P > tau_p`` (strictly). The ``floor(min(1, 5r) N)`` lowest-entropy survivors (ties to the
    lower index) form the pool; each emotion keeps the top ``n_select`` of the pool by P_e (fewer when
    the pool is smaller).
    """
    if not isinstance(quantile, numbers.Real) or not 0.0 <= quantile <= 1.0:
        raise EsnError(f"LAPE quantile must be in [0, 1], got {quantile!r}")
    n = probs.shape[1]
    tau = np.quantile(probs, quantile)
    alive = np.flatnonzero(probs.max(axis=0) > tau)
    pool_size = n_selected(min(1.0, 5 * rate), n)
    pool = alive[np.argsort(entropy(probs)[alive], kind="stable")][:pool_size]
    out = []
    for row in probs:
        score = np.full(n, -np.inf)
        score[pool] = row[pool]
        out.append(_top(score, n_select))
    return out


def mad(probs: np.ndarray, n_select: int, **_) -> list[np.ndarray]:
    """Top ``n_select`` by ``|P_e - mean_e' P_e'|``."""
    dev = np.abs(probs - probs.mean(axis=0, keepdims=True))
    return [_top(row, n_select) for row in dev]


def cas(probs: np.ndarray, n_select: int, **_) -> list[np.ndarray]:
    """Contrastive margin (largest minus second-largest P) for the neuron's top emotion only.

    A neuron whose largest P is shared by two or more emotions (margin 0, e.g. an all-zero neuron) has
    no top emotion and is a candidate for none: the result never depends on the order of the rows.
    """
    if probs.shape[0] < 2:
        raise EsnError("CAS needs at least two emotions")
    top = np.argmax(probs, axis=0)
    ordered = np.sort(probs, axis=0)
    margin = ordered[-1] - ordered[-2]
    out = []
    for e in range(probs.shape[0]):
        score = np.where((top == e) & (margin > 0), margin, -np.inf)
        out.append(_top(score, n_select))
    return out


def random(probs: np.ndarray, n_select: int, *, seed: int = 0, emotions: Sequence[str], shared: bool = False,
           **_) -> list[np.ndarray]:
    """``n_select`` of all N neurons uniformly without replacement, one seeded draw per emotion name;
    ``shared=True``: one draw, the same mask for every emotion (the paper's single Random figure)."""
    if not isinstance(shared, bool):
        raise EsnError(f"Random's option shared must be true or false, got {shared!r}")
    n = probs.shape[1]

    def draw(key: str) -> np.ndarray:
        return np.sort(np.random.default_rng(emotion_seed(seed, key)).choice(n, size=n_select, replace=False))

    if shared:
        one = draw("shared").astype(np.int64)
        return [one.copy() for _ in emotions]
    return [draw(e).astype(np.int64) for e in emotions]


BUILTIN = {"lap": lap, "lape": lape, "mad": mad, "cas": cas, "random": random}


@hookimpl
def register_selectors(register):
    for name, fn in BUILTIN.items():
        register(name, fn)


_CALL_KEYWORDS = {"rate", "seed", "emotions", "moments"}  # what select_neurons passes itself


@dataclass(frozen=True)
class GateMoments:
    """Per emotion and neuron ``[E, N]`` float64, over the counted positions: the gate's mean and mean square."""

    mean: np.ndarray
    mean_sq: np.ndarray

    @property
    def var(self) -> np.ndarray:
        """Variance of the gate, ``mean_sq - mean**2`` (clipped at 0 against rounding)."""
        return np.maximum(self.mean_sq - self.mean**2, 0.0)


def needs_moments(fn: Callable) -> bool:
    """Whether a selector function takes the gate moments: it declares a keyword parameter ``moments``."""
    params = list(inspect.signature(fn).parameters.values())[2:]
    return any(p.name == "moments" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def selector_options(fn: Callable) -> tuple[str, ...] | None:
    """The options a selector function takes: its keyword parameters other than rate, seed and emotions.

    ``None`` when it takes any option: a ``**kwargs`` catch-all not named ``_`` (``**_`` is the convention
    for ignoring the call's other keywords, as the built-ins do).
    """
    params = list(inspect.signature(fn).parameters.values())[2:]  # after probs, n_select
    if any(p.kind is p.VAR_KEYWORD and p.name != "_" for p in params):
        return None
    return tuple(p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
                 and p.name not in _CALL_KEYWORDS)


def check_options(method: str, fn: Callable, options: dict) -> None:
    """EsnError naming an option ``fn`` does not take (the built-ins would silently ignore a typo)."""
    allowed = selector_options(fn)
    unknown = [] if allowed is None else sorted(set(options) - set(allowed))
    if unknown:
        raise EsnError(f"selector {method!r} has no option {', '.join(map(repr, unknown))} "
                       f"(it takes: {', '.join(allowed) or 'none'})")


def _check_rate(rate: object) -> float:
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 < float(rate) <= 1:
        raise EsnError(f"selection rate r must be a number in (0, 1], got {rate!r}")
    return float(rate)


def select_neurons(
    probs,
    method: str,
    rate: float,
    *,
    emotions: Sequence[str],
    seed: int = 0,
    registry: Registry | None = None,
    moments: GateMoments | None = None,
    **options,
) -> dict[str, np.ndarray]:
    """Select neurons per emotion. ``probs`` ``[E, N]``, rows in ``emotions`` order; ``options`` go to the
    selector (``selector_options`` lists what it takes; anything else is an error). ``moments`` (``[E, N]``
    each) go to a selector that declares them (``needs_moments``) and must be given for one.

    Returns ``{emotion: sorted unique int64 flat indices}``. ``registry`` defaults to the process
    registry (built-ins plus installed plugins); pass ``esn.plugins.registry_with(plugin)`` to use a
    selector registered in code. Raises ``EsnError`` for a bad rate, shape or value, an unknown
    selector, a rate so small that ``floor(rate * N) == 0``, or a selector that returns bad indices.
    """
    from esn import plugins

    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] == 0:
        raise EsnError(f"probs must be a 2-D [emotions, neurons] array with neurons, got shape {probs.shape}")
    emotions = [str(e) for e in emotions]
    if len(emotions) != probs.shape[0]:
        raise EsnError(f"{len(emotions)} emotions given for {probs.shape[0]} probability rows")
    if len(set(emotions)) != len(emotions):
        raise EsnError(f"duplicate emotions: {emotions}")
    if not np.all(np.isfinite(probs)) or probs.min() < 0 or probs.max() > 1:
        raise EsnError("probs must be finite activation probabilities in [0, 1]")
    rate = _check_rate(rate)
    n = probs.shape[1]
    n_select = n_selected(rate, n)
    if n_select == 0:
        raise EsnError(f"rate r={rate} selects floor(r*N) = 0 of N={n} neurons; use r >= {1 / n:.3g}")
    fn = (registry or plugins.registry()).selector(method.lower())
    check_options(method, fn, options)
    if moments is not None and not isinstance(moments, GateMoments):
        raise EsnError(f"moments must be GateMoments (ActivationStats.moments()), got {type(moments).__name__}")
    if needs_moments(fn):
        if moments is None:
            raise EsnError(f"selector {method!r} needs the gate moments (mean and mean square per neuron); pass "
                           "moments=stats.moments() from statistics recorded with moments")
        if moments.mean.shape != probs.shape or moments.mean_sq.shape != probs.shape:
            raise EsnError(f"moments of shape {moments.mean.shape} do not fit probs {probs.shape}")
        options = {**options, "moments": moments}
    rows = fn(probs, n_select, rate=rate, seed=seed, emotions=tuple(emotions), **options)
    if len(rows) != len(emotions):
        raise EsnError(f"selector {method!r} returned {len(rows)} rows for {len(emotions)} emotions")
    out = {}
    for emotion, row in zip(emotions, rows, strict=True):
        idx = np.asarray(row).reshape(-1)
        if idx.size and (not np.issubdtype(idx.dtype, np.integer) or idx.min() < 0 or idx.max() >= n):
            raise EsnError(f"selector {method!r} returned indices outside 0..{n - 1} for {emotion!r}")
        idx = np.unique(idx.astype(np.int64))
        if idx.size != np.asarray(row).size or idx.size > n_select:
            raise EsnError(
                f"selector {method!r} returned {np.asarray(row).size} indices for {emotion!r}: "
                f"they must be unique and at most N_sel={n_select}"
            )
        out[emotion] = idx
    return out
