"""decode="graph" (esn.decode; on CPU the captured steps run eagerly) against decode="generate" (transformers' generate)."""

import numpy as np
import pytest
import torch
from esn.adapters import EVCRequest, GenerationConfig
from esn.errors import EsnError
from esn.hooks import installed
from esn.masks import Mask
from esn.recording import GateRecorder
from esn.steering import Condition, steer, steer_rows
from esn.testing import _hooks
from torch.utils._python_dispatch import TorchDispatchMode


def _config(mode: str, **options) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=7, max_audio_tokens=9, system_prompt="EVC.", instruction="To {emotion}.",
                            options={"talker_min_new_tokens": 2, **options, "decode": mode})


def _requests(speech_fn, n=3):
    return [EVCRequest(speech_fn(0.8 + 0.3 * i, i), ("happy", "sad", "angry")[i % 3], id=str(i)) for i in range(n)]


def _end_rows_early(adapter):
    """Random weights never stop by themselves: row 1 says <|im_end|> at text step 3 and row 2 at 5; the
    talker says codec eos in row 1 at step 4 and in row 2 at step 6. Forward hooks on ``lm_head`` and
    ``codec_head`` count their calls (one per forward on both paths; fine on CPU, where nothing is captured)."""
    eos = adapter.talker_stop_ids[0]

    def ender(stop: int, at: dict[int, int]):
        calls = []

        def hook(module, args, out):  # out: [B, pos, V]
            calls.append(1)
            out = out.clone()
            for row, step in at.items():
                if len(calls) == step and row < out.shape[0]:
                    out[row, -1, stop] = 1e4
            return out

        return hook

    return installed([(adapter.model.thinker.lm_head, ender(adapter.prompts.im_end, {1: 3, 2: 5})),
                      (adapter.model.talker.codec_head, ender(eos, {1: 4, 2: 6}))])


def _run(adapter, reqs, config, conditions=None):
    with steer_rows(adapter, conditions) if conditions else installed([]), _end_rows_early(adapter):
        return adapter.generate(reqs, config)


def _same(eager, graph):
    for x, y in zip(eager, graph, strict=True):
        assert x.text == y.text and x.info["audio_codes"] == y.info["audio_codes"]
        assert np.array_equal(x.waveform, y.waveform)  # same codes -> the same code2wav, bit for bit


def _mixed_mask(layout, per_point=6, seed=0) -> Mask:
    """Neurons of every hook point: thinker routed and dense, talker routed and shared, code predictor."""
    rng = np.random.default_rng(seed)
    picks = [layout.offsets[i] + rng.choice(hp.width, per_point, replace=False) for i, hp in enumerate(layout)]
    return Mask(np.sort(np.concatenate(picks)), layout)


@pytest.mark.parametrize("n", [1, 3])
def test_graph_decode_gives_generates_text_codes_and_audio(adapter, speech_fn, n):
    reqs = _requests(speech_fn, n)
    adapter.generate(reqs[:1], _config("generate"))  # transformers installs its hidden-state hooks once
    before = _hooks(adapter)
    eager = _run(adapter, reqs, _config("generate"))
    graph = _run(adapter, reqs, _config("graph"))
    if n == 3:
        texts = [r.info["text_tokens"] for r in eager]
        codes = [r.info["audio_tokens"] for r in eager]
        assert texts == [7, 2, 4] and codes == [8, 3, 5], f"premise: rows end at different steps {texts} {codes}"
    assert all(len(r.info["audio_codes"]) == 4 for r in graph)  # every code group
    assert [r.info["decode"] for r in graph] == ["graph"] * n and eager[0].info["decode"] == "generate"
    _same(eager, graph)
    info = adapter.last_decode_info
    assert info["thinker"]["decode"] == "eager" and info["talker"]["decode"] == "eager"  # CPU: not captured
    assert _hooks(adapter) == before


def test_graph_decode_gives_generates_results_in_bfloat16(tiny_dir, speech_fn):
    """The dtype of the GPU runs: every sum and cast in the static steps happens as in generate."""
    from esn_qwen3_omni import Qwen3OmniAdapter

    bf16 = Qwen3OmniAdapter.load(tiny_dir, dtype="bfloat16")
    reqs = _requests(speech_fn)
    _same(_run(bf16, reqs, _config("generate")), _run(bf16, reqs, _config("graph")))


def test_graph_decode_with_steering_per_row_and_for_all(adapter, speech_fn):
    layout = adapter.layout()
    masks = [_mixed_mask(layout, seed=s) for s in range(3)]
    conditions = [Condition(masks[0], "steer", 8.0), Condition(masks[1], "add", 3.0), Condition(masks[2], "clamp", 0.5)]
    reqs = _requests(speech_fn)
    plain = _run(adapter, reqs, _config("generate"))
    eager = _run(adapter, reqs, _config("generate"), conditions)
    assert [r.info["audio_codes"] for r in eager] != [r.info["audio_codes"] for r in plain], "premise: steering shows"
    _same(eager, _run(adapter, reqs, _config("graph"), conditions))
    stats = []
    for mode in ("generate", "graph"):  # recording beside per-row steering, in the decoder's steps too
        with GateRecorder(adapter) as rec:
            _same(eager, _run(adapter, reqs, _config(mode), conditions))
        stats.append(rec.stats())
    assert torch.equal(stats[0].counts, stats[1].counts) and torch.equal(stats[0].tokens, stats[1].tokens)
    for method, alpha in (("steer", 8.0), ("deactivate", None)):  # one mask for every row
        with steer(adapter, masks[2], method, alpha):
            a = _run(adapter, reqs, _config("generate"))
        with steer(adapter, masks[2], method, alpha):
            b = _run(adapter, reqs, _config("graph"))
        _same(a, b)


def test_graph_decode_records_what_generate_records(adapter, speech_fn):
    """Routed (thinker, talker), shared-expert and substep (code predictor) points recorded inside the
    decoder's steps give generate's statistics."""
    reqs = _requests(speech_fn)
    before = _hooks(adapter)
    with GateRecorder(adapter) as rec:
        eager = _run(adapter, reqs, _config("generate"))
    with GateRecorder(adapter) as rec_graph:
        graph = _run(adapter, reqs, _config("graph"))
    _same(eager, graph)
    a, b = rec.stats(), rec_graph.stats()
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.counts, b.counts)
    torch.testing.assert_close(a.sums, b.sums, rtol=1e-4, atol=1e-6)  # the static cache rounds differently
    assert _hooks(adapter) == before


def test_graph_decode_reuses_its_sessions_and_removes_hooks_on_error(adapter, speech_fn):
    reqs = _requests(speech_fn, 2)
    first = adapter.generate(reqs, _config("graph"))
    sessions = adapter._sessions
    used = [next(reversed(kept.values())) for kept in sessions._kept.values()]  # thinker's, talker's
    before = _hooks(adapter)

    def boom(module, args, out):
        raise RuntimeError("a hook failed mid-decode")

    mask = _mixed_mask(adapter.layout())
    with pytest.raises(RuntimeError, match="mid-decode"):
        with steer(adapter, mask, "steer", 2.0), installed([(adapter.model.talker.code_predictor.lm_head[1], boom)]):
            adapter.generate(reqs, _config("graph"))
    assert _hooks(adapter) == before
    again = adapter.generate(reqs, _config("graph"))  # the same static sessions, after the failure
    assert adapter._sessions is sessions and [next(reversed(k.values())) for k in sessions._kept.values()] == used
    assert [r.info["audio_codes"] for r in again] == [r.info["audio_codes"] for r in first]
    assert all(np.array_equal(a.waveform, b.waveform) for a, b in zip(again, first, strict=True))
    adapter.release_decode_buffers()
    assert [r.text for r in adapter.generate(reqs, _config("graph"))] == [r.text for r in first]


def test_decode_options(adapter, speech_fn):
    reqs = _requests(speech_fn, 2)
    with pytest.raises(EsnError, match="decode must be one of graph, generate"):
        adapter.generate(reqs, _config("fast"))
    with pytest.raises(EsnError, match="decode_experts='fused' must be one of"):
        adapter.generate(reqs, _config("graph", decode_experts="fused"))
    cpu_default = GenerationConfig(max_new_tokens=3, max_audio_tokens=3, system_prompt="EVC.", instruction="To {emotion}.")
    assert adapter.generate(reqs[:1], cpu_default)[0].info["decode"] == "generate"
    # the decode steps' experts implementation: as chosen, else generate's (on CPU: the model's own)
    from esn_qwen3_omni.decode import step_experts

    assert step_experts(adapter.model, "batched_mm") == "batched_mm" and step_experts(adapter.model, None) is None
    # the same tokens and codes (eager vs grouped_mm on CPU)
    before = adapter.model.get_experts_implementation()
    grouped = adapter.generate(reqs, _config("graph"))
    eager_steps = adapter.generate(reqs, _config("graph", decode_experts="eager"))
    assert [r.info["audio_codes"] for r in grouped] == [r.info["audio_codes"] for r in eager_steps]
    assert adapter.model.get_experts_implementation() == before
    # generation settings the static steps do not reproduce are refused; an eos outside the codebook is moot
    gc = adapter.model.talker.code_predictor.generation_config
    for name, value, refused in (("repetition_penalty", 1.2, True), ("eos_token_id", 3, True),
                                 ("eos_token_id", 10_000, False)):
        old = getattr(gc, name)
        setattr(gc, name, value)
        try:
            if refused:
                with pytest.raises(EsnError, match=f"code predictor.*{name if name != 'eos_token_id' else 'stops'}"):
                    adapter.generate(reqs[:1], _config("graph"))
            else:
                adapter.generate(reqs[:1], _config("graph"))
        finally:
            setattr(gc, name, old)
    adapter.capture_graphs = True  # what CUDA does: the eager experts cannot be captured, refused up front
    try:
        with pytest.raises(EsnError, match="decode_experts='grouped_mm'"):
            adapter.generate(reqs, _config("graph", decode_experts="eager"))
    finally:
        adapter.capture_graphs = None


class _HostSyncs(TorchDispatchMode):
    """Counts the ops that make the host wait for the device (``.item()``, ``bool()``, ``nonzero``): a CUDA
    graph capture fails on them, so a captured step must issue none."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(s in str(func) for s in ("_local_scalar_dense", "nonzero")):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
def test_decode_steps_never_wait_for_the_device(adapter, speech_fn, impl):
    """What CUDA-graph capture needs, checked on CPU: the thinker's and the talker's steps (code predictor
    unrolled inside) issue no host synchronisation with a capturable experts implementation, plain and
    with per-row steering hooks (routed and code-predictor points) inside."""
    mask = _mixed_mask(adapter.layout())
    rows = [Condition(mask, "steer", 2.0), None]
    before = adapter.model.get_experts_implementation()
    try:
        # eager experts: the premise that host syncs show
        for experts, conditions, syncs in ((impl, None, False), (impl, rows, False), ("eager", None, True)):
            with steer_rows(adapter, conditions) if conditions else installed([]):
                adapter.generate(_requests(speech_fn, 2), _config("graph", decode_experts=experts))
                adapter.model.set_experts_implementation(experts)
                for kept in adapter._sessions._kept.values():
                    session = next(reversed(kept.values()))  # one step more than the run: its caches have room
                    with torch.inference_mode(), _HostSyncs() as seen:
                        session.step(session.decoder.state)
                    assert bool(seen.ops) == syncs, (experts, conditions is not None, seen.ops[:3])
                adapter.model.set_experts_implementation(before)
    finally:
        adapter.model.set_experts_implementation(before)


def test_old_decode_name_eager_still_means_generate(adapter, speech_fn):
    reqs = _requests(speech_fn, 1)
    with pytest.warns(FutureWarning, match="decode='eager' is now called decode='generate'"):
        old = adapter.generate(reqs, _config("eager"))
    new = adapter.generate(reqs, _config("generate"))
    assert old[0].info["decode"] == new[0].info["decode"] == "generate"
    assert old[0].info["audio_codes"] == new[0].info["audio_codes"] and old[0].text == new[0].text
