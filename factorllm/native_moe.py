"""The factorized FFN layer on CPU as one C call: router, top-k and the chosen experts in bf16.

torch runs a decode-sized MoE layer as a dozen or more small ops (router, top-k, sorting, per-expert
matmuls, scatter), each costing its call on these cores more than its arithmetic, so that the
layer never ran faster than the dense FFN it replaces, whose work it does a quarter or half of
(docs/results.md, sessions 10-19). This kernel does the whole layer in one call: fp32 router
logits and top-k per token, the (token, expert) pairs sorted by expert, then per expert its gate/up
projections with the activation and gate weight, and per block of output columns every expert's
down projection summed into the tokens' rows. Shared groups run as experts that every token takes.
The arithmetic is AVX512-BF16 dot products (`vdpbf16ps`) on register tiles of 4 pairs, with fp32
accumulation, over weights repacked once into the pair-interleaved layout those instructions read.
Only the chosen experts' weights are read.

Built by factorllm/native.py for CPUs with AVX512-BF16 (elsewhere `usable` is False and the layer
keeps its torch paths); `MoEFFN.tune_dispatch` times it beside them like any dispatch path.
"""
from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch

from . import native

GATE_MODES = {"sum": 0, "scaled": 1, "weighted": 2}

SOURCE = r"""
#include <omp.h>
#define TILE 4  /* (token, expert) pairs per register tile */

/* Gate and up rows of NB blocks of 16 neurons for TB pairs: dot products over the hidden size
   (H2 pairs of bf16), 64 elements per pair step and block (16 gate lanes, then 16 up lanes). */
static inline __attribute__((always_inline)) void tile_gate_up(
        const int TB, const int NB, const uint32_t *x32, int H2, const int *tok,
        const uint16_t *w, int64_t block_stride, float g[TILE][32], float u[TILE][32]) {
    __m512 ag[TILE][2], au[TILE][2];
    for (int t = 0; t < TB; t++)
        for (int n = 0; n < NB; n++) { ag[t][n] = _mm512_setzero_ps(); au[t][n] = _mm512_setzero_ps(); }
    for (int p = 0; p < H2; p++) {
        __m512i xb[TILE];
        for (int t = 0; t < TB; t++) xb[t] = _mm512_set1_epi32((int)x32[(int64_t)tok[t] * H2 + p]);
        for (int n = 0; n < NB; n++) {
            const uint16_t *wp = w + n * block_stride + (int64_t)p * 64;
            const __m512bh wg = (__m512bh)_mm512_loadu_si512(wp), wu = (__m512bh)_mm512_loadu_si512(wp + 32);
            for (int t = 0; t < TB; t++) {
                ag[t][n] = _mm512_dpbf16_ps(ag[t][n], (__m512bh)xb[t], wg);
                au[t][n] = _mm512_dpbf16_ps(au[t][n], (__m512bh)xb[t], wu);
            }
        }
    }
    for (int t = 0; t < TB; t++)
        for (int n = 0; n < NB; n++) { _mm512_storeu_ps(g[t] + 16 * n, ag[t][n]); _mm512_storeu_ps(u[t] + 16 * n, au[t][n]); }
}

/* One output chunk of NC blocks of 16 columns for TB consecutive pairs of one expert: its down
   projection over E2 pairs of hidden activations, added into the pairs' token rows of y. */
static inline __attribute__((always_inline)) void tile_down(
        const int TB, const int NC, const uint32_t *h32, int E2, const int *tok,
        const uint16_t *w, int64_t block_stride, float *y, int ystride) {
    __m512 acc[TILE][3];
    for (int t = 0; t < TB; t++)
        for (int c = 0; c < NC; c++) acc[t][c] = _mm512_setzero_ps();
    for (int q = 0; q < E2; q++) {
        __m512i hb[TILE];
        for (int t = 0; t < TB; t++) hb[t] = _mm512_set1_epi32((int)h32[(int64_t)t * E2 + q]);
        for (int c = 0; c < NC; c++) {
            const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + c * block_stride + (int64_t)q * 32);
            for (int t = 0; t < TB; t++) acc[t][c] = _mm512_dpbf16_ps(acc[t][c], (__m512bh)hb[t], wv);
        }
    }
    for (int t = 0; t < TB; t++)
        for (int c = 0; c < NC; c++) {
            float *yr = y + (int64_t)tok[t] * ystride + 16 * c;
            _mm512_storeu_ps(yr, _mm512_add_ps(_mm512_loadu_ps(yr), acc[t][c]));
        }
}

#define CASES4(F, K, ...) switch (K) { case 1: F(1, __VA_ARGS__); break; case 2: F(2, __VA_ARGS__); break; \
                                       case 3: F(3, __VA_ARGS__); break; default: F(4, __VA_ARGS__); }
#define GATE_UP(TB, NB) tile_gate_up(TB, NB, x32, H2, tok, w, block_stride, g, u)
#define DOWN(TB, NC) tile_down(TB, NC, h32, E2, tok, w, block_stride, y, NCOLS)

/* A factorized FFN layer on T tokens, router included.
   x, out: [T, H] bf16. router: [N, H] fp32. gate_up: [G, E/16, H/2, 2, 16, 2] bf16 (G = N + S:
   the routed experts, then the always-on shared groups; per block of 16 neurons and hidden pair,
   16 gate lanes then 16 up lanes of two values each). down: [G, H/16, E/2, 16, 2] bf16.
   logits: [T, N] fp32 out; idx: [T, K] int64 out. gate_mode 0: each chosen expert counts once;
   1: times `scale`; 2: K times the softmax of the chosen logits. Shared groups count once.
   seconds: NULL, or [N] fp64 to which each routed expert's compute time is added (the seconds
   the threads spent on its gate/up and down work, summed over threads). counts ([N] int64) and
   entropy ([1] fp64): NULL, or routing statistics to add to: tokens per expert, and the sum over
   the tokens of the router's entropy (nats). */
void moe_forward_bf16(const uint16_t *x, const float *router, const uint16_t *gate_up,
                      const uint16_t *down, uint16_t *out, float *logits, int64_t *idx,
                      int T, int H, int N, int S, int E, int K, int gate_mode, float scale, double *seconds,
                      int64_t *counts, double *entropy) {
    enum { NCOLS = 48 };  /* output columns per down-projection work item */
    const int G = N + S, H2 = H / 2, E2 = E / 2, EB = E / 16, P = T * (K + S);
    const uint32_t *x32 = (const uint32_t *)x;
    int *count = calloc(G + 1, sizeof(int)), *start = malloc(sizeof(int) * (G + 1));
    int *pair_token = malloc(sizeof(int) * P);
    float *pair_weight = malloc(sizeof(float) * P), *top_w = malloc(sizeof(float) * T * K);
    uint16_t *hidden = malloc(sizeof(uint16_t) * (int64_t)P * E);
    #pragma omp parallel
    {
        float *xf = malloc(sizeof(float) * H);
        char *taken = calloc(N, 1);
        double *spent = seconds ? calloc(G, sizeof(double)) : NULL;  /* this thread's, per group */
        double nats = 0.0;
        #pragma omp for schedule(static)
        for (int t = 0; t < T; t++) {         /* router logits, top-k and gate weights */
            for (int h = 0; h < H; h++) xf[h] = bf16_to_f32(x[(int64_t)t * H + h]);
            float *lt = logits + (int64_t)t * N;
            for (int n = 0; n < N; n++) {
                const float *r = router + (int64_t)n * H;
                float dot = 0.f;
                for (int h = 0; h < H; h++) dot += r[h] * xf[h];
                lt[n] = dot;
            }
            int64_t *it = idx + (int64_t)t * K;
            float *wt = top_w + (int64_t)t * K, sum = 0.f;
            for (int j = 0; j < K; j++) {     /* largest first; ties to the lower index */
                int best = -1;
                for (int n = 0; n < N; n++)
                    if (!taken[n] && (best < 0 || lt[n] > lt[best])) best = n;
                it[j] = best;
                taken[best] = 1;
                wt[j] = gate_mode == 1 ? scale : 1.f;
            }
            for (int j = 0; j < K; j++) taken[it[j]] = 0;
            if (entropy) {                    /* log Z - sum p l, with l shifted by the top logit */
                const float top = lt[it[0]];
                float z = 0.f, pl = 0.f;
                for (int n = 0; n < N; n++) { const float p = expf(lt[n] - top); z += p; pl += p * (lt[n] - top); }
                nats += logf(z) - pl / z;
            }
            if (gate_mode == 2) {
                for (int j = 0; j < K; j++) { wt[j] = expf(lt[it[j]] - lt[it[0]]); sum += wt[j]; }
                for (int j = 0; j < K; j++) wt[j] *= K / sum;
            }
        }
        #pragma omp single
        {                                     /* (token, expert) pairs sorted by expert */
            for (int i = 0; i < T * K; i++) count[idx[i] + 1]++;
            if (counts) for (int e = 0; e < N; e++) counts[e] += count[e + 1];
            start[0] = 0;
            for (int e = 0; e < G; e++) start[e + 1] = start[e] + (e < N ? count[e + 1] : T);
            for (int e = 0; e < G; e++) count[e] = start[e];
            for (int i = 0; i < T * K; i++) {
                const int e = (int)idx[i], r = count[e]++;
                pair_token[r] = i / K; pair_weight[r] = top_w[i];
            }
            for (int e = N; e < G; e++)
                for (int t = 0; t < T; t++) { pair_token[start[e] + t] = t; pair_weight[start[e] + t] = 1.f; }
        }
        /* Gate and up projections, activation and gate weight: per (expert, 32 neurons). */
        const int chunks = (EB + 1) / 2;
        const int64_t block_stride = (int64_t)H2 * 64;
        float g[TILE][32], u[TILE][32];
        #pragma omp for schedule(dynamic)
        for (int item = 0; item < G * chunks; item++) {
            const int e = item / chunks, nb = 2 * (item % chunks), NB = EB - nb < 2 ? 1 : 2;
            if (start[e] == start[e + 1]) continue;
            const uint16_t *w = gate_up + ((int64_t)e * EB + nb) * block_stride;
            const double began = spent ? omp_get_wtime() : 0.0;
            for (int r = start[e]; r < start[e + 1]; r += TILE) {
                const int TB = start[e + 1] - r < TILE ? start[e + 1] - r : TILE;
                const int *tok = pair_token + r;
                if (NB == 2) { CASES4(GATE_UP, TB, 2) } else { CASES4(GATE_UP, TB, 1) }
                for (int t = 0; t < TB; t++) {
                    uint16_t *hr = hidden + (int64_t)(r + t) * E + 16 * nb;
                    const float wt = pair_weight[r + t];
                    for (int n = 0; n < 16 * NB; n++)
                        hr[n] = f32_to_bf16(g[t][n] / (1.f + expf(-g[t][n])) * u[t][n] * wt);
                }
            }
            if (spent) spent[e] += omp_get_wtime() - began;
        }
        /* Down projections: per 48 output columns, every expert's pairs summed into the tokens. */
        float *y = malloc(sizeof(float) * (int64_t)T * NCOLS);
        const int HB = H / 16, col_items = (HB + 2) / 3;
        const int64_t down_stride = (int64_t)E2 * 32;
        #pragma omp for schedule(dynamic)
        for (int item = 0; item < col_items; item++) {
            const int hb = 3 * item, NC = HB - hb < 3 ? HB - hb : 3;
            memset(y, 0, sizeof(float) * (int64_t)T * NCOLS);
            for (int e = 0; e < G; e++) {
                if (start[e] == start[e + 1]) continue;
                const double began = spent ? omp_get_wtime() : 0.0;
                const uint16_t *w = down + ((int64_t)e * HB + hb) * down_stride;
                const int64_t block_stride = down_stride;
                for (int r = start[e]; r < start[e + 1]; r += TILE) {
                    const int TB = start[e + 1] - r < TILE ? start[e + 1] - r : TILE;
                    const int *tok = pair_token + r;
                    const uint32_t *h32 = (const uint32_t *)(hidden + (int64_t)r * E);
                    if (NC == 3) { CASES4(DOWN, TB, 3) } else if (NC == 2) { CASES4(DOWN, TB, 2) } else { CASES4(DOWN, TB, 1) }
                }
                if (spent) spent[e] += omp_get_wtime() - began;
            }
            for (int t = 0; t < T; t++)
                for (int c = 0; c < 16 * NC; c++) out[(int64_t)t * H + 16 * hb + c] = f32_to_bf16(y[(int64_t)t * NCOLS + c]);
        }
        if (entropy) {
            #pragma omp atomic
            *entropy += nats;
        }
        if (spent) {
            #pragma omp critical
            for (int e = 0; e < N; e++) seconds[e] += spent[e];
            free(spent);
        }
        free(y);
        free(xf);
        free(taken);
    }
    free(count); free(start); free(pair_token); free(pair_weight); free(top_w); free(hidden);
}
"""


@functools.lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    """The compiled library where this CPU has AVX512-BF16, else None."""
    ptr, i32 = ctypes.c_void_p, ctypes.c_int
    return native.bf16_library("moe", SOURCE, "moe_forward_bf16", [ptr] * 7 + [i32] * 7 + [ctypes.c_float] + [ptr] * 3)


@dataclass
class NativeMoE:
    """One MoE layer's weights in the kernel's layout (copies: pack again after changing them)."""
    router: torch.Tensor   # [N, H] fp32
    gate_up: torch.Tensor  # [N + S, E/16, H/2, 2, 16, 2] bf16
    down: torch.Tensor     # [N + S, H/16, E/2, 16, 2] bf16
    shared_groups: int
    gate_mode: int

    def __call__(self, x: torch.Tensor, top_k: int, seconds: torch.Tensor | None = None,
                 counts: torch.Tensor | None = None,
                 entropy: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The layer's output [T, H] (bf16), router logits [T, N] (fp32) and chosen experts [T, K]
        for x [T, H]. Each of these, when given, gets added to: `seconds` ([N] fp64) each routed
        expert's compute time in thread-seconds (so that steps that time the experts need not run
        them one by one), `counts` ([N] int64) tokens per expert, `entropy` ([1] fp64) the router's
        entropy summed over the tokens (what `routing_stats` would compute from the logits in
        torch ops, ~1 ms a step of the default model)."""
        T, H = x.shape
        N, E = self.router.shape[0], self.down.shape[2] * 2
        scale = N / top_k if top_k else 1.0  # (no routed experts: a dense FFN)
        x = x.contiguous()
        out = torch.empty_like(x)
        logits = torch.empty(T, N)
        idx = torch.empty(T, top_k, dtype=torch.long)
        load().moe_forward_bf16(x.data_ptr(), self.router.data_ptr(), self.gate_up.data_ptr(), self.down.data_ptr(),
                                out.data_ptr(), logits.data_ptr(), idx.data_ptr(),
                                T, H, N, self.shared_groups, E, top_k, self.gate_mode, scale,
                                *(None if t is None else t.data_ptr() for t in (seconds, counts, entropy)))
        return out, logits, idx


def _runs(down: torch.Tensor, act_name: str) -> bool:
    """Whether the kernel runs an FFN with this down projection ([..., E, H] in any layout whose
    last two sizes are a group's neurons and the hidden size) and activation here."""
    E, H = down.shape[-2:]
    return (down.dtype == torch.bfloat16 and not down.is_cuda and act_name == "silu" and E % 16 == 0
            and H % 16 == 0 and load() is not None)


def usable(moe) -> bool:
    """Whether the kernel runs this `MoEFFN` here: bf16 weights on CPU, SiLU, experts and hidden
    size in whole blocks of 16, shared neurons (if any) in whole expert-sized groups."""
    return _runs(moe.experts_down, moe.act_name) and (moe.shared is None or moe.shared_joins_experts)


@torch.no_grad()
def _pack(router: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, E: int,
          gate_mode: str) -> NativeMoE:
    """The kernel's layout of groups of E neurons from gate and up rows and down columns (as rows)
    [G*E, H], the first N = len(router) groups routed."""
    H = gate.shape[1]
    G = gate.shape[0] // E

    def pairs_of_hidden(w: torch.Tensor) -> torch.Tensor:  # [G*E, H] -> [G, E/16, H/2, 16, 2]
        return w.reshape(G, E // 16, 16, H // 2, 2).permute(0, 1, 3, 2, 4)
    gate_up = torch.stack([pairs_of_hidden(gate), pairs_of_hidden(up)], 3)
    down = down.reshape(G, E // 2, 2, H // 16, 16).permute(0, 3, 1, 4, 2)
    return NativeMoE(router=router.detach().float().contiguous(),
                     gate_up=gate_up.to(torch.bfloat16).contiguous(), down=down.to(torch.bfloat16).contiguous(),
                     shared_groups=G - router.shape[0], gate_mode=GATE_MODES[gate_mode])


def pack(moe) -> NativeMoE:
    """`moe`'s weights (routed experts, then shared groups) in the kernel's layout."""
    return _pack(moe.router.weight, *moe.group_weights(), moe.expert_size, moe.gate)


def pack_dense_ffns(root: torch.nn.Module) -> int:
    """Give every dense FFN (`GatedMLP`) under `root` that the kernel runs here its weights, as one
    always-on group of all its neurons: it then runs through the kernel (at 1-256 rows 2.5x-1.1x
    faster than oneDNN's matmuls, docs/results.md, session 29). Returns how many."""
    from .model import GatedMLP  # (model imports the kernels' users)
    ffns = [m for m in root.modules() if isinstance(m, GatedMLP) and _runs(m.down_proj.weight.t(), m.act_name)]
    for m in ffns:
        m.native = _pack(torch.empty(0, m.down_proj.out_features), m.gate_proj.weight, m.up_proj.weight,
                         m.down_proj.weight.t(), m.down_proj.in_features, "sum")
    return len(ffns)
