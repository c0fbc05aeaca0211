"""``KimiModule``: the ``nn.Module`` view of a ``KimiAudio`` wrapper (kept apart: it needs torch at import)."""

from __future__ import annotations

from typing import Any

from esn.errors import EsnError
from torch import nn


class KimiModule(nn.Module):
    """An ``nn.Module`` view of a ``KimiAudio`` wrapper: ``alm`` is its one child, so hook paths read
    ``alm.model.layers.{l}.mlp.act_fn`` and parameters, devices and hook checks work as for any model."""

    def __init__(self, kimia: Any):
        super().__init__()
        self.alm = kimia.alm
        object.__setattr__(self, "kimia", kimia)  # the wrapper itself is not a module

    @property
    def config(self) -> Any:
        """The ALM's config (``architectures`` and sizes)."""
        return self.alm.config

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise EsnError("Kimi-Audio runs through KimiAudioAdapter.generate (kimia_infer's own decode loop)")
