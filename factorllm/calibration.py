"""Calibration tokens for factorization and router training: from a text file, or sampled
from the dense model itself so that factorizing needs no data set."""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from tqdm import tqdm

from .device import resolve_dtype
from .errors import SourceError
from .kv_cache import CacheBatch, KVCache
from .sampling import draw

# Short, varied openings; the model writes the rest.
SEED_PROMPTS = ["The", "In 1998,", "Once upon a time", "The results show that", "def main():",
                "Question: Why", "Dear", "According to the report,", "A recipe for", "The history of",
                "Scientists have", "import numpy as np", "Chapter 1", "Yesterday", "The main reason",
                "How to"]


def read_text(path: str | Path, what: str = "calibration") -> str:
    """A non-empty UTF-8 text file, or a one-line SourceError naming `what` it was for."""
    p = Path(path)
    if not p.is_file():
        raise SourceError(f"{what} file not found: {path}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SourceError(f"{what} file {path} is not UTF-8 text") from None
    if not text.strip():
        raise SourceError(f"{what} file {path} is empty")
    return text


def tokens_from_text(tokenizer, text: str, num_seqs: int, seq_len: int) -> torch.Tensor:
    """Up to `num_seqs` consecutive windows of `seq_len` tokens, spread over the text."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // seq_len
    if n == 0:
        raise SourceError(f"calibration text has {len(ids)} tokens, fewer than one window of {seq_len}")
    windows = torch.tensor(ids[:n * seq_len]).view(n, seq_len)
    pick = torch.linspace(0, n - 1, min(num_seqs, n)).round().long()
    return windows[pick]


@torch.no_grad()
def sample_from_model(model, tokenizer, num_seqs: int, seq_len: int, seed: int = 0,
                      temperature: float = 1.0) -> torch.Tensor:
    """`num_seqs` sequences of `seq_len` tokens sampled from the model (KV cache, one batch), in
    the fastest dtype of its device (bf16 on CPUs with bf16 matmuls: 2x faster than fp32 here;
    the model is copied for that and left as it is)."""
    device = model.lm_head.weight.device
    dtype = resolve_dtype("auto", device)
    if model.lm_head.weight.dtype != dtype:
        model = copy.deepcopy(model).to(dtype)
    prompts = [tokenizer(SEED_PROMPTS[i % len(SEED_PROMPTS)], add_special_tokens=False)["input_ids"]
               for i in range(num_seqs)]
    width = max(map(len, prompts))
    cache = KVCache.for_model(model, num_seqs, seq_len + width)
    gen = torch.Generator(device=device).manual_seed(seed)
    seqs = [list(p) for p in prompts]
    pending = [torch.tensor(p) for p in prompts]
    for _ in tqdm(range(seq_len), desc="sampling calibration text", unit="tok"):
        lengths = [len(p) for p in pending]
        tokens = torch.zeros(num_seqs, max(lengths), dtype=torch.long)
        for i, p in enumerate(pending):
            tokens[i, :len(p)] = p
        starts = [len(s) - len(p) for s, p in zip(seqs, pending)]
        batch = CacheBatch.build(list(range(num_seqs)), starts, lengths, device)
        logits = model(tokens.to(device), cache=cache, batch=batch)
        last = logits[torch.arange(num_seqs), torch.tensor(lengths) - 1].float()
        u = torch.rand(num_seqs, generator=gen, device=device)
        nxt = draw((last / temperature).softmax(-1), u).cpu()
        for s, t in zip(seqs, nxt.tolist()):
            s.append(t)
        pending = [nxt[i:i + 1] for i in range(num_seqs)]
    return torch.tensor([s[-seq_len:] for s in seqs])


def calibration_tokens(model, tokenizer, calib_file: str | None, num_seqs: int = 16, seq_len: int = 256,
                       seed: int = 0) -> torch.Tensor:
    if calib_file:
        return tokens_from_text(tokenizer, read_text(calib_file), num_seqs, seq_len)
    return sample_from_model(model, tokenizer, num_seqs, seq_len, seed)
