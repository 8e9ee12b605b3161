"""PAR: fit each layer's router to pseudo-labels derived from the dense teacher.

For a layer with teacher FFN input x and routed target y (the dense FFN's output minus the
always-on shared part), every expert's output E_i(x) is computed and each token gets a set of
K label experts:
  * "paper":  the K experts whose single output is closest to the target scaled by K/N
              (FactorLLM's Prior-Approximate Router label);
  * "greedy": the K-subset chosen greedily to minimize ||y - g * sum_{i in S} E_i(x)|| with the
              layer's gate scale g (best reconstruction);
  * "mass":   the K experts with the largest output norm ||E_i(x)|| (contribution mass).
The router is then trained with the PAR loss, KL(uniform over the label set || softmax(router)),
plus a Switch-style load-balance term. Labels are computed on the teacher's FFN input of the
*current* layer (what the paper describes), not the previous layer's output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .moe import MoEFFN

from .factor_config import ROUTER_LABELS as LABELS


def expert_outputs(moe: MoEFFN, x: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """Every routed expert's output for every token, [N, T, H] (what the router should predict);
    `hidden`: the experts' hidden activations [T, N, E] if the caller has them."""
    if hidden is None:
        hidden = moe.all_expert_hidden(x)
    return torch.bmm(hidden.transpose(0, 1), moe.experts_down)


def gate_scale(moe: MoEFFN) -> float:
    return moe.num_experts / moe.top_k if moe.gate == "scaled" else 1.0


def routed_target(moe: MoEFFN, dense_out: torch.Tensor, x: torch.Tensor,
                  shared_hidden: torch.Tensor | None = None) -> torch.Tensor:
    """What the routed experts must reproduce: the dense output minus the shared experts' (from
    their hidden activations `shared_hidden` [T, shared] if the caller has them)."""
    if moe.shared is None:
        return dense_out
    shared = moe.shared(x) if shared_hidden is None else moe.shared.down_proj(shared_hidden)
    return dense_out - shared


def labels_from_outputs(outs: torch.Tensor, target: torch.Tensor, k: int, how: str, scale: float = 1.0) -> torch.Tensor:
    """[T, K] label experts per token from expert outputs [N, T, H] and the routed target [T, H]."""
    N = outs.shape[0]
    if how == "paper":
        dist = (outs - target * (k / N)).norm(dim=-1)                  # [N, T]
        return dist.topk(k, dim=0, largest=False).indices.T
    if how == "mass":
        return outs.norm(dim=-1).topk(k, dim=0).indices.T
    if how != "greedy":
        raise ValueError(f"label must be one of {LABELS}, got {how!r}")
    resid = target.clone()
    sq = (outs * outs).sum(-1) * scale ** 2                             # [N, T]
    taken = torch.zeros(N, target.shape[0], dtype=torch.bool, device=target.device)
    tokens = torch.arange(target.shape[0], device=target.device)
    chosen = []
    for _ in range(k):
        gain = 2 * scale * torch.einsum("nth,th->nt", outs, resid) - sq   # error decrease per expert
        best = gain.masked_fill(taken, float("-inf")).argmax(0)          # [T]
        chosen.append(best)
        taken[best, tokens] = True
        resid = resid - scale * outs[best, tokens]
    return torch.stack(chosen, 1)


@torch.no_grad()
def expert_output_stats(moe: MoEFFN, x: torch.Tensor, dense_out: torch.Tensor | None = None, how: str | None = None,
                        chunk: int = 1024, hidden: tuple[torch.Tensor, torch.Tensor | None] | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One pass over every routed expert's output on inputs x [T, H], in chunks of tokens: the
    output norms [T, N] (the least-squares router init's target) and, given the dense FFN output
    and a label rule, the label experts [T, K] (else None). `hidden`: the routed and shared
    experts' hidden activations ([T, N, E], [T, shared]) if the caller has them."""
    routed_hidden, shared_hidden = hidden or (None, None)
    target = routed_target(moe, dense_out, x, shared_hidden) if how else None
    norms, labels = [], []
    for s in range(0, x.shape[0], chunk):
        outs = expert_outputs(moe, x[s:s + chunk], None if routed_hidden is None else routed_hidden[s:s + chunk])
        norms.append(outs.norm(dim=-1).T)
        if how:
            labels.append(labels_from_outputs(outs, target[s:s + chunk], moe.top_k, how, gate_scale(moe)))
    return torch.cat(norms), (torch.cat(labels) if how else None)


def compute_labels(moe: MoEFFN, x: torch.Tensor, dense_out: torch.Tensor, how: str) -> torch.Tensor:
    """Label experts [T, K] for teacher inputs x [T, H] and the dense FFN output there."""
    return expert_output_stats(moe, x, dense_out, how)[1]


def label_distribution(labels: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Uniform distribution over each token's label set, [T, N]."""
    q = torch.zeros(labels.shape[0], num_experts, device=labels.device)
    return q.scatter_(1, labels, 1.0 / labels.shape[1])


def par_loss(logits: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(q || softmax(logits)), mean over tokens."""
    logp = logits.float().log_softmax(-1)
    return (q * (q.clamp_min(1e-12).log() - logp)).sum(-1).mean()


def balance_loss(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Switch-Transformer load balance: N * sum_i f_i * P_i (1 when perfectly balanced)."""
    probs = logits.float().softmax(-1)
    N = probs.shape[-1]
    idx = probs.topk(k, dim=-1).indices
    f = torch.bincount(idx.flatten(), minlength=N).float() / idx.numel()
    return N * (f * probs.mean(0)).sum()


@torch.no_grad()
def agreement(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of label experts that the router's top-K contains (recall at K)."""
    k = labels.shape[1]
    top = logits.topk(k, dim=-1).indices
    return (top[:, :, None] == labels[:, None, :]).any(1).float().mean().item()


def loss_gradient(logits: torch.Tensor, q: torch.Tensor, k: int, balance: float) -> torch.Tensor:
    """d(par_loss + balance * balance_loss) / d logits, [T, N], written out: the KL term gives
    (softmax - q) / T; the balance term, N/T * sum_t sum_i f_i p_ti with the top-K counts f held
    constant (as autograd holds them), gives N/T * p * (f - p.f)."""
    T, N = logits.shape
    p = logits.float().softmax(-1)
    f = torch.bincount(p.topk(k, dim=-1).indices.flatten(), minlength=N).float() / (T * k)
    return (p - q + balance * N * p * (f - (p * f).sum(-1, keepdim=True))) / T


@torch.no_grad()
def train_router(moe: MoEFFN, x: torch.Tensor, labels: torch.Tensor, steps: int = 100, lr: float = 3e-2,
                 balance: float = 0.01, weight_decay: float = 0.0, seed: int = 0) -> dict:
    """Fit `moe.router` to labels with the PAR loss + load balance (full batch, Adam). The router
    is linear, so the gradient is `loss_gradient(logits)^T x`: no autograd graph per step (it
    took a third of a preset's build).

    Returns the PAR loss and the label agreement before and after."""
    torch.manual_seed(seed)
    w = moe.router.weight
    x = x.to(w.dtype)
    q = label_distribution(labels, moe.num_experts)
    logits = F.linear(x, w)
    stats = {"loss_start": par_loss(logits, q).item(), "agree_start": agreement(logits, labels)}
    param = torch.nn.Parameter(w.detach().clone())
    opt = torch.optim.Adam([param], lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        param.grad = loss_gradient(F.linear(x, param), q, moe.top_k, balance).to(x.dtype).T @ x
        opt.step()
    w.copy_(param)
    logits = F.linear(x, w)
    stats.update(loss_end=par_loss(logits, q).item(), agree_end=agreement(logits, labels),
                 balance_end=balance_loss(logits, moe.top_k).item())
    return stats
