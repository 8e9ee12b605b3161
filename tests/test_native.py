"""The C kernels on real layers of the default model. The MoE kernel (factorllm/native_moe.py):
the same routing and, within bf16 rounding, the same output as the fp32 layer; each token's output
independent of its batch; routing statistics kept, or counted by the kernel itself alike; its
own per-expert timing on timed steps; offered only where it runs. The linear kernel
(factorllm/native_linear.py): F.linear's result within bf16 rounding at any row count. The
RMSNorm (factorllm/native_norm.py): torch's result exactly."""
from __future__ import annotations

import copy

import pytest
import torch

import torch.nn.functional as F

from factorllm import native_linear, native_moe, native_norm
from factorllm.factor_config import FactorConfig
from factorllm.factorize import factorize_layer
from factorllm.kernels import linear_kernel
from factorllm.moe import routing_stats

needs_kernel = pytest.mark.skipif(native_moe.load() is None, reason="needs a C compiler and AVX512-BF16")


def layers(default_model, experts, top_k, shared=0, gate="sum"):
    """Layer 3's FFN factorized (random router) in fp32, and a bf16 copy packed for serving."""
    dense = default_model.model.layers[3].mlp
    factor = FactorConfig(experts=experts, top_k=top_k, partition="contiguous", shared_experts=shared, gate=gate,
                          router_init="random")
    factor.validate(dense.gate_proj.out_features)
    fp32 = factorize_layer(dense, torch.empty(0, 576), factor, 3).eval()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    bf16.router = copy.deepcopy(fp32.router)  # engines keep it in fp32
    bf16.pack(None)
    return fp32, bf16


@needs_kernel
@pytest.mark.parametrize("experts,top_k,shared,gate", [(16, 4, 0, "sum"), (14, 3, 2, "weighted"),
                                                       (8, 2, 0, "scaled"), (32, 8, 0, "sum")])
@pytest.mark.parametrize("tokens", [1, 5, 33])
def test_native_layer_matches_the_fp32_layer(default_model, experts, top_k, shared, gate, tokens):
    fp32, bf16 = layers(default_model, experts, top_k, shared, gate)
    assert "native" in bf16.available_paths
    x = torch.randn(tokens, 576, generator=torch.Generator().manual_seed(tokens)).to(torch.bfloat16)
    with torch.no_grad():
        out = bf16.routed("native", x)
        logits, idx = bf16.pending_stats[-1]
        want = fp32.routed("masked", x.float())
        want_logits, want_idx = fp32.pending_stats[-1]
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(idx, want_idx)
    assert out.dtype == torch.bfloat16 and out.shape == (tokens, 576)
    assert (out.float() - want).norm() < 0.01 * want.norm()


@needs_kernel
def test_each_token_gets_the_same_output_in_any_batch(default_model):
    _, bf16 = layers(default_model, 16, 4)
    x = torch.randn(24, 576, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        together = bf16.routed("native", x)
        alone = torch.cat([bf16.routed("native", x[i:i + 1]) for i in range(len(x))])
    assert torch.equal(together, alone)


@needs_kernel
def test_a_plan_that_takes_native_serves_it_and_keeps_the_statistics(default_model):
    _, bf16 = layers(default_model, 8, 2)
    x = torch.randn(10, 576, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    bf16.use_plan([(16, "native")])
    with torch.no_grad():
        served = bf16(x)
        direct = bf16.routed("native", x)
    assert torch.equal(served, direct)
    idx = bf16.pending_stats[-1][1]
    counts, _ = routing_stats([bf16])
    assert torch.equal(counts[0], 2 * torch.bincount(idx.flatten(), minlength=8))


@needs_kernel
def test_the_kernel_counts_what_the_records_would(default_model):
    _, bf16 = layers(default_model, 8, 2)
    x = torch.randn(10, 576, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    with torch.no_grad():
        for stats_in_kernel in (False, True):
            bf16.stats_in_kernel = stats_in_kernel
            bf16.routed("native", x)
            bf16.routed("native", x[:3])
            assert len(bf16.pending_stats) == (0 if stats_in_kernel else 2)
            counts, entropy = routing_stats([bf16])
            if not stats_in_kernel:
                want_counts, want_entropy = counts, entropy
    assert torch.equal(counts, want_counts) and counts.sum() == 13 * 2
    torch.testing.assert_close(entropy, want_entropy, rtol=1e-5, atol=0)
    counts, entropy = routing_stats([bf16])  # used up
    assert counts.sum() == 0 and entropy.sum() == 0


@needs_kernel
def test_timed_steps_run_native_and_time_the_chosen_experts(default_model):
    _, bf16 = layers(default_model, 16, 2)
    x = torch.randn(3, 576, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    bf16.use_plan([(4, "grouped"), (64, "native")])  # 3 tokens: `grouped` unless timed
    with torch.no_grad():
        untimed = bf16(x)
        bf16.time_experts = True
        timed = bf16(x)
        assert torch.equal(timed, bf16.routed("native", x))
    assert (timed.float() - untimed.float()).norm() < 0.01 * untimed.float().norm()  # bf16 rounding apart
    chosen = set(bf16.pending_stats[-1][1].flatten().tolist())
    seconds = bf16.collect_expert_seconds()
    assert len(seconds) == 16 and len(chosen) < 16
    assert all((s > 0) == (e in chosen) for e, s in enumerate(seconds)), (seconds, chosen)
    assert bf16.collect_expert_seconds() is None  # collected once


def test_native_is_offered_only_where_it_runs(default_model):
    """fp32 weights, and experts narrower than its 16-neuron blocks, keep to torch's paths; a plan
    without `native` lets its weight copy go."""
    fp32, bf16 = layers(default_model, 128, 16)  # experts of 12 neurons
    assert not native_moe.usable(fp32) and not native_moe.usable(bf16)
    assert bf16.native is None and "native" not in bf16.available_paths
    _, bf16 = layers(default_model, 8, 2)
    if native_moe.load() is not None:
        assert bf16.native is not None
        bf16.use_plan([(16, "masked")])
        assert bf16.native is None and "native" not in bf16.available_paths


@needs_kernel
def test_dense_ffns_run_as_one_always_on_group(default_model):
    """pack_dense_ffns: the dense FFN through the kernel matches the fp32 FFN within bf16 rounding,
    for any leading shape; its linears are then left out of oneDNN prepacking."""
    from factorllm.kernels import prepack_linears
    fp32 = default_model.model.layers[3].mlp
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    bf16.fuse()
    assert native_moe.pack_dense_ffns(bf16) == 1 and bf16.native is not None
    x = torch.randn(2, 7, 576, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    with torch.no_grad():
        want = fp32(x.float())
        got = bf16(x)
    assert got.shape == x.shape and (got.float() - want).norm() < 0.01 * want.norm()
    prepack_linears(bf16, 8)
    assert type(bf16.down_proj) is torch.nn.Linear and type(bf16.gate_up_proj) is torch.nn.Linear
    assert native_moe.pack_dense_ffns(copy.deepcopy(fp32)) == 0  # fp32 keeps torch's matmuls


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 16, 37])
@pytest.mark.parametrize("with_bias", [False, True])
def test_native_linear_matches_f_linear(default_model, rows, with_bias):
    """The default model's q/k/v projections fused (960 outputs, not a multiple of the kernel's
    64-column chunks) and its LM head's first 1,000 rows (not a multiple of 16: left to oneDNN)."""
    attn = default_model.model.layers[3].self_attn
    weight = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).to(torch.bfloat16)
    bias = (torch.randn(weight.shape[0], generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
            if with_bias else None)
    kernel = linear_kernel(weight, 8, bias)
    assert isinstance(kernel, native_linear.NativeLinear)
    x = torch.randn(2, rows, 576, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
    want = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    got = kernel(x)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert (got.float() - want).norm() < 0.005 * want.norm()
    head = default_model.model.lm_head.weight[:1000].to(torch.bfloat16)
    assert not native_linear.usable(head) and not native_linear.usable(weight.float())


@pytest.mark.skipif(native_norm.load() is None, reason="needs a C compiler")
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_native_rms_norm_equals_torchs(default_model, offset):
    """Inference on bf16 rows takes the C RMSNorm; it rounds as torch's fp32 norm does (Gemma's
    offset weight included), with the residual add before it as torch's bf16 add does, and a
    changed weight is picked up."""
    norm = copy.deepcopy(default_model.model.model.layers[3].input_layernorm).to(torch.bfloat16)
    norm.offset = offset
    x = (torch.randn(3, 7, 576, generator=torch.Generator().manual_seed(4)) * 3).to(torch.bfloat16)
    residual = (torch.randn(3, 7, 576, generator=torch.Generator().manual_seed(5)) * 30).to(torch.bfloat16)
    with torch.inference_mode():
        got = norm(x)
        got_sum_norm, got_sum = norm.add_norm(x, residual)
    want = norm(x)  # gradients on: torch's ops
    assert want.requires_grad and torch.equal(got, want.detach())
    want_sum_norm, want_sum = norm.add_norm(x, residual)
    assert want_sum_norm.requires_grad and torch.equal(got_sum, want_sum) and torch.equal(got_sum_norm, want_sum_norm.detach())
    assert not torch.equal(got_sum_norm, got)
    with torch.no_grad():
        norm.weight.mul_(2)
        changed = norm(x)
    assert not torch.equal(changed, got) and torch.equal(changed, norm(x).detach())
