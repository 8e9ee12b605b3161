"""Time to first token of a chat's next turn, with and without prefix caching, side by side.

    python benchmarks/prefix_cache.py [--history 128 512 1024] [--repeats 5] [--threads 2] [--out FILE]

A conversation of `--history` tokens (README text as the first user message, the model's 16-token
answer) gets a 20-token follow-up question; its time to first token is measured on two engines of
the same model in turns, one with `prefix_caching` (the follow-up finds the first turn's keys and
values in a free slot) and one without (it prefills the whole conversation again). Median of
--repeats per cell; prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from student import add_model_or_preset_arguments, load_model_or_preset  # noqa: E402
from server.engine import Engine, EngineConfig, EngineRequest, SamplingParams  # noqa: E402


async def first_token_s(engine: Engine, rid: str, ids: list[int], max_tokens: int = 1) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    ttft, out = None, []
    async for inc in engine.submit(EngineRequest(rid, ids, SamplingParams(max_tokens=max_tokens, temperature=0,
                                                                          ignore_eos=True))):
        if ttft is None and inc.token_ids:
            ttft = time.perf_counter() - t0
        out += inc.token_ids
    return ttft, out


async def measure(engines: dict[str, Engine], text_ids: list[int], question: list[int], history: int,
                  repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in engines}
    for r in range(repeats):
        first = text_ids[r * 7:r * 7 + history]  # a different conversation each round
        for name, engine in engines.items():
            _, answer = await first_token_s(engine, f"{name}-a{r}", first, max_tokens=16)
            ttft, _ = await first_token_s(engine, f"{name}-b{r}", first + answer + question)
            times[name].append(ttft)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_or_preset_arguments(p)
    p.add_argument("--history", type=int, nargs="+", default=[128, 512, 1024])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "prefix_cache.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model_or_preset(args)
    tok = loaded.tokenizer
    text_ids = tok((Path(__file__).resolve().parents[1] / "README.md").read_text())["input_ids"]
    question = tok(" Can you say that again, more briefly and in plain words, please?")["input_ids"][:20]
    need = max(args.history) + 7 * args.repeats
    if len(text_ids) < need:
        text_ids = (text_ids * (need // len(text_ids) + 1))[:need]
    max_len = max(args.history) + 64
    engines = {name: Engine(loaded, EngineConfig(max_num_seqs=4, max_model_len=max_len, dtype=args.dtype,
                                                 prefix_caching=on))
               for name, on in (("cached", True), ("uncached", False))}

    async def run() -> list[dict]:
        for e in engines.values():
            await e.start()
        try:
            rows = []
            for h in args.history:
                t = await measure(engines, text_ids, question, h, args.repeats)
                c, u = statistics.median(t["cached"]), statistics.median(t["uncached"])
                rows.append({"history_tokens": h, "ttft_cached_ms": c * 1e3, "ttft_uncached_ms": u * 1e3,
                             "speedup": u / c, "hit_tokens_so_far": engines["cached"].scheduler.prefix_hits})
            return rows
        finally:
            for e in engines.values():
                await e.stop()
    rows = asyncio.run(run())
    e = engines["cached"]
    print(f"\n{loaded.name}, {e.dtype}, quantization {e.quantize}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    print("| conversation so far (tokens) | next turn TTFT, prefix caching (ms) | without (ms) | speed-up |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['history_tokens']} + 16 | {r['ttft_cached_ms']:.0f} | {r['ttft_uncached_ms']:.0f} | "
              f"{r['speedup']:.1f}x |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": loaded.name, "dtype": str(e.dtype), "quantization": e.quantize,
                                    "threads": torch.get_num_threads(), "repeats": args.repeats, "rows": rows},
                                   indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
