"""One factorized checkpoint at several experts per token: the speed/quality trade-off without a rebuild.

For each K (`with_top_k`, the `--top-k` of `factorllm eval` and `factorllm serve`): perplexity on
a text file and its ratio to the dense model, the active FFN fraction, FLOPs per token, and the
engine's decode step at each --batch size against the dense engine (bf16 on CPU, server-sized cache
rows with --context positions cached; dense and factorized in turns in one process, median of
--rounds x --steps steps). Prints a table, writes JSON and a PNG (quality retention against active
FFN fraction and against decode speed over dense).

  python benchmarks/topk_tradeoff.py --preset quality --top-k 2 3 4 6 8 10
  python benchmarks/topk_tradeoff.py --model CKPT_DIR --top-k 8 16 24 32 --batch 1 8
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from decode_profile import step_times  # noqa: E402
from factorllm.evaluate import perplexity, text_tokens  # noqa: E402
from factorllm.info import model_summary  # noqa: E402
from factorllm.loading import load_model  # noqa: E402
from factorllm.pipeline import with_top_k  # noqa: E402
from server.engine import Engine, EngineConfig  # noqa: E402
from student import add_student_arguments, load_student  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def engine_for(loaded, batches: list[int]) -> Engine:
    engine = Engine(loaded, EngineConfig(max_num_seqs=max(batches), max_model_len=2048, dtype="auto"))
    engine.warm_up()
    return engine


@torch.inference_mode()
def decode_ms(dense: Engine, engine: Engine, batches: list[int], context: int, rounds: int, steps: int) -> dict:
    """Median decode step (ms) of `engine` and of `dense` per batch size, timed in turns."""
    out = {}
    for B in batches:
        tokens = torch.arange(B, device=engine.device)[:, None] * 7 + 5
        times = {"dense": [], "moe": []}
        for _ in range(rounds):
            times["dense"] += step_times(dense, tokens, context, steps)
            times["moe"] += step_times(engine, tokens, context, steps)
        out[B] = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return out


def plot(rows: list[dict], batches: list[int], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    retention = [1 / r["ppl_ratio"] for r in rows]
    active = [r["active_ffn_fraction"] for r in rows]
    axes[0].plot(active, retention, "o-")
    axes[0].set_xlabel("active FFN fraction")
    for B, marker in zip(batches, "osD^v"):
        speed = [r["decode"][str(B)]["speedup"] for r in rows]
        axes[1].plot(speed, retention, marker + "-", label=f"{B} sequence(s)")
    axes[1].axvline(1.0, color="grey", lw=0.8)
    axes[1].set_xlabel("decode speed vs the dense engine")
    axes[1].legend()
    for r, x, y in zip(rows, active, retention):
        axes[0].annotate(f"K={r['top_k']}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for ax in axes:
        ax.set_ylabel("quality retention (dense ppl / ppl)")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_student_arguments(p)
    p.add_argument("--top-k", type=int, nargs="+", required=True, help="mean experts per token to measure")
    p.add_argument("--ppl", default=str(DATA / "wikitext2-valid.tokens.txt"))
    p.add_argument("--ppl-tokens", type=int, default=4096)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="decoding sequences per step")
    p.add_argument("--context", type=int, default=100, help="cached positions per sequence")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/topk_tradeoff.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    first = load_student(p, args)
    name, built = (f"{args.preset} preset" if args.preset else first.name), first.factor
    teacher = load_model(built.base)
    tokens = text_tokens(teacher.tokenizer, Path(args.ppl).read_text(), args.ppl_tokens)
    with torch.no_grad():
        dense_ppl = perplexity(teacher.model, tokens)["ppl"]
    dense_flops = model_summary(teacher.model.config, None)["flops_per_token"]["total_active"]
    dense = engine_for(teacher, args.batch)
    rows = []
    for k in args.top_k:
        loaded = with_top_k(first if k == args.top_k[0] else load_student(p, args), top_k=k)
        with torch.no_grad():
            ppl = perplexity(loaded.model, tokens)["ppl"]
        summary = model_summary(loaded.model.config, loaded.factor)
        engine = engine_for(loaded, args.batch)
        times = decode_ms(dense, engine, args.batch, args.context, args.rounds, args.steps)
        rows.append({"top_k": k, "top_k_per_layer": loaded.factor.top_k_per_layer, "ppl": ppl,
                     "ppl_ratio": ppl / dense_ppl, "active_ffn_fraction": summary["active_ffn_fraction"],
                     "flops_ratio": summary["flops_per_token"]["total_active"] / dense_flops,
                     "decode": {str(B): {"dense_ms": t["dense"], "ms": t["moe"], "speedup": t["dense"] / t["moe"]}
                                for B, t in times.items()}})
        del engine, loaded
        gc.collect()

    print(f"\n{name}: perplexity on {tokens.numel():,} tokens of {args.ppl} (dense {dense_ppl:.2f}); decode step "
          f"with {args.context} cached positions, {dense.dtype}, {torch.get_num_threads()} threads, median of "
          f"{args.rounds} x {args.steps} steps in turns with the dense engine")
    head = "| K (mean) | active FFN | FLOPs vs dense | ppl | ppl ratio | " + " | ".join(
        f"decode x dense @{B}" for B in args.batch) + " |"
    print(head + "\n|" + "---:|" * (5 + len(args.batch)))
    for r in rows:
        print(f"| {r['top_k']} | {r['active_ffn_fraction']:.1%} | {r['flops_ratio']:.2f} | {r['ppl']:.2f} | "
              f"{r['ppl_ratio']:.2f} | " + " | ".join(f"{r['decode'][str(B)]['speedup']:.2f}" for B in args.batch) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": name, "recipe": built.to_dict(), "dense_ppl": dense_ppl,
                                    "tokens": tokens.numel(), "batches": args.batch, "context": args.context,
                                    "threads": torch.get_num_threads(), "rows": rows}, indent=2))
    png = args.out.with_suffix(".png")
    plot(rows, args.batch, png, f"{name}: one checkpoint rerouted to K experts per token")
    print(f"wrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
