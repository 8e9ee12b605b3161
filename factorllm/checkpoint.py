"""Saving a factorized model as a checkpoint directory that `loading.load_model` reads back.

Layout: config.json (the base model's Hugging Face config plus a `factorllm` section),
model.safetensors, and the tokenizer files.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from .factor_config import CHECKPOINT_FORMAT, FactorConfig
from .loading import WEIGHTS_FILE, LoadedModel


def save_checkpoint(loaded: LoadedModel, factor: FactorConfig, out: str | Path) -> Path:
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().contiguous().cpu() for k, v in loaded.model.state_dict().items()}
    if loaded.model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
    config = {k: v for k, v in loaded.hf_config.items() if k != "factorllm"}
    config["factorllm"] = {**factor.to_dict(), "format": CHECKPOINT_FORMAT}
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    loaded.tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
