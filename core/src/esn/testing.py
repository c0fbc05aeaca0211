"""The adapter conformance suite: checks every adapter (ours or a third party's) runs on its tiny checkpoint.

Each check takes a loaded adapter, runs the real generate path on synthetic speech, and raises
:class:`ConformanceError` (an ``AssertionError``) naming what is wrong. From an adapter's tests::

    import pytest
    from esn.testing import CHECKS, load_tiny

    @pytest.fixture(scope="module")
    def adapter(tmp_path_factory):
        return load_tiny(MyAdapter, tmp_path_factory.mktemp("tiny"))

    @pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
    def test_conformance(adapter, check):
        check(adapter)

or all at once: ``esn.testing.run_conformance(MyAdapter, tmp_path)``.

The checks:

- ``check_class``: the class attributes ``esn adapters list`` reads are set and sane.
- ``check_checkpoint``: every tensor ``write_tiny`` writes is finite (checked first, so a NaN is reported
  as a NaN), it writes the same files twice for one seed (tensors bit for bit), every parameter and
  buffer of the loaded model is finite and initialised (no NaN or inf, no subnormal value, nothing above
  ``MAX_PARAMETER`` in magnitude: what ``torch.empty`` memory looks like), and every parameter and
  persistent buffer was read from the file: its values occur in the checkpoint (through any renaming or
  fusing), so a missing or misnamed key that transformers initialised instead is refused.
- ``check_hook_points``: names ``{stream}.layers.{l}.mlp.gate`` with layers 0..L-1 per stream, ``lm``
  before ``synth`` (plus ``...mlp.shared_expert.gate`` on some of those layers); the streams are among the
  class's ``streams``; every layer of every layer list (``nn.ModuleList``) a stream hooks has a hook point;
  each stream spec's root holds its stream's hook points; each module resolves, runs during generation
  and outputs ``[batch, pos, width]`` (flat: ``[rows, width]``; routed: ``[rows, width / experts]``, with
  its experts module and 3-D ``down_proj``; indexed: ``[batch, pos, width / indices]`` with a per-index 3-D
  ``down_proj`` weight; a fused gate's module is injected for the check, ``esn.fused``); no gate is constant
  (zero gate weights); the lm gates run before the synth gates (not swapped); and a dense hook point's
  tensor is the post-activation gate: the hooked module has no weights, its values stay in the declared
  activation's range (``meta["activation"]`` or the module's class), and it equals ``act(W x)`` recomputed
  from a projection ``W`` of its MLP (the hooked module's parent) on the MLP's captured input (a fused
  projection's half included).
- ``check_generation``: one result per request, in order, with text and non-empty finite float32
  mono audio at the declared rate; each result of a 2-request ``generate`` equals, bit for bit, the
  same request generated alone with the same seed (for ``batched = True`` adapters: a row does not
  depend on its batch mate, so padding and masks are right).
- ``check_speech_input``: two recordings with the same target emotion give different gates: the input
  speech reaches the model (an adapter ignoring the audio, or zero codec codebooks, is refused).
- ``check_recording``: ``GateRecorder`` counts equal a plain-hook reference (``g > 0`` summed over every
  position of a one-request generate) and its token counts equal the positions seen (routed hook points:
  summed over experts, against every row ``act_fn`` saw).
- ``check_interventions``: per stream, ``deactivate`` on every gate makes the gates a later hook sees
  exactly 0; ``steer`` by 101x on every gate changes that stream's own output (lm: the text, or the audio
  for an adapter with ``text_out = False``; synth: the audio); ``steer`` with ``alpha=0`` changes
  nothing; afterwards no hook is left and generation is bit-identical to before.

Left-over hooks are looked for on the gate modules and stream roots (``esn.hooks.has_hooks`` on the
whole model would also flag the lasting hooks transformers 5 installs to capture hidden states).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from esn.adapters import EVCRequest, EVCResult, GenerationConfig, ModelAdapter
from esn.fused import injected
from esn.hookpoints import STREAMS, HookPoint
from esn.hooks import installed

LARGE_GAIN = 100.0  # steer alpha of the "interventions take effect" check: every gate times 101
MAX_PARAMETER = 1e6  # a tiny random checkpoint's weights are O(1); torch.empty memory reaches 1e38


class ConformanceError(AssertionError):
    """An adapter does not meet the adapter contract."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConformanceError(message)


# -- fixtures ---------------------------------------------------------------------------------------


def load_tiny(adapter_cls: type[ModelAdapter], directory: str | Path, *, seed: int = 0) -> ModelAdapter:
    """Write the adapter's tiny checkpoint into ``directory`` and load it back through ``load`` (float32, CPU).

    ``trust_remote_code=True``: the tiny checkpoint was just written by the adapter's own package.
    """
    path = adapter_cls.write_tiny(Path(directory), seed=seed)
    return adapter_cls.load(path, dtype="float32", device="cpu", trust_remote_code=True)


def speech_like(seconds: float = 1.0, *, seed: int = 0, rate: int = 16_000) -> np.ndarray:
    """A deterministic voiced-speech-like waveform: harmonics of a gliding pitch under a syllable envelope."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 110 + 40 * rng.random() + 20 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    wave = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = 0.5 * (1 - np.cos(2 * np.pi * 3 * t)) + 0.05
    noise = 0.01 * rng.standard_normal(t.size)
    return (0.2 * wave * envelope + noise).astype(np.float32)


def tiny_requests(n: int = 1, *, seconds: float = 1.0) -> list[EVCRequest]:
    """``n`` requests of :func:`speech_like` speech (seeds 0..n-1) to happy, angry, sad, surprise in turn."""
    emotions = ("happy", "angry", "sad", "surprise")
    return [EVCRequest(speech_like(seconds, seed=i), emotions[i % 4], id=f"c{i}") for i in range(n)]


def tiny_config(**overrides: Any) -> GenerationConfig:
    """Short generations: a tiny random model would otherwise talk until its limits."""
    return GenerationConfig(**{"max_new_tokens": 8, "max_audio_tokens": 24, "seed": 0, **overrides})


def _same(a: EVCResult, b: EVCResult) -> bool:
    return a.text == b.text and a.waveform.shape == b.waveform.shape and np.array_equal(a.waveform, b.waveform)


def _difference(a: EVCResult, b: EVCResult) -> str:
    if a.text != b.text:
        return f"text {a.text!r} vs {b.text!r}"
    if a.waveform.shape != b.waveform.shape:
        return f"waveform of {a.waveform.size} vs {b.waveform.size} samples"
    return f"waveforms differ by up to {float(np.abs(a.waveform - b.waveform).max()):.3g}"


def _generate_one(adapter: ModelAdapter, config: GenerationConfig | None) -> EVCResult:
    return adapter.generate(tiny_requests(1), config or tiny_config())[0]


def _esn_sites(adapter: ModelAdapter) -> list[torch.nn.Module]:
    """Modules esn hooks: every hook point's module (and experts module), every stream root and substep."""
    specs = (adapter.stream_specs() or {}).values()
    roots = [spec.root for spec in specs if getattr(spec, "root", None)]
    roots += [sub for spec in specs for sub in getattr(spec, "substeps", ())]
    roots += [hp.router for hp in adapter.layout() if hp.routed]
    roots += [hp.index_from for hp in adapter.layout() if hp.indexed and hp.index_from]
    # a fused gate's module exists only while esn hooks it (esn.fused): its projections carry esn's hooks
    roots += [p for hp in adapter.layout() if hp.fused for p in (hp.fused, hp.up, hp.down_proj) if p]
    return ([adapter.module(hp) for hp in adapter.layout() if not hp.fused]
            + [adapter.model.get_submodule(r) for r in dict.fromkeys(roots)])


def _hooks(adapter: ModelAdapter) -> set[tuple[int, str, int]]:
    """The hooks on esn's sites. (transformers installs its own lasting hooks elsewhere, e.g. to capture
    hidden states, so ``esn.hooks.has_hooks`` on the whole model is too strict for some real models.)"""
    return {(id(m), kind, key) for m in _esn_sites(adapter)
            for kind, table in (("fwd", m._forward_hooks), ("pre", m._forward_pre_hooks)) for key in table}


def _observe(adapter: ModelAdapter, hook_points: Sequence[HookPoint], fn: Callable) -> list:
    """Plain observer hooks ``fn(hp, g)`` on the given hook points (added after any others)."""
    return [(adapter.module(hp), lambda m, a, g, hp=hp: fn(hp, g)) for hp in hook_points]


# -- checks -----------------------------------------------------------------------------------------


def check_class(adapter: ModelAdapter | type[ModelAdapter], config: GenerationConfig | None = None) -> None:
    """The class attributes ``esn adapters list`` and the engine read are set and sane."""
    cls = adapter if isinstance(adapter, type) else type(adapter)
    _require(isinstance(getattr(cls, "name", None), str) and cls.name.isidentifier(),
             f"{cls.__name__}.name must be a short identifier, got {getattr(cls, 'name', None)!r}")
    _require(bool(cls.architectures) and all(isinstance(a, str) for a in cls.architectures),
             f"{cls.__name__}.architectures must list config.json architecture strings")
    _require(bool(cls.streams) and set(cls.streams) <= set(STREAMS),
             f"{cls.__name__}.streams {cls.streams} must be a non-empty subset of {STREAMS}")
    _require(isinstance(cls.batched, bool), f"{cls.__name__}.batched must be a bool")
    _require(isinstance(cls.sample_rate, int) and cls.sample_rate > 0, f"{cls.__name__}.sample_rate must be > 0")


def _tensor_files(directory: Path) -> dict[str, Any]:
    """Every file under ``directory`` by relative path: safetensors files as ``{name: tensor}``, others as bytes."""
    from safetensors.torch import load_file

    files: dict[str, Any] = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = str(path.relative_to(directory))
        files[rel] = load_file(path) if path.suffix == ".safetensors" else path.read_bytes()
    return files


def _file_difference(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """What differs between two ``_tensor_files`` results, or None."""
    if set(a) != set(b):
        return f"different files: {sorted(set(a) ^ set(b))}"
    for rel, x in a.items():
        y = b[rel]
        if isinstance(x, bytes):
            if x != y:
                return f"{rel} differs"
            continue
        if set(x) != set(y):
            return f"{rel}: different tensors {sorted(set(x) ^ set(y))[:5]}"
        for name, t in x.items():
            if t.shape != y[name].shape or t.dtype != y[name].dtype or not torch.equal(t, y[name]):
                return f"{rel}: tensor {name} differs"
    return None


def _bad_values(t: torch.Tensor) -> str | None:
    """Why a parameter looks uninitialised (NaN/inf, subnormal or huge values), or None."""
    t = t.detach()
    if not t.dtype.is_floating_point or t.numel() == 0:
        return None
    x = t.float()
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        return f"{bad} NaN or infinite value(s)"
    tiny = torch.finfo(t.dtype).tiny
    a = x.abs()
    sub = int(((a > 0) & (a < tiny)).sum())
    if sub:
        return f"{sub} subnormal value(s) such as {float(a[(a > 0) & (a < tiny)][0]):.3g}"
    top = float(a.max())
    if top > MAX_PARAMETER:
        return f"values up to {top:.3g}"
    return None


def _file_tensors(files: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor of a ``_tensor_files`` result, named ``file:tensor``."""
    return {f"{rel}:{name}": t for rel, x in files.items() if isinstance(x, dict) for name, t in x.items()}


def _not_from_file(t: torch.Tensor, values: np.ndarray, by_size: dict[int, list[torch.Tensor]]) -> int:
    """How many values of ``t`` occur nowhere in the checkpoint's files (``values``: their sorted float32
    values), 0 if ``t`` holds the values of one file tensor rounded to a lower precision (a checkpoint
    loaded in bfloat16 or float16, then cast). A weight read from the file keeps its values through any
    renaming, fusing or transposing that loading does; one transformers initialised because its key was
    missing does not."""
    x = t.detach().float().cpu().reshape(-1)
    missing = int((~np.isin(x.numpy(), values)).sum())
    if missing:
        for low in (torch.bfloat16, torch.float16):
            mine = x.to(low).float().sort().values
            if any(torch.equal(mine, f.to(low).float().sort().values) for f in by_size.get(x.numel(), ())):
                return 0
    return missing


def check_checkpoint(adapter: ModelAdapter, config: GenerationConfig | None = None) -> None:
    """The tiny checkpoint's tensors are finite, ``write_tiny`` is deterministic, and every parameter and
    buffer of the loaded model is finite and initialised, each parameter and persistent buffer read from
    the file (not left to transformers' initialisation by a missing or misnamed key)."""
    cls = type(adapter)
    with tempfile.TemporaryDirectory(prefix="esn-conformance-") as tmp:
        first = _tensor_files(Path(cls.write_tiny(Path(tmp) / "a", seed=0)))
        second = _tensor_files(Path(cls.write_tiny(Path(tmp) / "b", seed=0)))
    stored = _file_tensors(first)
    for name, t in stored.items():  # before the determinism check: NaN != NaN would read as "unseeded"
        if t.dtype.is_floating_point:
            bad = int((~torch.isfinite(t.float())).sum())
            _require(bad == 0, f"tensor {name} of the tiny checkpoint has {bad} NaN or infinite value(s)")
    difference = _file_difference(first, second)
    _require(difference is None, f"write_tiny wrote different checkpoints twice with seed 0 ({difference}): "
                                 "seed every random draw and initialise every tensor (torch.empty memory differs "
                                 "on every write)")
    _require(any(True for _ in adapter.model.parameters()), "the loaded model has no parameters")
    for name, param in adapter.model.named_parameters():
        why = _bad_values(param)
        _require(why is None, f"parameter {name} of the loaded tiny checkpoint has {why}: uninitialised memory? "
                              "write_tiny must initialise every weight (e.g. torch.nn.init, or the model's "
                              "own init) before saving")
    for name, buffer in adapter.model.named_buffers():
        if buffer.dtype.is_floating_point:
            bad = int((~torch.isfinite(buffer.detach().float())).sum())
            _require(bad == 0, f"buffer {name} of the loaded tiny checkpoint has {bad} NaN or infinite value(s)")
    source = Path(adapter.source)
    files = _file_tensors(_tensor_files(source)) if source.is_dir() else stored
    floats = [t.detach().float().reshape(-1) for t in files.values() if t.dtype.is_floating_point]
    if not floats:
        return  # not a safetensors checkpoint: nothing to compare with
    values = np.unique(torch.cat(floats).numpy())
    by_size: dict[int, list[torch.Tensor]] = {}
    for f in floats:
        by_size.setdefault(f.numel(), []).append(f)
    persistent = {n for n, _ in adapter.model.named_buffers()} & set(adapter.model.state_dict())
    loaded = [*adapter.model.named_parameters(), *((n, b) for n, b in adapter.model.named_buffers() if n in persistent)]
    for name, t in loaded:
        if not t.dtype.is_floating_point or t.numel() == 0:
            continue
        missing = _not_from_file(t, values, by_size)
        _require(missing == 0, f"{name} of the loaded model was not read from the checkpoint ({missing} of its "
                               f"{t.numel()} values are in no file of {source}): a missing or unexpected key "
                               "that transformers initialised instead; load must refuse a checkpoint whose "
                               "loading info lists missing or unexpected keys")


def check_hook_points(adapter: ModelAdapter, config: GenerationConfig | None = None) -> None:
    """Hook point names, order and layers; each module runs in generation and outputs ``[batch, pos, width]``."""
    layout = adapter.layout()
    points = list(layout)
    order = [STREAMS.index(hp.stream) for hp in points]
    _require(order == sorted(order), f"hook points must list lm before synth, got {layout.names}")
    _require({hp.stream for hp in points} <= set(type(adapter).streams),
             f"hook point streams {layout.streams} are not among the declared streams {type(adapter).streams}")
    for stream in layout.streams:
        layers = [hp.layer for hp in points if hp.stream == stream and not hp.part]
        _require(layers == list(range(len(layers))), f"{stream} layers must be 0..{len(layers) - 1}, got {layers}")
        shared = [hp.layer for hp in points if hp.stream == stream and hp.part]
        _require(set(shared) <= set(layers), f"{stream}: shared-expert hook points on layers {shared} without "
                                             "a layer hook point")
    before = _hooks(adapter)
    with injected(adapter.model, points):  # esn.fused: fused gates' identity modules, for this check
        _check_sites(adapter, points, config)
    _require(_hooks(adapter) == before, "hooks were left on the gate modules after generation")


def _check_sites(adapter: ModelAdapter, points: Sequence[HookPoint], config: GenerationConfig | None) -> None:
    for hp in points:
        HookPoint.parse(hp.name)
        module = adapter.module(hp)
        _require(isinstance(module, torch.nn.Module), f"{hp.name}: {hp.module!r} is not an nn.Module")
        if hp.routed:
            _require(isinstance(adapter.model.get_submodule(hp.router or ""), torch.nn.Module),
                     f"{hp.name}: routed, but its experts module {hp.router!r} is not an nn.Module")
        if hp.down_proj and hp.indexed:
            down = adapter.model.get_submodule(hp.down_proj).weight
            _require(down.dim() == 3 and down.shape[0] == hp.indices and down.shape[2] == hp.unit_width,
                     f"{hp.name}: {hp.down_proj}.weight has shape {tuple(down.shape)}, expected "
                     f"[{hp.indices}, hidden, {hp.unit_width}]")
        elif hp.down_proj and hp.routed:
            down = adapter.model.get_parameter(hp.down_proj)
            _require(down.dim() == 3 and down.shape[0] == hp.experts and down.shape[2] == hp.unit_width,
                     f"{hp.name}: {hp.down_proj} has shape {tuple(down.shape)}, expected "
                     f"[{hp.experts}, hidden, {hp.unit_width}]")
        elif hp.down_proj:
            down = adapter.model.get_submodule(hp.down_proj)
            _require(down.weight.shape[1] == hp.width,
                     f"{hp.name}: {hp.down_proj}.weight has {down.weight.shape[1]} input columns, width is {hp.width}")
    _check_stacks(adapter, points)
    _check_roots(adapter, points)
    shapes: dict[str, list[tuple[int, ...]]] = {hp.name: [] for hp in points}
    ranges: dict[str, list[float]] = {}  # [min, max] of every value the hook point output
    order: list[str] = []  # streams in the order their gates first ran
    firsts: dict[str, tuple[Any, torch.Tensor]] = {}  # the MLP's input and the gate of its first call
    inputs: dict[str, Any] = {}

    def seen(hp: HookPoint, g: torch.Tensor) -> None:
        shapes[hp.name].append(tuple(g.shape))
        if hp.stream not in order:
            order.append(hp.stream)
        if not isinstance(g, torch.Tensor) or g.numel() == 0:
            return
        low, high = float(g.detach().min()), float(g.detach().max())
        old = ranges.setdefault(hp.name, [low, high])
        old[0], old[1] = min(old[0], low), max(old[1], high)
        if hp.name not in firsts and hp.name in inputs:
            firsts[hp.name] = (inputs[hp.name], g.detach().clone())

    def mlp_input(hp: HookPoint, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
        if hp.name not in inputs and isinstance(x, torch.Tensor):
            inputs[hp.name] = x.detach().clone()

    dense = [hp for hp in points if _kind(hp) == "dense" and not hp.routed]
    pre = [(adapter.model.get_submodule(_parent(hp.module)), lambda m, a, k, hp=hp: mlp_input(hp, a, k))
           for hp in dense]
    before = _hooks(adapter)
    with installed(pre, kind="pre", with_kwargs=True), installed(_observe(adapter, points, seen)):
        _generate_one(adapter, config)
    for hp in points:
        seen_shapes = shapes[hp.name]
        _require(bool(seen_shapes), f"{hp.name} ({hp.module}) never ran during generation")
        dims, last, what = (2, hp.unit_width, "rows") if (hp.routed or hp.flat) else (3, hp.unit_width, "batch, pos")
        bad = [s for s in seen_shapes if len(s) != dims or s[-1] != last]
        _require(not bad, f"{hp.name}: output shapes {bad[:3]} are not [{what}, {last}]")
    for hp in dense:
        _check_gate_tensor(adapter, hp, *firsts.get(hp.name, (None, None)))
    for hp in points:
        low, high = ranges.get(hp.name, (0.0, 0.0))
        _require(low != high, f"{hp.name}: the gate is constant ({low:g} at every position and unit): its gate "
                              "weights are zero or were never loaded, so the layer's neurons carry nothing")
    streams = [s for s in STREAMS if s in order]
    _require(order == streams,
             f"the {order[0]} gates ran before the lm gates: lm and synth look swapped (lm is the decoder that "
             "writes text and runs first; synth writes the speech tokens from it)")
    _require(_hooks(adapter) == before, "hooks were left on the gate modules after generation")


def _kind(hp: HookPoint) -> str:
    """The hook point's kind (``dense`` where the HookPoint has no ``kind`` field)."""
    return str(getattr(hp, "kind", "dense") or "dense")


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def _stack(model: torch.nn.Module, path: str) -> tuple[str, int] | None:
    """``(layer list path, layer index)`` of a module path: its first numbered part under a ModuleList."""
    parts = path.split(".")
    for i, part in enumerate(parts[1:], 1):
        if part.isdigit():
            prefix = ".".join(parts[:i])
            if isinstance(model.get_submodule(prefix), torch.nn.ModuleList):
                return prefix, int(part)
    return None


def _check_stacks(adapter: ModelAdapter, points: Sequence[HookPoint]) -> None:
    """Every layer of every layer list a stream hooks has a hook point (a left-out last layer is caught)."""
    used: dict[str, set[int]] = {}
    for hp in points:
        found = _stack(adapter.model, hp.module)
        if found is not None and not hp.part:
            used.setdefault(found[0], set()).add(found[1])
    for path, layers in used.items():
        n = len(adapter.model.get_submodule(path))
        missing = sorted(set(range(n)) - layers)
        _require(not missing, f"{path} has {n} layers, and layer(s) {missing} have no hook point: every layer "
                              "of every hooked stack must be present (hook_points left them out)")


def _check_roots(adapter: ModelAdapter, points: Sequence[HookPoint]) -> None:
    """Each stream spec's root resolves and holds the stream's hook points (it is where its tokens come from)."""
    for stream, spec in (adapter.stream_specs() or {}).items():
        root = getattr(spec, "root", None)
        if not root:
            continue
        try:
            adapter.model.get_submodule(root)
        except AttributeError:
            raise ConformanceError(f"stream spec {stream!r}: root {root!r} is not a module of the model") from None
        # a substep (a decoder run inside the root's steps, e.g. a depth decoder beside the backbone)
        # feeds the hook points under it; the spec names it, so those count as the stream's own
        substeps = tuple(getattr(spec, "substeps", ()) or ())
        for sub in substeps:
            try:
                adapter.model.get_submodule(sub)
            except AttributeError:
                raise ConformanceError(f"stream spec {stream!r}: substep {sub!r} is not a module of the model") from None
        outside = [hp.name for hp in points if hp.stream == stream
                   and not any(hp.module.startswith(m + ".") for m in (root, *substeps))]
        nor = f" nor under its substeps {list(substeps)}" if substeps else ""
        _require(not outside, f"stream spec {stream!r}: hook points {outside[:3]} are not under its root {root!r}{nor}: "
                              "the root must be the module that feeds this stream's tokens to its layers (a decoder "
                              "that runs inside the root's steps goes in substeps=)")


# Lowest value each activation can output (for the declared activation's range check).
ACTIVATION_MIN = {"silu": -0.27846454, "swish": -0.27846454, "gelu": -0.16997, "relu": 0.0, "sigmoid": 0.0}
_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": torch.nn.functional.silu, "swish": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu,
    "relu": torch.relu, "sigmoid": torch.sigmoid}


def _declared_activation(adapter: ModelAdapter, hp: HookPoint) -> str | None:
    """``hp.meta["activation"]``, else the activation the hooked module is (by its class name), else None."""
    if hp.meta.get("activation"):
        return str(hp.meta["activation"]).lower()
    name = type(adapter.module(hp)).__name__.lower()
    return next((a for a in _ACTIVATIONS if a in name), None)


def _check_gate_tensor(adapter: ModelAdapter, hp: HookPoint, x: Any, g: torch.Tensor | None) -> None:
    """A dense hook point's tensor is act(W x) for a projection W of its MLP on the MLP's own input, and it
    stays in the declared activation's range (catches gate_proj hooked before the activation, up_proj, a norm)."""
    module = adapter.module(hp)
    _require(not any(True for _ in module.parameters(recurse=False)),
             f"{hp.name}: the hooked module {hp.module!r} ({type(module).__name__}) has weights of its own: a "
             "projection or a norm, not the activation; hook the module whose output is act(gate_proj(x))")
    activation = _declared_activation(adapter, hp)
    if g is not None and activation in ACTIVATION_MIN:
        low = float(g.min())
        _require(low >= ACTIVATION_MIN[activation] - 1e-4,
                 f"{hp.name}: values down to {low:.3g}, below {activation}'s minimum "
                 f"{ACTIVATION_MIN[activation]:.3g}: the hooked tensor is not the post-{activation} gate")
    if x is None or g is None:
        _require(x is not None, f"{hp.name}: its MLP {_parent(hp.module)!r} (the hooked module's parent) never "
                                "received an input during generation")
        return
    mlp = adapter.model.get_submodule(_parent(hp.module))
    acts = [m for m in mlp.children() if not any(True for _ in m.parameters())
            and not isinstance(m, (torch.nn.Dropout, torch.nn.Identity))]
    fns = [*acts, *([_ACTIVATIONS[activation]] if activation in _ACTIVATIONS else [])]
    projections = [m for m in mlp.children() if isinstance(m, torch.nn.Linear) and m.out_features in (hp.width, 2 * hp.width)]
    w = hp.width
    with torch.no_grad():
        for proj in projections:
            y = proj(x.to(proj.weight.dtype))
            for part in ([y] if y.shape[-1] == w else [y[..., :w], y[..., w:]]):
                for fn in fns:
                    want = fn(part).reshape(g.shape) if part.numel() == g.numel() else None
                    if want is not None and torch.allclose(want.float(), g.float(), rtol=1e-4, atol=1e-5):
                        return
    raise ConformanceError(
        f"{hp.name}: the hooked tensor ({hp.module}) is not act(W x) for any projection W of its MLP "
        f"{_parent(hp.module)!r} on the MLP's own input ({len(projections)} projection(s) of width {w} tried, "
        f"activation {activation or 'unknown'}): a pre-activation gate_proj, up_proj, a norm or another tensor "
        "of the right shape is hooked instead of the post-activation gate")


def check_generation(adapter: ModelAdapter, config: GenerationConfig | None = None) -> None:
    """Results in order with text and finite float32 audio; each equals its request generated alone."""
    config = config or tiny_config()
    requests = tiny_requests(2)
    results = adapter.generate(requests, config)
    _require(len(results) == len(requests), f"{len(requests)} requests gave {len(results)} results")
    for request, result in zip(requests, results, strict=True):
        _require(isinstance(result, EVCResult), f"generate must return EVCResult, got {type(result).__name__}")
        _require(result.id == request.id, f"results out of order: {result.id!r} for request {request.id!r}")
        _require(isinstance(result.text, str), f"{result.id}: text must be str")
        _require(result.sample_rate == adapter.sample_rate,
                 f"{result.id}: sample rate {result.sample_rate} differs from declared {adapter.sample_rate}")
        wave = result.waveform
        _require(isinstance(wave, np.ndarray) and wave.dtype == np.float32 and wave.ndim == 1,
                 f"{result.id}: waveform must be float32 [samples], got {getattr(wave, 'dtype', type(wave))} "
                 f"{getattr(wave, 'shape', '')}")
        _require(wave.size > 0, f"{result.id}: no audio ({result.info.get('error', 'no error given')})")
        _require(bool(np.all(np.isfinite(wave))), f"{result.id}: waveform has NaN or inf")
    for i, request in enumerate(requests):
        alone = adapter.generate([request], config)[0]
        _require(_same(results[i], alone),
                 f"request {i} of a 2-request generate differs from the same request generated alone with the "
                 f"same seed ({_difference(results[i], alone)}); "
                 + ("a row of a batch must not depend on its batch mate (padding, attention masks, per-row "
                    "seeds)" if adapter.batched else "generation must not depend on the request before it "
                    "(seed each request, reset state between requests)"))


def check_recording(adapter: ModelAdapter, config: GenerationConfig | None = None) -> None:
    """``GateRecorder`` counts, positions and sums of a one-request generate equal a plain-hook reference."""
    from esn.recording import GateRecorder

    layout = adapter.layout()
    counts = {hp.name: torch.zeros(hp.width, dtype=torch.int64) for hp in layout}
    sums = {hp.name: torch.zeros(hp.width, dtype=torch.float64) for hp in layout}
    tokens = dict.fromkeys(layout.names, 0)
    before = _hooks(adapter)

    def reference(hp: HookPoint, g: torch.Tensor) -> None:  # g [batch=1, pos, width] or [rows, d] (routed)
        flat = g.detach().reshape(-1, g.shape[-1])
        counts[hp.name][: flat.shape[1]] += (flat > 0).sum(0).cpu()
        sums[hp.name][: flat.shape[1]] += flat.double().sum(0).cpu()
        tokens[hp.name] += flat.shape[0]

    with (injected(adapter.model, layout), GateRecorder(adapter) as recorder,  # injected: esn.fused gates
          installed(_observe(adapter, list(layout), reference))):
        _generate_one(adapter, config)
    stats = recorder.stats()
    _require(stats.batch_size == 1, f"one request recorded as {stats.batch_size} rows")
    for hp in layout:
        # routed: [experts, d] summed over experts (each row act_fn saw is one (position, expert))
        def units(t: torch.Tensor, hp: HookPoint = hp) -> torch.Tensor:
            t = t[0, layout.slice(hp.name)]
            return t.reshape(hp.groups, hp.unit_width).sum(0) if hp.groups > 1 else t  # indexed: over indices

        got = units(stats.counts).to(torch.int64)
        want = counts[hp.name][: got.numel()]
        _require(torch.equal(got, want),
                 f"{hp.name}: recorded counts differ from the plain-hook reference in "
                 f"{int((got != want).sum())} of {got.numel()} units")
        seen = int(stats.tokens[0, layout.group_slice(hp.name)].sum())
        _require(seen == tokens[hp.name],
                 f"{hp.name}: recorded {seen} positions, the reference saw {tokens[hp.name]}")
        if stats.sums is not None:
            _require(torch.allclose(units(stats.sums), sums[hp.name][: got.numel()], rtol=1e-6, atol=1e-6),
                     f"{hp.name}: recorded gate sums differ from the reference")
    _require(_hooks(adapter) == before, "the recorder left hooks on the model")


def check_interventions(adapter: ModelAdapter, config: GenerationConfig | None = None) -> None:
    """Per stream: deactivate zeroes the gates, a large gain changes the output, alpha 0 changes nothing,
    and no hook is left behind."""
    from esn.masks import Mask
    from esn.steering import steer

    before = _hooks(adapter)
    base = _generate_one(adapter, config)
    for stream in adapter.layout().streams:
        layout = adapter.layout([stream])
        everything = Mask(np.arange(layout.n_neurons), layout)
        largest = {"value": 0.0}

        def seen(hp: HookPoint, g: torch.Tensor, largest: dict = largest) -> None:
            largest["value"] = max(largest["value"], float(g.detach().abs().max()))

        with steer(adapter, everything, "deactivate"), installed(_observe(adapter, list(layout), seen)):
            _generate_one(adapter, config)
        _require(largest["value"] == 0.0, f"deactivate on {stream}: a later hook still saw gate values "
                                          f"up to {largest['value']}")
        # a tiny random model's argmax can survive zeroed gates; a 101x gain on every gate it cannot
        with steer(adapter, everything, "steer", LARGE_GAIN):
            changed = _generate_one(adapter, config)
        # Each stream must move its own output: lm the text it writes (audio, for a model without text
        # out), synth the audio. Hook points on the wrong decoder (lm and synth swapped) fail here.
        if stream == "lm" and type(adapter).text_out:
            _require(changed.text != base.text, f"steer x{1 + LARGE_GAIN:g} on every lm gate left the text "
                                                f"unchanged ({base.text!r}): the lm hook points are not on the "
                                                "decoder that writes the text (lm and synth swapped?)")
        else:
            _require(not (changed.waveform.shape == base.waveform.shape
                          and np.array_equal(changed.waveform, base.waveform)),
                     f"steer x{1 + LARGE_GAIN:g} on every {stream} gate left the audio unchanged: the {stream} "
                     "hook points are not on the decoder that writes the speech")
        _require(_hooks(adapter) == before, f"steering {stream} left hooks on the model")
        with steer(adapter, everything, "steer", 0.0):
            neutral = _generate_one(adapter, config)
        _require(_same(base, neutral), f"steer with alpha=0 on {stream} changed the output")
    _require(_hooks(adapter) == before, "interventions left hooks on the model")
    _require(_same(base, _generate_one(adapter, config)), "generation differs after the interventions were removed")


def check_speech_input(adapter: ModelAdapter, config: GenerationConfig | None = None) -> None:
    """The model's computation depends on the input speech: two recordings, same target emotion, and the
    gates of the first forward differ (catches an adapter that ignores ``request.audio`` and a checkpoint
    whose audio path, an encoder or codec codebooks, is zero, so the speech never reaches the model). The
    gates, not the outputs: a tiny random model's greedy output may not move with its input, and an adapter
    may shape its output from the audio outside the model (the planted one renders at the source's pitch)."""
    config = config or tiny_config()
    layout = adapter.layout()
    runs: list[dict[str, torch.Tensor]] = []
    outputs = []
    # another voice: other pitch contour and noise, 12 dB quieter (coarse audio tokenisers must see it too)
    for seed, gain in ((0, 1.0), (3, 0.25)):
        first: dict[str, torch.Tensor] = {}

        def keep(hp: HookPoint, g: torch.Tensor, first: dict = first) -> None:
            if hp.name not in first and isinstance(g, torch.Tensor):
                first[hp.name] = g.detach().float().cpu().clone()

        with injected(adapter.model, layout), installed(_observe(adapter, list(layout), keep)):  # esn.fused gates
            request = EVCRequest(gain * speech_like(1.0, seed=seed), "happy", id=f"s{seed}")
            outputs.append(adapter.generate([request], config)[0])
        runs.append(first)
    moved = [name for name in layout.names if name in runs[0] and name in runs[1]
             and (runs[0][name].shape != runs[1][name].shape or not torch.equal(runs[0][name], runs[1][name]))]
    same = "and the same text and audio" if _same(*outputs) else "(the outputs differ, but not through the model)"
    _require(bool(moved),
             "two different input recordings with the same target emotion gave the same gates at every hook point "
             f"{same}: the input speech never reaches the model (does generate read request.audio? does the "
             "checkpoint's audio encoder or codec map speech to anything but zeros?)")


CHECKS: tuple[Callable[..., None], ...] = (
    check_class,
    check_checkpoint,
    check_hook_points,
    check_generation,
    check_speech_input,
    check_recording,
    check_interventions,
)


def run_conformance(
    adapter_cls: type[ModelAdapter],
    directory: str | Path,
    *,
    seed: int = 0,
    config: GenerationConfig | None = None,
) -> ModelAdapter:
    """Write and load the adapter's tiny checkpoint, then run every check; raise one
    :class:`ConformanceError` listing all failures. Returns the loaded adapter."""
    check_class(adapter_cls)
    adapter = load_tiny(adapter_cls, directory, seed=seed)
    failures = []
    for check in CHECKS:
        try:
            check(adapter, config)
        except ConformanceError as exc:
            failures.append(f"{check.__name__}: {exc}")
    if failures:
        raise ConformanceError(f"{adapter_cls.__name__} fails {len(failures)} check(s):\n  " + "\n  ".join(failures))
    return adapter
