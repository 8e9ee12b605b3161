"""`factorllm export`: write a factorized checkpoint as a stock Hugging Face MoE model (for vLLM)."""
from __future__ import annotations

import argparse

from ..export import DEFAULT_GATE_TOLERANCE, DTYPES, FORMATS, export_checkpoint

HELP = "export a factorized checkpoint to a stock MoE architecture (mixtral, qwen2_moe, qwen3_moe)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="factorized checkpoint directory (from factorllm factorize)")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="target architecture: mixtral (no shared experts), qwen2_moe (shared experts, "
                        "q/k/v biases), qwen3_moe (q/k-normed bases such as Qwen3)")
    p.add_argument("--out", required=True, help="output Hugging Face directory")
    p.add_argument("--gate-tolerance", type=float, default=DEFAULT_GATE_TOLERANCE,
                   help="hard gates (sum/scaled) only: max spread of the scaled router logits; each chosen "
                        "expert's coefficient is then within ~this relative error of ours (default %(default)g)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="weight dtype (default: the checkpoint's)")


def run(args: argparse.Namespace) -> int:
    result = export_checkpoint(args.model, args.format, args.out, args.gate_tolerance, args.dtype)
    print(result.summary())
    for note in result.notes:
        print(f"note: {note}")
    return 0
