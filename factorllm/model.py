"""A Llama-family decoder (Llama, Mistral, SmolLM, TinyLlama, Qwen2/3, Gemma) in one small file.

Parameter names follow Hugging Face's checkpoints, so a model's safetensors load into it
as they are. Each layer's FFN is either the dense `GatedMLP` or a `MoEFFN` (see moe.py).
The forward pass optionally reads and writes a slot-based KV cache (see kv_cache.py) so
that the engine can batch sequences of different lengths and positions in one call.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import native_attention, native_norm
from .timing import doubling_counts, median_in_turns, planned

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "smollm3")


@dataclass
class ModelConfig:
    """The architecture fields the forward pass needs, read from a Hugging Face config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    hidden_act: str = "silu"
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    @property
    def is_gemma(self) -> bool:
        return self.model_type == "gemma"

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        model_type = hf.get("model_type", "")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported architecture {model_type!r}: supported model types are {', '.join(SUPPORTED_MODEL_TYPES)}")
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", None) or hf.get("rope_theta", 10000.0)
        if rope.get("rope_type", rope.get("type", "default")) == "default":
            rope = None
        eos = hf.get("eos_token_id")
        heads = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=rope,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", model_type == "gemma")),
            attention_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
            qk_norm=model_type == "qwen3",
            hidden_act=hf.get("hidden_activation") or hf.get("hidden_act", "silu"),
            model_type=model_type,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=[eos] if isinstance(eos, int) else list(eos or []),
        )

    def to_dict(self) -> dict:
        return asdict(self)


def activation(name: str):
    if name in ("silu", "swish"):
        return F.silu
    if name.startswith("gelu"):
        return lambda x: F.gelu(x, approximate="tanh" if "tanh" in name else "none")
    raise ValueError(f"unsupported MLP activation {name!r}")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.offset = offset  # Gemma stores (weight - 1)
        self._fp32_weight: tuple[tuple[int, int], torch.Tensor] | None = None  # see fp32_weight

    def fp32_weight(self) -> torch.Tensor:
        """The weight in fp32, offset included: kept while the parameter is unchanged."""
        key = (self.weight.data_ptr(), self.weight._version)
        if self._fp32_weight is None or self._fp32_weight[0] != key:
            weight = self.weight.detach().float() + self.offset if self.offset else self.weight.detach().float()
            self._fp32_weight = (key, weight.contiguous())
        return self._fp32_weight[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if native_norm.usable(x):  # one C call instead of ~8 small ops (factorllm/native_norm.py)
            return native_norm.rms_norm(x, self.fp32_weight(), self.eps)
        weight = self.weight.float() + self.offset if self.offset else self.weight.float()
        return F.rms_norm(x.float(), self.weight.shape, weight, self.eps).to(x.dtype)  # in fp32, as HF

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual), or (norm(x), x) without a residual: a block's residual
        add and the next norm, in one C call where the norm is one (as vLLM fuses them)."""
        if residual is None:
            return self(x), x
        if native_norm.usable(x):
            return native_norm.rms_norm(x, self.fp32_weight(), self.eps, residual)
        total = x + residual
        return self(total), total


class GatedMLP(nn.Module):
    """The dense SwiGLU/GeGLU FFN: down(act(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act_name = act
        self.act = activation(act)
        self.gate_up_proj: nn.Linear | None = None  # see fuse()
        self.fused_away: tuple[str, ...] = ()       # projections forward() no longer calls
        self.native = None  # the C kernel's copy of the weights, see native_moe.pack_dense_ffns

    def fuse(self) -> None:
        """One matmul for gate and up."""
        fuse_into(self, "gate_up_proj", ("gate_proj", "up_proj"))

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """act(gate(x)) * up(x): each intermediate neuron's activation, [..., I] (what factorizing
        groups and refits)."""
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.act(gate) * up
        return self.act(self.gate_proj(x)) * self.up_proj(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native is not None:
            return self.native(x.reshape(-1, x.shape[-1]), 0)[0].view_as(x)
        return self.down_proj(self.hidden(x))


def fuse_into(module: nn.Module, name: str, parts: tuple[str, ...]) -> None:
    """Give `module` a fused linear `name` over its linears `parts`, left out of state_dict (which
    keeps the parts, so a fused model saves as the unfused one) and not expected by
    load_state_dict (loading the parts, views of the fused weight, fills it)."""
    if getattr(module, name) is not None:
        return
    setattr(module, name, fused_linear(*(getattr(module, p) for p in parts)))
    module.fused_away = parts

    def drop_fused(mod, state_dict, prefix, local_metadata):
        for key in [k for k in state_dict if k.startswith(f"{prefix}{name}.")]:
            del state_dict[key]
    module.register_state_dict_post_hook(drop_fused)

    def fused_is_not_missing(mod, incompatible):
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k.split(".")[-2:-1] != [name]]
    module.register_load_state_dict_post_hook(fused_is_not_missing)


def fused_linear(*parts: nn.Linear) -> nn.Linear:
    """One nn.Linear computing the concatenated outputs of `parts` (one matmul instead of several:
    inference engines use it). The parts' weights become views of the fused weight, so memory is
    not doubled and factorization, export and state_dict still see the parts (see fuse_into)."""
    w = parts[0].weight
    fused = nn.Linear(parts[0].in_features, sum(p.out_features for p in parts), bias=parts[0].bias is not None,
                      device=w.device, dtype=w.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([p.weight for p in parts]))
        if fused.bias is not None:
            fused.bias.copy_(torch.cat([p.bias for p in parts]))
    offset = 0
    for p in parts:  # (the parts stay the source of truth for saving; train before fusing)
        n = p.out_features
        p.weight = nn.Parameter(fused.weight.detach()[offset:offset + n], requires_grad=p.weight.requires_grad)
        if p.bias is not None:
            p.bias = nn.Parameter(fused.bias.detach()[offset:offset + n], requires_grad=p.bias.requires_grad)
        offset += n
    return fused


class KernelLinear(nn.Module):
    """An nn.Linear run through another kernel, `kernel(x)` = x @ weight.T (+ bias): the engine's
    prepacked oneDNN linears (factorllm/kernels.py), int8 weights (factorllm/quantize.py). Keeps the original module
    (parameters, state_dict)."""

    def __init__(self, plain: nn.Linear, kernel: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.plain, self.kernel = plain, kernel
        self.in_features, self.out_features = plain.in_features, plain.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.plain.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
    s = cfg.rope_scaling
    if s and s.get("rope_type", s.get("type")) == "llama3":
        # Llama 3.1 frequency-dependent scaling of long wavelengths.
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = ((old / wavelen) - lo) / (hi - lo)
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        mid = (wavelen <= old / lo) & (wavelen >= old / hi)
        inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    elif s and s.get("rope_type", s.get("type")) == "linear":
        inv = inv / s["factor"]
    elif s:
        raise ValueError(f"unsupported rope scaling {s}")
    return inv.float()


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin [B, T, 1, D] for `apply_rope`, built once per forward for all layers."""
    freqs = positions[..., None].float() * inv_freq
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat((cos, cos), -1).unsqueeze(2), torch.cat((-sin, sin), -1).unsqueeze(2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, heads, D] rotated in the half-split layout of HF Llama, in fp32:
    [x1 cos - x2 sin, x2 cos + x1 sin] = x * cos + [x2, x1] * [-sin, sin] (tables from
    `rope_tables`; six ops instead of ten, the same values)."""
    xf = x.float()
    return (xf * cos + xf.roll(x.shape[-1] // 2, -1) * sin).to(x.dtype)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """One query per row by two batched matmuls: q [B, 1, heads, D], k/v [B, kv_heads, S, D]
    (head-major views of the cache are fine), mask [B, 1, 1, S] bool or None. Scores and softmax
    in fp32. Returns [B, 1, heads, D]."""
    B, _, H, D = q.shape
    KV, S = k.shape[1], k.shape[2]
    qg = q.reshape(B, KV, H // KV, D)                        # query heads grouped by their kv head
    # K @ q^T rather than q @ K^T: the cached keys stay the untransposed operand (the bf16
    # batched matmul would copy them transposed).
    scores = torch.matmul(k, qg.transpose(-1, -2).contiguous()).transpose(-1, -2).float() * D ** -0.5
    if mask is not None:                                      # scores: [B, KV, G, S]
        scores = scores.masked_fill(~mask.view(B, 1, 1, S), float("-inf"))
    out = torch.matmul(scores.softmax(-1).to(v.dtype), v)   # [B, KV, G, D]
    return out.reshape(B, 1, H, D)


def flash_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           mask: torch.Tensor | None) -> torch.Tensor:
    """`decode_attention` by SDPA, whose CPU flash kernel reads strided cache views in place.
    (Passing each kv head's query heads as that head's queries instead of `enable_gqa` measured
    up to 2x faster per layer at 16-32 rows x 100 positions, but not in whole decode steps, and
    5-10% slower at 1,000 positions: session 21.)"""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask,
                                         enable_gqa=q.shape[2] != k.shape[1])
    return out.transpose(1, 2)


DECODE_ATTENTION = {"matmuls": decode_attention, "sdpa": flash_decode_attention}


def decode_attention_kernels(cache, num_heads: int) -> list[str]:
    """The kernels CPU bf16/fp16 decoding can attend by with this KVCache: `DECODE_ATTENTION`'s,
    which read the cache after torch's rotation and cache writes, and "native", the C kernel that
    does all three in one call (factorllm/native_attention.py) where it builds and fits the shapes."""
    return [*DECODE_ATTENTION] + (["native"] if native_attention.usable(cache.k[0], num_heads) else [])


def decode_attention_path(plan: list[tuple[int, str]], rows: int) -> str:
    """CPU bf16/fp16 decoding's attention kernel (of `decode_attention_kernels`) for `rows` rows by
    a plan of (most rows, path) from `Transformer.tune_decode_attention`. Untuned: "matmuls"."""
    return planned(plan, rows, "matmuls")


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, cfg.num_attention_heads * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(h, cfg.num_key_value_heads * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(h, cfg.num_key_value_heads * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_attention_heads * d, h, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.qkv_proj: nn.Linear | None = None  # see fuse()
        self.fused_away: tuple[str, ...] = ()  # projections forward() no longer calls
        self.decode_plan: list[tuple[int, str]] = []  # see Transformer.tune_decode_attention

    def fuse(self) -> None:
        """One matmul for q, k and v, and one rotary embedding for q and k together. Models that
        normalize q and k separately before the rotation (Qwen3) keep their three projections."""
        if not self.cfg.qk_norm:
            fuse_into(self, "qkv_proj", ("q_proj", "k_proj", "v_proj"))

    def forward(self, x, cos, sin, mask, cache=None, layer: int = 0, batch=None):
        B, T, _ = x.shape
        cfg = self.cfg
        H, KV, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        if (T == 1 and cache is not None and x.dtype in (torch.bfloat16, torch.float16) and not x.is_cuda
                and decode_attention_path(self.decode_plan, B) == "native"):
            return self.o_proj(self.native_decode(x, cos, sin, cache, layer, batch).view(B, T, -1))
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x)
            qk = apply_rope(qkv[..., :(H + KV) * D].view(B, T, H + KV, D), cos, sin)
            q, k = qk[:, :, :H], qk[:, :, H:]
            v = qkv[..., (H + KV) * D:].view(B, T, KV, D)
        else:
            q = self.q_proj(x).view(B, T, H, D)
            k = self.k_proj(x).view(B, T, KV, D)
            v = self.v_proj(x).view(B, T, KV, D)
            if cfg.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        causal = mask is None
        if cache is not None:
            k, v = cache.update(layer, batch, k, v)  # head-major: [B, KV, span, D]
            # A cached batch says itself whether it needs a causal mask (None: all keys visible).
            causal = mask is None and getattr(batch, "is_causal", True)
            if T == 1 and q.dtype in (torch.bfloat16, torch.float16) and not q.is_cuda:
                attend = DECODE_ATTENTION[decode_attention_path(self.decode_plan, B)]
                return self.o_proj(attend(q, k, v, mask).reshape(B, T, -1))
        else:
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k, v, attn_mask=mask,
            is_causal=causal, enable_gqa=cfg.num_key_value_heads != cfg.num_attention_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def native_decode(self, x, cos, sin, cache, layer: int, batch) -> torch.Tensor:
        """A decode step's attention [B, heads * D] by the C kernel, which also rotates q and k and
        writes the cache (with the fused projection; models that normalize q and k first rotate
        them here)."""
        B, cfg = x.shape[0], self.cfg
        H, KV, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x).view(B, -1)
            q, k, v = qkv[:, :H * D], qkv[:, H * D:(H + KV) * D], qkv[:, (H + KV) * D:]
            return native_attention.decode(q, k, v, (cos, sin), cache, layer, batch)
        q = self.q_proj(x).view(B, 1, H, D)
        k = self.k_proj(x).view(B, 1, KV, D)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin).view(B, -1), apply_rope(k, cos, sin).view(B, -1)
        return native_attention.decode(q, k, self.v_proj(x).view(B, -1), None, cache, layer, batch)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        offset = 1.0 if cfg.is_gemma else 0.0
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, offset)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, offset)
        self.mlp: nn.Module = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x, residual, cos, sin, mask, cache=None, layer: int = 0, batch=None):
        """x: the previous block's FFN output (the embeddings at the first block, residual None),
        residual: the residual stream before it. Returns this block's FFN output and the stream
        before it; each sum is left to the next norm, which adds and normalizes in one call."""
        h, residual = self.input_layernorm.add_norm(x, residual)
        h, residual = self.post_attention_layernorm.add_norm(self.self_attn(h, cos, sin, mask, cache, layer, batch), residual)
        return self.mlp(h), residual


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, 1.0 if cfg.is_gemma else 0.0)


class Transformer(nn.Module):
    """Causal LM. `forward(tokens)` runs full causal attention; with `cache` and `batch`
    (a `CacheBatch`: slot and start position per row) it attends over cached keys too."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def fuse(self) -> "Transformer":
        """Fuse each attention's q/k/v and each dense FFN's gate/up projections (engines call this)."""
        for m in self.modules():
            if isinstance(m, (Attention, GatedMLP)):
                m.fuse()
        return self

    @torch.inference_mode()
    def tune_decode_attention(self, cache, max_rows: int, contexts: tuple[int, ...] = (128, 512),
                              repeats: int = 10) -> list[tuple[int, str]]:
        """CPU bf16/fp16 decoding: time the `DECODE_ATTENTION` kernels (two batched matmuls, SDPA's
        flash kernel, the C kernel where it builds) at 1, 2, 4, ... `max_rows` rows, each at
        `contexts` positions of `cache` (a KVCache: strided views, as serving reads them; times
        summed); every layer then uses the fastest per row count. Each timing is one decoder
        layer's decode forward, the layers in turn, so that it reads its weights and cached rows
        from memory as a decode step does: timed alone on one layer's cache-warm rows, the copying
        matmuls came out ahead at 8-32 rows of the C kernel that whole decode steps ran 8-12%
        faster with (AMD EPYC, session 27). The winner depends on the CPU: on that EPYC the matmuls
        were ~4x faster than SDPA at 32 rows x 100 positions (session 10); on an AMX Xeon flash
        was 1.3-5x faster at 1-32 rows (session 21, docs/results.md)."""
        from .kv_cache import CacheBatch
        cfg = self.config
        dtype, device = cache.k.dtype, cache.k.device
        max_rows = min(max_rows, cache.num_slots)
        kernels = decode_attention_kernels(cache, cfg.num_attention_heads)
        turn = itertools.count()

        def layer_step(kernel: str, x: torch.Tensor, cos, sin, batch) -> torch.Tensor:
            i = next(turn) % len(self.layers)
            self.layers[i].self_attn.decode_plan = [(x.shape[0], kernel)]
            return self.layers[i](x, None, cos, sin, batch.mask, cache, i, batch)

        plan = []
        for n in doubling_counts(max_rows):
            total = dict.fromkeys(kernels, 0.0)
            for S in sorted({min(c, cache.max_len - 1) for c in contexts}):
                batch = CacheBatch.build(list(range(n)), [S] * n, [1] * n, device)
                cos, sin = rope_tables(batch.positions, self.inv_freq)
                x = torch.randn(n, 1, cfg.hidden_size, dtype=dtype, device=device)
                t = median_in_turns({k: partial(layer_step, k, x, cos, sin, batch) for k in kernels}, repeats)
                for k in kernels:
                    total[k] += t[k]
            plan.append((n, min(total, key=total.get)))
        for m in self.modules():
            if isinstance(m, Attention):
                m.decode_plan = plan
        return plan

    def hidden_states(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                      cache=None, batch=None) -> torch.Tensor:
        """Final normalized hidden states [B, T, H]."""
        B, T = tokens.shape
        if positions is None:
            positions = batch.positions if batch is not None else torch.arange(T, device=tokens.device).expand(B, T)
        cos, sin = rope_tables(positions, self.inv_freq)
        mask = None if cache is None else batch.attention_mask(T)
        x = self.model.embed_tokens(tokens)
        if self.config.is_gemma:
            x = x * torch.tensor(self.config.hidden_size ** 0.5, dtype=x.dtype)
        residual = None
        for i, layer in enumerate(self.model.layers):
            x, residual = layer(x, residual, cos, sin, mask, cache, i, batch)
        return self.model.norm.add_norm(x, residual)[0]

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                cache=None, batch=None) -> torch.Tensor:
        return self.lm_head(self.hidden_states(tokens, positions, cache, batch))
