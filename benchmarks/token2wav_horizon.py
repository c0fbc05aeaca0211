"""How far ahead Qwen2.5-Omni's token2wav looks: the question streamed synthesis depends on.

    python benchmarks/token2wav_horizon.py                         # the tiny random Qwen2.5-Omni
    python benchmarks/token2wav_horizon.py --model /ckpt/Qwen2.5-Omni-7B --blocks 48 --json out.json

The DiT attends within blocks of ``block_size`` mel frames, some layers one block ahead or back, and its
ODE (RK4, ``num_steps`` time points, 4 chained evaluations a step) runs over the whole sequence, so in exact
arithmetic the mel of block 0 depends on the codes of blocks up to ``4 * (num_steps - 1) * ahead`` (36 for
the released config). In float32 the influence may die out sooner, and how soon is a property of the
weights. This runs the adapter's own sampler (``_dit_sample``: same noise, same ODE) on random codes, then
again with one code changed at the start of block ``k``, and reports the largest change of block 0's mel
(and of block ``k``'s, for scale): 0.0 means block 0 is bit-identical, so a streamed sampler with
``k`` blocks of look-ahead could reproduce it. Not a test; on random tiny weights it says nothing about
trained ones.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="Qwen2.5-Omni checkpoint (default: the tiny random one, written to a temp folder)")
    p.add_argument("--blocks", type=int, default=12, help="sequence length in DiT blocks (default 12)")
    p.add_argument("--perturb", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8, 11],
                   help="blocks whose first code is changed (default 1 2 3 4 6 8 11)")
    p.add_argument("--steps", type=int, default=10, help="ODE time points (the adapter's default 10)")
    p.add_argument("--speaker", default="Chelsie")
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    import torch
    from esn_qwen_omni import QwenOmniAdapter
    from esn_qwen_omni.adapter import _dit_sample

    with tempfile.TemporaryDirectory() as tmp:
        adapter = QwenOmniAdapter.load(args.model or QwenOmniAdapter.write_tiny(Path(tmp) / "tiny", seed=0))
    dit = adapter.model.token2wav.code2wav_dit_model
    params = adapter.model.speaker_map[args.speaker]
    cond, mel = params["cond"].float(), params["ref_mel"].float()
    block, repeats = dit.block_size, dit.repeats
    vocab = dit.text_embed.codec_embed.num_embeddings - 1  # the last id is not a speech code
    torch.manual_seed(1)
    code = torch.randint(0, vocab, (1, args.blocks * block // repeats))
    ahead = len(dit.config.look_ahead_layers)
    rows = []
    with torch.inference_mode():
        base = _dit_sample(dit, cond, mel, code, 0, num_steps=args.steps)  # [1, M, frames]
        for k in args.perturb:
            changed = code.clone()
            at = k * block // repeats
            changed[0, at] = (changed[0, at] + 1) % vocab
            diff = (_dit_sample(dit, cond, mel, changed, 0, num_steps=args.steps) - base).abs()[0]
            rows.append({"perturbed_block": k, "block0_max_abs_diff": diff[:, :block].max().item(),
                         "own_block_max_abs_diff": diff[:, k * block:(k + 1) * block].max().item()})
            print(json.dumps(rows[-1]), file=sys.stderr)
    report = {"benchmark": "token2wav_horizon", "model": str(args.model or "tiny random qwen_omni"),
              "block_size": block, "repeats": repeats, "look_ahead_layers": list(dit.config.look_ahead_layers),
              "look_backward_layers": list(dit.config.look_backward_layers), "num_steps": args.steps,
              "exact_arithmetic_horizon_blocks": 4 * (args.steps - 1) * ahead, "rows": rows}
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
