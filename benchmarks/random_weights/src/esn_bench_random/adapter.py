"""Qwen2.5-Omni with seeded random weights built from a config on the device: ``QwenOmniAdapter`` but
for ``load``, so generation, recording and steering are the product's own code."""

from __future__ import annotations

from pathlib import Path

from esn.errors import EsnError
from esn_qwen_omni import QwenOmniAdapter

SEED = 0


def write_random_checkpoint(directory: str | Path, config, *, seed: int = SEED) -> Path:
    """A weightless checkpoint folder: ``config.json`` (with ``architectures``), the tiny tokenizer and
    speakers sized for ``config``'s token2wav. A few hundred kB, whatever the model size."""
    import torch
    from esn_qwen_omni.speakers import SAFETENSORS_NAME, save_speakers
    from esn_qwen_omni.tiny import SPEAKERS, speaker_bos, tiny_tokenizer
    from transformers.utils import logging as hf_logging

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config.architectures = ["Qwen2_5OmniForConditionalGeneration"]
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the tiny tokenizer's ids lie outside the configs' vocabularies by design
    try:
        config.save_pretrained(directory)
    finally:
        hf_logging.set_verbosity(verbosity)
    tiny_tokenizer().save_pretrained(directory)
    dit = config.token2wav_config.dit_config
    gen = torch.Generator().manual_seed(seed + 1)
    speakers = {name: {"bos_token": speaker_bos(name), "cond": torch.randn(1, dit.enc_emb_dim, generator=gen),
                       "ref_mel": torch.randn(1, 300, dit.mel_dim, generator=gen)} for name in SPEAKERS}
    save_speakers(directory / SAFETENSORS_NAME, speakers)
    return directory


class RandomQwenOmniAdapter(QwenOmniAdapter):
    name = "qwen_omni_random"
    model_name = "Qwen2.5-Omni, random weights (benchmarks)"

    @classmethod
    def load(cls, source, *, dtype="auto", device="cpu", attn_implementation=None, trust_remote_code=False):
        import torch
        from esn_qwen_omni.speakers import SAFETENSORS_NAME, load_speakers
        from transformers import AutoTokenizer, Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration
        from transformers.utils import logging as hf_logging

        cls.read_architectures(source)
        if dtype == "auto":
            dtype = "bfloat16" if torch.device(device).type == "cuda" else "float32"
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the talker config warns about thinker-vocabulary ids by design
        try:
            config = Qwen2_5OmniConfig.from_pretrained(source)
            # Seeded on the device itself: every GPU of one kind draws the same weights, no host copy.
            torch.manual_seed(SEED)
            with torch.device(device):
                model = Qwen2_5OmniForConditionalGeneration._from_config(
                    config, dtype=getattr(torch, dtype), attn_implementation=attn_implementation or "sdpa")
        except (OSError, ValueError) as exc:
            raise EsnError(f"cannot build a random Qwen2.5-Omni from {source}: {exc}") from None
        finally:
            hf_logging.set_verbosity(verbosity)
        model.token2wav.float()  # as the released model runs it
        model.eval()
        return cls(model, str(source), AutoTokenizer.from_pretrained(source),
                   load_speakers(Path(source) / SAFETENSORS_NAME))

    @classmethod
    def write_tiny(cls, directory, *, seed: int = 0) -> Path:
        from esn_qwen_omni.tiny import tiny_config

        return write_random_checkpoint(directory, tiny_config(), seed=seed)
