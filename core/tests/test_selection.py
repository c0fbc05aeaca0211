"""Selectors computed by hand on small matrices (values chosen to be exact in binary where ties matter)."""

import math
import types

import numpy as np
import pytest
from esn.errors import EsnError
from esn.plugins import hookimpl, registry_with
from esn.selection import entropy, n_selected, select_neurons

BUILTINS = registry_with()  # built-ins only: these tests do not import installed plugins


def sel(probs, method, rate, emotions=None, **kw):
    probs = np.asarray(probs, dtype=float)
    emotions = emotions or [f"e{i}" for i in range(probs.shape[0])]
    out = select_neurons(probs, method, rate, emotions=emotions, registry=BUILTINS, **kw)
    for idx in out.values():
        assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)
    return [out[e].tolist() for e in emotions]


def test_n_selected_is_floor_of_the_rate_as_written():
    assert n_selected(0.29, 100) == 29  # 0.29 * 100 == 28.999999999999996 in floats
    assert n_selected(0.005, 1000) == 5
    assert n_selected(0.005, 530_432) == 2652
    assert n_selected(1 / 6, 6) == 1
    assert n_selected(0.5, 3) == 1


def test_lap_by_hand_with_ties_to_the_lower_index():
    p = [[0.5, 0.9, 0.9, 0.0, 0.1],
         [0.2, 0.2, 0.8, 0.0, 0.7]]
    assert sel(p, "lap", 0.4) == [[1, 2], [2, 4]]  # N_sel = 2
    assert sel(p, "lap", 0.2) == [[1], [2]]  # tie 0.9 at 1 and 2 -> 1
    assert sel([[0.3] * 4, [0.0] * 4], "lap", 0.5) == [[0, 1], [0, 1]]  # all-equal and all-zero rows


# E = 4, N = 5. Column means [0.25, 0.5, 0, 0.25, 0.5]. Column 2 is an all-zero neuron.
P4 = [[1.0, 0.5, 0.0, 0.25, 0.5],
      [0.0, 0.5, 0.0, 0.25, 0.5],
      [0.0, 0.5, 0.0, 0.25, 0.0],
      [0.0, 0.5, 0.0, 0.25, 1.0]]


def test_mad_by_hand():
    # |P - mean|: row0 [.75,0,0,0,0], row1 [.25,0,0,0,0], row2 [.25,0,0,0,.5], row3 [.25,0,0,0,.5]
    # N_sel = floor(0.4 * 5) = 2; zero scores tie -> lowest index (1) fills row 0 and row 1.
    assert sel(P4, "mad", 0.4) == [[0, 1], [0, 1], [0, 4], [0, 4]]
    assert sel(P4, "mad", 0.2) == [[0], [0], [4], [4]]


def test_cas_by_hand_fewer_candidates_than_n_sel():
    # col0: top row0, margin 1; col4: top row3, margin .5; cols 1-3 tie at the top (margin 0): no one's.
    assert sel(P4, "cas", 0.4) == [[0], [], [], [4]]


def test_cas_ranks_by_margin_and_ignores_ties_and_dead_neurons():
    p = [[0.75, 0.5, 0.25, 0.0, 0.5, 0.5],
         [0.25, 0.75, 0.25, 0.0, 0.5, 0.0],
         [0.5, 0.0, 0.75, 0.0, 0.0, 0.25]]
    # margins: col0 .25 (row0), col1 .25 (row1), col2 .5 (row2), col3 dead, col4 tie, col5 .25 (row0)
    assert sel(p, "cas", 2 / 6) == [[0, 5], [1], [2]]
    assert sel(p, "cas", 1 / 6) == [[0], [1], [2]]  # row0 tie of .25 at cols 0 and 5 -> 0
    # The rows' order does not change any emotion's mask (ties belong to no row).
    names = ["a", "b", "c"]
    fwd = select_neurons(np.array(p), "cas", 0.5, emotions=names, registry=BUILTINS)
    rev = select_neurons(np.array(p)[::-1], "cas", 0.5, emotions=names[::-1], registry=BUILTINS)
    assert {k: v.tolist() for k, v in fwd.items()} == {k: v.tolist() for k, v in rev.items()}


def test_cas_needs_two_emotions():
    with pytest.raises(EsnError, match="at least two emotions"):
        sel([[0.5, 0.2]], "cas", 0.5)


# E = 2, N = 10; values chosen so the entropies are far apart.
PL = [[0.9, 0.8, 0.5, 0.0, 0.6, 0.1, 0.3, 0.4, 0.05, 0.0],
      [0.1, 0.8, 0.0, 0.0, 0.2, 0.6, 0.3, 0.2, 0.55, 0.0]]


def test_entropy_by_hand():
    h = entropy(np.array(PL))
    def H(*p):
        return -sum(x * math.log(x) for x in p if x > 0)
    expected = [H(.9, .1), H(.5, .5), 0.0, 0.0, H(.75, .25), H(1 / 7, 6 / 7), H(.5, .5), H(2 / 3, 1 / 3),
                H(1 / 12, 11 / 12), 0.0]
    np.testing.assert_allclose(h, expected, rtol=1e-12)


def test_lape_by_hand():
    # Sorted 20 values: five 0s, .05, .1, .1, .2, .2 | .3, ... -> median (linear) = (.2 + .3) / 2 = .25.
    # Survivors (max_e P > .25): 0 1 2 4 5 6 7 8.  Entropy order: 2 (0), 8 (.287), 0 (.325), 5 (.410),
    # 4 (.562), 7 (.637), 1 = 6 (.693).
    # r = 0.1: N_sel = 1, pool = floor(0.5 * 10) = 5 lowest -> {2, 8, 0, 5, 4}; col 1 (.8, .8) is out.
    assert sel(PL, "lape", 0.1, quantile=0.5) == [[0], [5]]
    # r = 0.2: pool = all 8 survivors; top 2 by P_e.
    assert sel(PL, "lape", 0.2, quantile=0.5) == [[0, 1], [1, 5]]
    # Default q = 0.95: tau = .8 + .05 * (.9 - .8) = .805, only neuron 0 survives -> fewer than N_sel.
    assert sel(PL, "lape", 0.2) == [[0], [0]]


def test_lape_rejects_a_bad_quantile():
    with pytest.raises(EsnError, match="quantile must be in"):
        sel(PL, "lape", 0.1, quantile=1.5)


def test_random_is_seeded_uniform_and_independent_per_emotion():
    p = np.zeros((3, 1000))
    names = ["happy", "sad", "angry"]
    a = select_neurons(p, "random", 0.05, emotions=names, seed=7, registry=BUILTINS)
    b = select_neurons(p, "random", 0.05, emotions=names, seed=7, registry=BUILTINS)
    c = select_neurons(p, "random", 0.05, emotions=names, seed=8, registry=BUILTINS)
    assert all(len(v) == 50 and len(np.unique(v)) == 50 and v.max() < 1000 for v in a.values())
    assert all(np.array_equal(a[e], b[e]) for e in names)
    assert not np.array_equal(a["happy"], c["happy"])
    assert not np.array_equal(a["happy"], a["sad"])
    # Each emotion's draw depends on its name and the seed only, not on the other rows or their order.
    solo = select_neurons(p[:1], "random", 0.05, emotions=["sad"], seed=7, registry=BUILTINS)
    assert np.array_equal(solo["sad"], a["sad"])


def test_rate_so_small_that_nothing_is_selected_is_an_error():
    with pytest.raises(EsnError, match=r"selects floor\(r\*N\) = 0 of N=10 neurons; use r >= 0.1"):
        sel(PL, "lap", 0.05)


@pytest.mark.parametrize("rate", [0, -0.1, 1.5, True, "0.1", float("nan")])
def test_bad_rates(rate):
    with pytest.raises(EsnError, match="selection rate r"):
        sel(PL, "lap", rate)


def test_bad_inputs():
    with pytest.raises(EsnError, match="2-D"):
        sel(np.zeros(5), "lap", 0.5, emotions=["a"])
    with pytest.raises(EsnError, match="3 emotions given for 2"):
        sel(np.zeros((2, 5)), "lap", 0.5, emotions=["a", "b", "c"])
    with pytest.raises(EsnError, match="duplicate emotions"):
        sel(np.zeros((2, 5)), "lap", 0.5, emotions=["a", "a"])
    with pytest.raises(EsnError, match="in \\[0, 1\\]"):
        sel(np.array([[0.5, np.nan]]), "lap", 0.5, emotions=["a"])
    with pytest.raises(EsnError, match="unknown selector 'nope'"):
        sel(np.zeros((2, 5)), "nope", 0.5, emotions=["a", "b"])


def _plugin(fn, name):
    module = types.ModuleType("my_selectors")
    module.register_selectors = hookimpl(lambda register: register(name, fn))
    return module


def test_third_party_selector_through_the_plugin_hook():
    def last(probs, n_select, *, rate, seed, emotions, **options):
        # the highest flat indices, shifted per row by an option of its own
        return [np.arange(probs.shape[1] - n_select, probs.shape[1]) - options.get("shift", 0) * i
                for i in range(len(emotions))]

    reg = registry_with(_plugin(last, "last"))
    out = select_neurons(np.zeros((2, 10)), "last", 0.2, emotions=["a", "b"], registry=reg, shift=3)
    assert {k: v.tolist() for k, v in out.items()} == {"a": [8, 9], "b": [5, 6]}
    with pytest.raises(EsnError, match="unknown selector 'last'"):  # the built-ins alone do not know it
        select_neurons(np.zeros((2, 10)), "last", 0.2, emotions=["a", "b"], registry=BUILTINS)


@pytest.mark.parametrize(
    ("rows", "match"),
    [([[0, 99], [1]], "outside 0..9"), ([[1, 1], [2]], "unique"), ([[1, 2, 3], [4]], "at most N_sel=2"),
     ([[1]], "returned 1 rows for 2")],
)
def test_a_misbehaving_selector_is_caught(rows, match):
    reg = registry_with(_plugin(lambda probs, n_select, **_: [np.array(r) for r in rows], "bad"))
    with pytest.raises(EsnError, match=match):
        select_neurons(np.zeros((2, 10)), "bad", 0.2, emotions=["a", "b"], registry=reg)
