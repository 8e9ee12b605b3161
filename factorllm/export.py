"""Export a factorized checkpoint to a stock Hugging Face MoE architecture (Mixtral, Qwen2-MoE,
Qwen3-MoE) that `transformers` and vLLM load without `trust_remote_code`.

The targets all route the same way: p = softmax(W_r x), take the top K of p, renormalize the K
chosen probabilities to sum to 1 (`norm_topk_prob=True` for the Qwen formats; always for Mixtral),
and add sum_i w_i * E'_i(x). Our gates map onto that as follows (c is folded into each routed
expert's down_proj, which is linear in the expert's output):

* "weighted": ours is K * p_i / sum_topk(p) * E_i(x)  -> c = K, router unchanged.      EXACT.
* "sum":      ours is 1 * E_i(x)                        -> c = K, router scaled by alpha.
* "scaled":   ours is N/K * E_i(x)                      -> c = N, router scaled by alpha.

Top-k selection is invariant to a positive scale alpha of the router logits, but the softmax
weights are not: with alpha -> 0 the K renormalized weights tend to 1/K, so c * w_i -> our hard
gate. We pick alpha per layer from a bound on the router logits that holds for every input (the
FFN input is RMS-normalized, so ||x|| <= sqrt(H) once the norm's weight is folded into the router):
alpha * (max - min of any token's logits) <= tau. Then every chosen expert's coefficient is within a
factor exp(+-tau) of ours, i.e. its relative error is at most (1 - 1/K) * (exp(tau) - 1) ~ tau. With
K = 1 the renormalized weight is exactly 1, so hard gates are exact too. The limit on tau is
floating point: logits closer than ~1e-7 / alpha (fp32 softmax resolution) tie, and a tie may be
broken differently than in our engine (documented in docs/export.md).

Shared experts: Qwen2-MoE's shared expert is multiplied by sigmoid(shared_expert_gate(x)); a zero gate
gives exactly 0.5, so the shared down_proj is doubled. Mixtral and Qwen3-MoE have no always-on
expert and refuse checkpoints with shared experts. Attention and norms map one to one; what a target
cannot express (attention biases into Mixtral, q/k norms into anything but Qwen3-MoE, per-layer K) is
refused with a message naming a format that fits.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import UsageError
from .loading import LoadedModel
from .model import ModelConfig

FORMATS = ("mixtral", "qwen2_moe", "qwen3_moe")
ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Spread of the (scaled) router logits allowed for the hard gates; see the module docstring.
DEFAULT_GATE_TOLERANCE = 3e-3
SHARD_BYTES = 4 << 30
# c folded into the routed experts' down_proj, as a function of (N, K), per gate.
GATE_SCALES = {"weighted": lambda n, k: k, "sum": lambda n, k: k, "scaled": lambda n, k: n}


@dataclass
class ExportResult:
    path: Path
    format: str
    gate: str
    exact: bool                       # True when the mapping is exact up to rounding
    expert_scale: float               # c folded into every routed expert's down_proj
    router_scales: list[float]        # alpha per layer (1.0 where the router is copied as is)
    coefficient_error_bound: float    # max relative error of any chosen expert's gate coefficient
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        how = "exact" if self.exact else (
            f"hard gate approximated: every chosen expert's coefficient within "
            f"{self.coefficient_error_bound:.2e} (relative) of ours")
        return f"exported {self.format} to {self.path} ({how})"


def check_exportable(cfg: ModelConfig, loaded: LoadedModel, fmt: str) -> None:
    """Raise UsageError with a clear message for what `fmt` cannot express."""
    factor = loaded.factor
    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r}: choose from {', '.join(FORMATS)}")
    if factor is None:
        raise UsageError(f"{loaded.source} is a dense model: factorize it first (factorllm factorize), then export")
    if factor.gate not in GATE_SCALES:
        raise UsageError(f"gate {factor.gate!r} has no mapping onto {fmt} (supported gates: {', '.join(GATE_SCALES)})")
    ks = {factor.layer_top_k(i) for i in range(cfg.num_hidden_layers)}
    if len(ks) > 1:
        raise UsageError(f"{fmt} has one num_experts_per_tok for all layers, but this checkpoint uses "
                         f"per-layer top-k {sorted(ks)}; refactorize with a single --top-k")
    if factor.shared_experts and fmt != "qwen2_moe":
        fix = ("no supported format has both q/k norms and shared experts: refactorize with --shared-experts 0"
               if cfg.qk_norm else "export with --format qwen2_moe")
        raise UsageError(f"{fmt} has no always-on shared expert, but this checkpoint has "
                         f"{factor.shared_experts} shared experts; {fix}")
    if cfg.qk_norm and fmt != "qwen3_moe":
        raise UsageError(f"this {cfg.model_type} model normalizes queries and keys (q_norm/k_norm), which "
                         f"{fmt} cannot express; export with --format qwen3_moe")
    if not cfg.qk_norm and fmt == "qwen3_moe":
        raise UsageError(f"qwen3_moe always applies RMSNorm to queries and keys, which this {cfg.model_type} "
                         "model does not (not expressible exactly); export with --format mixtral or qwen2_moe")
    if cfg.attention_bias and fmt == "mixtral":
        raise UsageError(f"mixtral has no q/k/v projection biases, but this {cfg.model_type} model has them; "
                         "export with --format qwen2_moe")
    if fmt == "qwen2_moe" and cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size:
        raise UsageError(f"qwen2_moe derives head_dim from hidden_size / heads ({cfg.hidden_size} / "
                         f"{cfg.num_attention_heads}), but this model's head_dim is {cfg.head_dim}; "
                         "export with --format mixtral (or qwen3_moe for q/k-normed models)")
    if cfg.rope_scaling and cfg.rope_scaling.get("rope_type", cfg.rope_scaling.get("type")) not in ("llama3", "linear"):
        raise UsageError(f"unsupported rope scaling {cfg.rope_scaling}")


def _norm_weight(norm) -> torch.Tensor:
    return norm.weight.detach().float() + norm.offset  # Gemma stores (weight - 1)


def router_logit_spread_bound(router_weight: torch.Tensor, norm_weight: torch.Tensor) -> float:
    """Max over all inputs of (max - min) of the router logits W_r (g * x_hat), where x_hat is the
    RMS-normalized FFN input (||x_hat|| <= sqrt(H)) and g the post-attention norm's weight."""
    w = router_weight.detach().double() * norm_weight.double()          # [N, H]
    diff = w[:, None, :] - w[None, :, :]                                  # [N, N, H]
    return float(diff.norm(dim=-1).max()) * math.sqrt(w.shape[1])


def coefficient_error_bound(tau: float, k: int) -> float:
    """Relative error bound of c * w_i against the hard gate when chosen logits span <= tau."""
    return (1 - 1 / k) * math.expm1(tau)


def _config(cfg: ModelConfig, loaded: LoadedModel, fmt: str, dtype: str, untie: bool) -> dict:
    factor = loaded.factor
    hf = loaded.hf_config
    E, N, K, S = factor.expert_size, factor.experts, factor.top_k, factor.shared_experts
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        scaling = dict(cfg.rope_scaling)
        scaling["rope_type"] = scaling.pop("type", None) or scaling.get("rope_type")
        rope = {**scaling, "rope_theta": cfg.rope_theta}
    eos = cfg.eos_token_ids
    out = {
        "architectures": [ARCHITECTURES[fmt]],
        "model_type": fmt,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": cfg.hidden_act,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": rope,
        # Legacy spellings for readers older than transformers 5 (e.g. a vLLM pinned to 4.x).
        "rope_theta": cfg.rope_theta,
        **({"rope_scaling": {k: v for k, v in rope.items() if k != "rope_theta"}} if cfg.rope_scaling else {}),
        "tie_word_embeddings": cfg.tie_word_embeddings and not untie,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": hf.get("pad_token_id"),
        "attention_dropout": 0.0,
        "initializer_range": hf.get("initializer_range", 0.02),
        "use_cache": True,
        "dtype": dtype,
        "torch_dtype": dtype,
        "num_experts_per_tok": K,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.001,
    }
    if fmt == "mixtral":
        out.update(intermediate_size=E, num_local_experts=N, sliding_window=None, router_jitter_noise=0.0)
    else:
        out.update(intermediate_size=(N + S) * E, moe_intermediate_size=E, num_experts=N, norm_topk_prob=True,
                   decoder_sparse_step=1, mlp_only_layers=[], use_sliding_window=False, sliding_window=None,
                   max_window_layers=cfg.num_hidden_layers)
        if fmt == "qwen2_moe":
            out.update(shared_expert_intermediate_size=max(S, 1) * E, qkv_bias=True)
        else:
            out.update(attention_bias=cfg.attention_bias)
    return out


@torch.no_grad()
def export_model(loaded: LoadedModel, fmt: str, out: str | Path, gate_tolerance: float = DEFAULT_GATE_TOLERANCE,
                 dtype: str | None = None) -> ExportResult:
    """Write `loaded` (a factorized model) as a Hugging Face `fmt` directory at `out`."""
    model, cfg, factor = loaded.model, loaded.model.config, loaded.factor
    check_exportable(cfg, loaded, fmt)
    if not gate_tolerance > 0:
        raise UsageError(f"--gate-tolerance must be > 0, got {gate_tolerance}")
    if dtype is None:
        dtype = str(loaded.hf_config.get("dtype") or loaded.hf_config.get("torch_dtype") or "float32")
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype}")
    N, K, E = factor.experts, factor.top_k, factor.expert_size
    hard = factor.gate in ("sum", "scaled")
    expert_scale = float(GATE_SCALES[factor.gate](N, K))
    exact = not hard or K == 1
    # Gemma scales embeddings by sqrt(H) in the forward pass; the targets do not, so the scale is
    # folded into a separate input embedding (the output head keeps the unscaled one).
    untie = cfg.is_gemma
    notes: list[str] = []

    state: dict[str, torch.Tensor] = {}
    f32 = lambda t: t.detach().float().cpu()  # noqa: E731
    embed = f32(model.model.embed_tokens.weight)
    state["model.embed_tokens.weight"] = embed * cfg.hidden_size ** 0.5 if cfg.is_gemma else embed
    if not cfg.tie_word_embeddings or untie:
        state["lm_head.weight"] = f32(model.lm_head.weight)
    state["model.norm.weight"] = _norm_weight(model.model.norm)
    router_scales = []
    moe_key = "block_sparse_moe" if fmt == "mixtral" else "mlp"
    names = ("w1", "w3", "w2") if fmt == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = _norm_weight(layer.input_layernorm)
        post_norm = _norm_weight(layer.post_attention_layernorm)
        state[p + "post_attention_layernorm.weight"] = post_norm
        attn = layer.self_attn
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            lin = getattr(attn, proj)
            state[p + f"self_attn.{proj}.weight"] = f32(lin.weight)
            if proj != "o_proj" and (cfg.attention_bias or fmt == "qwen2_moe"):
                state[p + f"self_attn.{proj}.bias"] = (f32(lin.bias) if lin.bias is not None
                                                       else torch.zeros(lin.out_features))
        if fmt == "qwen3_moe":
            state[p + "self_attn.q_norm.weight"] = _norm_weight(attn.q_norm)
            state[p + "self_attn.k_norm.weight"] = _norm_weight(attn.k_norm)
            if cfg.attention_bias:
                state[p + "self_attn.o_proj.bias"] = torch.zeros(cfg.hidden_size)
        moe = layer.mlp
        if not hasattr(moe, "experts_gate"):
            raise UsageError(f"layer {i} has a dense FFN; every layer must be factorized to export")
        router = f32(moe.router.weight)
        alpha = 1.0
        if hard and K > 1:
            spread = router_logit_spread_bound(router, post_norm)
            alpha = gate_tolerance / spread if spread > 0 else 1.0
        router_scales.append(alpha)
        m = p + moe_key + "."
        state[m + "gate.weight"] = router * alpha
        gate_w, up_w, down_w = f32(moe.experts_gate), f32(moe.experts_up), f32(moe.experts_down).transpose(1, 2)
        for e in range(N):
            state[m + f"experts.{e}.{names[0]}.weight"] = gate_w[e]
            state[m + f"experts.{e}.{names[1]}.weight"] = up_w[e]
            state[m + f"experts.{e}.{names[2]}.weight"] = down_w[e] * expert_scale
        if fmt == "qwen2_moe":
            s = m + "shared_expert."
            if moe.shared is not None:
                state[s + "gate_proj.weight"] = f32(moe.shared.gate_proj.weight)
                state[s + "up_proj.weight"] = f32(moe.shared.up_proj.weight)
                state[s + "down_proj.weight"] = f32(moe.shared.down_proj.weight) * 2.0  # sigmoid(0) = 0.5
            else:  # the architecture always has one: a zero expert adds exactly 0
                state[s + "gate_proj.weight"] = torch.zeros(E, cfg.hidden_size)
                state[s + "up_proj.weight"] = torch.zeros(E, cfg.hidden_size)
                state[s + "down_proj.weight"] = torch.zeros(cfg.hidden_size, E)
            state[m + "shared_expert_gate.weight"] = torch.zeros(1, cfg.hidden_size)
    if fmt == "qwen2_moe" and not factor.shared_experts:
        notes.append("qwen2_moe always has a shared expert: a zero one of one expert's size was written")
    if untie:
        notes.append("gemma: sqrt(hidden) embedding scale folded into untied input embeddings")

    bound = 0.0 if exact else coefficient_error_bound(gate_tolerance, K)
    config = _config(cfg, loaded, fmt, dtype, untie)
    config["factorllm_export"] = {
        "source": str(loaded.path), "factorllm": factor.to_dict(), "expert_scale": expert_scale,
        "router_scales": router_scales, "gate_tolerance": gate_tolerance if not exact else None,
        "coefficient_error_bound": bound, "exact": exact,
    }
    target = DTYPES[dtype]
    state = {k: v.to(target).contiguous() for k, v in state.items()}

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _save_sharded(state, tmp)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    gen = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    if config["pad_token_id"] is not None:
        gen["pad_token_id"] = config["pad_token_id"]
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
    loaded.tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return ExportResult(out, fmt, factor.gate, exact, expert_scale, router_scales, bound, notes)


def _save_sharded(state: dict[str, torch.Tensor], out: Path, max_bytes: int = SHARD_BYTES) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors plus the standard index."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    if len(shards) == 1:
        save_file(shards[0], out / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for j, shard in enumerate(shards):
        name = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(v.numel() * v.element_size() for v in state.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def export_checkpoint(source: str, fmt: str, out: str | Path, gate_tolerance: float = DEFAULT_GATE_TOLERANCE,
                      dtype: str | None = None) -> ExportResult:
    from .loading import load_model
    return export_model(load_model(source), fmt, out, gate_tolerance, dtype)
