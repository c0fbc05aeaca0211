"""The Triton kernel of ``esn.gate_reduce`` (imported only where Triton is installed: CUDA builds of torch)."""

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["R"])
def gate_stats(g_ptr, v_ptr, c_ptr, s_ptr, q_ptr, R, D, g_sb, g_sr, v_sb, v_sr, o_sb,
               HAS_VALID: tl.constexpr, MOMENTS: tl.constexpr, BLOCK_D: tl.constexpr, UNROLL: tl.constexpr):
    """One program: row ``b``, ``BLOCK_D`` neurons; positions ``r = 0..R-1`` added in order, their loads
    unrolled ``UNROLL`` at a time so that several are in flight. ``g[b, r, n]`` is at
    ``g_ptr + b * g_sb + r * g_sr + n``; ``valid[b, r]`` (uint8) at ``v_ptr + b * v_sb + r * v_sr``."""
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    inside = offs < D
    row = g_ptr + b * g_sb + offs
    cnt = tl.zeros([BLOCK_D], dtype=tl.int32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float64)
    acc2 = tl.zeros([BLOCK_D], dtype=tl.float64)
    for r0 in range(0, R, UNROLL):
        for i in tl.static_range(UNROLL):
            r = tl.cast(r0 + i, tl.int64)
            live = r < R
            x = tl.load(row + r * g_sr, mask=inside & live, other=0.0).to(tl.float64)
            if HAS_VALID:
                keep = tl.load(v_ptr + b * v_sb + r * v_sr, mask=live, other=0)
                x = tl.where(keep != 0, x, 0.0)
            cnt += (x > 0).to(tl.int32)
            if MOMENTS:
                acc += x  # positions past R add 0.0: no change
                acc2 += x * x  # exact square (<= 26 significant bits): a fused multiply-add rounds the same
    out = b * o_sb + offs
    tl.store(c_ptr + out, tl.load(c_ptr + out, mask=inside) + cnt, mask=inside)
    if MOMENTS:
        tl.store(s_ptr + out, tl.load(s_ptr + out, mask=inside) + acc, mask=inside)
        tl.store(q_ptr + out, tl.load(q_ptr + out, mask=inside) + acc2, mask=inside)
