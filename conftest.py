"""Root test configuration: tests load only this repository's own plugins, never stray installed ones."""

import os

# Entry-point names of the plugins this repository ships. A test that needs another plugin registers
# it explicitly (esn.plugins.registry_with) or sets ESN_LOAD_PLUGINS in a subprocess.
OWN_PLUGINS = ("qwen_omni", "qwen3_omni", "minicpm_o", "kimi_audio", "moshi", "emotion2vec", "utmos", "lalm_judge",
               "planted")

os.environ.setdefault("ESN_LOAD_PLUGINS", ",".join(OWN_PLUGINS))
