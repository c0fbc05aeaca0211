"""A tiny random Kimi-Audio checkpoint: config.json with ``auto_map`` + the ALM's remote-code files +
safetensors weights, and ``esn_standin.json`` naming the stand-in ``KimiAudio`` wrapper module."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from esn.errors import EsnError

TEXT_VOCAB = 112  # specials + printable characters of the stand-in tokenizer, rounded up
AUDIO_VOCAB = 32
# 4 main layers, the MIMO branch after layer 2 (so layer 3 feeds text only), 2 MIMO layers.
ALM = dict(vocab_size=TEXT_VOCAB + AUDIO_VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False,
           kimia_mimo_layers=2, kimia_mimo_transformer_from_layer_index=2, kimia_token_offset=TEXT_VOCAB,
           kimia_text_output_vocab=TEXT_VOCAB, kimia_audio_output_vocab=AUDIO_VOCAB, kimia_adaptor_input_dim=20,
           use_whisper_feature=True, initializer_range=0.2)


def write_tiny(directory: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny random stand-in checkpoint (remote-code ALM plus wrapper files) that ``KimiAudioAdapter.load`` reads."""
    import torch

    from esn_kimi_audio.standin import DIRECTORY, FILES, MARKER, MODULE
    from esn_kimi_audio.standin.configuration_moonshot_kimia import KimiAudioConfig
    from esn_kimi_audio.standin.kimia import SPECIALS, VOCAB
    from esn_kimi_audio.standin.modeling_moonshot_kimia import MoonshotKimiaForCausalLM

    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise EsnError(f"{directory} is not empty; give a new directory for the tiny checkpoint")
    directory.mkdir(parents=True, exist_ok=True)
    ids = {tok: i for i, tok in enumerate(VOCAB)}
    assert len(VOCAB) <= TEXT_VOCAB
    torch.manual_seed(seed)
    config = KimiAudioConfig(kimia_media_begin=ids["<|im_media_begin|>"], kimia_media_end=ids["<|im_media_end|>"],
                             pad_token_id=ids["<pad>"], **ALM)
    config.architectures = ["MoonshotKimiaForCausalLM"]
    model = MoonshotKimiaForCausalLM(config).eval()
    with torch.no_grad():  # a trained audio head emits speech ids; make the random one do so too
        model.mimo_output.weight[:TEXT_VOCAB] = 0.0
    model.save_pretrained(directory)
    for name in FILES:
        shutil.copy(DIRECTORY / name, directory / name)
    path = directory / "config.json"
    data = json.loads(path.read_text())
    data["auto_map"] = {
        "AutoConfig": "configuration_moonshot_kimia.KimiAudioConfig",
        "AutoModelForCausalLM": "modeling_moonshot_kimia.MoonshotKimiaForCausalLM",
    }
    path.write_text(json.dumps(data, indent=2))
    (directory / MARKER).write_text(json.dumps({"kimia_module": MODULE, "specials": list(SPECIALS)}, indent=2))
    return directory
