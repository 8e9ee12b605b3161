"""`factorllm serve` end to end: a real uvicorn process on 127.0.0.1, the real (factorized) default
model, the official `openai` client and raw HTTP for the error cases."""
from __future__ import annotations

import json
import math
import threading
import time

import httpx
import openai
import pytest
from server_fixture import FAST_FACTOR, ServerProcess, metric, openai_error, wait_for

import factorllm

PROMPT = "The capital of France is"


# ----------------------------------------------------------------------------- basics

def test_health_ready_models(served, oai):
    assert httpx.get(served.url + "/health").json() == {"status": "ok"}
    assert httpx.get(served.url + "/version").json() == {"version": factorllm.__version__}
    assert httpx.get(served.url + "/ready").status_code == 200
    models = oai.models.list().data
    assert len(models) == 1
    assert models[0].id.startswith("SmolLM2-135M-Instruct-factorized")
    assert models[0].model_extra["factorllm"]["experts"] == 8
    assert models[0].model_extra["max_model_len"] == 512
    one = oai.models.retrieve(models[0].id).model_dump(exclude={"created"})
    assert one == models[0].model_dump(exclude={"created"})
    with pytest.raises(openai.NotFoundError) as e:
        oai.models.retrieve("gpt-17")
    assert e.value.body["code"] == "model_not_found"


def test_completion(oai):
    r = oai.completions.create(model=oai.models.list().data[0].id, prompt=PROMPT, max_tokens=8, temperature=0,
                               extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.id and r.created
    (c,) = r.choices
    assert c.index == 0 and c.finish_reason == "length" and c.text
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens == 5
    assert r.usage.total_tokens == 13
    # Greedy is deterministic; a token-id prompt gives the same text as the string.
    again = oai.completions.create(model=r.model, prompt=PROMPT, max_tokens=8, temperature=0,
                                   extra_body={"ignore_eos": True})
    assert again.choices[0].text == c.text
    ids = httpx.post(str(oai.base_url).replace("/v1/", "") + "/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    by_ids = oai.completions.create(model=r.model, prompt=ids, max_tokens=8, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == c.text


def test_sampling_extras_logit_bias_min_p(oai):
    """OpenAI's logit_bias (string token ids) and vLLM's min_p / repetition_penalty over HTTP."""
    model = oai.models.list().data[0].id
    base = str(oai.base_url).replace("/v1/", "")
    tid = httpx.post(base + "/tokenize", json={"prompt": " Rome", "add_special_tokens": False}).json()["tokens"][-1]
    r = oai.completions.create(model=model, prompt=PROMPT, max_tokens=3, temperature=0, logit_bias={str(tid): 100},
                               extra_body={"ignore_eos": True})
    assert r.choices[0].text == " Rome" * 3
    c = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                    logit_bias={str(tid): 100}, extra_body={"ignore_eos": True})
    assert c.choices[0].message.content == " Rome" * 2
    # min_p = 1 keeps only the most likely token: seeded sampling at temperature 1 is greedy.
    greedy = oai.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0,
                                    extra_body={"ignore_eos": True}).choices[0].text
    sampled = oai.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=1.0, seed=7,
                                     extra_body={"ignore_eos": True, "min_p": 1.0}).choices[0].text
    assert sampled == greedy
    penalized = oai.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0,
                                       extra_body={"ignore_eos": True, "repetition_penalty": 1.5}).choices[0].text
    assert penalized != greedy


def test_completion_stream_matches_non_stream(oai):
    model = oai.models.list().data[0].id
    full = oai.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True}).choices[0].text
    chunks = list(oai.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                         stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert len([c for c in chunks if c.choices]) >= 2  # streamed in pieces, not one block


def test_chat_and_chat_stream(oai):
    model = oai.models.list().data[0].id
    msgs = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Name a colour."}]
    r = oai.chat.completions.create(model=model, messages=msgs, max_tokens=6, temperature=0)
    (c,) = r.choices
    assert r.object == "chat.completion" and c.message.role == "assistant"
    assert c.finish_reason in ("stop", "length") and r.usage.prompt_tokens > 10
    stream = oai.chat.completions.create(model=model, messages=msgs, max_tokens=6, temperature=0, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == c.message.content
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens


def test_n_and_batched_prompts(oai):
    model = oai.models.list().data[0].id
    r = oai.completions.create(model=model, prompt=PROMPT, max_tokens=6, n=3, temperature=1.0, seed=7,
                               extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == 18 and r.usage.prompt_tokens == 5
    r2 = oai.completions.create(model=model, prompt=PROMPT, max_tokens=6, n=3, temperature=1.0, seed=7,
                                extra_body={"ignore_eos": True})
    assert [c.text for c in r2.choices] == [c.text for c in r.choices]  # seeded: reproducible
    two = oai.completions.create(model=model, prompt=[PROMPT, "Once upon a time"], max_tokens=4, n=2,
                                 temperature=0, extra_body={"ignore_eos": True})
    assert [c.index for c in two.choices] == [0, 1, 2, 3]
    assert two.choices[0].text == two.choices[1].text  # greedy: the two samples of a prompt agree
    chat = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], n=2,
                                       max_tokens=4, temperature=0.8, seed=1)
    assert len(chat.choices) == 2


def test_logprobs_and_echo(oai):
    model = oai.models.list().data[0].id
    r = oai.completions.create(model=model, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3,
                               extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    for _, val, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert val <= 0 and 3 <= len(top) <= 4
        assert math.isclose(val, max(top.values()), abs_tol=1e-4)  # greedy picks the best
    assert lp.text_offset == sorted(lp.text_offset)
    # echo + logprobs: the prompt's tokens with their log-probabilities, the first without one.
    e = oai.completions.create(model=model, prompt=PROMPT, max_tokens=1, temperature=0, logprobs=1, echo=True)
    elp = e.choices[0].logprobs
    assert e.choices[0].text.startswith(PROMPT)
    assert len(elp.tokens) == 5 + 1
    assert elp.token_logprobs[0] is None and elp.top_logprobs[0] is None
    assert all(v <= 0 for v in elp.token_logprobs[1:])
    assert "".join(elp.tokens[:5]) == PROMPT
    # max_tokens=0 with echo scores the prompt only
    z = oai.completions.create(model=model, prompt=PROMPT, max_tokens=0, logprobs=0, echo=True)
    assert z.choices[0].text == PROMPT and len(z.choices[0].logprobs.tokens) == 5
    assert z.choices[0].logprobs.token_logprobs[1:] == pytest.approx(elp.token_logprobs[1:5], abs=1e-4)
    # chat logprobs
    c = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                    temperature=0, logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)


def test_echo_logprobs_match_the_model(served_model, oai):
    """The prompt log-probabilities the server returns are the model's (scored directly, fp32)."""
    import torch

    card = oai.models.list().data[0]
    loaded = served_model
    text = "Photosynthesis turns sunlight, water and carbon dioxide into sugar and oxygen."
    r = oai.completions.create(model=card.id, prompt=text, max_tokens=1, temperature=0, logprobs=1, echo=True)
    got = r.choices[0].logprobs.token_logprobs[1:-1]
    ids = loaded.tokenizer(text)["input_ids"]
    with torch.no_grad():
        logp = loaded.model(torch.tensor([ids])).float().log_softmax(-1)[0]
    want = [logp[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
    assert got == pytest.approx(want, abs=2e-3)


# ----------------------------------------------------------------------------- errors

def _post(url, path, body=None, raw: bytes | None = None, headers=None):
    return httpx.post(url + path, content=raw if raw is not None else json.dumps(body),
                      headers={"content-type": "application/json", **(headers or {})}, timeout=60)


def test_errors_in_openai_shape(served, oai):
    u = served.url
    openai_error(_post(u, "/v1/completions", raw=b"{not json"), 400)
    err = openai_error(_post(u, "/v1/completions", {"prompt": "x", "temperature": "hot"}), 400)
    assert err["param"] == "temperature"
    openai_error(_post(u, "/v1/completions", {"max_tokens": 3}), 400)  # no prompt
    openai_error(_post(u, "/v1/completions", {"prompt": "x", "logprobs": 6}), 400)
    openai_error(_post(u, "/v1/chat/completions", {"messages": []}), 400)
    openai_error(_post(u, "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}), 400)
    openai_error(_post(u, "/v1/completions", {"prompt": [10 ** 9]}), 400)  # token id out of range
    # What the server cannot honour is refused, not silently ignored: JSON mode, tool calls,
    # top_logprobs without logprobs (each with its param); their harmless forms pass.
    chat = dict(model=oai.models.list().data[0].id, max_tokens=1, messages=[{"role": "user", "content": "hi"}])
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    for extra, param in (({"response_format": {"type": "json_object"}}, "response_format"),
                         ({"tools": [tool]}, "tools"), ({"top_logprobs": 2}, "top_logprobs")):
        with pytest.raises(openai.BadRequestError) as e:
            oai.chat.completions.create(**chat, **extra)
        assert e.value.body["param"] == param and "Value error" not in e.value.body["message"]
    for extra in ({"response_format": {"type": "text"}}, {"tools": [tool], "tool_choice": "none"}):
        assert oai.chat.completions.create(**chat, **extra).choices[0].finish_reason == "length"
    err = openai_error(_post(u, "/v1/completions", {"prompt": "x", "model": "gpt-17"}), 404)
    assert err["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="gpt-17", prompt="x", max_tokens=1)
    # prompt + max_tokens beyond the context: 400 with the numbers
    err = openai_error(_post(u, "/v1/completions", {"prompt": PROMPT, "max_tokens": 600}), 400)
    assert "512" in err["message"] and "605" in err["message"] and "600" in err["message"]
    assert err["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="maximum context length is 512"):
        oai.chat.completions.create(model=oai.models.list().data[0].id, max_tokens=600,
                                    messages=[{"role": "user", "content": "hi"}])
    # body over --max-body-bytes (64 KiB): 413, with or without a content-length header
    openai_error(_post(u, "/v1/completions", {"prompt": "word " * 20000}), 413)

    def chunked():
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"x" * 1000
        yield b'"}'
    r = httpx.post(u + "/v1/completions", content=chunked(), headers={"content-type": "application/json"})
    openai_error(r, 413)
    openai_error(httpx.get(u + "/v1/nope"), 404)
    assert metric(u, "factorllm_requests_rejected_total", {"reason": "too_large"}) >= 2
    assert metric(u, "factorllm_requests_rejected_total", {"reason": "context_length"}) >= 2


def _long_stream(url: str, max_tokens: int, prompt: str = PROMPT) -> httpx.Response:
    client = httpx.Client(timeout=120)
    req = client.build_request("POST", url + "/v1/completions", json={
        "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True})
    resp = client.send(req, stream=True)
    resp.client_ = client
    return resp


def _close(resp: httpx.Response) -> None:
    resp.close()
    resp.client_.close()


def test_queue_full_429_and_disconnect_frees_slots(served, oai):
    """4 running + 2 waiting fill the server; the next request gets 429 with Retry-After. Closing the
    connections aborts those requests at once and frees their slots."""
    u = served.url
    aborted_before = metric(u, "factorllm_request_success_total", {"finish_reason": "abort"})
    streams = [_long_stream(u, 400) for _ in range(6)]
    try:
        assert all(s.status_code == 200 for s in streams)
        wait_for(lambda: metric(u, "factorllm_num_requests_running") == 4, what="4 running")
        r = _post(u, "/v1/completions", {"prompt": "x", "max_tokens": 2})
        err = openai_error(r, 429)
        assert r.headers["retry-after"] and err["code"] == "queue_full"
        with pytest.raises(openai.RateLimitError):
            oai.completions.create(model=oai.models.list().data[0].id, prompt="x", max_tokens=2)
    finally:
        for s in streams:
            _close(s)
    wait_for(lambda: metric(u, "factorllm_num_requests_running") == 0
              and metric(u, "factorllm_num_requests_waiting") == 0, timeout=10, what="slots freed")
    assert metric(u, "factorllm_request_success_total", {"finish_reason": "abort"}) - aborted_before == 6
    assert metric(u, "factorllm_kv_cache_usage_ratio") == 0
    # the server serves normally again
    r = oai.completions.create(model=oai.models.list().data[0].id, prompt="x", max_tokens=2)
    assert r.choices[0].text is not None


def test_non_streaming_disconnect_aborts(served):
    u = served.url
    before = metric(u, "factorllm_request_success_total", {"finish_reason": "abort"})

    def fire():
        try:
            httpx.post(u + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 400, "ignore_eos": True},
                       timeout=1.5)
        except httpx.TimeoutException:
            pass
    t = threading.Thread(target=fire)
    t.start()
    t.join()
    wait_for(lambda: metric(u, "factorllm_request_success_total", {"finish_reason": "abort"}) == before + 1,
              what="the abandoned request to be aborted")
    wait_for(lambda: metric(u, "factorllm_num_requests_running") == 0, what="slot freed")


def test_concurrent_requests_interleave(served):
    """A short request submitted during a long one gets its first token (and finishes) while the
    long one is still generating: continuous batching, no head-of-line blocking."""
    u = served.url
    long = _long_stream(u, 300)
    try:
        lines = long.iter_lines()
        first = next(l for l in lines if l.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["text"] is not None
        t0 = time.monotonic()
        short = _long_stream(u, 5, prompt="Hello")
        short_first_at = None
        for line in short.iter_lines():
            if line.startswith("data: ") and short_first_at is None:
                short_first_at = time.monotonic()
            if line == "data: [DONE]":
                break
        _close(short)
        long_done = False
        for line in lines:  # the long request is still going: it has not finished yet
            if line.startswith("data: {"):
                long_done = json.loads(line[6:])["choices"][0]["finish_reason"] is not None
                break
        assert short_first_at is not None and short_first_at - t0 < 30
        assert not long_done
    finally:
        _close(long)


# ----------------------------------------------------------------------------- own processes

def test_api_key_and_sigterm_drain(tmp_path):
    """A second server with --api-key, int8 weights (--quantize int8) and one CORS origin: 401 on /v1/* only; then
    SIGTERM while a request streams: /ready turns 503, new requests are refused, the in-flight one finishes, exit 0."""
    key = "sk-test-3f9a2c"
    server = ServerProcess(FAST_FACTOR + ["--api-key", key, "--shutdown-timeout", "60", "--max-model-len", "256",
                                          "--dtype", "float32", "--cors-origin", "https://app.example",
                                          "--quantize", "int8"],
                           log_name="sigterm").start()
    u = server.url
    auth = {"authorization": f"Bearer {key}"}
    try:
        openai_error(httpx.get(u + "/v1/models"), 401)
        err = openai_error(httpx.get(u + "/v1/models", headers={"authorization": "Bearer wrong"}), 401)
        assert err["code"] == "invalid_api_key"
        openai_error(_post(u, "/v1/completions", {"prompt": "x"}), 401)
        assert httpx.get(u + "/v1/models", headers=auth).status_code == 200
        assert httpx.get(u + "/health").status_code == 200 and httpx.get(u + "/metrics").status_code == 200
        assert metric(u, "factorllm_model_info", {"quantization": "int8", "dtype": "float32"}) == 1.0
        from openai import OpenAI
        with pytest.raises(openai.AuthenticationError):
            OpenAI(base_url=u + "/v1", api_key="nope", max_retries=0).models.list()
        assert OpenAI(base_url=u + "/v1", api_key=key, max_retries=0).models.list().data
        # CORS only for the configured origin
        pre = {"access-control-request-method": "POST", "access-control-request-headers": "authorization"}
        r = httpx.options(u + "/v1/completions", headers={"origin": "https://app.example", **pre})
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        r = httpx.options(u + "/v1/completions", headers={"origin": "https://evil.example", **pre})
        assert "access-control-allow-origin" not in r.headers

        client = httpx.Client(timeout=120)
        req = client.build_request("POST", u + "/v1/completions", headers=auth, json={
            "prompt": PROMPT, "max_tokens": 24, "temperature": 0, "ignore_eos": True, "stream": True})
        resp = client.send(req, stream=True)
        lines = resp.iter_lines()
        next(l for l in lines if l.startswith("data: "))
        server.proc.send_signal(__import__("signal").SIGTERM)
        wait_for(lambda: httpx.get(u + "/ready").status_code == 503, what="/ready 503")
        r = _post(u, "/v1/completions", {"prompt": "x", "max_tokens": 2}, headers=auth)
        assert openai_error(r, 503)["code"] == "draining"
        rest = [l for l in lines if l]
        assert rest[-1] == "data: [DONE]"
        finals = [json.loads(l[6:])["choices"][0]["finish_reason"] for l in rest if l.startswith("data: {")]
        assert finals[-1] == "length"
        client.close()
        assert server.proc.wait(60) == 0
        out = server.output()
        assert "draining" in out and key not in out
    finally:
        server.stop()


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys, monkeypatch):
    """User errors (a missing model, a bad environment value, conflicting flags) print one line, exit 2."""
    from factorllm.cli import main
    cases = [(["--model", str(tmp_path / "nope")], {}, "model source not found"),
             ([], {"FACTORLLM_PORT": "eighty"}, "FACTORLLM_PORT"),
             (["--dense", "--preset", "fast"], {}, "--dense cannot be combined"),
             (["--quantize", "int8", "--dtype", "float16"], {}, "drop --dtype float16 or --quantize int8")]
    for args, env, expect in cases:
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            assert main(["serve", *args]) == 2
        err = capsys.readouterr().err
        lines = [l for l in err.splitlines() if l.startswith("factorllm: error:")]
        assert len(lines) == 1 and expect in lines[0], err
