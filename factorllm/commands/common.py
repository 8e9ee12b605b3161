"""Arguments several subcommands share."""
from __future__ import annotations

import argparse

from ..factor_config import PARTITIONS, PRESETS, ROUTER_INITS, ROUTER_LABELS
from ..moe import GATES


def add_model_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="'default' (embedded SmolLM2-135M-Instruct), a .gguf file, a Hugging Face "
                        "Llama-family directory, or a factorized checkpoint directory")


def int_list(value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None


def add_factor_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("factorization")
    g.add_argument("--preset", choices=sorted(PRESETS), help="recommended settings (quality: ~50%% of FFN active, fast: ~25%%)")
    g.add_argument("--experts", type=int, help="routed experts per layer (N)")
    g.add_argument("--top-k", type=int, help="experts chosen per token (K, 1 <= K <= N)")
    g.add_argument("--top-k-per-layer", type=int_list, metavar="K0,K1,...",
                   help="a K for every layer instead of one --top-k")
    g.add_argument("--dense-layers", type=int,
                   help="the first D layers keep all experts; the middle layers give up experts to hold the "
                        "mean --top-k (quality preset: 1)")
    g.add_argument("--shared-experts", type=int, help="always-on expert-sized groups of neurons (S)")
    g.add_argument("--partition", choices=PARTITIONS, help="how neurons are grouped into experts")
    g.add_argument("--gate", choices=GATES, help="how the chosen experts' outputs are combined")
    g.add_argument("--router-init", choices=ROUTER_INITS, help="router initialization")
    g.add_argument("--router-label", choices=ROUTER_LABELS,
                   help="train each router with the PAR loss on this pseudo-label (paper: FactorLLM's; "
                        "greedy: best K-subset by reconstruction; mass: largest expert outputs)")
    g.add_argument("--router-steps", type=int, help="PAR training steps per layer (default 100)")
    g.add_argument("--refit", action=argparse.BooleanOptionalAction, default=None,
                   help="refit the down projections in closed form against the dense FFN")
    g.add_argument("--refit-ridge", type=float,
                   help="how strongly the refit stays near the original weights (default 1.0; lower fits "
                        "the calibration text more closely and overfits it)")
    g.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=None,
                   help="fit each layer on the inputs that the already factorized layers below it produce "
                        "(default; --no-sequential: on the dense model's own inputs, as the paper does)")
    g.add_argument("--seed", type=int, help="random seed for clustering, sampling and router init")
    g.add_argument("--calib", help="calibration text file (default: text sampled from the model itself)")
    g.add_argument("--calib-seqs", type=int,
                   help="calibration windows of 256 tokens (default 16; presets: quality 32, fast 24; more fit better, build slower)")


def factor_overrides(args: argparse.Namespace) -> dict:
    return dict(experts=args.experts, top_k=args.top_k, shared_experts=args.shared_experts,
                partition=args.partition, gate=args.gate, router_init=args.router_init, seed=args.seed,
                router_label=args.router_label, router_steps=args.router_steps, refit=args.refit,
                top_k_per_layer=args.top_k_per_layer, dense_layers=args.dense_layers, calib_seqs=args.calib_seqs,
                sequential=args.sequential, refit_ridge=args.refit_ridge)
