"""From a model source and a factorization recipe to a loaded factorized model, with caching."""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from .calibration import calibration_tokens
from .checkpoint import save_checkpoint
from .errors import SourceError, UsageError
from .factor_config import CHECKPOINT_FORMAT, PRESETS, FactorConfig
from .factorize import factorize
from .loading import LoadedModel, build_cache_entry, cache_dir, load_model, resolve_dense_dir
from .moe import MoEFFN

log = logging.getLogger(__name__)


def factor_config_from(preset: str | None, **overrides) -> FactorConfig:
    """A preset's settings with explicit (non-None) overrides applied."""
    if preset is not None and preset not in PRESETS:
        raise SourceError(f"unknown preset {preset!r}: choose from {', '.join(PRESETS)}")
    settings = dict(PRESETS[preset]) if preset else {}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    if overrides.get("top_k_per_layer") and overrides.get("top_k") is None:  # the preset's K no longer applies
        settings["top_k"] = round(sum(overrides["top_k_per_layer"]) / len(overrides["top_k_per_layer"]))
    if "experts" not in settings or "top_k" not in settings:
        raise SourceError("give --preset, or both --experts and --top-k")
    return FactorConfig(**settings)


def factorize_source(source: str | None, factor: FactorConfig, calib_file: str | None = None,
                     calib_len: int = 256) -> LoadedModel:
    """Load a dense source and factorize it in memory (calibration text sampled if none given)."""
    loaded = load_model(source)
    if loaded.factor is not None:
        raise SourceError(f"{source} is already factorized")
    factor.base = loaded.source
    factor.calib = calib_file or "self-generated"
    cfg = loaded.model.config
    factor.validate(cfg.intermediate_size, cfg.num_hidden_layers)  # before minutes of sampling
    t0 = time.perf_counter()
    calib = calibration_tokens(loaded.model, loaded.tokenizer, calib_file, factor.calib_seqs, calib_len,
                               factor.seed) if factor.needs_calibration else None
    factorize(loaded.model, factor, calib)
    log.info("factorized %s (%d experts, top-%d) in %.1f s", loaded.name, factor.experts, factor.top_k,
             time.perf_counter() - t0)
    loaded.factor = factor
    return loaded


def cached_factorized(source: str | None, factor: FactorConfig, calib_file: str | None = None) -> LoadedModel:
    """Factorize once per (source, recipe) and reuse the saved checkpoint afterwards."""
    dense_dir, name = resolve_dense_dir(source)
    recipe = {k: v for k, v in factor.to_dict().items() if k not in ("base", "calib", "intermediate_size", "name")}
    key = json.dumps([CHECKPOINT_FORMAT, str(Path(dense_dir).resolve()), recipe, calib_file], sort_keys=True)
    out = cache_dir() / "factorized" / f"{name}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    build_cache_entry(out, (out / "config.json").is_file, write_factorized, source, factor, calib_file, out)
    return load_model(str(out))


def write_factorized(source: str | None, factor: FactorConfig, calib_file: str | None, out: Path) -> None:
    save_checkpoint(factorize_source(source, factor, calib_file), factor, out)
    log.info("saved factorized checkpoint to %s", out)


def reroute_flags(source: str, flags: dict) -> dict:
    """Of the factorization flags given with an already factorized `source` (None or False: not
    given), the two that reroute it, as `with_top_k`'s arguments; any other would need a rebuild."""
    reroute = {k: flags.get(k) for k in ("top_k", "top_k_per_layer")}
    rebuild = sorted(k for k, v in flags.items() if k not in reroute and v is not None and v is not False)
    if rebuild:
        raise UsageError(f"{source} is already factorized: drop {', '.join('--' + k.replace('_', '-') for k in rebuild)} "
                         "(of the factorization flags only --top-k and --top-k-per-layer apply: they reroute it)")
    return reroute


def with_top_k(loaded: LoadedModel, top_k: int | None = None, top_k_per_layer: list[int] | None = None) -> LoadedModel:
    """Route a factorized model's tokens to a different number of experts than it was built with
    (as llama.cpp lets Mixtral users change its experts per token): one checkpoint, several
    speed/quality points, no rebuild. `top_k` is the new mean K, spread over the layers as at
    build time (its dense first layers stay dense, see FactorConfig.resolve_layer_top_k);
    `top_k_per_layer` gives every layer's K. A refit checkpoint's down projections stay fit for the
    built K: with every expert on, the presets are 1.14x and 1.30x of dense perplexity, not 1x."""
    if top_k is None and top_k_per_layer is None:
        return loaded
    if loaded.factor is None:
        raise UsageError(f"{loaded.source} is not factorized: --top-k reroutes factorized checkpoints only")
    factor = loaded.factor.rerouted(top_k, top_k_per_layer, loaded.model.config.num_hidden_layers)
    for i, layer in enumerate(loaded.model.layers):
        if isinstance(layer.mlp, MoEFFN):
            layer.mlp.set_top_k(factor.layer_top_k(i))
    loaded.factor = factor
    loaded.name = f"{loaded.name}-k{factor.top_k}"
    return loaded
