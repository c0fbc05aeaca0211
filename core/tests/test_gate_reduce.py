"""esn.gate_reduce: the recorder's sums run in one fixed order (a sequential sum per row and neuron)."""

from __future__ import annotations

import pytest
import torch
from esn import gate_reduce
from esn.gate_reduce import reduce_gates


def _by_hand(g, valid, dim):
    """Position after position, in float64, padding as 0.0: the order gate_reduce promises."""
    g = g.movedim(dim, 1)  # [rows, positions, D]
    valid = None if valid is None else valid.movedim(dim, 1)
    rows, n, d = g.shape
    part = torch.zeros(rows, d, dtype=torch.float64)
    part_sq = torch.zeros(rows, d, dtype=torch.float64)
    counts = torch.zeros(rows, d, dtype=torch.int32)
    for p in range(n):
        x = g[:, p].double()
        if valid is not None:
            x = torch.where(valid[:, p, None], x, 0.0)
        counts += (x > 0).int()
        part = part + x
        part_sq = part_sq + x * x
    return counts, part, part_sq


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("padded", [False, True])
def test_sums_are_sequential_per_row_and_neuron_bit_for_bit(dtype, dim, padded, monkeypatch):
    gen = torch.Generator().manual_seed(1)
    g = torch.nn.functional.silu(torch.randn(3, 37, 5, generator=gen) * 4).to(dtype)  # [B, P, D]
    valid = torch.rand(3, 37, generator=gen) > 0.3 if padded else None
    if dim == 0:
        g, valid = g.transpose(0, 1), None if valid is None else valid.T  # a chunk [S, B, D], strided
    counts, part, part_sq = _by_hand(g, valid, dim)
    start = torch.randn(3, 5, generator=gen, dtype=torch.float64)  # a running total from earlier calls
    for slice_bytes in (2**30, 5 * 8 * 3 * 4):  # one slice, and slices of 4 positions carrying the partial sums
        monkeypatch.setattr(gate_reduce, "_SLICE_BYTES", slice_bytes)
        c = torch.full((3, 5), 7, dtype=torch.int32)
        s, q = start.clone(), start.clone()
        reduce_gates(g, valid, dim, c, s, q)
        assert torch.equal(c, counts + 7)
        assert torch.equal(s, start + part) and torch.equal(q, start + part_sq)
    c = torch.zeros(3, 5, dtype=torch.int32)
    reduce_gates(g, valid, dim, c, None, None)  # counts only
    assert torch.equal(c, counts)


def test_torch_ops_only_switches_the_kernel_off_and_back():
    before = gate_reduce.kernel_available()
    with gate_reduce.torch_ops_only():
        assert not gate_reduce.kernel_available()
    assert gate_reduce.kernel_available() == before
