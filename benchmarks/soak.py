"""Soak test: many streams for a long time, mixing streaming, non-streaming and abandoned requests.

    python benchmarks/soak.py --duration 1800 --streams 16          # starts its own server
    python benchmarks/soak.py --url http://127.0.0.1:8000 --duration 60

Checks, printed as a table and written as JSON (exit status 1 if one fails):
  * no errors on valid requests (every request gets 200, every stream ends with [DONE]);
  * resident memory flat after warm-up: the least-squares slope of the server's
    `process_resident_memory_bytes` over the run after the first `--warmup` fraction is at most
    `--max-slope`, or RSS never rises above its warm-up peak (on a one-minute run the allocator's
    ups and downs of ~20-30 MB alone make slopes of +-30 MB/min; a leak keeps making new peaks);
  * after the load ends, no running or waiting requests and an empty KV cache;
  * the server's counters agree with what the clients saw: one finished request per accepted
    request (by finish reason: stop/length for completed ones, abort or a normal finish for
    abandoned ones), no "error" finishes, generated tokens >= the tokens the clients received.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_bench import REPO, WORDS, RunningServer, ServerSpec, free_port  # noqa: E402

MODES = ("stream", "complete", "abandon-stream", "abandon-complete")
QUICK = "--experts 8 --top-k 4 --partition contiguous --router-init random"


@dataclass
class Tally:
    sent: dict = field(default_factory=lambda: {m: 0 for m in MODES})
    accepted: int = 0            # requests that got 200
    completed: int = 0           # valid requests read to the end
    abandoned: int = 0           # streams closed by the client before the end
    timed_out: int = 0           # non-streaming requests given up on (the server may not have seen them yet)
    errors: list = field(default_factory=list)
    tokens_received: int = 0


def metrics(url: str) -> dict[str, float]:
    """Series name (with labels) -> value, from the server's /metrics."""
    from server.metrics import parse_text
    out = {}
    for name, samples in parse_text(httpx.get(url + "/metrics", timeout=10).text).items():
        for labels, value in samples:
            key = name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}" if labels else "")
            out[key] = value
    return out


def finished(m: dict, reason: str) -> float:
    return m.get(f"factorllm_request_success_total{{finish_reason={reason}}}", 0.0)


async def one_request(client: httpx.AsyncClient, url: str, mode: str, rng: random.Random, tally: Tally) -> None:
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 60)))
    body = {"prompt": prompt, "max_tokens": rng.randint(4, 48), "temperature": rng.choice([0.0, 0.8]),
            "seed": rng.randint(0, 10**6), "stream": mode in ("stream", "abandon-stream"),
            "stream_options": {"include_usage": True}}
    if not body["stream"]:
        body.pop("stream_options")
    tally.sent[mode] += 1
    stage = "sending"  # where a transport error struck, for the report
    try:
        if mode == "abandon-complete":  # give up after a moment: the server must abort the request
            try:
                r = await client.post(url + "/v1/completions", json=body, timeout=rng.uniform(0.05, 0.5))
            except httpx.TimeoutException:
                tally.timed_out += 1
                return
            if r.status_code != 200:
                tally.errors.append(f"{mode}: HTTP {r.status_code} {r.text[:200]}")
                return
            tally.accepted += 1
            tally.completed += 1
            tally.tokens_received += r.json()["usage"]["completion_tokens"]
            return
        if mode == "complete":
            r = await client.post(url + "/v1/completions", json=body, timeout=300)
            if r.status_code != 200:
                tally.errors.append(f"{mode}: HTTP {r.status_code} {r.text[:200]}")
                return
            tally.accepted += 1
            data = r.json()
            if data["choices"][0]["finish_reason"] not in ("stop", "length"):
                tally.errors.append(f"{mode}: finish_reason {data['choices'][0]['finish_reason']}")
            tally.completed += 1
            tally.tokens_received += data["usage"]["completion_tokens"]
            return
        stop_after = rng.randint(1, 4) if mode == "abandon-stream" else None
        async with client.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
            if r.status_code != 200:
                tally.errors.append(f"{mode}: HTTP {r.status_code} {(await r.aread())[:200]!r}")
                return
            tally.accepted += 1
            chunks, done = 0, False
            stage = "reading the stream"
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    tally.errors.append(f"{mode}: {chunk['error']}")
                if chunk.get("usage"):
                    tally.tokens_received += chunk["usage"]["completion_tokens"]
                chunks += 1
                if stop_after is not None and chunks >= stop_after:
                    stage = "closing the stream early"
                    break  # leaving the context closes the connection mid-stream
            if done:
                tally.completed += 1
            elif stop_after is not None:
                tally.abandoned += 1
            else:
                tally.errors.append(f"{mode}: stream ended without [DONE]")
    except httpx.HTTPError as e:
        tally.errors.append(f"{mode}: {type(e).__name__} while {stage}: {e!r} (cause {e.__cause__!r})")


async def run_load(url: str, streams: int, duration: float, seed: int, tally: Tally,
                   samples: list, sample_every: float) -> None:
    deadline = time.monotonic() + duration

    async def worker(i: int):
        rng = random.Random(seed * 1000 + i)
        async with httpx.AsyncClient() as client:
            n = i
            while time.monotonic() < deadline:
                await one_request(client, url, MODES[n % len(MODES)], rng, tally)
                n += 1

    async def sampler():
        t0 = time.monotonic()
        while time.monotonic() < deadline:
            m = await asyncio.to_thread(metrics, url)
            samples.append((time.monotonic() - t0, m.get("process_resident_memory_bytes", 0.0)))
            await asyncio.sleep(sample_every)

    await asyncio.gather(sampler(), *(worker(i) for i in range(streams)))


def slope_mb_per_min(samples: list[tuple[float, float]]) -> float | None:
    if len(samples) < 3:
        return None
    n = len(samples)
    mt = sum(t for t, _ in samples) / n
    mr = sum(r for _, r in samples) / n
    var = sum((t - mt) ** 2 for t, _ in samples)
    cov = sum((t - mt) * (r - mr) for t, r in samples)
    return cov / var * 60 / 2**20 if var else None


def soak(url: str, args) -> dict:
    before = metrics(url)
    tally, samples = Tally(), []
    t0 = time.monotonic()
    asyncio.run(run_load(url, args.streams, args.duration, args.seed, tally, samples, args.sample_every))
    elapsed = time.monotonic() - t0

    drained, after = False, before
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # aborted requests still send their final increment
        after = metrics(url)
        idle = (after.get("factorllm_num_requests_running", 1) == 0
                and after.get("factorllm_num_requests_waiting", 1) == 0
                and after.get("factorllm_kv_cache_usage_ratio", 1) == 0)
        delta_finished = sum(finished(after, r) - finished(before, r) for r in ("stop", "length", "abort", "error"))
        if idle and delta_finished >= tally.accepted:  # (+ those timed-out requests the server saw)
            drained = True
            break
        time.sleep(0.5)

    d = {r: finished(after, r) - finished(before, r) for r in ("stop", "length", "abort", "error")}
    generated = (after.get("factorllm_generation_tokens_total", 0) - before.get("factorllm_generation_tokens_total", 0))
    steady = [s for s in samples if s[0] >= args.warmup * args.duration]
    warm = [r for t, r in samples if t < args.warmup * args.duration]
    slope = slope_mb_per_min(steady)
    no_new_peak = bool(warm) and bool(steady) and max(r for _, r in steady) <= max(warm)
    rss = [r / 2**20 for _, r in samples]
    checks = {
        "no errors on valid requests": not tally.errors,
        "idle after the load (0 running, 0 waiting, KV cache empty)": drained,
        "one finish per accepted request": tally.accepted <= sum(d.values()) <= tally.accepted + tally.timed_out,
        "completed requests finished normally": d["stop"] + d["length"] >= tally.completed,
        "no error finishes": d["error"] == 0,
        "generated tokens >= tokens clients received": generated >= tally.tokens_received,
        f"memory flat after warm-up (slope <= {args.max_slope:g} MB/min, or no new peak)":
            slope is not None and (slope <= args.max_slope or no_new_peak),
    }
    return {
        "url": url, "streams": args.streams, "duration_s": round(elapsed, 1),
        "requests": asdict(tally) | {"errors": tally.errors[:20], "num_errors": len(tally.errors)},
        "server_finishes": d, "server_generated_tokens": generated,
        "rss_mb": {"first": rss[0] if rss else None, "last": rss[-1] if rss else None,
                   "max": max(rss) if rss else None, "slope_mb_per_min_after_warmup": slope,
                   "new_peak_after_warmup": not no_new_peak,
                   "samples": [(round(t, 1), round(r / 2**20, 2)) for t, r in samples]},
        "checks": checks, "passed": all(checks.values()),
    }


def print_report(rep: dict) -> None:
    q, rss = rep["requests"], rep["rss_mb"]
    print(f"\nSoak: {rep['streams']} streams for {rep['duration_s']} s against {rep['url']}")
    print("| sent (stream / complete / abandon-stream / abandon-complete) | accepted | completed | abandoned "
          "| timed out | errors |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| {' / '.join(str(q['sent'][m]) for m in MODES)} | {q['accepted']} | {q['completed']} | "
          f"{q['abandoned']} | {q['timed_out']} | {q['num_errors']} |")
    print(f"server finishes {rep['server_finishes']}; generated tokens {rep['server_generated_tokens']:.0f} "
          f"(clients received {q['tokens_received']})")
    slope = rss["slope_mb_per_min_after_warmup"]
    print(f"RSS MB first {rss['first']:.1f}, last {rss['last']:.1f}, max {rss['max']:.1f}; "
          f"slope after warm-up {slope if slope is None else f'{slope:+.2f}'} MB/min")
    for name, ok in rep["checks"].items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")
    for e in q["errors"][:5]:
        print("  error:", e)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="an already running server (default: start `factorllm serve` here)")
    p.add_argument("--serve-args", default=QUICK + " --dtype float32",
                   help=f"flags for the server this script starts (default: {QUICK!r} --dtype float32)")
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--duration", type=float, default=1800.0, help="seconds of load (default 1800)")
    p.add_argument("--warmup", type=float, default=0.2, help="fraction of the run left out of the memory slope")
    p.add_argument("--sample-every", type=float, default=2.0, help="seconds between memory samples")
    p.add_argument("--max-slope", type=float, default=5.0, help="largest acceptable RSS slope, MB/min")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "out" / "soak.json")
    args = p.parse_args(argv)

    server = None
    url = args.url
    if url is None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "factorllm.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--max-num-seqs", str(args.streams), "--max-queued-requests", str(args.streams)]
        cmd += shlex.split(args.serve_args)
        server = RunningServer(ServerSpec("soak", "ours", cmd, url=url, ready_timeout=900), args.json.parent).start()
    try:
        rep = soak(url, args)
    finally:
        if server is not None:
            server.stop()
    print_report(rep)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rep, indent=2))
    print(f"wrote {args.json}")
    return 0 if rep["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
