"""Int8 weight-only quantization (factorllm/quantize.py) on the real default model."""
from __future__ import annotations

import asyncio
import copy

import pytest
import torch
import torch.nn.functional as F

from factorllm.model import KernelLinear
from factorllm.quantize import Int8Kernel, int8_rows, quantize_int8, round_rows_
from server.engine import Engine, EngineConfig, EngineRequest, SamplingParams


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rounding_is_exact_int8_and_both_kernel_paths_agree(default_model, dtype):
    """Rounded rows hold at most 255 levels that the int8 kernel stores exactly (a bf16 weight
    too: its scales are powers of two); the int8 kernel (few rows) and the weight dtype's matmul
    (many rows) compute the same product of the rounded weight."""
    w = default_model.model.layers[5].mlp.gate_proj.weight.detach().to(dtype)
    rounded = w.clone()
    scales = round_rows_(rounded)
    assert (rounded.float() - w.float()).abs().max() <= w.float().abs().amax(1, keepdim=True).max() / 127
    assert max(len(r.unique()) for r in rounded) <= 255
    if dtype == torch.bfloat16:
        assert torch.equal(torch.frexp(scales.float())[0], torch.full_like(scales.float(), 0.5))
    q, recovered = int8_rows(rounded)
    assert torch.equal(recovered, scales)
    assert q.dtype == torch.int8 and torch.equal(q.float() * scales.float()[:, None], rounded.float())
    x = torch.randn(8, w.shape[1], generator=torch.Generator().manual_seed(0)).to(dtype)
    exact = F.linear(x.float(), rounded.float())
    kernel = Int8Kernel(rounded, {tuple(rounded.shape): 8})
    small = kernel(x).float()  # 8 rows: the int8 kernel
    kernel.crossover = 0
    large = kernel(x).float()  # the weight dtype's matmul
    for y in (small, large):  # bf16 activations and results: ~0.3% relative error
        assert (y - exact).norm() / exact.norm() < 0.01
    assert (small - large).abs().max() <= 0.02 * exact.abs().max()


def test_int8_model_keeps_its_quality(default_model, sample_tokens):
    """Every linear but the routers runs on int8 weights; next-token loss within 1% of fp32's."""
    model = copy.deepcopy(default_model.model).eval()
    crossovers = quantize_int8(model)
    left = [name for parent in model.modules() for name, child in parent.named_children()
            if type(child) is torch.nn.Linear and not isinstance(parent, KernelLinear)
            and name not in getattr(parent, "fused_away", ())]
    assert not left and isinstance(model.lm_head.kernel, Int8Kernel) and all(c >= 0 for c in crossovers.values())

    def nll(m):
        with torch.inference_mode():
            logits = m(sample_tokens)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), sample_tokens[:, 1:].flatten()).item()
    base, int8 = nll(default_model.model), nll(model)
    assert abs(int8 - base) / base < 0.01, (int8, base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_moe_paths_compute_the_same_layer(default_model, dtype):
    """A factorized layer's experts are rounded as the masked path packs them, so every dispatch
    path (masked and kernels through int8 kernels, the others in the layer's dtype) computes the
    same layer; the router stays fp32, as engines keep it."""
    from factorllm.factor_config import FactorConfig
    from factorllm.factorize import factorize_layer
    dense = default_model.model.layers[5].mlp
    factor = FactorConfig(experts=28, shared_experts=4, top_k=4, partition="contiguous", router_init="random")
    factor.validate(dense.gate_proj.out_features)
    moe = factorize_layer(dense, torch.empty(0, 576), factor, 5).eval().to(dtype)
    moe.router.float()
    layer = torch.nn.Sequential(moe)
    router = moe.router.weight.detach().clone()
    quantize_int8(layer)
    assert torch.equal(moe.router.weight, router) and moe.shared_packed and "kernels" in moe.available_paths
    x = torch.randn(6, 576, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.inference_mode():
        _, idx, w = moe.route(x)
        exact = moe.run_path("grouped", x, idx, w).float()
        for path in ("masked", "kernels", "gathered", "looped", "padded"):
            out = moe.run_path(path, x, idx, w).float()
            assert (out - exact).norm() / exact.norm() < 0.01, path
        # Each expert's own int8 kernels hold exactly the rounded values the other paths use.
        gate_up, down = moe.expert_kernels[0]
        for kernel, weight in ((gate_up, moe.gate_up()[0]), (down, moe.experts_down[0].t())):
            assert torch.equal(kernel.q.float() * kernel.scales.float()[:, None], weight.float())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int8_engine_scores_like_fp32_alone_and_batched(default_model, sample_tokens, dtype):
    """The int8 engine's prompt log-probabilities (fp32 or bf16 activations), alone and with the
    other prompts in one batch, stay close to each other and to the fp32 model's. (Like a bf16
    engine, it rounds activations to bf16, so greedy text is not bit-for-bit batch-invariant the
    way the fp32 engine's is.)"""
    engine = Engine(default_model, EngineConfig(max_num_seqs=4, max_model_len=256, device="cpu", quantize="int8",
                                                dtype=dtype))
    prompts = [row[:n].tolist() for row, n in zip(sample_tokens, (24, 18, 11, 20))]  # mixed lengths
    params = SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=0)

    async def one(rid, p):
        out = {"ids": [], "prompt": None}
        async for inc in engine.submit(EngineRequest(rid, p, params)):
            out["ids"] += inc.token_ids
            out["prompt"] = inc.prompt_logprobs or out["prompt"]
        return out

    async def main():
        await engine.start()
        try:
            alone = [await one(f"a{i}", p) for i, p in enumerate(prompts)]
            together = await asyncio.gather(*[one(f"b{i}", p) for i, p in enumerate(prompts)])
        finally:
            await engine.stop()
        return alone, together
    alone, together = asyncio.run(main())
    assert engine.dtype == getattr(torch, dtype) and all(len(o["ids"]) == 4 for o in alone)
    with torch.inference_mode():
        fp32 = default_model.model(sample_tokens).log_softmax(-1)
    batched_gap, fp32_gap = [], []
    for i, (a, b) in enumerate(zip(alone, together)):
        la = torch.tensor([t.logprob for t in a["prompt"][1:]])
        lb = torch.tensor([t.logprob for t in b["prompt"][1:]])
        n = len(prompts[i])
        ref = fp32[i, :n - 1].gather(-1, sample_tokens[i, 1:n, None])[:, 0]
        batched_gap.append((la - lb).abs().max().item())
        fp32_gap.append((la - ref).abs().mean().item())
    assert max(batched_gap) < 0.3 and max(fp32_gap) < 0.25, (batched_gap, fp32_gap)  # bf16 noise; a leak costs nats
    # The caller's model is left as loaded (the engine rounds its own copy).
    assert not isinstance(default_model.model.lm_head, KernelLinear)


@pytest.mark.parametrize("kw,message", [(dict(dtype="float16"), "float32 or bfloat16"),
                                        (dict(quantize="int4"), "auto, none or int8")])
def test_int8_engine_refuses_what_it_cannot_run(default_model, kw, message):
    with pytest.raises(ValueError, match=message):
        Engine(default_model, EngineConfig(max_num_seqs=1, max_model_len=64, device="cpu",
                                           **({"quantize": "int8"} | kw)))
