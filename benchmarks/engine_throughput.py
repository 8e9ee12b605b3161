"""Offline decode throughput (output tokens/s) of the engine vs Hugging Face `generate`.

For 1, 8 and 32 concurrent sequences: HF `generate` (dense, one static batch, greedy, fp32), this
engine on the dense model (fp32 and the platform's fast dtype) and on factorized models at ~50%
("quality" preset) and ~25% ("fast" preset) active FFN. Every sequence generates exactly
--tokens tokens (EOS ignored); time covers prefill and decode. Each cell is the median of
--repeats runs; configurations are interleaved per repeat so that load from other processes
hits them alike. Ratios are within this one run. Decoding is greedy; `--sampling nucleus`
samples at temperature 1 with top_p 0.95 instead (seeded, HF alike), which adds the sampler's cost.
Prefill (time to first token) is measured apart: one request with a --prompt-tokens prompt and a
single output token (median of 3 per repeat), reported as prompt tokens/s; long prompts are where the factorized FFN's
saved FLOPs show (decode steps of many sequences touch nearly every expert, see docs/results.md).

    python benchmarks/engine_throughput.py [--quick] [--sampling greedy|nucleus] [--prompt-tokens 512] [--out results.json]
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from factorllm.device import off_main_thread  # noqa: E402
from factorllm.loading import load_model  # noqa: E402
from factorllm.pipeline import cached_factorized, factor_config_from  # noqa: E402
from server.engine import Engine, EngineConfig, EngineRequest, SamplingParams  # noqa: E402

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "Photosynthesis is the process by which green plants", "The history of the Roman Empire",
           "import numpy as np\nimport", "Dear Sir or Madam, I am writing to", "The main reason why"]


def prompts_for(tokenizer, n: int) -> list[list[int]]:
    return [tokenizer(PROMPTS[i % len(PROMPTS)])["input_ids"] for i in range(n)]


def long_prompt(tokenizer, length: int) -> list[int]:
    ids = tokenizer(" ".join(PROMPTS * (1 + length // 40)))["input_ids"]
    assert len(ids) >= length, "PROMPTS too short for this --prompt-tokens"
    return ids[:length]


@torch.inference_mode()
def hf_prefill(hf, ids: list[int]) -> float:
    x = torch.tensor([ids])
    t0 = time.perf_counter()
    hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=1, do_sample=False, pad_token_id=0)
    return len(ids) / (time.perf_counter() - t0)


async def engine_prefill_async(engine: Engine, ids: list[int]) -> float:
    t0 = time.perf_counter()
    async for _ in engine.submit(EngineRequest(f"p{time.monotonic_ns()}", ids,
                                               SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))):
        pass
    return len(ids) / (time.perf_counter() - t0)


@torch.inference_mode()
def hf_run(hf, tokenizer, n: int, tokens: int, nucleus: bool) -> float:
    ids = prompts_for(tokenizer, n)
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    x = torch.tensor([[pad] * (width - len(p)) + p for p in ids])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
    sampling = dict(do_sample=True, temperature=1.0, top_p=0.95, top_k=0) if nucleus else dict(do_sample=False)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    out = hf.generate(x, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=pad,
                      **sampling)
    dt = time.perf_counter() - t0
    assert out.shape[1] - width == tokens
    return n * tokens / dt


async def engine_run_async(engine: Engine, n: int, tokens: int, nucleus: bool) -> float:
    ids = prompts_for(engine.tokenizer, n)

    def params(i: int) -> SamplingParams:
        if nucleus:
            return SamplingParams(max_tokens=tokens, temperature=1.0, top_p=0.95, seed=i, ignore_eos=True)
        return SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)

    async def one(i):
        count = 0
        async for inc in engine.submit(EngineRequest(f"b{time.monotonic_ns()}-{i}", ids[i], params(i))):
            count += len(inc.token_ids)
        return count
    t0 = time.perf_counter()
    counts = await asyncio.gather(*[one(i) for i in range(n)])
    dt = time.perf_counter() - t0
    assert sum(counts) == n * tokens
    return n * tokens / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer tokens and repeats")
    ap.add_argument("--tokens", type=int, default=None, help="generated tokens per sequence (default 64, quick 32)")
    ap.add_argument("--repeats", type=int, default=None, help="runs per cell (default 3, quick 1)")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--sampling", choices=("greedy", "nucleus"), default="greedy")
    ap.add_argument("--prompt-tokens", type=int, default=512, help="prompt length of the prefill column (0: none)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="dtype of the engine's fast rows (auto: see server/engine.py)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--int8", action="store_true", help="also run each engine row with int8 weights (--quantize int8)")
    ap.add_argument("--skip", default="", help="comma list of rows to skip: hf,dense-fp32,dense,quality,fast")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    tokens = args.tokens or (32 if args.quick else 64)
    repeats = args.repeats or (1 if args.quick else 3)
    conc = [int(c) for c in args.concurrency.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    if args.threads:
        torch.set_num_threads(args.threads)
    max_len = max(64 + tokens, args.prompt_tokens + 1)
    nucleus = args.sampling == "nucleus"

    # Every torch set-up (and HF generate) runs on a short-lived thread, and only the engine being
    # measured has a step thread, so that it is the only OpenMP team while it runs, as in a server
    # (see factorllm.device.off_main_thread: with several teams a step measured ~1.5x slower).
    dense = off_main_thread(lambda: load_model("default"))
    systems = {}  # name -> (callable(n) -> tok/s, dtype, engine or None)
    loop = asyncio.new_event_loop()

    long_ids = long_prompt(dense.tokenizer, args.prompt_tokens) if args.prompt_tokens else None
    prefill = {}  # name -> callable() -> prompt tokens/s

    def add_engine(name, loaded, dtype):
        quantize = ["none"] + (["int8"] if args.int8 else [])
        for q in quantize:
            eng = off_main_thread(lambda: Engine(loaded, EngineConfig(
                max_num_seqs=max(conc), max_model_len=max_len, max_num_batched_tokens=max(2048, args.prompt_tokens),
                device=args.device, dtype=dtype, quantize=q,
                prefix_caching=False)))  # the same prompts run again each repeat: compute them every time
            row = name if q == "none" else f"{name}-{q}"
            systems[row] = (lambda n, e=eng: loop.run_until_complete(engine_run_async(e, n, tokens, nucleus)),
                            str(eng.dtype) + (" + int8 weights" if q == "int8" else ""), eng)
            prefill[row] = lambda e=eng: loop.run_until_complete(engine_prefill_async(e, long_ids))

    if "hf" not in skip:
        from transformers import AutoModelForCausalLM
        hf = off_main_thread(lambda: AutoModelForCausalLM.from_pretrained(dense.path, dtype=torch.float32).eval())
        systems["hf-generate"] = (lambda n: off_main_thread(lambda: hf_run(hf, dense.tokenizer, n, tokens, nucleus)),
                                  "torch.float32", None)
        prefill["hf-generate"] = lambda: off_main_thread(lambda: hf_prefill(hf, long_ids))
    if "dense-fp32" not in skip:
        add_engine("engine-dense-fp32", off_main_thread(lambda: load_model("default")), "float32")
    if "dense" not in skip:
        add_engine("engine-dense", off_main_thread(lambda: load_model("default")), args.dtype)
    for preset in ("quality", "fast"):
        if preset not in skip:
            loaded = off_main_thread(lambda: cached_factorized(None, factor_config_from(preset)))
            frac = loaded.factor.active_ffn_fraction(loaded.model.config.num_hidden_layers)
            add_engine(f"engine-{preset}-{frac:.0%}ffn", loaded, args.dtype)

    cols = conc + (["prefill"] if long_ids else [])
    results = {name: {n: [] for n in cols} for name in systems}
    for r in range(repeats):
        for name, (fn, _, eng) in systems.items():
            if eng is not None:
                loop.run_until_complete(eng.start())  # warm-up: dispatch tuning, profile run
            fn(2)
            for n in conc:
                gc.collect()
                results[name][n].append(fn(n))
                print(f"repeat {r + 1}/{repeats}  n={n:<3} {name:<26} {results[name][n][-1]:8.1f} tok/s", flush=True)
            if long_ids:
                prefill[name]()  # warm-up at this length
                results[name]["prefill"].append(statistics.median(prefill[name]() for _ in range(3)))
                print(f"repeat {r + 1}/{repeats}  prefill {name:<26} {results[name]['prefill'][-1]:8.1f} prompt tok/s", flush=True)
            if eng is not None:
                loop.run_until_complete(eng.stop())
    med = {name: {n: statistics.median(v) for n, v in cells.items()} for name, cells in results.items()}

    # Ratio columns: against HF generate and against the dense engine, where they ran.
    refs = [(label, ref) for label, ref in (("xHF", "hf-generate"), ("xDense", "engine-dense")) if ref in med]
    device = next((str(e.device) for _, _, e in systems.values() if e is not None), "cpu")
    print(f"\noutput tokens/s, median of {repeats}; {tokens} tokens per sequence, {args.sampling}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {device}"
          + (f"; prefill: prompt tokens/s of one {args.prompt_tokens}-token prompt" if long_ids else ""))
    label = {n: f"n={n}" for n in conc} | {"prefill": "prefill"}
    head = f"{'system':<26} {'dtype':<9}" + "".join(f" {label[n]:>9}" for n in cols)
    head += "".join(f" {f'{ref_label}@{label[n]}':>14}" for ref_label, _ in refs for n in cols)
    print(head)
    for name in med:
        line = f"{name:<26} {systems[name][1].replace('torch.', ''):<9}" + "".join(f" {med[name][n]:9.1f}" for n in cols)
        line += "".join(f" {med[name][n] / med[ref][n]:14.2f}" for _, ref in refs for n in cols)
        print(line)
    if args.out:
        out = {"tokens_per_sequence": tokens, "sampling": args.sampling, "repeats": repeats, "concurrency": conc,
               "prompt_tokens": args.prompt_tokens,
               "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
               "device": device,
               "systems": {name: {"dtype": systems[name][1], "tok_s": {str(n): med[name][n] for n in cols},
                                  "runs": {str(n): results[name][n] for n in cols}} for name in med}}
        Path(args.out).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
