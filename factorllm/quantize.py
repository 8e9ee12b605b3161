"""Int8 weight-only quantization for CPU decoding (llama.cpp's Q8 idea, one scale per output row).

A decode step at a few sequences reads every weight once, so its time is the bytes of the weights
(fp32 on AVX2 machines, which lack native bf16 dot products; bf16 elsewhere). `quantize_int8`
rounds every linear weight to 8 bits with one bf16 scale per output row, in place (perplexity of
the default model on 4,096 WikiText-2 tokens 1.002x of fp32, docs/results.md), and gives each
linear two ways to run over the same rounded values:
  * up to `crossover` rows, torch's int8 weight-only kernel (`aten._weight_int8pack_mm`,
    vectorized for bf16 activations): a quarter of the fp32 bytes, half of the bf16 ones;
  * more rows, the model dtype's matmul over the rounded weight (prepacked oneDNN,
    factorllm/kernels.py): there the matmul is compute-bound and the fp32 or bf16 (AMX) GEMM
    beats the int8 kernel.
"The same values": a bf16 weight cannot hold every level q * s of a bf16 scale s, so bf16 weights
get power-of-two scales (`row_scales`), whose levels it holds exactly.
The crossover is measured per weight shape when the model is quantized. Routers stay fp32 (and
unrounded): their choices should not hinge on rounding. MoE experts are rounded with the row layout
the masked dispatch path packs them in (see `quantize_moe_`): every dispatch path computes with
the same values, and each expert's own kernels (the `kernels` path) are int8 too.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import prepacked
from .model import KernelLinear
from .moe import MoEFFN
from .timing import median_in_turns

CROSSOVER_CANDIDATES = (1, 2, 4, 8, 16, 32, 64)


def row_scales(absmax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The int8 scale [out] (bf16, the int8 kernel's scale dtype) of rows whose largest magnitude
    is `absmax`, for a weight of `dtype`: absmax / 127, for bf16 weights rounded up to a power of
    two, so that every level q * s (|q| <= 127) is a bf16 number and a bf16 weight holds it exactly."""
    s = absmax.float().clamp_min(1e-12) / 127
    if dtype == torch.bfloat16:
        mantissa, exponent = torch.frexp(s)  # s = mantissa * 2**exponent, mantissa in [0.5, 1)
        s = torch.ldexp(torch.ones_like(s), exponent - (mantissa == 0.5).int())
    return s.to(torch.bfloat16)


def round_rows_(weight: torch.Tensor) -> torch.Tensor:
    """Round each row of `weight` [out, in] (a view is fine) to 255 levels, in place: q * s with
    q an integer in [-127, 127] and s the row's scale (`row_scales`), so that `int8_rows` recovers
    q and s exactly and both of `Int8Kernel`'s paths use these values. Returns the scales [out]."""
    w = weight.detach()
    absmax = w.abs().amax(1).float()
    scales = row_scales(absmax, w.dtype)
    # Other than bf16 weights, levels of the exact absmax / 127: the largest entry becomes +-127,
    # whose row `int8_rows` finds the (rounded) scale of again.
    step = scales.float() if w.dtype == torch.bfloat16 else absmax.clamp_min(1e-12) / 127
    q = torch.round(w.float() / step[:, None]).clamp_(-127, 127)
    w.copy_(q * scales.float()[:, None])
    return scales


def int8_rows(weight: torch.Tensor, scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight rounded by `round_rows_` as its int8 values and bf16 scales. Without `scales`
    they are recovered from each row's largest entry (`row_scales` of it gives the row's scale
    back); a block of columns of a rounded weight passes its rows' scales."""
    w = weight.detach().float()
    if scales is None:
        scales = row_scales(w.abs().amax(1), weight.dtype)
    return torch.round(w / scales.float()[:, None]).to(torch.int8).contiguous(), scales


def int8_matmul(q: torch.Tensor, scales: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x [T, in] @ (q * scales).T through the int8 kernel: activations and result rounded to bf16
    (its input dtype), returned as x's dtype."""
    return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), q, scales).to(x.dtype)


def plain_matmul(weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """x @ weight.T by the fastest kernel this build has for the weight's dtype (fp32 or bf16):
    prepacked oneDNN, else F.linear."""
    try:
        return prepacked(weight, max(CROSSOVER_CANDIDATES))
    except Exception:  # builds without the oneDNN ops
        return lambda x: F.linear(x, weight)


def bf16_rounded_matmul(matmul: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """What `int8_matmul` computes, by `matmul` (`plain_matmul` over the rounded weight): fp32
    activations and result rounded to bf16 alike (bf16 ones already are), so that a sequence's
    tokens do not depend on how many rows share its step (beyond summation order)."""
    if x.dtype == torch.bfloat16:
        return matmul(x)
    y = matmul(x.to(torch.bfloat16).to(x.dtype))
    return y.to(torch.bfloat16).to(x.dtype)


def measure_crossover(matmul: Callable[[torch.Tensor], torch.Tensor], q: torch.Tensor, scales: torch.Tensor,
                      dtype: torch.dtype, repeats: int = 7) -> int:
    """The most rows at which the int8 kernel still beats `matmul` (of activations of `dtype`)
    over the same weight (0: never), both timed in turns (`median_in_turns`), as
    MoEFFN.tune_dispatch does."""
    crossover = 0
    for n in CROSSOVER_CANDIDATES:
        x = torch.randn(n, q.shape[1]).to(dtype)
        t = median_in_turns({"plain": lambda: bf16_rounded_matmul(matmul, x),
                             "int8": lambda: int8_matmul(q, scales, x)}, repeats)
        if t["int8"] >= t["plain"]:
            break
        crossover = n
    return crossover


class Int8Kernel:
    """x @ weight.T (+ bias) for a weight on its rows' int8 grid: the int8 kernel up to
    `crossover` rows, the weight dtype's matmul over the same values beyond (see the module
    docstring). Activations come in the weight's dtype."""

    def __init__(self, weight: torch.Tensor, crossovers: dict[tuple, int], bias: torch.Tensor | None = None,
                 scales: torch.Tensor | None = None):
        self.weight = weight.detach()
        self.bias = None if bias is None else bias.detach()
        self.q, self.scales = int8_rows(self.weight, scales)
        self.matmul = plain_matmul(self.weight)
        key = tuple(self.weight.shape)
        if key not in crossovers:
            crossovers[key] = measure_crossover(self.matmul, self.q, self.scales, self.weight.dtype)
        self.crossover = crossovers[key]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if flat.shape[0] <= self.crossover:
            y = int8_matmul(self.q, self.scales, flat)
        else:
            y = bf16_rounded_matmul(self.matmul, flat)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], y.shape[-1])


def int8_linear(plain: nn.Linear, crossovers: dict[tuple, int], scales: torch.Tensor | None = None) -> KernelLinear:
    """An nn.Linear whose weight was rounded to int8, run through `Int8Kernel`."""
    return KernelLinear(plain, Int8Kernel(plain.weight, crossovers, plain.bias, scales))


def quantize_moe_(moe: MoEFFN, crossovers: dict[tuple, int]) -> None:
    """Round an MoE layer's experts as its masked path packs them (MoEFFN.pack): gate and up rows
    per neuron; down per hidden row across all routed experts and the shared neurons packed with
    them, so that one set of row scales serves the packed down projection, each expert's and the
    shared neurons' own. Then pack the layer with int8 kernels."""
    N, E, H = moe.experts_down.shape
    round_rows_(moe.experts_gate.view(N * E, H))
    round_rows_(moe.experts_up.view(N * E, H))
    down = [moe.experts_down.detach().reshape(N * E, H).t()]
    if moe.shared_joins_experts:
        round_rows_(moe.shared.gate_proj.weight)
        round_rows_(moe.shared.up_proj.weight)
        down.append(moe.shared.down_proj.weight.detach())
    rows = torch.cat(down, 1)  # [H, N*E (+ S)]
    down_scales = round_rows_(rows)
    moe.experts_down.detach().copy_(rows[:, :N * E].t().reshape(N, E, H))
    if moe.shared_joins_experts:
        moe.shared.down_proj.weight.detach().copy_(rows[:, N * E:])
        shared = moe.shared
        for name in ("gate_up_proj",) if shared.gate_up_proj is not None else ("gate_proj", "up_proj"):
            setattr(shared, name, int8_linear(getattr(shared, name), crossovers))
        shared.down_proj = int8_linear(shared.down_proj, crossovers, down_scales)
    moe.pack(lambda w: Int8Kernel(w, crossovers),  # the router stays fp32, its own call: no int8 rounding
             down_kernel=lambda w: Int8Kernel(w, crossovers, scales=down_scales), route_in_masked=False)


@torch.no_grad()
def quantize_int8(model: nn.Module) -> dict[tuple, int]:
    """Round every linear weight of `model` (an fp32 or bf16 CPU model) to int8 in place and run it
    through `Int8Kernel`; returns the measured crossover per weight shape. A tied LM head rounds
    the token embeddings too (each token's row with its own scale)."""
    crossovers: dict[tuple, int] = {}
    for m in list(model.modules()):
        if isinstance(m, MoEFFN):
            quantize_moe_(m, crossovers)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (type(child) is not nn.Linear or name in getattr(parent, "fused_away", ())
                    or isinstance(parent, MoEFFN)):
                continue  # routers stay fp32 and unrounded
            round_rows_(child.weight)
            setattr(parent, name, int8_linear(child, crossovers))
    return crossovers
