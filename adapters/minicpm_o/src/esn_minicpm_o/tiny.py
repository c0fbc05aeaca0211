"""A tiny random MiniCPM-o checkpoint in the published layout: config.json with ``auto_map`` plus the
remote-code files, so it loads through ``AutoModel.from_pretrained(dir, trust_remote_code=True)``, and
``assets/CosyVoice2-0.5B/`` for ``init_tts``. ``esn_standin.json`` marks it as a stand-in: the adapter then
checks the stand-in's needs instead of the published code's version pins."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from esn.errors import EsnError

# Widths differ between streams (and from the hidden size) so that a width mix-up shows in tests.
LLM = dict(vocab_size=112, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
           num_key_value_heads=2, head_dim=8, max_position_embeddings=2048, tie_word_embeddings=False,
           standin_cache_length_from="get_seq_length")  # seen_tokens is gone from this transformers
# The TTS switches the published chat() reads, set as a MiniCPM-o 4.5 config.json would set them.
TTS = dict(llm_dim=32, hidden_size=24, intermediate_size=40, num_attention_heads=4, num_hidden_layers=2,
           num_key_value_heads=2, max_position_embeddings=4096, num_audio_tokens=33, num_text_tokens=116,
           num_vq=1, audio_bos_token_id=113, text_eos_token_id=114, projector_type="default",
           condition_type="hidden_text_merge", audio_tokenizer_type="s3tokenizer", s3_stream_generate=False,
           s3_stream_n_timesteps=10, s3_stream_chunk_size=25, s3_stream_prelook_size=3)
VOCODER = "assets/CosyVoice2-0.5B"
MARKER = "esn_standin.json"


def write_tiny(directory: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny random remote-code stand-in checkpoint that ``MiniCPMOAdapter.load`` reads."""
    import torch

    from esn_minicpm_o.standin import DIRECTORY, FILES
    from esn_minicpm_o.standin.configuration_minicpmo import MiniCPMOConfig
    from esn_minicpm_o.standin.modeling_minicpmo import MiniCPMO, TinyCosyVoice2

    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise EsnError(f"{directory} is not empty; give a new directory for the tiny checkpoint")
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = MiniCPMOConfig(tts_config=TTS, **LLM)
    config.architectures = ["MiniCPMO"]
    model = MiniCPMO(config).eval()
    model.save_pretrained(directory)
    for name in FILES:
        shutil.copy(DIRECTORY / name, directory / name)
    path = directory / "config.json"
    data = json.loads(path.read_text())
    data["auto_map"] = {"AutoConfig": "configuration_minicpmo.MiniCPMOConfig", "AutoModel": "modeling_minicpmo.MiniCPMO"}
    data["architectures"] = ["MiniCPMO"]
    path.write_text(json.dumps(data, indent=2))
    vocoder = directory / VOCODER
    vocoder.mkdir(parents=True)
    (vocoder / TinyCosyVoice2.SETTINGS).write_text(json.dumps({"sample_rate": 24000, "samples_per_token": 960}))
    (directory / MARKER).write_text(json.dumps({"standin": "esn_minicpm_o.standin"}, indent=2))
    return directory
