"""`factorllm eval`: perplexity, multiple-choice accuracy, FLOPs and speed of a model."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..errors import UsageError
from ..evaluate import compare, evaluate
from ..loading import load_model
from ..pipeline import with_top_k
from ..quantize import quantize_int8
from .common import add_model_argument, int_list

HELP = "measure perplexity, multiple-choice accuracy, FLOPs per token and speed (optionally vs a baseline)"

ROWS = [("ppl", "perplexity", "{:.3f}"), ("acc", "acc", "{:.4f}"), ("acc_norm", "acc_norm", "{:.4f}"),
        ("active_ffn_fraction", "active FFN fraction", "{:.3f}"), ("flops_per_token", "FLOPs/token", "{:,.0f}"),
        ("tokens_per_s", "tokens/s (forward)", "{:.1f}")]
RATIOS = [("ppl_ratio", "ppl ratio"), ("acc_retention", "acc retention"),
          ("acc_above_chance_retention", "acc above-chance retention"),
          ("acc_norm_above_chance_retention", "acc_norm above-chance retention"),
          ("flops_ratio", "FLOPs ratio"), ("speedup", "speed ratio")]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_argument(p)
    p.add_argument("--ppl", metavar="FILE", help="text file for perplexity")
    p.add_argument("--mc", metavar="FILE", help="multiple-choice JSONL {context, choices, label}, or PIQA's format "
                                                "(goal/sol1/sol2 with NAME-labels.lst beside it)")
    p.add_argument("--limit", type=int, help="evaluate only the first N multiple-choice items")
    p.add_argument("--ppl-tokens", type=int, help="read only the first N tokens of the perplexity file")
    p.add_argument("--window", type=int, default=256, help="perplexity window in tokens (default 256)")
    p.add_argument("--stride", type=int, help="perplexity stride in tokens (default: the window)")
    p.add_argument("--no-speed", action="store_true", help="skip the tokens/s measurement")
    p.add_argument("--top-k", type=int, help="a factorized --model: route each token to K experts (mean over layers) "
                                          "instead of the K it was built with")
    p.add_argument("--top-k-per-layer", type=int_list, metavar="K0,K1,...", help="... or to these K, one per layer")
    p.add_argument("--quantize", choices=("none", "int8"), default="none",
                   help="int8: evaluate with int8 weights, as `factorllm serve --quantize int8` runs them")
    p.add_argument("--baseline", metavar="SRC", help="also evaluate this model (e.g. the dense one) and print ratios")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON")


def fmt(v, spec: str) -> str:
    return "-" if v is None else spec.format(v)


def run(args: argparse.Namespace) -> int:
    if not (args.ppl or args.mc):
        raise UsageError("give --ppl FILE and/or --mc FILE")
    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    opts = dict(ppl_file=args.ppl, mc_file=args.mc, limit=args.limit, window=args.window, stride=args.stride,
                ppl_tokens=args.ppl_tokens, speed=not args.no_speed)
    loaded = with_top_k(load_model(args.model), args.top_k, args.top_k_per_layer)
    if args.quantize == "int8":
        quantize_int8(loaded.model)
        loaded.name += "-int8"
    result = evaluate(loaded, **opts)
    base = evaluate(load_model(args.baseline), **opts) if args.baseline else None
    cols = [result] + ([base] if base else [])
    lines = ["| metric | " + " | ".join(r["model"] for r in cols) + " |", "|---|" + "---:|" * len(cols)]
    for key, label, spec in ROWS:
        lines.append(f"| {label} | " + " | ".join(fmt(r[key], spec) for r in cols) + " |")
    out = dict(result)
    if base:
        ratios = compare(result, base)
        lines += ["", "| vs baseline | value |", "|---|---:|"]
        lines += [f"| {label} | {fmt(ratios[key], '{:.3f}')} |" for key, label in RATIOS]
        out.update(ratios)
        out["baseline"] = base
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0
