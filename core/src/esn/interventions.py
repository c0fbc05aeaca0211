"""Gate interventions of the paper (section 3.4), as small plugin objects.

Each intervention changes only the selected neurons of a post-SiLU gate ``g`` ``[..., d_mlp]``:

==========  =====================  ==========================================
name        selected neuron ->     alpha
==========  =====================  ==========================================
steer       g * (1 + alpha)        gain; alpha >= -1 (alpha = 0: no change)
add         g + alpha              shift, any finite value
clamp       max(g, alpha)          floor, any finite value
deactivate  0                      none (pass None or 0)
==========  =====================  ==========================================

``alpha=None`` means the paper's default ``1.0`` for the methods that take one.

All four are one elementwise form, ``max(g * scale + shift, floor)``, which is how the engine applies
any mix of them to every row of a batch with a couple of dense kernels. A third-party intervention that
cannot be written in that form implements ``apply`` only.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from esn.errors import EsnError
from esn.plugins import hookimpl

if TYPE_CHECKING:  # torch is imported where a tensor is touched: the registry loads this module for every command
    import torch

    from esn.plugins import Registry


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
            if alpha is not None and (isinstance(alpha, bool) or alpha != 0):
                raise EsnError(f"intervention {cls.name!r} takes no alpha (got {alpha!r}); pass None")
            return 0.0
        if alpha is None:
            return 1.0  # the paper's default strength
        # bool is an int subclass: True would silently mean alpha = 1.
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
            raise EsnError(f"intervention {cls.name!r} needs a finite real alpha, got {alpha!r}")
        return float(alpha)

    @classmethod
    def affine(cls, alpha: float) -> Affine | None:
        """The intervention as ``max(g * scale + shift, floor)`` for this ``alpha``, or None if it has no such form."""
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
    """``g * (1 + alpha)`` on the selected neurons: a gain, ``alpha >= -1``; foldable into ``down_proj``."""
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
    """``g + alpha`` on the selected neurons: a shift by any finite ``alpha``."""
    name = "add"

    @classmethod
    def affine(cls, alpha):
        return Affine(shift=alpha)


class Clamp(Intervention):
    """``max(g, alpha)`` on the selected neurons: a floor at any finite ``alpha``."""
    name = "clamp"

    @classmethod
    def affine(cls, alpha):
        return Affine(floor=alpha)


class Deactivate(Intervention):
    """``0`` on the selected neurons (no alpha); foldable into ``down_proj``."""
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


Method = str | type[Intervention]


def get_intervention(method: Method, registry: Registry | None = None) -> type[Intervention]:
    """The intervention class named ``method`` (or ``method`` itself if it is already a class)."""
    if isinstance(method, type) and issubclass(method, Intervention):
        return method
    if not isinstance(method, str):
        raise EsnError(f"intervention method must be a name such as 'steer', got {method!r}")
    from esn.plugins import registry as default_registry

    return (registry or default_registry()).intervention(method)


def resolve(method: Method, alpha: float | None, registry: Registry | None = None) -> tuple[type[Intervention], float]:
    """Look up ``method`` and validate ``alpha`` for it (``None`` -> the default 1.0 where one is needed)."""
    cls = get_intervention(method, registry)
    return cls, cls.check_alpha(alpha)


def check_indices(indices, width: int) -> torch.Tensor:
    """Neuron ``indices`` (LongTensor or integer sequence) as a flat int64 CPU tensor in ``[0, width)``."""
    import torch

    idx = torch.as_tensor(indices)
    if idx.numel() and (idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool):
        raise EsnError(f"neuron indices must be integers, got dtype {idx.dtype}")
    idx = idx.to(device="cpu", dtype=torch.long).reshape(-1)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= width):
        raise EsnError(
            f"neuron indices must lie in [0, {width}) for a gate of width {width}; "
            f"got {int(idx.min())}..{int(idx.max())}"
        )
    return idx


def apply_intervention(
    gate: torch.Tensor,
    indices,
    method: Method,
    alpha: float | None = None,
    *,
    registry: Registry | None = None,
) -> torch.Tensor:
    """Apply ``method`` with ``alpha`` to neurons ``indices`` of the last dim of ``gate`` ``[..., D]``.

    Pure: returns a new tensor. ``indices`` is a LongTensor (or sequence) of distinct values in ``[0, D)``.
    ``registry`` looks the method up in another plugin registry (default: the process-wide one).
    """
    import torch

    if not isinstance(gate, torch.Tensor) or not gate.dtype.is_floating_point or gate.dim() == 0:
        raise EsnError(f"gate must be a floating-point tensor [..., D], got {type(gate).__name__}")
    cls, alpha = resolve(method, alpha, registry)
    idx = check_indices(indices, gate.shape[-1])
    if idx.numel() == 0:
        return gate.clone()
    return cls.apply(gate, idx.to(gate.device), alpha)
