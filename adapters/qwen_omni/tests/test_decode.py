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

# talker_min_new_tokens 2 with the tiny model (and rows 1, 2 ending their text early): codes of 14, 14, 2
OPTIONS = {"talker_min_new_tokens": 2, "token2wav_num_steps": 2, "token2wav_batch": 4}


def _hooks(model) -> set:
    """Every hook on the model (transformers keeps its own hidden-state hooks once generate used them)."""
    return {(id(m), kind, key) for m in model.modules()
            for kind, table in (("fwd", m._forward_hooks), ("pre", m._forward_pre_hooks)) for key in table}


def _config(mode: str, **options) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=8, max_audio_tokens=14, options={**OPTIONS, **options, "decode": mode})


def _requests(speech_fn, n=3):
    return [EVCRequest(speech_fn(0.8 + 0.3 * i, i), ("happy", "sad", "angry")[i % 3], id=str(i)) for i in range(n)]


def _end_rows_early(adapter):
    """The tiny thinker never says <|im_end|> by itself: make row 1 say it at text step 3, row 2 at 5.

    A forward hook on lm_head, counting its calls (one per forward on both paths; fine on CPU, where
    nothing is captured)."""
    im_end, calls = adapter.prompts.im_end, []

    def hook(module, args, out):  # out: [B, pos, V]
        calls.append(1)
        out = out.clone()
        for row, at in ((1, 3), (2, 5)):
            if len(calls) == at:
                out[row, -1, im_end] = 1e4
        return out

    return installed([(adapter.model.thinker.lm_head, hook)])


def _run(adapter, reqs, config, conditions=None):
    with steer_rows(adapter, conditions) if conditions else installed([]), _end_rows_early(adapter), \
            GateRecorder(adapter) as rec:
        out = adapter.generate(reqs, config)
    return out, rec.stats()


def _same(eager, graph):
    (a, sa), (b, sb) = eager, graph
    for x, y in zip(a, b, strict=True):
        assert x.text == y.text and x.info["audio_codes"] == y.info["audio_codes"]
        assert np.array_equal(x.waveform, y.waveform)  # same codes -> the same token2wav, bit for bit
    assert torch.equal(sa.tokens, sb.tokens) and torch.equal(sa.counts, sb.counts)
    # the static cache's attention rounds differently in the last bits: the float sums agree closely
    torch.testing.assert_close(sa.sums, sb.sums, rtol=1e-4, atol=1e-6)


def test_graph_decode_gives_generates_tokens_audio_and_statistics(adapter, speech_fn):
    reqs = _requests(speech_fn)
    adapter.generate(reqs[:1], _config("generate"))
    before = _hooks(adapter.model)
    eager = _run(adapter, reqs, _config("generate"))
    graph = _run(adapter, reqs, _config("graph"))
    texts = [r.info["text_tokens"] for r in eager[0]]
    codes = [r.info["audio_tokens"] for r in eager[0]]
    assert texts == [8, 2, 4] and len(set(codes)) > 1, f"premise: rows end at different steps {texts} {codes}"
    assert [r.info["decode"] for r in graph[0]] == ["graph"] * 3 and eager[0][0].info["decode"] == "generate"
    _same(eager, graph)
    assert adapter.last_decode_info["thinker"]["decode"] == "eager"  # CPU: the same steps, not captured
    assert _hooks(adapter.model) == before


def test_graph_decode_with_a_condition_per_row_and_recording(adapter, speech_fn):
    layout = adapter.layout()
    rng = np.random.default_rng(0)
    masks = [Mask(np.sort(rng.choice(layout.n_neurons, 24, replace=False)), layout) for _ in range(4)]
    conditions = [Condition(masks[0], "steer", 2.0), Condition(masks[1], "add", 3.0), None,
                  Condition(masks[3], "clamp", 0.5)]
    reqs = _requests(speech_fn, 4)
    plain = adapter.generate(reqs, _config("generate"))
    eager = _run(adapter, reqs, _config("generate"), conditions)
    assert [r.info["audio_codes"] for r in eager[0]] != [r.info["audio_codes"] for r in plain], "premise: steering shows"
    _same(eager, _run(adapter, reqs, _config("graph"), conditions))
    for method, alpha in (("steer", 1.0), ("deactivate", None)):  # one mask for every row
        with steer(adapter, masks[2], method, alpha):
            a = adapter.generate(reqs, _config("generate"))
        with steer(adapter, masks[2], method, alpha):
            b = adapter.generate(reqs, _config("graph"))
        assert [r.info["audio_codes"] for r in a] == [r.info["audio_codes"] for r in b], method


def test_graph_decode_reuses_its_buffers_and_removes_hooks_on_error(adapter, speech_fn):
    reqs = _requests(speech_fn, 2)
    first = adapter.generate(reqs, _config("graph"))
    before = _hooks(adapter.model)

    def boom(module, args, out):
        raise RuntimeError("a hook failed mid-decode")

    with pytest.raises(RuntimeError, match="mid-decode"):
        with GateRecorder(adapter), installed([(adapter.model.talker.codec_head, boom)]):
            adapter.generate(reqs, _config("graph"))
    assert _hooks(adapter.model) == before
    again = adapter.generate(reqs, _config("graph"))  # the same static sessions, after the failure
    assert [r.info["audio_codes"] for r in again] == [r.info["audio_codes"] for r in first]
    assert all(np.array_equal(a.waveform, b.waveform) for a, b in zip(again, first, strict=True))
    adapter.release_decode_buffers()
    assert [r.text for r in adapter.generate(reqs, _config("graph"))] == [r.text for r in first]


def test_decode_and_dit_dtype_options(adapter, speech_fn):
    reqs = _requests(speech_fn, 2)
    with pytest.raises(EsnError, match="decode must be one of graph, generate"):
        adapter.generate(reqs, _config("fast"))
    with pytest.raises(EsnError, match="token2wav_dit_dtype must be one of float32, bfloat16"):
        adapter.generate(reqs, _config("generate", token2wav_dit_dtype="half"))
    f32 = adapter.generate(reqs, _config("graph"))
    bf16 = adapter.generate(reqs, _config("graph", token2wav_dit_dtype="bfloat16"))
    for a, b in zip(f32, bf16, strict=True):  # the DiT alone changes: same codes, nearby audio
        assert a.info["audio_codes"] == b.info["audio_codes"] and not np.array_equal(a.waveform, b.waveform)
        assert np.linalg.norm(a.waveform - b.waveform) <= 0.05 * np.linalg.norm(a.waveform)


def test_old_decode_name_eager_still_means_generate(adapter, speech_fn):
    reqs = _requests(speech_fn, 1)
    with pytest.warns(FutureWarning, match="decode='eager' is now called decode='generate'"):
        old = adapter.generate(reqs, _config("eager"))
    new = adapter.generate(reqs, _config("generate"))
    assert old[0].info["decode"] == new[0].info["decode"] == "generate"
    assert old[0].info["audio_codes"] == new[0].info["audio_codes"] and old[0].text == new[0].text
    fresh = type(adapter)(adapter.model, adapter.source, adapter.tokenizer)  # GraphDecoding's state, per adapter
    assert fresh.last_decode_info == {} and fresh._sessions is not adapter._sessions and fresh.capture is False
