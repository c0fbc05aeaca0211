"""A neuron mask: flat neuron indices over a layout, split per hook point for the hooks."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from esn.errors import EsnError
from esn.hookpoints import Layout


@dataclass
class Mask:
    """Selected neurons ``indices`` (sorted, unique int64 flat indices into ``layout``)."""

    indices: np.ndarray
    layout: Layout
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        idx = np.asarray(self.indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.layout.n_neurons):
            raise EsnError(f"mask index out of range 0..{self.layout.n_neurons - 1}")
        uniq = np.unique(idx)
        if uniq.size != idx.size:
            raise EsnError("mask indices must be unique")
        self.indices = uniq

    def __len__(self) -> int:
        return int(self.indices.size)

    def split(self) -> dict[str, np.ndarray]:
        """``{hook point name: local neuron indices}`` for the hook points this mask touches."""
        return self.layout.split(self.indices)

    @classmethod
    def from_split(cls, layout: Layout, per_hook_point: dict[str, np.ndarray], meta: dict | None = None) -> Mask:
        """A mask from per-hook-point local indices ``{name: indices}`` (the inverse of ``Layout.split``)."""
        flat = [layout.offsets[layout.index(name)] + np.asarray(local, dtype=np.int64)
                for name, local in per_hook_point.items()]
        return cls(np.concatenate(flat) if flat else np.zeros(0, np.int64), layout, meta or {})
