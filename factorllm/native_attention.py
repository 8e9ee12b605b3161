"""Decode attention on CPU as a small C kernel, built once with the system's C compiler.

One query per row against bf16 keys and values read in place from the engine's strided cache, in
fp32 arithmetic (scores, softmax, weighted sum), the (row, kv head) pairs shared out by OpenMP.
torch's batched matmuls (model.decode_attention) first copy each layer's cached rows into
contiguous blocks (oneDNN wants them so), then run matmuls three columns wide (the query heads of
one kv head). Timed alone on one layer's cache-warm rows the two came out within 20% of each
other (session 8, which did not keep a C++ kernel); in whole decode steps, where every layer's
rows come from memory, this kernel made steps 1.13-1.57x faster on the AVX512-BF16 EPYC at 1-64
rows (docs/results.md, session 27).

Built and loaded by factorllm/native.py; where it cannot be built, the kernel is not offered and
`Transformer.tune_decode_attention` chooses among torch's kernels.
"""
from __future__ import annotations

import ctypes
import functools

import torch

from . import native

MAX_HEAD_DIM, MAX_GROUP = 256, 16

SOURCE = r"""
/* One decode step. q, out: [B, H, D] contiguous bf16. k, v: bf16, element (row b, kv head h,
   position s, d) at b*sb + h*sh + s*ss + d. Row b attends to its first lens[b] positions (all S
   when lens is NULL). The (row, kv head) pairs are shared out among the OpenMP threads. */
void decode_attention_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out,
                           int B, int H, int KV, int S, int D, int64_t sb, int64_t sh, int64_t ss,
                           const int32_t *lens, float scale) {
    const int G = H / KV;
    #pragma omp parallel
    {
        float *scores = malloc(sizeof(float) * G * S);
        float qf[MAX_GROUP][MAX_HEAD_DIM], row[MAX_HEAD_DIM], acc[MAX_GROUP][MAX_HEAD_DIM], top[MAX_GROUP], norm[MAX_GROUP];
        #pragma omp for schedule(static)
        for (int bh = 0; bh < B * KV; bh++) {
            const int b = bh / KV, h = bh % KV, n = lens ? lens[b] : S;
            const uint16_t *kb = k + b * sb + h * sh, *vb = v + b * sb + h * sh;
            const uint16_t *qb = q + ((int64_t)b * H + h * G) * D;
            for (int g = 0; g < G; g++) {
                for (int d = 0; d < D; d++) qf[g][d] = bf16_to_f32(qb[g * D + d]) * scale;
                top[g] = -3.0e38f;
            }
            for (int s = 0; s < n; s++) {          /* scores of every query head of this kv head */
                const uint16_t *kr = kb + s * ss;
                for (int d = 0; d < D; d++) row[d] = bf16_to_f32(kr[d]);
                for (int g = 0; g < G; g++) {
                    float dot = 0.f;
                    for (int d = 0; d < D; d++) dot += qf[g][d] * row[d];
                    scores[g * S + s] = dot;
                    top[g] = dot > top[g] ? dot : top[g];
                }
            }
            for (int g = 0; g < G; g++) {          /* softmax numerators and their sum */
                float *sc = scores + g * S, sum = 0.f;
                for (int s = 0; s < n; s++) { sc[s] = expf(sc[s] - top[g]); sum += sc[s]; }
                norm[g] = 1.f / sum;
                for (int d = 0; d < D; d++) acc[g][d] = 0.f;
            }
            for (int s = 0; s < n; s++) {          /* weighted sum of the values */
                const uint16_t *vr = vb + s * ss;
                for (int d = 0; d < D; d++) row[d] = bf16_to_f32(vr[d]);
                for (int g = 0; g < G; g++) {
                    const float p = scores[g * S + s];
                    for (int d = 0; d < D; d++) acc[g][d] += p * row[d];
                }
            }
            uint16_t *ob = out + ((int64_t)b * H + h * G) * D;
            for (int g = 0; g < G; g++)
                for (int d = 0; d < D; d++) ob[g * D + d] = f32_to_bf16(acc[g][d] * norm[g]);
        }
        free(scores);
    }
}
"""

@functools.lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    """The compiled kernel library, or None where it cannot be built here (see factorllm/native.py)."""
    lib = native.library("decode_attention", SOURCE, (("MAX_HEAD_DIM", MAX_HEAD_DIM), ("MAX_GROUP", MAX_GROUP)))
    if lib is not None:
        fn = lib.decode_attention_bf16
        ptr, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
        fn.argtypes = [ptr, ptr, ptr, ptr, i32, i32, i32, i32, i32, i64, i64, i64, ptr, ctypes.c_float]
        fn.restype = None
    return lib


def usable(k: torch.Tensor, num_heads: int) -> bool:
    """Whether the kernel is built here and takes this cache: `k` one layer's keys [slots,
    kv_heads, positions, head_dim], bf16 on CPU, head_dim <= 256 contiguous, at most 16 query heads
    per kv head."""
    KV, D = k.shape[1], k.shape[3]
    return (k.dtype == torch.bfloat16 and not k.is_cuda and D <= MAX_HEAD_DIM and k.stride(-1) == 1
            and num_heads % KV == 0 and num_heads // KV <= MAX_GROUP and load() is not None)


def native_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            mask: torch.Tensor | None) -> torch.Tensor:
    """`model.decode_attention` by the C kernel: q [B, 1, heads, D], k/v [B, kv_heads, S, D]
    strided views of the cache (same strides), mask [B, 1, 1, S] bool, each row's visible keys a
    prefix (as decode rows' are), or None. Returns [B, 1, heads, D]."""
    fn = load().decode_attention_bf16
    B, _, H, D = q.shape
    KV, S = k.shape[1], k.shape[2]
    assert k.stride() == v.stride(), "keys and values must share their layout"
    q = q.contiguous()
    out = torch.empty_like(q)
    lens = None if mask is None else mask.view(B, S).sum(-1, dtype=torch.int32)
    sb, sh, ss, _ = k.stride()
    fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), B, H, KV, S, D, sb, sh, ss,
       None if lens is None else lens.data_ptr(), D ** -0.5)
    return out
