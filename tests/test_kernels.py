"""Prepacked oneDNN linears (factorllm/kernels.py): exact at any row count, and a bounded set of
compiled kernels, so that a server's memory stays flat whatever lengths its requests have."""
from __future__ import annotations

import ctypes
import random

import pytest
import torch
import torch.nn.functional as F

from factorllm.kernels import compile_row_buckets, prepacked, row_bucket


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _allocated_mib() -> float:
    """Bytes malloc has handed out and not taken back (glibc): unlike resident memory, not hidden
    by reuse of what earlier tests freed."""
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return (info.uordblks + info.hblkhd) / 2**20


def _kernel(weight: torch.Tensor):
    try:
        return prepacked(weight, 16)
    except Exception as e:  # builds without the oneDNN ops run plain linears instead
        pytest.skip(f"no prepacked linears in this build: {e}")


def test_row_buckets_pad_at_most_a_quarter():
    buckets = {row_bucket(r) for r in range(1, 4097)}
    for r in range(1, 4097):
        b = row_bucket(r)
        assert r <= b <= max(8, 1.25 * r) and row_bucket(b) == b
    assert len(buckets) <= 45


def test_prepacked_equals_f_linear_at_any_row_count(default_model):
    mlp = default_model.model.layers[0].mlp
    weight = mlp.down_proj.weight.detach()
    kernel = _kernel(weight)
    x = torch.randn(2, 70, weight.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for rows in (1, 7, 9, 17, 33, 70):  # on and off the buckets
            torch.testing.assert_close(kernel(x[0, :rows]), F.linear(x[0, :rows], weight), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(kernel(x), F.linear(x, weight), atol=1e-4, rtol=1e-4)


def test_compiled_buckets_keep_memory_flat(default_model):
    """Without buckets oneDNN compiled and kept a kernel per new row count: ~0.5-1.4 MB each, a
    server's memory grew with every new prefill length."""
    weight = default_model.model.layers[1].mlp.gate_proj.weight.detach()
    kernel = _kernel(weight)
    max_rows = 512
    compile_row_buckets(max_rows, max_rows * weight.numel())
    x = torch.randn(max_rows, weight.shape[1])
    counts = list(range(1, max_rows + 1))
    random.Random(0).shuffle(counts)
    with torch.inference_mode():
        kernel(x[:1])
        before = _allocated_mib()
        for rows in counts[:300]:
            kernel(x[:rows])
        grown = _allocated_mib() - before
    assert grown < 10, f"allocated memory grew by {grown:.0f} MiB over 300 row counts"
