"""A bf16 linear layer on CPU as one C call: AVX512-BF16 dot products over a prepacked weight.

The same register tiles as the MoE kernel (factorllm/native_moe.py): `vdpbf16ps` on 4 rows x 64
output columns at a time, fp32 accumulation (bias included), bf16 out, over the weight repacked
once into the instruction's pair-interleaved layout. One OpenMP loop over (64 output columns, 16
rows) items, so that each thread reads its columns' weights once per 16 rows.

Built by factorllm/native.py for CPUs with AVX512-BF16; elsewhere `usable` is False and the engine
keeps oneDNN's prepacked matmuls (factorllm/kernels.py).
"""
from __future__ import annotations

import ctypes
import functools

import torch

from . import native

SOURCE = r"""
/* TB rows x NC blocks of 16 output columns: dot products over I2 pairs of inputs. */
static inline __attribute__((always_inline)) void tile(
        const int TB, const int NC, const uint32_t *x32, int I2, const uint16_t *w, int64_t block_stride,
        const float *bias, uint16_t *y, int O) {
    __m512 acc[4][4];
    for (int c = 0; c < NC; c++) {
        const __m512 b = bias ? _mm512_loadu_ps(bias + 16 * c) : _mm512_setzero_ps();
        for (int t = 0; t < TB; t++) acc[t][c] = b;
    }
    for (int p = 0; p < I2; p++) {
        __m512i xb[4];
        for (int t = 0; t < TB; t++) xb[t] = _mm512_set1_epi32((int)x32[(int64_t)t * I2 + p]);
        for (int c = 0; c < NC; c++) {
            const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + c * block_stride + (int64_t)p * 32);
            for (int t = 0; t < TB; t++) acc[t][c] = _mm512_dpbf16_ps(acc[t][c], (__m512bh)xb[t], wv);
        }
    }
    for (int t = 0; t < TB; t++)
        for (int c = 0; c < NC; c++)
            _mm256_storeu_si256((__m256i *)(y + (int64_t)t * O + 16 * c), (__m256i)_mm512_cvtneps_pbh(acc[t][c]));
}

#define CASES(TB, NC) \
    switch (TB * 8 + NC) { \
        case 9: tile(1, 1, ARGS); break;  case 10: tile(1, 2, ARGS); break; \
        case 11: tile(1, 3, ARGS); break; case 12: tile(1, 4, ARGS); break; \
        case 17: tile(2, 1, ARGS); break; case 18: tile(2, 2, ARGS); break; \
        case 19: tile(2, 3, ARGS); break; case 20: tile(2, 4, ARGS); break; \
        case 25: tile(3, 1, ARGS); break; case 26: tile(3, 2, ARGS); break; \
        case 27: tile(3, 3, ARGS); break; case 28: tile(3, 4, ARGS); break; \
        case 33: tile(4, 1, ARGS); break; case 34: tile(4, 2, ARGS); break; \
        case 35: tile(4, 3, ARGS); break; default: tile(4, 4, ARGS); break; \
    }
#define ARGS x32 + (int64_t)r * I2, I2, wc, block_stride, bc, y + (int64_t)r * O + 64 * chunk, O

/* y [T, O] = x [T, I] @ W^T + bias. x, y bf16; w: [O/16, I/2, 16, 2] bf16 (per block of 16
   output columns, per pair of inputs, 16 columns of two values); bias: [O] fp32 or NULL. */
void linear_bf16(const uint16_t *x, const uint16_t *w, const float *bias, uint16_t *y, int T, int I, int O) {
    const int I2 = I / 2, OB = O / 16, chunks = (OB + 3) / 4, row_groups = (T + 15) / 16;
    const int64_t block_stride = (int64_t)I2 * 32;
    const uint32_t *x32 = (const uint32_t *)x;
    #pragma omp parallel for schedule(static)
    for (int item = 0; item < chunks * row_groups; item++) {
        const int chunk = item / row_groups, group = item % row_groups;
        const int NC = OB - 4 * chunk < 4 ? OB - 4 * chunk : 4;
        const uint16_t *wc = w + (int64_t)4 * chunk * block_stride;
        const float *bc = bias ? bias + 64 * chunk : 0;
        const int end = 16 * group + 16 < T ? 16 * group + 16 : T;
        for (int r = 16 * group; r < end; r += 4) {
            const int TB = end - r < 4 ? end - r : 4;
            CASES(TB, NC)
        }
    }
}
"""


@functools.lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    """The compiled library where this CPU has AVX512-BF16, else None."""
    ptr, i32 = ctypes.c_void_p, ctypes.c_int
    return native.bf16_library("linear", SOURCE, "linear_bf16", [ptr] * 4 + [i32] * 3)


def usable(weight: torch.Tensor) -> bool:
    """Whether the kernel runs a linear with this weight [out, in] here: bf16 on CPU, whole blocks
    of 16 outputs, an even number of inputs."""
    out_features, in_features = weight.shape
    return (weight.dtype == torch.bfloat16 and not weight.is_cuda and out_features % 16 == 0
            and in_features % 2 == 0 and load() is not None)


class NativeLinear:
    """x @ weight.T (+ bias) through the kernel, on its own repacked copy of `weight` [out, in]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        O, I = weight.shape
        self.in_features, self.out_features = I, O
        self.weight = weight.detach().reshape(O // 16, 16, I // 2, 2).permute(0, 2, 1, 3).contiguous()
        self.bias = None if bias is None else bias.detach().float().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).contiguous()
        y = torch.empty(rows.shape[0], self.out_features, dtype=torch.bfloat16)
        load().linear_bf16(rows.data_ptr(), self.weight.data_ptr(), 0 if self.bias is None else self.bias.data_ptr(),
                           y.data_ptr(), rows.shape[0], self.in_features, self.out_features)
        return y.view(*x.shape[:-1], self.out_features)
