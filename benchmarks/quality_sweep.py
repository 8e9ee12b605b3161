"""Quality vs active FFN fraction: paper-faithful FactorLLM against the improved recipe.

For each total expert count G (N routed + S shared), each active fraction and each recipe, the
dense default model is factorized on the same calibration tokens, optionally fine-tuned by
logit distillation, and evaluated (perplexity on a text file, multiple-choice accuracy). Output:
a table on stdout, JSON and a PNG Pareto plot (quality retention vs active FFN fraction and vs
measured speed) under --out.

Recipes:
  paper:    contiguous partition, random router trained with the paper's PAR label on the dense
            model's own FFN inputs, gate "scaled" (N/K), no shared experts, no refit: FactorLLM as described.
  improved: co-activation clusters, a share of always-on shared groups (--shared-shares, default
            G/8), optionally dense first layers (--dense-layers), least-squares router init trained
            on greedy best-subset labels, gate "sum", closed-form refit of the down projections,
            each layer fit on the inputs of the factorized layers below it (sequential).

  python benchmarks/quality_sweep.py --quick       # a reduced grid
  python benchmarks/quality_sweep.py --groups 8 16 32 64 --fractions 0.5 0.25 --finetune-steps 50
  python benchmarks/quality_sweep.py --groups 16 32 --recipes improved --shared-shares 0.125 0.375 --dense-layers 0 1
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from factorllm.calibration import calibration_tokens  # noqa: E402
from factorllm.distill import DistillConfig, distill  # noqa: E402
from factorllm.errors import UsageError  # noqa: E402
from factorllm.evaluate import compare, evaluate  # noqa: E402
from factorllm.factor_config import FactorConfig  # noqa: E402
from factorllm.factorize import factorize  # noqa: E402
from factorllm.loading import load_model  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def recipe(name: str, groups: int, fraction: float, label: str | None = None, refit: bool = True,
           shared_share: float = 0.125, dense_layers: int = 0) -> FactorConfig | None:
    """The FactorConfig of a recipe at G groups and an active fraction; None if K would be < 1.
    improved: `shared_share` of the groups always on, the first `dense_layers` layers dense."""
    if name == "paper":
        k = round(groups * fraction)
        return FactorConfig(experts=groups, top_k=k, partition="contiguous", gate="scaled", router_init="random",
                            router_label=label or "paper", sequential=False) if k >= 1 else None
    shared = max(round(groups * shared_share), 1)
    k = round(groups * fraction) - shared
    if k < 1:
        return None
    return FactorConfig(experts=groups - shared, top_k=k, shared_experts=shared, partition="cluster", gate="sum",
                        router_init="lstsq", router_label=label or "greedy", refit=refit, dense_layers=dense_layers)


def row_of(name: str, factor: FactorConfig | None, result: dict, dense: dict, extra: dict) -> dict:
    r = {"recipe": name, **extra, **{k: result.get(k) for k in ("ppl", "acc", "acc_norm", "active_ffn_fraction",
                                                                 "flops_per_token", "tokens_per_s")}}
    if factor is not None:
        r.update(experts=factor.experts, shared=factor.shared_experts, top_k=factor.top_k,
                 partition=factor.partition, gate=factor.gate, label=factor.router_label, refit=factor.refit,
                 dense_layers=factor.dense_layers, top_k_per_layer=factor.top_k_per_layer, trained=factor.trained)
    r.update(compare(result, dense))
    return r


HEADER = ("| recipe | N+S | K | dense layers | label | finetune | active FFN | ppl | ppl ratio | acc | acc_norm | "
          "above-chance ret. | tok/s | build s |\n|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")


def print_table(rows: list[dict]) -> None:
    def f(v, spec):
        return "-" if v is None else spec.format(v)
    for r in rows:
        groups = f"{r.get('experts', '-')}+{r.get('shared', 0)}" if r.get("experts") else "dense"
        print(f"| {r['recipe']} | {groups} | {r.get('top_k', '-')} | {r.get('dense_layers', '-')} | {r.get('label') or '-'} | "
              f"{r.get('finetune_steps', 0)} | {f(r['active_ffn_fraction'], '{:.3f}')} | {f(r['ppl'], '{:.2f}')} | "
              f"{f(r['ppl_ratio'], '{:.3f}')} | {f(r['acc'], '{:.3f}')} | {f(r['acc_norm'], '{:.3f}')} | "
              f"{f(r['acc_above_chance_retention'], '{:.2f}')} | {f(r['tokens_per_s'], '{:.0f}')} | "
              f"{f(r.get('build_s'), '{:.0f}')} |", flush=True)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, xkey, xlabel in ((axes[0], "active_ffn_fraction", "active FFN fraction"),
                             (axes[1], "speedup", "measured speed vs dense (forward tokens/s)")):
        names = sorted({r["recipe"] for r in rows if r["recipe"] != "dense"})
        for name, marker in zip(names, "osxD^v<>p*"):
            pts = [(r[xkey], 1 / r["ppl_ratio"]) for r in rows if r["recipe"] == name and r.get(xkey) and r["ppl_ratio"]]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, label=name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("quality retention (dense ppl / ppl)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("FactorLLM on the default model: quality retention vs cost")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--groups", type=int, nargs="+", default=[8, 16, 32, 64], help="total expert groups G = N + S")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.25], help="active FFN fractions")
    p.add_argument("--recipes", nargs="+", default=["paper", "improved"])
    p.add_argument("--labels", nargs="+", help="override the PAR label (one sweep row per label)")
    p.add_argument("--no-refit", action="store_true", help="improved recipe without the closed-form refit")
    p.add_argument("--shared-shares", type=float, nargs="+", default=[0.125],
                   help="improved recipe: fractions of the G groups that are always-on shared experts")
    p.add_argument("--dense-layers", type=int, nargs="+", default=[0],
                   help="improved recipe: first layers kept dense (the middle layers pay for them)")
    p.add_argument("--ppl", default=str(DATA / "wikitext2-valid.tokens.txt"))
    p.add_argument("--ppl-tokens", type=int, default=8192)
    p.add_argument("--mc", default=str(DATA / "piqa-valid.jsonl"))
    p.add_argument("--limit", type=int, default=200, help="multiple-choice items (0: none)")
    p.add_argument("--calib", help="calibration text file (default: sampled from the model)")
    p.add_argument("--calib-seqs", type=int, default=16)
    p.add_argument("--calib-len", type=int, default=256)
    p.add_argument("--finetune-steps", type=int, default=0, help="distillation steps after factorizing (0: none)")
    p.add_argument("--finetune-batch", type=int, default=4)
    p.add_argument("--threads", type=int)
    p.add_argument("--quick", action="store_true", help="G in {16, 32}, fraction 0.5, 2,048 ppl tokens, 100 items")
    p.add_argument("--out", default="benchmarks/out/quality_sweep")
    args = p.parse_args(argv)
    if args.quick:
        args.groups, args.fractions, args.ppl_tokens, args.limit = [16, 32], [0.5], 2048, 100
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dense = load_model(args.model)
    dense.model.eval()
    calib_cache = out / f"calib-{args.calib_seqs}x{args.calib_len}.pt"
    if args.calib or not calib_cache.is_file():
        calib = calibration_tokens(dense.model, dense.tokenizer, args.calib, args.calib_seqs, args.calib_len)
        if not args.calib:
            torch.save(calib, calib_cache)
    else:
        calib = torch.load(calib_cache)
    opts = dict(ppl_file=args.ppl, mc_file=args.mc if args.limit else None, limit=args.limit or None,
                ppl_tokens=args.ppl_tokens, progress=False)
    base = evaluate(dense, **opts)
    rows = [row_of("dense", None, base, base, {})]
    print(HEADER)
    print_table(rows)
    variants = itertools.product(args.groups, args.fractions, args.recipes, args.labels or [None],
                                 args.shared_shares, args.dense_layers)
    for groups, fraction, name, label, share, dense_layers in variants:
        if name == "paper" and (share, dense_layers) != (args.shared_shares[0], args.dense_layers[0]):
            continue  # neither option applies to the paper's recipe: one row is enough
        factor = recipe(name, groups, fraction, label, not args.no_refit, share, dense_layers)
        if factor is None:
            continue
        rname = name + ("-norefit" if name == "improved" and not factor.refit else "")
        t0 = time.perf_counter()
        student = copy.copy(dense)
        student.model = copy.deepcopy(dense.model)
        try:
            factorize(student.model, factor, calib)
        except UsageError as e:  # e.g. dense layers that the other layers' K cannot pay for
            print(f"skipped {rname} G={groups} fraction={fraction} dense_layers={dense_layers}: {e}")
            continue
        student.factor = factor
        build_s = time.perf_counter() - t0
        extra = {"build_s": build_s, "groups": groups, "target_fraction": fraction}
        rows.append(row_of(rname, factor, evaluate(student, **opts), base, extra))
        print_table(rows[-1:])
        if args.finetune_steps:
            cfg = DistillConfig(steps=args.finetune_steps, batch_size=args.finetune_batch,
                                warmup=max(args.finetune_steps // 10, 1))
            t0 = time.perf_counter()
            distill(student.model, dense.model, calib, cfg, progress=False)
            extra = {**extra, "build_s": build_s + time.perf_counter() - t0, "finetune_steps": args.finetune_steps}
            rows.append(row_of(rname + "+ft", factor, evaluate(student, **opts), base, extra))
            print_table(rows[-1:])
        (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print("\n" + HEADER)
    print_table(rows)
    plot(rows, out / "pareto.png")
    print(f"\nwrote {out / 'results.json'} and {out / 'pareto.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
