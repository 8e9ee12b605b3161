"""The FastAPI app: OpenAI-compatible routes over the engine, health, readiness and metrics.

`create_app(settings, loaded)` builds an app whose lifespan starts the engine; readiness turns on
after a warm-up request. Every error is answered in OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from factorllm import __version__
from factorllm.device import off_main_thread

from .metrics import SequenceTimer, ServerMetrics
from .protocol import (
    ChatChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
    ChatLogprobs, ChatResponseMessage, ChatStreamChoice, ChatTokenLogprob, ChatTopLogprob,
    CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, DeltaMessage,
    DetokenizeRequest, DetokenizeResponse, ErrorInfo, ErrorResponse, ModelCard, ModelList,
    TokenizeRequest, TokenizeResponse, UsageInfo, random_id,
)
from .settings import ServerSettings

log = logging.getLogger("factorllm.server")


# --------------------------------------------------------------------------- errors

class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None,
                 reason: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}
        self.reason = reason  # label of factorllm_requests_rejected_total


def error_response(status: int, message: str, type: str, param: str | None = None, code=None,
                   headers: dict | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _validation_message(errors: list[dict]) -> tuple[str, str | None]:
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value").removeprefix("Value error, ")  # pydantic's, for ValueErrors
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return (f"{param}: {msg}{more}" if param else f"{msg}{more}"), param


# --------------------------------------------------------------------------- OpenAPI

# Bodies are parsed by hand (`_parse`: size limit first, then JSON, then the model), so FastAPI
# cannot see them: these route arguments put them into /openapi.json for clients and fuzzers.
ERROR_STATUSES = (400, 401, 404, 413, 429, 500, 503)


def _documented(request_model: type[BaseModel] | None, response_model: type[BaseModel],
                streams: bool = False, errors=ERROR_STATUSES) -> dict:
    ok: dict = {"model": response_model}
    if streams:  # OpenAPI 3.1: the schema describes one event; its data is a JSON chunk or [DONE]
        event = {"type": "object", "properties": {"data": {"type": "string"}}, "required": ["data"]}
        ok["content"] = {"text/event-stream": {"schema": event}}
    kwargs: dict = {"responses": {200: ok, **{code: {"model": ErrorResponse} for code in errors}}}
    if request_model is not None:
        ref = {"$ref": f"#/components/schemas/{request_model.__name__}"}
        kwargs["openapi_extra"] = {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}
    return kwargs


def _openapi(app: FastAPI, request_models: list[type[BaseModel]]):
    """/openapi.json with the hand-parsed request bodies' schemas added to the components."""
    def build() -> dict:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = doc.setdefault("components", {}).setdefault("schemas", {})
            for m in request_models:
                schema = m.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(schema.pop("$defs", {}))
                components[m.__name__] = schema
            app.openapi_schema = doc
        return app.openapi_schema
    return build


# --------------------------------------------------------------------------- state

@dataclass
class ServerState:
    settings: ServerSettings
    loaded: Any
    metrics: ServerMetrics
    model_name: str
    engine: Any = None
    ready: bool = False
    draining: bool = False
    inflight_seqs: int = 0
    inflight_requests: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    warmup_task: asyncio.Task | None = None
    timings: dict = field(default_factory=dict)
    active_ids: set = field(default_factory=set)

    def abort_all(self) -> None:
        for rid in list(self.active_ids):
            self.engine.abort(rid)

    def set_ready(self, value: bool) -> None:
        self.ready = value
        self.metrics.ready.set(1 if value and not self.draining else 0)

    def begin_drain(self) -> None:
        if not self.draining:
            log.info("draining: /ready is 503, new requests are refused, %d in flight", self.inflight_requests)
        self.draining = True
        self.metrics.ready.set(0)

    async def drain(self, timeout: float) -> bool:
        """Wait for in-flight requests to finish (abort the rest after `timeout`); True if all finished."""
        self.begin_drain()
        try:
            await asyncio.wait_for(self._wait_idle(), timeout)
            return True
        except asyncio.TimeoutError:
            log.warning("shutdown timeout (%.0f s): aborting %d requests", timeout, self.inflight_requests)
            return False

    async def _wait_idle(self) -> None:
        while self.inflight_requests:
            self.idle.clear()
            await self.idle.wait()


# --------------------------------------------------------------------------- the app

def create_app(settings: ServerSettings, loaded, engine_config=None) -> FastAPI:
    from .engine import Engine, EngineConfig

    metrics = ServerMetrics(settings.expert_metrics)
    name = settings.served_model_name or loaded.name
    state = ServerState(settings, loaded, metrics, name)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        cfg = engine_config or EngineConfig(
            max_num_seqs=settings.max_num_seqs, max_model_len=settings.max_model_len,
            max_num_batched_tokens=settings.max_num_batched_tokens, device=settings.device,
            dtype=settings.dtype, quantize=settings.quantize, expert_timing_every=settings.expert_timing_every,
            prefix_caching=settings.prefix_caching == "on")
        t0 = time.perf_counter()
        # Built on a short-lived thread, so that the step thread is the only OpenMP team.
        engine = off_main_thread(lambda: Engine(state.loaded, cfg))
        # From here on the app reads the model (its config) from the engine's copy: where the
        # engine rewrote its own copy (int8, another dtype) the source's weights can then go
        # (~540 MB for the default model), unless the caller keeps them (tests, benchmarks).
        state.loaded = replace(state.loaded, model=engine.model)
        await engine.start()
        state.engine = engine
        state.timings["engine_start_s"] = time.perf_counter() - t0
        log.info("engine started in %.1f s on %s (%s, quantization %s): max_num_seqs=%d, max_model_len=%d",
                 state.timings["engine_start_s"], engine.device, engine.dtype, engine.quantize, cfg.max_num_seqs,
                 engine.max_model_len)
        metrics.set_model(name, engine.model, state.loaded.factor, str(engine.device), str(engine.dtype).replace("torch.", ""),
                          engine.quantize)
        metrics.bind_engine(engine, waiting_extra=lambda: 0)
        metrics.ready.set(0)
        state.warmup_task = asyncio.create_task(_warm_up(state))
        try:
            yield
        finally:
            state.begin_drain()
            if state.warmup_task and not state.warmup_task.done():
                state.warmup_task.cancel()
            await engine.stop()
            log.info("engine stopped")

    app = FastAPI(title="FactorLLM Serve", version=__version__, lifespan=lifespan)
    app.state.server = state
    app.openapi = _openapi(app, [CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest])
    if settings.cors_origins:  # off unless configured: browsers may not call the API cross-origin
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    # ---- errors, all in OpenAI's shape
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        if exc.reason:
            metrics.reject(exc.reason)
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        metrics.reject("invalid_request")
        msg, param = _validation_message(exc.errors())
        return error_response(400, msg, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
        return error_response(exc.status_code, str(exc.detail), kind, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return error_response(500, f"internal server error: {type(exc).__name__}", "server_error")

    # ---- open routes
    @app.get("/health", responses={200: {"content": {"application/json": {"schema": {"type": "object"}}}}})
    async def health():
        return {"status": "ok"}

    @app.get("/version", responses={200: {"content": {"application/json": {"schema": {"type": "object"}}}}})
    async def version():
        return {"version": __version__}

    @app.get("/ready", responses={200: {"content": {"application/json": {"schema": {"type": "object"}}}},
                                  503: {"model": ErrorResponse}})
    async def ready():
        if state.ready and not state.draining:
            return {"status": "ready", "model": name}
        status = "draining" if state.draining else "loading"
        return error_response(503, f"not ready: {status}", "service_unavailable", code=status)

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def prometheus_metrics():
        from prometheus_client import CONTENT_TYPE_LATEST
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize", **_documented(TokenizeRequest, TokenizeResponse, errors=(400, 404, 413)))
    async def tokenize(request: Request):
        req = await _parse(request, TokenizeRequest, state)
        _check_model(req.model, name, metrics)
        tok = _tokenizer(state)
        if req.messages is not None:
            ids = _chat_prompt_ids(tok, req.messages, req.add_generation_prompt, False)
        else:
            ids = _encode(tok, req.prompt, req.add_special_tokens)
        strs = tok.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=_max_len(state), tokens=ids, token_strs=strs).model_dump()

    @app.get("/tokenizer_info", responses={200: {"content": {"application/json": {"schema": {"type": "object"}}}}})
    async def tokenizer_info():
        """vLLM's endpoint: lets lm-evaluation-harness use the server's tokenizer (backend "remote")."""
        tok = _tokenizer(state)
        return {"tokenizer_class": type(tok).__name__, "eos_token": tok.eos_token, "bos_token": tok.bos_token,
                "pad_token": tok.pad_token, "chat_template": getattr(tok, "chat_template", None),
                "model_max_length": _max_len(state), "vocab_size": len(tok)}

    @app.post("/detokenize", **_documented(DetokenizeRequest, DetokenizeResponse, errors=(400, 404, 413)))
    async def detokenize(request: Request):
        req = await _parse(request, DetokenizeRequest, state)
        _check_model(req.model, name, metrics)
        tok = _tokenizer(state)
        _check_token_ids([req.tokens], len(tok), "tokens")
        return DetokenizeResponse(prompt=tok.decode(req.tokens)).model_dump()

    # ---- /v1, behind the API key
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_auth_dependency(settings, metrics))])

    def card() -> ModelCard:
        factor = state.loaded.factor
        info = None
        if factor is not None:
            layers = state.loaded.model.config.num_hidden_layers
            info = dict(experts=factor.experts, top_k=factor.top_k, shared_experts=factor.shared_experts,
                        active_ffn_fraction=round(factor.active_ffn_fraction(layers), 4))
        return ModelCard(id=name, root=str(state.loaded.source), max_model_len=_max_len(state), factorllm=info)

    @v1.get("/models", **_documented(None, ModelList, errors=(401,)))
    async def models():
        return ModelList(data=[card()]).model_dump()

    # `path`: served names may hold a slash ("org/model"), as Hugging Face ids do
    @v1.get("/models/{model_id:path}", **_documented(None, ModelCard, errors=(401, 404)))
    async def model(model_id: str):
        _check_model(model_id, name, metrics)
        return card().model_dump()

    async def generate(request: Request, body: type[BaseModel], run):
        _check_serving(state)
        req = await _parse(request, body, state)
        _check_model(req.model, name, metrics)
        return await run(request, req, state)

    @v1.post("/completions", **_documented(CompletionRequest, CompletionResponse, streams=True))
    async def completions(request: Request):
        return await generate(request, CompletionRequest, _run_completion)

    @v1.post("/chat/completions", **_documented(ChatCompletionRequest, ChatCompletionResponse, streams=True))
    async def chat_completions(request: Request):
        return await generate(request, ChatCompletionRequest, _run_chat)

    app.include_router(v1)
    return app


async def _warm_up(state: ServerState) -> None:
    """One short generation (compiles kernels, touches the cache), then ready; metrics start after it."""
    from .engine import EngineRequest, SamplingParams
    engine = state.engine
    t0 = time.perf_counter()
    try:
        ids = _encode(engine.tokenizer, "Hello, world", True)
        params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        async for _ in engine.submit(EngineRequest("warmup-" + uuid.uuid4().hex[:8], ids, params)):
            pass
    except Exception:
        log.exception("warm-up failed")
        raise
    listener = state.metrics.step_listener()
    if listener is not None:
        engine.step_listeners.append(listener)
    state.timings["warmup_s"] = time.perf_counter() - t0
    log.info("warm-up done in %.2f s; ready", state.timings["warmup_s"])
    state.set_ready(True)


# --------------------------------------------------------------------------- helpers

def _auth_dependency(settings: ServerSettings, metrics: ServerMetrics):
    key = settings.api_key.get_secret_value().encode() if settings.api_key else None

    async def check(request: Request):
        if key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        if not hmac.compare_digest(given, key):  # constant time; the key is never logged
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           "invalid_request_error", code="invalid_api_key", reason="unauthorized")
    return check


def _check_serving(state: ServerState) -> None:
    if state.draining:
        raise APIError(503, "the server is shutting down", "service_unavailable", code="draining",
                       reason="draining", headers={"Retry-After": "1"})
    if not state.ready:
        raise APIError(503, "the model is still loading", "service_unavailable", code="not_ready",
                       headers={"Retry-After": "1"})


def _check_model(requested: str | None, served: str, metrics: ServerMetrics) -> None:
    if requested not in (None, "", served):
        raise APIError(404, f"The model `{requested}` does not exist. Served model: `{served}`.",
                       "invalid_request_error", param="model", code="model_not_found", reason="not_found")


async def _parse(request: Request, model: type[BaseModel], state: ServerState):
    limit = state.settings.max_body_bytes
    declared = request.headers.get("content-length")
    too_large = APIError(413, f"request body exceeds the limit of {limit} bytes", "invalid_request_error",
                         code="request_too_large", reason="too_large")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"malformed JSON body: {e}", reason="invalid_request") from None
    except RecursionError:
        raise APIError(400, "malformed JSON body: nested too deeply", reason="invalid_request") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", reason="invalid_request")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        msg, param = _validation_message(e.errors(include_url=False))
        raise APIError(400, msg, param=param, reason="invalid_request") from None


def _tokenizer(state: ServerState):
    return state.engine.tokenizer if state.engine is not None else state.loaded.tokenizer


def _max_len(state: ServerState) -> int:
    return state.engine.max_model_len if state.engine is not None else state.settings.max_model_len


def _encode(tok, text: str, add_special_tokens: bool = True) -> list[int]:
    try:
        text.encode()
    except UnicodeEncodeError:  # JSON may escape a lone surrogate ("\ud800"): no UTF-8 for it
        raise APIError(400, "the text contains a lone UTF-16 surrogate (invalid Unicode)", param="prompt",
                       reason="invalid_request") from None
    return list(tok(text, add_special_tokens=add_special_tokens)["input_ids"])


def _chat_prompt_ids(tok, messages, add_generation_prompt: bool, continue_final: bool) -> list[int]:
    try:
        msgs = [{"role": m.role, "content": m.text()} for m in messages]
    except ValueError as e:
        raise APIError(400, str(e), param="messages", reason="invalid_request") from None
    if getattr(tok, "chat_template", None) is None:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + ("assistant: " if add_generation_prompt else "")
        return _encode(tok, text, add_special_tokens=False)
    try:
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt and not continue_final,
                                       continue_final_message=continue_final)
    except (ValueError, TemplateError) as e:  # e.g. the template's own raise_exception on a role order
        raise APIError(400, f"cannot apply the chat template: {e}", param="messages", reason="invalid_request") from None
    return _encode(tok, text, add_special_tokens=False)


def _check_token_ids(prompts: list[list[int]], vocab: int, param: str) -> None:
    for p in prompts:
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is out of range [0, {vocab})", param=param, reason="invalid_request")


def _prompts_of(req: CompletionRequest, tok) -> tuple[list[list[int]], list[str | None]]:
    p = req.prompt
    if isinstance(p, str):
        return [_encode(tok, p)], [p]
    if isinstance(p[0], str):
        return [_encode(tok, s) for s in p], list(p)
    if isinstance(p[0], int):
        return [list(p)], [None]
    return [list(x) for x in p], [None] * len(p)


def _check_context(state: ServerState, prompt_len: int, max_tokens: int | None, param: str) -> int:
    limit = _max_len(state)
    if max_tokens is None:
        max_tokens = limit - prompt_len
        if max_tokens < 1:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your prompt "
                                f"has {prompt_len} tokens, leaving no room for the completion.",
                           param="prompt", code="context_length_exceeded", reason="context_length")
        return max_tokens
    if prompt_len + max_tokens > limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                            f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
                            f"completion). Please reduce the length of the prompt or the completion.",
                       param=param, code="context_length_exceeded", reason="context_length")
    return max_tokens


def _admit(state: ServerState, seqs: int) -> None:
    s = state.settings
    capacity = s.max_num_seqs + s.max_queued_requests
    if seqs > capacity:  # never fits, however long the client waits: not a 429
        raise APIError(400, f"the request asks for {seqs} sequences (prompts x n); this server holds at most "
                            f"{capacity} (max_num_seqs + max_queued_requests)", param="n", reason="invalid_request")
    if state.inflight_seqs + seqs > capacity:
        waiting = max(0, state.inflight_seqs - s.max_num_seqs)
        raise APIError(429, f"the server is busy: {state.inflight_seqs} sequences in flight, {waiting} waiting "
                            f"(limit {s.max_queued_requests} waiting); retry later",
                       "rate_limit_exceeded", code="queue_full", headers={"Retry-After": "1"}, reason="queue_full")


def _sampling(req, max_tokens: int, index: int, logprobs: int | None, prompt_logprobs: int | None):
    from .engine import SamplingParams
    # torch seeds are 64-bit; any JSON integer maps onto one (the same seed, the same text)
    seed = (req.seed + index) % 2**63 if req.seed is not None else None
    return SamplingParams(
        max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
        top_k=max(0, req.top_k), seed=seed, presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty, min_p=req.min_p,
        logit_bias=dict(req.logit_bias or {}), stop=list(req.stop or []),
        stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos,
        min_tokens=req.min_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
        return_routing=req.return_routing)


@dataclass
class Seq:
    """One choice: a prompt x one of n samples."""
    index: int
    prompt_index: int
    request_id: str
    prompt_ids: list[int]
    params: Any
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    prompt_logprobs: list | None = None
    finish_reason: str | None = None
    routing: list | None = None
    num_prompt_tokens: int = 0
    error: str | None = None


class Batch:
    """The sequences of one HTTP request: submits them, merges their increments, aborts them on
    disconnect, counts them for the queue limit and the drain."""

    def __init__(self, state: ServerState, seqs: list[Seq], request: Request):
        self.state, self.seqs, self.request = state, seqs, request
        self.done = False

    def submit(self) -> None:
        """Admit (queue limit) and hand every sequence to the engine; raises APIError, counts nothing
        unless all are accepted."""
        from .engine import EngineRequest
        state, engine = self.state, self.state.engine
        _admit(state, len(self.seqs))
        self.iterators = []
        for s in self.seqs:
            try:
                self.iterators.append(engine.submit(EngineRequest(s.request_id, s.prompt_ids, s.params)))
            except ValueError as e:
                for prev in self.seqs[:len(self.iterators)]:
                    engine.abort(prev.request_id)
                raise APIError(400, str(e), reason="invalid_request") from None
        state.inflight_seqs += len(self.seqs)
        state.inflight_requests += 1
        state.active_ids.update(s.request_id for s in self.seqs)

    async def increments(self) -> AsyncIterator[tuple[Seq, Any]]:
        state, engine = self.state, self.state.engine
        queue: asyncio.Queue = asyncio.Queue()
        iterators = self.iterators
        remaining = len(self.seqs)

        async def pump(seq: Seq, it):
            timer = SequenceTimer(state.metrics)
            try:
                async for inc in it:
                    timer.observe(inc)
                    await queue.put((seq, inc))
            except Exception as e:  # surfaced as an error increment
                log.exception("engine error on %s", seq.request_id)
                await queue.put((seq, e))
            finally:
                await queue.put((seq, None))

        pumps = [asyncio.create_task(pump(s, it)) for s, it in zip(self.seqs, iterators)]
        watcher = asyncio.create_task(self._watch_disconnect())
        try:
            while remaining:
                seq, item = await queue.get()
                if item is None:
                    remaining -= 1
                    state.inflight_seqs -= 1
                    continue
                if isinstance(item, Exception):
                    seq.error = f"{type(item).__name__}: {item}"
                    seq.finish_reason = "error"
                    continue
                yield seq, item
        finally:
            watcher.cancel()
            for s in self.seqs:
                if s.finish_reason is None:
                    engine.abort(s.request_id)
            # Aborted sequences still get their final increment from the engine (finish_reason
            # "abort", counted in the metrics); stop waiting for it after a while.
            left = [p for p in pumps if not p.done()]
            if left:
                asyncio.get_running_loop().call_later(10, lambda: [p.cancel() for p in left])
            state.inflight_seqs -= remaining
            state.inflight_requests -= 1
            state.active_ids.difference_update(s.request_id for s in self.seqs)
            if state.inflight_requests == 0:
                state.idle.set()

    async def _watch_disconnect(self) -> None:
        try:
            while True:
                message = await self.request.receive()
                if message["type"] == "http.disconnect":
                    break
        except Exception:
            return
        if not self.done:
            log.info("client disconnected: aborting %s", ", ".join(s.request_id for s in self.seqs))
            for s in self.seqs:
                if s.finish_reason is None:
                    self.state.engine.abort(s.request_id)


def _apply(seq: Seq, inc) -> None:
    seq.token_ids.extend(inc.token_ids or ())
    seq.text += inc.text or ""
    seq.logprobs.extend(inc.logprobs or ())
    if inc.prompt_logprobs is not None:
        seq.prompt_logprobs = list(inc.prompt_logprobs)
    if inc.num_prompt_tokens:
        seq.num_prompt_tokens = inc.num_prompt_tokens
    if inc.routing is not None:
        seq.routing = inc.routing
    if inc.finish_reason is not None:
        seq.finish_reason = inc.finish_reason
        if inc.error:
            seq.error = inc.error


def _top_dict(entry, n: int) -> dict[str, float]:
    top = {}
    for _, text, lp in list(entry.top or ())[:n]:
        top.setdefault(text, float(lp))
    top.setdefault(entry.token, float(entry.logprob))  # vLLM: the chosen token is always listed
    return top


def _legacy_logprobs(tok, seq: Seq, n: int, echo: bool, offset: int, prompt_entries: list | None,
                     entries: list) -> tuple[CompletionLogprobs, int]:
    """OpenAI's legacy completions logprobs (what lm-evaluation-harness reads); with echo the prompt
    tokens come first, the first one without a log-probability. Text offsets continue from `offset`."""
    out = CompletionLogprobs()

    def add(token: str, lp: float | None, top: dict | None) -> None:
        nonlocal offset
        out.tokens.append(token)
        out.token_logprobs.append(lp)
        out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(token)

    if echo and prompt_entries is not None:
        for i, e in enumerate(prompt_entries):
            if e is None:
                add(tok.decode([seq.prompt_ids[i]]), None, None)
            else:
                add(e.token, float(e.logprob), _top_dict(e, n))
    for e in entries:
        add(e.token, float(e.logprob), _top_dict(e, n))
    return out, offset


def _usage(seqs: list[Seq], prompt_lens: list[int]) -> UsageInfo:
    p = sum(prompt_lens)
    c = sum(len(s.token_ids) for s in seqs)
    return UsageInfo(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


def _sse(obj) -> str:
    data = obj.model_dump_json() if isinstance(obj, BaseModel) else json.dumps(obj)
    return f"data: {data}\n\n"


def _raise_if_failed(seqs: list[Seq]) -> None:
    for s in seqs:
        if s.finish_reason == "error":
            raise APIError(500, f"generation failed: {s.error or 'engine error'}", "server_error")


async def _run_completion(request: Request, req: CompletionRequest, state: ServerState):
    tok = _tokenizer(state)
    prompts, texts = _prompts_of(req, tok)
    _check_token_ids(prompts, len(tok), "prompt")
    echo_only = req.max_tokens == 0
    if echo_only and not req.echo:
        raise APIError(400, "max_tokens must be at least 1 (0 is allowed only with echo)", param="max_tokens",
                       reason="invalid_request")
    want_prompt_lp = req.echo and req.logprobs is not None
    seqs: list[Seq] = []
    rid = random_id("cmpl")
    for pi, ids in enumerate(prompts):
        max_tokens = _check_context(state, len(ids), None if req.max_tokens is None else max(1, req.max_tokens),
                                    "max_tokens")
        for j in range(req.n):
            params = _sampling(req, max_tokens, j, req.logprobs, req.logprobs if want_prompt_lp else None)
            seqs.append(Seq(len(seqs), pi, f"{rid}-{len(seqs)}", ids, params))
    prompt_texts = [t if t is not None else tok.decode(ids) for t, ids in zip(texts, prompts)]
    batch = Batch(state, seqs, request)
    created = int(time.time())

    batch.submit()
    if req.stream:
        return StreamingResponse(_stream_completion(req, state, batch, rid, created, prompts,
                                                    prompt_texts, echo_only),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async for seq, inc in batch.increments():
        if echo_only:
            inc = _strip_generated(inc)
        _apply(seq, inc)
    batch.done = True
    _raise_if_failed(seqs)
    choices = []
    for s in seqs:
        text = (prompt_texts[s.prompt_index] if req.echo else "") + s.text
        lp = None
        if req.logprobs is not None:
            lp, _ = _legacy_logprobs(tok, s, req.logprobs, req.echo, 0, s.prompt_logprobs, s.logprobs)
        choices.append(CompletionChoice(index=s.index, text=text, logprobs=lp, finish_reason=s.finish_reason,
                                        routing=s.routing if req.return_routing else None))
    resp = CompletionResponse(id=rid, created=created, model=state.model_name, choices=choices,
                              usage=_usage(seqs, [len(p) for p in prompts]))
    return JSONResponse(resp.model_dump(exclude_none=False, exclude={"choices": {"__all__": _excl(req)}}))


def _excl(req) -> set:
    return set() if req.return_routing else {"routing"}


def _strip_generated(inc):
    """max_tokens=0 with echo: keep the prompt log-probabilities, drop the one generated token."""
    import dataclasses
    if dataclasses.is_dataclass(inc):
        return dataclasses.replace(inc, token_ids=[], text="", logprobs=[],
                                   finish_reason="length" if inc.finish_reason else None)
    return inc


async def _stream_completion(req, state, batch: Batch, rid, created, prompts, prompt_texts, echo_only):
    tok = _tokenizer(state)
    name = state.model_name
    offsets = {s.index: 0 for s in batch.seqs}
    started: set[int] = set()
    agen = batch.increments()
    try:
        async for seq, inc in agen:
            if echo_only:
                inc = _strip_generated(inc)
            _apply(seq, inc)
            text = inc.text or ""
            lp = None
            prompt_entries = inc.prompt_logprobs if seq.index not in started else None
            if req.echo and seq.index not in started:
                text = prompt_texts[seq.prompt_index] + text
            if req.logprobs is not None:
                lp, offsets[seq.index] = _legacy_logprobs(
                    tok, seq, req.logprobs, req.echo and seq.index not in started, offsets[seq.index],
                    prompt_entries, inc.logprobs or [])
            started.add(seq.index)
            if seq.finish_reason == "error":
                err = ErrorResponse(error=ErrorInfo(message=f"generation failed: {seq.error}", type="server_error"))
                yield _sse(err)
                continue
            if not text and lp is None and inc.finish_reason is None:
                continue
            choice = CompletionChoice(index=seq.index, text=text, logprobs=lp, finish_reason=inc.finish_reason,
                                      routing=seq.routing if (req.return_routing and inc.finish_reason) else None)
            chunk = CompletionResponse(id=rid, created=created, model=name, choices=[choice])
            yield _sse_dump(chunk, req)
        batch.done = True
        if req.stream_options and req.stream_options.include_usage:
            usage = CompletionResponse(id=rid, created=created, model=name, choices=[],
                                       usage=_usage(batch.seqs, [len(p) for p in prompts]))
            yield _sse(usage)
        yield "data: [DONE]\n\n"
    finally:
        await agen.aclose()


def _sse_dump(chunk: BaseModel, req) -> str:
    d = chunk.model_dump(exclude={"choices": {"__all__": _excl(req)}})
    return f"data: {json.dumps(d)}\n\n"


def _chat_logprobs(entries: list, n: int | None) -> ChatLogprobs:
    content = []
    for e in entries:
        top = [ChatTopLogprob(token=t, logprob=float(lp), bytes=list(t.encode()))
               for _, t, lp in list(e.top or ())[:n or 0]]
        content.append(ChatTokenLogprob(token=e.token, logprob=float(e.logprob), bytes=list(e.token.encode()),
                                        top_logprobs=top))
    return ChatLogprobs(content=content)


async def _run_chat(request: Request, req: ChatCompletionRequest, state: ServerState):
    tok = _tokenizer(state)
    ids = _chat_prompt_ids(tok, req.messages, req.add_generation_prompt, req.continue_final_message)
    max_tokens = _check_context(state, len(ids), req.output_limit, "max_tokens")
    n_lp = (req.top_logprobs or 0) if req.logprobs else None
    rid = random_id("chatcmpl")
    seqs = [Seq(j, 0, f"{rid}-{j}", ids, _sampling(req, max_tokens, j, n_lp, None)) for j in range(req.n)]
    batch = Batch(state, seqs, request)
    created = int(time.time())
    name = state.model_name
    batch.submit()

    if req.stream:
        async def gen():
            agen = batch.increments()
            try:
                for s in seqs:  # the role comes first, as OpenAI sends it
                    c = ChatStreamChoice(index=s.index, delta=DeltaMessage(role="assistant", content=""))
                    yield _sse_dump(ChatCompletionChunk(id=rid, created=created, model=name, choices=[c]), req)
                async for seq, inc in agen:
                    _apply(seq, inc)
                    if seq.finish_reason == "error":
                        err = ErrorResponse(error=ErrorInfo(message=f"generation failed: {seq.error}", type="server_error"))
                        yield _sse(err)
                        continue
                    if not inc.text and inc.finish_reason is None and not (req.logprobs and inc.logprobs):
                        continue
                    lp = _chat_logprobs(inc.logprobs or [], req.top_logprobs) if req.logprobs else None
                    c = ChatStreamChoice(index=seq.index, delta=DeltaMessage(content=inc.text or None) if inc.text else DeltaMessage(),
                                         logprobs=lp, finish_reason=inc.finish_reason,
                                         routing=seq.routing if (req.return_routing and inc.finish_reason) else None)
                    yield _sse_dump(ChatCompletionChunk(id=rid, created=created, model=name, choices=[c]), req)
                batch.done = True
                if req.stream_options and req.stream_options.include_usage:
                    u = ChatCompletionChunk(id=rid, created=created, model=name, choices=[],
                                            usage=_usage(seqs, [len(ids)]))
                    yield _sse(u)
                yield "data: [DONE]\n\n"
            finally:
                await agen.aclose()

        return StreamingResponse(gen(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async for seq, inc in batch.increments():
        _apply(seq, inc)
    batch.done = True
    _raise_if_failed(seqs)
    choices = [ChatChoice(index=s.index, message=ChatResponseMessage(content=s.text),
                          logprobs=_chat_logprobs(s.logprobs, req.top_logprobs) if req.logprobs else None,
                          finish_reason=s.finish_reason, routing=s.routing if req.return_routing else None)
               for s in seqs]
    resp = ChatCompletionResponse(id=rid, created=created, model=name, choices=choices, usage=_usage(seqs, [len(ids)]))
    return JSONResponse(resp.model_dump(exclude={"choices": {"__all__": _excl(req)}}))
