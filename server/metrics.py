"""Prometheus metrics of `factorllm serve` (GET /metrics), in a per-app registry.

`EXPORTED_METRICS` is the single source of the metric names and labels: the Grafana dashboard,
the alert rules, the Kubernetes adapter and their tests (tests/test_deploy.py) use it.

Two kinds of sources:

* serving metrics (TTFT, inter-token latency, end-to-end, queue time, tokens, finish reasons,
  rejections) observed by the app from the engine's increments;
* expert metrics fed by the engine's per-step statistics (`Engine.step_listeners`). The engine
  thread only adds a step's counts to numpy arrays under a lock; series are built when Prometheus
  scrapes (a custom collector), so the per-step cost does not grow with layers x experts labels.

`--expert-metrics` controls label cardinality: `per-expert` ({layer, expert} series),
`per-layer` ({layer} series only: layer tokens, load imbalance, router entropy) or `off`.
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from typing import Iterable

import numpy as np
from prometheus_client import (
    CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, disable_created_metrics, generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

# name -> (type, labels). Counters are listed under their exposed `_total` name; histograms are
# exposed as <name>_bucket{le}, <name>_sum and <name>_count.
EXPORTED_METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "factorllm_expert_tokens_total": ("counter", ("layer", "expert")),
    "factorllm_layer_tokens_total": ("counter", ("layer",)),
    "factorllm_expert_latency_seconds": ("histogram", ("layer", "expert")),
    "factorllm_expert_load_imbalance": ("gauge", ("layer",)),
    "factorllm_router_entropy": ("gauge", ("layer",)),
    "factorllm_time_to_first_token_seconds": ("histogram", ()),
    "factorllm_inter_token_latency_seconds": ("histogram", ()),
    "factorllm_e2e_request_latency_seconds": ("histogram", ()),
    "factorllm_request_queue_time_seconds": ("histogram", ()),
    "factorllm_num_requests_running": ("gauge", ()),
    "factorllm_num_requests_waiting": ("gauge", ()),
    "factorllm_kv_cache_usage_ratio": ("gauge", ()),
    "factorllm_prefix_cache_queries_total": ("counter", ()),
    "factorllm_prefix_cache_hits_total": ("counter", ()),
    "factorllm_ready": ("gauge", ()),
    "factorllm_prompt_tokens_total": ("counter", ()),
    "factorllm_generation_tokens_total": ("counter", ()),
    "factorllm_request_success_total": ("counter", ("finish_reason",)),
    "factorllm_requests_rejected_total": ("counter", ("reason",)),
    "factorllm_model_info": (
        "gauge",
        ("model", "experts", "top_k", "active_ffn_fraction", "device", "dtype", "quantization"),
    ),
}
EXPERT_METRICS_MODES = ("per-expert", "per-layer", "off")
REJECT_REASONS = ("queue_full", "context_length", "invalid_request", "unauthorized", "too_large",
                  "not_found", "draining")
FINISH_REASONS = ("stop", "length", "abort", "error")

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
               2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0)
EXPERT_LATENCY_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2,
                          5e-2, 0.1, 0.25, 1.0)


def _base(name: str) -> str:
    return name[:-len("_total")] if name.endswith("_total") else name


def _help(name: str) -> str:
    return {
        "factorllm_expert_tokens_total": "Tokens routed to each expert (a token counts once per chosen expert)",
        "factorllm_layer_tokens_total": "Tokens that went through each MoE layer",
        "factorllm_expert_latency_seconds": "Time of one expert's work in one engine step (sampled)",
        "factorllm_expert_load_imbalance": "Max over mean tokens per expert over the recent window (1 = balanced)",
        "factorllm_router_entropy": "Mean router entropy per token over the recent window (nats)",
        "factorllm_time_to_first_token_seconds": "Time from arrival to the first generated token",
        "factorllm_inter_token_latency_seconds": "Time between consecutive generated tokens",
        "factorllm_e2e_request_latency_seconds": "Time from arrival to the last token",
        "factorllm_request_queue_time_seconds": "Time from arrival to first scheduling",
        "factorllm_num_requests_running": "Sequences in the running batch",
        "factorllm_num_requests_waiting": "Sequences waiting to be scheduled",
        "factorllm_kv_cache_usage_ratio": "Fraction of the KV cache in use (1 = full)",
        "factorllm_prefix_cache_queries_total": "Prompt tokens looked up in the prefix cache",
        "factorllm_prefix_cache_hits_total": "Prompt tokens found in the prefix cache (their prefill skipped)",
        "factorllm_ready": "1 when the server is loaded, warm and not draining",
        "factorllm_prompt_tokens_total": "Prompt tokens processed",
        "factorllm_generation_tokens_total": "Tokens generated",
        "factorllm_request_success_total": "Finished sequences by finish reason",
        "factorllm_requests_rejected_total": "Requests refused before reaching the engine, by reason",
        "factorllm_model_info": "The served model (value 1)",
    }[name]


def _get(stats, *names, default=None):
    for n in names:
        v = getattr(stats, n, None) if not isinstance(stats, dict) else stats.get(n)
        if v is not None:
            return v
    return default


def _as_array(v, dtype=np.float64) -> np.ndarray | None:
    if v is None:
        return None
    if hasattr(v, "detach"):  # torch tensor
        v = v.detach().cpu().numpy()
    try:
        return np.asarray(v, dtype=dtype)
    except (TypeError, ValueError):  # ragged: per-layer lists with None for unmeasured layers
        return None


class ExpertStats(Collector):
    """Cumulative per-layer/expert counts fed by engine steps; exposed at scrape time."""

    def __init__(self, num_layers: int, num_experts: int, top_k: list[int], mode: str = "per-expert",
                 window_steps: int = 64):
        if mode not in EXPERT_METRICS_MODES:
            raise ValueError(f"expert metrics mode must be one of {EXPERT_METRICS_MODES}")
        self.mode = mode
        self.L, self.E = num_layers, num_experts
        self.top_k = np.asarray(top_k, dtype=np.float64)
        self.lock = threading.Lock()
        self.tokens = np.zeros((num_layers, num_experts), dtype=np.float64)
        self.bounds = np.asarray(EXPERT_LATENCY_BUCKETS)
        self.lat_counts = np.zeros((num_layers, num_experts, len(EXPERT_LATENCY_BUCKETS) + 1))
        self.lat_sums = np.zeros((num_layers, num_experts))
        self.window: deque[np.ndarray] = deque(maxlen=window_steps)
        self.entropy_window: deque[tuple[np.ndarray, np.ndarray]] = deque(maxlen=window_steps)
        self.steps = 0

    # ---- engine thread
    def on_step(self, stats) -> None:
        counts = _as_array(_get(stats, "expert_tokens", "expert_token_counts", "expert_counts"))
        if counts is None or counts.size == 0:
            return
        counts = counts.reshape(self.L, self.E)
        seconds = _get(stats, "expert_seconds", "expert_times", "expert_time")
        entropy = _as_array(_get(stats, "router_entropy", "entropy"))
        with self.lock:
            self.steps += 1
            self.tokens += counts
            self.window.append(counts)
            if entropy is not None and entropy.size == self.L:  # per-layer sum over the step's tokens
                self.entropy_window.append((entropy.reshape(self.L), counts.sum(1) / self.top_k))
            if seconds is not None and self.mode == "per-expert":
                self._observe_latency(seconds, counts)

    def _observe_latency(self, seconds, counts: np.ndarray) -> None:
        arr = _as_array(seconds)
        if arr is not None and arr.shape == (self.L, self.E):
            measured = counts > 0  # an expert that got no tokens did no work this step
            layer_ids, expert_ids = np.nonzero(measured)
            values = arr[measured]
        else:  # ragged: None for layers not measured this step
            layer_ids, expert_ids, vals = [], [], []
            for l, row in enumerate(seconds):
                if row is None:
                    continue
                for e, s in enumerate(row):
                    if s is not None and counts[l, e] > 0:
                        layer_ids.append(l)
                        expert_ids.append(e)
                        vals.append(s)
            layer_ids, expert_ids, values = np.asarray(layer_ids, int), np.asarray(expert_ids, int), np.asarray(vals)
        if len(values) == 0:
            return
        b = np.searchsorted(self.bounds, values, side="left")
        np.add.at(self.lat_counts, (layer_ids, expert_ids, b), 1)
        np.add.at(self.lat_sums, (layer_ids, expert_ids), values)

    # ---- scrape
    def snapshot(self) -> dict:
        with self.lock:
            window = np.sum(self.window, axis=0) if self.window else np.zeros((self.L, self.E))
            ent = list(self.entropy_window)
            return dict(tokens=self.tokens.copy(), window=window, ent=ent,
                        lat_counts=self.lat_counts.copy(), lat_sums=self.lat_sums.copy())

    def collect(self) -> Iterable:
        if self.mode == "off":
            return
        s = self.snapshot()
        layers = [str(l) for l in range(self.L)]
        layer_tokens = CounterMetricFamily(_base("factorllm_layer_tokens_total"),
                                           _help("factorllm_layer_tokens_total"), labels=["layer"])
        per_layer = np.rint(s["tokens"].sum(1) / self.top_k)
        for l in range(self.L):
            layer_tokens.add_metric([layers[l]], float(per_layer[l]))
        yield layer_tokens
        imb = GaugeMetricFamily("factorllm_expert_load_imbalance", _help("factorllm_expert_load_imbalance"),
                                labels=["layer"])
        w = s["window"]
        mean = w.mean(1)
        for l in range(self.L):
            imb.add_metric([layers[l]], float(w[l].max() / mean[l]) if mean[l] > 0 else 1.0)
        yield imb
        if s["ent"]:
            ent = GaugeMetricFamily("factorllm_router_entropy", _help("factorllm_router_entropy"), labels=["layer"])
            e = np.stack([x for x, _ in s["ent"]]).sum(0)
            tot = np.stack([n for _, n in s["ent"]]).sum(0)
            avg = np.where(tot > 0, e / np.maximum(tot, 1e-12), 0.0)
            for l in range(self.L):
                ent.add_metric([layers[l]], float(avg[l]))
            yield ent
        if self.mode != "per-expert":
            return
        tokens = CounterMetricFamily(_base("factorllm_expert_tokens_total"), _help("factorllm_expert_tokens_total"),
                                     labels=["layer", "expert"])
        for l in range(self.L):
            for e in range(self.E):
                tokens.add_metric([layers[l], str(e)], float(s["tokens"][l, e]))
        yield tokens
        lat = HistogramMetricFamily("factorllm_expert_latency_seconds", _help("factorllm_expert_latency_seconds"),
                                    labels=["layer", "expert"])
        bounds = [str(b) for b in EXPERT_LATENCY_BUCKETS] + ["+Inf"]
        cum = np.cumsum(s["lat_counts"], axis=2)
        for l in range(self.L):
            for e in range(self.E):
                buckets = list(zip(bounds, cum[l, e].tolist()))
                lat.add_metric([layers[l], str(e)], buckets, float(s["lat_sums"][l, e]))
        yield lat

    def describe(self) -> Iterable:
        return []  # collected lazily; keeps registration from calling collect()


class PrefixCacheCounters(Collector):
    """The engine scheduler's prefix-cache token counters, read when scraped (vLLM's
    prefix_cache_queries / prefix_cache_hits)."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self) -> Iterable:
        s = self.engine.scheduler
        for name, value in (("factorllm_prefix_cache_queries_total", s.prefix_queries),
                            ("factorllm_prefix_cache_hits_total", s.prefix_hits)):
            yield CounterMetricFamily(_base(name), _help(name), value=float(value))

    def describe(self) -> Iterable:
        return []


class ServerMetrics:
    """All metrics of one app instance."""

    def __init__(self, expert_mode: str = "per-expert"):
        if expert_mode not in EXPERT_METRICS_MODES:
            raise ValueError(f"--expert-metrics must be one of {', '.join(EXPERT_METRICS_MODES)}")
        self.expert_mode = expert_mode
        disable_created_metrics()  # no *_created series (as vLLM): they double the series count
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes etc. (the soak test watches memory)
        h = _help
        self.ttft = Histogram("factorllm_time_to_first_token_seconds", h("factorllm_time_to_first_token_seconds"),
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("factorllm_inter_token_latency_seconds", h("factorllm_inter_token_latency_seconds"),
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("factorllm_e2e_request_latency_seconds", h("factorllm_e2e_request_latency_seconds"),
                             buckets=E2E_BUCKETS, registry=r)
        self.queue = Histogram("factorllm_request_queue_time_seconds", h("factorllm_request_queue_time_seconds"),
                               buckets=E2E_BUCKETS, registry=r)
        self.running = Gauge("factorllm_num_requests_running", h("factorllm_num_requests_running"), registry=r)
        self.waiting = Gauge("factorllm_num_requests_waiting", h("factorllm_num_requests_waiting"), registry=r)
        self.kv_usage = Gauge("factorllm_kv_cache_usage_ratio", h("factorllm_kv_cache_usage_ratio"), registry=r)
        self.ready = Gauge("factorllm_ready", h("factorllm_ready"), registry=r)
        self.prompt_tokens = Counter("factorllm_prompt_tokens", h("factorllm_prompt_tokens_total"), registry=r)
        self.generation_tokens = Counter("factorllm_generation_tokens", h("factorllm_generation_tokens_total"),
                                         registry=r)
        self.success = Counter("factorllm_request_success", h("factorllm_request_success_total"),
                               ["finish_reason"], registry=r)
        self.rejected = Counter("factorllm_requests_rejected", h("factorllm_requests_rejected_total"),
                                ["reason"], registry=r)
        for reason in FINISH_REASONS:
            self.success.labels(reason)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        self.model_info = Gauge("factorllm_model_info", h("factorllm_model_info"),
                                list(EXPORTED_METRICS["factorllm_model_info"][1]), registry=r)
        self.experts: ExpertStats | None = None

    # ---- wiring
    def bind_engine(self, engine, waiting_extra=None) -> None:
        """Gauges read the engine when scraped. `waiting_extra()` adds sequences queued in the server."""
        self.running.set_function(lambda: float(engine.num_running))
        if waiting_extra is None:
            self.waiting.set_function(lambda: float(engine.num_waiting))
        else:
            self.waiting.set_function(lambda: float(engine.num_waiting + waiting_extra()))
        self.kv_usage.set_function(lambda: float(engine.kv_cache_usage))
        self.registry.register(PrefixCacheCounters(engine))

    def set_model(self, name: str, model, factor, device: str, dtype: str, quantization: str) -> None:
        cfg = model.config
        if factor is not None:
            experts, top_k = str(factor.experts), str(factor.top_k)
            frac = f"{factor.active_ffn_fraction(cfg.num_hidden_layers):.3f}"
        else:
            experts, top_k, frac = "0", "0", "1.000"
        self.model_info.labels(name, experts, top_k, frac, str(device), str(dtype), quantization).set(1)
        if factor is not None and self.expert_mode != "off":
            ks = [factor.layer_top_k(i) for i in range(cfg.num_hidden_layers)]
            self.experts = ExpertStats(cfg.num_hidden_layers, factor.experts, ks, self.expert_mode)
            self.registry.register(self.experts)

    def step_listener(self):
        return self.experts.on_step if self.experts is not None else None

    # ---- per request
    def reject(self, reason: str) -> None:
        self.rejected.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class SequenceTimer:
    """Observes one sequence's increments: TTFT, inter-token latency, and at the end e2e, queue,
    tokens and finish reason."""

    __slots__ = ("m", "last", "generated")

    def __init__(self, metrics: ServerMetrics):
        self.m = metrics
        self.last: float | None = None
        self.generated = 0

    def observe(self, inc) -> None:
        m = self.m
        n = len(inc.token_ids or ())
        now = time.perf_counter()
        if n:
            if self.last is None:
                ft, at = inc.first_token_time, inc.arrival_time
                if ft is not None and at is not None:
                    m.ttft.observe(max(0.0, ft - at))
            else:
                gap = (now - self.last) / n
                for _ in range(n):
                    m.itl.observe(gap)
            self.last = now
            self.generated += n
        if inc.finish_reason is not None:
            at, ft, st = inc.arrival_time, inc.finish_time, inc.scheduled_time
            if at is not None and ft is not None:
                m.e2e.observe(max(0.0, ft - at))
            if at is not None and st is not None:
                m.queue.observe(max(0.0, st - at))
            m.prompt_tokens.inc(inc.num_prompt_tokens or 0)
            m.generation_tokens.inc(inc.num_generated_tokens if inc.num_generated_tokens is not None
                                    else self.generated)
            m.success.labels(inc.finish_reason).inc()


def parse_text(text: str) -> dict[str, list[tuple[dict, float]]]:
    """Parse Prometheus text format into {series name: [(labels, value)]} (for tests and tools)."""
    from prometheus_client.parser import text_string_to_metric_families
    out: dict[str, list[tuple[dict, float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value if not math.isnan(s.value) else 0.0))
    return out
