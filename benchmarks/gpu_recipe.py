"""The whole quality recipe on one CUDA GPU in under 10 minutes for the default model.

For each configuration: factorize the dense model on self-generated calibration text, train the
routers with PAR and refit the down projections (layer-wise), then distill end to end from the
dense teacher on self-generated text, and evaluate perplexity (WikiText-2) and PIQA against the
dense model. Prints the eval table and writes JSON; --save keeps the trained checkpoints.

  python benchmarks/gpu_recipe.py                       # on a GPU: the full recipe
  python benchmarks/gpu_recipe.py --configs fine-50 --distill-seconds 300   # one configuration, 5 minutes of training
  python benchmarks/gpu_recipe.py --device cpu --tiny   # a smoke run of the same code on CPU

Each row is printed and the JSON rewritten as soon as it is measured, so a run cut short (a device
lent for a fixed time) still leaves every finished row.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from factorllm.calibration import sample_from_model  # noqa: E402
from factorllm.checkpoint import save_checkpoint  # noqa: E402
from factorllm.distill import DistillConfig, distill  # noqa: E402
from factorllm.evaluate import compare, evaluate  # noqa: E402
from factorllm.factor_config import PRESETS, FactorConfig  # noqa: E402
from factorllm.factorize import factorize  # noqa: E402
from factorllm.loading import load_model  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

CONFIGS = {
    "paper-50": dict(experts=16, top_k=8, partition="contiguous", gate="scaled", router_init="random",
                     router_label="paper", sequential=False),
    "quality": PRESETS["quality"],
    "fast": PRESETS["fast"],
    # 50% active as `quality`, in 128 groups of 12 neurons: slower to build, better after distillation
    # (docs/results.md, session 11).
    "fine-50": dict(experts=80, shared_experts=48, top_k=16, dense_layers=1, partition="cluster",
                    router_init="lstsq", router_label="greedy", refit=True),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--calib-seqs", type=int, default=64, help="self-generated windows for PAR and the refit")
    p.add_argument("--train-seqs", type=int, default=2048,
                   help="self-generated windows for distillation (512 until session 21, whose fresh text showed "
                        "them memorized: KL 0.20 on them, 0.50 on new windows)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--sample-batch", type=int, default=512,
                   help="windows sampled at once (their KV cache: ~7 MB each at 256 tokens)")
    p.add_argument("--steps", type=int, default=400, help="distillation steps per configuration (with "
                                                          "--distill-seconds: the most)")
    p.add_argument("--distill-seconds", type=float, help="time budget per configuration's distillation")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--compile", action="store_true", help="torch.compile the student (1.3-1.4x faster CPU steps; "
                                                         "untried on CUDA)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--ppl", default=str(DATA / "wikitext2-valid.tokens.txt"))
    p.add_argument("--mc", default=str(DATA / "piqa-valid.jsonl"))
    p.add_argument("--limit", type=int, help="multiple-choice items (default: all)")
    p.add_argument("--ppl-tokens", type=int, help="perplexity tokens (default: the whole file)")
    p.add_argument("--tiny", action="store_true", help="smoke run: few sequences, steps and eval items")
    p.add_argument("--save", help="directory for the trained checkpoints")
    p.add_argument("--json", default="benchmarks/out/gpu_recipe.json")
    args = p.parse_args(argv)
    if args.tiny:
        args.calib_seqs, args.train_seqs, args.seq_len, args.steps, args.batch_size = 4, 8, 64, 3, 2
        args.limit, args.ppl_tokens = 8, 1024
    t_start = time.perf_counter()
    device = torch.device(args.device)
    dense = load_model(args.model)
    dense.model.to(device).eval()
    t0 = time.perf_counter()
    total, draw = args.calib_seqs + args.train_seqs, args.sample_batch
    sample = torch.cat([sample_from_model(dense.model, dense.tokenizer, min(draw, total - start), args.seq_len,
                                          seed=1 + start // draw) for start in range(0, total, draw)])
    calib, train = sample[:args.calib_seqs], sample[args.calib_seqs:]
    print(f"sampled {sample.numel():,} tokens of training text in {time.perf_counter() - t0:.0f} s", flush=True)
    opts = dict(ppl_file=args.ppl, mc_file=args.mc, limit=args.limit, ppl_tokens=args.ppl_tokens, progress=False)
    base = evaluate(dense, **opts)
    rows = []
    print(HEADER, flush=True)
    record(rows, {"config": "dense", "stage": "-", **base}, base, args.json)
    for name in args.configs:
        factor = FactorConfig(**CONFIGS[name]).validate(dense.model.config.intermediate_size)
        student = copy.copy(dense)
        student.model = copy.deepcopy(dense.model)
        t0 = time.perf_counter()
        factorize(student.model, factor, calib.to(device))
        student.model.to(device)
        student.factor = factor
        record(rows, {"config": name, "stage": "layer-wise", "seconds": time.perf_counter() - t0,
                      **evaluate(student, **opts)}, base, args.json)
        cfg = DistillConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, router_lr=3 * args.lr,
                            warmup=max(args.steps // 10, 1), seconds=args.distill_seconds, compile=args.compile)
        t0 = time.perf_counter()
        hist = distill(student.model, dense.model, train, cfg)
        factor.trained["distill"] = {"steps": hist["steps"], "batch_size": args.batch_size, "lr": args.lr,
                                     "data": "self-generated", "final_kl": hist["history"][-1]["kl"]}
        seconds = time.perf_counter() - t0
        if args.save:
            save_checkpoint(student, factor, Path(args.save) / name)
        record(rows, {"config": name, "stage": f"+distill {hist['steps']}", "seconds": seconds,
                      "distill_tokens_per_s": hist["tokens_per_s"], **evaluate(student, **opts)}, base, args.json)
    print("\n" + HEADER)
    print("\n".join(table_row(r) for r in rows))
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; wrote {args.json}")
    return 0


HEADER = ("| config | stage | active FFN | ppl | ppl ratio | acc | acc_norm | above-chance ret. | tok/s | s |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")


def table_row(r: dict) -> str:
    def f(v, spec):
        return "-" if v is None else spec.format(v)
    return (f"| {r['config']} | {r['stage']} | {r['active_ffn_fraction']:.3f} | {f(r['ppl'], '{:.2f}')} | "
            f"{f(r['ppl_ratio'], '{:.3f}')} | {f(r['acc'], '{:.3f}')} | {f(r['acc_norm'], '{:.3f}')} | "
            f"{f(r['acc_above_chance_retention'], '{:.2f}')} | {f(r['tokens_per_s'], '{:.0f}')} | "
            f"{f(r.get('seconds'), '{:.0f}')} |")


def record(rows: list[dict], row: dict, base: dict, path: str) -> None:
    """Add a measured row (with its ratios to the dense `base`), print it and rewrite the JSON."""
    row.update(compare(row, base))
    rows.append(row)
    print(table_row(row), flush=True)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    sys.exit(main())
