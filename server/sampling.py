"""Per-request sampling over a step's batched logits.

One call handles every row that finished a forward pass this step: penalties, temperature,
top-k, top-p and a draw from each request's own `torch.Generator` (so a seeded request gives
the same text alone or batched), plus log-probabilities. Rows are processed together where the
operation is row-independent; only the random draws are per row (one scalar per request).
Log-probabilities are those of the model's distribution (raw logits, before temperature and
penalties), as in OpenAI's API.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SampleRow:
    """What the sampler needs to know about one row."""
    temperature: float
    top_p: float
    top_k: int
    generator: torch.Generator | None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    output_ids: list[int] | None = None   # generated so far (penalties)
    banned_ids: list[int] | None = None   # ids that may not be sampled now (EOS before min_tokens)
    logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()  # non-deterministic, independent of every other request
    else:
        gen.manual_seed(seed)
    return gen


def adjust_logits(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """Penalties and banned ids (in place on a float copy)."""
    for i, r in enumerate(rows):
        if (r.presence_penalty or r.frequency_penalty) and r.output_ids:
            ids = torch.tensor(r.output_ids, device=logits.device)
            counts = torch.bincount(ids, minlength=logits.shape[-1]).to(logits.dtype)
            logits[i] -= r.frequency_penalty * counts + r.presence_penalty * (counts > 0).to(logits.dtype)
        if r.banned_ids:
            logits[i, r.banned_ids] = float("-inf")
    return logits


def sample(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """Next token of each row, [B] long on logits.device. `logits` [B, V] float32 (modified)."""
    logits = adjust_logits(logits, rows)
    out = logits.argmax(-1)
    drawn = [i for i, r in enumerate(rows) if not r.greedy]
    if not drawn:
        return out
    device = logits.device
    sub = logits[drawn] if len(drawn) < len(rows) else logits
    temps = torch.tensor([rows[i].temperature for i in drawn], device=device, dtype=sub.dtype)
    sub = sub / temps[:, None]
    V = sub.shape[-1]
    ks = [rows[i].top_k if 0 < rows[i].top_k < V else V for i in drawn]
    ps = [rows[i].top_p for i in drawn]
    if min(ps) < 1.0:
        # Sort once; top-k and top-p are then prefix cuts of each sorted row.
        vals, order = sub.sort(-1, descending=True)
        probs = vals.softmax(-1)
        rank = torch.arange(V, device=device)[None, :]
        probs = probs * (rank < torch.tensor(ks, device=device)[:, None])   # top-k first, as vLLM
        probs = probs / probs.sum(-1, keepdim=True)
        # Then the smallest prefix whose mass reaches top_p (the token crossing it included).
        before = probs.cumsum(-1) - probs
        probs = probs * (before < torch.tensor(ps, device=device, dtype=probs.dtype)[:, None])
    else:
        kmax = max(ks)
        if kmax < V:
            vals, order = sub.topk(kmax, dim=-1)
            rank = torch.arange(kmax, device=device)[None, :]
            vals = vals.masked_fill(rank >= torch.tensor(ks, device=device)[:, None], float("-inf"))
        else:
            vals, order = sub, None
        probs = vals.softmax(-1)
    # Inverse-CDF draw with one uniform per request from its own generator.
    # The target is > 0 so that the first cdf entry reaching it always has positive mass.
    u = torch.stack([torch.rand((), generator=rows[i].generator, device=device) for i in drawn])
    cdf = probs.cumsum(-1)
    target = (u.to(cdf.dtype) * cdf[:, -1]).clamp_min(1e-30)
    pick = torch.searchsorted(cdf, target[:, None]).squeeze(-1).clamp_max(cdf.shape[-1] - 1)
    chosen = pick if order is None else order.gather(-1, pick[:, None]).squeeze(-1)
    out[torch.tensor(drawn, device=device)] = chosen
    return out


def logprobs_of(logits: torch.Tensor, token_ids: torch.Tensor, top_n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of `token_ids` [B] under `logits` [B, V], and the top-`top_n` [B, N]."""
    lp = logits.float().log_softmax(-1)
    chosen = lp.gather(-1, token_ids[:, None]).squeeze(-1)
    if top_n > 0:
        top_lp, top_ids = lp.topk(min(top_n, lp.shape[-1]), dim=-1)
    else:
        top_lp = top_ids = lp.new_zeros((lp.shape[0], 0))
    return chosen, top_lp, top_ids.long()
