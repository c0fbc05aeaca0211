"""Fast greedy decoding: a static step captured as a CUDA graph, with esn's hooks inside.

``Decoder`` (``esn.decode.engine``) is model-agnostic: an adapter supplies the step of its stream.
``esn.decode.graphs`` says how hooks take part; ``CausalLMDecoding`` is a ready step for plain
transformers causal LMs; ``esn.decode.policy`` decides how an adapter decodes (and imports no torch, so
the names below load on first use).
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {"CausalLMDecoding": "causal_lm", "left_padding": "causal_lm", "prompt_positions": "causal_lm",
          "Decoded": "engine", "Decoder": "engine", "DecodeState": "engine", "Greedy": "engine"}
__all__ = ["CausalLMDecoding", "DecodeState", "Decoded", "Decoder", "Greedy", "left_padding", "prompt_positions"]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'esn.decode' has no attribute {name!r}")
    return getattr(importlib.import_module(f"esn.decode.{_HOMES[name]}"), name)
