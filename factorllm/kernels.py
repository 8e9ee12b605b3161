"""Prepacked oneDNN linears: the CPU matmul the engine runs its weights through.

`prepacked(weight)` reorders a weight once into oneDNN's blocked layout for its matmul kernel, so
that each call skips the packing a plain `F.linear` redoes. Measured at the default model's shapes:
  * bf16 on CPUs with native bf16 dot products: ~1.5x faster for the LM head and ~1.7x for the
    per-layer matmuls at one sequence than plain bf16 matmuls;
  * fp32 on an AVX2-only AMD EPYC, where MKL's GEMM is slow for decode-sized row counts: the LM
    head 49,152 x 576 at 4 / 16 / 64 rows 5.4 / 9.7 / 27 ms against MKL's 19 / 25 / 42 ms, a whole
    dense decode step 1.2x / 1.4x / 1.2x faster at 1 / 16 / 64 sequences (docs/results.md).
Routers stay plain: their small fp32 matmul is faster as an sgemv than through oneDNN's set-up.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .model import KernelLinear
from .moe import MoEFFN

log = logging.getLogger(__name__)

PREPACKED_DTYPES = (torch.float32, torch.bfloat16)


def prepacked(weight: torch.Tensor, batch_hint: int, bias: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """x @ weight.T (+ bias) through oneDNN, the weight (fp32 or bf16, CPU) reordered once for its
    matmul kernel; checked once against F.linear."""
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_hint)
    bias = None if bias is None else bias.detach()

    def linear(x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]), packed, bias, "none", [], "")
        return y.view(*shape[:-1], y.shape[-1])
    x = torch.randn(3, weight.shape[1], dtype=weight.dtype)
    with torch.inference_mode():
        if not torch.allclose(linear(x).float(), F.linear(x, weight, bias).float(), atol=1e-2, rtol=1e-2):
            raise RuntimeError("prepacked linear disagrees with F.linear")
    return linear


def prepack_linears(root: nn.Module, batch_hint: int) -> bool:
    """Every fp32 or bf16 nn.Linear under `root` but the MoE routers becomes a `KernelLinear` over
    `prepacked`; MoE layers get the same kernels for their masked path and per-expert kernels
    (`MoEFFN.pack`). Returns False, with plain linears left, on builds without these oneDNN ops."""
    try:
        for parent in list(root.modules()):
            for name, child in list(parent.named_children()):
                if (type(child) is nn.Linear and child.weight.dtype in PREPACKED_DTYPES
                        and name not in getattr(parent, "fused_away", ()) and not isinstance(parent, MoEFFN)):
                    setattr(parent, name, KernelLinear(child, prepacked(child.weight, batch_hint, child.bias)))
            if isinstance(parent, MoEFFN):
                parent.pack(lambda w: prepacked(w, batch_hint))
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
