"""esn adapter for Kimi-Audio (``kimia_infer.api.kimia.KimiAudio``; ALM ``MoonshotKimiaForCausalLM``).

Importing this package is cheap: ``kimia_infer`` (not on PyPI) is imported inside ``load``.
"""

from esn_kimi_audio.adapter import KimiAudioAdapter

__all__ = ["KimiAudioAdapter"]
