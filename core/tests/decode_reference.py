"""What the decode tests share: generate's greedy loop written out over a static step (the reference in
which every hook runs its eager path), and the tiny Qwen3-MoE with transformers' fused experts."""

from __future__ import annotations

import torch
from esn.decode import DecodeState, Greedy


def greedy_by_hand(scope: torch.nn.Module, step, logits: torch.Tensor, greedy: Greedy, stop) -> torch.Tensor:
    """Tokens ``[B, n]`` of greedy decoding after a prefill whose last logits are ``logits`` ``[B, V]``,
    calling ``step(state)`` once per step in plain Python; finished rows are fed ``greedy.pad_token_id``."""
    state = DecodeState(scope, logits.shape[0], logits.shape[-1], greedy, logits.device)
    stop = torch.tensor(tuple(stop), dtype=torch.long)
    nxt = logits.argmax(-1)
    finished = torch.isin(nxt, stop)
    out = [nxt]
    with torch.inference_mode():
        for k in range(greedy.max_new_tokens - 1):
            if bool(finished.all()):
                break
            state.ids.copy_(nxt[:, None])
            state.step.fill_(k)
            nxt = torch.where(finished, greedy.pad_token_id, step(state).argmax(-1))
            finished |= torch.isin(nxt, stop)
            out.append(nxt)
    return torch.stack(out, 1)


def tiny_moe(experts: int, top_k: int, units: int):
    """A tiny ``Qwen3MoeForCausalLM`` (seed 0): 3 layers, layer 1 dense, the others ``experts`` x ``units``."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        num_hidden_layers=3, hidden_size=32, intermediate_size=40, moe_intermediate_size=units, num_experts=experts,
        num_experts_per_tok=top_k, mlp_only_layers=[1], num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        vocab_size=256, max_position_embeddings=128, tie_word_embeddings=False, norm_topk_prob=True,
    )
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(config).eval()
