"""Hook points: the post-SiLU gate of one decoder MLP, and the flat neuron layout over many of them.

A hook point is named ``{stream}.layers.{l}.mlp.gate``; ``stream`` is ``lm`` (the language-model decoder)
or ``synth`` (the speech-token decoder). Its tensor is the SiLU output ``g = act_fn(gate_proj(x))`` of
shape ``[batch, pos, d_mlp]``, seen by a forward hook on the ``act_fn`` module. A neuron is written
``lm.layers.12.mlp.gate[3071]``.

Mixture-of-experts layers (``esn.routing``): a *routed* hook point is the ``act_fn`` shared by the ``E``
experts of one layer (transformers' fused 3-D experts). Its width is ``E x d`` (``d`` units per expert),
local neuron ``e * d + u`` is unit ``u`` of expert ``e`` (written ``lm.layers.3.mlp.gate[e, u]``), and its
gate arrives as rows ``[routed rows, d]`` that the routing maps back to (batch, position, expert). A
layer's always-on shared expert is a second hook point, ``{stream}.layers.{l}.mlp.shared_expert.gate``.
Positions are counted per *group*: one group per dense hook point, one per expert of a routed one.

Two more kinds (``HookPoint.kind``):

* *fused* (``esn.fused``): the gate is computed inside the MLP's forward, from a fused projection (Moshi's
  ``fc1`` gives gate and up halves, ``[batch, pos, 2 * d]``) or by a functional activation
  (``F.silu(gate_proj(x))``). esn injects an identity module (``esn.fused.GateHookPoint``, the path in
  ``module``) for the duration of recording or steering; its output is the gate ``[batch, pos, d]``.
* *indexed* (``esn.indexed``): one MLP weight set per index (a depth decoder's codebook position); a
  position's index comes from the call of ``index_from``. Width ``K x d``; local neuron ``k * d + u`` is
  unit ``u`` of index ``k`` (written ``synth.layers.0.mlp.gate[k, u]``), one position group per index.
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
PARTS: tuple[str, ...] = ("", "shared_expert")  # the MLP (dense or routed experts); a MoE layer's shared expert
_NAME = re.compile(r"^(lm|synth)\.layers\.(\d+)\.mlp(?:\.(shared_expert))?\.gate$")


@dataclass(frozen=True)
class HookPoint:
    """One gate tensor ``[batch, pos, width]``: the output of the module at ``module``.

    - ``stream``: ``"lm"`` (the decoder that writes text) or ``"synth"`` (the decoder that writes speech
      tokens).
    - ``layer``: the decoder layer, 0..L-1 within its stream; ``name`` is ``{stream}.layers.{layer}.mlp.gate``
      (``{stream}.layers.{layer}.mlp.shared_expert.gate`` for a MoE layer's shared expert, ``part``).
    - ``width``: ``d_mlp``, the number of gate neurons (``gate_proj.out_features``); routed: ``experts * d``.
    - ``module``: dotted path (from the adapter's ``model``) of the module whose output is the post-SiLU
      gate ``act_fn(gate_proj(x))``, usually ``...layers.{l}.mlp.act_fn``.
    - ``down_proj``: dotted path of the MLP's ``down_proj``, whose input columns are the gate neurons;
      needed to fold gains into the weights (``esn.steering``), optional otherwise.
    - ``meta``: free-form facts for the adapter (not part of equality or the layout fingerprint).
    - ``flat``: the dense gate arrives as ``[batch * pos, width]`` (tokens flattened inside a MoE block).
    - Routed (``experts > 0``): the gate arrives as rows of ``d`` units, ``top_k`` experts per token, and
      ``router`` is the path of the experts module whose forward receives ``(hidden [tokens, h],
      top_k_index [tokens, top_k], top_k_weights)``; ``down_proj`` then names its 3-D ``down_proj``
      parameter ``[E, h, d]``.

    ``esn.hooks.gate_hook_points(model, layers_path, stream)`` builds them for SwiGLU MLPs.
    """

    stream: str
    layer: int
    width: int
    module: str
    down_proj: str | None = None  # dotted path of the MLP's down_proj, for exact weight folding
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    part: str = ""  # "" (the MLP) or "shared_expert" (a MoE layer's always-on expert)
    experts: int = 0  # routed experts sharing this act_fn; 0 = dense
    top_k: int = 0  # experts per token (routed)
    router: str | None = None  # path of the experts module that receives the routing (routed)
    flat: bool = False  # dense gate as [batch * pos, width] (tokens flattened, e.g. a shared expert)
    fused: str | None = None  # path of the projection whose output holds the pre-activation gate (fused kind)
    up: str | None = None  # fused: path of a separate up projection; None: the second half of `fused`'s output
    activation: str = "silu"  # fused: the activation applied to the gate half (esn.fused.ACTIVATIONS)
    indices: int = 0  # indexed: weight sets K (one per codebook position / substep index); 0 = not indexed
    index_from: str | None = None  # indexed: the module whose forward receives the index tensor [pos]

    def __post_init__(self) -> None:
        if self.stream not in STREAMS:
            raise EsnError(f"hook point stream must be one of {STREAMS}, got {self.stream!r}")
        if self.layer < 0 or self.width <= 0:
            raise EsnError(f"hook point {self.stream} layer {self.layer} has width {self.width}")
        if self.part not in PARTS:
            raise EsnError(f"hook point part must be one of {PARTS}, got {self.part!r}")
        if self.experts < 0 or (self.experts and (self.width % self.experts or not 1 <= self.top_k <= self.experts)):
            raise EsnError(f"hook point {self.name}: {self.experts} experts (top {self.top_k}) do not fit "
                           f"width {self.width} (width must be experts x units, 1 <= top_k <= experts)")
        if not self.experts and self.top_k:
            raise EsnError(f"hook point {self.name}: top_k is for routed hook points (experts > 0)")
        if self.indices < 0 or (self.indices and (self.experts or self.width % self.indices)):
            raise EsnError(f"hook point {self.name}: {self.indices} indices need width = indices x units "
                           f"(width {self.width}) and no experts")
        if self.fused and (self.experts or self.flat or not self.down_proj):
            raise EsnError(f"hook point {self.name}: a fused gate needs its down_proj (where the gate enters) "
                           "and cannot be routed or flat")

    @property
    def name(self) -> str:
        """``{stream}.layers.{layer}.mlp.gate`` (``...mlp.shared_expert.gate`` for a shared expert)."""
        return f"{self.stream}.layers.{self.layer}.mlp{'.' + self.part if self.part else ''}.gate"

    @property
    def routed(self) -> bool:
        """Whether the gate lives in routed experts (``experts > 0``)."""
        return self.experts > 0

    @property
    def indexed(self) -> bool:
        """Whether the MLP has one weight set per index (``indices > 0``, ``esn.indexed``)."""
        return self.indices > 0

    @property
    def kind(self) -> str:
        """``"routed"``, ``"indexed"``, ``"fused"`` or ``"dense"`` (an indexed gate may also be fused)."""
        return "routed" if self.routed else "indexed" if self.indexed else "fused" if self.fused else "dense"

    @property
    def groups(self) -> int:
        """Position-count groups: one per expert (routed) or index (indexed), else one."""
        return max(1, self.experts, self.indices)

    @property
    def unit_width(self) -> int:
        """Units per group: ``d`` of one expert (routed), else the width."""
        return self.width // self.groups

    @property
    def step_width(self) -> int:
        """Gate values per batch row per decode position: ``top_k * d`` (routed), else the width."""
        return self.top_k * self.unit_width if self.routed else self.unit_width

    @staticmethod
    def parse(name: str) -> tuple[str, int]:
        """``'lm.layers.3.mlp.gate'`` -> ``('lm', 3)`` (also for ``...mlp.shared_expert.gate``)."""
        stream, layer, _ = HookPoint.parse_name(name)
        return stream, layer

    @staticmethod
    def parse_name(name: str) -> tuple[str, int, str]:
        """``'synth.layers.3.mlp.shared_expert.gate'`` -> ``('synth', 3, 'shared_expert')``."""
        match = _NAME.match(name)
        if not match:
            raise EsnError(f"not a hook point name: {name!r} "
                           "(expected '{lm|synth}.layers.{l}.mlp.gate' or '....mlp.shared_expert.gate')")
        return match.group(1), int(match.group(2)), match.group(3) or ""


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
        # Position-count groups (one per dense hook point, one per expert of a routed one), flat in order.
        groups = np.array([hp.groups for hp in self.hook_points], dtype=np.int64)
        self.group_offsets: np.ndarray = np.concatenate([[0], np.cumsum(groups)])  # [H + 1]
        self.group_widths: np.ndarray = np.repeat([hp.unit_width for hp in self.hook_points], groups)  # [G]

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
    def n_groups(self) -> int:
        """``G``: columns of the position counts ``T`` (``H`` when no hook point is routed)."""
        return int(self.group_offsets[-1])

    @property
    def routed(self) -> bool:
        """Whether any hook point is routed (mixture-of-experts)."""
        return any(hp.routed for hp in self.hook_points)

    def group_slice(self, name: str) -> slice:
        """The position-count columns (groups) of one hook point."""
        i = self.index(name)
        return slice(int(self.group_offsets[i]), int(self.group_offsets[i + 1]))

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

    @property
    def indexed(self) -> bool:
        """Whether any hook point is indexed (one weight set per codebook position or substep index)."""
        return any(hp.indexed for hp in self.hook_points)

    def neuron_name(self, flat: int) -> str:
        """``lm.layers.3.mlp.gate[301]``; routed: ``lm.layers.3.mlp.gate[17, 301]`` (expert, unit); indexed:
        ``synth.layers.0.mlp.gate[2, 301]`` (index, unit)."""
        i = int(np.searchsorted(self.offsets, flat, side="right") - 1)
        hp, local = self.hook_points[i], int(flat - self.offsets[i])
        return f"{hp.name}[{local // hp.unit_width}, {local % hp.unit_width}]" if hp.groups > 1 else f"{hp.name}[{local}]"

    def describe(self) -> list[dict]:
        """Names and widths in order; routed hook points add ``experts`` and ``top_k``, indexed ones
        ``indices`` (so a mask made for another expert or index count has another fingerprint; dense
        layouts keep their fingerprints)."""
        return [{"name": hp.name, "width": hp.width, **({"experts": hp.experts, "top_k": hp.top_k} if hp.routed else {}),
                 **({"indices": hp.indices} if hp.indexed else {})}
                for hp in self.hook_points]

    @property
    def fingerprint(self) -> str:
        """sha256 over hook point names and widths, in order (module paths do not matter)."""
        blob = json.dumps(self.describe(), separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def check_compatible(self, fingerprint: str, what: str = "artifact", other: Layout | None = None) -> None:
        """``LayoutMismatchError`` unless ``fingerprint`` is this layout's; ``other`` (the artifact's layout,
        when known) lets the message name the first difference, e.g. another expert count."""
        if fingerprint != self.fingerprint:
            detail = "" if other is None else f" First difference: {describe_difference(other, self, what)}."
            raise LayoutMismatchError(
                f"{what} was made for a different hook-point layout (fingerprint {fingerprint}, "
                f"this model has {self.fingerprint}: {len(self)} hook points, {self.n_neurons} neurons).{detail} "
                "Was it made for another model or another set of streams?"
            )


def describe_difference(theirs: Layout, mine: Layout, what: str = "artifact") -> str:
    """The first hook point where two layouts differ, in words (names, widths, expert counts)."""
    a, b = theirs.describe(), mine.describe()
    first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))

    def say(d: list[dict]) -> str:
        if first >= len(d):
            return "ends there"
        hp = d[first]
        routed = f", {hp['experts']} experts top-{hp['top_k']}" if "experts" in hp else ""
        routed += f", {hp['indices']} indices" if "indices" in hp else ""
        return f"has {hp['name']} (width {hp['width']}{routed})"

    return f"hook point {first}: {what} {say(a)}; model {say(b)}"
