"""Throughput with metrics on vs off, in one run (issue: observability, target <= 3% cost).

"off": no step listener (the engine then collects no routing statistics at all) and no per-request
observation. "on": what `factorllm serve --expert-metrics per-expert` does: the engine collects
per-layer/expert token counts, router entropy and expert timings every step, `ExpertStats.on_step`
accumulates them, every increment goes through `SequenceTimer` (TTFT, ITL, e2e, queue, tokens),
and /metrics is rendered once per repeat (as a scrape would).

The modes alternate (off, on, off, on, ...) so that drift on a shared machine hits both; the
median of the repeats is reported.

    python benchmarks/metrics_overhead.py [--preset quality] [--concurrency 16] [--tokens 64] [--repeats 5]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from factorllm.pipeline import cached_factorized, factor_config_from  # noqa: E402
from server.engine import Engine, EngineConfig, EngineRequest, SamplingParams  # noqa: E402
from server.metrics import SequenceTimer, ServerMetrics  # noqa: E402


async def workload(engine: Engine, prompts: list[list[int]], tokens: int, metrics: ServerMetrics | None,
                   tag: str) -> float:
    async def one(i: int, ids: list[int]) -> int:
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        timer = SequenceTimer(metrics) if metrics is not None else None
        n = 0
        async for inc in engine.submit(EngineRequest(f"{tag}-{i}", ids, params)):
            if timer is not None:
                timer.observe(inc)
            n += len(inc.token_ids)
        return n

    t0 = time.perf_counter()
    counts = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    elapsed = time.perf_counter() - t0
    if metrics is not None:
        metrics.render()
    return sum(counts) / elapsed


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--preset", default="quality")
    ap.add_argument("--experts", type=int)
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--partition")
    ap.add_argument("--router-init")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args()

    preset = None if (args.experts and args.top_k) else args.preset
    factor = factor_config_from(preset, experts=args.experts, top_k=args.top_k, partition=args.partition,
                                router_init=args.router_init)
    loaded = cached_factorized(args.model, factor)
    engine = Engine(loaded, EngineConfig(max_num_seqs=args.concurrency, max_model_len=512,
                                         device=args.device, dtype=args.dtype))
    await engine.start()
    metrics = ServerMetrics("per-expert")
    metrics.set_model(loaded.name, loaded.model, loaded.factor, str(engine.device), str(engine.dtype), engine.quantize)
    metrics.bind_engine(engine)
    tok = loaded.tokenizer
    texts = ["The history of the Roman Empire", "def quicksort(xs):", "Photosynthesis is", "Once upon a time",
             "The best way to learn a language", "In 1969, astronauts", "A recipe for bread:", "Dear diary,"]
    prompts = [tok(texts[i % len(texts)])["input_ids"] for i in range(args.concurrency)]

    await workload(engine, prompts, 8, None, "warm")  # warm-up
    results: dict[str, list[float]] = {"off": [], "on": []}
    listener = metrics.step_listener()
    spent = {"listener_s": 0.0, "step_s": 0.0, "steps": 0}

    def timed_listener(stats) -> None:  # the server-side share, measured directly (noise-free)
        t0 = time.perf_counter()
        listener(stats)
        spent["listener_s"] += time.perf_counter() - t0
        spent["step_s"] += stats.step_time
        spent["steps"] += 1

    for r in range(args.repeats):
        for mode in ("off", "on"):
            engine.step_listeners.clear()
            if mode == "on":
                engine.step_listeners.append(timed_listener)
            tps = await workload(engine, prompts, args.tokens, metrics if mode == "on" else None, f"{mode}{r}")
            results[mode].append(tps)
            print(f"repeat {r}: metrics {mode:3s} {tps:8.1f} output tokens/s", flush=True)
    engine.step_listeners.clear()
    await engine.stop()
    off, on = statistics.median(results["off"]), statistics.median(results["on"])
    cost = (off - on) / off * 100
    summary = {"model": loaded.name, "device": str(engine.device), "dtype": str(engine.dtype),
               "concurrency": args.concurrency, "tokens": args.tokens, "repeats": args.repeats,
               "off_tokens_per_s": round(off, 1), "on_tokens_per_s": round(on, 1), "cost_percent": round(cost, 2),
               "listener_us_per_step": round(spent["listener_s"] / max(1, spent["steps"]) * 1e6, 1),
               "listener_share_of_step_percent": round(spent["listener_s"] / max(1e-9, spent["step_s"]) * 100, 3),
               "runs": results}
    print(f"\nmedian: off {off:.1f} tok/s, on {on:.1f} tok/s -> metrics cost {cost:+.2f}% (target <= 3%)")
    print(f"metrics listener: {summary['listener_us_per_step']} us per step = "
          f"{summary['listener_share_of_step_percent']}% of step time ({spent['steps']} steps)")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
