"""Plugin discovery: pluggy, entry-point group ``esn``, filtered by ``ESN_LOAD_PLUGINS``.

``ESN_LOAD_PLUGINS`` unset loads every installed plugin; set to a comma-separated list of entry-point
or distribution names it loads only those; set to the empty string it loads none. Built-ins always load.
A plugin that fails to import or to register is skipped with a warning that names its distribution.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata as md
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from esn import hookspecs
from esn.errors import EsnError

GROUP = "esn"
hookimpl = pluggy.HookimplMarker("esn")
BUILTIN_MODULES = ("esn.selection", "esn.interventions")


class PluginWarning(UserWarning):
    """A plugin could not be loaded or registered; it was skipped."""


@dataclass
class PluginInfo:
    """One loaded plugin: its entry-point (or module) name, distribution, version and the hooks it implements."""
    name: str  # entry-point name (or module name for built-ins)
    distribution: str
    version: str
    hooks: list[str] = field(default_factory=list)


@dataclass
class Registry:
    """Everything the loaded plugins registered, keyed by name."""

    adapters: dict[str, Any] = field(default_factory=dict)
    judges: dict[str, Any] = field(default_factory=dict)
    selectors: dict[str, Callable] = field(default_factory=dict)
    interventions: dict[str, Any] = field(default_factory=dict)
    plugins: list[PluginInfo] = field(default_factory=list)
    # which plugin registered each thing: (kind, name) -> PluginInfo
    origin: dict[tuple[str, str], PluginInfo] = field(default_factory=dict)

    def adapter(self, name: str) -> Any:
        """The adapter class registered as ``name``; EsnError naming what is installed or close."""
        return _lookup(self.adapters, name, "adapter", "`esn adapters list` shows what is installed")

    def judge(self, name: str) -> Any:
        """The judge class registered as ``name``; EsnError naming the distribution that brings it."""
        return _lookup(self.judges, name, "judge", "`esn plugins list` shows what is installed")

    def selector(self, name: str) -> Callable:
        """The selector function registered as ``name``."""
        return _lookup(self.selectors, name, "selector", "")

    def intervention(self, name: str) -> Any:
        """The intervention class registered as ``name``."""
        return _lookup(self.interventions, name, "intervention", "")


# First-party plugins by kind and name: the distribution that brings each and what it pulls in, so that a
# missing one is named in the error instead of guessed from the typed name.
FIRST_PARTY: dict[tuple[str, str], tuple[str, str]] = {
    ("adapter", "qwen_omni"): ("esn-qwen-omni", "transformers"),
    ("adapter", "minicpm_o"): ("esn-minicpm-o", "transformers; the model runs its own remote code"),
    ("adapter", "kimi_audio"): ("esn-kimi-audio", "transformers; the model needs kimia_infer from its own repository"),
    ("adapter", "qwen3_omni"): ("esn-qwen3-omni", "transformers >= 5.24 (fused experts)"),
    ("adapter", "moshi"): ("esn-moshi", "transformers"),
    ("judge", "emotion2vec"): ("esn-emotion2vec", "funasr, about 890 MB with its dependencies"),
    ("judge", "lalm_judge"): ("esn-lalm-judge", "transformers; the judge model has 30B parameters"),
    ("judge", "utmos"): ("esn-utmos", "utmos-pytorch"),
    ("adapter", "planted"): ("esn-planted", "transformers; the synthetic model and judge of `esn demo`"),
    ("judge", "planted"): ("esn-planted", "transformers; the synthetic model and judge of `esn demo`"),
}


def _lookup(table: dict, name: str, kind: str, hint: str) -> Any:
    try:
        return table[name]
    except KeyError:
        raise EsnError(missing_message(kind, name, sorted(table), hint)) from None


def missing_message(kind: str, name: str, installed: Iterable[str], hint: str = "") -> str:
    """The error for an unknown plugin ``name``: which distribution brings it, or the names it resembles."""
    installed = list(installed)
    message = f"unknown {kind} {name!r} (known: {', '.join(installed) or 'none installed'})"
    if (kind, name) in FIRST_PARTY:
        from esn.install import pip_install

        dist, brings = FIRST_PARTY[(kind, name)]
        return (f"{message}: {name!r} is a first-party {kind} of the distribution {dist}, which brings {brings}; "
                f"install it with `{pip_install(dist)}` (docs/install.md), then `esn plugins list` shows it")
    known = set(installed) | {n for k, n in FIRST_PARTY if k == kind}
    close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
    if close:
        return f"{message}; did you mean {' or '.join(map(repr, close))}?"
    return f"{message}; {hint}" if hint else message


def _allowed() -> set[str] | None:
    raw = os.environ.get("ESN_LOAD_PLUGINS")
    if raw is None:
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


def _entry_points() -> Iterable[md.EntryPoint]:
    return md.entry_points(group=GROUP)


def make_plugin_manager(*, load_installed: bool = True, extra: Iterable[Any] = ()) -> tuple[pluggy.PluginManager, dict]:
    """A plugin manager with built-ins, the allowed installed plugins, and ``extra`` plugin objects."""
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    infos: dict[int, PluginInfo] = {}
    from esn import __version__

    for modname in BUILTIN_MODULES:
        module = importlib.import_module(modname)
        pm.register(module, name=modname)
        infos[id(module)] = PluginInfo(modname, "esn-core", __version__)
    if load_installed:
        allowed = _allowed()
        for ep in _entry_points():
            dist = ep.dist.name if ep.dist else "?"
            if allowed is not None and ep.name not in allowed and dist not in allowed:
                continue
            if pm.get_plugin(ep.name) is not None:
                continue
            try:
                plugin = ep.load()
                pm.register(plugin, name=ep.name)
            except Exception as exc:  # a broken plugin must never take esn down
                warnings.warn(
                    f"esn plugin {ep.name!r} from distribution {dist!r} failed to load and was skipped: "
                    f"{type(exc).__name__}: {exc}",
                    PluginWarning,
                    stacklevel=2,
                )
                continue
            infos[id(plugin)] = PluginInfo(ep.name, dist, ep.dist.version if ep.dist else "?")
    for plugin in extra:
        name = getattr(plugin, "__name__", None) or type(plugin).__name__
        pm.register(plugin, name=name)
        infos[id(plugin)] = PluginInfo(name, "(registered in code)", "")
    return pm, infos


def collect(pm: pluggy.PluginManager, infos: dict) -> Registry:
    """Call every register hook, one plugin at a time so that one failure skips only that plugin."""
    registry = Registry()
    tables = {
        "register_adapters": ("adapters", lambda cls: (cls.name, cls)),
        "register_judges": ("judges", lambda cls: (cls.name, cls)),
        "register_selectors": ("selectors", lambda name, fn: (name, fn)),
        "register_interventions": ("interventions", lambda cls: (cls.name, cls)),
    }
    for plugin in pm.get_plugins():
        info = infos.get(id(plugin)) or PluginInfo(pm.get_name(plugin) or "?", "?", "?")
        registry.plugins.append(info)
        for hook_name, (kind, key) in tables.items():
            impls = [i for i in getattr(pm.hook, hook_name).get_hookimpls() if i.plugin is plugin]
            if not impls:
                continue
            info.hooks.append(hook_name)
            staged: dict[str, Any] = {}

            def register(*args, _staged=staged, _key=key):
                name, value = _key(*args)
                _staged[name] = value

            try:
                impls[0].function(register=register)
            except Exception as exc:
                warnings.warn(
                    f"esn plugin {info.name!r} from distribution {info.distribution!r} failed in "
                    f"{hook_name} and was skipped: {type(exc).__name__}: {exc}",
                    PluginWarning,
                    stacklevel=2,
                )
                continue
            table = getattr(registry, kind)
            for name, value in staged.items():
                table[name] = value
                registry.origin[(kind, name)] = info
    return registry


_cached: Registry | None = None


def registry(*, refresh: bool = False) -> Registry:
    """The process-wide registry of built-ins plus allowed installed plugins (cached)."""
    global _cached
    if _cached is None or refresh:
        _cached = collect(*make_plugin_manager())
    return _cached


def registry_with(*plugins: Any, load_installed: bool = False) -> Registry:
    """A fresh registry of built-ins plus the given plugin objects (modules or instances), for tests."""
    return collect(*make_plugin_manager(load_installed=load_installed, extra=plugins))
