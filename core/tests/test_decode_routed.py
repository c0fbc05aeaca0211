"""Routed (mixture-of-experts) recording and steering, and substep recording, inside ``esn.decode``.

A tiny real Qwen3-MoE (transformers' fused ``@use_experts_implementation`` experts) decodes through
``CausalLMDecoding`` with ``capture=False``: on CPU the decoder runs exactly the step a GPU captures, so
the hooks take their device-side decode path. Checked bit for bit against the eager recorder around
``model.generate`` (and, for substeps, against the eager ``SubstepRoot`` path on a toy step).
"""

from __future__ import annotations

import pytest
import torch
from decode_reference import greedy_by_hand, tiny_moe
from esn.adapters import StreamSpec
from esn.decode import CausalLMDecoding, Decoder, Greedy, graphs
from esn.errors import EsnError
from esn.hooks import ModelTarget, has_hooks, mlp_hook_points
from esn.masks import Mask
from esn.recording import GateRecorder
from esn.routing import capturable
from esn.steering import Condition, steer, steer_rows

PAD = 0
NEW = 10
PROMPTS = [[5, 17, 99, 3], [44, 8, 120, 7, 61, 2, 90, 33, 14], [200, 6]]
E, K, D = 6, 2, 8  # experts, top-k, units per expert
STATS = ("counts", "tokens", "sums", "sumsq", "prompt_counts", "prompt_tokens")


def _batch(prompts):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def _generate(model, prompts, eos):
    ids, mask = _batch(prompts)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW,
                             pad_token_id=PAD, eos_token_id=list(eos))
    return out[:, ids.shape[1]:]


@pytest.fixture(scope="module")
def model():
    return tiny_moe(E, K, D)


@pytest.fixture(scope="module")
def eos(model):
    """Stop ids that end the rows at different steps, before NEW tokens."""
    ids, mask = _batch(PROMPTS)
    with torch.no_grad():
        free = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW,
                              min_new_tokens=NEW, pad_token_id=PAD)[:, ids.shape[1]:].tolist()
    stop = (free[0][3], free[1][4], free[2][6])
    ends = [next((i for i, t in enumerate(row) if t in stop), NEW) for row in free]
    assert len(set(ends)) == 3 and max(ends) < NEW - 2, f"premise: rows stop at different steps, early: {ends}"
    return stop


def _target(model, eos):
    return ModelTarget(model, mlp_hook_points(model, "model.layers", "lm"), {"lm": StreamSpec("model", tuple(eos))})


def _decoding(model, eos, batch):
    return CausalLMDecoding(model, batch=batch, max_len=16 + NEW, greedy=Greedy(NEW, tuple(eos), PAD), capture=False)


def _decode(dec, prompts):
    return dec.generate(*_batch(prompts))


def _loop_by_hand(dec, prompts, eos) -> torch.Tensor:
    """generate's loop written out over the decoder's own static step: every hook runs its eager path
    (the reference for bit-identity: the static cache rounds attention differently from generate's)."""
    return greedy_by_hand(dec.model, dec.step, dec.prefill(*_batch(prompts)), dec.greedy, eos)


def _equal(a, b):
    for name in STATS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert torch.equal(x, y), f"{name}: {int((x != y).sum())} values differ"


RECORDING = [("chunk", None, "all", None), ("chunk", 3, "all", True), ("chunk", 2, "generated", None),
             ("step", None, "all", None)]
# every recording option with grouped_mm (the default), a spread of them with the other implementations
CASES = [("grouped_mm", batch, *option) for batch in (3, 1) for option in RECORDING] + [
    ("batched_mm", 3, *RECORDING[1]), ("batched_mm", 1, *RECORDING[0]), ("batched_mm", 3, *RECORDING[3]),
    ("eager", 3, *RECORDING[0]), ("eager", 1, *RECORDING[1]), ("eager", 3, *RECORDING[2]), ("eager", 1, *RECORDING[3]),
]


@pytest.mark.parametrize("impl,batch,strategy,chunk,positions,overlap", CASES, indirect=["impl"])
def test_routed_recording_in_the_decoder_equals_the_eager_recorder(model, eos, impl, batch, strategy, chunk,
                                                                   positions, overlap):
    prompts = PROMPTS if batch == 3 else PROMPTS[1:2]
    target = _target(model, eos)
    assert target.layout()["lm.layers.0.mlp.gate"].routed and not target.layout()["lm.layers.1.mlp.gate"].routed
    options = {"strategy": strategy, "chunk_steps": chunk, "positions": positions, "overlap": overlap}
    dec = _decoding(model, eos, len(prompts))
    dec.decoder.check_every = 2  # some steps run past the end: padding, counted nowhere
    with GateRecorder(target, **options) as eager:
        by_hand = _loop_by_hand(dec, prompts, eos)
    with GateRecorder(target, **options) as ours:
        out = _decode(dec, prompts)
    assert torch.equal(out.tokens, by_hand) and out.steps > out.length - 1
    _equal(eager.stats(), ours.stats())
    # and generate under the eager recorder: the same positions, experts and signs; sums agree closely
    with GateRecorder(target, **options) as hf:
        ref = _generate(model, prompts, eos)
    assert torch.equal(out.tokens, ref)
    if len(prompts) > 1:
        assert (ref == PAD).any(), "premise: some rows finish early"
    a, b = hf.stats(), ours.stats()
    assert torch.equal(a.counts, b.counts) and torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.sums, b.sums, rtol=1e-6, atol=1e-6)
    assert not has_hooks(model)


def _masks(layout):
    return [Mask(torch.arange(r, layout.n_neurons, 3 + r).numpy(), layout) for r in range(3)]


METHODS = {"steer": ("steer", 8.0), "add": ("add", 2.0), "clamp": ("clamp", 1.0), "deactivate": ("deactivate", None)}


@pytest.mark.parametrize("impl,method", [("grouped_mm", "steer"), ("batched_mm", "add"), ("eager", "clamp"),
                                         ("grouped_mm", "deactivate"), ("eager", "steer")], indirect=["impl"])
def test_routed_steering_and_recording_in_the_decoder_match_generate(model, eos, impl, method):
    target = _target(model, eos)
    mask = _masks(target.layout())[1]
    name, alpha = METHODS[method]
    dec = _decoding(model, eos, len(PROMPTS))
    plain = _generate(model, PROMPTS, eos)
    with steer(target, mask, name, alpha), GateRecorder(target) as hf:
        ref = _generate(model, PROMPTS, eos)
    assert not torch.equal(ref, plain), f"premise: {method} changes tokens"
    with steer(target, mask, name, alpha), GateRecorder(target) as by_hand:
        hand = _loop_by_hand(dec, PROMPTS, eos)
    with steer(target, mask, name, alpha), GateRecorder(target) as ours:
        out = _decode(dec, PROMPTS)
    assert torch.equal(out.tokens, ref) and torch.equal(out.tokens, hand)
    _equal(by_hand.stats(), ours.stats())
    a, b = hf.stats(), ours.stats()
    assert torch.equal(a.counts, b.counts) and torch.equal(a.tokens, b.tokens)
    assert not has_hooks(model)


@pytest.mark.parametrize("impl,positions", [("grouped_mm", "all"), ("grouped_mm", "generated"), ("batched_mm", "all"),
                                             ("eager", "generated")], indirect=["impl"])
def test_routed_steer_rows_in_the_decoder_reproduce_each_rows_solo_run(model, eos, impl, positions):
    target = _target(model, eos)
    masks = _masks(target.layout())
    conditions = [Condition(masks[0], "steer", 2.5), None, Condition(masks[2], "clamp", 0.4)]
    dec = _decoding(model, eos, len(PROMPTS))
    with steer_rows(target, conditions, positions=positions):
        out = _decode(dec, PROMPTS)
        ref = _generate(model, PROMPTS, eos)
    assert torch.equal(out.tokens, ref)
    solo_dec = _decoding(model, eos, 1)
    for b, (prompt, cond) in enumerate(zip(PROMPTS, conditions, strict=True)):
        with steer_rows(target, [cond], positions=positions):
            solo = _decode(solo_dec, [prompt]).tokens[0]
        assert torch.equal(out.tokens[b, : solo.shape[0]], solo), b
        assert (out.tokens[b, solo.shape[0]:] == PAD).all()
    assert not torch.equal(out.tokens[0], _generate(model, PROMPTS, eos)[0]), "premise: row 0 is steered"
    assert not has_hooks(model)


def _routed_hooks(model):
    return [h for h in graphs.scoped_hooks(model) if h.path.endswith("experts") or h.path.endswith("act_fn")]


def test_graph_keys_are_structural_and_adopt_copies_values(model, eos):
    """What lets a new steering block or recorder reuse a graph captured with an earlier one."""
    target = _target(model, eos)
    masks = _masks(target.layout())
    first = [Condition(masks[0], "steer", 2.0), None, Condition(masks[1], "add", 0.5)]
    second = [Condition(masks[1], "steer", 0.5), Condition(masks[2], "add", -1.0), None]
    with steer_rows(target, first):
        hooks = graphs.scoped_hooks(model)
        key, captured = graphs.fingerprint(hooks), graphs.states(hooks)
    with steer_rows(target, second):
        hooks = graphs.scoped_hooks(model)
        assert graphs.fingerprint(hooks) == key
        routed = [h for h in hooks if h.path.endswith("experts.act_fn")]
        assert routed and all(h.kind == "forward" for h in routed)
        values = [h.hook.owner.edit.scale.clone() for h in routed]
        graphs.adopt(hooks, captured)
        for h, value in zip(routed, values, strict=True):
            scale = h.hook.owner.edit.scale
            assert any(s[0] is scale for s in captured if s) and torch.equal(scale, value)
            assert h.hook.owner.table[0].data_ptr() == scale.data_ptr()  # the gathers read the adopted tensor
    with steer(target, masks[1], "steer", 1.0):  # another structure: another graph
        assert graphs.fingerprint(graphs.scoped_hooks(model)) != key
    # recorders: equal structure, equal keys; the chunk length or the batch makes another structure
    keys = []
    for chunk, prompts in [(3, PROMPTS), (3, PROMPTS), (4, PROMPTS), (3, PROMPTS[:1])]:
        dec = _decoding(model, eos, len(prompts))
        with GateRecorder(target, chunk_steps=chunk) as rec, torch.inference_mode():
            dec.prefill(*_batch(prompts))
            rec.decode_begin(dec.decoder.state)
            hooks = graphs.scoped_hooks(model)
            keys.append(graphs.fingerprint(hooks))
            rec.decode_end(0)
    assert keys[0] == keys[1] and keys[2] != keys[0] and keys[3] != keys[0]


def test_routed_recorder_adopts_a_captured_graphs_tensors(model, eos):
    """A second recorder of the same structure takes over the first one's decode tensors (as a graph
    replay would write them) and its step-strategy totals carry its own prefill."""
    target = _target(model, eos)
    dec = _decoding(model, eos, len(PROMPTS))
    for strategy in ("chunk", "step"):
        with GateRecorder(target, strategy=strategy, chunk_steps=3) as first:
            _decode(dec, PROMPTS)
        hooks = graphs.scoped_hooks(model)
        assert not hooks
        with GateRecorder(target, strategy=strategy, chunk_steps=3) as rec, torch.inference_mode():
            dec.prefill(*_batch(PROMPTS))
            rec.decode_begin(dec.decoder.state)
            hooks = graphs.scoped_hooks(model)
            point = next(h.hook.owner for h in hooks if h.path.endswith("experts.act_fn"))
            other = next(p for p in first._points if p.hp.name == point.hp.name)
            prefill = point.counts.clone()
            graphs.adopt(hooks, graphs.states(hooks))  # adopting its own tensors changes nothing
            if strategy == "chunk":
                before = (point.gbuf, point.ebuf)
                point.graph_adopt(other.graph_state())
                assert point.gbuf is other.gbuf and point.ebuf is other.ebuf and before[1] is not other.ebuf
            else:
                point.graph_adopt(other.graph_state())
                assert point.counts is other.counts and torch.equal(point.counts, prefill)
            rec.decode_end(0)


def test_eager_experts_are_refused_for_capture(model, eos):
    target = _target(model, eos)
    hp = target.layout()["lm.layers.0.mlp.gate"]
    experts = model.get_submodule(hp.router)
    before = model.config._experts_implementation
    try:
        for name in ("grouped_mm", "batched_mm"):
            model.set_experts_implementation(name)
            assert capturable(experts, hp) == name
        model.set_experts_implementation("eager")
        with pytest.raises(EsnError, match="experts_implementation='grouped_mm'"):
            capturable(experts, hp)
        # what a capturing decoder reads first: the hooks' graph keys
        with GateRecorder(target) as rec, torch.inference_mode():
            dec = _decoding(model, eos, 1)
            dec.prefill(*_batch(PROMPTS[:1]))
            rec.decode_begin(dec.decoder.state)
            with pytest.raises(EsnError, match="a CUDA graph cannot capture"):
                graphs.fingerprint(graphs.scoped_hooks(model))
            rec.decode_end(0)
        with steer(target, _masks(target.layout())[0]), pytest.raises(EsnError, match="a CUDA graph cannot capture"):
            graphs.fingerprint(graphs.scoped_hooks(model))
    finally:
        model.set_experts_implementation(before)
    assert not has_hooks(model)


# -- substeps: a toy step that runs a small module 15 times (16 positions) before the stream root --------

TV, TH, TW = 48, 16, 24  # toy vocab, hidden, gate width
SUB_FORWARDS = (2,) + (1,) * 14  # as Qwen3-Omni's code predictor: a 2-position prefill, 14 one-position steps


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = torch.nn.Linear(TH, TW, bias=False)
        self.up_proj = torch.nn.Linear(TH, TW, bias=False)
        self.down_proj = torch.nn.Linear(TW, TH, bias=False)
        self.act_fn = torch.nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class _Layer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = _MLP()

    def forward(self, x):
        return x + self.mlp(x)


class _Stack(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.layers = torch.nn.ModuleList(_Layer() for _ in range(n))

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None):
        x = inputs_embeds
        for layer in self.layers:
            x = layer(x)
        return x


class _Toy(torch.nn.Module):
    """A stream root (``root``, fed input_ids) with a substep (``sub``) run before it in every decode step."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(TV, TH)
        self.root = _Stack(2)
        self.sub = _Stack(1)
        self.head = torch.nn.Linear(TH, TV, bias=False)

    def prefill(self, ids, mask):
        return self.head(self.root(input_ids=ids, attention_mask=mask, inputs_embeds=self.embed(ids))[:, -1])

    def step(self, state):
        """One decode step: the substep's 15 forwards on this step's token, then the root."""
        x = self.embed(state.ids)  # [B, 1, h]
        h = self.sub(inputs_embeds=torch.cat([x, 0.5 * x], 1))[:, -1:]
        acc = h
        for _ in SUB_FORWARDS[1:]:
            h = self.sub(inputs_embeds=torch.tanh(h))
            acc = acc + h
        return self.head(self.root(input_ids=state.ids, inputs_embeds=x + 0.1 * acc)[:, -1])


TOY_PROMPTS = [[5, 17, 9, 3], [44, 8, 12, 7, 6, 2], [20, 6]]
TOY_NEW = 9


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(1)
    toy = _Toy().eval()
    ids, mask = _batch(TOY_PROMPTS)
    with torch.inference_mode():  # free run (no stop ids): pick stop ids that end rows at different steps
        free = _toy_by_hand(toy, ids, mask, ())
    stop = (int(free[0, 2]), int(free[1, 5]))
    ends = [next((i for i, t in enumerate(row) if t in stop), TOY_NEW) for row in free.tolist()]
    assert len(set(ends)) == 3 and max(ends) < TOY_NEW - 1, f"premise: rows stop at different steps: {ends}"
    toy.stop = stop
    return toy


def _toy_by_hand(toy, ids, mask, stop):
    """The loop over the toy's step in plain Python: every hook runs its eager path."""
    return greedy_by_hand(toy, toy.step, toy.prefill(ids, mask), Greedy(TOY_NEW, tuple(stop), PAD), stop)


def _toy_target(toy):
    from esn.hookpoints import HookPoint

    points = [HookPoint("synth", i, TW, f"root.layers.{i}.mlp.act_fn") for i in range(2)]
    points.append(HookPoint("synth", 2, TW, "sub.layers.0.mlp.act_fn"))
    return ModelTarget(toy, points, {"synth": StreamSpec("root", toy.stop, substeps=("sub",))})


@pytest.mark.parametrize("prompts", [TOY_PROMPTS, TOY_PROMPTS[1:2]], ids=["batch3", "batch1"])
@pytest.mark.parametrize("strategy,chunk,positions,overlap", [
    ("chunk", None, "all", None), ("chunk", 2, "all", True), ("chunk", 3, "generated", None), ("step", None, "all", None),
])
def test_substep_recording_in_the_decoder_equals_the_eager_substep_path(toy, prompts, strategy, chunk, positions,
                                                                       overlap):
    target = _toy_target(toy)
    options = {"strategy": strategy, "chunk_steps": chunk, "positions": positions, "overlap": overlap}
    ids, mask = _batch(prompts)
    with GateRecorder(target, **options) as eager, torch.inference_mode():
        by_hand = _toy_by_hand(toy, ids, mask, toy.stop)
    dec = Decoder(toy, toy.step, batch=len(prompts), vocab=TV, greedy=Greedy(TOY_NEW, toy.stop, PAD), capture=False)
    dec.check_every = 2  # steps past the end: their substep positions count nowhere
    with GateRecorder(target, **options) as ours, torch.inference_mode():
        out = dec.run(toy.prefill(ids, mask))
    assert torch.equal(out.tokens, by_hand) and out.steps > out.length - 1
    a, b = eager.stats(), ours.stats()
    _equal(a, b)
    sub = target.layout().group_slice("synth.layers.2.mlp.gate")
    root = target.layout().group_slice("synth.layers.0.mlp.gate")
    generated = b.tokens[:, root] - (b.prompt_tokens[:, root] if b.has_prompt_split else 0)
    assert torch.equal(b.tokens[:, sub], generated * sum(SUB_FORWARDS))  # 16 positions per real root step
    if len(prompts) > 1:
        assert len(set(b.tokens[:, sub].flatten().tolist())) == 3, "premise: rows stop at different steps"
    assert not has_hooks(toy)


def test_substep_forwards_must_be_fixed_per_step(toy):
    target = _toy_target(toy)
    ids, mask = _batch(TOY_PROMPTS)
    calls = []

    def step(state):  # one extra substep forward in the second step
        calls.append(1)
        if len(calls) == 2:
            toy.sub(inputs_embeds=toy.embed(state.ids))
        return toy.step(state)

    dec = Decoder(toy, step, batch=3, vocab=TV, greedy=Greedy(TOY_NEW, toy.stop, PAD), capture=False)
    with pytest.raises(EsnError, match="same forwards in every step"):
        with GateRecorder(target), torch.inference_mode():
            dec.run(toy.prefill(ids, mask))
    assert not has_hooks(toy)


class _Reuse:
    """A no-op hook whose decode listener does what a decoder reusing a captured graph does: the first run
    keeps its graph-aware hooks' tensors (``graphs.states``), a later run adopts them (``graphs.adopt``)
    before its first step. Its hooks keep running (``capture=False``), now writing the adopted tensors."""

    def __init__(self, scope, first=None):
        self.scope = scope
        self.first = first
        self.decode_listener = self
        self.hooks = self.key = self.captured = None

    def __call__(self, module, args, out):
        return None

    graph_key = ("test.reuse",)  # issues no kernel: the same in every run

    def graph_state(self):
        return None

    def graph_adopt(self, state):
        pass

    def decode_begin(self, state):
        self.hooks = graphs.scoped_hooks(self.scope, state.modules)
        self.key = graphs.fingerprint(self.hooks)
        if self.first is not None:
            assert self.key == self.first.key  # the same structure: the graph would be reused
            graphs.adopt(self.hooks, self.first.captured)

    def decode_step(self, done):
        pass

    def decode_end(self, done):
        self.captured = graphs.states(self.hooks)


def _run_reusing(scope, last, run, first=None):
    reuse = _Reuse(scope, first)
    handle = last.register_forward_hook(reuse)  # after the recorder's hooks: its listener comes later
    try:
        run()
    finally:
        handle.remove()
    return reuse


@pytest.mark.parametrize("strategy,chunk,overlap", [("chunk", 3, True), ("step", None, None)])
@pytest.mark.parametrize("impl", ["grouped_mm"], indirect=True)
def test_a_recorder_that_adopts_an_earlier_ones_tensors_records_its_own_run(model, eos, impl, strategy, chunk,
                                                                              overlap):
    target = _target(model, eos)
    options = {"strategy": strategy, "chunk_steps": chunk, "overlap": overlap}
    dec = _decoding(model, eos, len(PROMPTS))
    with GateRecorder(target, **options) as first:
        reuse = _run_reusing(model, model.lm_head, lambda: _decode(dec, PROMPTS))
    first.stats()
    masks = _masks(target.layout())
    with steer(target, masks[0], "steer", 8.0), GateRecorder(target, **options) as eager:
        by_hand = _loop_by_hand(dec, PROMPTS, eos)
    with steer(target, masks[0], "steer", 1.0):  # same structure, other values: the second run adopts these
        with GateRecorder(target, **options):
            steered = _run_reusing(model, model.lm_head, lambda: _decode(dec, PROMPTS))
    with steer(target, masks[0], "steer", 8.0), GateRecorder(target, **options) as second:
        out = {}
        _run_reusing(model, model.lm_head, lambda: out.setdefault("d", _decode(dec, PROMPTS)), first=steered)
    assert torch.equal(out["d"].tokens, by_hand)  # the adopted edit tensors hold this block's values
    _equal(eager.stats(), second.stats())
    assert reuse.key != steered.key  # recording alone vs recording and steering: another graph


@pytest.mark.parametrize("strategy,chunk", [("chunk", 2), ("step", None)])
def test_a_substep_recorder_that_adopts_an_earlier_ones_tensors_records_its_own_run(toy, strategy, chunk):
    target = _toy_target(toy)
    options = {"strategy": strategy, "chunk_steps": chunk}
    ids, mask = _batch(TOY_PROMPTS)
    dec = Decoder(toy, toy.step, batch=3, vocab=TV, greedy=Greedy(TOY_NEW, toy.stop, PAD), capture=False)

    def run():
        with torch.inference_mode():
            return dec.run(toy.prefill(ids, mask))

    with GateRecorder(target, **options) as first:
        reuse = _run_reusing(toy, toy.head, run)
    first.stats()
    with GateRecorder(target, **options) as eager, torch.inference_mode():
        _toy_by_hand(toy, ids, mask, toy.stop)
    with GateRecorder(target, **options) as second:
        _run_reusing(toy, toy.head, run, first=reuse)
    _equal(eager.stats(), second.stats())


def test_substep_positions_size_the_decode_buffers(toy, monkeypatch):
    import esn.recording

    target = _toy_target(toy)
    per_step = 2 * TW + TW  # two root points, one substep point: gate values per row and step ...
    step_bytes = (per_step + 15 * TW) * 4  # float32: the toy's dtype
    monkeypatch.setattr(esn.recording, "CHUNK_BUDGET_BYTES", 8 * step_bytes)
    chunks = {}
    for positions in (1, 16):
        spec = StreamSpec("root", toy.stop, substeps=("sub",), substep_positions=positions)
        with GateRecorder(ModelTarget(toy, target.layout(), {"synth": spec})) as rec:
            chunks[positions] = rec._roots["root"].chunk_fn(1)
    # counted once, the substep point's 16 positions per step would overrun the budget 6 times over
    assert chunks == {1: 8 * 18 // 3, 16: 8}
    with pytest.raises(EsnError, match="substep_positions must be a positive integer"):
        StreamSpec("root", substep_positions=0)
