"""Where a decode step's time goes: torch profiler over engine decode steps, grouped by op.

    python benchmarks/decode_profile.py [--batch 1 16] [--preset fast] [--threads 2] [--quantize none] [--shapes]

Builds the engine's model (fused projections, prepacked oneDNN linears on CPU), fills B cache rows
(of --max-model-len positions, as the server allocates them) to --context positions, times --steps
decode steps (median) and profiles them; prints, per batch size, the step time and the ops with
the most self time (with --shapes: per op and input shapes), and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from factorllm.device import off_main_thread  # noqa: E402
from factorllm.kv_cache import CacheBatch  # noqa: E402
from student import add_model_or_preset_arguments, load_model_or_preset  # noqa: E402
from server.engine import Engine, EngineConfig  # noqa: E402


def decode_step(engine: Engine, tokens: torch.Tensor, starts: list[int]) -> torch.Tensor:
    """One decode forward and LM head for the rows of `tokens` [B, 1] in slots 0..B-1, row b at
    position starts[b]."""
    B = tokens.shape[0]
    batch = CacheBatch.build(list(range(B)), starts, [1] * B, engine.device)
    h = engine.model.hidden_states(tokens, cache=engine.cache, batch=batch)
    return engine.model.lm_head(h[:, 0]).float()


@torch.inference_mode()
def step_times(engine: Engine, tokens: torch.Tensor, context: int, steps: int) -> list[float]:
    for _ in range(3):
        decode_step(engine, tokens, [context] * tokens.shape[0])
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        decode_step(engine, tokens, [context] * tokens.shape[0])
        times.append(time.perf_counter() - t0)
    return times


@torch.inference_mode()
def profile_batch(engine: Engine, B: int, context: int, steps: int, top: int, shapes: bool = False) -> dict:
    tokens = (torch.arange(B, device=engine.device)[:, None] * 7 + 5)
    # Main thread and a fresh thread in turns: while the main thread owns an OpenMP team (it loaded
    # the model), a fresh thread's steps run slower (see factorllm.device.off_main_thread).
    main, other = [], []
    for _ in range(3):
        main += step_times(engine, tokens, context, steps)
        other += off_main_thread(lambda: step_times(engine, tokens, context, steps))
    with profile(activities=[ProfilerActivity.CPU], record_shapes=shapes) as prof:
        for _ in range(steps):
            decode_step(engine, tokens, [context] * tokens.shape[0])
    events = sorted(prof.key_averages(group_by_input_shape=shapes), key=lambda e: e.self_cpu_time_total,
                    reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    ops = [{"op": f"{e.key} {e.input_shapes}" if shapes else e.key, "calls_per_step": e.count / steps,
            "ms_per_step": e.self_cpu_time_total / 1000 / steps, "share": e.self_cpu_time_total / total}
           for e in events[:top]]
    return {"batch": B, "step_ms_median": statistics.median(main) * 1000,
            "step_ms_median_other_thread": statistics.median(other) * 1000,
            "ops_per_step": sum(e.count for e in events) / steps, "top_ops": ops}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_or_preset_arguments(p)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--context", type=int, default=100, help="cached positions per row")
    p.add_argument("--max-model-len", type=int, default=2048, help="positions per cache row (the server's default)")
    p.add_argument("--shapes", action="store_true", help="one line per op and input shapes")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantize", default="auto", choices=("auto", "none", "int8"))
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "decode_profile.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model_or_preset(args)
    engine = Engine(loaded, EngineConfig(max_num_seqs=max(args.batch), dtype=args.dtype, quantize=args.quantize,
                                         max_model_len=max(args.max_model_len, args.context + 16)))
    engine.warm_up()  # MoE dispatch tuning, as the server's start-up does
    rows = [profile_batch(engine, B, args.context, args.steps, args.top, args.shapes) for B in args.batch]
    for r in rows:
        print(f"\nB = {r['batch']}: {r['step_ms_median']:.1f} ms per step (median of {3 * args.steps}; "
              f"{r['step_ms_median_other_thread']:.1f} ms on a fresh thread), "
              f"{r['ops_per_step']:.0f} profiler events per step ({engine.dtype}, {torch.get_num_threads()} threads)")
        print("| op | calls/step | ms/step | share of op time |\n|---|---:|---:|---:|")
        for o in r["top_ops"]:
            print(f"| {o['op']} | {o['calls_per_step']:.0f} | {o['ms_per_step']:.2f} | {o['share']:.0%} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": loaded.name, "dtype": str(engine.dtype), "threads": torch.get_num_threads(),
                                    "context": args.context, "rows": rows}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
