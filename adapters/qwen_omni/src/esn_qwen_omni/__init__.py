"""esn adapter for Qwen2.5-Omni (``Qwen2_5OmniForConditionalGeneration``, native in transformers).

Importing this package is cheap: torch and transformers are imported inside the methods that need them.
"""

from esn_qwen_omni.adapter import QwenOmniAdapter

__all__ = ["QwenOmniAdapter"]
