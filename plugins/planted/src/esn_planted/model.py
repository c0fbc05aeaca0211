"""The planted model: a tiny Qwen2 language model whose weights are written by hand, so that which gate
neurons carry which emotion is known, and their effect on the output is causal by construction.

Tokens: ``PAD BOS SEP EOS``, one instruction token per emotion (``EMO_<e>``), one speech code per emotion
(``CODE_<e>``: what the model "says"), and ``AUDIO_TOKENS`` tokens for quantised source-audio frames. A
prompt is ``BOS, audio tokens, EMO_<target>, SEP``; the model then emits ``CODE_*`` tokens, one per step.

The residual stream (``HIDDEN`` dims, one more with content) has named directions: a constant ``BIAS`` dim; an instruction dim
``u_e`` per emotion; an expression dim ``w_e`` per emotion; the rest is noise from the source audio.

* Attention head 0 looks up the instruction token (its key is large there; RoPE is made inert on the dims
  it uses) and copies ``u_target`` to every later position, generated ones included.
* Head 1 averages every position's ``w`` dims, heads 2-3 (layer 0) its noise dims: each source leans a
  little towards some emotion, and its noise reaches the generated positions.
* Planted neurons (``PLANTED_LAYERS``, ``PER_LAYER`` per target emotion and layer): gate
  ``beta * u_e - theta * BIAS + noise``, up = ``BIAS``, down writes ``gamma * w_e``. They fire when the
  target is e, and push the expression of e.
* Background neurons write only noise dims: always-on ones (LAP picks them), emotion-suppressed ones (on
  unless the target is e), decoys (read ``u_e`` like planted ones, but so noisily that they fire for some
  sources only: emotion-specific, smaller margin, no effect), and readers of the noise dims.
* The output head compares ``w_e`` (emotion codes) with ``tau * BIAS`` (the neutral code): without help
  the model often says neutral, so the baseline match rate is modest. Scaling the planted neurons of the
  target raises ``w_target`` over the threshold: a self-effect; those of another emotion are inactive
  (SiLU of a negative number is near 0), so scaling them does little: a small cross-effect.

Content (``content=True``, the default): the model also "says" the text. A ``CONTENT`` dim carries it; the
output head exposes it through a never-emitted token (``TEXT``: its logit minus ``TEXT_REF``'s is CONTENT, and
``TEXT_REF``'s is -20 BIAS, both after the final norm), so each generated step has a ratio ``CONTENT / BIAS``,
and the adapter garbles the transcript's word of any step where that ratio exceeds ``TEXT_LIMIT`` (semantic
drift: WER rises, the sound does not change). Two populations write it: *generic* neurons (``GENERIC`` per
layer, every layer: shared generation features that fire for every target, more surely for one, so CAS ranks
them below the planted ones and takes them only into masks larger than the planted set) write
``KAPPA_GENERIC``; the planted neurons write a little, ``KAPPA_PLANTED``, so steering them moderately keeps
the text and steering them strongly does not.

``synth=True`` adds a synthesis stream: a second planted model (its own seed, no content) that the adapter runs
over ``BOS, EMO_<target>, SEP`` and the generated codes after the language model has spoken, like a speech
decoder. Its planted neurons fire for their emotion as the language model's do, so the selectors find them,
but nothing it computes reaches the pitch or the text: steering it is inert (the paper's Table 6 finding).
``synth_audible=True`` is the control: its emotional code decisions replace the language model's codes.

``hard``: emotions whose code needs far more expression (``HARD_SHIFT``): the baseline never says them, so
they get no success set. The ground truth (planted flat neuron indices per emotion, and the generic ones) is
written next to the checkpoint in ``planted.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

EMOTIONS = ("neutral", "angry", "happy", "sad", "surprise")
TARGETS = ("angry", "happy", "sad", "surprise")
PAD, BOS, SEP, EOS = 0, 1, 2, 3
EMO = {e: 4 + i for i, e in enumerate(EMOTIONS)}  # instruction tokens
CODE = {e: 9 + i for i, e in enumerate(EMOTIONS)}  # speech codes
AUDIO0, AUDIO_TOKENS = 14, 16
VOCAB = 32

HIDDEN, LAYERS, WIDTH, HEADS, HEAD_DIM = 32, 4, 64, 4, 8
BIAS = 0
U = {e: 1 + i for i, e in enumerate(EMOTIONS)}  # instruction dims 1..5
W = {e: 6 + i for i, e in enumerate(EMOTIONS)}  # expression dims 6..10
NOISE = list(range(11, HIDDEN))
CONTENT = HIDDEN  # the text's dim, one past the others (content=True only); read only by the output head
PLANTED_LAYERS, PER_LAYER = (1, 2), 3
ROPE_THETA = 1e12  # head dim 3 then turns by ~1e-9 rad per position: the instruction lookup ignores distance
LOOKUP_DIM = 3  # the head dim of head 0 whose query/key find the instruction token

# Strengths (chosen so that the baseline says the target ~30-50% of the time; see the plugin's tests).
INSTRUCTION = 4.0  # u_e of an EMO token's embedding
LOOKUP = 8.0  # query (BIAS) and key (u) scale of the lookup head
BETA, THETA, GAMMA = 0.5, 1.0, 0.09  # planted gate read, gate threshold, write strength
TAU = 0.9  # the neutral code's threshold on w (in units of BIAS)
AUDIO_W = 1.0  # spread of an audio token's lean towards each emotion (w dims)
AUDIO_NOISE = 1.0  # spread of an audio token's noise dims
GATE_NOISE = 0.5  # planted gates: weight spread on the noise dims (firing varies with the source)
DECOY_NOISE, DECOY_THETA = 4.0, 3.5  # decoy gates: noisy and with a higher threshold (some sources only)
TEXT, TEXT_REF = 30, 31  # never emitted: their logits expose CONTENT / BIAS (content=True)
GENERIC = 8  # generic (content) neurons per layer (fewer where a planted neuron takes the slot), two per emotion
GENERIC_READ = 0.6  # how much a generic gate reads its emotion's u (it fires for the others about half the time)
KAPPA_GENERIC, KAPPA_PLANTED = 0.05, 0.04  # content written per unit of activation
TEXT_LIMIT = 1.9  # CONTENT / BIAS above this garbles the step's word
HARD_SHIFT = 5.0  # a hard emotion's code needs this much more expression (in units of BIAS)
SYNTH_SHIFT = 0.3  # the audible synth's codes need this much more: neutral at baseline, emotional when steered


def ground_truth(seed: int, planted_layers: tuple[int, ...] = PLANTED_LAYERS) -> dict[str, list[int]]:
    """Flat indices (layer-major over ``layers x WIDTH``) of each target emotion's planted neurons."""
    rng = np.random.default_rng([seed, 1])
    out: dict[str, list[int]] = {e: [] for e in TARGETS}
    for layer in planted_layers:
        slots = rng.permutation(WIDTH)[: PER_LAYER * len(TARGETS)]
        for k, e in enumerate(TARGETS):
            out[e] += sorted(int(layer * WIDTH + n) for n in slots[k * PER_LAYER:(k + 1) * PER_LAYER])
    return {e: sorted(v) for e, v in out.items()}


def config(hidden: int = HIDDEN, layers: int = LAYERS):
    """The ``Qwen2Config`` of the planted model (RoPE made inert on the lookup head's dims)."""
    from transformers import Qwen2Config

    cfg = Qwen2Config(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=WIDTH, num_hidden_layers=layers,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, head_dim=HEAD_DIM, max_position_embeddings=512,
        tie_word_embeddings=False, rms_norm_eps=1e-6, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
        rope_theta=ROPE_THETA,
    )
    if isinstance(getattr(cfg, "rope_parameters", None), dict):  # transformers 5 keeps it here
        cfg.rope_parameters["rope_theta"] = ROPE_THETA
    cfg.architectures = ["Qwen2ForCausalLM"]
    return cfg


def build(seed: int = 0, *, content: bool = True, hard: tuple[str, ...] = (), gamma: float = GAMMA,
          layers: int = LAYERS, planted_layers: tuple[int, ...] = PLANTED_LAYERS, shift: float = 0.0):
    """The planted ``Qwen2ForCausalLM`` (float32, eval) and its ground truth (``{emotion: indices}``, plus
    ``"generic"``: the content neurons, empty without ``content``). ``gamma``: the planted write strength;
    ``layers`` deep, the planted neurons in ``planted_layers``; every emotion code needs ``shift`` more
    expression (the audible synth control: its baseline then stays neutral)."""
    import torch
    from transformers import Qwen2ForCausalLM

    if not planted_layers or not all(0 <= layer < layers for layer in planted_layers):
        raise ValueError(f"planted_layers {planted_layers} must be layers of 0..{layers - 1}")
    unknown = sorted(set(hard) - set(TARGETS))
    if unknown:
        raise ValueError(f"hard emotions {unknown} are not among {TARGETS}")
    rng = np.random.default_rng([seed, 0])
    content_rng = np.random.default_rng([seed, 2])  # the content's own draws: the emotion weights stay as before
    generic: list[int] = []
    torch.manual_seed(seed)
    hidden = HIDDEN + 1 if content else HIDDEN  # without content: the model as it was, to the bit
    model = Qwen2ForCausalLM(config(hidden, layers)).eval()
    truth = ground_truth(seed, tuple(planted_layers))

    def t(a) -> torch.Tensor:
        return torch.as_tensor(np.asarray(a), dtype=torch.float32)

    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        emb = np.zeros((VOCAB, hidden))
        emb[:, BIAS] = 1.0
        for e in EMOTIONS:
            emb[EMO[e], U[e]] = INSTRUCTION
        for a in range(AUDIO0, AUDIO0 + AUDIO_TOKENS):
            emb[a, NOISE] = rng.normal(0, AUDIO_NOISE, len(NOISE))
            for e in TARGETS:
                emb[a, W[e]] = rng.normal(0, AUDIO_W)
        model.model.embed_tokens.weight.copy_(t(emb))

        for layer, block in enumerate(model.model.layers):
            block.input_layernorm.weight.fill_(1.0)
            block.post_attention_layernorm.weight.fill_(1.0)
            att = block.self_attn
            q, k, v = (np.zeros((HEADS * HEAD_DIM, hidden)) for _ in range(3))
            o = np.zeros((hidden, HEADS * HEAD_DIM))
            if layer == 0:  # head 0: find the instruction token, copy its u dims to every later position
                q[LOOKUP_DIM, BIAS] = LOOKUP
                for e in EMOTIONS:
                    k[LOOKUP_DIM, U[e]] = LOOKUP
                    v[EMOTIONS.index(e), U[e]] = 1.0
            for i, e in enumerate(EMOTIONS):  # head 1 (uniform: no query or key): the mean lean of the source
                v[HEAD_DIM + i, W[e]] = 1.0
                o[W[e], HEAD_DIM + i] = 1.0 / layers
            if layer == 0:
                for e in EMOTIONS:
                    o[U[e], EMOTIONS.index(e)] = 1.0
                for i, d in enumerate(NOISE[: 2 * HEAD_DIM]):  # heads 2-3 (uniform): the source's mean noise
                    v[2 * HEAD_DIM + i, d] = 1.0
                    o[d, 2 * HEAD_DIM + i] = 1.0
            att.q_proj.weight.copy_(t(q))
            att.k_proj.weight.copy_(t(k))
            att.v_proj.weight.copy_(t(v))
            att.o_proj.weight.copy_(t(o))

            gate, up, down = np.zeros((WIDTH, hidden)), np.zeros((WIDTH, hidden)), np.zeros((hidden, WIDTH))
            planted = {n - layer * WIDTH: e for e, idx in truth.items() for n in idx if n // WIDTH == layer}
            kinds = rng.permutation(WIDTH)
            for n in range(WIDTH):
                if n in planted:
                    e = planted[n]
                    gate[n, U[e]] = BETA
                    gate[n, BIAS] = -THETA
                    gate[n, NOISE] = rng.normal(0, GATE_NOISE / np.sqrt(len(NOISE)), len(NOISE))
                    up[n, BIAS] = 1.0
                    down[W[e], n] = gamma
                    if content:
                        down[CONTENT, n] = KAPPA_PLANTED
                    continue
                rank = int(np.flatnonzero(kinds == n)[0])
                noise = 1.0
                if rank < 6:  # always on, whatever the emotion (what LAP picks)
                    gate[n, BIAS] = 3.0
                elif rank < 10:  # on unless the target is one emotion (what MAD may pick)
                    e = TARGETS[rank % len(TARGETS)]
                    gate[n, BIAS] = 1.0
                    gate[n, U[e]] = -1.5
                elif rank < 14 and layer not in planted_layers:  # decoys: emotion-specific for some sources only,
                    e = TARGETS[rank % len(TARGETS)]  # and writing nothing that matters
                    gate[n, U[e]] = BETA
                    gate[n, BIAS] = -DECOY_THETA
                    noise = DECOY_NOISE
                else:  # noise readers
                    gate[n, BIAS] = rng.uniform(-1.0, 0.6)
                gate[n, NOISE] += rng.normal(0, noise / np.sqrt(len(NOISE)), len(NOISE))
                up[n, NOISE] = rng.normal(0, 1.0 / np.sqrt(len(NOISE)), len(NOISE))
                down[NOISE, n] = rng.normal(0, 0.3 / np.sqrt(WIDTH), len(NOISE))
                if content and 14 <= rank < 14 + GENERIC:  # generic: shared by every emotion, carries the text
                    e = TARGETS[rank % len(TARGETS)]
                    gate[n] = 0.0
                    gate[n, U[e]] = GENERIC_READ
                    gate[n, NOISE] = content_rng.normal(0, 1.0 / np.sqrt(len(NOISE)), len(NOISE))
                    up[n] = 0.0
                    up[n, BIAS] = 1.0
                    down[:, n] = 0.0
                    down[CONTENT, n] = KAPPA_GENERIC
                    generic.append(layer * WIDTH + n)
            block.mlp.gate_proj.weight.copy_(t(gate))
            block.mlp.up_proj.weight.copy_(t(up))
            block.mlp.down_proj.weight.copy_(t(down))

        model.model.norm.weight.fill_(1.0)
        head = np.zeros((VOCAB, hidden))
        head[:, BIAS] = -20.0  # anything but a speech code is out of reach
        for e in TARGETS:
            head[CODE[e], BIAS] = 0.0
            head[CODE[e], W[e]] = 10.0
        head[CODE["neutral"], BIAS] = 10.0 * TAU  # neutral wins unless some w_e > TAU (relative to BIAS)
        for e in TARGETS:  # its code needs HARD_SHIFT more expression than any baseline reaches
            head[CODE[e], BIAS] = -10.0 * (HARD_SHIFT if e in hard else shift)
        if content:
            head[TEXT, CONTENT] = 1.0
        model.lm_head.weight.copy_(t(head))
    return model, {**truth, "generic": sorted(generic)}


def write(directory: str | Path, *, seed: int = 0, content: bool = True, hard: tuple[str, ...] = (),
          gamma: float = GAMMA, layers: int = LAYERS, planted_layers: tuple[int, ...] = PLANTED_LAYERS,
          synth: bool = False, synth_audible: bool = False) -> Path:
    """Save the planted checkpoint (``save_pretrained``) and ``planted.json`` (vocabulary, ground truth and
    the options it was built with; ``build`` says what they do)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model, truth = build(seed, content=content, hard=tuple(hard), gamma=gamma, layers=layers,
                         planted_layers=tuple(planted_layers))
    generic = truth.pop("generic")
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = EOS
    model.generation_config.bos_token_id = BOS
    model.save_pretrained(directory)
    synth_meta = None
    if synth or synth_audible:  # the synthesis stream: a planted model of its own (inert unless synth_audible)
        synth_model, synth_truth = build(seed + 1000, content=False, hard=tuple(hard),
                                         shift=SYNTH_SHIFT if synth_audible else 0.0)
        synth_truth.pop("generic")
        synth_model.save_pretrained(directory / "synth")
        synth_meta = {"planted": synth_truth, "layout": {"layers": LAYERS, "width": WIDTH}, "audible": synth_audible}
    meta = {
        "format": "esn-planted/1", "seed": seed, "emotions": list(EMOTIONS), "targets": list(TARGETS),
        "tokens": {"pad": PAD, "bos": BOS, "sep": SEP, "eos": EOS, "instruction": EMO, "code": CODE,
                   "audio_first": AUDIO0, "audio_count": AUDIO_TOKENS},
        "layout": {"layers": layers, "width": WIDTH},
        "planted": truth,
        "generic": generic,
        "options": {"content": content, "hard": list(hard), "gamma": gamma, "planted_layers": list(planted_layers),
                    "synth": synth or synth_audible, "synth_audible": synth_audible},
        "synth": synth_meta,
        "content": {"text": TEXT, "text_ref": TEXT_REF, "limit": TEXT_LIMIT} if content else None,
    }
    (directory / "planted.json").write_text(json.dumps(meta, indent=1))
    return directory
