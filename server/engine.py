"""The inference engine the HTTP server drives: continuous batching over a slot KV cache.

A background thread runs steps (torch releases the GIL, so the asyncio side stays responsive):
schedule (scheduler.py) -> one forward for all decoding rows plus prefill forwards of
similar-length chunks (`padding_groups`) ->
sample every row that needs a token (sampling.py) -> detokenize and check stops per request
(detokenizer.py) -> hand `Increment`s to each request's asyncio queue with
`loop.call_soon_threadsafe`. Anything that goes wrong with one request (its sampling, its
detokenization) ends only that request with finish_reason "error".

Device and dtype: "auto" picks CUDA when available. dtype "auto" is bf16 on CUDA and on CPUs
with native bf16 dot products (AVX512-BF16/AMX): there a decode step at 32 sequences measured
104 ms in bf16 against 195 ms in fp32 on this 2-core EPYC. On CPU every linear but the MoE
routers runs prepacked through oneDNN (factorllm/kernels.py), fp32 included: on an AVX2 EPYC,
where MKL is slow at decode-sized row counts, a dense fp32 step ran 1.2-1.4x faster so. On CPUs
without native bf16 `quantize` "auto" runs fp32 activations over int8 weights instead
(factorllm/quantize.py): a quarter of the bytes a decode step reads (dense ~1.35x faster than
fp32 at one sequence on an AVX2 EPYC, about as fast from 8 sequences on, perplexity 1.002x;
docs/results.md). `--quantize int8` on a bf16 CPU keeps bf16 activations: half the bytes, 1.38x
faster at one sequence on an AMX Xeon, as fast from 8 on (session 21). fp32 with
the weights as loaded (dtype "float32") is the exactness reference (the tests use it).

Threads: torch's CPU kernels use GNU OpenMP, which gives every thread running parallel regions
its own team of workers and throttles their spin-waiting once the teams outnumber the CPUs. The
step thread should be the process's only team: build the model and the engine on a short-lived
thread (`factorllm.device.off_main_thread`, as `factorllm serve` does); built on the main thread,
a decode step measured ~1.5x slower on 2 cores.
"""
from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import torch

from factorllm import native_moe
from factorllm.device import int8_dtype, resolve_device, resolve_dtype, resolve_quantization
from factorllm.kernels import compile_row_buckets, prepack_linears
from factorllm.kv_cache import CacheBatch, KVCache
from factorllm.moe import MoEFFN, routing_stats
from factorllm.quantize import quantize_int8

from .detokenizer import IncrementalDetokenizer
from .sampling import SampleRow, logprobs_of, make_generator, sample
from .scheduler import Scheduler, StepPlan

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- public types

@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0      # 0 => greedy
    top_p: float = 1.0
    top_k: int = 0                # 0 or -1 => off
    seed: int | None = None       # same seed -> same text, alone or batched
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 1 => off; over prompt and output tokens (vLLM)
    min_p: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)        # not included in the output text
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None        # None: none; N >= 0: sampled token's logprob + top-N
    prompt_logprobs: int | None = None # None: none; N >= 0: each prompt token's logprob (first None) + top-N
    return_routing: bool = False       # per layer, tokens each expert served (factorized models)


@dataclass
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]]


@dataclass
class Increment:
    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob]
    prompt_logprobs: list[TokenLogprob | None] | None
    finish_reason: str | None
    num_prompt_tokens: int
    num_generated_tokens: int
    routing: list[list[int]] | None
    error: str | None = None
    arrival_time: float | None = None
    scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None


@dataclass
class EngineConfig:
    max_num_seqs: int = 16
    max_model_len: int = 2048          # clamped to the model's max_position_embeddings
    max_num_batched_tokens: int = 2048 # prefill chunk budget per step
    kv_cache_memory_fraction: float | None = None  # size the slots from free memory instead
    device: str = "auto"               # auto|cpu|cuda
    dtype: str = "auto"                # auto|float32|bfloat16|float16
    expert_timing_every: int = 16      # time experts every Nth decode-only step (CUDA events / CPU timers)
    quantize: str = "auto"             # auto|none|int8: int8 weight-only linears (CPU; see resolve_quantization)
    prefix_caching: bool = True        # free slots keep their keys/values for prompts that share a prefix


@dataclass
class StepStats:
    batch_size: int
    num_prefill_tokens: int
    num_decode_tokens: int
    step_time: float
    expert_tokens: torch.Tensor | None = None      # [L, N] tokens routed to each expert this step
    expert_seconds: list[list[float] | None] | None = None  # [L][N], None for layers not timed
    router_entropy: torch.Tensor | None = None     # [L] sum over this step's tokens


# --------------------------------------------------------------------------- internals

class Sequence:
    """One request's state inside the engine."""

    def __init__(self, req: EngineRequest, loop: asyncio.AbstractEventLoop, detok: IncrementalDetokenizer,
                 generator: torch.Generator | None, eos_ids: set[int]):
        self.request_id = req.request_id
        self.prompt_ids = list(req.prompt_token_ids)
        self.params = req.params
        self.output_ids: list[int] = []
        self.slot: int | None = None
        self.num_computed = 0
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.detok = detok
        self.generator = generator
        self.stop_ids = set(req.params.stop_token_ids) | (set() if req.params.ignore_eos else eos_ids)
        self.finished = False
        self.step_slot: int | None = None
        self.prompt_logprobs: list | None = [None] if req.params.prompt_logprobs is not None else None
        self.sent_prompt_logprobs = False
        self.routing: torch.Tensor | None = None
        self.arrival_time = time.monotonic()
        self.scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.finish_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def reuses_cache(self) -> bool:
        """Prompt log-probabilities and routing traces cover every prompt position: such
        requests compute them all (no prefix-cache hits)."""
        return self.prompt_logprobs is None and not self.params.return_routing

    def cached_ids(self) -> list[int]:
        """The tokens whose keys and values are in this sequence's cache slot."""
        return (self.prompt_ids + self.output_ids)[:self.num_computed]

    def emit(self, inc: Increment) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, inc)
        except RuntimeError:  # its event loop is closed: nobody is listening any more
            pass

    def increment(self, ids: list[int], text: str, logprobs: list, finish: str | None,
                  error: str | None = None) -> Increment:
        pl = None
        if self.prompt_logprobs is not None and not self.sent_prompt_logprobs and \
                (len(self.prompt_logprobs) == len(self.prompt_ids) or finish is not None):
            pl, self.sent_prompt_logprobs = self.prompt_logprobs, True
        routing = None
        if finish is not None and self.routing is not None:
            routing = self.routing.tolist()
        return Increment(self.request_id, ids, text, logprobs, pl, finish, len(self.prompt_ids),
                         len(self.output_ids), routing, error, self.arrival_time, self.scheduled_time,
                         self.first_token_time, self.finish_time)


def available_host_memory() -> int:
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except ImportError:  # Linux without psutil
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
        raise


def padding_groups(chunks: list[tuple[Sequence, int]]) -> list[list[tuple[Sequence, int]]]:
    """Prefill chunks grouped into forwards in which every row is at least half as long as the
    longest, so that padding never doubles the work (one 500-token prompt beside fifteen 10-token
    ones would otherwise run as 16 x 500 tokens) and the largest forward is bounded by twice the
    step's token budget."""
    groups: list[list[tuple[Sequence, int]]] = []
    for chunk in sorted(chunks, key=lambda c: -c[1]):
        if groups and 2 * chunk[1] >= groups[-1][0][1]:
            groups[-1].append(chunk)
        else:
            groups.append([chunk])
    return groups


# --------------------------------------------------------------------------- the engine

class Engine:
    def __init__(self, loaded, config: EngineConfig):
        self.config = config
        self.tokenizer = loaded.tokenizer
        self.model_name = loaded.name
        self.device = resolve_device(config.device)
        self.quantize = resolve_quantization(config.quantize, config.dtype, self.device)
        if self.quantize == "int8":
            self.dtype = int8_dtype(config.dtype, self.device)
        else:
            self.dtype = resolve_dtype(config.dtype, self.device)
        model = loaded.model
        if self.device.type == "cpu":
            # int8 rounding and prepacked kernels rewrite the model: the engine works on its own
            # copy, so that the caller's stays as loaded (other engines, evaluation). Where no
            # weight changes value or dtype, the copy shares the caller's weights, fused in place
            # (the parts become views of the fused weights: same values, same state_dict).
            if self.quantize == "int8" or any(p.dtype != self.dtype for p in model.parameters()):
                model = copy.deepcopy(model)
            else:
                model = copy.deepcopy(model.fuse(), {id(p): p for p in model.parameters()})
        self.model = model.to(device=self.device, dtype=self.dtype).eval().fuse()
        self.moes: list[MoEFFN] = [m for m in self.model.modules() if isinstance(m, MoEFFN)]
        for m in self.moes:
            # Routers stay fp32: top-k choices near ties should not hinge on bf16 rounding, and on
            # CPU their small matmul is ~5x faster in fp32 than in bf16 (sgemv vs oneDNN set-up).
            # The masked path's packed matmul computes them in bf16 alongside (MoEFFN.pack).
            m.router.float()
        cfg = self.model.config
        self.vocab_size = cfg.vocab_size
        self.max_model_len = min(config.max_model_len, cfg.max_position_embeddings)
        self.eos_ids = set(cfg.eos_token_ids)
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        if self.quantize == "int8":
            crossovers = quantize_int8(self.model)
            log.info("int8 weights; int8 kernel up to these rows per weight shape: %s", crossovers)
        elif self.device.type == "cpu":
            native_moe.pack_dense_ffns(self.model)
            prepack_linears(self.model, config.max_num_seqs)
        num_slots = config.max_num_seqs
        if config.kv_cache_memory_fraction is not None:
            num_slots = self._slots_from_memory(config.kv_cache_memory_fraction)
        self.max_num_seqs = num_slots
        self.cache = KVCache.for_model(self.model, num_slots, self.max_model_len)
        self.scheduler = Scheduler(num_slots, config.max_num_batched_tokens, self.cache.move_slot,
                                   self.cache.swap_slots if config.prefix_caching else None)
        self.step_listeners: list[Callable[[StepStats], None]] = []
        self.seqs: dict[str, Sequence] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.num_steps = 0
        self.num_decode_only_steps = 0  # expert timing counts these (see _begin_stats)

    # ---- sizing and properties
    def _slots_from_memory(self, fraction: float) -> int:
        per_slot = KVCache.bytes_per_slot(self.model, self.max_model_len)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
        else:
            free = available_host_memory()
        slots = int(free * fraction // per_slot)
        if slots < 1:
            raise ValueError(f"kv_cache_memory_fraction={fraction} of {free / 2**30:.1f} GiB free does not fit "
                             f"one sequence of {self.max_model_len} tokens ({per_slot / 2**20:.0f} MiB)")
        return min(slots, 1024)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_free_slots(self) -> int:
        return self.scheduler.num_free_slots

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of cache slots held by admitted sequences (slots are what admission needs)."""
        return len(self.scheduler.running) / self.max_num_seqs

    # ---- lifecycle
    async def start(self) -> None:
        """Start the step thread and wait for its warm-up (see `warm_up`)."""
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        self._stopping = False
        self._thread = threading.Thread(target=self._main, args=(loop, ready), name="factorllm-engine", daemon=True)
        self._thread.start()
        await ready

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
            self._thread = None
        with self._lock:
            for seq in list(self.seqs.values()):
                self._finish(seq, "abort")

    def _main(self, loop: asyncio.AbstractEventLoop, ready: asyncio.Future) -> None:
        # The warm-up runs on the step thread itself: glibc gives each thread its own malloc
        # arena, so only here does it grow the heap that the steps will reuse.
        def settle(error: BaseException | None) -> None:
            if not ready.done():
                ready.set_result(None) if error is None else ready.set_exception(error)
        try:
            self.warm_up()
        except BaseException as e:
            loop.call_soon_threadsafe(settle, e)
            return
        loop.call_soon_threadsafe(settle, None)
        self._run()

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Tune the MoE dispatch and (CPU bf16) the decode attention kernel, then a profile run
        (as vLLM does): the largest prefill chunk and the largest decode batch the configuration
        allows, each twice, so that the allocator reaches its high-water mark before the first
        request and resident memory stays flat under load (the first pass raises glibc's mmap
        threshold, the second fills the heap).
        Then every prepacked kernel at every row bucket (`compile_row_buckets`)."""
        chunk = min(self.config.max_num_batched_tokens, self.max_model_len)
        B, last = self.max_num_seqs, self.max_model_len - 1
        tuned: dict[tuple, list] = {}
        for m in self.moes:  # layers of one shape and top-k dispatch alike: tune each kind once
            key = (m.num_experts, m.top_k, m.expert_size)
            if key not in tuned:  # up to the prefill chunk; larger (padded) forwards take its path
                tuned[key] = m.tune_dispatch(max(chunk, B))
            m.use_plan(tuned[key])
        if self.device.type == "cpu" and self.dtype != torch.float32:
            plan = self.model.tune_decode_attention(self.cache, B)
            log.info("decode attention by row count: %s", plan)
        for _ in range(2):
            batch = CacheBatch.build([0], [0], [chunk], self.device)
            h = self.model.hidden_states(torch.zeros(1, chunk, dtype=torch.long, device=self.device),
                                         cache=self.cache, batch=batch)
            self.model.lm_head(h[:, -1]).float()
            # Rows at different positions: the explicit-mask attention over the longest span.
            batch = CacheBatch.build(list(range(B)), [last - b % 2 for b in range(B)], [1] * B, self.device)
            h = self.model.hidden_states(torch.zeros(B, 1, dtype=torch.long, device=self.device),
                                         cache=self.cache, batch=batch)
            self.model.lm_head(h[:, 0]).float()
        cfg = self.model.config  # a forward's rows stay under twice the chunk (see padding_groups)
        compile_row_buckets(max(2 * chunk, B), 2 * chunk * cfg.hidden_size * 2 * cfg.intermediate_size)
        for m in self.moes:
            m.reset_stats()

    # ---- requests
    def _validate(self, req: EngineRequest) -> None:
        p, ids = req.params, req.prompt_token_ids
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]!r} is out of the vocabulary (0..{self.vocab_size - 1})")
        max_tokens = p.max_tokens if p.max_tokens is not None else self.max_model_len - len(ids)
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if len(ids) + max_tokens > self.max_model_len:
            raise ValueError(f"this model's maximum context length is {self.max_model_len} tokens; the request "
                             f"has {len(ids)} prompt tokens + max_tokens {max_tokens} = {len(ids) + max_tokens}")
        if p.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {p.temperature}")
        if not 0 < p.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {p.top_p}")
        if p.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (off) or positive, got {p.top_k}")
        if p.min_tokens < 0 or p.min_tokens > max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={max_tokens}], got {p.min_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(p, name)
            if v is not None and not 0 <= v <= self.vocab_size:
                raise ValueError(f"{name} must be >= 0, got {v}")
        if any(not 0 <= t < self.vocab_size for t in p.stop_token_ids):
            raise ValueError("stop_token_ids contains an id outside the vocabulary")
        if not p.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 turns it off), got {p.repetition_penalty}")
        if not 0 <= p.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {p.min_p}")
        bad = [t for t in p.logit_bias if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"logit_bias token id {bad[0]} is out of the vocabulary (0..{self.vocab_size - 1})")
        if req.request_id in self.seqs:
            raise ValueError(f"request id {req.request_id!r} is already running")

    def submit(self, request: EngineRequest) -> AsyncIterator[Increment]:
        """Queue a request; iterate the result for its increments (the last has a finish_reason).
        Raises ValueError for an invalid request. Closing the iterator early aborts the request."""
        if request.params.max_tokens is None:
            request.params.max_tokens = self.max_model_len - len(request.prompt_token_ids)
        self._validate(request)
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        p = request.params
        gen = None if p.temperature <= 0 else make_generator(p.seed, self.device)
        detok = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, p.stop)
        seq = Sequence(request, loop, detok, gen, self.eos_ids)
        with self._lock:
            self.seqs[seq.request_id] = seq
            self.scheduler.add(seq)
        self._wake.set()
        return self._stream(seq)

    async def _stream(self, seq: Sequence) -> AsyncIterator[Increment]:
        done = False
        try:
            while True:
                inc = await seq.queue.get()
                done = inc.finish_reason is not None
                yield inc
                if done:
                    return
        finally:
            if not done:
                self.abort(seq.request_id)

    def abort(self, request_id: str) -> None:
        """End a request now: its slot is free when this returns; its iterator ends with "abort".
        A step in flight may still write the slot's cache, harmlessly: slots are handed out
        only between steps, and that step's result for the request is dropped."""
        with self._lock:
            seq = self.seqs.get(request_id)
            if seq is not None and not seq.finished:
                self._finish(seq, "abort")

    def _finish(self, seq: Sequence, reason: str, error: str | None = None, ids=(), text: str = "",
                logprobs=()) -> None:
        """Under the lock: free the slot, send the final increment."""
        seq.finished = True
        seq.finish_time = time.monotonic()
        self.scheduler.remove(seq)
        self.seqs.pop(seq.request_id, None)
        if reason == "length":  # text held back for a possible stop string is final now
            try:
                text += seq.detok.flush()
            except Exception:  # never let a flush failure hide the finish
                pass
        seq.emit(seq.increment(list(ids), text, list(logprobs), reason, error))

    # ---- the step loop
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stopping:
            with self._lock:
                plan = self.scheduler.schedule()
                for seq in plan.sequences:
                    seq.step_slot = seq.slot  # abort() may clear seq.slot while the step runs
                    if seq.scheduled_time is None:
                        seq.scheduled_time = time.monotonic()
                if not plan:
                    self._wake.clear()
            if not plan:
                self._wake.wait(0.5)
                continue
            try:
                self._step(plan)
            except Exception as e:  # a failed forward fails its batch, never the loop
                log.exception("engine step failed")
                with self._lock:
                    for seq in plan.sequences:
                        if not seq.finished:
                            try:
                                self._finish(seq, "error", f"engine step failed: {type(e).__name__}: {e}")
                            except Exception:
                                log.exception("could not fail request %s", seq.request_id)

    @torch.inference_mode()
    def _step(self, plan: StepPlan) -> None:
        t0 = time.perf_counter()
        record = any(s.params.return_routing for s in plan.sequences) and bool(self.moes)
        timing = self._begin_stats(record, decode_only=not plan.prefills)
        rows: list[Sequence] = []     # sequences that get a new token this step
        logits: list[torch.Tensor] = []
        if plan.decodes:
            logits.append(self._decode(plan.decodes, record))
            rows += plan.decodes
        if plan.prefills:
            done, last = self._prefill(plan.prefills, record)
            if last is not None:
                logits.append(last)
                rows += done
        new_ids, lps = self._sample(rows, torch.cat(logits) if logits else None)
        num_prefill = sum(n for _, n in plan.prefills)
        with self._lock:
            for i, seq in enumerate(rows):
                if seq.finished:  # aborted while the step ran
                    continue
                try:
                    if isinstance(new_ids[i], Exception):
                        raise new_ids[i]
                    self._append(seq, new_ids[i], lps[i] if lps else None)
                except Exception as e:  # this request only
                    log.exception("request %s failed", seq.request_id)
                    self._finish(seq, "error", f"{type(e).__name__}: {e}")
        self.num_steps += 1
        if self.step_listeners:
            stats = self._end_stats(len(plan.sequences), num_prefill, len(plan.decodes),
                                    time.perf_counter() - t0, timing)
            for fn in list(self.step_listeners):
                try:
                    fn(stats)
                except Exception:
                    log.exception("step listener failed")

    def _tensor(self, values: list[int]) -> torch.Tensor:
        t = torch.tensor(values, dtype=torch.long)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def _decode(self, seqs: list[Sequence], record: bool) -> torch.Tensor:
        """One token for every decoding row in one forward; logits [B, V] float32."""
        tokens = self._tensor([s.prompt_ids[-1] if not s.output_ids else s.output_ids[-1] for s in seqs])
        batch = CacheBatch.build([s.step_slot for s in seqs], [s.num_computed for s in seqs], [1] * len(seqs),
                                 self.device)
        h = self.model.hidden_states(tokens[:, None], cache=self.cache, batch=batch)
        for s in seqs:
            s.num_computed += 1
        if record:
            self._record_routing(seqs, 1, [1] * len(seqs))
        return self.model.lm_head(h[:, 0]).float()

    def _prefill(self, chunks: list[tuple[Sequence, int]], record: bool) -> tuple[list[Sequence], torch.Tensor | None]:
        """The next prompt chunk of each sequence, in padded forwards [P, T] of similar-length rows
        (`padding_groups`). Returns the sequences whose prompt is now complete and their last
        position's logits [n, V]; also fills prompt logprobs where asked."""
        done, last = [], []
        for group in padding_groups(chunks):
            self._prefill_group(group, record, done, last)
        return done, (self.model.lm_head(torch.stack(last)).float() if last else None)

    def _prefill_group(self, chunks: list[tuple[Sequence, int]], record: bool,
                       done: list[Sequence], last: list[torch.Tensor]) -> None:
        seqs = [s for s, _ in chunks]
        ns = [n for _, n in chunks]
        starts = [s.num_computed for s in seqs]
        T = max(ns)
        ids = [s.prompt_ids[st:st + n] + [0] * (T - n) for s, st, n in zip(seqs, starts, ns)]
        batch = CacheBatch.build([s.step_slot for s in seqs], starts, ns, self.device)
        for m in self.moes:
            m.record_routing = record
        h = self.model.hidden_states(self._tensor([t for row in ids for t in row]).view(len(seqs), T), cache=self.cache, batch=batch)
        if record or (T * len(seqs) != sum(ns) and bool(self.step_listeners) and bool(self.moes)):
            self._record_routing(seqs, T, ns)
        for i, (seq, start, n) in enumerate(zip(seqs, starts, ns)):
            seq.num_computed += n
            if seq.prompt_logprobs is not None:
                # Position j predicts prompt token start+j+1.
                targets = seq.prompt_ids[start + 1:start + n + 1]
                if targets:
                    try:
                        lg = self.model.lm_head(h[i, :len(targets)]).float()
                        seq.prompt_logprobs += self._token_logprobs(lg, targets, seq.params.prompt_logprobs)
                    except Exception as e:  # fails this request only
                        log.exception("prompt logprobs failed")
                        seq.prompt_logprobs = None
                        seq.prompt_logprobs_error = e
            if seq.num_computed >= len(seq.prompt_ids):
                done.append(seq)
                last.append(h[i, n - 1])

    def _sample(self, rows: list[Sequence], logits: torch.Tensor | None):
        """Sampled ids (an Exception in place of a request's id if its sampling failed) and
        logprobs per row (None where not requested)."""
        if not rows:
            return [], []
        specs = [self._sample_row(s) for s in rows]
        # sample() edits logits in place only for rows that `edits_logits`; logprobs need them raw.
        edits = any(r.edits_logits for r in specs)
        try:
            ids = sample(logits.clone() if edits else logits, specs)
            out: list = ids.tolist()
        except Exception:  # find the culprit: one row at a time
            out = []
            for i, spec in enumerate(specs):
                try:
                    out.append(sample(logits[i:i + 1].clone(), [spec]).item())
                except Exception as e:
                    out.append(e)
        lps: list = [None] * len(rows)
        want = [i for i, s in enumerate(rows) if s.params.logprobs is not None and not isinstance(out[i], Exception)]
        if want:
            try:
                top = max(rows[i].params.logprobs for i in want)
                sel = logits[want] if len(want) < len(rows) else logits
                chosen, top_lp, top_ids = logprobs_of(sel, self._tensor([out[i] for i in want]), top)
                chosen, top_lp, top_ids = chosen.tolist(), top_lp.tolist(), top_ids.tolist()
                for j, i in enumerate(want):
                    n = rows[i].params.logprobs
                    lps[i] = TokenLogprob(out[i], self._piece(out[i]), chosen[j],
                                          [(t, self._piece(t), l) for t, l in zip(top_ids[j][:n], top_lp[j][:n])])
            except Exception as e:
                for i in want:
                    out[i] = e
        return out, lps

    def _sample_row(self, seq: Sequence) -> SampleRow:
        p = seq.params
        banned = None
        if len(seq.output_ids) < p.min_tokens and seq.stop_ids:
            banned = sorted(seq.stop_ids)
        return SampleRow(p.temperature, p.top_p, p.top_k, seq.generator, presence_penalty=p.presence_penalty,
                         frequency_penalty=p.frequency_penalty, repetition_penalty=p.repetition_penalty,
                         min_p=p.min_p, logit_bias=p.logit_bias, output_ids=seq.output_ids,
                         prompt_ids=seq.prompt_ids, banned_ids=banned, logprobs=p.logprobs)

    def _piece(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _token_logprobs(self, logits: torch.Tensor, targets: list[int], top_n: int) -> list[TokenLogprob]:
        chosen, top_lp, top_ids = logprobs_of(logits, self._tensor(targets), top_n)
        chosen, top_lp, top_ids = chosen.tolist(), top_lp.tolist(), top_ids.tolist()
        return [TokenLogprob(t, self._piece(t), c, [(i, self._piece(i), l) for i, l in zip(ti, tl)])
                for t, c, ti, tl in zip(targets, chosen, top_ids, top_lp)]

    def _append(self, seq: Sequence, token: int, lp: TokenLogprob | None) -> None:
        """Under the lock: add a sampled token, detokenize, check the stop conditions, emit."""
        if getattr(seq, "prompt_logprobs_error", None) is not None:
            raise seq.prompt_logprobs_error
        now = time.monotonic()
        if seq.first_token_time is None:
            seq.first_token_time = now
        seq.output_ids.append(token)
        p = seq.params
        n = len(seq.output_ids)
        may_stop = n >= p.min_tokens
        finish = None
        if may_stop and token in seq.stop_ids:
            finish, text = "stop", seq.detok.flush()
        else:
            text, matched = seq.detok.add(token, check_stop=may_stop)
            if matched is not None:
                finish = "stop"
            elif n >= p.max_tokens or seq.num_tokens >= self.max_model_len:
                finish = "length"
        lps = [lp] if lp is not None else []
        if finish is None:
            seq.emit(seq.increment([token], text, lps, None))
        else:
            self._finish(seq, finish, ids=[token], text=text, logprobs=lps)

    # ---- statistics
    def _begin_stats(self, record: bool, decode_only: bool):
        """Set the MoE layers up for this step's statistics; returns whether it times experts:
        every Nth decode-only step. Timed steps run the C kernel, which times its own experts, or
        else `looped` (one matmul chain per expert), which a prefill of 16 prompts took 1.7x as
        long through as through its tuned path."""
        timing = False
        if self.step_listeners and self.moes and decode_only:
            timing = self.num_decode_only_steps % max(1, self.config.expert_timing_every) == 0
            self.num_decode_only_steps += 1
        for m in self.moes:
            m.collect_stats = bool(self.step_listeners)
            m.stats_in_kernel = decode_only  # a prefill's padding rows come out of the records
            m.time_experts = timing
            m.record_routing = record
        return timing

    def _end_stats(self, batch_size: int, num_prefill: int, num_decode: int, step_time: float,
                   timing: bool) -> StepStats:
        stats = StepStats(batch_size, num_prefill, num_decode, step_time)
        if self.moes:
            counts, entropy = routing_stats(self.moes)
            stats.expert_tokens, stats.router_entropy = counts.cpu(), entropy.cpu()
            if timing:
                stats.expert_seconds = [m.collect_expert_seconds() for m in self.moes]
        return stats

    def _record_routing(self, seqs: list[Sequence], T: int, lengths: list[int]) -> None:
        """Add each sequence's expert choices of the last forward ([rows*T, K] per layer) to its
        trace; padded positions of a prefill batch are taken out of the routing records that the
        step's expert counts and router entropy come from."""
        want = [i for i, s in enumerate(seqs) if s.params.return_routing]
        padded = T * len(seqs) != sum(lengths)
        if not want and not padded:
            return
        valid = None
        if padded:
            valid = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]      # [P, T]
            valid = valid.to(self.device)
            real = valid.flatten().nonzero().squeeze(1)
        for layer, m in enumerate(self.moes):
            if valid is not None and m.collect_stats:  # this forward's record is the last one
                logits, chosen = m.pending_stats[-1]
                m.pending_stats[-1] = logits.index_select(0, real), chosen.index_select(0, real)
            if not want:
                continue
            idx = m.last_idx.view(len(seqs), T, m.top_k)
            ones = torch.ones_like(idx) if valid is None else valid[:, :, None].expand_as(idx).long()
            counts = torch.zeros(len(seqs), m.num_experts, dtype=torch.long, device=idx.device)
            counts.scatter_add_(1, idx.reshape(len(seqs), -1), ones.reshape(len(seqs), -1))
            for i in want:
                s = seqs[i]
                if s.routing is None:
                    s.routing = torch.zeros(len(self.moes), m.num_experts, dtype=torch.long, device=idx.device)
                s.routing[layer] += counts[i]
