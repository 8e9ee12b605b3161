"""How much each layer's FFN split costs, alone: the data behind `--dense-layers`.

For every layer l and every K, only layer l is factorized (the recipe of a preset, or of the
flags, at top-K), and the KL divergence of the model's next-token distribution from the dense
model's is measured on held-out text sampled from the model itself (a different seed from the
calibration text, so no data set is needed). The layers before l are dense, so their output is
computed once and only layers l.. run again. Prints a table, writes JSON and a PNG plot.

  python benchmarks/layer_sensitivity.py                          # quality preset, K in 1 2 4 6 8
  python benchmarks/layer_sensitivity.py --experts 14 --shared-experts 2 --top-k 2 4 6 8 10
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from factorllm.calibration import sample_from_model  # noqa: E402
from factorllm.factor_config import PRESETS, FactorConfig  # noqa: E402
from factorllm.factorize import capture_ffn_inputs, factorize_layer  # noqa: E402
from factorllm.loading import load_model  # noqa: E402


class TailRunner:
    """The dense model's residual stream at every layer's input for `tokens` (as each layer takes
    it: the previous FFN output and the stream before it; and the layers' other arguments: RoPE
    tables, mask), captured from one ordinary forward pass, so that a model
    changed only from layer l on can be rerun from there."""

    @torch.no_grad()
    def __init__(self, model, tokens: torch.Tensor):
        self.model = model
        self.inputs: list[tuple] = []
        hooks = [layer.register_forward_pre_hook(lambda _m, args: self.inputs.append(args))
                 for layer in model.layers]
        try:
            self.dense_logp = model(tokens).float().log_softmax(-1)
        finally:
            for h in hooks:
                h.remove()

    @torch.no_grad()
    def kl_from(self, layer: int) -> float:
        """Mean per-token KL(dense || model) when layers `layer`.. are the model's current ones."""
        x, residual, cos, sin, mask, cache, _, batch = self.inputs[layer]
        for i in range(layer, len(self.model.layers)):
            x, residual = self.model.layers[i](x, residual, cos, sin, mask, cache, i, batch)
        p = self.dense_logp
        logp = self.model.lm_head(self.model.model.norm.add_norm(x, residual)[0]).float().log_softmax(-1)
        return (p.exp() * (p - logp)).sum(-1).mean().item()


def plot(table: dict[int, dict[int, float]], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4))
    layers = sorted(table)
    for k in sorted(next(iter(table.values()))):
        ax.plot(layers, [table[l][k] for l in layers], marker="o", ms=3, label=f"top-{k}")
    ax.set_xlabel("layer (only this one factorized)")
    ax.set_ylabel("KL(dense || factorized), nats/token")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--preset", default="quality", choices=sorted(PRESETS))
    p.add_argument("--experts", type=int, help="override the preset's routed experts")
    p.add_argument("--shared-experts", type=int, help="override the preset's shared experts")
    p.add_argument("--top-k", type=int, nargs="+", default=[1, 2, 4, 6, 8], help="K values to measure")
    p.add_argument("--calib-seqs", type=int, default=16, help="self-generated calibration windows")
    p.add_argument("--held-seqs", type=int, default=4, help="self-generated held-out windows")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int)
    p.add_argument("--out", default="benchmarks/out/layer_sensitivity")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_model(args.model)
    model = loaded.model.eval()
    recipe = {**PRESETS[args.preset], "dense_layers": 0}
    recipe.update({k: v for k, v in (("experts", args.experts), ("shared_experts", args.shared_experts)) if v})
    calib = sample_from_model(model, loaded.tokenizer, args.calib_seqs, args.seq_len, seed=0)
    held = sample_from_model(model, loaded.tokenizer, args.held_seqs, args.seq_len, seed=1)
    inputs = capture_ffn_inputs(model, calib)
    runner = TailRunner(model, held)
    table: dict[int, dict[int, float]] = {}
    for l in tqdm(range(len(model.layers)), desc="layers", unit="layer"):
        dense_mlp = model.layers[l].mlp
        for k in args.top_k:
            factor = FactorConfig(**{**recipe, "top_k": k}).validate(model.config.intermediate_size)
            model.layers[l].mlp = factorize_layer(dense_mlp, inputs[l].float(), factor, l)
            table.setdefault(l, {})[k] = runner.kl_from(l)
        model.layers[l].mlp = dense_mlp
    print("\n| layer | " + " | ".join(f"KL top-{k}" for k in args.top_k) + " |")
    print("|---:|" + "---:|" * len(args.top_k))
    for l, row in table.items():
        print(f"| {l} | " + " | ".join(f"{row[k]:.3f}" for k in args.top_k) + " |")
    print("| sum | " + " | ".join(f"{sum(r[k] for r in table.values()):.3f}" for k in args.top_k) + " |")
    title = f"{recipe['experts']}+{recipe['shared_experts']} experts, one layer at a time"
    (out / "results.json").write_text(json.dumps({"args": vars(args), "recipe": recipe, "kl": table}, indent=2))
    plot(table, out / "layers.png", title)
    print(f"\nwrote {out / 'results.json'} and {out / 'layers.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
