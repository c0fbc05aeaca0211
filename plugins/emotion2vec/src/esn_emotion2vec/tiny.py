"""A tiny random emotion2vec+ directory in funasr's own format, for tests and the demo.

The layout is that of ``iic/emotion2vec_plus_large`` (config.yaml, model.pt, tokens.txt) with the
sizes shrunk; funasr's real ``AutoModel`` loads it offline. ``model.pt`` is written by
``torch.save`` because that is the format funasr reads (with ``torch.load``); esn itself only ever
reads it back with ``weights_only=True``.
"""

from __future__ import annotations

from pathlib import Path

import yaml

# tokens.txt of the released emotion2vec+ models, in order.
TOKENS = ("生气/angry", "厌恶/disgusted", "恐惧/fearful", "开心/happy", "中立/neutral",
          "其他/other", "难过/sad", "吃惊/surprised", "<unk>")

TINY_DIM, TINY_HEADS = 16, 2


def tiny_config() -> dict:
    """The full config.yaml schema of emotion2vec+ (OmegaConf needs every key) at tiny sizes."""
    audio = {
        "type": "AUDIO", "prenet_depth": 1, "prenet_layerdrop": 0.0, "prenet_dropout": 0.0,
        "start_drop_path_rate": 0.0, "end_drop_path_rate": 0.0, "num_extra_tokens": 2,
        "init_extra_token_zero": True, "mask_noise_std": 0.01, "mask_prob_min": None,
        "inverse_mask": False, "mask_prob": 0.5, "mask_prob_adjust": 0.05, "keep_masked_pct": 0.0,
        "mask_length": 5, "add_masks": False, "remove_masks": False, "mask_dropout": 0.0,
        "encoder_zero_mask": True, "mask_channel_prob": 0.0, "mask_channel_length": 64,
        "ema_local_encoder": False, "local_grad_mult": 1.0, "use_alibi_encoder": True,
        "alibi_scale": 1.0, "learned_alibi": False, "alibi_max_pos": None, "learned_alibi_scale": True,
        "learned_alibi_scale_per_head": True, "learned_alibi_scale_per_layer": False,
        "num_alibi_heads": TINY_HEADS, "model_depth": 1,
        "decoder": {
            "decoder_dim": 8, "decoder_groups": 2, "decoder_kernel": 3, "decoder_layers": 1,
            "input_dropout": 0.0, "add_positions_masked": False, "add_positions_all": False,
            "decoder_residual": True, "projection_layers": 1, "projection_ratio": 2.0,
        },
        "extractor_mode": "layer_norm",
        # the real 320x downsampling (50 frames/s at 16 kHz), 8 channels instead of 512
        "feature_encoder_spec": "[(8, 10, 5)] + [(8, 3, 2)] * 4 + [(8, 2, 2)] + [(8, 2, 2)]",
        "conv_pos_width": 6, "conv_pos_groups": 2, "conv_pos_depth": 2, "conv_pos_pre_ln": False,
    }
    model_conf = {
        "loss_beta": 0.0, "loss_scale": None, "depth": 1, "start_drop_path_rate": 0.0,
        "end_drop_path_rate": 0.0, "num_heads": TINY_HEADS, "norm_eps": 1e-5, "norm_affine": True,
        "encoder_dropout": 0.0, "post_mlp_drop": 0.0, "attention_dropout": 0.0,
        "activation_dropout": 0.0, "dropout_input": 0.0, "layerdrop": 0.0, "embed_dim": TINY_DIM,
        "mlp_ratio": 2.0, "layer_norm_first": False, "average_top_k_layers": 1,
        "end_of_block_targets": False, "clone_batch": 1, "layer_norm_target_layer": False,
        "batch_norm_target_layer": False, "instance_norm_target_layer": True,
        "instance_norm_targets": False, "layer_norm_targets": False, "ema_decay": 0.999,
        "ema_same_dtype": True, "log_norms": True, "ema_end_decay": 0.99999,
        "ema_anneal_end_step": 20000, "ema_encoder_only": False, "max_update": 100000,
        "extractor_mode": "layer_norm", "shared_decoder": None, "min_target_var": 0.1,
        "min_pred_var": 0.01, "supported_modality": "AUDIO", "mae_init": False, "seed": 1,
        "skip_ema": False, "cls_loss": 1.0, "recon_loss": 0.0, "d2v_loss": 1.0,
        "decoder_group": False, "adversarial_training": False, "adversarial_hidden_dim": 128,
        "adversarial_weight": 0.1, "cls_type": "chunk", "normalize": True, "project_dim": None,
        "modalities": {"audio": audio},
    }
    return {
        "model": "Emotion2vec",
        "model_conf": model_conf,
        "tokenizer": "CharTokenizer",
        "tokenizer_conf": {"unk_symbol": "<unk>", "split_with_space": True},
    }


def write_tiny(directory: Path, *, seed: int = 0) -> Path:
    """Build the real ``funasr`` Emotion2vec class at tiny sizes, random weights, and save it."""
    import torch

    from esn_emotion2vec.judge import contained

    with contained(torch.get_num_threads()):  # importing funasr configures logging: contain it
        from funasr.models.emotion2vec.model import Emotion2vec

    directory.mkdir(parents=True, exist_ok=True)
    config = tiny_config()
    torch.manual_seed(seed)
    model = Emotion2vec(model_conf=config["model_conf"], vocab_size=len(TOKENS))
    # spread the random head so that different inputs give visibly different scores
    with torch.no_grad():
        model.proj.weight.normal_(0.0, 1.0)
    torch.save({"model": model.state_dict()}, directory / "model.pt")
    (directory / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False))
    (directory / "tokens.txt").write_text("\n".join(TOKENS) + "\n", encoding="utf-8")
    return directory
