"""Recovering quality after factorization: a closed-form per-layer refit and end-to-end distillation.

* `refit_down`: with the router's choices fixed, the MoE layer's output is linear in its down
  projections, so all of them (routed and shared) are refit jointly by ridge regression to the
  dense FFN's output on calibration inputs, regularized toward the original weights. Missing
  experts are compensated by the chosen ones. Seconds per layer on CPU.
* `distill`: end-to-end logit distillation of the factorized student from the dense teacher:
  KL on logits (+ optional CE on the next token, + load balance), training the routers and/or
  the experts, whole or through low-rank adapters (factorllm/lora.py); AdamW, linear warm-up +
  cosine decay, gradient clipping, bf16 autocast (CUDA, and CPUs with native bf16: 1.36x the
  fp32 tokens/s on this 2-core CPU, the same KL curve) with the teacher held in bf16, resumable
  checkpoints, seeded.
* `head_losses`: the LM head with the KL (and CE) terms, computed in row chunks that stay in cache.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .device import cpu_has_fast_bf16
from .lora import add_lora, merge_lora
from .moe import MoEFFN
from .router_training import balance_loss


@torch.no_grad()
def refit_down(moe: MoEFFN, x: torch.Tensor, dense_out: torch.Tensor, ridge: float,
               hidden: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> dict:
    """Jointly refit every down projection of `moe` so that its output on x [T, H] (routing fixed)
    matches `dense_out` [T, H]. `ridge` (relative to the mean diagonal of the features' Gram matrix)
    pulls toward the original weights: on 4-8k calibration tokens 1.0 measured best (quality preset
    ppl 68.1 against 73.4 at 0.05 and 84.9 at 0.01: a weak pull overfits the calibration text).
    `hidden`: the routed and shared experts' hidden activations ([T, N, E], [T, shared]) if the
    caller has them. Returns the relative error before and after."""
    collect, moe.collect_stats = moe.collect_stats, False
    _, idx, weights = moe.route(x)
    moe.collect_stats = collect
    T, N, E = x.shape[0], moe.num_experts, moe.expert_size
    coef = torch.zeros(T, N, dtype=x.dtype, device=x.device).scatter_(1, idx, 1.0 if weights is None else weights)
    h, h_shared = hidden or (moe.all_expert_hidden(x), None)
    feats = [(h * coef[:, :, None]).reshape(T, N * E)]
    w0 = [moe.experts_down.reshape(N * E, -1).T]
    if moe.shared is not None:
        feats.append(moe.shared.hidden(x) if h_shared is None else h_shared)
        w0.append(moe.shared.down_proj.weight)
    phi, w0, y = torch.cat(feats, 1).float(), torch.cat(w0, 1).float(), dense_out.float()  # [T, F], [H, F]
    gram, cross, yy = (phi.T @ phi).double(), (phi.T @ y).double(), y.double().square().sum()
    lam = ridge * gram.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    w = torch.linalg.solve(gram + lam * eye, cross + lam * w0.T.double()).T  # [H, F]

    def rel_err(wd: torch.Tensor) -> float:  # ||phi wd^T - y|| / ||y|| from the Gram matrix, no [T, H] product
        sq = (wd @ gram * wd).sum() - 2 * (wd * cross.T).sum() + yy
        return (sq.clamp_min(0) / yy).sqrt().item()

    err_before, err_after = rel_err(w0.double()), rel_err(w)
    w = w.to(moe.experts_down.dtype)
    moe.experts_down.copy_(w[:, :N * E].T.reshape(N, E, -1))
    if moe.shared is not None:
        moe.shared.down_proj.weight.copy_(w[:, N * E:])
    return {"err_before": err_before, "err_after": err_after}


@dataclass
class DistillConfig:
    steps: int = 200
    batch_size: int = 4
    lr: float = 2e-4
    router_lr: float = 1e-3
    warmup: int = 20
    weight_decay: float = 0.0
    clip: float = 1.0
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    balance_weight: float = 0.0
    temperature: float = 1.0
    train: tuple[str, ...] = ("routers", "experts")  # and/or "lora" (factorllm/lora.py), or "all"
    lora_rank: int = 8
    lora_alpha: float = 16.0  # adapters scaled by alpha / rank
    seed: int = 0
    save_every: int = 50
    bf16: bool | None = None  # autocast; None: where the device computes bf16 natively
    seconds: float | None = None  # time budget: `steps` is then the most, see `planned_steps`
    # torch.compile the student's forward (and so its backward): the elementwise work of norms,
    # rotary embeddings and the masked experts fuses; on a 2-core CPU the steps ran 1.28-1.39x faster
    # after a first step that compiles (~1.5 min cold; docs/results.md, session 23). Needs a C++
    # compiler on CPU.
    compile: bool = False

    def __post_init__(self):
        if "lora" in self.train and ("experts" in self.train or "all" in self.train):
            raise ValueError("train the experts whole (experts, all) or through LoRA adapters (lora), not both")


class HeadLosses(torch.autograd.Function):
    """The LM head and the distillation losses, one chunk of rows at a time, from hidden states.

    Returns [KL(softmax(teacher / tau) || softmax(student / tau)) * tau^2 averaged over rows,
    next-token cross-entropy averaged over rows with a target (0 without targets)]. The [tokens,
    vocabulary] logits never exist whole: each chunk's logits, losses and gradients are computed in
    the forward pass and only the [tokens, hidden] (and, for a trained head, [vocabulary, hidden])
    gradients are kept. On CPU, autograd through whole-vocabulary logits (fresh 400 MB buffers, fp32
    copies, log-softmax backwards) took 835 ms for the KL of 1,024 x 49,152 logits where chunks take
    241, and a distillation step 1.13x as long as with the heads inside the chunks too."""

    @staticmethod
    def forward(ctx, hidden, weight, t_hidden, t_weight, tau: float, targets, rows: int):
        n, dtype = hidden.shape[0], t_weight.dtype
        w = weight.detach().to(dtype)
        counted = 0 if targets is None else int((targets >= 0).sum())
        terms = 2 if counted else 1
        losses = torch.zeros(2, dtype=torch.float64, device=hidden.device)
        grads = torch.zeros(terms, *hidden.shape, dtype=torch.float32, device=hidden.device)
        w_grads = torch.zeros(terms, *weight.shape, dtype=torch.float32, device=hidden.device) \
            if ctx.needs_input_grad[1] else None
        for i in range(0, n, rows):
            h = hidden[i:i + rows].detach().to(dtype)
            s_logits = (h @ w.T).float()
            t_logits = (t_hidden[i:i + rows] @ t_weight.T).float()
            t_logp = (t_logits if tau == 1 else t_logits.div_(tau)).log_softmax(-1)
            s_logp = (s_logits if tau == 1 else s_logits / tau).log_softmax(-1)
            p = t_logp.exp()
            ce_grads = []
            # Cross-entropy at temperature 1; when tau is 1 it reuses the KL's log-softmax, so it
            # reads it here, before the KL's gradient overwrites it below.
            if counted:
                t = targets[i:i + rows]
                keep = t >= 0
                logp = s_logp if tau == 1 else s_logits.log_softmax(-1)
                losses[1] -= logp[keep, t[keep]].sum(dtype=torch.float64)
                probs = logp.exp()
                probs[keep, t[keep]] -= 1.0
                probs[~keep] = 0.0
                ce_grads.append(probs.div_(counted))
            # sum of p (log p - log q) as one dot product: no [rows, V] product, no float64 copy
            # of it (the chunk's head and losses ran 1.8x faster, docs/results.md, session 23)
            losses[0] += torch.dot(p.view(-1), t_logp.sub_(s_logp).view(-1))
            chunk_grads = [s_logp.exp_().sub_(p).mul_(tau / n)] + ce_grads
            for k, g in enumerate(chunk_grads):
                g = g.to(dtype)
                grads[k, i:i + rows] = g @ w
                if w_grads is not None:
                    w_grads[k] += g.T @ h
        ctx.save_for_backward(grads, w_grads)
        return torch.stack([losses[0] * tau ** 2 / n, losses[1] / max(counted, 1)]).float()

    @staticmethod
    def backward(ctx, g):
        grads, w_grads = ctx.saved_tensors
        weights = g[:len(grads)].to(grads.dtype).view(-1, 1, 1)
        d_hidden = (weights * grads).sum(0)
        d_weight = None if w_grads is None else (weights * w_grads).sum(0)
        return d_hidden, d_weight, None, None, None, None, None


def head_losses(hidden: torch.Tensor, weight: torch.Tensor, t_hidden: torch.Tensor, t_weight: torch.Tensor,
                tau: float = 1.0, targets: torch.Tensor | None = None, rows: int = 64) -> torch.Tensor:
    """[KL, CE] of the student head `weight` on `hidden` [..., H] against the teacher's head on
    `t_hidden`; `targets` [...] are next-token ids (negative: no target). Matmuls run in
    `t_weight`'s dtype."""
    H = hidden.shape[-1]
    flat_targets = None if targets is None else targets.reshape(-1)
    return HeadLosses.apply(hidden.reshape(-1, H), weight, t_hidden.reshape(-1, H).detach().to(t_weight.dtype),
                            t_weight.detach(), tau, flat_targets, rows)


def trainable_parameters(student, train: tuple[str, ...], lora: list | None = None) -> tuple[list, list]:
    """(router params, other params) to train; everything else is frozen.

    routers: MoE routers; experts: routed and shared expert weights; lora: the adapters `lora`
    on them; all: every weight."""
    routers, others = [], list(lora or [])
    for p in student.parameters():
        p.requires_grad_(False)
    for m in student.modules():
        if isinstance(m, MoEFFN):
            if "routers" in train or "all" in train:
                routers.append(m.router.weight)
            if "experts" in train or "all" in train:
                others += [m.experts_gate, m.experts_up, m.experts_down]
                if m.shared is not None:
                    others += list(m.shared.parameters())
    if "all" in train:
        seen = {id(p) for p in routers + others}
        others += [p for p in student.parameters() if id(p) not in seen]
    for p in routers + others:
        p.requires_grad_(True)
    return routers, others


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


TIMED_STEPS = 3  # steps after the first whose speed sets a time budget's step count


def planned_steps(cfg: DistillConfig, done: int, elapsed: float, step_seconds: float) -> int:
    """The schedule's length under a time budget: the steps already done plus as many as fit in
    what is left of `cfg.seconds` at `step_seconds` each, at most `cfg.steps`."""
    return max(done, min(cfg.steps, done + int((cfg.seconds - elapsed) / max(step_seconds, 1e-9))))


def distill(student, teacher, tokens: torch.Tensor, cfg: DistillConfig, state_path: str | Path | None = None,
            progress: bool = True) -> dict:
    """Distill `teacher` into `student` on token windows [B, T]. With `state_path`, training state
    is saved every `save_every` steps and resumed from there if present. With `cfg.seconds`, the
    first steps are timed and the schedule (warm-up scaled alike) shortened to what fits in the
    budget. Returns loss history and the steps run."""
    device = student.lm_head.weight.device
    bf16 = cfg.bf16 if cfg.bf16 is not None else (device.type == "cuda" or cpu_has_fast_bf16())
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    lora = add_lora(student, cfg.lora_rank, cfg.lora_alpha) if "lora" in cfg.train else None
    routers, others = trainable_parameters(student, cfg.train, lora)
    groups = [g for g in ({"params": routers, "lr": cfg.router_lr}, {"params": others, "lr": cfg.lr}) if g["params"]]
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    base_lrs = [g["lr"] for g in opt.param_groups]
    start, history, total, warmup, planned = 0, [], cfg.steps, cfg.warmup, cfg.seconds is None
    state_path = Path(state_path) if state_path else None
    if state_path and state_path.is_file():
        st = torch.load(state_path, map_location=device, weights_only=True)
        student.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        gen.set_state(st["gen"])
        start, history = st["step"], st["history"]
        if cfg.seconds is not None and st.get("planned"):  # the budget's plan holds for the resumed run
            total, warmup, planned = st["total"], st["warmup"], True
    moes = [m for m in student.modules() if isinstance(m, MoEFFN)]
    captured: list[torch.Tensor] = []
    hooks = [m.register_forward_pre_hook(lambda _m, a: captured.append(a[0])) for m in moes] if cfg.balance_weight else []
    if bf16:
        # autocast would cast every teacher weight to bf16 again on each step (~20% of its forward)
        teacher = copy.deepcopy(teacher).to(torch.bfloat16)
    teacher.eval()
    student.train()
    student_forward = torch.compile(student.hidden_states) if cfg.compile else student.hidden_states
    bar = tqdm(desc="distilling", unit="step", disable=not progress, initial=start, total=total)
    t0, seen, step, timed_from = time.perf_counter(), 0, start, None
    try:
        while step < total:
            batch = tokens[torch.randint(0, tokens.shape[0], (cfg.batch_size,), generator=gen)].to(device)
            for g, base in zip(opt.param_groups, base_lrs):
                g["lr"] = base * lr_factor(step, warmup, total)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                with torch.no_grad():
                    t_hidden = teacher.hidden_states(batch)
                captured.clear()
                s_hidden = student_forward(batch)
            targets = F.pad(batch[:, 1:], (0, 1), value=-1) if cfg.ce_weight else None
            kl, ce = head_losses(s_hidden, student.lm_head.weight, t_hidden, teacher.lm_head.weight,
                                 cfg.temperature, targets)
            loss = cfg.kl_weight * kl + cfg.ce_weight * ce
            if cfg.balance_weight:
                bal = sum(balance_loss(m.router(x.reshape(-1, x.shape[-1])), m.top_k) for m, x in zip(moes, captured))
                loss = loss + cfg.balance_weight * bal / len(moes)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(routers + others, cfg.clip)
            opt.step()
            seen += batch.numel()
            history.append({"step": step + 1, "loss": loss.item(), "kl": kl.item()})
            step += 1
            now = time.perf_counter()
            if not planned and step == start + 1:
                timed_from = now  # the first step pays one-off costs (kernel set-up)
            elif not planned and step == start + 1 + TIMED_STEPS:
                total = planned_steps(cfg, step, now - t0, (now - timed_from) / TIMED_STEPS)
                warmup, planned, bar.total = max(1, round(cfg.warmup * total / cfg.steps)), True, total
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}", kl=f"{kl.item():.4f}", tok_s=f"{seen / (now - t0):.0f}")
            if state_path and (step % cfg.save_every == 0 or step == total):
                state_path.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"model": student.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                            "step": step, "total": total, "warmup": warmup, "planned": planned,
                            "history": history, "config": asdict(cfg)}, state_path)
    finally:
        for h in hooks:
            h.remove()
        merge_lora(student)
        for p in student.parameters():
            p.requires_grad_(False)
        student.eval()
        bar.close()
    return {"history": history, "steps": step, "tokens_per_s": seen / max(time.perf_counter() - t0, 1e-9)}


@torch.no_grad()
def recover_layers(student, teacher, tokens: torch.Tensor, factor, label: str | None = "greedy", steps: int = 100,
                   refit: bool = True) -> dict:
    """Layer by layer against the dense teacher's FFN on each layer's FFN inputs for `tokens`
    (the student's own, bottom to top, or the teacher's if the checkpoint's FactorConfig `factor`
    is not sequential): PAR router training on `label` (None: keep the routers), then the
    closed-form down refit. Returns layer means of the statistics (as factorize records them)."""
    from .factorize import fit_layer_by_layer, summarize_stats
    from .router_training import compute_labels, train_router

    stats: dict = {}
    model = student if factor.sequential else teacher

    def fit(i: int, ffn, x: torch.Tensor) -> torch.nn.Module:
        # `ffn` is the module the pass reached: the student's MoE, or the teacher's dense FFN
        moe = (ffn if factor.sequential else student.layers[i].mlp).float()
        x = x.float()
        dense_out = (teacher.layers[i].mlp if factor.sequential else ffn).float()(x)
        if label:
            labels = compute_labels(moe, x, dense_out, label)
            stats.setdefault("par", []).append(train_router(moe, x, labels, steps=steps, seed=i))
        if refit:
            stats.setdefault("refit", []).append(refit_down(moe, x, dense_out, factor.refit_ridge))
        moe.reset_stats()
        return ffn  # the pass goes on through the module it reached (student's, or teacher's dense FFN)

    fit_layer_by_layer(model, tokens, fit, factor.sequential, desc="router training" if label else "refitting")
    out = summarize_stats(stats, None)
    if "par" in out:
        out["par"].update(label=label, steps=steps)
    return out
