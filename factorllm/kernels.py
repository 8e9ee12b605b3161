"""The CPU matmuls the engine runs its weights through: prepacked oneDNN linears, and for bf16
where it builds the C kernel of factorllm/native_linear.py (`linear_kernel` picks).

`prepacked(weight)` reorders a weight once into oneDNN's blocked layout for its matmul kernel, so
that each call skips the packing a plain `F.linear` redoes. Measured at the default model's shapes:
  * bf16 on CPUs with native bf16 dot products: ~1.5x faster for the LM head and ~1.7x for the
    per-layer matmuls at one sequence than plain bf16 matmuls;
  * fp32 on an AVX2-only AMD EPYC, where MKL's GEMM is slow for decode-sized row counts: the LM
    head 49,152 x 576 at 4 / 16 / 64 rows 5.4 / 9.7 / 27 ms against MKL's 19 / 25 / 42 ms, a whole
    dense decode step 1.2x / 1.4x / 1.2x faster at 1 / 16 / 64 sequences (docs/results.md).
Routers stay plain: their small fp32 matmul is faster as an sgemv than through oneDNN's set-up.
oneDNN compiles a kernel per weight shape and row count: rows are padded to a few buckets
(`row_bucket`), all compiled before serving (`compile_row_buckets`). On a CPU with AVX512-BF16 the
C kernel beat oneDNN's prepacked bf16 matmul at every default-model shape and row count measured,
1.04-4.6x at 1-256 rows (docs/results.md, session 29).
"""
from __future__ import annotations

import logging
import weakref
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import native_linear
from .model import GatedMLP, KernelLinear
from .moe import MoEFFN

log = logging.getLogger(__name__)

PREPACKED_DTYPES = (torch.float32, torch.bfloat16)


def row_bucket(rows: int) -> int:
    """`rows` rounded up to the row counts prepacked kernels run at: every count up to 8, then four
    per power of two (at most 25% padding rows). oneDNN compiles and caches a kernel per weight
    shape and row count (~0.5-1.4 MB each, up to 1,024 of them): a server called them at every
    new prefill length, and its resident memory grew by ~600 MB over 300 row counts."""
    if rows <= 8:
        return rows
    step = 1 << (rows.bit_length() - 3)
    return -(-rows // step) * step


class PrepackedLinear:
    """x @ weight.T (+ bias) through oneDNN, the weight (fp32 or bf16, CPU) reordered once for its
    matmul kernel; the rows padded to `row_bucket`."""

    def __init__(self, weight: torch.Tensor, batch_hint: int, bias: torch.Tensor | None):
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_hint)
        self.bias = None if bias is None else bias.detach()
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        rows = x.shape[0]
        padded = row_bucket(rows)
        if padded != rows:
            x = F.pad(x, (0, 0, 0, padded - rows))
        y = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return y[:rows].view(*shape[:-1], y.shape[-1])


# One live kernel per shape: oneDNN's kernel cache is keyed by shapes, not weights.
_one_per_shape: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _checked(linear: Callable, weight: torch.Tensor, bias: torch.Tensor | None) -> Callable:
    x = torch.randn(3, weight.shape[1], dtype=weight.dtype)
    with torch.inference_mode():
        if not torch.allclose(linear(x).float(), F.linear(x, weight, bias).float(), atol=1e-2, rtol=1e-2):
            raise RuntimeError(f"{type(linear).__name__} disagrees with F.linear")
    return linear


def prepacked(weight: torch.Tensor, batch_hint: int, bias: torch.Tensor | None = None) -> PrepackedLinear:
    """A `PrepackedLinear` over `weight`, checked once against F.linear."""
    linear = _checked(PrepackedLinear(weight, batch_hint, bias), weight, bias)
    _one_per_shape.setdefault((tuple(weight.shape), weight.dtype, bias is not None, batch_hint), linear)
    return linear


def linear_kernel(weight: torch.Tensor, batch_hint: int, bias: torch.Tensor | None = None) -> Callable:
    """x @ weight.T (+ bias) by the C kernel where it runs this weight (bf16, AVX512-BF16), else
    `prepacked`; checked once against F.linear."""
    if native_linear.usable(weight):
        return _checked(native_linear.NativeLinear(weight, bias), weight, bias)
    return prepacked(weight, batch_hint, bias)


@torch.inference_mode()
def compile_row_buckets(max_rows: int, max_macs: int) -> None:
    """Run every prepacked weight shape in the process at every row bucket up to `max_rows` (and
    `max_macs` multiply-adds a call), so that oneDNN compiles its kernels now, in a server's warm-up,
    and not while serving: resident memory then stays flat under load and no request waits for a
    compilation. Larger calls (the LM head over a long prompt's logprobs) compile on first use,
    one kernel per bucket."""
    buckets = sorted({row_bucket(r) for r in range(1, max_rows + 1)})
    for linear in list(_one_per_shape.values()):
        rows = [b for b in buckets if b * linear.in_features * linear.out_features <= max_macs]
        if rows:
            x = torch.zeros(rows[-1], linear.in_features, dtype=linear.dtype)
            for n in rows:
                linear(x[:n])


def prepack_linears(root: nn.Module, batch_hint: int) -> bool:
    """Every fp32 or bf16 nn.Linear under `root` but the MoE routers and the FFNs that run in the C
    kernel (`native_moe.pack_dense_ffns`) becomes a `KernelLinear` over `linear_kernel`; MoE layers
    get the same kernels for their masked path and per-expert kernels (`MoEFFN.pack`). Returns
    False, with plain linears left, on builds without these oneDNN ops."""
    try:
        for parent in list(root.modules()):
            for name, child in list(parent.named_children()):
                if (type(child) is nn.Linear and child.weight.dtype in PREPACKED_DTYPES
                        and name not in getattr(parent, "fused_away", ()) and not isinstance(parent, MoEFFN)
                        and not (isinstance(parent, GatedMLP) and parent.native is not None)):
                    setattr(parent, name, KernelLinear(child, linear_kernel(child.weight, batch_hint, child.bias)))
            if isinstance(parent, MoEFFN):
                parent.pack(lambda w: linear_kernel(w, batch_hint))
        return True
    except Exception as e:  # builds without oneDNN or with another op signature: plain linears
        log.info("no prepacked linears (%s)", e)
        for parent in list(root.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, KernelLinear):
                    setattr(parent, name, child.plain)
            if isinstance(parent, MoEFFN):
                parent.pack(None)
        return False
