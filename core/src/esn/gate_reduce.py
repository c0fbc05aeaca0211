"""The recorder's reduction of gates over positions: counts of ``g > 0``, float64 sums and sums of squares.

``reduce_gates(g, valid, dim, counts, sums, sumsq)`` adds, for every row ``b`` and neuron ``n``, the
statistics of ``g`` over the positions of ``dim`` that ``valid`` marks real:

* ``g``: ``[B, P, D]`` reduced over ``dim=1`` (a prefill), or ``[S, B, D]`` over ``dim=0`` (a decode chunk);
  the last dim contiguous;
* ``valid``: ``[B, P]`` / ``[S, B]`` bool, or None (every position real);
* ``counts`` ``[B, D]`` int32, ``sums``/``sumsq`` ``[B, D]`` float64 (or None), updated in place.

The order of the float64 additions is fixed and the same on every device: per row and neuron, the real
positions' values (padding counts as 0.0) are added one after another to a partial sum starting at 0.0,
and the partial is added to the running total once. Every value is exact in float64 and so is its square
(gates of at most 26 significant bits: bf16, fp16, fp32), so two devices that see the same gates produce
the same bits.

On CUDA a Triton kernel does it in one pass over the gate in its own dtype (2 bytes per value for bf16).
The same in torch ops converts to float64 first and reads and writes that copy several times (~50 bytes
per value): on an H200 that was most of what recording cost. Elsewhere (CPU, no Triton, float64 gates)
torch ops compute the same sums in the same order (``cumsum`` runs sequentially on CPU).
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings

import torch

# torch fallback: positions are converted to float64 in slices of at most this many bytes.
_SLICE_BYTES = 256 * 2**20
_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_use_kernel = True  # see torch_ops_only()
_kernel_ran = False  # a first launch that fails (Triton cannot build for this GPU) falls back, once


def reduce_gates(
    g: torch.Tensor,
    valid: torch.Tensor | None,
    dim: int,
    counts: torch.Tensor,
    sums: torch.Tensor | None,
    sumsq: torch.Tensor | None,
) -> None:
    """Add the statistics of ``g`` over ``dim`` (0 or 1) into ``counts``, ``sums``, ``sumsq`` (see module)."""
    global _kernel_ran, _use_kernel
    if g.is_cuda and g.dtype in _KERNEL_DTYPES and g.stride(2) == 1 and kernel_available():
        if _kernel_ran:
            return _reduce_kernel(g, valid, dim, counts, sums, sumsq)
        try:  # the first launch compiles it
            _reduce_kernel(g, valid, dim, counts, sums, sumsq)
            _kernel_ran = True
            return None
        except Exception as exc:  # nothing was added: the kernel writes only at its end
            _use_kernel = False
            warnings.warn(f"esn.gate_reduce: the Triton kernel failed ({type(exc).__name__}: {exc}); "
                          "recording reduces with torch ops instead (same statistics, slower)", stacklevel=2)
    _reduce_torch(g, valid, dim, counts, sums, sumsq)


def _reduce_torch(g, valid, dim, counts, sums, sumsq) -> None:
    if valid is not None:  # padding becomes 0 in g's own dtype (exact): not > 0, adds 0.0
        g = torch.where(valid.unsqueeze(-1), g, 0)
    counts.add_((g > 0).sum(dim, dtype=torch.int32))
    if sums is None:
        return
    n = g.shape[dim]
    step = max(1, _SLICE_BYTES // max(1, g.numel() // max(n, 1) * 8))
    part = part_sq = None
    for start in range(0, n, step):
        x = g.narrow(dim, start, min(step, n - start)).double()
        x2 = x.square()  # exact: at most 2 x 26 significant bits
        if part is not None:  # carry the partial sums: one sequential sum over all positions
            x.select(dim, 0).add_(part)
            x2.select(dim, 0).add_(part_sq)
        part = x.cumsum(dim).select(dim, -1)
        part_sq = x2.cumsum(dim).select(dim, -1)
    if part is not None:
        sums.add_(part)
        sumsq.add_(part_sq)


def _reduce_kernel(g, valid, dim, counts, sums, sumsq) -> None:
    kernel = _kernel()
    rows = 1 - dim
    b, r, d = g.shape[rows], g.shape[dim], g.shape[2]
    block = 256
    v = valid.view(torch.uint8) if valid is not None else counts  # any pointer when HAS_VALID is off
    v_b, v_r = (valid.stride(rows), valid.stride(dim)) if valid is not None else (0, 0)
    moments = sums is not None
    kernel[(b, -(-d // block))](
        g, v, counts, sums if moments else counts, sumsq if moments else counts,
        r, d, g.stride(rows), g.stride(dim), v_b, v_r, counts.stride(0),
        HAS_VALID=valid is not None, MOMENTS=moments, BLOCK_D=block, UNROLL=8, num_warps=4,
    )


@functools.cache
def _kernel():
    """The Triton kernel (``esn._gate_kernel``), or None without Triton (or with ESN_GATE_KERNEL=0)."""
    if os.environ.get("ESN_GATE_KERNEL", "1") == "0":
        return None
    try:
        from esn._gate_kernel import gate_stats
    except ImportError:
        return None
    return gate_stats


def kernel_available() -> bool:
    """Whether CUDA gates are reduced by the Triton kernel (Triton importable, not disabled)."""
    return _use_kernel and _kernel() is not None


@contextlib.contextmanager
def torch_ops_only():
    """Inside this block CUDA gates are reduced with torch ops, as without Triton (for comparisons)."""
    global _use_kernel
    before, _use_kernel = _use_kernel, False
    try:
        yield
    finally:
        _use_kernel = before
