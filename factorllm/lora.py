"""Low-rank adapters (LoRA) on a factorized model's experts: distillation that trains few weights.

Every routed expert's gate, up and down matrices and the shared neurons' projections get an update
scale * B @ A of rank r (one pair per expert; B starts at zero, so training starts from the
checkpoint as it is), attached as torch parametrizations: every forward path that reads
`experts_gate` and the rest computes with W + scale * B @ A while W stays frozen. `merge_lora`
folds the updates into the weights, so a trained checkpoint has the plain format and serves at the
same cost. Against training the experts whole, the optimizer keeps two moments of the adapters
only (at rank 8, 7% of the `quality` preset's expert weights); steps are no faster, since autograd
still forms each adapted weight's full gradient (docs/results.md, session 26).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from .moe import MoEFFN


class LowRankUpdate(nn.Module):
    """W + scale * B @ A for weights W [..., rows, cols]: one rank-r pair per leading index."""

    def __init__(self, weight: torch.Tensor, rank: int, scale: float):
        super().__init__()
        *lead, rows, cols = weight.shape
        self.scale = scale
        # A as nn.Linear initializes its weight (uniform, bound 1/sqrt(fan-in) for a=sqrt(5))
        bound = 1 / math.sqrt(cols)
        self.A = nn.Parameter(torch.empty(*lead, rank, cols, dtype=weight.dtype, device=weight.device)
                              .uniform_(-bound, bound))
        self.B = nn.Parameter(torch.zeros(*lead, rows, rank, dtype=weight.dtype, device=weight.device))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * (self.B @ self.A).to(weight.dtype)


def adapted_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, parameter name) of every expert weight that LoRA adapts: the routed experts'
    stacked matrices and the shared neurons' linears."""
    found = []
    for m in model.modules():
        if isinstance(m, MoEFFN):
            found += [(m, name) for name in ("experts_gate", "experts_up", "experts_down")]
            if m.shared is not None:
                found += [(getattr(m.shared, p), "weight") for p in ("gate_proj", "up_proj", "down_proj")]
    return found


def add_lora(model: nn.Module, rank: int, alpha: float) -> list[nn.Parameter]:
    """Attach rank-`rank` adapters (scale alpha / rank) to every expert weight of `model`; returns
    their parameters. The adapted weights stop training."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {rank}")
    params = []
    for module, name in adapted_weights(model):
        weight = getattr(module, name)
        weight.requires_grad_(False)
        update = LowRankUpdate(weight.detach(), rank, alpha / rank)
        parametrize.register_parametrization(module, name, update)
        params += [update.A, update.B]
    return params


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its weight (W <- W + scale * B @ A) and drop the adapters."""
    for module, name in adapted_weights(model):
        if parametrize.is_parametrized(module, name):
            with torch.no_grad():
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
