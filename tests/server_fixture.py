"""A real `factorllm serve` subprocess on 127.0.0.1 (a free port) for the server tests.

`served` (session scope) is shared by most server and metrics tests: one start (the factorized
default model, built quickly with contiguous experts and a random router, cached afterwards).
Tests that need their own process (SIGTERM, API key) call `ServerProcess(...).start()`.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
# Quick to build (no calibration data): 8 experts, top-4 (50% of the FFN active).
FAST_FACTOR = ["--experts", "8", "--top-k", "4", "--partition", "contiguous", "--router-init", "random"]
TOP_K = 4
EXPERTS = 8
SHARED_ARGS = FAST_FACTOR + ["--expert-timing-every", "1", "--dtype", "float32", "--max-num-seqs", "4", "--max-queued-requests", "2",
                             "--max-model-len", "512", "--max-body-bytes", "65536"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(url: str, name: str, labels: dict | None = None) -> float:
    """Sum of a metric's series (matching `labels`) in the server's /metrics."""
    from server.metrics import parse_text
    samples = parse_text(httpx.get(url + "/metrics", timeout=10).text).get(name, [])
    return sum(v for l, v in samples if all(l.get(k) == x for k, x in (labels or {}).items()))


def openai_error(r: httpx.Response, status: int) -> dict:
    """Assert `r` is an error with `status` in OpenAI's shape, no traceback; return its body."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], body
    assert "Traceback" not in r.text
    return err


def wait_for(cond, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class ServerProcess:
    def __init__(self, args: list[str], env: dict | None = None, log_name: str = "server"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = args
        self.env = {**os.environ, **(env or {})}
        self.env.setdefault("FACTORLLM_CACHE", str(REPO / ".cache" / "factorllm"))
        self.env.pop("FACTORLLM_API_KEY", None) if "--api-key" not in args else None
        self.log_path = Path(self.env["FACTORLLM_CACHE"]).parent / f"{log_name}-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 300) -> "ServerProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "w+")
        cmd = [sys.executable, "-m", "factorllm.cli", "serve", "--port", str(self.port), *self.args]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@pytest.fixture(scope="session")
def served():
    """The shared server: factorized default model, 4 sequences, 2 queued, 512 context, 64 KiB bodies."""
    t0 = time.monotonic()
    server = ServerProcess(SHARED_ARGS, log_name="served").start()
    server.startup_s = time.monotonic() - t0
    yield server
    server.stop()


@pytest.fixture
def oai(served):
    from openai import OpenAI
    return OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def served_model(served):
    """The served (factorized) model loaded in this process, fp32 on CPU, for direct scoring."""
    from factorllm.loading import load_model
    root = httpx.get(served.url + "/v1/models").json()["data"][0]["root"]
    return load_model(root)
