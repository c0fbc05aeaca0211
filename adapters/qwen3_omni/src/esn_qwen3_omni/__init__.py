"""esn adapter for Qwen3-Omni: routed-expert, shared-expert and code-predictor gates, and EVC generation."""

from esn_qwen3_omni.adapter import Qwen3OmniAdapter

__all__ = ["Qwen3OmniAdapter"]
