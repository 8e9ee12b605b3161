"""`factorllm info`: layers, experts, parameters and FLOPs per token, dense vs factorized."""
from __future__ import annotations

import argparse
import json

from ..info import format_summary, model_summary
from ..loading import read_config, resolve_dense_dir
from ..factor_config import FactorConfig
from ..model import ModelConfig
from ..pipeline import factor_config_from, reroute_flags
from .common import add_factor_arguments, add_model_argument, factor_overrides

HELP = "show a model's layers, experts, parameters and FLOPs per token"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_argument(p)
    add_factor_arguments(p)
    p.add_argument("--context", type=int, default=512, help="history length for attention FLOPs")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    path, name = resolve_dense_dir(args.model)
    hf = read_config(path)
    cfg = ModelConfig.from_hf(hf)
    if "factorllm" in hf:
        factor = FactorConfig.from_dict(hf["factorllm"])
        reroute = reroute_flags(args.model, dict(factor_overrides(args), preset=args.preset))
        if any(v is not None for v in reroute.values()):
            factor = factor.rerouted(num_layers=cfg.num_hidden_layers, **reroute)
    elif args.preset or args.experts:
        # A what-if for a dense model: the accounting needs no factorization run.
        factor = factor_config_from(args.preset, **factor_overrides(args)).validate(
            cfg.intermediate_size, cfg.num_hidden_layers)
    else:
        factor = None
    summary = model_summary(cfg, factor, args.context)
    summary["name"] = name
    print(json.dumps(summary, indent=2) if args.json else f"{name}\n\n{format_summary(summary)}")
    return 0
