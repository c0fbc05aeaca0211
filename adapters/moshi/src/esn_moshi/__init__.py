"""esn adapter for Kyutai Moshi: fused-gate temporal transformer (lm), per-codebook depth decoder (synth)."""

from esn_moshi.adapter import MoshiAdapter

__all__ = ["MoshiAdapter"]
