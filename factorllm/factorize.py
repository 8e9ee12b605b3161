"""Turn a dense `Transformer` into a factorized one, layer by layer.

For each layer: take the FFN's input on calibration tokens, choose a partition of the
intermediate neurons (contiguous, or balanced co-activation clusters), set aside the most
important neurons as always-on shared experts, copy the weights into the stacked expert
tensors of a `MoEFFN` in partition order (no value changes), and initialize its router;
optionally train the router on PAR pseudo-labels (router_training.py) and refit the down
projections in closed form (distill.refit_down), both against the dense FFN on the same inputs.
The layers are fit in one pass over the calibration tokens, bottom to top, each on the inputs
that the already factorized layers below it produce (`fit_layer_by_layer`).
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from .factor_config import FactorConfig
from .model import GatedMLP, Transformer
from .moe import MoEFFN
from .distill import refit_down
from .partition import balanced_clusters, neuron_importance
from .router_training import expert_output_stats, train_router


def install_empty_moe(model: Transformer, factor: FactorConfig) -> None:
    """Replace every layer's FFN by an (uninitialized) MoEFFN of the checkpoint's shape."""
    cfg = model.config
    factor.validate(cfg.intermediate_size, cfg.num_hidden_layers)
    for i, layer in enumerate(model.layers):
        layer.mlp = MoEFFN(cfg.hidden_size, factor.expert_size, factor.experts, factor.layer_top_k(i),
                           shared_size=factor.shared_experts * factor.expert_size, act=cfg.hidden_act,
                           gate=factor.gate)


def capture_ffn_inputs(model: Transformer, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's FFN input (the post-attention norm's output) for `tokens` [B, T], as [B*T, H]."""
    captured: list[torch.Tensor] = []
    fit_layer_by_layer(model, tokens, lambda i, ffn, x: captured.append(x) or ffn, sequential=False,
                       desc="capturing FFN inputs")
    return captured


def choose_partition(mlp: GatedMLP, acts: torch.Tensor, factor: FactorConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the shared neurons and a [N, E] table of each routed expert's neurons, from the
    neuron activations [T, I] on calibration tokens (unused by the contiguous split)."""
    I, E, S = mlp.gate_proj.out_features, factor.expert_size, factor.shared_experts
    if factor.partition == "contiguous":
        order = torch.arange(I)
        return order[:S * E], order[S * E:].view(factor.experts, E)
    importance = neuron_importance(acts, mlp.down_proj.weight)
    ranked = importance.argsort(descending=True)
    shared, rest = ranked[:S * E].sort().values, ranked[S * E:]
    groups = balanced_clusters(acts[:, rest].abs().T, factor.experts, seed=seed)
    return shared, rest[groups]


def init_router(moe: MoEFFN, x: torch.Tensor, how: str, seed: int, norms: torch.Tensor | None = None) -> None:
    """random: the paper's untrained start. centroid: each expert's mean gate row, scaled to
    unit logit spread. lstsq: ridge regression of each expert's output norm on x (closed form;
    `norms` [T, N] from `expert_output_stats`)."""
    w = moe.router.weight
    if how == "random":
        gen = torch.Generator().manual_seed(seed)
        bound = 1 / w.shape[1] ** 0.5
        w.copy_((torch.rand(w.shape, generator=gen) * 2 - 1) * bound)
    elif how == "centroid":
        c = moe.experts_gate.mean(1)
        w.copy_(c / c.norm(dim=1, keepdim=True).clamp_min(1e-8) * (w.shape[1] ** 0.5 / x.norm(dim=1).mean()))
    else:
        target = (norms - norms.mean(1, keepdim=True)) / norms.std(1, keepdim=True).clamp_min(1e-6)
        xd = x.double()
        gram = xd.T @ xd
        ridge = 1e-3 * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        sol = torch.linalg.solve(gram + ridge, xd.T @ target.double())  # [H, N]
        w.copy_(sol.T.to(w.dtype) * 4.0)  # sharpen: standardized targets span a few units


@torch.no_grad()
def factorize_layer(mlp: GatedMLP, x: torch.Tensor, factor: FactorConfig, layer: int,
                    stats: dict | None = None) -> MoEFFN:
    """The MoE replacing `mlp`, built on its inputs x [T, H]; per-step statistics go to `stats`."""
    acts = mlp.hidden(x)  # [T, I], shared by the partition and the dense output
    shared, groups = choose_partition(mlp, acts, factor, factor.seed + layer)
    moe = MoEFFN(mlp.gate_proj.in_features, factor.expert_size, factor.experts, factor.layer_top_k(layer),
                 shared_size=shared.numel(), act=mlp.act_name, gate=factor.gate).to(x)
    g, u, d = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    moe.experts_gate.copy_(g[groups])
    moe.experts_up.copy_(u[groups])
    moe.experts_down.copy_(d[:, groups].permute(1, 2, 0))
    if moe.shared is not None:
        moe.shared.gate_proj.weight.copy_(g[shared])
        moe.shared.up_proj.weight.copy_(u[shared])
        moe.shared.down_proj.weight.copy_(d[:, shared])
    dense_out = mlp.down_proj(acts)
    # The experts' hidden activations are the dense ones regrouped (only the down refit changes
    # weights, and it comes last): no second pass through gate and up.
    hidden = acts[:, groups], (acts[:, shared] if moe.shared is not None else None)
    norms = labels = None
    if factor.router_init == "lstsq" or factor.router_label:
        norms, labels = expert_output_stats(moe, x, dense_out, factor.router_label, hidden=hidden)
    init_router(moe, x, factor.router_init, factor.seed + layer, norms)
    if factor.router_label:
        par = train_router(moe, x, labels, steps=factor.router_steps, seed=factor.seed + layer)
        if stats is not None:
            stats.setdefault("par", []).append(par)
    if factor.refit:
        fit = refit_down(moe, x, dense_out, factor.refit_ridge, hidden)
        if stats is not None:
            stats.setdefault("refit", []).append(fit)
    moe.reset_stats()
    return moe.train(mlp.training)


class _FitOnInput(nn.Module):
    """Stands in for one layer's FFN during `fit_layer_by_layer`'s pass: `step(x)` fits the
    replacement on the input it receives and returns the output the pass continues from."""

    def __init__(self, step):
        super().__init__()
        self.step = step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.step(x)


@torch.no_grad()
def fit_layer_by_layer(model: Transformer, tokens: torch.Tensor, fit, sequential: bool = True,
                       desc: str = "factorizing") -> None:
    """Run `tokens` [B, T] through `model` once; when layer i's FFN is reached, call
    `fit(i, ffn, x)` with its input x [B*T, H] and make the module it returns layer i's FFN.
    sequential: the rest of the pass continues from the new FFN's output, so every layer is fit on
    the inputs that the already fitted layers below it produce (as GPTQ calibrates; each layer can
    then absorb part of the error of those below it); otherwise from the original FFN's output
    (every layer sees the dense model's inputs)."""
    bar = tqdm(total=len(model.layers), desc=desc, unit="layer")
    originals = [layer.mlp for layer in model.layers]

    def step_for(i: int, layer, ffn):
        def step(x: torch.Tensor) -> torch.Tensor:
            new = fit(i, ffn, x.reshape(-1, x.shape[-1]))
            layer.mlp = new
            bar.update()
            if not sequential:
                return ffn(x)
            out = new(x)
            if isinstance(new, MoEFFN):
                new.reset_stats()
            return out
        return step

    for i, layer in enumerate(model.layers):
        layer.mlp = _FitOnInput(step_for(i, layer, layer.mlp))
    try:
        model.hidden_states(tokens)
    finally:
        for layer, ffn in zip(model.layers, originals):
            if isinstance(layer.mlp, _FitOnInput):  # not reached (an error in the pass)
                layer.mlp = ffn
        bar.close()


@torch.no_grad()
def factorize(model: Transformer, factor: FactorConfig, calib_tokens: torch.Tensor | None) -> Transformer:
    """Factorize `model` in place, layer by layer on the calibration tokens [B, T] (needed unless
    the partition is contiguous and the router random); see `fit_layer_by_layer` for
    `factor.sequential`."""
    factor.validate(model.config.intermediate_size, len(model.layers))
    stats: dict = {}

    def fit(i: int, mlp: GatedMLP, x: torch.Tensor) -> MoEFFN:
        dtype = x.dtype
        return factorize_layer(mlp.float(), x.float(), factor, i, stats).to(dtype)

    if factor.needs_calibration:
        fit_layer_by_layer(model, calib_tokens, fit, factor.sequential)
    else:
        empty = torch.empty(0, model.config.hidden_size)
        for i, layer in enumerate(tqdm(model.layers, desc="factorizing", unit="layer")):
            layer.mlp = fit(i, layer.mlp, empty.to(layer.input_layernorm.weight))
    factor.trained.update(summarize_stats(stats, factor))
    return model


def summarize_stats(stats: dict, factor: FactorConfig | None) -> dict:
    """Layer means of the router-training and refit statistics, for the checkpoint's provenance."""
    out = {}
    if "par" in stats:
        out["par"] = {k: sum(s[k] for s in stats["par"]) / len(stats["par"]) for k in stats["par"][0]}
        if factor is not None:
            out["par"].update(label=factor.router_label, steps=factor.router_steps)
    if "refit" in stats:
        out["refit"] = {k: sum(s[k] for s in stats["refit"]) / len(stats["refit"]) for k in stats["refit"][0]}
    return out


def moe_layers(model: nn.Module) -> list[MoEFFN]:
    return [m for m in model.modules() if isinstance(m, MoEFFN)]
