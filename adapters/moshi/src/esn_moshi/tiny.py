"""A tiny random Moshi checkpoint (~0.1 M parameters): the real ``MoshiForConditionalGeneration`` with a
two-layer temporal transformer, a two-layer depth decoder over 3 codebooks and a small Mimi codec, plus a
byte-level tokenizer, written with ``save_pretrained``. Mimi's codebooks are built as zeros (its
``embed_sum`` buffers): every frame would quantise to code 0 and the input speech would never reach the
model, so they are drawn at random here. Everything is seeded: the same seed writes the same files."""

from __future__ import annotations

from pathlib import Path


def tiny_config():
    """The tiny ``MoshiConfig``: temporal transformer 2 x hidden 16 (ffn 24), depth decoder 2 x 16 over 3
    codebooks (ffn 20), a small Mimi (4 quantizers of 16 codes), a byte vocabulary of 256."""
    from transformers import MimiConfig, MoshiConfig

    mimi = MimiConfig(hidden_size=16, num_filters=4, num_residual_layers=1, upsampling_ratios=[8, 6, 5, 4],
                      kernel_size=3, last_kernel_size=3, residual_kernel_size=3, codebook_size=16, codebook_dim=8,
                      num_quantizers=4, vector_quantization_hidden_dimension=8, upsample_groups=16,
                      num_hidden_layers=1, intermediate_size=16, num_attention_heads=2, num_key_value_heads=2,
                      sliding_window=16, max_position_embeddings=64)
    depth = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=20, max_position_embeddings=8,
                 sliding_window=8)
    config = MoshiConfig(vocab_size=256, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=24,
                         num_codebooks=3, audio_encoder_config=mimi.to_dict(), depth_decoder_config=depth,
                         max_position_embeddings=256, sliding_window=256)
    config.architectures = ["MoshiForConditionalGeneration"]
    return config


def tiny_tokenizer():
    """A byte-level BPE tokenizer, one token per byte (ids 0..255)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core)


def initialise_codebooks(model, *, seed: int) -> int:
    """Random centroids for every Mimi codebook (built as zeros); returns how many were set."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    books = [m for m in model.modules() if type(m).__name__ == "MimiEuclideanCodebook"]
    with torch.no_grad():
        for book in books:
            book.embed_sum.copy_(torch.randn(book.embed_sum.shape, generator=gen))
            book.cluster_usage.fill_(1.0)
            book._embed = None  # its cached centroids
    return len(books)


def write_tiny(directory: str | Path, *, seed: int = 0) -> Path:
    """Write the tiny checkpoint (weights, config, tokenizer) into ``directory``; return it."""
    import torch
    from transformers import MoshiForConditionalGeneration

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = MoshiForConditionalGeneration(tiny_config()).eval()
    initialise_codebooks(model, seed=seed)
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory
