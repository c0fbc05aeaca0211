"""The pure function apply_intervention: hand-computed values, validation, and the plugin hook."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from esn.errors import EsnError
from esn.interventions import Affine, Intervention, apply_intervention, get_intervention
from esn.plugins import hookimpl, registry, registry_with

GATE = torch.tensor([[-1.0, 0.5, 2.0, -0.25, 4.0]])  # [1, 5]; every value exact in float32 and bf16
SEL = torch.tensor([0, 2, 3])


@pytest.mark.parametrize(
    ("method", "alpha", "want"),
    [
        ("steer", 1.0, [-2.0, 0.5, 4.0, -0.5, 4.0]),
        ("steer", 0.5, [-1.5, 0.5, 3.0, -0.375, 4.0]),
        ("steer", -1.0, [0.0, 0.5, 0.0, 0.0, 4.0]),
        ("steer", None, [-2.0, 0.5, 4.0, -0.5, 4.0]),  # None: the paper's default 1.0
        ("add", 0.25, [-0.75, 0.5, 2.25, 0.0, 4.0]),
        ("add", -1.0, [-2.0, 0.5, 1.0, -1.25, 4.0]),
        ("clamp", 0.0, [0.0, 0.5, 2.0, 0.0, 4.0]),
        ("clamp", 3.0, [3.0, 0.5, 3.0, 3.0, 4.0]),
        ("deactivate", None, [0.0, 0.5, 0.0, 0.0, 4.0]),
        ("deactivate", 0, [0.0, 0.5, 0.0, 0.0, 4.0]),
    ],
)
def test_hand_computed_values(method, alpha, want):
    before = GATE.clone()
    out = apply_intervention(GATE, SEL, method, alpha)
    assert torch.equal(out, torch.tensor([want]))
    assert torch.equal(GATE, before), "apply_intervention must not modify its input"
    # Same values in bf16 and on a [batch, pos, D] gate (the last dim is the neuron dim).
    half = apply_intervention(GATE.to(torch.bfloat16).expand(2, 3, 5), SEL.tolist(), method, alpha)
    assert half.dtype == torch.bfloat16 and half.shape == (2, 3, 5)
    assert torch.equal(half.float(), torch.tensor(want).expand(2, 3, 5))


def test_indices_accept_numpy_and_empty():
    out = apply_intervention(GATE, np.array([4], dtype=np.int32), "steer", 1.0)
    assert out[0, 4] == 8.0 and torch.equal(out[0, :4], GATE[0, :4])
    empty = apply_intervention(GATE, [], "deactivate")
    assert torch.equal(empty, GATE) and empty is not GATE


@pytest.mark.parametrize(
    ("method", "alpha", "match"),
    [
        ("steer", -1.5, "steer alpha must be >= -1"),
        ("steer", math.nan, "needs a finite real alpha"),
        ("add", math.inf, "needs a finite real alpha"),
        ("clamp", -math.inf, "needs a finite real alpha"),
        ("add", "0.5", "needs a finite real alpha"),
        ("steer", True, "needs a finite real alpha"),
        ("deactivate", 1.0, "takes no alpha"),
        ("deactivate", True, "takes no alpha"),
        ("boost", 1.0, r"unknown intervention 'boost' \(known: add, clamp, deactivate, steer"),
        (3, 1.0, "must be a name"),
    ],
)
def test_bad_alpha_and_method(method, alpha, match):
    with pytest.raises(EsnError, match=match):
        apply_intervention(GATE, SEL, method, alpha)


@pytest.mark.parametrize(
    ("indices", "match"),
    [
        ([5], r"\[0, 5\).*got 5..5"),
        ([-1, 2], r"\[0, 5\).*got -1..2"),
        (torch.tensor([0.0, 1.0]), "must be integers"),
        (torch.tensor([True, False]), "must be integers"),
    ],
)
def test_bad_indices(indices, match):
    with pytest.raises(EsnError, match=match):
        apply_intervention(GATE, indices, "steer", 1.0)


def test_bad_gate():
    with pytest.raises(EsnError, match="floating-point tensor"):
        apply_intervention(torch.tensor([1, 2, 3]), [0], "steer", 1.0)


def test_builtins_are_one_affine_form():
    """All four built-ins are max(g * scale + shift, floor); the engine relies on it."""
    assert get_intervention("steer").affine(0.5) == Affine(scale=1.5)
    assert get_intervention("add").affine(0.5) == Affine(shift=0.5)
    assert get_intervention("clamp").affine(0.5) == Affine(floor=0.5)
    assert get_intervention("deactivate").affine(0.0) == Affine(scale=0.0)
    assert {n for n, c in registry().interventions.items() if c.foldable} >= {"steer", "deactivate"}


class Square(Intervention):
    """A third-party intervention with no affine form: selected neurons -> alpha * g**2."""

    name = "square"

    @classmethod
    def apply(cls, gate, indices, alpha):
        out = gate.clone()
        out[..., indices] = alpha * out[..., indices] ** 2
        return out


class Halve(Intervention):
    """A third-party affine intervention: selected neurons -> g / 2 + alpha."""

    name = "halve"

    @classmethod
    def affine(cls, alpha):
        return Affine(scale=0.5, shift=alpha)


class ThirdParty:
    @hookimpl
    def register_interventions(self, register):
        register(Square)
        register(Halve)


def test_hook_register_interventions():
    reg = registry_with(ThirdParty())
    assert reg.interventions["square"] is Square and reg.interventions["halve"] is Halve
    assert reg.intervention("steer") is get_intervention("steer")  # built-ins stay
    out = apply_intervention(GATE, SEL, "square", 2.0, registry=reg)
    assert torch.equal(out, torch.tensor([[2.0, 0.5, 8.0, 0.125, 4.0]]))
    out = apply_intervention(GATE, SEL, "halve", 1.0, registry=reg)
    assert torch.equal(out, torch.tensor([[0.5, 0.5, 2.0, 0.875, 4.0]]))
    # A class can be passed directly, and the default registry does not know the plugin.
    assert torch.equal(apply_intervention(GATE, SEL, Halve, 1.0), out)
    with pytest.raises(EsnError, match="unknown intervention 'square'"):
        apply_intervention(GATE, SEL, "square", 2.0)
