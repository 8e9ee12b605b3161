"""GET /metrics of a running `factorllm serve` (the shared test server), the expert-metric modes,
the per-request routing trace, and a real Prometheus server scraping the real server."""
from __future__ import annotations

import math

import shutil
import subprocess
import time

import httpx
import numpy as np
import pytest
from server_fixture import EXPERTS, TOP_K, free_port

from server.metrics import EXPORTED_METRICS, ExpertStats, ServerMetrics, parse_text

NUM_LAYERS = 30  # SmolLM2-135M


def _scrape(url: str) -> dict:
    return parse_text(httpx.get(url + "/metrics", timeout=10).text)


def _values(samples, name, key="layer") -> dict:
    out: dict = {}
    for labels, v in samples.get(name, []):
        out[labels[key]] = out.get(labels[key], 0.0) + v
    return out


def _complete(served, **body) -> dict:
    r = httpx.post(served.url + "/v1/completions", json={"temperature": 0, "ignore_eos": True, **body}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_metrics_exposition(served):
    """Every exported metric is there with its labels, the expert counters add up, and promtool
    accepts the exposition."""
    before = _scrape(served.url)
    tokens_before = sum(v for _, v in before.get("factorllm_layer_tokens_total", []) if _["layer"] == "0")
    usage = [_complete(served, prompt="One, two, three, four,", max_tokens=n)["usage"] for n in (3, 9)]
    text = httpx.get(served.url + "/metrics").text
    m = parse_text(text)
    for name, (kind, labels) in EXPORTED_METRICS.items():
        series = [f"{name}_bucket", f"{name}_count", f"{name}_sum"] if kind == "histogram" else [name]
        for s in series:
            assert s in m, f"{s} missing from /metrics"
            for lab, _ in m[s]:
                assert set(lab) - {"le"} == set(labels), (s, lab)
    # Tokens through each layer: every prompt token and every generated token but the last.
    processed = sum(u["prompt_tokens"] + u["completion_tokens"] - 1 for u in usage)
    layer_tokens = _values(m, "factorllm_layer_tokens_total")
    assert set(layer_tokens) == {str(l) for l in range(NUM_LAYERS)}
    assert layer_tokens["0"] - tokens_before == processed
    assert len(set(layer_tokens.values())) == 1
    per_layer = _values(m, "factorllm_expert_tokens_total")
    for layer, total in per_layer.items():
        assert total == layer_tokens[layer] * TOP_K
    assert len(m["factorllm_expert_tokens_total"]) == NUM_LAYERS * EXPERTS
    for _, v in m["factorllm_expert_load_imbalance"]:
        assert 1.0 <= v <= EXPERTS
    for _, v in m["factorllm_router_entropy"]:
        # Mean nats per token of a softmax over N experts (padded prefill positions excluded).
        assert 0.0 < v <= math.log(EXPERTS) + 1e-6
    # Expert latency is measured (the shared server times every step) for experts that got tokens.
    lat_count = sum(v for _, v in m["factorllm_expert_latency_seconds_count"])
    assert lat_count > 0
    (info,) = m["factorllm_model_info"]
    assert info[0]["experts"] == "8" and info[0]["top_k"] == "4" and info[0]["active_ffn_fraction"] == "0.500"
    assert info[0]["device"] == "cpu" and info[0]["dtype"] == "float32" and info[0]["quantization"] == "none"
    assert m["factorllm_ready"][0][1] == 1.0
    assert sum(v for _, v in m["factorllm_time_to_first_token_seconds_count"]) >= 2
    assert sum(v for _, v in m["factorllm_inter_token_latency_seconds_count"]) >= 10
    assert dict((l["finish_reason"], v) for l, v in m["factorllm_request_success_total"])["length"] >= 2
    promtool = shutil.which("promtool")
    if promtool:
        proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
        # promtool lints HELP/naming; only errors (not lint warnings about counters) fail this
        assert proc.returncode in (0, 3), proc.stdout + proc.stderr
        assert "error" not in proc.stderr.lower(), proc.stderr


def test_prefix_cache_counters_and_layer_tokens(served):
    """A prompt that starts with an earlier request's prompt skips its prefill: the hit counter
    grows by those tokens and the MoE layers see only the rest."""
    story = "Once upon a time, in a village by the sea, there lived an old fisherman who"
    first = _complete(served, prompt=story, max_tokens=8)
    before = _scrape(served.url)
    second = _complete(served, prompt=story + " Zebra crossing", max_tokens=4)
    after = _scrape(served.url)

    def delta(name, labels=None):
        pick = lambda m: sum(v for lab, v in m.get(name, []) if labels is None or lab == labels)
        return pick(after) - pick(before)
    n, hits = second["usage"]["prompt_tokens"], first["usage"]["prompt_tokens"]
    assert delta("factorllm_prefix_cache_queries_total") == n
    assert delta("factorllm_prefix_cache_hits_total") == hits
    assert delta("factorllm_layer_tokens_total", {"layer": "0"}) == n - hits + 3


def test_return_routing(served):
    """Opt-in routing trace: per layer, how many of this request's tokens each expert served."""
    r = _complete(served, prompt="Paris is the capital of", max_tokens=6, return_routing=True)
    routing = r["choices"][0]["routing"]
    usage = r["usage"]
    assert len(routing) == NUM_LAYERS and all(len(row) == EXPERTS for row in routing)
    tokens = usage["prompt_tokens"] + usage["completion_tokens"] - 1
    assert all(sum(row) == tokens * TOP_K for row in routing)
    assert "routing" not in _complete(served, prompt="x", max_tokens=2)["choices"][0]
    chunks = httpx.post(served.url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True, "return_routing": True,
        "temperature": 0}, timeout=60).text
    import json
    finals = [json.loads(l[6:]) for l in chunks.splitlines() if l.startswith("data: {")]
    last = [c for c in finals if c["choices"] and c["choices"][0]["finish_reason"]][-1]
    assert len(last["choices"][0]["routing"]) == NUM_LAYERS


class _Step:  # the fields the engine's StepStats carries to listeners
    def __init__(self, counts, seconds=None, entropy=None):
        self.expert_tokens, self.expert_seconds, self.router_entropy = counts, seconds, entropy


@pytest.mark.parametrize("mode", ["per-expert", "per-layer", "off"])
def test_expert_metric_modes_bound_cardinality(mode):
    """--expert-metrics: a 64-layer x 64-expert model stays small in per-layer mode and absent when off."""
    L, E, K = (16, 16, 4) if mode == "per-expert" else (64, 64, 8)
    metrics = ServerMetrics(mode)
    stats = ExpertStats(L, E, [K] * L, mode)
    metrics.registry.register(stats)
    rng = np.random.default_rng(0)
    measured = 0
    for _ in range(5):
        counts = np.zeros((L, E))
        for l in range(L):
            counts[l] = np.bincount(rng.integers(0, E, size=10 * K), minlength=E)
        measured += int((counts > 0).sum())
        stats.on_step(_Step(counts, ((counts > 0) * 1e-4).tolist(), np.full(L, 10 * 2.0)))
    m = parse_text(metrics.render().decode())
    expert_series = sum(len(v) for k, v in m.items() if k.startswith("factorllm_expert_tokens")
                        or k.startswith("factorllm_expert_latency"))
    layer_series = len(m.get("factorllm_layer_tokens_total", []))
    if mode == "per-expert":
        assert len(m["factorllm_expert_tokens_total"]) == L * E
        assert expert_series > L * E
        assert all(v == 50 for v in _values(m, "factorllm_layer_tokens_total").values())
        assert sum(v for _, v in m["factorllm_expert_latency_seconds_count"]) == measured
        assert _values(m, "factorllm_router_entropy")["0"] == pytest.approx(2.0)
    elif mode == "per-layer":
        assert expert_series == 0 and layer_series == L
        assert len(m["factorllm_expert_load_imbalance"]) == L
        assert sum(len(v) for v in m.values()) < 1000
    else:
        assert expert_series == 0 and layer_series == 0 and "factorllm_router_entropy" not in m


def test_prometheus_scrapes_expert_metrics(served, tmp_path):
    """A real Prometheus (127.0.0.1) scrapes the running server; after a few requests its HTTP API
    has a non-zero factorllm_expert_tokens_total series for every layer and expert, and per layer
    the sum over experts equals the layer's tokens x top_k."""
    prom = shutil.which("prometheus")
    if prom is None:
        import os
        msg = "prometheus not installed; run `bash scripts/install_deploy_tools.sh`"
        if os.environ.get("CI") or os.environ.get("FACTORLLM_REQUIRE_DEPLOY_TOOLS"):
            pytest.fail(msg)
        pytest.skip(msg)
    target = served.url.removeprefix("http://")
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n  - job_name: factorllm\n    metrics_path: /metrics\n"
        f"    static_configs:\n      - targets: ['{target}']\n")
    port = free_port()
    log = open(tmp_path / "prometheus.log", "w")
    proc = subprocess.Popen([prom, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{port}/api/v1"

    def query(q: str) -> list:
        r = httpx.get(api + "/query", params={"query": q}, timeout=5).json()
        assert r["status"] == "success", r
        return r["data"]["result"]

    try:
        for n in (4, 8, 5):
            _complete(served, prompt="The quick brown fox jumps over", max_tokens=n)
        direct = _values(_scrape(served.url), "factorllm_layer_tokens_total")
        deadline = time.monotonic() + 60
        while True:  # until Prometheus has scraped the state after our requests
            try:
                got = {s["metric"]["layer"]: float(s["value"][1]) for s in query("factorllm_layer_tokens_total")}
                if got == direct:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"Prometheus did not scrape in time:\n{(tmp_path / 'prometheus.log').read_text()[-3000:]}"
            time.sleep(0.5)
        series = query("factorllm_expert_tokens_total")
        assert len(series) == NUM_LAYERS * EXPERTS
        layers = {s["metric"]["layer"] for s in series if float(s["value"][1]) > 0}
        assert layers == {str(l) for l in range(NUM_LAYERS)}
        sums = {s["metric"]["layer"]: float(s["value"][1])
                for s in query("sum by (layer) (factorllm_expert_tokens_total)")}
        assert len(sums) == NUM_LAYERS
        for layer, total in sums.items():
            assert total > 0 and total == got[layer] * TOP_K, (layer, total, got[layer])
        up = query('up{job="factorllm"}')
        assert up and up[0]["value"][1] == "1"
        # the scrape also carries the serving metrics
        assert float(query("sum(factorllm_generation_tokens_total)")[0]["value"][1]) >= 17
    finally:
        proc.terminate()
        proc.wait(20)
