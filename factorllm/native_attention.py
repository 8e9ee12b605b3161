"""Decode attention on CPU as one small C call per layer, built once with the system's C compiler.

For the B rows of a decode step (one new token each) the kernel rotates the new query and key heads
(rotary embedding), stores the new keys and values in the engine's cache, and attends each row's
query heads over its cached positions: bf16 keys and values read in place from the strided cache,
scores, softmax and weighted sum in fp32, the (row, kv head) pairs shared out by OpenMP. Scores
use AVX512-BF16 pair dot products where the CPU has them (exact products, fp32 sums), plain C
otherwise. In torch the same work is ~12 calls per layer (the rotation's casts and products, two
indexed cache writes, slicing, the mask's lengths) before the attention itself; torch's batched
matmuls (model.decode_attention) also first copy each layer's cached rows into contiguous blocks.
docs/results.md (sessions 27 and 30) has the measurements.

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
#ifdef __AVX512BF16__
#include <immintrin.h>
#endif
/* Compiled per model shape: HEAD_DIM (D) and GROUP (G, query heads per kv head) are constants, so
   that every loop below has a fixed length the compiler unrolls and keeps in registers. */
enum { D = HEAD_DIM, G = GROUP };

/* Rotate one head x [D] by the half-split rotary embedding (as model.apply_rope: x * cos +
   [x2, x1] * sin, sin signed) and round to bf16; a plain copy when cos is NULL. */
static void rotate(const uint16_t *x, const float *cos, const float *sin, uint16_t *out) {
    if (!cos) { memcpy(out, x, sizeof(uint16_t) * D); return; }
    for (int j = 0; j < D; j++)
        out[j] = f32_to_bf16(bf16_to_f32(x[j]) * cos[j] + bf16_to_f32(x[(j + D / 2) % D]) * sin[j]);
}

/* scores[g][s] = scale * q_g . k_s for the G query heads q [G, D] and positions s < n, k rows ss apart. */
static void head_scores(const uint16_t *q, const uint16_t *k, int64_t ss, int n, float scale, float *scores, int span) {
#if defined(__AVX512BF16__) && HEAD_DIM % 32 == 0
    __m512bh qv[G][D / 32];  /* bf16 pair dot products: exact products, fp32 sums */
    for (int g = 0; g < G; g++)
        for (int c = 0; c < D / 32; c++) qv[g][c] = (__m512bh)_mm512_loadu_si512(q + g * D + 32 * c);
    for (int s = 0; s < n; s++) {
        __m512bh kv[D / 32];
        for (int c = 0; c < D / 32; c++) kv[c] = (__m512bh)_mm512_loadu_si512(k + s * ss + 32 * c);
        for (int g = 0; g < G; g++) {
            __m512 acc = _mm512_setzero_ps();
            for (int c = 0; c < D / 32; c++) acc = _mm512_dpbf16_ps(acc, kv[c], qv[g][c]);
            scores[g * span + s] = _mm512_reduce_add_ps(acc) * scale;
        }
    }
#else
    float qf[G][D], row[D];
    for (int g = 0; g < G; g++)
        for (int d = 0; d < D; d++) qf[g][d] = bf16_to_f32(q[g * D + d]);
    for (int s = 0; s < n; s++) {
        for (int d = 0; d < D; d++) row[d] = bf16_to_f32(k[s * ss + d]);
        for (int g = 0; g < G; g++) {
            float dot = 0.f;
            for (int d = 0; d < D; d++) dot += qf[g][d] * row[d];
            scores[g * span + s] = dot * scale;
        }
    }
#endif
}

/* One decode step of attention, one new token per row b: rotate the row's new query and key heads
   (cos, sin: [B, D] fp32, rope_tables' layout; NULL when they come rotated), store its key and value
   in the cache at (slots[b], pos[b]), and attend over positions 0..pos[b]. q: [B, KV*G*D], k_new
   and v_new: [B, KV*D], bf16, rows qs / ks / vs apart. kc, vc: one layer's cache, element (slot,
   kv head, position, d) at slot*sb + h*sh + position*ss + d. out: [B, KV*G*D] bf16. Scores,
   softmax and the weighted sum in fp32; the (row, kv head) pairs are shared out among the OpenMP
   threads, each pair writing and reading only its own cache block. */
void decode_attention_bf16(const uint16_t *q, int64_t qs, const uint16_t *k_new, int64_t ks,
                           const uint16_t *v_new, int64_t vs, const float *cos, const float *sin,
                           uint16_t *kc, uint16_t *vc, int64_t sb, int64_t sh, int64_t ss,
                           const int32_t *slots, const int32_t *pos, uint16_t *out, int B, int KV, float scale) {
    int span = 1;
    for (int b = 0; b < B; b++) span = pos[b] + 1 > span ? pos[b] + 1 : span;
    #pragma omp parallel
    {
        float *scores = malloc(sizeof(float) * G * span);
        #pragma omp for schedule(static)
        for (int bh = 0; bh < B * KV; bh++) {
            const int b = bh / KV, h = bh % KV, n = pos[b] + 1;
            const float *cb = cos ? cos + (int64_t)b * D : NULL, *sn = sin ? sin + (int64_t)b * D : NULL;
            uint16_t *kb = kc + slots[b] * sb + h * sh, *vb = vc + slots[b] * sb + h * sh, qr[G * D];
            rotate(k_new + b * ks + h * D, cb, sn, kb + pos[b] * ss);
            memcpy(vb + pos[b] * ss, v_new + b * vs + h * D, sizeof(uint16_t) * D);
            for (int g = 0; g < G; g++) rotate(q + b * qs + (h * G + g) * D, cb, sn, qr + g * D);
            head_scores(qr, kb, ss, n, scale, scores, span);
            float acc[G][D], norm[G];
            for (int g = 0; g < G; g++) {          /* softmax, normalized at the end */
                float *sc = scores + g * span, top = sc[0], sum = 0.f;
                for (int s = 1; s < n; s++) top = sc[s] > top ? sc[s] : top;
                for (int s = 0; s < n; s++) { sc[s] = expf(sc[s] - top); sum += sc[s]; }
                norm[g] = 1.f / sum;
                for (int d = 0; d < D; d++) acc[g][d] = 0.f;
            }
            for (int s = 0; s < n; s++) {          /* weighted sum of the values */
                float row[D];
                for (int d = 0; d < D; d++) row[d] = bf16_to_f32(vb[s * ss + d]);
                for (int g = 0; g < G; g++)
                    for (int d = 0; d < D; d++) acc[g][d] += scores[g * span + s] * row[d];
            }
            uint16_t *ob = out + ((int64_t)b * KV + h) * G * D;
            for (int g = 0; g < G; g++)
                for (int d = 0; d < D; d++) ob[g * D + d] = f32_to_bf16(acc[g][d] * norm[g]);
        }
        free(scores);
    }
}
"""


@functools.lru_cache(maxsize=None)
def load(head_dim: int, group: int) -> ctypes.CDLL | None:
    """The kernel library for heads of `head_dim` and `group` query heads per kv head, or None
    where it cannot be built here (see factorllm/native.py)."""
    lib = native.library("decode_attention", SOURCE, (("HEAD_DIM", head_dim), ("GROUP", group)))
    if lib is not None:
        ptr, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
        lib.decode_attention_bf16.argtypes = [ptr, i64] * 3 + [ptr, ptr] * 2 + [i64] * 3 + [ptr] * 3 + [i32] * 2 + [ctypes.c_float]
        lib.decode_attention_bf16.restype = None
    return lib


def usable(k: torch.Tensor, num_heads: int) -> bool:
    """Whether the kernel is built here and takes this cache: `k` one layer's keys [slots,
    kv_heads, positions, head_dim], bf16 on CPU, head_dim <= 256 contiguous, at most 16 query heads
    per kv head."""
    KV, D = k.shape[1], k.shape[3]
    return (k.dtype == torch.bfloat16 and not k.is_cuda and D <= MAX_HEAD_DIM and k.stride(-1) == 1
            and num_heads % KV == 0 and num_heads // KV <= MAX_GROUP and load(D, num_heads // KV) is not None)


def decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
           cache, layer: int, batch) -> torch.Tensor:
    """Attention of a decode step by the kernel (see `usable`): q [B, heads * D], k and v [B,
    kv_heads * D] (rows may be strided views, as slices of the fused projection are), `rope` the
    step's (cos, sin) from `model.rope_tables` to rotate q and k with, or None when they come
    rotated. Stores k and v in `cache` (a KVCache) at `layer`, each row at its slot and position of
    `batch` (a CacheBatch of one token per row). Returns [B, heads * D]."""
    B, HD = q.shape
    kc, vc = cache.k[layer], cache.v[layer]
    KV, D = kc.shape[1], kc.shape[3]
    assert q.stride(1) == k.stride(1) == v.stride(1) == 1, "rows must be contiguous within"
    cos, sin = (None, None) if rope is None else (rope[0].contiguous(), rope[1].contiguous())
    out = torch.empty(B, HD, dtype=q.dtype)
    sb, sh, ss, _ = kc.stride()
    index = _rows(batch, kc)
    load(D, HD // D // KV).decode_attention_bf16(
        q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
        None if cos is None else cos.data_ptr(), None if sin is None else sin.data_ptr(),
        kc.data_ptr(), vc.data_ptr(), sb, sh, ss, index[0].data_ptr(), index[1].data_ptr(), out.data_ptr(),
        B, KV, D ** -0.5)
    return out


def _rows(batch, kc: torch.Tensor) -> torch.Tensor:
    """The batch's slots and positions as int32 [2, B], made once per step (every layer's call
    reuses them) and checked then against the cache's slots and positions: the kernel writes where
    it is told, so what an indexed torch write would refuse is refused here."""
    index = getattr(batch, "native_rows", None)
    if index is None:
        slots, starts = batch.host_slots, batch.host_starts
        if max(starts) >= kc.shape[2] or max(slots) >= kc.shape[0] or min(slots) < 0:
            raise IndexError(f"decode rows at positions {starts} / slots {slots} "
                             f"outside the cache's {kc.shape[0]} slots x {kc.shape[2]} positions")
        index = batch.native_rows = torch.tensor([slots, starts], dtype=torch.int32)
    return index
