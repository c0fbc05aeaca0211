"""The plugin hooks of esn. A plugin module implements any of them with ``@esn.plugins.hookimpl``.

Each hook hands the plugin a ``register`` callback, the style of ``llm``: a plugin calls it once per
thing it contributes. Built-in selectors and interventions register through these same hooks.
Every hook here must be documented in ``docs/plugins.md`` and have a ``test_hook_<name>`` test.
"""

import pluggy

hookspec = pluggy.HookspecMarker("esn")


@hookspec
def register_adapters(register):
    """Register model adapters: ``register(AdapterClass)``, a subclass of ``esn.adapters.ModelAdapter``."""


@hookspec
def register_judges(register):
    """Register judges: ``register(JudgeClass)``, a subclass of ``esn.judges.Judge``."""


@hookspec
def register_selectors(register):
    """Register neuron selectors: ``register(name, fn)``, ``fn(probs [E, N], n_select, *, rate, seed, emotions, **options)``
    returning one array of flat neuron indices per emotion row."""


@hookspec
def register_interventions(register):
    """Register gate interventions: ``register(Intervention)``, see ``esn.interventions``."""
