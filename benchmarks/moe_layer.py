"""Dense FFN vs factorized MoE layer, side by side in one run.

For each token count and (N, K): median time of the dense FFN and of the MoE layer (each
dispatch path in `DISPATCH_PATHS`, and the whole layer with the path `tune_dispatch` picks), all
timed in turns; the speed-up over dense and its fraction of the FLOP bound (N / K for routed
experts, ignoring the router). The dense FFN runs as the engine runs it: through the C MoE kernel
as one always-on group where that runs (`native_moe.pack_dense_ffns`, CPU bf16), and beside it as
two calls of the engine's linear kernels (`kernels.linear_kernel`) for reference. The path
columns exclude the router, but for `native` (the C kernel, which routes in its own call). A path
3x slower than the fastest one at some token count is not timed at larger counts (as in
`tune_dispatch`: the gathered path would allocate ~1 GB per call at 512 tokens). Prints a table,
writes JSON.

    python benchmarks/moe_layer.py [--tokens 1 8 64 512] [--configs 8x2 16x4 32x8] [--out FILE]
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from factorllm import native_moe
from factorllm.factor_config import FactorConfig
from factorllm.factorize import factorize_layer
from factorllm.kernels import prepack_linears
from factorllm.model import GatedMLP
from factorllm.moe import DISPATCH_PATHS as PATHS
from factorllm.timing import median_in_turns

# Each timed call follows untimed ones of the same function: after the dense FFN, one warm-up call
# was not enough (the next function's first two calls measured ~0.25 ms slow).
WARM_CALLS = 3


def real_ffn(layer: int) -> GatedMLP:
    from factorllm.loading import load_model
    return load_model("default").model.layers[layer].mlp.float()


@torch.no_grad()
def run(tokens: list[int], configs: list[tuple[int, int]], repeats: int, layer: int,
        dtype: torch.dtype = torch.float32) -> list[dict]:
    base = real_ffn(layer)
    hidden = base.gate_proj.in_features
    rows = []
    for n, k in configs:
        factor = FactorConfig(experts=n, top_k=k, partition="contiguous", router_init="random")
        factor.validate(base.gate_proj.out_features)
        moe = factorize_layer(base, torch.empty(0, hidden), factor, layer).to(dtype).eval()
        linears = copy.deepcopy(base).to(dtype)
        linears.fuse()  # one matmul for gate and up, as in the engine
        dense = copy.deepcopy(linears)
        native_moe.pack_dense_ffns(dense)
        moe.collect_stats = False
        moe.router.float()  # as the engine runs them: fp32 router, its linear kernels
        prepack_linears(dense, 64)
        prepack_linears(linears, 64)
        prepack_linears(moe, 64)
        moe.tune_dispatch(max(tokens))
        paths = list(moe.available_paths)
        for t in sorted(tokens):
            x = torch.randn(t, hidden, dtype=dtype)
            _, idx, w = moe.route(x)
            fns = {"dense": lambda: dense(x), "moe": lambda: moe(x)}
            if dense.native is not None:
                fns["dense_linears"] = lambda: linears(x)
            # The C kernel routes in its own call: its column includes the router.
            fns.update({path: (lambda path=path: moe.routed(path, x) if path == "native" else getattr(moe, path)(x, idx, w))
                        for path in paths})
            times = median_in_turns(fns, repeats, WARM_CALLS)
            row = dict(tokens=t, experts=n, top_k=k)
            row.update({f"{name}_ms": times[name] * 1e3 if name in times else None for name in ["dense", "dense_linears", "moe", *PATHS]})
            fastest = min(times[path] for path in paths)
            paths = [path for path in paths if times[path] <= 3 * fastest]
            row["path"] = moe.path_for(t)
            row["speedup"] = row["dense_ms"] / row["moe_ms"]
            row["flop_bound"] = n / k
            row["fraction_of_bound"] = row["speedup"] / row["flop_bound"]
            rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 512])
    p.add_argument("--configs", nargs="+", default=["8x2", "16x4", "16x8", "32x8"], help="NxK pairs")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--layer", type=int, default=10, help="which real layer of the default model to split")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--out", default="benchmarks/out/moe_layer.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = [tuple(int(v) for v in c.split("x")) for c in args.configs]
    rows = run(args.tokens, configs, args.repeats, args.layer, getattr(torch, args.dtype))
    print(f"| tokens | N | K | dense ms | dense 2 linears ms | MoE ms (picked path) | {' | '.join(PATHS)} | speed-up | FLOP bound | of bound |")
    print("|---:|---:|---:|---:|---:|---:|" + "---:|" * len(PATHS) + "---:|---:|---:|")
    for r in rows:
        linears, *paths = ("-" if r[f"{path}_ms"] is None else f"{r[f'{path}_ms']:.3f}" for path in ["dense_linears", *PATHS])
        print(f"| {r['tokens']} | {r['experts']} | {r['top_k']} | {r['dense_ms']:.3f} | {linears} | {r['moe_ms']:.3f} ({r['path']}) | "
              f"{' | '.join(paths)} | {r['speedup']:.2f}x | {r['flop_bound']:.1f}x | {r['fraction_of_bound']:.2f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": torch.get_num_threads(), "dtype": args.dtype, "repeats": args.repeats, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
