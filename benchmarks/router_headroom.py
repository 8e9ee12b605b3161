"""How much of a factorized model's quality loss is the router's: its routing against an oracle's.

The oracle routes every token of every routed layer to the K experts chosen greedily to best
reconstruct the dense FFN's output on that token's actual input (the "greedy" PAR label, computed
at evaluation time from the dense teacher, so it needs the teacher and is not a deployable
router). Perplexity with the model's own routers and with the oracle, on the same text, tells
how much a better router could still give; the routers' recall of the oracle's experts per layer
tells how far they are from it. Prints a table, writes JSON.

  python benchmarks/router_headroom.py --preset quality
  python benchmarks/router_headroom.py --model CKPT_DIR --ppl-tokens 8192
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from factorllm.evaluate import perplexity, text_tokens  # noqa: E402
from factorllm.loading import load_model  # noqa: E402
from factorllm.moe import MoEFFN  # noqa: E402
from factorllm.router_training import expert_output_stats  # noqa: E402
from student import add_student_arguments, load_student  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def route_against_teacher(moe: MoEFFN, teacher_ffn, use_oracle: bool, recalls: list[float]) -> None:
    """Wrap `moe.route`: each call also computes the oracle's experts from `teacher_ffn` on the same
    input and records the router's recall of them; with `use_oracle` the oracle's experts are used."""
    own_route = moe.route

    def route(x: torch.Tensor):
        logits, idx, weights = own_route(x)
        oracle = expert_output_stats(moe, x, teacher_ffn(x), "greedy")[1]
        recalls.append((idx[:, :, None] == oracle[:, None, :]).any(1).float().mean().item())
        if use_oracle:  # (the "sum" gate has no weights; other gates keep the router's)
            return logits, oracle, weights
        return logits, idx, weights
    moe.route = route


@torch.no_grad()
def measure(student, teacher, tokens: torch.Tensor, use_oracle: bool) -> dict:
    layers = []
    for i, (s, t) in enumerate(zip(student.model.layers, teacher.model.layers)):
        if isinstance(s.mlp, MoEFFN) and not s.mlp.keeps_every_expert:
            recalls: list[float] = []
            route_against_teacher(s.mlp, t.mlp, use_oracle, recalls)
            layers.append((i, recalls))
    try:
        ppl = perplexity(student.model, tokens)["ppl"]
    finally:
        for i, _ in layers:
            del student.model.layers[i].mlp.route  # back to the class's method
    recall = {i: sum(r) / len(r) for i, r in layers}
    return {"ppl": ppl, "recall_mean": sum(recall.values()) / len(recall), "recall_per_layer": recall}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_student_arguments(p)
    p.add_argument("--ppl", default=str(DATA / "wikitext2-valid.tokens.txt"))
    p.add_argument("--ppl-tokens", type=int, default=4096)
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/router_headroom.json"))
    args = p.parse_args(argv)
    student = load_student(p, args)
    teacher = load_model(student.factor.base)
    tokens = text_tokens(student.tokenizer, Path(args.ppl).read_text(), args.ppl_tokens)
    dense = perplexity(teacher.model, tokens)["ppl"]
    rows = {"router": measure(student, teacher, tokens, use_oracle=False),
            "oracle": measure(student, teacher, tokens, use_oracle=True)}
    print(f"\n{student.name}: perplexity on {tokens.numel():,} tokens of {args.ppl} (dense {dense:.2f})")
    print("| routing | ppl | ppl ratio | router's recall of the oracle's experts |\n|---|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['ppl']:.2f} | {r['ppl'] / dense:.2f} | {r['recall_mean']:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": student.name, "recipe": student.factor.to_dict(), "dense_ppl": dense,
                                    "tokens": tokens.numel(), **rows}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
