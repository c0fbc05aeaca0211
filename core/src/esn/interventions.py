"""Gate interventions of the paper (section 3.4), as small plugin objects.

Each intervention changes only the selected neurons of a post-SiLU gate ``g`` ``[..., d_mlp]``:

==========  =====================  ==========================================
name        selected neuron ->     alpha
==========  =====================  ==========================================
steer       g * (1 + alpha)        gain; alpha >= -1 (alpha = 0: no change)
add         g + alpha              shift, any finite value
clamp       max(g, alpha)          floor, any finite value
deactivate  0                      ignored (pass None or 0)
==========  =====================  ==========================================

All four are one elementwise form, ``max(g * scale + shift, floor)``, which is how the engine applies
any mix of them to every row of a batch with a couple of dense kernels. A third-party intervention that
cannot be written in that form implements ``apply`` only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from esn.errors import EsnError
from esn.plugins import hookimpl


@dataclass(frozen=True)
class Affine:
    """``g -> max(g * scale + shift, floor)`` on selected neurons (``floor = -inf`` means no floor)."""

    scale: float = 1.0
    shift: float = 0.0
    floor: float = -math.inf


class Intervention:
    """Base class. Subclasses set ``name`` and implement ``affine`` (preferred) or ``apply``."""

    name: ClassVar[str]
    # True when the intervention is exactly a per-neuron gain, so it can be folded into down_proj.
    foldable: ClassVar[bool] = False
    needs_alpha: ClassVar[bool] = True

    @classmethod
    def check_alpha(cls, alpha: float | None) -> float:
        """Validate and normalise ``alpha``; raise ``EsnError`` naming the allowed range."""
        if not cls.needs_alpha:
            if alpha not in (None, 0, 0.0):
                raise EsnError(f"intervention {cls.name!r} takes no alpha (got {alpha})")
            return 0.0
        if alpha is None or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise EsnError(f"intervention {cls.name!r} needs a finite alpha, got {alpha!r}")
        return float(alpha)

    @classmethod
    def affine(cls, alpha: float) -> Affine | None:
        return None

    @classmethod
    def apply(cls, gate: torch.Tensor, indices: torch.Tensor, alpha: float) -> torch.Tensor:
        """Return a new tensor with the selected neurons (last dim) changed; ``gate`` is untouched."""
        form = cls.affine(alpha)
        if form is None:
            raise NotImplementedError(f"intervention {cls.name!r} defines neither affine() nor apply()")
        out = gate.clone()
        sel = out.index_select(-1, indices)
        sel = sel * form.scale + form.shift if (form.scale != 1.0 or form.shift != 0.0) else sel
        if form.floor != -math.inf:
            sel = sel.clamp_min(form.floor)
        out.index_copy_(-1, indices, sel.to(out.dtype))
        return out


class Steer(Intervention):
    name = "steer"
    foldable = True

    @classmethod
    def check_alpha(cls, alpha):
        alpha = super().check_alpha(alpha)
        if alpha < -1:
            raise EsnError(f"steer alpha must be >= -1 (gain 1 + alpha >= 0), got {alpha}")
        return alpha

    @classmethod
    def affine(cls, alpha):
        return Affine(scale=1.0 + alpha)


class Add(Intervention):
    name = "add"

    @classmethod
    def affine(cls, alpha):
        return Affine(shift=alpha)


class Clamp(Intervention):
    name = "clamp"

    @classmethod
    def affine(cls, alpha):
        return Affine(floor=alpha)


class Deactivate(Intervention):
    name = "deactivate"
    foldable = True
    needs_alpha = False

    @classmethod
    def affine(cls, alpha):
        return Affine(scale=0.0)


BUILTIN = (Steer, Add, Clamp, Deactivate)


@hookimpl
def register_interventions(register):
    for cls in BUILTIN:
        register(cls)


def get_intervention(method: str) -> type[Intervention]:
    from esn.plugins import registry

    return registry().intervention(method)


def apply_intervention(gate: torch.Tensor, indices, method: str, alpha: float | None = None) -> torch.Tensor:
    """Apply ``method`` with ``alpha`` to neurons ``indices`` of the last dim of ``gate`` ``[..., D]``.

    Pure: returns a new tensor. ``indices`` is a LongTensor (or sequence) of distinct values in ``[0, D)``.
    """
    cls = get_intervention(method)
    alpha = cls.check_alpha(alpha)
    idx = torch.as_tensor(indices, dtype=torch.long, device=gate.device).reshape(-1)
    width = gate.shape[-1]
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= width):
        raise EsnError(f"neuron indices must lie in [0, {width}); got {int(idx.min())}..{int(idx.max())}")
    if idx.numel() == 0:
        return gate.clone()
    return cls.apply(gate, idx, alpha)
