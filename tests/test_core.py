"""Core library: exact factorization, partitions, checkpoints, loading and CLI errors."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from factorllm.checkpoint import save_checkpoint
from factorllm.child_process import in_child_process
from factorllm.errors import SourceError
from factorllm.factor_config import FactorConfig
from factorllm.factorize import choose_partition, factorize, moe_layers
from factorllm.loading import (build_cache_entry, cache_entry_lock, load_model, load_transformer, read_config,
                               resolve_dense_dir)
from factorllm.calibration import sample_from_model
from factorllm.partition import balanced_assign, balanced_clusters

SLICE_LAYERS = 6


def sliced(loaded, layers=SLICE_LAYERS):
    """A copy of the real model keeping its first `layers` layers (fast, same weights)."""
    out = copy.copy(loaded)
    out.model = copy.deepcopy(loaded.model)
    out.model.model.layers = out.model.model.layers[:layers]
    return out


@pytest.fixture(scope="module")
def dense_slice(default_model):
    return sliced(default_model)


@pytest.mark.parametrize("partition", ["contiguous", "cluster"])
@pytest.mark.parametrize("gate", ["sum", "scaled", "weighted"])
@pytest.mark.parametrize("shared", [0, 2])
def test_all_experts_reproduce_dense(dense_slice, sample_tokens, partition, gate, shared):
    n = 16 - shared  # 16 groups of 96 neurons
    factor = FactorConfig(experts=n, top_k=n, partition=partition, shared_experts=shared, gate=gate,
                          router_init="lstsq")
    moe = sliced(dense_slice)
    factorize(moe.model, factor, sample_tokens)
    if gate == "weighted":
        # The weighted gate is exact at K = N only under uniform routing.
        for m in moe_layers(moe.model):
            m.router.weight.data.zero_()
    with torch.no_grad():
        want = dense_slice.model(sample_tokens)
        got = moe.model(sample_tokens)
    assert (got - want).abs().max().item() <= 1e-3


def test_top_k_below_n_changes_output_and_counts_tokens(dense_slice, sample_tokens):
    moe = sliced(dense_slice)
    factorize(moe.model, FactorConfig(experts=8, top_k=2, partition="cluster"), sample_tokens)
    with torch.no_grad():
        diff = (moe.model(sample_tokens) - dense_slice.model(sample_tokens)).abs().max().item()
    assert diff > 1e-2
    for m in moe_layers(moe.model):
        assert m.token_counts.sum().item() == sample_tokens.numel() * 2


def test_dense_layers_keep_every_expert_at_the_same_mean_k(dense_slice, sample_tokens):
    """--dense-layers 1: layer 0 computes its dense FFN exactly, the middle layers pay for it and
    the active fraction is unchanged."""
    factor = FactorConfig(experts=10, shared_experts=6, top_k=3, partition="cluster", dense_layers=1)
    moe = sliced(dense_slice)
    factorize(moe.model, factor, sample_tokens)
    ks = [m.top_k for m in moe_layers(moe.model)]
    assert ks == factor.top_k_per_layer and ks[0] == 10 and sum(ks) == 3 * SLICE_LAYERS
    assert ks == [10, 2, 1, 1, 2, 2]  # the middle layers pay first
    assert factor.active_ffn_fraction(SLICE_LAYERS) == pytest.approx((3 + 6) / 16)
    x = torch.randn(32, dense_slice.model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = dense_slice.model.layers[0].mlp(x)
        torch.testing.assert_close(moe.model.layers[0].mlp(x), want, rtol=1e-5, atol=1e-3)  # |want| ~ 300
        assert (moe.model.layers[2].mlp(x) - dense_slice.model.layers[2].mlp(x)).abs().max().item() > 1e-2
    # Past the tuned sizes the dense layer runs as one matmul pair, the others sort by expert.
    assert moe.model.layers[0].mlp.path_for(4096) == "masked" and moe.model.layers[1].mlp.path_for(4096) == "grouped"


def test_dense_layers_that_cannot_be_paid_for_are_refused():
    from factorllm.errors import UsageError
    with pytest.raises(UsageError, match="below top-1"):
        FactorConfig(experts=10, shared_experts=6, top_k=1, dense_layers=1).resolve_layer_top_k(30)
    with pytest.raises(UsageError, match="needs 30 values"):
        FactorConfig(experts=10, top_k=2, top_k_per_layer=[2, 2]).resolve_layer_top_k(30)


@pytest.mark.parametrize("sequential", [True, False])
def test_each_layer_is_fit_on_the_inputs_below_it(dense_slice, sample_tokens, sequential):
    """Sequential: layer i is fit on what the factorized layers 0..i-1 feed it (the finished
    model's own FFN inputs); otherwise on the dense model's FFN inputs."""
    from factorllm.factorize import capture_ffn_inputs, factorize_layer, fit_layer_by_layer
    factor = FactorConfig(experts=8, top_k=2, partition="cluster", router_label="greedy", refit=True)
    factor.validate(1536, SLICE_LAYERS)
    model = sliced(dense_slice).model
    seen = []

    def fit(i, mlp, x):
        seen.append(x.clone())
        return factorize_layer(mlp, x, factor, i)

    fit_layer_by_layer(model, sample_tokens, fit, sequential)
    assert len(seen) == SLICE_LAYERS and all(type(layer.mlp).__name__ == "MoEFFN" for layer in model.layers)
    own, dense = capture_ffn_inputs(model, sample_tokens), capture_ffn_inputs(dense_slice.model, sample_tokens)
    expected = own if sequential else dense
    for got, want in zip(seen, expected):
        assert torch.allclose(got, want, atol=1e-5)
    assert (own[-1] - dense[-1]).abs().max() > 1e-2  # the two modes really differ


@pytest.mark.parametrize("shared", [0, 3])
def test_cluster_partition_is_a_balanced_permutation(dense_slice, sample_tokens, shared):
    from factorllm.factorize import capture_ffn_inputs
    x = capture_ffn_inputs(dense_slice.model, sample_tokens)[2]
    mlp = dense_slice.model.layers[2].mlp
    factor = FactorConfig(experts=16 - shared, top_k=2, partition="cluster", shared_experts=shared)
    factor.validate(mlp.gate_proj.out_features)
    shared_idx, groups = choose_partition(mlp, mlp.hidden(x), factor, seed=0)
    assert groups.shape == (16 - shared, 96) and shared_idx.numel() == 96 * shared
    everything = torch.cat([shared_idx, groups.flatten()])
    assert torch.equal(everything.sort().values, torch.arange(1536))


def test_balanced_clusters_equal_sizes_and_grouping():
    # Two obvious groups of points: balanced k-means must keep them apart.
    gen = torch.Generator().manual_seed(0)
    a = torch.tensor([1.0, 0.0, 0.0]) + 0.05 * torch.randn(10, 3, generator=gen)
    b = torch.tensor([0.0, 0.0, 1.0]) + 0.05 * torch.randn(10, 3, generator=gen)
    groups = balanced_clusters(torch.cat([a, b]), 2)
    assert groups.shape == (2, 10)
    assert sorted(sorted(g.tolist()) for g in groups) == [list(range(10)), list(range(10, 20))]


def test_balanced_assignment_fills_nearest_first_within_capacity():
    # Points 0-2 all prefer cluster 0, which has room for two: the two nearest (0, 1) stay, 2 moves.
    dist = torch.tensor([[0.1, 0.9], [0.2, 0.8], [0.3, 0.5], [0.9, 0.1]])
    assert balanced_assign(dist, 2).tolist() == [0, 0, 1, 1]


def test_calibration_sampling_is_seeded_and_leaves_the_model_alone(dense_slice):
    model = dense_slice.model
    before = model.lm_head.weight.clone()
    a = sample_from_model(model, dense_slice.tokenizer, 3, 12, seed=0)
    assert a.shape == (3, 12) and 0 <= a.min() and a.max() < model.config.vocab_size
    assert torch.equal(a, sample_from_model(model, dense_slice.tokenizer, 3, 12, seed=0))
    assert not torch.equal(a, sample_from_model(model, dense_slice.tokenizer, 3, 12, seed=1))
    assert model.lm_head.weight.dtype == torch.float32 and torch.equal(model.lm_head.weight, before)


def test_save_load_round_trip(default_model, sample_tokens, tmp_path):
    loaded = copy.copy(default_model)
    loaded.model = copy.deepcopy(default_model.model)
    factor = FactorConfig(experts=8, top_k=2, partition="contiguous", router_init="random", shared_experts=0)
    factorize(loaded.model, factor, None)
    out = save_checkpoint(loaded, factor, tmp_path / "ckpt")
    config = json.loads((out / "config.json").read_text())
    assert config["factorllm"]["experts"] == 8 and config["model_type"] == "llama"
    assert not list(out.glob("*.bin"))
    again = load_model(str(out))
    assert again.factor.experts == 8 and again.factor.top_k == 2
    with torch.no_grad():
        assert torch.equal(loaded.model(sample_tokens), again.model(sample_tokens))


def test_per_layer_top_k_round_trip(default_model, sample_tokens, tmp_path):
    loaded = copy.copy(default_model)
    loaded.model = copy.deepcopy(default_model.model)
    factor = FactorConfig(experts=8, top_k=2, partition="contiguous", router_init="random", dense_layers=2)
    factorize(loaded.model, factor, None)
    again = load_model(str(save_checkpoint(loaded, factor, tmp_path / "ckpt")))
    ks = [m.top_k for m in moe_layers(again.model)]
    assert ks[:2] == [8, 8] and sum(ks) == 2 * 30 and ks == again.factor.top_k_per_layer
    with torch.no_grad():
        assert torch.equal(loaded.model(sample_tokens), again.model(sample_tokens))


HF_FAMILIES = {
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3", head_dim=16),
    "mistral": dict(model_type="mistral"),
    "gemma": dict(model_type="gemma", head_dim=16, hidden_act="gelu_pytorch_tanh",
                  hidden_activation="gelu_pytorch_tanh"),
}


@pytest.mark.parametrize("family", sorted(HF_FAMILIES))
def test_other_llama_family_directories_match_transformers(family, tmp_path):
    """A small randomly initialized model of each family, saved by transformers, loads into our
    Transformer with the same logits."""
    from transformers import AutoConfig, AutoModelForCausalLM
    kw = dict(HF_FAMILIES[family])
    config = AutoConfig.for_model(kw.pop("model_type"), vocab_size=128, hidden_size=64, intermediate_size=96,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=128, **kw)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model = load_transformer(tmp_path, read_config(tmp_path))
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(tokens) - hf(tokens).logits).abs().max().item()
    assert diff < 1e-4


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "factorllm.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def assert_clean_error(result, *needles):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [ln for ln in result.stderr.strip().splitlines() if "error" in ln.lower()]
    assert len(lines) == 1, result.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def make_model_dir(path, default_model, **config_changes):
    path.mkdir()
    config = dict(default_model.hf_config)
    config.update(config_changes)
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_bad_sources_fail_cleanly(tmp_path, default_model):
    assert_clean_error(run_cli("info", "--model", str(tmp_path / "missing")), "not found")

    gpt2 = make_model_dir(tmp_path / "gpt2", default_model, model_type="gpt2")
    assert_clean_error(run_cli("factorize", "--model", str(gpt2), "--experts", "8", "--top-k", "2",
                               "--out", str(tmp_path / "o")), "unsupported architecture")

    pickled = make_model_dir(tmp_path / "pickled", default_model)
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    assert_clean_error(run_cli("factorize", "--model", str(pickled), "--experts", "8", "--top-k", "2",
                               "--partition", "contiguous", "--router-init", "random",
                               "--out", str(tmp_path / "o")), "pickle")

    corrupt = make_model_dir(tmp_path / "corrupt", default_model)
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    assert_clean_error(run_cli("factorize", "--model", str(corrupt), "--experts", "8", "--top-k", "2",
                               "--partition", "contiguous", "--router-init", "random",
                               "--out", str(tmp_path / "o")), "corrupt")

    old = make_model_dir(tmp_path / "old", default_model, factorllm={"experts": 8, "top_k": 2})
    assert_clean_error(run_cli("factorize", "--model", str(old), "--experts", "8", "--top-k", "2",
                               "--out", str(tmp_path / "o")), "format 1")

    not_gguf = tmp_path / "weights.txt"
    not_gguf.write_text("hello")
    assert_clean_error(run_cli("info", "--model", str(not_gguf)), "unsupported model file")

    broken_gguf = tmp_path / "broken.gguf"  # converted in a child process: its error must come back as one line
    broken_gguf.write_bytes(b"GGUF" + bytes(60))
    assert_clean_error(run_cli("info", "--model", str(broken_gguf)), "cannot read GGUF file")

    not_a_dir = tmp_path / "file"  # a cache that cannot be written (as root, chmod would not stop the writes)
    not_a_dir.write_text("")
    assert_clean_error(run_cli("info", "--model", str(broken_gguf), env=dict(os.environ, FACTORLLM_CACHE=str(not_a_dir / "c"))),
                       "cannot write to the model cache", "FACTORLLM_CACHE")


def test_a_build_in_a_child_process_returns_its_value_and_reports_its_failures():
    """Conversion and factorization run in a child interpreter (factorllm.child_process) so that
    their temporaries leave with it: its value comes back, a user error as itself, a bug or a
    killed child as a RuntimeError."""
    assert in_child_process(os.getpid) != os.getpid()
    with pytest.raises(SourceError, match="model source not found: /nonexistent/model"):
        in_child_process(resolve_dense_dir, "/nonexistent/model")
    with pytest.raises(RuntimeError, match="int failed in a child process: ValueError"):
        in_child_process(int, "not a number")
    with pytest.raises(RuntimeError, match="_exit exited with status 3"):
        in_child_process(os._exit, 3)


def test_a_cache_entry_another_process_is_building_is_waited_for_not_built_again(tmp_path):
    """Replicas on one shared cache: while one holds an entry's lock (building it), another
    waits for it and then uses the entry instead of building it too (here its build would fail)."""
    entry = tmp_path / "entry"
    holding = threading.Event()

    def other_replica():
        with cache_entry_lock(entry):
            holding.set()
            time.sleep(1.0)
            entry.mkdir()

    other = threading.Thread(target=other_replica)
    other.start()
    holding.wait()
    t0 = time.perf_counter()
    build_cache_entry(entry, entry.is_dir, os._exit, 3)
    assert entry.is_dir() and time.perf_counter() - t0 > 0.5
    other.join()
    with pytest.raises(RuntimeError, match="status 3"):  # with the entry missing, it builds
        build_cache_entry(tmp_path / "other", (tmp_path / "other").is_dir, os._exit, 3)


def test_bad_factorization_arguments_fail_cleanly():
    assert_clean_error(run_cli("info", "--experts", "7", "--top-k", "2"), "must divide", "allowed --experts")
    assert_clean_error(run_cli("info", "--experts", "8", "--top-k", "9"), "1 <= K <= N")
    assert_clean_error(run_cli("info", "--experts", "8"), "--top-k")
    assert_clean_error(run_cli("info", "--experts", "8", "--top-k-per-layer", "2,2"), "needs 30 values")
    assert_clean_error(run_cli("info", "--experts", "8", "--top-k-per-layer", "2,x"), "comma-separated integers")
    assert_clean_error(run_cli("info", "--preset", "quality", "--top-k", "1"), "below top-1")
    assert_clean_error(run_cli("info", "--preset", "quality", "--calib-seqs", "0"), "--calib-seqs must be >= 1")


def test_info_reports_active_fraction_and_flops():
    r = run_cli("info", "--experts", "8", "--top-k", "2", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["active_ffn_fraction"] == 0.25 and s["layers"] == 30
    f = s["flops_per_token"]
    assert f["ffn_active"] == f["ffn_dense"] // 4
    assert s["params_active"] < s["params_total"]
    for preset, fraction in (("quality", 0.5), ("fast", 0.25)):  # dense first layer, same mean K
        r = run_cli("info", "--preset", preset, "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["active_ffn_fraction"] == pytest.approx(fraction)


def test_factorize_command_writes_a_loadable_checkpoint(tmp_path, default_model):
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(["The quick brown fox jumps over the lazy dog while the farmer watches."] * 60))
    out = tmp_path / "ckpt"
    r = run_cli("factorize", "--experts", "8", "--top-k", "4", "--partition", "cluster", "--calib", str(calib),
                "--calib-seqs", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "active FFN 50.0%" in r.stdout
    assert json.loads((out / "config.json").read_text())["factorllm"]["calib_seqs"] == 2
    info = run_cli("info", "--model", str(out), "--json")
    assert json.loads(info.stdout)["experts"] == 8


def test_tuning_takes_routing_sensitive_paths_only_by_a_margin(default_model, monkeypatch):
    """tune_dispatch's random inputs route evenly, which flatters `grouped` and `padded`: they win
    a count over `masked` only when more than SKEW_MARGIN faster; the plan's last path covers
    larger counts."""
    import factorllm.moe
    from factorllm.factorize import factorize_layer
    factor = FactorConfig(experts=8, top_k=2, partition="contiguous", router_init="random")
    factor.validate(1536)
    moe = factorize_layer(default_model.model.layers[3].mlp, torch.empty(0, 576), factor, 3).eval()
    picks = {1: {"grouped": 1.0, "masked": 1.1}, 2: {"grouped": 1.0, "masked": 1.5},
             4: {"padded": 1.0, "masked": 1.15}, 8: {"looped": 1.0, "masked": 1.1}}
    times = {n: {p: 2.0 for p in moe.available_paths} | t for n, t in picks.items()}
    counts = iter(times)
    monkeypatch.setattr(factorllm.moe, "median_in_turns", lambda fns, *a, **k: times[next(counts)])
    with torch.no_grad():
        plan = moe.tune_dispatch(8)
    assert plan == [(1, "masked"), (2, "grouped"), (4, "masked"), (8, "looped")]
    assert moe.path_for(100) == "looped"


@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_dispatch_paths_agree(default_model, tokens, monkeypatch):
    """Every dispatch path computes the same layer output; the plan picks one; a plan's `padded`
    hands a lopsided routing to `grouped`."""
    import factorllm.moe
    from factorllm.factorize import factorize_layer
    dense = default_model.model.layers[3].mlp
    factor = FactorConfig(experts=8, top_k=3, partition="contiguous", router_init="random", gate="weighted")
    factor.validate(dense.gate_proj.out_features)
    moe = factorize_layer(dense, torch.empty(0, 576), factor, 3).eval()
    x = torch.randn(tokens, 576, generator=torch.Generator().manual_seed(tokens))
    with torch.no_grad():
        _, idx, w = moe.route(x)
        outs = [getattr(moe, p)(x, idx, w) for p in moe.available_paths]
        plan = moe.tune_dispatch(6, repeats=2)
        assert [n for n, _ in plan] == [1, 2, 4, 6] and moe.path_for(100) == plan[-1][1]
        outs.append(moe(x))
        moe.dispatch_plan = [(tokens, "padded")]
        monkeypatch.setattr(factorllm.moe, "MAX_PADDING", 1.0)
        assert moe.padding_ratio(idx) > 1.0
        outs.append(moe(x))
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-4, atol=1e-3)


def test_experts_too_narrow_for_grouped_mm_take_the_loop(default_model):
    """128 experts of 12 neurons in bf16 (rows of 24 bytes; `F.grouped_mm` wants multiples of 16):
    no `grouped` among the paths, untuned forwards take `looped`, tuning runs, and every path
    agrees with the loop over experts."""
    from factorllm.factorize import factorize_layer
    dense = default_model.model.layers[3].mlp
    factor = FactorConfig(experts=128, top_k=16, partition="contiguous", router_init="random")
    factor.validate(dense.gate_proj.out_features)
    moe = factorize_layer(dense, torch.empty(0, 576), factor, 3).eval()
    assert moe.grouped_fits and moe.sorted_path == "grouped"  # fp32: 48-byte rows
    moe.to(torch.bfloat16)
    assert not moe.grouped_fits and "grouped" not in moe.available_paths and moe.path_for(7) == "looped"
    x = torch.randn(24, 576, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        _, idx, w = moe.route(x)
        reference = moe.looped(x, idx, w)
        outs = {p: getattr(moe, p)(x, idx, w) for p in moe.available_paths} | {"forward": moe(x)}
        assert [n for n, _ in moe.tune_dispatch(4, repeats=1)] == [1, 2, 4]
    for path, o in outs.items():  # bf16 sums in different orders
        assert (o.float() - reference.float()).norm() < 0.01 * reference.float().norm(), path


@pytest.mark.parametrize("gate", ["sum", "scaled", "weighted"])
def test_training_path_gradients_match_the_expert_loop(default_model, gate):
    """With gradients on, the layer runs `masked` (every expert, unchosen ones zeroed): the output
    and the gradients reaching the router (straight-through gates), the experts and the shared
    neurons equal those of summing each token's chosen experts one by one."""
    from factorllm.factorize import factorize_layer
    dense = default_model.model.layers[4].mlp
    factor = FactorConfig(experts=6, shared_experts=2, top_k=2, partition="contiguous", router_init="random", gate=gate)
    factor.validate(dense.gate_proj.out_features)
    moe = factorize_layer(dense, torch.empty(0, 576), factor, 4).train()
    gen = torch.Generator().manual_seed(1)
    x, probe = torch.randn(24, 576, generator=gen), torch.randn(24, 576, generator=gen)
    params = [moe.router.weight, moe.experts_gate, moe.experts_up, moe.experts_down, moe.shared.down_proj.weight]
    results = {}
    for way in ("layer", "one by one"):
        for p in params:
            p.grad = None
        if way == "layer":
            y = moe(x)
        else:
            _, idx, w = moe.route(x)
            y = torch.cat([moe.shared(x[t:t + 1]) + sum(
                moe.expert_forward(int(e), x[t:t + 1], None if w is None else w[t:t + 1, j:j + 1])
                for j, e in enumerate(idx[t])) for t in range(len(x))])
        (y * probe).sum().backward()
        results[way] = [y.detach()] + [p.grad.clone() for p in params]
    assert results["layer"][1].abs().sum() > 0  # the router does learn through the gates
    for a, b in zip(results["layer"], results["one by one"]):  # fp32 summation order only
        assert (a - b).norm() <= 1e-5 * b.norm()


def test_moe_stats_reset_under_inference_mode_stay_usable_outside():
    """The engine resets routing stats inside inference mode; the layer must still run (and count)
    outside it afterwards, e.g. when the same model is scored directly."""
    from factorllm.moe import MoEFFN
    m = MoEFFN(16, 4, 4, 2).eval()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.1)
    with torch.inference_mode():
        m.reset_stats()
        m(torch.randn(3, 16))
    with torch.no_grad():
        m(torch.randn(3, 16))
    assert m.token_counts.sum().item() == 2 * 3 * 2


def test_routing_stats_of_several_layers_equal_a_direct_count():
    """Layers keep each forward's router logits and choices; `routing_stats` counts those of
    several layers and forwards at once. They must equal counting each forward directly (softmax
    entropy, bincount of the top-k), whatever the gate."""
    from factorllm.moe import MAX_PENDING, MoEFFN, routing_stats
    torch.manual_seed(0)
    layers = [MoEFFN(16, 4, 8, k, gate=gate).eval() for k, gate in [(2, "sum"), (3, "weighted"), (1, "scaled")]]
    want_counts = torch.zeros(3, 8, dtype=torch.long)
    want_entropy = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for m in layers:
            for p in m.parameters():
                torch.nn.init.normal_(p, std=0.5)
        for tokens in (1, 5, 1, 9):
            x = torch.randn(tokens, 16)
            for i, m in enumerate(layers):
                m(x)
                probs = m.router(x).softmax(-1)
                want_counts[i] += probs.topk(m.top_k, -1).indices.flatten().bincount(minlength=8)
                want_entropy[i] += torch.special.entr(probs).sum().item()
        counts, entropy = routing_stats(layers)
        assert torch.equal(counts, want_counts)
        assert torch.allclose(entropy, want_entropy, rtol=1e-5)
        assert all(not m.pending_stats for m in layers)  # used up: the next call counts nothing new
        assert routing_stats(layers)[0].sum().item() == 0
        # Nobody reading: a layer counts its own records rather than keep more than MAX_PENDING.
        m = layers[0]
        for _ in range(3 * MAX_PENDING):
            m(torch.randn(1, 16))
        assert len(m.pending_stats) <= MAX_PENDING
        assert m.token_counts.sum().item() == 3 * MAX_PENDING * 2


def test_rerouting_a_checkpoint_to_another_k(default_model, sample_tokens, tmp_path, capsys):
    """One checkpoint, other experts per token (`--top-k` on eval and serve): K = N gives the dense
    logits back, the build's dense layers stay dense, bad K and dense sources are refused."""
    from factorllm.cli import main
    from factorllm.errors import UsageError
    from factorllm.pipeline import with_top_k
    from server.cli import load_for_serving
    from server.settings import ServerSettings

    loaded = copy.copy(default_model)
    loaded.model = copy.deepcopy(default_model.model)
    factor = FactorConfig(experts=8, top_k=2, partition="contiguous", router_init="random", dense_layers=2)
    factorize(loaded.model, factor, None)
    ckpt = str(save_checkpoint(loaded, factor, tmp_path / "ckpt"))
    with torch.no_grad():
        built = loaded.model(sample_tokens)

        every = with_top_k(load_model(ckpt), top_k=8)
        assert every.factor.top_k_per_layer == [8] * 30 and every.factor.active_ffn_fraction(30) == 1.0
        assert every.name.endswith("-k8") and every.factor.trained["rerouted_from"] == factor.top_k_per_layer
        assert (every.model(sample_tokens) - default_model.model(sample_tokens)).abs().max().item() <= 1e-3

        three = with_top_k(load_model(ckpt), top_k=3)
        ks = [m.top_k for m in moe_layers(three.model)]
        assert ks[:2] == [8, 8] and sum(ks) == 3 * 30 and ks == three.factor.top_k_per_layer
        assert (three.model(sample_tokens) - built).abs().max().item() > 1e-2

    with pytest.raises(UsageError, match="1 <= K <= N"):
        with_top_k(load_model(ckpt), top_k=9)
    with pytest.raises(UsageError, match="not factorized"):
        with_top_k(default_model, top_k=2)

    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 12)
    out = tmp_path / "r.json"
    assert main(["eval", "--model", ckpt, "--top-k", "8", "--ppl", str(text), "--window", "32", "--no-speed",
                 "--baseline", "default", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["active_ffn_fraction"] == 1.0 and r["ppl"] == pytest.approx(r["baseline"]["ppl"], rel=1e-4)
    capsys.readouterr()

    info = run_cli("info", "--model", ckpt, "--top-k", "8", "--json")
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["active_ffn_fraction"] == 1.0
    assert_clean_error(run_cli("info", "--model", ckpt, "--experts", "4"), "already factorized")

    served = load_for_serving(ServerSettings(model=ckpt, top_k_per_layer=[8] * 2 + [1] * 28))
    assert [m.top_k for m in moe_layers(served.model)] == [8, 8] + [1] * 28
    with pytest.raises(UsageError, match="already factorized"):
        load_for_serving(ServerSettings(model=ckpt, experts=4, top_k=2))
