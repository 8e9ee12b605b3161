"""`factorllm train`: recover a factorized checkpoint's quality from its dense teacher.

Layer by layer (minutes on CPU): PAR router training on pseudo-labels and a closed-form refit of
the down projections. With --finetune, then end-to-end logit distillation (GPU recommended).
"""
from __future__ import annotations

import argparse
from dataclasses import asdict

import torch

from ..calibration import calibration_tokens
from ..checkpoint import save_checkpoint
from ..distill import DistillConfig, distill, recover_layers
from ..errors import SourceError, UsageError
from ..factor_config import ROUTER_LABELS
from ..loading import load_model
from .common import add_model_argument

HELP = "train a factorized checkpoint's routers (PAR) and experts against its dense teacher"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_argument(p)
    p.add_argument("--data", help="training text file (plain UTF-8; default: text sampled from the teacher, "
                                  "--max-seqs windows with --finetune, --par-seqs without)")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--teacher", help="dense teacher (default: the checkpoint's base model)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training window")
    p.add_argument("--max-seqs", type=int, default=512, help="at most this many windows of --data")
    g = p.add_argument_group("layer-wise recovery")
    g.add_argument("--par", choices=ROUTER_LABELS + ("none",), default="greedy",
                   help="PAR pseudo-label for router training (none: skip)")
    g.add_argument("--par-steps", type=int, default=100, help="PAR steps per layer")
    g.add_argument("--par-seqs", type=int, default=16, help="windows used for PAR and the refit")
    g.add_argument("--refit", action=argparse.BooleanOptionalAction, default=True,
                   help="closed-form refit of the down projections")
    g = p.add_argument_group("distillation (--finetune)")
    g.add_argument("--finetune", action="store_true", help="end-to-end logit distillation from the teacher")
    g.add_argument("--steps", type=int, default=200, help="distillation steps (with --seconds: the most)")
    g.add_argument("--seconds", type=float, help="time budget for distillation: its schedule is cut to the steps "
                                                 "that fit, timed on the first steps")
    g.add_argument("--batch-size", type=int, default=4)
    g.add_argument("--lr", type=float, default=2e-4, help="learning rate of the experts (or their adapters)")
    g.add_argument("--router-lr", type=float, default=1e-3)
    g.add_argument("--train", nargs="+", choices=("routers", "experts", "lora", "all"), default=["routers", "experts"],
                   help="what trains: routers, experts (whole), lora (low-rank adapters on the experts, merged "
                        "into them when saving), all (every weight)")
    g.add_argument("--lora-rank", type=int, default=8, help="rank of each expert's adapters (with --train lora)")
    g.add_argument("--lora-alpha", type=float, default=16.0, help="adapters scaled by alpha / rank")
    g.add_argument("--ce-weight", type=float, default=0.0, help="weight of next-token cross-entropy")
    g.add_argument("--balance-weight", type=float, default=0.0, help="weight of the load-balance term")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on CUDA and on CPUs with native bf16)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the student (CPU: 1.3-1.4x faster steps after a first step that compiles, "
                        "~1.5 min; needs a C++ compiler)")
    g.add_argument("--device", help="cpu or cuda (default: cuda when available)")


def run(args: argparse.Namespace) -> int:
    if args.seconds is not None and args.seconds <= 0:
        raise UsageError(f"--seconds must be positive, got {args.seconds}")
    if args.lora_rank < 1:
        raise UsageError(f"--lora-rank must be at least 1, got {args.lora_rank}")
    try:
        cfg = DistillConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, router_lr=args.router_lr,
                            warmup=max(args.steps // 10, 1), train=tuple(args.train), lora_rank=args.lora_rank,
                            lora_alpha=args.lora_alpha, ce_weight=args.ce_weight,
                            balance_weight=args.balance_weight, seed=args.seed, bf16=args.bf16,
                            seconds=args.seconds, compile=args.compile)
    except ValueError as e:
        raise UsageError(f"--train: {e}") from None
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    loaded = load_model(args.model)
    if loaded.factor is None:
        raise UsageError(f"{args.model} is a dense model: run `factorllm factorize` first")
    teacher_src = args.teacher or loaded.factor.base
    try:
        teacher = load_model(teacher_src)
    except SourceError as e:
        raise SourceError(f"cannot load the teacher ({e}); give --teacher") from None
    if teacher.factor is not None:
        raise UsageError(f"the teacher {teacher_src} must be a dense model")
    student, dense = loaded.model.to(device), teacher.model.to(device).eval()
    # Without --data, as factorize calibrates without --calib: the teacher's own text, no data set needed
    windows = args.max_seqs if args.data or args.finetune else args.par_seqs
    tokens = calibration_tokens(dense, teacher.tokenizer, args.data, windows, args.seq_len, args.seed).cpu()
    data = args.data or f"sampled from the teacher: {windows} windows of {args.seq_len} tokens, seed {args.seed}"
    trained = dict(loaded.factor.trained)
    if args.par != "none" or args.refit:
        pick = torch.linspace(0, tokens.shape[0] - 1, min(args.par_seqs, tokens.shape[0])).round().long()
        trained.update(recover_layers(student, dense, tokens[pick].to(device), loaded.factor,
                                      None if args.par == "none" else args.par, args.par_steps, args.refit))
    if args.finetune:
        result = distill(student, dense, tokens, cfg, state_path=f"{args.out}.train_state.pt")
        trained["distill"] = {**asdict(cfg), "steps_run": result["steps"],
                              "final_kl": result["history"][-1]["kl"]}
    trained["data"] = data
    loaded.factor.trained = trained
    loaded.model = student.float().cpu()
    out = save_checkpoint(loaded, loaded.factor, args.out)
    print(f"saved trained checkpoint to {out}: {trained}")
    return 0
