"""Parameter and FLOP accounting of a dense or factorized model (`factorllm info`)."""
from __future__ import annotations

from .factor_config import FactorConfig
from .model import ModelConfig


def model_summary(cfg: ModelConfig, factor: FactorConfig | None, context: int = 512) -> dict:
    """Parameters and forward FLOPs per token (2 per multiply-add), dense vs as factorized.

    Attention score FLOPs are given at `context` tokens of history."""
    H, I, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    attn_params = H * (q + 2 * kv) + q * H
    ffn_params = 3 * H * I
    embed = V * H
    head = 0 if cfg.tie_word_embeddings else V * H
    if factor is None:
        active_ffn, router, active_frac = ffn_params, 0, 1.0
    else:
        active_frac = factor.active_ffn_fraction(L)
        active_ffn = 3 * H * I * active_frac
        router = H * factor.experts
    flops = {
        "attention_proj": 2 * attn_params * L,
        "attention_scores": 2 * 2 * q * context * L,
        "ffn_dense": 2 * ffn_params * L,
        "ffn_active": 2 * active_ffn * L,
        "router": 2 * router * L,
        "lm_head": 2 * V * H,
    }
    flops["total_dense"] = flops["attention_proj"] + flops["attention_scores"] + flops["ffn_dense"] + flops["lm_head"]
    flops["total_active"] = (flops["attention_proj"] + flops["attention_scores"] + flops["ffn_active"]
                             + flops["router"] + flops["lm_head"])
    total = embed + head + L * (attn_params + ffn_params + router)
    active = embed + head + L * (attn_params + router) + L * active_ffn
    return {
        "model_type": cfg.model_type,
        "layers": L, "hidden": H, "ffn": I, "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
        "vocab": V,
        "experts": factor.experts if factor else None,
        "shared_experts": factor.shared_experts if factor else None,
        "expert_size": factor.expert_size if factor else None,
        "top_k": factor.top_k if factor else None,
        "partition": factor.partition if factor else None,
        "gate": factor.gate if factor else None,
        "active_ffn_fraction": active_frac,
        "params_total": total, "params_active": int(active),
        "context_for_attention_flops": context,
        "flops_per_token": {k: int(v) for k, v in flops.items()},
        "flops_ratio": flops["total_active"] / flops["total_dense"],
    }


def format_summary(s: dict) -> str:
    def num(x):
        return f"{x / 1e6:,.1f} M" if x >= 1e6 else f"{x:,}"
    f = s["flops_per_token"]
    rows = [
        ("architecture", f"{s['model_type']}: {s['layers']} layers, hidden {s['hidden']}, FFN {s['ffn']}, "
                         f"heads {s['heads']}/{s['kv_heads']} (q/kv), vocab {s['vocab']}"),
    ]
    if s["experts"]:
        rows.append(("experts", f"{s['experts']} routed + {s['shared_experts']} shared of {s['expert_size']} neurons, "
                                f"top-{s['top_k']}, partition {s['partition']}, gate {s['gate']}"))
    rows += [
        ("active FFN fraction", f"{s['active_ffn_fraction']:.3f}"),
        ("parameters total / active", f"{num(s['params_total'])} / {num(s['params_active'])}"),
    ]
    table = ["| quantity | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    table += ["", f"FLOPs per token (context {s['context_for_attention_flops']}):", "",
              "| part | dense | factorized |", "|---|---:|---:|"]
    for part, dense, fact in [
        ("attention projections", f["attention_proj"], f["attention_proj"]),
        ("attention scores", f["attention_scores"], f["attention_scores"]),
        ("FFN", f["ffn_dense"], f["ffn_active"]),
        ("router", 0, f["router"]),
        ("LM head", f["lm_head"], f["lm_head"]),
        ("total", f["total_dense"], f["total_active"]),
    ]:
        table.append(f"| {part} | {num(dense)} | {num(fact)} |")
    table.append(f"\nfactorized / dense FLOPs: {s['flops_ratio']:.3f}")
    return "\n".join(table)
