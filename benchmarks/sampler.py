"""Sampler cost per step: `sample()` (top-k/top-p among each row's most likely tokens) against
sorting the whole vocabulary, side by side on the default model's real next-token logits.

    python benchmarks/sampler.py [--rows 1 16 32] [--repeats 20] [--out FILE]

Logits come from the model on 32 different text snippets (README lines); each cell is the median
of --repeats calls, the two methods timed in turns. Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from factorllm.loading import load_model  # noqa: E402
from server.sampling import SampleRow, _sample_whole, make_generator, sample  # noqa: E402

SETTINGS = {"temperature 1, top_p 0.95": (1.0, 0.95, 0), "temperature 0.8, top_p 0.9, top_k 50": (0.8, 0.9, 50)}


@torch.inference_mode()
def real_logits(n: int) -> torch.Tensor:
    loaded = load_model("default")
    words = (Path(__file__).resolve().parents[1] / "README.md").read_text().split()
    snippets = [" ".join(words[i * 20:i * 20 + 30]) for i in range(n)]
    return torch.cat([loaded.model(torch.tensor([loaded.tokenizer.encode(s)]))[:, -1] for s in snippets]).float()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16, 32])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "sampler.json")
    args = p.parse_args(argv)
    logits = real_logits(max(args.rows))
    results = []
    print("| rows | setting | full sort ms | sample() ms | speed-up |\n|---:|---|---:|---:|---:|")
    for n in args.rows:
        for name, (t, top_p, top_k) in SETTINGS.items():
            rows = [SampleRow(t, top_p, top_k, make_generator(i, torch.device("cpu"))) for i in range(n)]
            u = {i: torch.rand(()) for i in range(n)}
            fns = {"full_sort": lambda: _sample_whole(logits[:n], rows, list(range(n)), u, sort=True),
                   "sample": lambda: sample(logits[:n].clone(), rows)}
            times = {k: [] for k in fns}
            for _ in range(args.repeats):
                for k, fn in fns.items():
                    t0 = time.perf_counter()
                    fn()
                    times[k].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) * 1000 for k, v in times.items()}
            results.append({"rows": n, "setting": name, "ms": med})
            print(f"| {n} | {name} | {med['full_sort']:.2f} | {med['sample']:.2f} | "
                  f"{med['full_sort'] / med['sample']:.1f}x |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": torch.get_num_threads(), "results": results}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
