"""The OpenAI-compatible server, through the official ``openai`` client, against a real server process."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

import slmkit

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow

KEY = "test-key-123"
MODEL = "smollm2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(smollm2_gguf):
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "slmkit", "serve", str(smollm2_gguf), "--port", str(port),
                             "--api-key", KEY, "--model-id", MODEL, "--max-batch", "8", "--max-queue", "0",
                             "--threads", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            urllib.request.urlopen(base + "/health", timeout=1)
            break
        except (urllib.error.URLError, ConnectionError):
            if proc.poll() is not None:
                raise RuntimeError(proc.stdout.read().decode())
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("server did not start")
    yield base
    proc.terminate()
    proc.wait(30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def lm(smollm2_gguf):
    return slmkit.load(smollm2_gguf)


def post(base, path, body, key=KEY, raw=None):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method="POST",
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_and_greedy_completion_match_the_library(client, lm):
    listed = client.models.list().data
    assert [m.id for m in listed] == [MODEL]
    assert listed[0].model_extra["quantization"] == lm.model.quant == "int4"  # the file's own Q4_1
    out = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12,
                                    temperature=0)
    assert out.choices[0].text == lm.generate("The capital of France is", max_new_tokens=12)
    assert out.usage.prompt_tokens == len(lm.tokenizer.encode("The capital of France is"))
    assert out.usage.completion_tokens == 12 and out.choices[0].finish_reason == "length"


def test_chat_uses_the_chat_template(client, lm):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0)
    assert out.choices[0].message.content == lm.chat(messages, max_new_tokens=30)
    # the prompt the server ran is the template's rendering (the answer itself is the Q4_1 model's: on AMD
    # Zen 4 it and llama.cpp both start "L'Étoile, la ..." where the float weights say Paris)
    rendered = lm.chat_prompt(messages)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert out.usage.prompt_tokens == len(lm.tokenizer.encode(rendered, add_special_tokens=False))
    done = out.usage.completion_tokens < 30
    assert out.choices[0].finish_reason == ("stop" if done else "length")


def test_streaming_chat_and_completion(client, lm):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == lm.chat(messages, max_new_tokens=30)
    usage = chunks[-1].usage
    assert usage is not None and 0 < usage.completion_tokens <= 30
    finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    assert finish == ("stop" if usage.completion_tokens < 30 else "length")
    pieces = [c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=0, stream=True) if c.choices]
    assert len(pieces) > 1 and "".join(pieces) == lm.generate("Once upon a time", max_new_tokens=16)


def test_echo_logprobs_equal_the_model_scores(client, lm):
    """What lm-evaluation-harness's local-completions sends: token ids, echo, logprobs=1, max_tokens=1."""
    ids = lm.tokenizer.encode("The quick brown fox jumps over the lazy dog")
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=0, logprobs=1, echo=True)
    lp = out.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids) + 1
    import torch
    want = torch.log_softmax(lm.logits(ids)[0], -1)
    for i in range(1, len(ids)):
        assert abs(lp.token_logprobs[i] - float(want[i - 1, ids[i]])) < 1e-3
        top_token, top_value = next(iter(lp.top_logprobs[i].items()))
        assert abs(top_value - float(want[i - 1].max())) < 1e-3
    assert out.choices[0].text.startswith("The quick brown fox")


def test_stop_strings_n_and_seed(client):
    out = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=30, temperature=0, stop=[" 7"])
    assert out.choices[0].text == " 5, 6," and out.choices[0].finish_reason == "stop"
    kw = dict(model=MODEL, prompt="My favourite animal is", max_tokens=12, temperature=1.0, n=3, seed=7)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert len(a.choices) == 3 and [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # the same seed, the same samples
    assert len({c.text for c in a.choices}) > 1  # n samples differ from each other


def test_errors_have_the_right_status_and_name_the_problem(server, client):
    status, body = post(server, "/v1/completions", None, raw=b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-5", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=-3)
    with pytest.raises(openai.BadRequestError, match="context is 8192 tokens"):
        client.completions.create(model=MODEL, prompt=[1] * 8000, max_tokens=500)
    status, body = post(server, "/v1/completions", {"model": MODEL, "prompt": "hi"}, key=None)
    assert status == 401 and "missing API key" in body["error"]["message"]
    with pytest.raises(openai.AuthenticationError, match="invalid API key"):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()
    status, body = post(server, "/v1/chat/completions", {"model": MODEL, "messages": []})
    assert status == 400 and "messages" in body["error"]["message"]


def test_tokenize_detokenize_and_metrics(server, lm):
    status, body = post(server, "/tokenize", {"prompt": "Hello world", "add_special_tokens": False})
    assert status == 200 and body["tokens"] == lm.tokenizer.encode("Hello world", add_special_tokens=False)
    status, body = post(server, "/detokenize", {"tokens": body["tokens"]})
    assert status == 200 and body["prompt"] == "Hello world"
    req = urllib.request.Request(server + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    text = urllib.request.urlopen(req).read().decode()
    assert "slmkit_active_sequences 0" in text and 'slmkit_request_latency_seconds{quantile="0.5"}' in text


def metric(server, name):
    req = urllib.request.Request(server + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    for line in urllib.request.urlopen(req).read().decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])


def test_a_client_that_leaves_has_its_sequence_cancelled(server, client):
    cancelled = metric(server, "slmkit_cancelled_sequences_total")
    stream = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=200, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()  # hang up mid-stream
    deadline = time.time() + 30
    while time.time() < deadline and metric(server, "slmkit_active_sequences") != 0:
        time.sleep(0.2)
    assert metric(server, "slmkit_active_sequences") == 0
    assert metric(server, "slmkit_cancelled_sequences_total") == cancelled + 1


def test_a_full_queue_answers_503_with_retry_after(lm):
    """max batch 8, max queue 0, the engine held: of 12 requests 8 are taken (they wait for the engine) and 4
    are turned away at once; released, the 8 complete."""
    import concurrent.futures
    import threading

    import uvicorn

    from slmkit.serve.app import create_app

    app = create_app(lm, model_id=MODEL, api_key=KEY, max_batch=8, max_queue=0)
    port = free_port()
    web = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while not web.started and time.time() < deadline:
        time.sleep(0.05)
    batcher = app.state.server.batcher

    def one(_):
        req = urllib.request.Request(base + "/v1/completions", method="POST", data=json.dumps(
            {"model": MODEL, "prompt": "Count: 1, 2,", "max_tokens": 8, "ignore_eos": True}).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, None
        except urllib.error.HTTPError as e:
            return e.code, (e.headers.get("Retry-After"), json.loads(e.read())["error"]["message"])

    try:
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            with batcher.hold():
                futures = [pool.submit(one, i) for i in range(12)]
                deadline = time.time() + 60
                while sum(f.done() for f in futures) < 4 and time.time() < deadline:
                    time.sleep(0.05)
                assert batcher.queued == 8 and batcher.active == 0  # nothing ran while held
            results = [f.result() for f in futures]
    finally:
        web.should_exit = True
        thread.join(30)
    assert sorted(code for code, _ in results) == [200] * 8 + [503] * 4
    busy = [r for r in results if r[0] == 503]
    assert all(retry == "1" and "queue is full" in message for _, (retry, message) in busy)