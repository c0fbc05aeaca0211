"""The plugin system: built-ins, ESN_LOAD_PLUGINS, broken plugins, and the hookspec contract."""

import inspect
import re
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from esn import hookspecs
from esn.plugins import PluginWarning, hookimpl, make_plugin_manager, registry_with

DOCS = Path(__file__).resolve().parents[2] / "docs" / "plugins.md"
HOOKS = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("register_")]


def test_every_hookspec_is_documented_and_tested():
    text = DOCS.read_text()
    tests = {name for name in globals() if name.startswith("test_hook_")}
    for hook in HOOKS:
        assert f"### {hook}" in text, f"{hook} has no section in docs/plugins.md"
        assert getattr(hookspecs, hook).__doc__, f"{hook} has no docstring"
        assert f"test_hook_{hook}" in tests, f"{hook} has no test_hook_{hook}"


def test_builtins_register_through_the_same_hooks():
    reg = registry_with()
    assert set(reg.selectors) == {"lap", "lape", "mad", "cas", "random"}
    assert set(reg.interventions) == {"steer", "add", "clamp", "deactivate"}
    assert reg.origin[("selectors", "cas")].distribution == "esn-core"
    assert reg.adapters == {} and reg.judges == {}


def _plugin(**hooks):
    module = types.ModuleType("thirdparty_plugin")
    for name, fn in hooks.items():
        setattr(module, name, hookimpl(fn))
    return module


def test_hook_register_adapters():
    from esn.adapters import ModelAdapter

    class Toy(ModelAdapter):
        name = "toy"
        architectures = ("ToyForSpeech",)
        load = write_tiny = hook_points = generate = None

    reg = registry_with(_plugin(register_adapters=lambda register: register(Toy)))
    assert reg.adapter("toy") is Toy
    assert reg.origin[("adapters", "toy")].name == "thirdparty_plugin"


def test_hook_register_judges():
    from esn.judges import Judge

    class Coin(Judge):
        name = "coin"
        load = judge = None

    reg = registry_with(_plugin(register_judges=lambda register: register(Coin)))
    assert reg.judge("coin") is Coin


def test_hook_register_selectors():
    def first(probs, n_select, **_):
        return [np.arange(n_select) for _ in probs]

    reg = registry_with(_plugin(register_selectors=lambda register: register("first", first)))
    assert reg.selector("first")(np.zeros((2, 10)), 3)[1].tolist() == [0, 1, 2]


def test_hook_register_interventions():
    from esn.interventions import Affine, Intervention

    class Negate(Intervention):
        name = "negate"

        @classmethod
        def affine(cls, alpha):
            return Affine(scale=-1.0)

    reg = registry_with(_plugin(register_interventions=lambda register: register(Negate)))
    cls = reg.intervention("negate")
    out = cls.apply(torch.ones(1, 2, 4), torch.tensor([1, 2]), 0.0)
    assert out[0, 0].tolist() == [1.0, -1.0, -1.0, 1.0]


def test_plugin_that_raises_in_a_hook_is_skipped_with_a_warning():
    def boom(register):
        raise RuntimeError("kaput")

    with pytest.warns(PluginWarning, match=r"thirdparty_plugin.*register_selectors.*kaput"):
        reg = registry_with(_plugin(register_selectors=boom))
    assert "cas" in reg.selectors  # the built-ins still work


def test_unknown_names_give_one_clear_error():
    from esn.errors import EsnError

    reg = registry_with()
    with pytest.raises(EsnError, match=r"unknown selector 'nope' \(known: cas, lap, lape, mad, random\)"):
        reg.selector("nope")
    with pytest.raises(EsnError, match="unknown adapter 'nope'"):
        reg.adapter("nope")


def test_esn_load_plugins_empty_loads_no_installed_plugin(monkeypatch):
    monkeypatch.setenv("ESN_LOAD_PLUGINS", "")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pm, _ = make_plugin_manager()
    assert sorted(pm.get_name(p) for p in pm.get_plugins()) == ["esn.interventions", "esn.selection"]


def test_hook_names_follow_the_register_style():
    for hook in HOOKS:
        assert re.fullmatch(r"register_[a-z]+", hook)
        assert list(inspect.signature(getattr(hookspecs, hook)).parameters) == ["register"]
