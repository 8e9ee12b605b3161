"""`factorllm serve`: load (factorizing a dense source once, cached), start the engine, serve HTTP.

Every flag can also be set as an environment variable `FACTORLLM_<FLAG>` (see settings.py);
a flag given on the command line wins.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import time

from factorllm.commands.common import add_factor_arguments
from factorllm.device import off_main_thread
from factorllm.errors import UsageError

from .settings import EXPERT_METRICS, ServerSettings

HELP = "serve a model (factorized by default) over an OpenAI-compatible HTTP API"
log = logging.getLogger("factorllm.serve")

# flag dest -> settings field (all the same name)
FIELDS = ("model", "dense", "preset", "experts", "top_k", "top_k_per_layer", "dense_layers", "shared_experts", "partition", "gate", "router_init",
          "seed", "calib", "calib_seqs", "served_model_name", "host", "port", "device", "dtype", "quantize", "max_num_seqs",
          "max_model_len", "max_num_batched_tokens", "prefix_caching", "max_queued_requests", "max_body_bytes", "api_key", "cors_origins",
          "shutdown_timeout", "expert_metrics", "expert_timing_every")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="'default' (embedded SmolLM2-135M-Instruct), a .gguf file, a Hugging Face Llama-family "
                        "directory, or a factorized checkpoint directory [env FACTORLLM_MODEL]")
    p.add_argument("--dense", action="store_true", default=None,
                   help="serve the dense model as is (no factorization; for A/B comparison)")
    add_factor_arguments(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", help="bind address (default 127.0.0.1)")
    g.add_argument("--port", type=int, help="port (default 8000)")
    g.add_argument("--served-model-name", help="model name in the API (default: the model's name)")
    g.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/* [env FACTORLLM_API_KEY]")
    g.add_argument("--cors-origin", dest="cors_origins", action="append", metavar="ORIGIN",
                   help="allow browser calls from ORIGIN (repeatable; CORS is off by default) "
                        "[env FACTORLLM_CORS_ORIGINS as a JSON list]")
    g.add_argument("--max-queued-requests", type=int,
                   help="sequences allowed to wait beyond --max-num-seqs; more get 429 (default 64)")
    g.add_argument("--max-body-bytes", type=int, help="largest request body; larger get 413 (default 4 MiB)")
    g.add_argument("--shutdown-timeout", type=float,
                   help="on SIGTERM, seconds to let in-flight requests finish (default 30)")
    g.add_argument("--expert-metrics", choices=EXPERT_METRICS,
                   help="expert metric labels: per-expert (layer x expert), per-layer or off (default per-expert)")
    e = p.add_argument_group("engine")
    e.add_argument("--device", choices=("auto", "cuda", "cpu"), help="default auto: cuda when available")
    e.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), help="default auto")
    e.add_argument("--quantize", choices=("auto", "none", "int8"),
                   help="int8: weights rounded to 8 bits per output row and run by torch's int8 kernel at decode "
                        "sizes (CPU, fp32 or bf16 activations; perplexity ~1.002x; 1.2-1.4x faster decoding at 1-2 "
                        "sequences on a bf16 CPU). Default auto: int8 on CPUs without native bf16 when --dtype is "
                        "auto, none otherwise")
    e.add_argument("--max-num-seqs", type=int, help="concurrent sequences in a batch (default 16)")
    e.add_argument("--max-model-len", type=int, help="prompt + completion tokens per sequence (default 2048)")
    e.add_argument("--max-num-batched-tokens", type=int, help="tokens per engine step (default 2048)")
    e.add_argument("--prefix-caching", choices=("on", "off"),
                   help="reuse the keys/values a finished request left for a prompt that starts with the same "
                        "tokens, e.g. a chat's next turn (default on)")
    e.add_argument("--expert-timing-every", type=int, help="time experts every Nth decode-only step (default 16)")


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    given = {f: getattr(args, f) for f in FIELDS if getattr(args, f, None) is not None}
    try:
        return ServerSettings(**given)
    except Exception as e:  # pydantic ValidationError: a bad environment variable or flag value
        errors = getattr(e, "errors", None)
        if errors:
            first = errors()[0]
            where = ".".join(str(x) for x in first.get("loc", ()))
            raise UsageError(f"invalid setting {where} (flag --{where.replace('_', '-')} or "
                             f"FACTORLLM_{where.upper()}): {first.get('msg')}") from None
        raise


def load_for_serving(settings: ServerSettings):
    """The model to serve: a factorized checkpoint as is, a dense source factorized (cached) unless
    --dense, with the quality preset unless flags say otherwise."""
    from factorllm.loading import load_model, read_config, resolve_dense_dir
    from factorllm.pipeline import cached_factorized, factor_config_from, reroute_flags, with_top_k

    t0 = time.perf_counter()
    path, dense_name = resolve_dense_dir(settings.model)
    hf = read_config(path)
    log.info("resolved model %s -> %s in %.1f s", settings.model, path, time.perf_counter() - t0)
    t1 = time.perf_counter()
    if "factorllm" in hf:
        reroute = reroute_flags(settings.model, dict(settings.factor_overrides(), preset=settings.preset,
                                                     dense=settings.dense))
        loaded = with_top_k(load_model(settings.model), **reroute)
        what = "factorized checkpoint"
    elif settings.dense:
        if settings.has_factor_flags():
            raise UsageError("--dense cannot be combined with factorization flags (--preset, --experts, ...)")
        loaded = load_model(settings.model)
        what = "dense model"
    else:
        explicit = settings.experts is not None and settings.top_k is not None
        preset = settings.preset or (None if explicit else "quality")
        factor = factor_config_from(preset, **settings.factor_overrides())
        loaded = cached_factorized(settings.model, factor, settings.calib)
        recipe = preset if preset and not any(v is not None for v in settings.factor_overrides().values()) \
            else f"e{factor.experts}k{factor.top_k}"
        loaded.name = f"{dense_name}-factorized-{recipe}"
        what = f"factorized ({preset or 'custom'}) model"
    load_s = time.perf_counter() - t1
    f = loaded.factor
    layers = loaded.model.config.num_hidden_layers
    if f is None:
        detail = "dense FFN"
    else:
        ks = f.top_k_per_layer
        k = f"top-{min(ks)}..{max(ks)} by layer (mean {f.top_k})" if ks else f"top-{f.top_k}"
        detail = f"{f.experts} experts + {f.shared_experts} shared, {k}, active FFN {f.active_ffn_fraction(layers):.1%}"
    log.info("loaded %s %s from %s in %.1f s (%s)", what, loaded.name, loaded.path, load_s, detail)
    return loaded


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if settings.quantize == "int8":  # refused before minutes of loading, not at engine start
        from factorllm.device import int8_dtype, resolve_device
        try:
            int8_dtype(settings.dtype, resolve_device(settings.device))
        except ValueError as e:
            raise UsageError(str(e)) from None
    return serve(settings)


def serve(settings: ServerSettings, loaded=None) -> int:
    import uvicorn

    from .app import create_app

    t0 = time.perf_counter()
    # Loading runs off the main thread (see off_main_thread), as does the engine's construction.
    app = create_app(settings, loaded if loaded is not None else off_main_thread(lambda: load_for_serving(settings)))
    state = app.state.server
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                            timeout_graceful_shutdown=5, lifespan="on", access_log=True)
    server = DrainingServer(config, state, settings.shutdown_timeout)
    log.info("serving %s on http://%s:%d (model load took %.1f s)", state.model_name, settings.host,
             settings.port, time.perf_counter() - t0)
    server.run()
    if not server.started:
        return 1
    log.info("shut down cleanly")
    return 0


class DrainingServer:
    """uvicorn's server with a graceful SIGTERM: /ready 503 and new requests refused at once, in-flight
    requests finish (up to the shutdown timeout), then uvicorn stops; the process exits 0."""

    def __new__(cls, config, state, shutdown_timeout: float):
        import uvicorn

        class _Server(uvicorn.Server):
            def __init__(self):
                super().__init__(config)
                self._draining = False
                self._loop: asyncio.AbstractEventLoop | None = None

            async def serve(self, sockets=None):
                self._loop = asyncio.get_running_loop()
                await super().serve(sockets)

            def handle_exit(self, sig, frame):
                # Do not record the signal: uvicorn would re-raise it after shutdown (exit status != 0).
                if self._draining or self._loop is None or not self.started:
                    if self._draining and sig == signal.SIGINT:
                        self.force_exit = True
                    self.should_exit = True
                    return
                self._draining = True
                log.info("received %s: draining (timeout %.0f s)", signal.Signals(sig).name, shutdown_timeout)
                self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain()))

            async def _drain(self):
                finished = await state.drain(shutdown_timeout)
                if not finished:
                    state.abort_all()
                    await asyncio.sleep(0.2)
                self.should_exit = True

        return _Server()
