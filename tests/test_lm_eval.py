"""lm-evaluation-harness (`local-completions`) scores a small local multiple-choice task against the
running server (echo + logprobs); its accuracy and per-choice log-likelihoods equal the direct
computation on the same model (`factorllm eval`'s multiple-choice scoring)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is in the `test` extra: pip install -e '.[test]'")

DATA = Path(__file__).parent / "data" / "mc_tiny.jsonl"
TASK = """task: factorllm_mc_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def _reference(loaded, items: list[dict]) -> tuple[float, list[list[float]]]:
    try:
        from factorllm.evaluate import choice_loglikelihoods, mc_scores
    except ImportError:  # computed directly, the same way
        import torch
        tok, model = loaded.tokenizer, loaded.model
        lls = []
        for d in items:
            row = []
            for c in d["choices"]:
                ctx = tok(d["context"], add_special_tokens=False)["input_ids"]
                whole = tok(d["context"] + " " + c, add_special_tokens=False)["input_ids"]
                with torch.no_grad():
                    logp = model(torch.tensor([whole[:-1]])).float().log_softmax(-1)[0]
                row.append(sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole))))
            lls.append(row)
        acc = sum(max(range(len(r)), key=r.__getitem__) == d["label"] for r, d in zip(lls, items)) / len(items)
        return acc, lls
    lls = choice_loglikelihoods(loaded.model, loaded.tokenizer, items, progress=False)
    return mc_scores(items, lls)["acc"], lls


def test_lm_eval_local_completions_matches_direct_scoring(served, served_model, tmp_path, monkeypatch):
    import httpx
    card = httpx.get(served.url + "/v1/models").json()["data"][0]
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "factorllm_mc_tiny.yaml").write_text(TASK.format(data=DATA))
    for k, v in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                 "HF_DATASETS_CACHE": str(tmp_path / "hf")}.items():
        monkeypatch.setenv(k, v)
    import time
    t0 = time.perf_counter()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    model_args = (f"model={card['id']},base_url={served.url}/v1/completions,tokenizer_backend=huggingface,"
                  f"tokenizer={card['root']},num_concurrent=4,max_retries=1,timeout=120")
    results = simple_evaluate(model="local-completions", model_args=model_args, tasks=["factorllm_mc_tiny"],
                              task_manager=TaskManager(include_path=str(tasks)), batch_size=1, log_samples=True)
    acc = results["results"]["factorllm_mc_tiny"]["acc,none"]
    print(f"lm-eval took {time.perf_counter() - t0:.1f} s")
    samples = sorted(results["samples"]["factorllm_mc_tiny"], key=lambda s: s["doc_id"])

    items = [json.loads(l) for l in DATA.read_text().splitlines() if l.strip()]
    ref_acc, ref_lls = _reference(served_model, items)
    got_lls = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    for got, want in zip(got_lls, ref_lls):
        assert got == pytest.approx(want, abs=2e-3)
    assert acc == ref_acc
    print(f"lm-eval local-completions acc={acc:.3f} (direct scoring {ref_acc:.3f}) on {len(items)} items")
