"""Quality and cost of a (dense or factorized) model: perplexity, multiple choice, FLOPs, speed.

Conventions follow lm-evaluation-harness so numbers are comparable:
  * perplexity: the text's tokens scored in windows of `window` tokens advanced by `stride`;
    each window scores only the tokens the previous window did not (the first scores all but
    its first token), so every token after the first is scored exactly once.
  * multiple choice: each choice's score is the sum of the log-probabilities of its
    continuation tokens given the context; the continuation is " " + choice (the context's
    trailing whitespace moves into it), tokenized as encode(context + continuation) minus
    encode(context). `acc` takes the best sum, `acc_norm` the best sum divided by the
    choice's length in UTF-8 bytes.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .calibration import read_text
from .errors import SourceError
from .info import model_summary
from .loading import LoadedModel


# ---------------------------------------------------------------- perplexity

@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, window: int = 256, stride: int | None = None,
               batch_size: int = 4, progress: bool = True) -> dict:
    """Perplexity of a 1-D token stream scored in windows; returns ppl, nll (mean) and tokens scored."""
    stride = stride or window
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window], got {stride}")
    n = tokens.numel()
    if n < 2:
        raise SourceError("perplexity needs at least 2 tokens")
    spans = []  # (start, end, first scored position within the window)
    prev_end = 0
    for start in range(0, n - 1, stride):
        end = min(start + window, n)
        spans.append((start, end, max(prev_end - start, 1)))
        prev_end = end
        if end == n:
            break
    device = model.lm_head.weight.device
    total, count = 0.0, 0
    for b in tqdm(range(0, len(spans), batch_size), desc="perplexity", unit="batch", disable=not progress):
        group = spans[b:b + batch_size]
        width = max(e - s for s, e, _ in group)
        batch = torch.zeros(len(group), width, dtype=torch.long)
        for i, (s, e, _) in enumerate(group):
            batch[i, :e - s] = tokens[s:e]
        logp = model(batch.to(device)).float().log_softmax(-1)
        for i, (s, e, first) in enumerate(group):
            target = batch[i, first:e - s].to(device)
            total -= logp[i, first - 1:e - s - 1].gather(-1, target[:, None]).sum().item()
            count += target.numel()
    nll = total / count
    return {"ppl": math.exp(nll), "nll": nll, "tokens": count}


def text_tokens(tokenizer, text: str, limit_tokens: int | None = None) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if limit_tokens:
        ids = ids[:limit_tokens]
    return torch.tensor(ids, dtype=torch.long)


# ---------------------------------------------------------------- multiple choice

def piqa_items(lines: list[dict], labels_path: Path, path: str) -> list[dict]:
    """PIQA's release format (goal/sol1/sol2 + a labels file) as generic items, lm-eval's prompt."""
    if not labels_path.is_file():
        raise SourceError(f"{path} is in PIQA format but its labels file {labels_path} is missing")
    labels = [ln.strip() for ln in labels_path.read_text().splitlines() if ln.strip()]
    if len(labels) != len(lines):
        raise SourceError(f"{labels_path} has {len(labels)} labels for {len(lines)} items in {path}")
    return [{"context": f"Question: {d['goal']}\nAnswer:", "choices": [d["sol1"], d["sol2"]], "label": int(y)}
            for d, y in zip(lines, labels)]


def read_mc_items(path: str | Path, limit: int | None = None) -> list[dict]:
    """Items {"context", "choices", "label"} from JSONL; PIQA files (goal/sol1/sol2) are adapted,
    their labels read from `<name>-labels.lst` beside them."""
    text = read_text(path, "multiple-choice")
    lines = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise SourceError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(d, dict):
            raise SourceError(f"{path}:{n}: expected a JSON object")
        lines.append(d)
    if lines and all(k in lines[0] for k in ("goal", "sol1", "sol2")):
        p = Path(path)
        items = piqa_items(lines, p.with_name(p.stem + "-labels.lst"), str(path))
    else:
        items = lines
    for n, d in enumerate(items, 1):
        missing = [k for k in ("context", "choices", "label") if k not in d]
        if missing:
            raise SourceError(f"{path}: item {n} lacks field(s) {', '.join(missing)} "
                              "(expected {\"context\", \"choices\", \"label\"} or PIQA's goal/sol1/sol2)")
        if not isinstance(d["choices"], list) or len(d["choices"]) < 2 or not all(isinstance(c, str) for c in d["choices"]):
            raise SourceError(f"{path}: item {n}: \"choices\" must be a list of at least 2 strings")
        if not isinstance(d["label"], int) or not 0 <= d["label"] < len(d["choices"]):
            raise SourceError(f"{path}: item {n}: \"label\" must be an index into \"choices\"")
    return items[:limit] if limit else items


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing context whitespace moves to the continuation; the continuation's
    tokens are those of encode(context + continuation) after encode(context)."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    whole = tokenizer(stripped + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(stripped, add_special_tokens=False)["input_ids"]
    if not ctx:  # lm-eval prefixes an end-of-text token when the context is empty
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], whole
    return ctx, whole[len(ctx):]


@torch.no_grad()
def choice_loglikelihoods(model, tokenizer, items: list[dict], batch_size: int = 16,
                          max_len: int = 1024, progress: bool = True) -> list[list[float]]:
    """Per item, each choice's summed continuation log-probability (lm-eval `loglikelihood`)."""
    requests = []  # (item, choice, context ids, continuation ids)
    for i, d in enumerate(items):
        for j, c in enumerate(d["choices"]):
            ctx, cont = encode_pair(tokenizer, d["context"], " " + c if not c[:1].isspace() else c)
            seq = (ctx + cont)[-(max_len + 1):]
            requests.append((i, j, seq, len(cont)))
    order = sorted(range(len(requests)), key=lambda r: -len(requests[r][2]))
    device = model.lm_head.weight.device
    out = [[0.0] * len(d["choices"]) for d in items]
    for b in tqdm(range(0, len(order), batch_size), desc="multiple choice", unit="batch", disable=not progress):
        group = [requests[r] for r in order[b:b + batch_size]]
        width = max(len(seq) for *_, seq, _ in group) - 1
        inp = torch.zeros(len(group), width, dtype=torch.long)
        for k, (_, _, seq, _) in enumerate(group):
            inp[k, :len(seq) - 1] = torch.tensor(seq[:-1])
        logp = model(inp.to(device)).float().log_softmax(-1)
        for k, (i, j, seq, n_cont) in enumerate(group):
            L = len(seq) - 1
            target = torch.tensor(seq[-n_cont:], device=device)
            out[i][j] = logp[k, L - n_cont:L].gather(-1, target[:, None]).sum().item()
    return out


def mc_scores(items: list[dict], lls: list[list[float]]) -> dict:
    """acc, acc_norm (by UTF-8 byte length of each choice) and chance level."""
    acc = acc_norm = 0
    for d, ll in zip(items, lls):
        acc += max(range(len(ll)), key=lambda j: ll[j]) == d["label"]
        norm = [x / max(len(c.encode("utf-8")), 1) for x, c in zip(ll, d["choices"])]
        acc_norm += max(range(len(norm)), key=lambda j: norm[j]) == d["label"]
    n = len(items)
    return {"acc": acc / n, "acc_norm": acc_norm / n, "chance": sum(1 / len(d["choices"]) for d in items) / n,
            "items": n}


# ---------------------------------------------------------------- cost

@torch.no_grad()
def tokens_per_second(model, batch: int = 1, seq_len: int = 256, repeats: int = 3) -> float:
    """Measured throughput of a full forward pass (prefill) on random tokens, median of repeats."""
    device = model.lm_head.weight.device
    x = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    model(x[:, :16])
    times = []
    for _ in range(repeats):
        if x.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return batch * seq_len / sorted(times)[repeats // 2]


def evaluate(loaded: LoadedModel, ppl_file: str | None = None, mc_file: str | None = None,
             limit: int | None = None, window: int = 256, stride: int | None = None,
             ppl_tokens: int | None = None, speed: bool = True, progress: bool = True) -> dict:
    """All metrics of one model; keys not measured are None. `limit` caps multiple-choice items,
    `ppl_tokens` the tokens read from the perplexity file."""
    model = loaded.model.eval()
    summary = model_summary(model.config, loaded.factor, context=window)
    result = {"model": loaded.name, "ppl": None, "acc": None, "acc_norm": None, "chance": None,
              "active_ffn_fraction": summary["active_ffn_fraction"],
              "flops_per_token": summary["flops_per_token"]["total_active"], "tokens_per_s": None}
    if ppl_file:
        tokens = text_tokens(loaded.tokenizer, read_text(ppl_file, "perplexity text"), ppl_tokens)
        p = perplexity(model, tokens, window, stride, progress=progress)
        result.update(ppl=p["ppl"], ppl_tokens=p["tokens"])
    if mc_file:
        items = read_mc_items(mc_file, limit)
        s = mc_scores(items, choice_loglikelihoods(model, loaded.tokenizer, items, progress=progress))
        result.update(acc=s["acc"], acc_norm=s["acc_norm"], chance=s["chance"], mc_items=s["items"])
    if speed:
        result["tokens_per_s"] = tokens_per_second(model)
    return result


def compare(result: dict, baseline: dict) -> dict:
    """Ratios against a baseline: ppl ratio, accuracy retention, above-chance retention."""
    def ratio(a, b):
        return None if a is None or b is None or b == 0 else a / b
    out = {"ppl_ratio": ratio(result["ppl"], baseline["ppl"]),
           "acc_retention": ratio(result["acc"], baseline["acc"]),
           "acc_norm_retention": ratio(result["acc_norm"], baseline["acc_norm"]),
           "flops_ratio": ratio(result["flops_per_token"], baseline["flops_per_token"]),
           "speedup": ratio(result["tokens_per_s"], baseline["tokens_per_s"])}
    for key in ("acc", "acc_norm"):
        c = result.get("chance")
        out[f"{key}_above_chance_retention"] = (
            None if result[key] is None or baseline[key] is None or baseline[key] == c
            else (result[key] - c) / (baseline[key] - c))
    return out
