"""Mask analyses by hand: per-layer counts (Figure 9), Jaccard, direct match and layer JSD (Table 5)."""

import math

import numpy as np
import pytest
from esn.analysis import (
    compare,
    direct_match,
    jaccard,
    jensen_shannon,
    layer_counts,
    layer_jsd,
    per_hook_point,
)
from esn.errors import EsnError
from esn.hookpoints import HookPoint, Layout
from esn.masks import Mask

# lm layers 0-2 (flat 0-11), synth layers 0-1 (flat 12-15)
LAYOUT = Layout([HookPoint("lm", k, 4, f"m{k}") for k in range(3)] + [HookPoint("synth", k, 2, f"t{k}") for k in range(2)])
A = Mask(np.array([0, 1, 5, 9, 13]), LAYOUT)
B = Mask(np.array([1, 5, 6, 14, 15]), LAYOUT)


def test_counts_per_hook_point_and_layer():
    assert per_hook_point(A, LAYOUT).tolist() == [2, 1, 1, 1, 0]
    assert per_hook_point(B, LAYOUT).tolist() == [1, 2, 0, 0, 2]
    counts = layer_counts({"happy": A, "sad": B}, LAYOUT)
    assert counts["lm"].tolist() == [[2, 1, 1], [1, 2, 0]]
    assert counts["synth"].tolist() == [[1, 0], [0, 2]]
    sparse = Layout([HookPoint("lm", 2, 3, "x"), HookPoint("lm", 5, 3, "y")])  # layers 0, 1, 3, 4 not hooked
    assert layer_counts({"e": np.array([0, 4, 5])}, sparse)["lm"].tolist() == [[0, 0, 1, 0, 0, 2]]
    with pytest.raises(EsnError, match="out of range"):
        per_hook_point(np.array([16]), LAYOUT)


def test_jaccard_and_direct_match_by_hand():
    # A ∩ B = {1, 5}; A ∪ B has 8 neurons
    assert jaccard(A, B) == 2 / 8
    assert direct_match(A, B) == 2 / 5
    assert direct_match(B, A) == 2 / 5
    assert jaccard(A, A) == 1.0 and jaccard(np.array([]), np.array([])) == 1.0
    with pytest.raises(EsnError, match="empty reference"):
        direct_match(np.array([]), A)


def test_the_papers_angry_row():
    # Table 5, angry: two 14-neuron masks sharing 5 give 35.71% direct match and Jaccard 0.217.
    a, b = np.arange(14), np.arange(9, 23)
    assert round(direct_match(a, b) * 100, 2) == 35.71
    assert round(jaccard(a, b), 3) == 0.217
    d = direct_match(a, b)
    assert jaccard(a, b) == pytest.approx(d / (2 - d))


def test_layer_jsd_by_hand():
    # p = [.4 .2 .2 .2 0], q = [.2 .4 0 0 .4], m = [.3 .3 .1 .1 .2]
    kl = 0.4 * math.log2(0.4 / 0.3) + 0.2 * math.log2(0.2 / 0.3) + 0.4 * math.log2(2)
    assert layer_jsd(A, B, LAYOUT) == pytest.approx(kl)  # both KL terms are equal here
    assert layer_jsd(A, A, LAYOUT) == 0.0
    assert jensen_shannon([1, 0], [0, 3]) == pytest.approx(1.0)  # disjoint supports: the base-2 maximum
    assert jensen_shannon([1, 1], [1, 3]) == pytest.approx(jensen_shannon([0.5, 0.5], [0.25, 0.75]))
    with pytest.raises(EsnError, match="positive sum"):
        jensen_shannon([0, 0], [1, 0])


def test_compare_two_mask_sets():
    rows = compare({"happy": A, "sad": A}, {"sad": B, "happy": A, "angry": B}, LAYOUT)
    assert list(rows) == ["happy", "sad", "average"]
    assert rows["happy"].jaccard == 1.0 and rows["happy"].jsd == 0.0
    assert rows["sad"].direct_match == 0.4
    assert rows["average"].jaccard == pytest.approx((1 + 0.25) / 2)
    with pytest.raises(EsnError, match="share no emotion"):
        compare({"happy": A}, {"sad": B}, LAYOUT)
