"""Shared fixtures: the real embedded default model, converted once per cache directory."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("FACTORLLM_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "factorllm"))
torch.manual_seed(0)


@pytest.fixture(scope="session")
def default_model():
    """The dense default model (SmolLM2-135M-Instruct), fp32 on CPU. Do not modify it in place:
    use `fresh_default_model` for a copy you may factorize."""
    from factorllm.loading import load_model
    return load_model("default")


@pytest.fixture
def fresh_default_model(default_model):
    loaded = copy.copy(default_model)
    loaded.model = copy.deepcopy(default_model.model)
    return loaded


@pytest.fixture(scope="session")
def sample_tokens(default_model):
    """Four real sentences, tokenized and cut to 24 tokens: [4, 24]."""
    texts = ["The capital of France is Paris, and the capital of Germany is Berlin. Many tourists visit "
             "both cities every summer to see the museums and parks.",
             "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)",
             "Photosynthesis is the process by which green plants use sunlight to synthesize foods from "
             "carbon dioxide and water, releasing oxygen as a by-product.",
             "Once upon a time, in a small village at the edge of a great forest, there lived an old "
             "woodcutter and his three daughters, who loved stories."]
    tok = default_model.tokenizer
    return torch.tensor([tok(t)["input_ids"][:24] for t in texts])


# The shared `factorllm serve` subprocess and an openai client for it (tests/server_fixture.py).
from server_fixture import oai, served, served_model  # noqa: E402,F401
