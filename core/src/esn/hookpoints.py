"""Hook points: the post-SiLU gate of one decoder MLP, and the flat neuron layout over many of them.

A hook point is named ``{stream}.layers.{l}.mlp.gate``; ``stream`` is ``lm`` (the language-model decoder)
or ``synth`` (the speech-token decoder). Its tensor is the SiLU output ``g = act_fn(gate_proj(x))`` of
shape ``[batch, pos, d_mlp]``, seen by a forward hook on the ``act_fn`` module. A neuron is written
``lm.layers.12.mlp.gate[3071]``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from esn.errors import EsnError, LayoutMismatchError

STREAMS: tuple[str, ...] = ("lm", "synth")
_NAME = re.compile(r"^(lm|synth)\.layers\.(\d+)\.mlp\.gate$")


@dataclass(frozen=True)
class HookPoint:
    """One gate tensor ``[batch, pos, width]``: the output of the module at ``module``.

    - ``stream``: ``"lm"`` (the decoder that writes text) or ``"synth"`` (the decoder that writes speech
      tokens).
    - ``layer``: the decoder layer, 0..L-1 within its stream; ``name`` is ``{stream}.layers.{layer}.mlp.gate``.
    - ``width``: ``d_mlp``, the number of gate neurons (``gate_proj.out_features``).
    - ``module``: dotted path (from the adapter's ``model``) of the module whose output is the post-SiLU
      gate ``act_fn(gate_proj(x))``, usually ``...layers.{l}.mlp.act_fn``.
    - ``down_proj``: dotted path of the MLP's ``down_proj``, whose input columns are the gate neurons;
      needed to fold gains into the weights (``esn.steering``), optional otherwise.
    - ``meta``: free-form facts for the adapter (not part of equality or the layout fingerprint).

    ``esn.hooks.gate_hook_points(model, layers_path, stream)`` builds them for SwiGLU MLPs.
    """

    stream: str
    layer: int
    width: int
    module: str
    down_proj: str | None = None  # dotted path of the MLP's down_proj, for exact weight folding
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.stream not in STREAMS:
            raise EsnError(f"hook point stream must be one of {STREAMS}, got {self.stream!r}")
        if self.layer < 0 or self.width <= 0:
            raise EsnError(f"hook point {self.stream} layer {self.layer} has width {self.width}")

    @property
    def name(self) -> str:
        """``{stream}.layers.{layer}.mlp.gate``."""
        return f"{self.stream}.layers.{self.layer}.mlp.gate"

    @staticmethod
    def parse(name: str) -> tuple[str, int]:
        """``'lm.layers.3.mlp.gate'`` -> ``('lm', 3)``."""
        match = _NAME.match(name)
        if not match:
            raise EsnError(f"not a hook point name: {name!r} (expected '{{lm|synth}}.layers.{{l}}.mlp.gate')")
        return match.group(1), int(match.group(2))


class Layout:
    """Hook points in adapter order, with neurons indexed flat: N = sum of widths.

    Flat index ``offset(hp) + n`` is neuron ``n`` of hook point ``hp``. The fingerprint ties artifacts
    (statistics, masks) to this exact layout.
    """

    def __init__(self, hook_points: Iterable[HookPoint]):
        self.hook_points: tuple[HookPoint, ...] = tuple(hook_points)
        if not self.hook_points:
            raise EsnError("a layout needs at least one hook point")
        names = [hp.name for hp in self.hook_points]
        if len(set(names)) != len(names):
            raise EsnError(f"duplicate hook point names in layout: {names}")
        widths = np.array([hp.width for hp in self.hook_points], dtype=np.int64)
        self.offsets: np.ndarray = np.concatenate([[0], np.cumsum(widths)])
        self._by_name = {hp.name: i for i, hp in enumerate(self.hook_points)}

    def __len__(self) -> int:
        return len(self.hook_points)

    def __iter__(self):
        return iter(self.hook_points)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Layout) and self.describe() == other.describe()

    @property
    def n_neurons(self) -> int:
        """N, the number of neurons over all hook points (the sum of their widths)."""
        return int(self.offsets[-1])

    @property
    def names(self) -> list[str]:
        """Hook point names in layout order."""
        return [hp.name for hp in self.hook_points]

    @property
    def streams(self) -> list[str]:
        """The streams present, ``lm`` before ``synth``."""
        return sorted({hp.stream for hp in self.hook_points}, key=STREAMS.index)

    def index(self, name: str) -> int:
        """Position of hook point ``name`` in the layout; EsnError if it is not there."""
        try:
            return self._by_name[name]
        except KeyError:
            raise EsnError(f"hook point {name!r} is not in this layout ({len(self)} hook points)") from None

    def __getitem__(self, name: str) -> HookPoint:
        return self.hook_points[self.index(name)]

    def slice(self, name: str) -> slice:
        """The flat neuron columns ``[offset, offset + width)`` of hook point ``name``."""
        i = self.index(name)
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))

    def select(self, streams: Sequence[str] | None = None) -> Layout:
        """The sub-layout of the given streams (flat indices are renumbered)."""
        if streams is None:
            return self
        unknown = set(streams) - set(STREAMS)
        if unknown:
            raise EsnError(f"unknown stream(s) {sorted(unknown)}: expected {STREAMS}")
        return Layout(hp for hp in self.hook_points if hp.stream in streams)

    def split(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Sorted flat indices -> ``{hook point name: local neuron indices}`` (empty entries dropped)."""
        flat = np.asarray(flat, dtype=np.int64)
        if flat.size and (flat.min() < 0 or flat.max() >= self.n_neurons):
            raise EsnError(f"neuron index out of range 0..{self.n_neurons - 1}")
        which = np.searchsorted(self.offsets, flat, side="right") - 1
        out: dict[str, np.ndarray] = {}
        for i, hp in enumerate(self.hook_points):
            local = flat[which == i] - self.offsets[i]
            if local.size:
                out[hp.name] = local
        return out

    def neuron_name(self, flat: int) -> str:
        """Flat index -> ``'lm.layers.12.mlp.gate[3071]'``."""
        i = int(np.searchsorted(self.offsets, flat, side="right") - 1)
        return f"{self.hook_points[i].name}[{int(flat - self.offsets[i])}]"

    def describe(self) -> list[dict]:
        """``[{"name", "width"}, ...]`` in order: what artifacts store and the fingerprint hashes."""
        return [{"name": hp.name, "width": hp.width} for hp in self.hook_points]

    @property
    def fingerprint(self) -> str:
        """sha256 over hook point names and widths, in order (module paths do not matter)."""
        blob = json.dumps(self.describe(), separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def check_compatible(self, fingerprint: str, what: str = "artifact") -> None:
        """Raise ``LayoutMismatchError`` unless ``fingerprint`` is this layout's (``what`` names the artifact)."""
        if fingerprint != self.fingerprint:
            raise LayoutMismatchError(
                f"{what} was made for a different hook-point layout (fingerprint {fingerprint}, "
                f"this model has {self.fingerprint}: {len(self)} hook points, {self.n_neurons} neurons). "
                "Was it made for another model or another set of streams?"
            )
