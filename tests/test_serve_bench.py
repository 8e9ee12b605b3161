"""CI smoke of benchmarks/serve_bench.py: against this server only (one quick factorized configuration,
concurrency 1 and 4, a few seconds each), plus the pure helpers (percentiles, table, docs section)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "serve_bench.py"


def load_bench():
    if "serve_bench" not in sys.modules:
        spec = importlib.util.spec_from_file_location("serve_bench", SCRIPT)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["serve_bench"] = mod  # dataclasses look their module up while it executes
        spec.loader.exec_module(mod)
    return sys.modules["serve_bench"]


def test_percentiles_and_docs_section(tmp_path):
    sb = load_bench()
    assert sb.pct([], 50) is None
    assert sb.pct([3.0], 99) == 3.0
    assert sb.pct([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert sb.pct([0.0, 10.0], 90) == pytest.approx(9.0)
    d = sb.dist([0.1, 0.2, 0.3])
    assert d["p50"] == pytest.approx(200.0) and d["mean"] == pytest.approx(200.0)

    results = tmp_path / "results.md"
    results.write_text("# Results\n\n## Quality\nkeep me\n\n## Serving benchmark\nold\n\n## Later\nkeep too\n")
    sb.update_docs(results, "## Serving benchmark\n\nnew table\n")
    text = results.read_text()
    assert "keep me" in text and "keep too" in text and "new table" in text and "old" not in text
    assert text.index("## Quality") < text.index("new table") < text.index("## Later")
    other = tmp_path / "other.md"
    other.write_text("# Results\n\n## Quality\nq\n")
    sb.update_docs(other, "## Serving benchmark\n\nappended\n")
    assert other.read_text().rstrip().endswith("appended")


def test_roofline_costs_shrink_with_factorization():
    sb = load_bench()
    from factorllm.loading import resolve_dense_dir
    model_dir, _ = resolve_dense_dir("default")
    dense = sb.model_costs(model_dir, None, 1, 128, 128, "bfloat16")
    fast = sb.model_costs(model_dir, sb.factor_recipe("ours-fast"), 1, 128, 128, "bfloat16")
    assert fast["flops_per_output_token"] < 0.7 * dense["flops_per_output_token"]
    assert fast["weight_bytes_per_step"] < 0.7 * dense["weight_bytes_per_step"]
    # at 64 sequences nearly every expert is read each step: no bandwidth saving left
    fast64 = sb.model_costs(model_dir, sb.factor_recipe("ours-fast"), 64, 128, 128, "bfloat16")
    assert fast64["ffn_fraction_read_per_step"] > 0.95
    machine = {"gemm_flops_bf16": 1e11, "gemm_flops_fp32": 5e10, "copy_bytes_per_s": 1e10}
    r = sb.roofline(machine, dense, "bfloat16", 10.0)
    assert r["flop_bound_tok_s"] > 0 and 0 < r["frac_bw"] < 10


@pytest.mark.slow
def test_serve_bench_smoke_against_our_server(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(SCRIPT), "--servers", "ours-quick", "--concurrency", "1,4", "--duration", "5",
           "--input-len", "64", "--output-len", "16", "--num-prompts", "16", "--warmup", "2",
           "--roofline-seconds", "0.2", "--out", str(out), "--dtype", "float32"]
    env = {**os.environ}
    env.setdefault("FACTORLLM_CACHE", str(REPO / ".cache" / "factorllm"))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["skipped"] == {}, report["skipped"]
    runs = report["runs"]
    assert [r["concurrency"] for r in runs] == [1, 4]
    for run in runs:
        s = run["summary"]
        assert s["errors"] == 0, s["error_samples"]
        assert s["completed"] >= 1
        assert s["output_tokens_per_s"] > 0 and s["requests_per_s"] > 0
        assert s["output_tokens_per_request"] == 16 and s["short"] == 0  # ignore_eos + min_tokens honoured
        assert abs(s["prompt_tokens_per_request"] - 64) <= 2
        t, i = s["ttft_ms"], s["itl_ms"]
        assert 0 < t["p50"] <= t["p90"] <= t["p99"]
        assert 0 < i["p50"] <= i["p90"] <= i["p99"]
        assert t["p50"] < s["latency_ms"]["p50"]
        assert 0 < run["roofline"]["frac_flop"] and 0 < run["roofline"]["frac_bw"]
    assert runs[1]["summary"]["requests"] >= 4
    assert "| ours-quick | c=4 |" in proc.stdout
    assert out.with_suffix(".png").stat().st_size > 0
    # the server was stopped: its process group is gone
    assert Path(report["servers"]["ours-quick"]["log"]).exists()
    with pytest.raises(ProcessLookupError):
        os.killpg(report["servers"]["ours-quick"]["pid"], 0)


def test_serve_bench_against_a_running_server_names_its_model(tmp_path, served):
    """--external: a server started elsewhere, under its own model name (not "bench"), is measured
    without errors: the requests name the model the server lists."""
    out = tmp_path / "ext.json"
    cmd = [sys.executable, str(SCRIPT), "--servers", "", "--external", f"shared={served.url}", "--concurrency", "2",
           "--duration", "3", "--input-len", "32", "--output-len", "8", "--num-prompts", "4", "--warmup", "1",
           "--no-roofline", "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "BENCH_MODEL"}
    env.setdefault("FACTORLLM_CACHE", str(REPO / ".cache" / "factorllm"))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["skipped"] == {}, report["skipped"]
    (run,) = report["runs"]
    assert run["summary"]["errors"] == 0 and run["summary"]["completed"] >= 2, run["summary"]["error_samples"]
    assert "| shared | c=2 |" in proc.stdout


def test_table_ratios_and_targets():
    sb = load_bench()

    def run(server, c, tok_s, ttft):
        d = {"p50": ttft, "p90": ttft, "p99": ttft, "mean": ttft}
        return {"server": server, "mode": "closed", "concurrency": c, "rate": None, "summary": {
            "requests_per_s": tok_s / 128, "output_tokens_per_s": tok_s, "completed": 4, "errors": 0,
            "output_tokens_per_request": 128, "length_forced": True, "ttft_ms": d, "itl_ms": d, "tpot_ms": d}}

    report = {"runs": [run("ours-dense", 16, 100.0, 50), run("ours-fast", 16, 150.0, 40), run("vllm", 16, 120.0, 30),
                       run("ours-dense", 1, 10.0, 50), run("vllm", 1, 12.0, 60)]}
    table = sb.markdown_table(report)
    assert "| ours-fast | c=16 | 1.17 | 150.0 | 1.50 | 1.25 |" in table
    lines = sb.check_targets(report)
    assert "- ours-fast / ours-dense at 16 streams: 1.50x (target >= 1.4x) met" in lines
    assert "- ours-dense / vllm at 16 streams: 0.83x (target >= 1.0x) MISSED" in lines
    assert "- ours-fast / ours-dense at 64 streams: not measured" in lines
    assert any(ln.startswith("- TTFT p50 at 1 stream") and ln.endswith(" met") for ln in lines)
