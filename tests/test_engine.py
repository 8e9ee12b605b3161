"""The inference engine on the real default model (fp32 on CPU, the exactness reference)."""
from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from factorllm.device import cpu_has_fast_bf16
from server.engine import Engine, EngineConfig, EngineRequest, SamplingParams, padding_groups

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "Photosynthesis is the process by which"]


def run(coro):
    return asyncio.run(coro)


async def collect(engine: Engine, rid: str, ids: list[int], params: SamplingParams) -> dict:
    out = {"ids": [], "text": "", "logprobs": [], "prompt_logprobs": None, "finish": None, "incs": 0}
    async for inc in engine.submit(EngineRequest(rid, ids, params)):
        out["ids"] += inc.token_ids
        out["text"] += inc.text
        out["logprobs"] += inc.logprobs
        out["incs"] += 1
        if inc.prompt_logprobs is not None:
            out["prompt_logprobs"] = inc.prompt_logprobs
        out["finish"], out["routing"], out["last"] = inc.finish_reason, inc.routing, inc
    return out


def make_engine(loaded, **kw) -> Engine:
    cfg = dict(max_num_seqs=8, max_model_len=512, dtype="float32", device="cpu")
    cfg.update(kw)
    engine = Engine(loaded, EngineConfig(**cfg))
    run(engine.start())
    return engine


@pytest.fixture(scope="module")
def engine(default_model):
    engine = make_engine(default_model)  # fp32 on CPU: the exactness reference
    yield engine
    run(engine.stop())


def encode(loaded, text: str) -> list[int]:
    return loaded.tokenizer(text)["input_ids"]


def chat(loaded, text: str) -> list[int]:
    return loaded.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=True, return_dict=True)["input_ids"]


def test_greedy_matches_hf_generate(engine, default_model):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(default_model.path, dtype=torch.float32).eval()
    prompts = [encode(default_model, p) for p in PROMPTS[:3]]

    async def all_():
        return await asyncio.gather(*[collect(engine, f"hf{i}", p, SamplingParams(max_tokens=64, temperature=0))
                                      for i, p in enumerate(prompts)])
    ours = run(all_())
    for p, got in zip(prompts, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=64,
                              pad_token_id=default_model.tokenizer.eos_token_id)[0, len(p):].tolist()
        assert got["ids"] == ref  # both stop after EOS or at 64 tokens
        assert got["finish"] == "length" or got["ids"][-1] in engine.eos_ids
        assert got["text"] == default_model.tokenizer.decode(got["ids"], skip_special_tokens=True)


def test_same_tokens_alone_and_batched(engine, default_model):
    texts = PROMPTS + ["Hi", "A long list of fruits: apples, pears, plums, cherries, and also many kinds of",
                       "1, 2, 3,", "Dear Sir or Madam, I am writing to"]
    prompts = [encode(default_model, t) for t in texts]
    params = [SamplingParams(max_tokens=20, temperature=0) if i % 2 == 0 else
              SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, top_k=50, seed=100 + i)
              for i in range(8)]
    alone = [run(collect(engine, f"a{i}", p, params[i])) for i, p in enumerate(prompts)]

    async def together():
        return await asyncio.gather(*[collect(engine, f"b{i}", p, params[i]) for i, p in enumerate(prompts)])
    batched = run(together())
    for a, b in zip(alone, batched):
        assert a["ids"] == b["ids"] and a["text"] == b["text"]
    assert engine.num_free_slots == engine.max_num_seqs


def test_prefix_cache_skips_a_finished_conversation(engine, default_model):
    """A chat's next turn (the earlier prompt + answer + a new message) reuses the keys and values
    its first turn left in a free slot, also after compaction moved them, and gets exactly the
    tokens and log-probabilities of an engine without prefix caching."""
    turns = [chat(default_model, q) for q in ("Name a French city.", "What is 2 + 2?", "Say hello.")]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (6, 20, 30)]

    async def first_turns():  # the shortest leaves slot 0 first: compaction swaps it to the top
        return await asyncio.gather(*[collect(engine, f"pc{i}", t, p) for i, (t, p) in enumerate(zip(turns, params))])
    swaps, swap = [], engine.scheduler.swap_slots
    engine.scheduler.swap_slots = lambda *a: (swaps.append(a), swap(*a))
    try:
        answers = run(first_turns())
        follow = turns[0] + answers[0]["ids"] + encode(default_model, " And a German one?")
        later = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)
        hits, queries = engine.scheduler.prefix_hits, engine.scheduler.prefix_queries
        got = run(collect(engine, "pc-next", follow, later))
    finally:
        engine.scheduler.swap_slots = swap
    assert len(swaps) >= 2  # compaction kept the first turn, admission brought it back
    assert engine.scheduler.prefix_hits - hits == len(turns[0]) + 5  # all that turn computed
    assert engine.scheduler.prefix_queries - queries == len(follow)
    fresh = make_engine(default_model, prefix_caching=False)
    try:
        ref = run(collect(fresh, "ref", follow, later))
        assert fresh.scheduler.prefix_hits == 0
    finally:
        run(fresh.stop())
    assert got["ids"] == ref["ids"]
    for a, b in zip(got["logprobs"], ref["logprobs"]):
        assert abs(a.logprob - b.logprob) < 1e-3
    # Prompt log-probabilities need every position: no hit.
    hits = engine.scheduler.prefix_hits
    echo = run(collect(engine, "pc-echo", follow, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)))
    assert engine.scheduler.prefix_hits == hits and len(echo["prompt_logprobs"]) == len(follow)


def test_prefill_padding_is_bounded():
    """Short prompts never run padded to a long one's length; no forward pads beyond 2x."""
    chunks = [(f"s{i}", n) for i, n in enumerate([10, 500, 7, 260, 12, 1, 130, 9, 255])]
    groups = padding_groups(chunks)
    assert sorted(c for g in groups for c in g) == sorted(chunks)
    for g in groups:
        longest = max(n for _, n in g)
        assert len(g) * longest <= 2 * sum(n for _, n in g)
    assert [[n for _, n in g] for g in groups] == [[500, 260, 255], [130], [12, 10, 9, 7], [1]]


def test_engine_leaves_the_callers_model_as_loaded(engine, default_model, sample_tokens):
    """The engine prepacks its linears (CPU) on its own copy of the model: the caller's modules
    stay plain and compute what they computed, while an fp32 copy shares the caller's weights
    instead of duplicating them."""
    from factorllm.model import KernelLinear
    assert isinstance(engine.model.lm_head, KernelLinear)
    assert type(default_model.model.lm_head) is torch.nn.Linear
    assert not any(isinstance(m, KernelLinear) for m in default_model.model.modules())
    engine_layer, caller_layer = engine.model.layers[0].self_attn, default_model.model.layers[0].self_attn
    assert engine_layer is not caller_layer
    assert engine_layer.qkv_proj.weight.data_ptr() == caller_layer.qkv_proj.weight.data_ptr()
    with torch.inference_mode():
        torch.testing.assert_close(engine.model(sample_tokens), default_model.model(sample_tokens), rtol=1e-4, atol=1e-3)


def test_abort_frees_slot_at_once(engine, default_model):
    ids = encode(default_model, PROMPTS[0])

    async def go():
        it = engine.submit(EngineRequest("long", ids, SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)))
        first = await it.__anext__()
        assert first.finish_reason is None and engine.num_free_slots == engine.max_num_seqs - 1
        engine.abort("long")
        assert engine.num_free_slots == engine.max_num_seqs and engine.num_running == 0
        rest = [inc async for inc in it]
        assert rest[-1].finish_reason == "abort"
        # Many submit/abort cycles at random points, with other requests running alongside.
        keep = [asyncio.ensure_future(collect(engine, f"k{i}", ids, SamplingParams(max_tokens=12, temperature=0)))
                for i in range(2)]
        gen = torch.Generator().manual_seed(0)
        for c in range(40):
            rid = f"c{c}"
            it = engine.submit(EngineRequest(rid, ids, SamplingParams(max_tokens=50, temperature=0)))
            for _ in range(int(torch.randint(0, 3, (1,), generator=gen))):
                await it.__anext__()
            engine.abort(rid)
            assert [inc async for inc in it][-1].finish_reason == "abort"
        # Closing an iterator early aborts too (a client that went away).
        it = engine.submit(EngineRequest("closed", ids, SamplingParams(max_tokens=50, temperature=0)))
        await it.__anext__()
        await it.aclose()
        done = await asyncio.gather(*keep)
        return done
    done = run(go())
    assert all(d["finish"] == "length" and len(d["ids"]) == 12 for d in done)
    assert done[0]["ids"] == done[1]["ids"]
    assert engine.num_free_slots == engine.max_num_seqs
    assert engine.num_running == 0 and engine.num_waiting == 0 and not engine.seqs
    assert engine.scheduler.owner == [None] * engine.max_num_seqs


def test_factorized_k_equals_n_matches_dense(engine, default_model, fresh_default_model):
    from factorllm.factor_config import FactorConfig
    from factorllm.factorize import factorize
    factor = FactorConfig(experts=8, top_k=8, partition="contiguous", router_init="random")
    factorize(fresh_default_model.model, factor, None)
    fresh_default_model.factor = factor
    moe_engine = make_engine(fresh_default_model, max_num_seqs=4)
    prompts = [encode(default_model, p) for p in PROMPTS[:2]]
    try:
        for i, p in enumerate(prompts):
            params = SamplingParams(max_tokens=24, temperature=0)
            dense = run(collect(engine, f"d{i}", p, params))
            moe = run(collect(moe_engine, f"m{i}", p, SamplingParams(max_tokens=24, temperature=0, return_routing=True)))
            assert moe["ids"] == dense["ids"]
            routing = moe["routing"]
            fed = len(p) + len(moe["ids"]) - 1  # the last sampled token never runs through the model
            assert len(routing) == 30 and all(len(r) == 8 for r in routing)
            assert all(sum(r) == fed * 8 for r in routing)
    finally:
        run(moe_engine.stop())


def test_bf16_engine_keeps_routers_fp32(default_model, fresh_default_model, sample_tokens):
    """A bf16 engine keeps each MoE router in fp32: its experts are chosen as in the fp32 model
    (bf16 hidden states aside), and a factorized bf16 model generates with them."""
    from factorllm.factor_config import FactorConfig
    from factorllm.factorize import factorize
    factor = FactorConfig(experts=8, top_k=2, partition="contiguous", router_init="random")
    factorize(fresh_default_model.model, factor, None)
    fresh_default_model.factor = factor
    moe = fresh_default_model.model.layers[3].mlp
    x = default_model.model.model.embed_tokens(sample_tokens).reshape(-1, 576) * 40  # hidden-state-like scale
    with torch.inference_mode():
        _, idx32, _ = moe.route(x)
    bf16 = make_engine(fresh_default_model, max_num_seqs=2, max_model_len=128, dtype="bfloat16")
    try:
        assert all(m.router.weight.dtype == torch.float32 for m in bf16.moes)
        moe = bf16.model.layers[3].mlp
        assert moe.experts_gate.dtype == torch.bfloat16
        with torch.inference_mode():
            _, idx, _ = moe.route(x.bfloat16())
        same = (idx.sort(-1).values == idx32.sort(-1).values).all(-1).float().mean().item()
        assert same >= 0.9, same
        out = run(collect(bf16, "r", encode(default_model, PROMPTS[0]), SamplingParams(max_tokens=8, temperature=0)))
        assert len(out["ids"]) == 8 and out["finish"] == "length"
    finally:
        run(bf16.stop())


def test_step_stats_for_metrics(default_model, fresh_default_model):
    from factorllm.factor_config import FactorConfig
    from factorllm.factorize import factorize
    factor = FactorConfig(experts=8, top_k=2, partition="contiguous", router_init="random")
    factorize(fresh_default_model.model, factor, None)
    eng = make_engine(fresh_default_model, max_num_seqs=2)
    seen = []
    eng.step_listeners.append(seen.append)
    try:
        out = run(collect(eng, "s", encode(default_model, PROMPTS[0]), SamplingParams(max_tokens=5, temperature=0)))
    finally:
        run(eng.stop())
    assert len(out["ids"]) == 5
    assert sum(s.num_prefill_tokens for s in seen) == len(encode(default_model, PROMPTS[0]))
    assert sum(s.num_decode_tokens for s in seen) == 4
    for s in seen:
        tokens = s.num_prefill_tokens + s.num_decode_tokens
        assert s.expert_tokens.shape == (30, 8) and (s.expert_tokens.sum(1) == tokens * 2).all()
        assert s.router_entropy.shape == (30,) and s.step_time > 0
        assert ((s.router_entropy > 0) & (s.router_entropy <= tokens * math.log(8) + 1e-6)).all()
        # Per-expert seconds per layer where the looped path ran (None for layers that did not).
        assert s.expert_seconds is None or len(s.expert_seconds) == 30
    # Experts are timed on the first decode-only step and every 16th after it, never in a prefill.
    assert [s.expert_seconds is not None for s in seen] == [False, True, False, False, False]
    # Two prompts of different lengths prefill in one padded forward: the padding is not counted.
    seen.clear()
    eng = make_engine(fresh_default_model, max_num_seqs=2)
    eng.step_listeners.append(seen.append)
    prompts = [encode(default_model, PROMPTS[0]), encode(default_model, PROMPTS[1])]
    assert len(prompts[0]) != len(prompts[1])

    async def both():
        return await asyncio.gather(*(collect(eng, f"p{i}", ids, SamplingParams(max_tokens=3, temperature=0))
                                      for i, ids in enumerate(prompts)))
    try:
        run(both())
    finally:
        run(eng.stop())
    assert any(s.num_prefill_tokens == sum(map(len, prompts)) for s in seen)
    for s in seen:
        assert (s.expert_tokens.sum(1) == (s.num_prefill_tokens + s.num_decode_tokens) * 2).all()


def test_stop_conditions(engine, default_model):
    ids = encode(default_model, PROMPTS[2])
    base = run(collect(engine, "base", ids, SamplingParams(max_tokens=30, temperature=0)))
    assert base["finish"] == "length" and len(base["ids"]) == 30
    text = base["text"]
    stop = text[len(text) // 2:len(text) // 2 + 4]
    cut = run(collect(engine, "cut", ids, SamplingParams(max_tokens=30, temperature=0, stop=["zzzq", stop])))
    assert cut["finish"] == "stop" and cut["text"] == text[:text.index(stop)]
    assert cut["ids"] == base["ids"][:len(cut["ids"])]
    # Stop token ids: stop on the 5th generated token; it is reported but not in the text.
    tid = base["ids"][4]
    st = run(collect(engine, "st", ids, SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[tid])))
    first = base["ids"].index(tid)
    assert st["finish"] == "stop" and st["ids"] == base["ids"][:first + 1]

    # EOS: an instruct answer ends with EOS; ignore_eos and min_tokens run past it.
    q = chat(default_model, "What is 2+2? Answer with one word.")
    short = run(collect(engine, "eos", q, SamplingParams(max_tokens=40, temperature=0)))
    assert short["finish"] == "stop" and short["ids"][-1] in engine.eos_ids
    n = len(short["ids"])
    ign = run(collect(engine, "ign", q, SamplingParams(max_tokens=n + 6, temperature=0, ignore_eos=True)))
    assert ign["finish"] == "length" and len(ign["ids"]) == n + 6 and ign["ids"][:n] == short["ids"]
    mn = run(collect(engine, "min", q, SamplingParams(max_tokens=40, temperature=0, min_tokens=n + 3)))
    assert len(mn["ids"]) >= n + 3 and not set(mn["ids"][:n + 2]) & engine.eos_ids


def test_logprobs_and_prompt_logprobs(engine, default_model):
    ids = encode(default_model, PROMPTS[0])
    out = run(collect(engine, "lp", ids, SamplingParams(max_tokens=6, temperature=0, logprobs=3, prompt_logprobs=2)))
    assert len(out["logprobs"]) == len(out["ids"]) == 6
    for tid, lp in zip(out["ids"], out["logprobs"]):
        assert lp.token_id == tid and len(lp.top) == 3 and lp.logprob <= 0
        assert lp.top[0][0] == tid and abs(lp.top[0][2] - lp.logprob) < 1e-5  # greedy: the top token
        assert isinstance(lp.token, str)
    pl = out["prompt_logprobs"]
    assert len(pl) == len(ids) and pl[0] is None
    assert [p.token_id for p in pl[1:]] == ids[1:] and all(len(p.top) == 2 for p in pl[1:])
    # The prompt's logprobs agree with a plain full forward.
    with torch.no_grad():
        ref = default_model.model(torch.tensor([ids]))[0].float().log_softmax(-1)
    for t in range(1, len(ids)):
        assert abs(pl[t].logprob - ref[t - 1, ids[t]].item()) < 1e-4
    # Seeded sampling with penalties is reproducible.
    p = SamplingParams(max_tokens=10, temperature=1.0, seed=7, presence_penalty=0.5, frequency_penalty=0.5)
    a, b = run(collect(engine, "s1", ids, p)), run(collect(engine, "s2", ids, p))
    assert a["ids"] == b["ids"]


def test_utf8_text_is_whole_characters(engine, default_model):
    ids = encode(default_model, "Translate to Chinese and add emojis: I love green tea 🍵 ->")
    out = run(collect(engine, "u", ids, SamplingParams(max_tokens=24, temperature=0.7, seed=3)))
    assert "\ufffd" not in out["text"]
    assert out["text"] == default_model.tokenizer.decode(out["ids"], skip_special_tokens=True)


def test_invalid_requests(engine):
    async def go():
        with pytest.raises(ValueError, match="empty"):
            engine.submit(EngineRequest("e", [], SamplingParams()))
        with pytest.raises(ValueError, match="vocabulary"):
            engine.submit(EngineRequest("v", [1, 10**7], SamplingParams()))
        with pytest.raises(ValueError, match="maximum context length"):
            engine.submit(EngineRequest("l", [1] * 500, SamplingParams(max_tokens=100)))
    run(go())


def test_chunked_prefill_next_to_decodes(default_model):
    """A long prompt split into 8-token chunks gives the tokens of an unchunked run, while a
    short request decodes alongside it."""
    eng = make_engine(default_model, max_num_seqs=2, max_num_batched_tokens=8)
    long_ids = encode(default_model, " ".join(PROMPTS) + " In summary,")
    assert len(long_ids) > 24

    async def go():
        short = asyncio.ensure_future(collect(eng, "short", encode(default_model, "Hi"),
                                              SamplingParams(max_tokens=8, temperature=0)))
        await asyncio.sleep(0)
        return await collect(eng, "long", long_ids, SamplingParams(max_tokens=8, temperature=0)), await short
    try:
        chunked, short = run(go())
    finally:
        run(eng.stop())
    whole = make_engine(default_model, max_num_seqs=1)
    try:
        ref = run(collect(whole, "ref", long_ids, SamplingParams(max_tokens=8, temperature=0)))
    finally:
        run(whole.stop())
    assert chunked["ids"] == ref["ids"] and len(short["ids"]) == 8


def test_sampler_top_k_top_p_and_seed():
    from server.sampling import SampleRow, make_generator, sample
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(3, 1)

    def draws(**kw):
        gen = make_generator(5, torch.device("cpu"))
        rows = [SampleRow(temperature=kw.get("t", 1.0), top_p=kw.get("p", 1.0), top_k=kw.get("k", 0), generator=gen)]
        return {sample(logits[:1].clone(), rows).item() for _ in range(200)}
    assert draws(k=2) == {0, 1}
    assert draws(p=0.5) == {0}             # the top token alone holds ~64% of the mass
    assert draws(k=3, p=0.75) == {0, 1}    # top-k, renormalized, then top-p
    assert draws(t=0) == {0}
    assert len(draws(t=5.0)) == 5
    # Each row draws from its own generator: a row's draw does not depend on its neighbours.
    rows = [SampleRow(1.0, 1.0, 0, make_generator(s, torch.device("cpu"))) for s in (1, 2, 3)]
    together = sample(logits.clone(), rows).tolist()
    alone = [sample(logits[:1].clone(), [SampleRow(1.0, 1.0, 0, make_generator(s, torch.device("cpu")))]).item()
             for s in (1, 2, 3)]
    assert together == alone


def test_sampler_logit_bias_repetition_penalty_min_p():
    from server.sampling import SampleRow, adjust_logits, make_generator, sample
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, -1.0]])

    def row(**kw):
        return SampleRow(temperature=kw.pop("t", 1.0), top_p=1.0, top_k=0, generator=make_generator(3, torch.device("cpu")), **kw)
    assert sample(logits.clone(), [row(t=0.0, logit_bias={4: 100.0})]).item() == 4
    assert sample(logits.clone(), [row(t=0.0, logit_bias={0: -100.0})]).item() == 1
    # Repetition: positive logits divided, negative ones multiplied, prompt and output alike.
    adjusted = adjust_logits(logits.clone(), [row(repetition_penalty=2.0, prompt_ids=[0, 0], output_ids=[4])])
    assert adjusted.tolist() == [[2.0, 3.0, 2.0, 1.0, -2.0]]
    # min_p keeps tokens at least min_p x as likely as the top one: e^-1 = 0.37 passes 0.3, e^-2 does not.
    r = row(min_p=0.3)
    assert {sample(logits.clone(), [r]).item() for _ in range(300)} == {0, 1}
    r = row(min_p=1.0, t=2.0)
    assert {sample(logits.clone(), [r]).item() for _ in range(50)} == {0}
    assert not row().edits_logits and row(min_p=0.1).edits_logits and not row(t=0.0, min_p=0.1).edits_logits


def test_repetition_penalty_and_logit_bias_in_the_engine(engine, default_model):
    ids = encode(default_model, "The cat sat on the mat. The cat sat on the")
    plain = run(collect(engine, "rp0", ids, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)))
    assert set(plain["ids"]) & set(ids)  # greedy repeats the prompt's words
    strict = run(collect(engine, "rp1", ids, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                           repetition_penalty=100.0)))
    assert not set(strict["ids"]) & set(ids) and len(set(strict["ids"])) == 12
    forced = run(collect(engine, "lb", ids, SamplingParams(max_tokens=4, temperature=0.7, seed=1, ignore_eos=True,
                                                          logit_bias={42: 100.0}, logprobs=0)))
    assert forced["ids"] == [42] * 4
    # Logprobs stay those of the model, before the bias.
    assert all(lp.logprob < -1 for lp in forced["logprobs"])


def test_top_p_from_candidates_equals_full_sort():
    """The candidate shortcut draws what sorting the whole vocabulary draws, and a nucleus wider
    than the candidates still reaches every token in it."""
    from server.sampling import CANDIDATES, SampleRow, _sample_candidates, _sample_whole, make_generator, sample
    torch.manual_seed(0)
    logits = torch.randn(64, 49152) * 4
    rows = [SampleRow(temperature=0.8, top_p=0.9, top_k=(0, 40, CANDIDATES[0])[i % 3], generator=None) for i in range(64)]
    u = {i: torch.rand(()) for i in range(64)}
    idx = list(range(64))
    picked, covered = _sample_candidates(logits, rows, idx, u, CANDIDATES[0])
    assert all(covered)
    assert picked == _sample_whole(logits, rows, idx, u, sort=True).tolist()
    flat = torch.zeros(1, 1000)
    gen = make_generator(1, torch.device("cpu"))
    draws = {sample(flat.clone(), [SampleRow(1.0, 0.9, 0, gen)]).item() for _ in range(3000)}
    assert len(draws) > 2 * CANDIDATES[0] and max(draws) < 1000


def test_detokenizer_holds_back_partial_stop_strings(default_model):
    from server.detokenizer import IncrementalDetokenizer
    tok = default_model.tokenizer
    ids = tok(" Hello world, this is the end. More text")["input_ids"]
    d = IncrementalDetokenizer(tok, [], stop=["the end"])
    out, matched = "", None
    for t in ids:
        piece, matched = d.add(t)
        out += piece
        assert not any(out.endswith("the end"[:n]) for n in range(1, 7))  # never part of a stop string
        if matched:
            break
    assert matched == "the end" and out == " Hello world, this is "
    # Multi-byte characters split over tokens come out whole.
    ids = tok("tea 🍵 and 日本語")["input_ids"]
    d = IncrementalDetokenizer(tok, [])
    pieces = [d.add(t)[0] for t in ids]
    assert all("\ufffd" not in p for p in pieces) and "".join(pieces) + d.flush() == "tea 🍵 and 日本語"


@pytest.mark.skipif(not cpu_has_fast_bf16(), reason="oneDNN's prepacked bf16 linears need AVX512-BF16 or AVX-NE-CONVERT")
@pytest.mark.parametrize("gate", ["sum", "weighted"])
def test_packed_masked_path_matches_plain(default_model, gate):
    """The engine's prepacked bf16 paths (masked, shared groups folded in as always-on experts and
    the router's rows too; each chosen expert through its own kernels) compute the layer the plain
    paths compute."""
    from factorllm.factor_config import FactorConfig
    from factorllm.factorize import factorize_layer
    from factorllm.kernels import prepacked
    dense = default_model.model.layers[5].mlp
    factor = FactorConfig(experts=28, shared_experts=4, top_k=4, partition="contiguous", router_init="random", gate=gate)
    factor.validate(dense.gate_proj.out_features)
    moe = factorize_layer(dense, torch.empty(0, 576), factor, 5).eval()
    x = torch.randn(12, 576, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        _, idx, w = moe.route(x)
        exact = moe.run_path("grouped", x, idx, w)
        moe.to(torch.bfloat16)
        x, w = x.to(torch.bfloat16), None if w is None else w.to(torch.bfloat16)
        outs = {"grouped": moe.run_path("grouped", x, idx, w)}
        moe.pack(lambda weight: prepacked(weight, 16))
        assert moe.shared_packed and moe.router_packed
        outs["packed masked"] = moe.run_path("masked", x, idx, w)
        # Routed in the masked path's own matmul (bf16 router rows): the fp32 router's choices.
        routed = moe.token_counts.sum().item()
        outs["packed masked, routed in its matmul"] = moe.routed("masked", x)
        assert torch.equal(moe.pending_stats[-1][1].sort(-1).values, idx.sort(-1).values)
        assert moe.token_counts.sum().item() == routed + len(x) * moe.top_k  # folds pending_stats
        outs["kernels"] = moe.run_path("kernels", x, idx, w)
        one = [moe.run_path("kernels", x[t:t + 1], idx[t:t + 1], None if w is None else w[t:t + 1])
               for t in range(len(x))]
        outs["kernels, one token at a time"] = torch.cat(one)
        moe.use_plan([(1, "masked")])
        assert moe.expert_kernels is None and "kernels" not in moe.available_paths
        moe.pack(None)
        outs["masked"] = moe.run_path("masked", x, idx, w)
    for name, out in outs.items():  # bf16 rounding only: ~0.5% relative error
        err = (out.float() - exact).norm() / exact.norm()
        assert err < 0.015, (name, err)


def test_fused_projections_match_and_save_unfused(sample_tokens):
    """The engine fuses q/k/v and gate/up into one matmul each: same logits (fp32), and the
    state_dict still holds exactly the unfused tensors, so a fused model saves as before."""
    from factorllm.loading import load_model
    m = load_model("default").model
    with torch.inference_mode():
        before = m(sample_tokens)
    keys = {k: v.clone() for k, v in m.state_dict().items()}
    m.fuse()
    assert m.layers[0].self_attn.qkv_proj is not None and m.layers[0].mlp.gate_up_proj is not None
    with torch.inference_mode():
        after = m(sample_tokens)
    assert (before - after).abs().max().item() <= 1e-4
    state = m.state_dict()
    assert set(state) == set(keys) and all(torch.equal(state[k], keys[k]) for k in keys)
    state["model.layers.0.self_attn.q_proj.weight"] = torch.zeros_like(state["model.layers.0.self_attn.q_proj.weight"])
    m.load_state_dict(state)  # strict: the fused weights are not expected, and loading the parts fills them
    q_rows = m.layers[0].self_attn.q_proj.out_features
    assert not m.layers[0].self_attn.qkv_proj.weight[:q_rows].any() and m.layers[0].self_attn.qkv_proj.weight[q_rows:].any()


@pytest.mark.parametrize("path,fused", [("matmuls", False), ("sdpa", False), ("native", False), ("native", True)])
def test_bf16_cached_decode_matches_full_forward(fresh_default_model, sample_tokens, path, fused):
    """CPU bf16 decoding attends by any kernel `tune_decode_attention` picks from (two batched
    matmuls, SDPA's flash kernel, or the C kernel, which must build here, and which rotates q and
    k itself when they come from the fused projection) over head-major views of the cache: rows
    at different positions (a mask), in adjacent slots (views) or not (a gather), give the logits
    of a full bf16 forward over each row's whole text."""
    from factorllm.kv_cache import CacheBatch, KVCache
    from factorllm import native_attention
    assert path != "native" or native_attention.load(64, 3) is not None
    m = fresh_default_model.model.to(torch.bfloat16)
    if fused:
        m.fuse()
    lengths = [9, 17, 23, 14]  # tokens already cached per row; the next one is decoded
    for layer in m.layers:
        layer.self_attn.decode_plan = [(len(lengths), path)]
    with torch.inference_mode():
        reference = torch.stack([m(sample_tokens[b:b + 1, :n + 1])[0, n] for b, n in enumerate(lengths)])
        for slots in ([2, 3, 4, 5], [6, 1, 4, 0]):
            cache = KVCache.for_model(m, num_slots=8, max_len=64)
            for b, n in enumerate(lengths):  # prefill each row alone
                m(sample_tokens[b:b + 1, :n], cache=cache, batch=CacheBatch.build([slots[b]], [0], [n], "cpu"))
            batch = CacheBatch.build(slots, lengths, [1] * 4, "cpu")
            assert (batch.slot_range is not None) == (slots == [2, 3, 4, 5])
            step = torch.stack([sample_tokens[b, n] for b, n in enumerate(lengths)])[:, None]
            logits = m(step, cache=cache, batch=batch)[:, 0]
            assert (logits.argmax(-1) == reference.argmax(-1)).all()
            assert ((logits.float() - reference.float()).abs().max() / reference.float().abs().max()) < 0.05  # bf16 rounding: ~0.025


def test_native_decode_refuses_rows_outside_the_cache(fresh_default_model):
    """The C kernel writes keys and values where the batch says: a position or slot beyond the
    cache is an IndexError (as torch's indexed write would be), with nothing written."""
    from factorllm.kv_cache import CacheBatch, KVCache
    from factorllm import native_attention
    assert native_attention.load(64, 3) is not None
    m = fresh_default_model.model.to(torch.bfloat16)
    for layer in m.layers:
        layer.self_attn.decode_plan = [(1, "native")]
    cache = KVCache.for_model(m, num_slots=2, max_len=8)
    for slot, position in ((1, 8), (2, 0)):
        with torch.inference_mode(), pytest.raises(IndexError, match="outside the cache"):
            m(torch.tensor([[5]]), cache=cache, batch=CacheBatch.build([slot], [position], [1], "cpu"))
    assert not cache.k.any() and not cache.v.any()


def test_decode_attention_is_tuned_per_row_count(fresh_default_model):
    """The tuner times every kernel at 1, 2, 4, ... rows (contexts cut to the cache's rows) and
    gives every layer the plan; larger batches take the largest count's kernel."""
    from factorllm.kv_cache import KVCache
    from factorllm.model import decode_attention_path
    m = fresh_default_model.model.to(torch.bfloat16)
    cache = KVCache.for_model(m, num_slots=6, max_len=64)
    plan = m.tune_decode_attention(cache, 6, contexts=(16, 200), repeats=2)
    assert [n for n, _ in plan] == [1, 2, 4, 6] and {p for _, p in plan} <= {"matmuls", "sdpa", "native"}
    assert all(layer.self_attn.decode_plan is plan for layer in m.layers)
    assert decode_attention_path(plan, 5) == plan[3][1] and decode_attention_path(plan, 9) == plan[3][1]
    assert decode_attention_path([], 3) == "matmuls"


def test_native_attention_builds_once_per_cpu_and_steps_aside_without_a_compiler(tmp_path):
    """The C kernel compiles into the cache once (a second process loads it without building);
    where no compiler works, it is not offered (a warning, no error)."""
    code = ("import logging, sys; logging.basicConfig()\n"
            "from factorllm import native_attention as n\n"
            "from factorllm.loading import cache_dir\n"
            "print(n.load(64, 3) is not None, sorted(p.name for p in (cache_dir() / 'kernels').glob('*.so')))")
    runs = {}
    for name, cc in (("first", None), ("again", "false"), ("broken", "false")):
        cache = tmp_path / ("broken" if name == "broken" else "cache")
        env = {**os.environ, "FACTORLLM_CACHE": str(cache)} | ({"CC": cc} if cc else {})
        runs[name] = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert runs[name].returncode == 0, runs[name].stderr[-2000:]
    built = runs["first"].stdout.split(" ", 1)
    assert built[0] == "True" and built[1].strip().startswith("['decode_attention-")
    assert runs["again"].stdout == runs["first"].stdout  # CC=false would fail: it was not needed
    assert runs["broken"].stdout.strip() == "False []"
    assert "native kernel decode_attention unavailable, using torch's" in runs["broken"].stderr


def benchmark(name: str):
    """A script under benchmarks/ as a module (the directory is no package; its scripts import each
    other as run from there)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_decode_profile_benchmark_runs(tmp_path):
    """benchmarks/decode_profile.py on the real model: step times and the op table, as JSON."""
    mod = benchmark("decode_profile")
    out = tmp_path / "profile.json"
    assert mod.main(["--batch", "1", "3", "--steps", "2", "--context", "20", "--max-model-len", "64",
                     "--dtype", "float32", "--shapes", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 3] and all(r["step_ms_median"] > 0 for r in rows)
    assert any("linear" in o["op"] or "addmm" in o["op"] or "mm" in o["op"] for o in rows[0]["top_ops"])
    # --shapes: the rows' input shapes name the batch (3 rows of the 576-wide hidden state)
    assert any("[3, 576]" in o["op"] or "[3, 1, 576]" in o["op"] for o in rows[1]["top_ops"])


def test_decode_attention_benchmark_runs(tmp_path):
    """benchmarks/decode_attention.py: whole bf16 decode steps per attention kernel (the C kernel
    among them) and the tuned plan, with speed-ups over the matmuls, as JSON."""
    mod = benchmark("decode_attention")
    out = tmp_path / "attention.json"
    assert mod.main(["--cases", "1x20", "3x40", "--repeats", "1", "--steps", "1", "--max-model-len", "64",
                     "--dtype", "bfloat16", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["kernels"] == ["matmuls", "sdpa", "native", "tuned"]
    assert [(c["rows"], c["context"]) for c in report["cases"]] == [(1, 20), (3, 40)]
    for case in report["cases"]:
        assert all(case["step_ms"][k] > 0 for k in report["kernels"])
        assert case["speedup_over_matmuls"]["matmuls"] == 1.0


def test_prefix_cache_benchmark_runs(tmp_path):
    """benchmarks/prefix_cache.py: a next turn timed with and without prefix caching, as JSON."""
    mod = benchmark("prefix_cache")
    out = tmp_path / "pc.json"
    assert mod.main(["--history", "48", "--repeats", "1", "--dtype", "float32", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["history_tokens"] == 48 and row["hit_tokens_so_far"] >= 48 and row["ttft_cached_ms"] > 0


def test_sampler_benchmark_runs(tmp_path):
    """benchmarks/sampler.py on real logits: both methods timed for every setting, as JSON."""
    mod = benchmark("sampler")
    out = tmp_path / "sampler.json"
    assert mod.main(["--rows", "1", "3", "--repeats", "2", "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["rows"] for r in results] == [1, 1, 3, 3]
    assert all(r["ms"]["full_sort"] > 0 and r["ms"]["sample"] > 0 for r in results)
