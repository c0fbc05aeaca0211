"""Neuron selectors of the paper (section 3.3.2): LAP, LAPE, MAD, CAS and Random.

Input is the activation-probability matrix ``P`` ``[E, N]`` (rows in ``emotions`` order, neurons flat
over the layout). Every selector keeps ``N_sel = floor(r * N)`` neurons per emotion (CAS may keep fewer)
and breaks ties towards the lower flat index. ``N_sel = 0`` is an error: a mask that selects nothing
would silently turn every intervention into a no-op.

Selectors are plugins: ``register(name, fn)`` with
``fn(probs, n_select, *, rate, seed, **options) -> list[np.ndarray]`` (one index array per row).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from esn.errors import EsnError
from esn.plugins import hookimpl


def n_selected(rate: float, n_neurons: int) -> int:
    """``floor(rate * n_neurons)``, robust to binary fractions (0.005 * 1000 is 5, not 4)."""
    return int(math.floor(rate * n_neurons + 1e-9))


def _top(score: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest finite scores, ties to the lower index, returned sorted."""
    finite = np.flatnonzero(np.isfinite(score))
    order = finite[np.argsort(-score[finite], kind="stable")]
    return np.sort(order[:k]).astype(np.int64)


def lap(probs: np.ndarray, n_select: int, **_) -> list[np.ndarray]:
    """Top ``n_select`` neurons by activation probability P_e."""
    return [_top(row, n_select) for row in probs]


def lape(probs: np.ndarray, n_select: int, *, rate: float, quantile: float = 0.95, **_) -> list[np.ndarray]:
    """Low-entropy pool of active neurons, then top P_e within the pool.

    ``tau_p`` is the ``quantile`` of all P values; a neuron stays if ``max_e P > tau_p``. The
    ``floor(min(1, 5r) N)`` lowest-entropy survivors form the pool (0 log 0 = 0).
    """
    if not 0.0 <= quantile <= 1.0:
        raise EsnError(f"LAPE quantile must be in [0, 1], got {quantile}")
    n = probs.shape[1]
    total = probs.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        norm = np.where(total > 0, probs / np.where(total > 0, total, 1), 0.0)
        plogp = np.where(norm > 0, norm * np.log(np.where(norm > 0, norm, 1)), 0.0)
    entropy = -plogp.sum(axis=0)
    tau = np.quantile(probs, quantile)
    alive = np.flatnonzero(probs.max(axis=0) > tau)
    pool_size = n_selected(min(1.0, 5 * rate), n)
    pool = alive[np.argsort(entropy[alive], kind="stable")][:pool_size]
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

    A neuron whose top value is shared by two emotions belongs to the lower emotion row, margin 0.
    """
    if probs.shape[0] < 2:
        raise EsnError("CAS needs at least two emotions")
    top = np.argmax(probs, axis=0)
    ordered = np.sort(probs, axis=0)
    margin = ordered[-1] - ordered[-2]
    out = []
    for e in range(probs.shape[0]):
        score = np.where(top == e, margin, -np.inf)
        out.append(_top(score, n_select))
    return out


def random(probs: np.ndarray, n_select: int, *, seed: int = 0, **_) -> list[np.ndarray]:
    """``n_select`` neurons uniformly without replacement, an independent seeded draw per emotion row."""
    n = probs.shape[1]
    return [
        np.sort(np.random.default_rng([seed, e]).choice(n, size=n_select, replace=False)).astype(np.int64)
        for e in range(probs.shape[0])
    ]


BUILTIN = {"lap": lap, "lape": lape, "mad": mad, "cas": cas, "random": random}


@hookimpl
def register_selectors(register):
    for name, fn in BUILTIN.items():
        register(name, fn)


def select_neurons(
    probs,
    method: str,
    rate: float,
    *,
    emotions: Sequence[str],
    seed: int = 0,
    **options,
) -> dict[str, np.ndarray]:
    """Select neurons per emotion. ``probs`` ``[E, N]``, rows in ``emotions`` order.

    Returns ``{emotion: sorted int64 flat indices}``. Raises ``EsnError`` for a bad rate, shape, NaN,
    or a rate so small that ``floor(rate * N) == 0``.
    """
    from esn.plugins import registry

    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise EsnError(f"probs must be a 2-D [emotions, neurons] array, got shape {probs.shape}")
    emotions = list(emotions)
    if len(emotions) != probs.shape[0]:
        raise EsnError(f"{len(emotions)} emotions given for {probs.shape[0]} probability rows")
    if len(set(emotions)) != len(emotions):
        raise EsnError(f"duplicate emotions: {emotions}")
    if not np.all(np.isfinite(probs)) or probs.min(initial=0) < 0 or probs.max(initial=0) > 1:
        raise EsnError("probs must be finite activation probabilities in [0, 1]")
    if not (isinstance(rate, (int, float)) and 0 < rate <= 1):
        raise EsnError(f"selection rate r must be in (0, 1], got {rate!r}")
    n_select = n_selected(rate, probs.shape[1])
    if n_select == 0:
        raise EsnError(
            f"rate r={rate} selects floor(r*N) = 0 of N={probs.shape[1]} neurons; use r >= {1 / probs.shape[1]:.3g}"
        )
    fn = registry().selector(method.lower())
    rows = fn(probs, n_select, rate=rate, seed=seed, **options)
    if len(rows) != len(emotions):
        raise EsnError(f"selector {method!r} returned {len(rows)} rows for {len(emotions)} emotions")
    return {e: np.asarray(r, dtype=np.int64) for e, r in zip(emotions, rows, strict=True)}
