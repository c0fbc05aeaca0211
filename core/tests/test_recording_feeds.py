"""Every way a stream root can be fed counts exactly the positions its gates ran, or is refused by name.

Tiny real Qwen2 models; the reference is a plain forward hook on every act_fn (every position it saw).
Feeds: inputs_embeds with a 2-D mask or none (batch 1, and a left-padded batch against solo runs), a
root that receives 4-D masks (a decoder layer), 3-D input_ids (several codes per position), and a
sub-generation run per step of another decoder (a depth decoder), with and without a spec for it.
"""

from __future__ import annotations

import pytest
import torch
from esn.adapters import StreamSpec
from esn.errors import EsnError
from esn.hooks import ModelTarget, gate_hook_points, has_hooks, installed
from esn.recording import GateRecorder

NEW = 6
STOP = 7


def _qwen2(seed, layers=2, vocab=64):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(num_hidden_layers=layers, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128,
                         tie_word_embeddings=False)
    return Qwen2ForCausalLM(config).eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return _qwen2(0)


def _seen(model, points, fn):
    """Run ``fn()`` with plain hooks on the points' modules: per point, [rows, positions] it saw per call."""
    gates = {hp.name: [] for hp in points}
    hooks = [(model.get_submodule(hp.module), lambda m, a, g, hp=hp: gates[hp.name].append(g.detach().clone()))
             for hp in points]
    with installed(hooks):
        fn()
    return gates


def _counts(gates, row=0):
    """Per point: (counts of g > 0 over every position of ``row``, positions)."""
    out = {}
    for name, calls in gates.items():
        g = torch.cat([c[row] for c in calls], dim=0)  # [T, D]
        out[name] = ((g > 0).sum(0).to(torch.int32), g.shape[0])
    return out


def _assert_row(stats, layout, want, row=0):
    for hp in layout:
        counts, positions = want[hp.name]
        assert torch.equal(stats.counts[row, layout.slice(hp.name)], counts), hp.name
        assert int(stats.tokens[row, layout.group_slice(hp.name)].sum()) == positions, hp.name


def _embeds(model, rows, width):
    """Left-padded prompt embeddings [B, width, h] and their 2-D mask; row k has ``rows[k]`` positions."""
    torch.manual_seed(1)
    ids = torch.randint(8, 64, (len(rows), width))
    embeds = model.model.embed_tokens(ids).detach()
    mask = torch.tensor([[0] * (width - n) + [1] * n for n in rows])
    return embeds * mask[..., None], mask


def _generate_embeds(model, embeds, mask):
    with torch.no_grad():
        return model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                              pad_token_id=0, eos_token_id=STOP)


@pytest.mark.parametrize("strategy", ["chunk", "step"])
@pytest.mark.parametrize("with_mask", [True, False])
def test_a_root_fed_inputs_embeds_counts_every_position_its_gates_ran(model, strategy, with_mask):
    points = gate_hook_points(model, "model.layers", "lm")
    target = ModelTarget(model, points, {"lm": StreamSpec("model", (STOP,))})
    embeds, mask = _embeds(model, [14], 14)
    run = lambda: _generate_embeds(model, embeds, mask if with_mask else None)  # noqa: E731
    want = _counts(_seen(model, points, run))
    with GateRecorder(target, strategy=strategy, chunk_steps=4) as rec:
        run()
    stats = rec.stats()
    _assert_row(stats, target.layout(), want)
    assert stats.prompt_tokens[0].tolist() == [14, 14]  # the prompt is the 14 embedded positions
    assert stats.tokens[0, 0] > 14


def test_a_left_padded_inputs_embeds_batch_gives_each_row_its_solo_statistics(model):
    points = gate_hook_points(model, "model.layers", "lm")
    target = ModelTarget(model, points, {"lm": StreamSpec("model", (STOP,))})
    rows = [5, 11, 8]
    embeds, mask = _embeds(model, rows, 11)
    with GateRecorder(target, chunk_steps=3) as rec:
        _generate_embeds(model, embeds, mask)
    batch = rec.stats()
    for k, n in enumerate(rows):
        with GateRecorder(target) as solo:
            _generate_embeds(model, embeds[k:k + 1, -n:], mask[k:k + 1, -n:])
        one = solo.stats()
        assert torch.equal(batch.counts[k], one.counts[0]) and torch.equal(batch.tokens[k], one.tokens[0])
        assert torch.equal(batch.prompt_tokens[k], one.prompt_tokens[0])
        assert one.prompt_tokens[0, 0] == n


def test_a_root_that_receives_4d_masks_counts_batch_1_and_refuses_a_padded_batch_by_name(model):
    """A decoder layer as root: transformers hands it the 4-D causal mask (or none), never the 2-D one."""
    points = gate_hook_points(model, "model.layers", "lm")
    target = ModelTarget(model, points, {"lm": StreamSpec("model.layers.0")})
    embeds, mask = _embeds(model, [9], 9)
    run = lambda: _generate_embeds(model, embeds, mask)  # noqa: E731
    want = _counts(_seen(model, points, run))
    with GateRecorder(target) as rec:
        run()
    _assert_row(rec.stats(), target.layout(), want)
    embeds, mask = _embeds(model, [4, 9], 9)
    with pytest.raises(EsnError, match=r"stream 'lm': root 'model.layers.0' received an attention_mask of shape "
                                       r"\(2, 1, 9, 9\) in a prefill of batch 2; .* point the StreamSpec's root"):
        with GateRecorder(target):
            _generate_embeds(model, embeds, mask)
    assert not has_hooks(model)


class CodebookLM(torch.nn.Module):
    """A root fed 3-D input_ids [batch, positions, codes] (summed code embeddings), as audio-token decoders are."""

    def __init__(self, lm, codes=3):
        super().__init__()
        self.lm = lm
        self.codes = codes

    def forward(self, input_ids, attention_mask=None, past_key_values=None):
        embeds = self.lm.model.embed_tokens(input_ids).sum(2)
        return self.lm(inputs_embeds=embeds, attention_mask=attention_mask, past_key_values=past_key_values,
                       use_cache=True)


def _codebook_loop(wrapper, ids, steps=NEW):
    from transformers import DynamicCache

    cache, mask = DynamicCache(), torch.ones(ids.shape[:2], dtype=torch.long)
    with torch.no_grad():
        out = wrapper(ids, mask, cache)
        for _ in range(steps):
            tok = out.logits[:, -1].argmax(-1)  # [B]
            nxt = torch.stack([tok, (tok + 1) % 64, (tok + 2) % 64], dim=-1)[:, None]  # [B, 1, codes]
            mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=torch.long)], dim=1)
            out = wrapper(nxt, mask, cache)


def test_3d_input_ids_count_exactly_at_batch_1_and_stop_ids_at_batch_2_are_refused_by_name(model):
    holder = torch.nn.ModuleDict({"backbone": CodebookLM(model)})
    wrapper = holder["backbone"]
    points = gate_hook_points(holder, "backbone.lm.model.layers", "lm")
    ids = torch.randint(8, 64, (1, 5, 3), generator=torch.Generator().manual_seed(2))
    want = _counts(_seen(holder, points, lambda: _codebook_loop(wrapper, ids)))
    target = ModelTarget(holder, points, {"lm": StreamSpec("backbone", ())})
    with GateRecorder(target) as rec:
        _codebook_loop(wrapper, ids)
    stats = rec.stats()
    _assert_row(stats, target.layout(), want)
    assert stats.prompt_tokens[0].tolist() == [5, 5]
    with pytest.raises(EsnError, match=r"stream 'lm': root 'backbone' receives input_ids of shape \(2, 5, 3\) "
                                       r"\(several codes per position\), and stop_token_ids"):
        with GateRecorder(ModelTarget(holder, points, {"lm": StreamSpec("backbone", (STOP,))})):
            _codebook_loop(wrapper, ids.repeat(2, 1, 1))
    assert not has_hooks(holder)


class WithDepth(torch.nn.Module):
    """A main decoder and a depth decoder that runs a whole sub-generation (a prefill of 2 positions and
    decode steps) after every main step, on the token it produced: a per-frame sub-generation."""

    def __init__(self, main, depth):
        super().__init__()
        self.main = main
        self.depth = depth


def _depth_loop(pair, ids, steps=4):  # each sub-generation: 2 + 2 positions (its third token is never fed)
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        out = pair.main(input_ids=ids, past_key_values=cache, use_cache=True)
        for _ in range(steps):
            tok = out.logits[:, -1:].argmax(-1)  # [1, 1]
            pair.depth.generate(input_ids=torch.cat([tok, tok], dim=1), max_new_tokens=3, min_new_tokens=3,
                                do_sample=False, pad_token_id=0)
            out = pair.main(input_ids=tok, past_key_values=cache, use_cache=True)


@pytest.fixture(scope="module")
def pair(model):
    return WithDepth(model, _qwen2(5, layers=1))


def _pair_points(pair):
    return gate_hook_points(pair, "main.model.layers", "lm") + gate_hook_points(pair, "depth.model.layers", "synth")


def test_a_per_frame_sub_generation_without_a_spec_is_refused_not_counted_as_one_prompt(pair):
    ids = torch.tensor([[9, 20, 31, 12]])
    lm = StreamSpec("main.model")
    for specs in ({"lm": lm}, {"lm": lm, "synth": StreamSpec("depth.model")}):
        with pytest.raises(EsnError, match=r"ran a second prefill \(2 positions\) after its first .* declare it "
                                           r"in that stream's spec: StreamSpec\(root="):
            with GateRecorder(ModelTarget(pair, _pair_points(pair), specs)):
                _depth_loop(pair, ids)
        assert not has_hooks(pair)


@pytest.mark.parametrize("positions", ["all", "generated"])
def test_a_per_frame_sub_generation_declared_as_substeps_counts_every_position(pair, positions):
    points = _pair_points(pair)
    ids = torch.tensor([[9, 20, 31, 12]])
    gates = _seen(pair, points, lambda: _depth_loop(pair, ids))
    want = _counts(gates)
    specs = {"lm": StreamSpec("main.model"),
             "synth": StreamSpec("main.model", substeps=("depth",), substep_positions=4)}
    target = ModelTarget(pair, points, specs)
    with GateRecorder(target, positions=positions) as rec:
        _depth_loop(pair, ids)
    stats = rec.stats()
    depth = [hp for hp in target.layout() if hp.stream == "synth"]
    for hp in depth:  # every depth position is in a step of the main decoder: all of them are generated
        counts, n = want[hp.name]
        assert n == 4 * 4  # 4 frames: a 2-position prefill and 2 steps each
        assert torch.equal(stats.counts[0, target.layout().slice(hp.name)], counts)
        assert int(stats.tokens[0, target.layout().group_slice(hp.name)].sum()) == n
    if positions == "all":
        _assert_row(stats, target.layout(), want)
        assert stats.prompt_tokens[0, 0] == 4


def test_gate_hook_points_take_the_models_own_module_names(model):
    """A gated MLP whose modules are named otherwise (w1 for the gate, w2 down, activation_fn): names from
    the adapter, not act_fn/gate_proj hard-coded."""

    class Renamed(torch.nn.Module):
        def __init__(self, mlp):
            super().__init__()
            self.w1, self.w3, self.w2, self.activation_fn = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn

        def forward(self, x):
            return self.w2(self.activation_fn(self.w1(x)) * self.w3(x))

    layers = torch.nn.ModuleList()
    for layer in model.model.layers:
        holder = torch.nn.Module()
        holder.ffn = Renamed(layer.mlp)
        layers.append(holder)
    tree = torch.nn.Module()
    tree.layers = layers
    points = gate_hook_points(tree, "layers", "lm", mlp="ffn", act_fn="activation_fn", gate_proj="w1", down_proj="w2")
    assert [p.module for p in points] == ["layers.0.ffn.activation_fn", "layers.1.ffn.activation_fn"]
    assert [p.down_proj for p in points] == ["layers.0.ffn.w2", "layers.1.ffn.w2"] and points[0].width == 48
    with pytest.raises(EsnError, match=r"layers\.0 has no gated MLP 'ffn' with modules 'act_fn' and 'gate_proj' "
                                       r"\(pass the model's own names"):
        gate_hook_points(tree, "layers", "lm", mlp="ffn")
