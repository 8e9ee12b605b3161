"""Router training labels and learning, evaluation numbers, and clear errors for bad eval files."""
from __future__ import annotations

import copy
import json
import math
import shutil
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from factorllm.cli import main
from factorllm.errors import SourceError
from factorllm.evaluate import choice_loglikelihoods, mc_scores, perplexity, read_mc_items
from factorllm.factor_config import FactorConfig
from factorllm.factorize import capture_ffn_inputs, factorize_layer
from factorllm.router_training import (agreement, balance_loss, compute_labels, label_distribution, labels_from_outputs,
                                       loss_gradient, par_loss, train_router)


# ---------------------------------------------------------------- labels

def test_labels_on_a_hand_checkable_case():
    # target y = (3, 0); experts E0 = (1, 0), E1 = (2, 0), E2 = (0, 1); N = 3.
    outs = torch.tensor([[[1.0, 0.0]], [[2.0, 0.0]], [[0.0, 1.0]]])
    y = torch.tensor([[3.0, 0.0]])
    # paper, K = 1: closest to y * 1/3 = (1, 0) -> E0.  K = 2: closest to (2, 0) -> E1, then E0.
    assert labels_from_outputs(outs, y, 1, "paper").tolist() == [[0]]
    assert labels_from_outputs(outs, y, 2, "paper").tolist() == [[1, 0]]
    # greedy, K = 1: ||y - E1|| = 1 beats ||y - E0|| = 2 -> E1; K = 2: E1 then E0 (exact).
    assert labels_from_outputs(outs, y, 1, "greedy").tolist() == [[1]]
    assert labels_from_outputs(outs, y, 2, "greedy").tolist() == [[1, 0]]
    # with the paper's N/K = 3 gate scale, one expert: ||y - 3 E0|| = 0 -> E0.
    assert labels_from_outputs(outs, y, 1, "greedy", scale=3.0).tolist() == [[0]]
    # mass: largest norms -> E1, then E0 and E2 tie at 1 (either is fine).
    assert labels_from_outputs(outs, y, 1, "mass").tolist() == [[1]]
    with pytest.raises(ValueError):
        labels_from_outputs(outs, y, 1, "nope")


def test_agreement_is_recall_at_k():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    labels = torch.tensor([[0, 2], [3, 2]])  # row 0: top-2 = {0, 1} has 0 only; row 1: {3, 2} has both
    assert agreement(logits, labels) == pytest.approx(0.75)


# ---------------------------------------------------------------- router learning on the real model

def test_written_out_router_gradient_equals_autograd():
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(50, 6, generator=gen)).requires_grad_()
    labels = torch.stack([torch.randperm(6, generator=gen)[:2] for _ in range(50)])  # K distinct experts
    q = label_distribution(labels, 6)
    (par_loss(logits, q) + 0.3 * balance_loss(logits, 2)).backward()
    got = loss_gradient(logits.detach(), q, 2, 0.3)
    assert torch.allclose(got, logits.grad, atol=1e-8, rtol=1e-4)
    assert got.abs().max() > 1e-3  # a real gradient, not two zeros


def test_router_learns_par_labels(default_model, sample_tokens):
    model = default_model.model
    inputs = capture_ffn_inputs(model, sample_tokens)
    factor = FactorConfig(experts=8, top_k=2, partition="contiguous", router_init="random", shared_experts=0)
    factor.validate(model.config.intermediate_size)
    for layer in (3, 20):
        x = inputs[layer].float()
        mlp = model.layers[layer].mlp
        moe = factorize_layer(mlp, x, factor, layer)
        with torch.no_grad():
            labels = compute_labels(moe, x, mlp(x), "greedy")
        assert labels.shape == (x.shape[0], 2)
        stats = train_router(moe, x, labels, steps=150, lr=1e-2)
        assert stats["loss_end"] < 0.7 * stats["loss_start"]
        assert stats["agree_end"] > stats["agree_start"] + 0.2
        assert stats["agree_end"] > 0.7


# ---------------------------------------------------------------- evaluation numbers

def test_perplexity_equals_direct_computation(default_model, sample_tokens):
    model = default_model.model
    tokens = sample_tokens[0, :20]
    got = perplexity(model, tokens, window=8, stride=4, batch_size=3, progress=False)
    # windows [0, 8) [4, 12) [8, 16) [12, 20): each scores the tokens the previous one did not.
    nll, n = 0.0, 0
    with torch.no_grad():
        for start, first, end in ((0, 1, 8), (4, 8, 12), (8, 12, 16), (12, 16, 20)):
            logp = model(tokens[None, start:end]).log_softmax(-1)[0]
            for t in range(first, end):
                nll -= logp[t - start - 1, tokens[t]].item()
                n += 1
    assert got["tokens"] == n == 19
    assert got["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-4)


def test_choice_loglikelihoods_equal_direct_computation(default_model):
    tok = default_model.tokenizer
    items = [{"context": "The capital of France is", "choices": ["Paris.", "a large potato."], "label": 0},
             {"context": "Question: What do cows drink?\nAnswer: ", "choices": ["water", "milk", "tea"], "label": 0}]
    lls = choice_loglikelihoods(default_model.model, tok, items, batch_size=2, progress=False)
    with torch.no_grad():
        for d, ll in zip(items, lls):
            ctx = d["context"].rstrip()
            spaces = d["context"][len(ctx):] + " "  # lm-eval: target delimiter " " + moved trailing space
            for c, got in zip(d["choices"], ll):
                ctx_ids = tok(ctx, add_special_tokens=False)["input_ids"]
                whole = tok(ctx + spaces + c, add_special_tokens=False)["input_ids"]
                logp = default_model.model(torch.tensor([whole])).log_softmax(-1)[0]
                want = sum(logp[t - 1, whole[t]].item() for t in range(len(ctx_ids), len(whole)))
                assert got == pytest.approx(want, abs=1e-3)
    assert lls[0][0] > lls[0][1]


def test_mc_scores_acc_and_acc_norm():
    items = [{"choices": ["a", "bbbb"], "label": 1}, {"choices": ["xx", "y"], "label": 0}]
    lls = [[-2.0, -3.0], [-1.0, -0.9]]
    s = mc_scores(items, lls)
    # item 0: acc picks 0 (wrong); per byte -2 vs -0.75 picks 1 (right).
    # item 1: acc picks 1 (wrong); per byte -0.5 vs -0.9 picks 0 (right).
    assert s == {"acc": 0.0, "acc_norm": 1.0, "chance": 0.5, "items": 2}


# ---------------------------------------------------------------- files

def write(path, text):
    path.write_text(text)
    return str(path)


def test_mc_reader_formats_and_errors(tmp_path):
    good = write(tmp_path / "mc.jsonl", json.dumps({"context": "c", "choices": ["a", "b"], "label": 1}) + "\n\n")
    assert read_mc_items(good) == [{"context": "c", "choices": ["a", "b"], "label": 1}]
    piqa = write(tmp_path / "piqa.jsonl", json.dumps({"goal": "g", "sol1": "s1", "sol2": "s2"}) + "\n")
    with pytest.raises(SourceError, match="labels file"):
        read_mc_items(piqa)
    write(tmp_path / "piqa-labels.lst", "1\n")
    assert read_mc_items(piqa) == [{"context": "Question: g\nAnswer:", "choices": ["s1", "s2"], "label": 1}]
    cases = {"missing": (str(tmp_path / "nope.jsonl"), "not found"),
             "empty": (write(tmp_path / "empty.jsonl", "\n \n"), "empty"),
             "json": (write(tmp_path / "bad.jsonl", "{not json\n"), "not valid JSON"),
             "fields": (write(tmp_path / "f.jsonl", json.dumps({"context": "c", "choices": ["a", "b"]})), "label"),
             "label": (write(tmp_path / "l.jsonl", json.dumps({"context": "c", "choices": ["a", "b"], "label": 2})),
                       "index"),
             "choices": (write(tmp_path / "c.jsonl", json.dumps({"context": "c", "choices": "ab", "label": 0})),
                         "list")}
    for path, msg in cases.values():
        with pytest.raises(SourceError, match=msg):
            read_mc_items(path)


def test_eval_and_train_cli_errors_are_one_line(tmp_path, capsys):
    rc = main(["eval", "--model", "default", "--ppl", str(tmp_path / "missing.txt"), "--no-speed"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "not found" in err
    rc = main(["eval", "--model", "default", "--ppl", write(tmp_path / "e.txt", "  \n"), "--no-speed"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "empty" in err
    rc = main(["train", "--data", str(tmp_path / "t.txt"), "--out", str(tmp_path / "o"), "--finetune",
               "--seconds", "0"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "--seconds must be positive" in err
    rc = main(["train", "--out", str(tmp_path / "o"), "--finetune", "--train", "experts", "lora"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "--train: train the experts whole" in err


def test_eval_cli_json(tmp_path, capsys):
    text = write(tmp_path / "t.txt", "The quick brown fox jumps over the lazy dog. " * 12)
    mc = write(tmp_path / "mc.jsonl", json.dumps({"context": "The sky is", "choices": ["blue.", "a fish."], "label": 0}))
    out = tmp_path / "r.json"
    assert main(["eval", "--model", "default", "--ppl", text, "--mc", mc, "--window", "32",
                 "--json", str(out), "--no-speed"]) == 0
    r = json.loads(out.read_text())
    for key in ("ppl", "acc", "acc_norm", "active_ffn_fraction", "flops_per_token", "tokens_per_s"):
        assert key in r
    assert r["ppl"] > 1 and r["acc"] in (0.0, 1.0) and r["active_ffn_fraction"] == 1.0 and r["tokens_per_s"] is None
    assert "perplexity" in capsys.readouterr().out


# ---------------------------------------------------------------- layer-wise recovery of a checkpoint

TRAIN_TEXT = (
    "The river runs through the old town, past the market square and the stone bridge where fishermen "
    "sell their catch in the early morning. In spring the water rises and the meadows along its banks "
    "turn green; in autumn the fog settles over them until noon. The town council met on Tuesday to "
    "discuss the new library, which will open next year with a reading room, a children's corner and "
    "a small museum of local history. Engineers measured the load of the bridge and found that it can "
    "carry twice the traffic it sees today. A computer program is a list of instructions that a machine "
    "follows one after another; a variable holds a value, a loop repeats a block of code, and a function "
    "gives a name to a piece of work so that it can be used again. Bread is made from flour, water, salt "
    "and yeast: the dough rises while the yeast turns sugar into gas, and baking sets its shape. ") * 3


def kl_to(dense, student, tokens) -> float:
    with torch.no_grad():
        p = dense(tokens).float().log_softmax(-1)
        q = student(tokens).float().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


def test_train_cli_recovers_a_checkpoint_layer_by_layer(tmp_path, default_model, sample_tokens):
    """`factorllm train` (PAR routers + down refit, each layer on the student's own inputs, then two
    distillation steps through LoRA adapters) moves a paper-style checkpoint (contiguous split, untrained random router)
    toward its dense teacher on held-out text."""
    from factorllm.loading import load_model
    ck, trained = tmp_path / "ck", tmp_path / "trained"
    assert main(["factorize", "--experts", "8", "--top-k", "4", "--partition", "contiguous",
                 "--router-init", "random", "--out", str(ck)]) == 0
    data = write(tmp_path / "train.txt", TRAIN_TEXT)
    assert main(["train", "--model", str(ck), "--data", data, "--out", str(trained), "--seq-len", "64",
                 "--par-seqs", "4", "--par-steps", "30", "--finetune", "--steps", "2", "--seconds", "600",
                 "--train", "routers", "lora", "--lora-rank", "4"]) == 0
    before, after = load_model(str(ck)), load_model(str(trained))
    kl_before = kl_to(default_model.model, before.model, sample_tokens)
    kl_after = kl_to(default_model.model, after.model, sample_tokens)
    assert kl_after < 0.8 * kl_before, (kl_before, kl_after)
    assert after.factor.trained["par"]["label"] == "greedy"
    assert after.factor.trained["refit"]["err_after"] < after.factor.trained["refit"]["err_before"]
    assert after.factor.trained["distill"]["steps_run"] == 2  # a budget never binding leaves --steps
    assert after.factor.trained["distill"]["train"] == ["routers", "lora"]  # adapters merged: it loaded
    assert after.factor.trained["data"] == data
    # Without --data the teacher writes the text (as factorize calibrates without --calib).
    sampled = tmp_path / "sampled"
    assert main(["train", "--model", str(ck), "--out", str(sampled), "--seq-len", "32", "--par-seqs", "2",
                 "--par-steps", "5", "--no-refit"]) == 0
    routed = load_model(str(sampled))
    assert routed.factor.trained["data"].startswith("sampled from the teacher: 2 windows of 32 tokens")
    assert routed.factor.trained["par"]["label"] == "greedy" and "distill" not in routed.factor.trained
    moved = [not torch.equal(a.mlp.router.weight, b.mlp.router.weight)
             for a, b in zip(before.model.layers, routed.model.layers)]
    assert sum(moved) >= len(moved) - 1  # every router trained (a dense first layer may keep all experts)


# ---------------------------------------------------------------- distillation

@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_head_losses_and_their_gradients_equal_autograd_on_whole_logits(tau):
    """The chunked head + KL + CE equals the plain computation on [tokens, vocabulary] logits, and
    so do its gradients for the hidden states and a trained head; rows without a target count
    for the KL only."""
    from factorllm.distill import head_losses
    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64)
    hidden, weight = torch.randn(2, 13, 8, **f64), torch.randn(50, 8, **f64)
    t_hidden, t_weight = torch.randn(2, 13, 8, **f64), torch.randn(50, 8, **f64)
    targets = torch.randint(0, 50, (2, 13))
    targets[:, -1] = -1
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    s_logits, t_logits = h1 @ w1.T, t_hidden @ t_weight.T
    t_logp, s_logp = (t_logits / tau).log_softmax(-1), (s_logits / tau).log_softmax(-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean() * tau ** 2
    ce = F.cross_entropy(s_logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
    (kl + 0.5 * ce).backward()
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    chunked = head_losses(h2, w2, t_hidden, t_weight, tau, targets, rows=5)
    (chunked[0] + 0.5 * chunked[1]).backward()
    assert chunked.tolist() == pytest.approx([kl.item(), ce.item()], rel=1e-5)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-4, atol=1e-7)


def test_distillation_lowers_kl_and_resumes_from_its_state(tmp_path, default_model, fresh_default_model, sample_tokens):
    """Four distillation steps on real text move a paper-style split toward the dense model; a run
    stopped after two steps resumes from its saved state (loaded without pickle) to the same end."""
    from factorllm.distill import DistillConfig, distill
    from factorllm.factorize import factorize
    factor = FactorConfig(experts=8, top_k=4, partition="contiguous", router_init="random")
    student = factorize(fresh_default_model.model, factor, None)
    twin = copy.deepcopy(student)
    before = kl_to(default_model.model, student, sample_tokens)
    cfg = DistillConfig(steps=4, batch_size=2, lr=1e-3, router_lr=1e-3, warmup=1, save_every=2, bf16=False)
    full = distill(student, default_model.model, sample_tokens, cfg, progress=False)
    after = kl_to(default_model.model, student, sample_tokens)
    assert after < 0.8 * before, (before, after)
    state = tmp_path / "state.pt"
    distill(twin, default_model.model, sample_tokens, replace(cfg, steps=2), state_path=state, progress=False)
    resumed = distill(twin, default_model.model, sample_tokens, cfg, state_path=state, progress=False)
    assert [h["step"] for h in resumed["history"]] == [1, 2, 3, 4]
    assert resumed["history"][-1]["kl"] == pytest.approx(full["history"][-1]["kl"], rel=1e-4)


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_distillation_trains_like_eager(default_model, sample_tokens):
    """`DistillConfig.compile`: the student's forward goes through torch.compile (the balance term's
    input hooks included) and three steps on real text, on the model's first two layers, give
    the eager run's losses and weights."""
    from torch._dynamo.utils import counters
    from factorllm.distill import DistillConfig, distill
    from factorllm.factorize import factorize
    teacher = copy.deepcopy(default_model.model)
    teacher.model.layers = teacher.model.layers[:2]
    factor = FactorConfig(experts=8, top_k=4, partition="contiguous", router_init="random")
    eager = factorize(copy.deepcopy(teacher), factor, None)
    compiled = copy.deepcopy(eager)
    cfg = DistillConfig(steps=3, batch_size=2, lr=1e-3, warmup=1, balance_weight=0.01, bf16=False)
    want = distill(eager, teacher, sample_tokens, cfg, progress=False)["history"]
    graphs = counters["stats"]["unique_graphs"]
    got = distill(compiled, teacher, sample_tokens, replace(cfg, compile=True), progress=False)["history"]
    assert counters["stats"]["unique_graphs"] > graphs
    assert [h["loss"] for h in got] == pytest.approx([h["loss"] for h in want], rel=1e-3)
    for a, b in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)  # Adam moves them ~1e-3 a step


def test_lora_distillation_trains_low_rank_updates_merged_into_the_experts(default_model, sample_tokens):
    """`train=("routers", "lora")`: four steps on real text (the model's first two layers, routed
    and shared experts) lower the KL; afterwards each expert's weights have moved by an update of
    at most the adapters' rank, merged in (the state dict has the plain keys again), and the
    routers trained as well."""
    from torch.nn.utils import parametrize
    from factorllm.distill import DistillConfig, distill
    from factorllm.factorize import factorize
    teacher = copy.deepcopy(default_model.model)
    teacher.model.layers = teacher.model.layers[:2]
    factor = FactorConfig(experts=6, top_k=2, shared_experts=2, partition="contiguous", router_init="random")
    student = factorize(copy.deepcopy(teacher), factor, None)
    before = copy.deepcopy(student.state_dict())
    kl_before = kl_to(teacher, student, sample_tokens)
    cfg = DistillConfig(steps=4, batch_size=2, lr=1e-2, warmup=1, train=("routers", "lora"), lora_rank=2,
                        lora_alpha=4, bf16=False)
    distill(student, teacher, sample_tokens, cfg, progress=False)
    assert kl_to(teacher, student, sample_tokens) < 0.9 * kl_before
    after = student.state_dict()
    assert after.keys() == before.keys() and not any(parametrize.is_parametrized(m) for m in student.modules())
    for name, w in after.items():
        delta = (w - before[name]).double()
        if ".experts_" in name or ".shared." in name:
            ranks = torch.linalg.matrix_rank(delta if delta.dim() == 3 else delta[None], rtol=1e-6)
            assert ranks.min() >= 1 and ranks.max() <= 2, (name, ranks)
        elif name.endswith("router.weight"):
            assert delta.abs().max() > 0, name
        else:
            assert torch.equal(w, before[name]), name
    with pytest.raises(ValueError, match="not both"):
        DistillConfig(train=("experts", "lora"))


def test_a_time_budget_sets_the_step_count(default_model, fresh_default_model, sample_tokens):
    """`DistillConfig.seconds`: the schedule gets the steps that fit in what is left after the first
    ones are timed, never more than `steps`; a spent budget stops right after the timed steps."""
    from factorllm.distill import TIMED_STEPS, DistillConfig, distill, planned_steps
    from factorllm.factorize import factorize
    cfg = DistillConfig(steps=100, seconds=10.0)
    assert planned_steps(cfg, done=4, elapsed=2.0, step_seconds=0.5) == 4 + 16
    assert planned_steps(cfg, done=4, elapsed=12.0, step_seconds=0.5) == 4
    assert planned_steps(cfg, done=4, elapsed=0.0, step_seconds=0.01) == 100
    factor = FactorConfig(experts=8, top_k=4, partition="contiguous", router_init="random")
    student = factorize(fresh_default_model.model, factor, None)
    spent = DistillConfig(steps=50, batch_size=1, seconds=0.0, bf16=False)
    result = distill(student, default_model.model, sample_tokens, spent, progress=False)
    assert result["steps"] == len(result["history"]) == 1 + TIMED_STEPS
