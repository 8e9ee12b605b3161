"""RMSNorm of bf16 rows on CPU as one C call, optionally after the residual add.

In torch a bf16 RMSNorm in fp32 (as HF computes it) is seven or eight ops: casts of the input and
the weight, the squares, their mean, rsqrt, two products and the cast back; at decode sizes each
costs its ~3-5 us call, 61 norms a step of the default model, and the residual add before each
is one more. The kernel does the same arithmetic (the bf16 sum, fp32 sum of squares, scale,
weight, round to bf16) per row, rows over torch's OpenMP team. Built by factorllm/native.py;
where it cannot be built, `RMSNorm` keeps torch's ops.
"""
from __future__ import annotations

import ctypes
import functools

import torch

from . import native

SOURCE = r"""
/* out [T, H] = x / sqrt(mean(x^2) + eps) * weight, per row, in fp32; x, out bf16, weight fp32. With
   residual (else NULL), x is first x + residual rounded to bf16 (as torch adds bf16 tensors),
   which is also written to sum. */
void rms_norm_bf16(const uint16_t *x, const uint16_t *residual, const float *weight, uint16_t *out,
                   uint16_t *sum, int T, int H, float eps) {
    #pragma omp parallel for schedule(static) if (T > 8)
    for (int t = 0; t < T; t++) {
        const uint16_t *xr = x + (int64_t)t * H;
        if (residual) {
            uint16_t *sr = sum + (int64_t)t * H;
            const uint16_t *rr = residual + (int64_t)t * H;
            for (int h = 0; h < H; h++) sr[h] = f32_to_bf16(bf16_to_f32(xr[h]) + bf16_to_f32(rr[h]));
            xr = sr;
        }
        float squares = 0.f;
        for (int h = 0; h < H; h++) { const float v = bf16_to_f32(xr[h]); squares += v * v; }
        const float scale = 1.f / sqrtf(squares / H + eps);
        for (int h = 0; h < H; h++) out[(int64_t)t * H + h] = f32_to_bf16(bf16_to_f32(xr[h]) * scale * weight[h]);
    }
}
"""


@functools.lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    lib = native.library("rms_norm", SOURCE)
    if lib is not None:
        lib.rms_norm_bf16.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 2 + [ctypes.c_float]
        lib.rms_norm_bf16.restype = None
    return lib


def usable(x: torch.Tensor) -> bool:
    return x.dtype == torch.bfloat16 and not x.is_cuda and not torch.is_grad_enabled() and load() is not None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm of bf16 x [..., H] with an fp32 weight [H] (see `usable`); with `residual` (like x),
    of x + residual, returned too: (norm, sum)."""
    rows = x.contiguous()
    out = torch.empty_like(rows)
    total = None if residual is None else torch.empty_like(rows)
    load().rms_norm_bf16(rows.data_ptr(), None if residual is None else residual.contiguous().data_ptr(),
                         weight.data_ptr(), out.data_ptr(), None if total is None else total.data_ptr(),
                         rows.numel() // x.shape[-1], x.shape[-1], eps)
    return out if residual is None else (out, total)
