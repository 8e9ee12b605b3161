"""Single-neuron experts chosen per token by a low-rank predictor: how close to dense, at what cost.

FactorLLM's finest split makes every intermediate neuron an expert. An oracle that keeps each
token's largest neuron contributions |act(g_i) u_i| * ||down_i|| loses almost nothing at 50%
(docs/results.md, Quality, session 31), far less than any grouping of neurons; what it needs is
a router that predicts those contributions. Here the router is a low-rank copy of the gate and up
projections, fit in closed form to the FFN inputs of calibration text (the rank-r matrix closest
to W in the data's metric: the SVD of W C^1/2, C the inputs' second moment), so nothing is trained;
each token keeps the K neurons with the largest predicted contribution, and optionally a share of
always-on neurons (those most often among a token's largest on the calibration text).

Every layer is replaced in place by a masked copy (each FFN still computes every neuron and zeroes
the unchosen ones: a quality measurement, not a fast path). FLOPs are counted per token and layer
as multiply-adds: chosen neurons 3 H each, the predictor r (H + I_routed) per projection. Prints a
table, writes JSON and a PNG (perplexity ratio against FFN FLOPs with the predictor).

  python benchmarks/neuron_predictor.py --fractions 0.5 0.25 --ranks 64 128 --shared 0 0.25
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from factorllm.calibration import calibration_tokens  # noqa: E402
from factorllm.evaluate import perplexity, text_tokens  # noqa: E402
from factorllm.loading import load_model  # noqa: E402
from factorllm.model import GatedMLP  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def ffn_inputs(model, calib: torch.Tensor, batch: int = 4) -> list[torch.Tensor]:
    """Each layer's FFN input on the calibration windows, [T, H] per layer (the dense model's own)."""
    mlps = [layer.mlp for layer in model.layers]
    captured: list[list[torch.Tensor]] = [[] for _ in mlps]
    hooks = [m.register_forward_pre_hook(lambda _, a, i=i: captured[i].append(a[0].reshape(-1, a[0].shape[-1])))
             for i, m in enumerate(mlps)]
    try:
        for s in tqdm(range(0, calib.shape[0], batch), desc="FFN inputs", unit="batch"):
            model(calib[s:s + batch])
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(c) for c in captured]


def whitened_low_rank(w: torch.Tensor, second_moment: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [H, r], B [r, out]) with x @ A @ B the rank-r map closest to x @ w.T over inputs of this
    second moment: truncate the SVD of w C^1/2, then undo the C^1/2."""
    e, v = torch.linalg.eigh(second_moment.double())
    e = e.clamp_min(e.max() * 1e-8)  # near-null input directions: leave them to the small eigenvalues
    u, s, vh = torch.linalg.svd(w.double() @ ((v * e.sqrt()) @ v.T), full_matrices=False)
    a = ((v / e.sqrt()) @ v.T) @ vh[:rank].T * s[:rank]
    return a.float().contiguous(), u[:, :rank].T.float().contiguous()


def contributions(mlp: GatedMLP, hidden: torch.Tensor) -> torch.Tensor:
    """|act(g) u| scaled by each neuron's down-projection norm: what a neuron adds to the output."""
    return hidden.abs() * mlp.down_proj.weight.norm(dim=0)


class NeuronRoutedFFN(nn.Module):
    """A dense FFN that keeps, per token, its `shared` neurons and the `k` others the router ranks
    highest (router None: the oracle, ranking by the true contributions)."""

    def __init__(self, mlp: GatedMLP, k: int, shared: torch.Tensor, router: tuple | None):
        super().__init__()
        self.mlp, self.k, self.router = mlp, k, router
        routed = torch.ones(mlp.gate_proj.out_features, dtype=torch.bool)
        routed[shared] = False
        self.shared, self.routed = shared, routed.nonzero()[:, 0]

    def kept_hidden(self, x: torch.Tensor) -> torch.Tensor:
        """act(g) * u with every neuron that this token does not keep zeroed."""
        m = self.mlp
        hidden = m.act(m.gate_proj(x)) * m.up_proj(x)
        if self.router is None:
            score = contributions(m, hidden)[..., self.routed]
        else:
            ga, gb, ua, ub = self.router
            score = (m.act(x @ ga @ gb) * (x @ ua @ ub)).abs() * m.down_proj.weight[:, self.routed].norm(dim=0)
        keep = torch.zeros_like(hidden)
        keep.scatter_(-1, self.routed[score.topk(self.k, dim=-1).indices], 1.0)
        keep[..., self.shared] = 1.0
        return hidden * keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp.down_proj(self.kept_hidden(x))


def configure(dense: list[GatedMLP], inputs: list[torch.Tensor], moments: list[torch.Tensor], fraction: float,
              rank: int | None, shared_fraction: float) -> tuple[list[nn.Module], dict]:
    """Every layer as a NeuronRoutedFFN and the FLOP accounting of the configuration (multiply-adds
    per token, summed over layers, against the dense FFNs')."""
    layers, active, predictor, dense_macs = [], 0, 0, 0
    for mlp, x, moment in zip(dense, inputs, moments):
        inter, hid = mlp.gate_proj.out_features, mlp.gate_proj.in_features
        n_shared, k = round(shared_fraction * inter), round(fraction * inter) - round(shared_fraction * inter)
        shared = contributions(mlp, mlp.hidden(x)).topk(k + n_shared, dim=-1).indices.flatten().bincount(
            minlength=inter).topk(n_shared).indices if n_shared else torch.zeros(0, dtype=torch.long)
        layer = NeuronRoutedFFN(mlp, k, shared, None)
        if rank is not None:
            gate, up = (p.weight[layer.routed] for p in (mlp.gate_proj, mlp.up_proj))
            layer.router = (*whitened_low_rank(gate, moment, rank), *whitened_low_rank(up, moment, rank))
            predictor += 2 * rank * (hid + layer.routed.numel())
        layers.append(layer)
        active += 3 * hid * (k + n_shared)
        dense_macs += 3 * hid * inter
    return layers, {"active_ffn_fraction": active / dense_macs, "ffn_flops_fraction": (active + predictor) / dense_macs}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, marker in (("oracle", "*"), ("predictor", "o")):
        pts = [(r["ffn_flops_fraction"], r["ppl_ratio"]) for r in rows if r["router"].startswith(label)]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, label=label)
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_xlabel("FFN FLOPs per token / dense (chosen neurons + predictor)")
    ax.set_ylabel("perplexity / dense")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="dense model (default: the embedded SmolLM2-135M)")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.25], help="neurons kept per token")
    p.add_argument("--ranks", type=int, nargs="+", default=[64, 128], help="predictor ranks")
    p.add_argument("--shared", type=float, nargs="+", default=[0.0, 0.25],
                   help="fractions of the neurons always on (part of the kept fraction; below it)")
    p.add_argument("--calib", default=None, help="calibration text file (default: sampled from the model)")
    p.add_argument("--calib-seqs", type=int, default=32)
    p.add_argument("--ppl", default=str(DATA / "wikitext2-valid.tokens.txt"))
    p.add_argument("--ppl-tokens", type=int, default=4096)
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/neuron_predictor.json"))
    args = p.parse_args()

    torch.manual_seed(0)
    loaded = load_model(args.model)
    model = loaded.model
    dense = [layer.mlp for layer in model.layers]
    for mlp in dense:
        mlp.native = None  # the masked copies run through torch; so does the dense reference
    with torch.no_grad():
        text = Path(args.ppl).read_text(encoding="utf-8")
        tokens = text_tokens(loaded.tokenizer, text, args.ppl_tokens)
        calib = calibration_tokens(model, loaded.tokenizer, args.calib, args.calib_seqs, 256)
        inputs = ffn_inputs(model, calib)
        moments = [x.double().T @ x.double() for x in inputs]  # each layer's, once for every rank
        dense_ppl = perplexity(model, tokens)["ppl"]
        rows = []
        grid = [(f, None, s) for f in args.fractions for s in args.shared[:1]]
        grid += [(f, r, s) for f in args.fractions for r in args.ranks for s in args.shared if s < f]
        for fraction, rank, shared in tqdm(grid, desc="configurations"):
            layers, flops = configure(dense, inputs, moments, fraction, rank, shared)
            for block, layer in zip(model.layers, layers):
                block.mlp = layer
            ppl = perplexity(model, tokens, progress=False)["ppl"]
            for block, mlp in zip(model.layers, dense):
                block.mlp = mlp
            rows.append({"router": "oracle" if rank is None else f"predictor r={rank}", "fraction": fraction,
                         "shared": shared, **flops, "ppl": ppl,
                         "ppl_ratio": ppl / dense_ppl})

    print(f"\ndense ppl {dense_ppl:.2f} on {tokens.numel()} tokens; calibration: "
          f"{args.calib or 'sampled'} ({calib.numel()} tokens)")
    print("| router | kept | always on | active FFN | FFN FLOPs with router | ppl | x dense |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['router']} | {r['fraction']:.2f} | {r['shared']:.2f} | "
              f"{r['active_ffn_fraction']:.3f} | {r['ffn_flops_fraction']:.3f} | {r['ppl']:.2f} | {r['ppl_ratio']:.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "dense_ppl": dense_ppl,
                                    "rows": rows}, indent=2))
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
