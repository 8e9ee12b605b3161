"""`factorllm factorize`: split a dense model's FFNs into experts and save a checkpoint."""
from __future__ import annotations

import argparse

from ..checkpoint import save_checkpoint
from ..pipeline import factor_config_from, factorize_source
from .common import add_factor_arguments, add_model_argument, factor_overrides

HELP = "split every FFN into N experts with a router and save a factorized checkpoint"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_argument(p)
    add_factor_arguments(p)
    p.add_argument("--out", required=True, help="output checkpoint directory")


def run(args: argparse.Namespace) -> int:
    factor = factor_config_from(args.preset, **factor_overrides(args))
    loaded = factorize_source(args.model, factor, args.calib)
    out = save_checkpoint(loaded, factor, args.out)
    print(f"saved {factor.experts} experts x top-{factor.top_k} "
          f"(active FFN {factor.active_ffn_fraction(loaded.model.config.num_hidden_layers):.1%}) to {out}")
    return 0
