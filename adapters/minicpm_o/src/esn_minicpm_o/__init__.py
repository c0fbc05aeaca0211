"""esn adapter for MiniCPM-o 4.5 (remote code ``MiniCPMO``: ``llm`` Qwen3 + ``tts`` Llama).

Importing this package is cheap: transformers and the model's remote code load inside ``load``.
"""

from esn_minicpm_o.adapter import MiniCPMOAdapter

__all__ = ["MiniCPMOAdapter"]
