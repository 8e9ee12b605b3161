"""Whole decode steps with each CPU decode-attention kernel, in turns in one process.

    python benchmarks/decode_attention.py [--cases 1x100 8x200 16x200 32x541 64x256] [--repeats 6]

Builds the engine's model as the server does (bf16 where the CPU computes it natively, fused and
prepacked linears, the warm-up's tuning), then times decode steps (model forward and LM head) of
R rows at about C cached positions each (rows at different positions, so with a mask, as serving
has them) with every layer's decode attention forced to one kernel of
`model.decode_attention_kernels` (two batched matmuls, SDPA's flash kernel, the C kernel of
factorllm/native_attention.py, which also rotates q and k and writes the cache) and with
the warm-up's tuned plan. Kernels alternate within each repeat, so that load from other processes
hits them alike; each cell is the median over repeats of the median step of a repeat. Timing single
layers on warm caches misleads here (docs/results.md, session 27): this is the measurement that
counts. Prints a table (with each kernel's speed-up over the matmuls) and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from factorllm.device import off_main_thread  # noqa: E402
from factorllm.loading import load_model  # noqa: E402
from factorllm.model import Attention, decode_attention_kernels  # noqa: E402
from server.engine import Engine, EngineConfig  # noqa: E402
from decode_profile import decode_step  # noqa: E402


def parse_case(text: str) -> tuple[int, int]:
    rows, _, context = text.partition("x")
    return int(rows), int(context)


@torch.inference_mode()
def measure(engine: Engine, cases: list[tuple[int, int]], repeats: int, steps: int) -> dict:
    engine.warm_up()
    attentions = [m for m in engine.model.modules() if isinstance(m, Attention)]
    tuned = attentions[0].decode_plan
    cfg = engine.model.config
    kernels = decode_attention_kernels(engine.cache, cfg.num_attention_heads) + ["tuned"]
    rng = random.Random(0)
    results = []
    for rows, context in cases:
        tokens = torch.arange(rows, device=engine.device)[:, None] * 7 + 5
        runs = {k: [] for k in kernels}
        for _ in range(repeats):
            for kernel in kernels:
                plan = tuned if kernel == "tuned" else [(1 << 30, kernel)]
                for a in attentions:
                    a.decode_plan = plan
                times = []
                for _ in range(steps + 1):  # the first, after the switch, is not counted
                    starts = [max(1, context + rng.randrange(-16, 16)) for _ in range(rows)]
                    t0 = time.perf_counter()
                    decode_step(engine, tokens, starts)
                    times.append(time.perf_counter() - t0)
                runs[kernel].append(statistics.median(times[1:]))
        ms = {k: statistics.median(v) * 1000 for k, v in runs.items()}
        results.append({"rows": rows, "context": context, "step_ms": ms,
                        "speedup_over_matmuls": {k: ms["matmuls"] / v for k, v in ms.items()}})
    for a in attentions:
        a.decode_plan = tuned
    return {"tuned_plan": tuned, "kernels": kernels, "cases": results}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--cases", nargs="+", default=["1x100", "8x200", "16x200", "32x541", "64x256"],
                   help="ROWSxCONTEXT decode steps to time")
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--steps", type=int, default=5, help="timed steps per kernel and repeat")
    p.add_argument("--max-model-len", type=int, default=1024, help="positions per cache row, as the server allocates")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "decode_attention.json")
    args = p.parse_args(argv)
    cases = [parse_case(c) for c in args.cases]
    loaded = off_main_thread(lambda: load_model(args.model))  # the step thread keeps the only OpenMP team
    engine = off_main_thread(lambda: Engine(loaded, EngineConfig(
        max_num_seqs=max(r for r, _ in cases), dtype=args.dtype,
        max_model_len=max(args.max_model_len, max(c for _, c in cases) + 32))))
    if engine.device.type != "cpu" or engine.dtype == torch.float32:
        print(f"decode attention kernels are chosen only for CPU bf16/fp16 decoding, not {engine.device.type} "
              f"{engine.dtype}", file=sys.stderr)
        return 2
    report = off_main_thread(lambda: measure(engine, cases, args.repeats, args.steps))
    kernels = report["kernels"]
    print(f"decode step ms (median of {args.repeats} x {args.steps}), {engine.dtype}, {torch.get_num_threads()} threads; "
          f"tuned plan {report['tuned_plan']}")
    print("| rows x context | " + " | ".join(kernels) + " | " + " | ".join(f"{k} / matmuls" for k in kernels if k != "matmuls") + " |")
    print("|---|" + "---:|" * (2 * len(kernels) - 1))
    for c in report["cases"]:
        print(f"| {c['rows']} x {c['context']} | " + " | ".join(f"{c['step_ms'][k]:.1f}" for k in kernels) + " | "
              + " | ".join(f"{c['speedup_over_matmuls'][k]:.2f}x" for k in kernels if k != "matmuls") + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": loaded.name, "dtype": str(engine.dtype), "threads": torch.get_num_threads(),
                                    "repeats": args.repeats, "steps": args.steps, **report}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
