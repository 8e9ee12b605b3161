"""The model a benchmark measures: a factorized checkpoint (--model) or a preset's cached build
(--preset), or for engine benchmarks a dense source unless --preset is given."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from factorllm.loading import LoadedModel, load_model  # noqa: E402
from factorllm.pipeline import cached_factorized, factor_config_from  # noqa: E402


def add_student_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a factorized checkpoint directory")
    src.add_argument("--preset", choices=("quality", "fast"), help="the preset's cached build of --base")
    p.add_argument("--base", default="default", help="the dense model a --preset is built from")


def load_student(p: argparse.ArgumentParser, args: argparse.Namespace) -> LoadedModel:
    """Load it afresh (each call: a new copy); a dense --model is a usage error."""
    student = load_model(args.model) if args.model else cached_factorized(args.base, factor_config_from(args.preset))
    if student.factor is None:
        p.error(f"{args.model} is not a factorized checkpoint")
    return student


def add_model_or_preset_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="the dense model (or any source load_model takes)")
    p.add_argument("--preset", choices=("quality", "fast"), help="the preset's cached build of --model instead")


def load_model_or_preset(args: argparse.Namespace) -> LoadedModel:
    return cached_factorized(args.model, factor_config_from(args.preset)) if args.preset else load_model(args.model)
