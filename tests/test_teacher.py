"""Teachers: an in-process slmkit model against lm.chat / lm.complete, an OpenAI-compatible endpoint against a
small fake server (request bodies, errors) and against the real ``slm serve`` app, and the resumable cache."""

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import slmkit
from slmkit.errors import SlmError
from slmkit.teacher import Ask, CachedTeacher, EndpointTeacher, LocalTeacher, Teacher, cache_key

PROMPTS = ["What is 2+2?", "Name a colour.", "Say hello."]
SYSTEM = "You answer in few words."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ local
@pytest.fixture(scope="module")
def lm(smollm2_gguf):
    return slmkit.load(smollm2_gguf, threads=2)


def test_local_teacher_chat_answers_equal_lm_chat(lm):
    teacher = LocalTeacher(lm, batch_size=1, progress=False)
    got = teacher.complete(PROMPTS[:2], max_new_tokens=4, system=SYSTEM)
    want = [lm.chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": p}], max_new_tokens=4)
            for p in PROMPTS[:2]]
    assert got == want and all(got)


def test_local_teacher_batches_as_lm_complete(lm):
    teacher = LocalTeacher(lm, batch_size=2, progress=False)
    got = teacher.complete(PROMPTS[:2], max_new_tokens=4, chat=False)
    assert got == [c.text for c in lm.complete(PROMPTS[:2], max_new_tokens=4)]
    # chat in one batch: the rendered template completed as it is (SmolLM2 adds no BOS of its own)
    chat = teacher.complete(PROMPTS[:2], max_new_tokens=4)
    rendered = [lm.chat_prompt([{"role": "user", "content": p}]) for p in PROMPTS[:2]]
    assert chat == [c.text for c in lm.complete(rendered, max_new_tokens=4)]
    assert teacher.model_id == lm.source


def test_teacher_argument_errors(lm):
    teacher = LocalTeacher(lm, progress=False)
    with pytest.raises(SlmError, match="list of strings, got one string"):
        teacher.complete("hi", max_new_tokens=4)
    with pytest.raises(SlmError, match="system message needs chat=True"):
        teacher.complete(["hi"], max_new_tokens=4, system="x", chat=False)
    with pytest.raises(SlmError, match="max_new_tokens must be a positive integer"):
        teacher.complete(["hi"], max_new_tokens=0)
    with pytest.raises(SlmError, match="temperature"):
        teacher.complete(["hi"], max_new_tokens=4, temperature=-1)
    with pytest.raises(SlmError, match="generative slmkit model"):
        LocalTeacher(object())
    assert teacher.complete([], max_new_tokens=4) == []


# ------------------------------------------------------- fake endpoint
class FakeOpenAI:
    """A tiny OpenAI-compatible server: canned answers that echo the prompt, every request recorded."""

    def __init__(self, status: int = 200, body: bytes | None = None):
        self.requests: list[tuple[str, dict, dict]] = []
        self.status, self.body = status, body
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                data = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append((self.path, data, dict(self.headers)))
                if fake.status != 200:
                    payload = fake.body or json.dumps({"error": {"message": "model 'x' does not exist"}}).encode()
                elif self.path == "/v1/chat/completions":
                    content = "answer: " + data["messages"][-1]["content"]
                    payload = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant",
                                                                                "content": content}}]}).encode()
                elif self.path == "/v1/completions":
                    payload = json.dumps({"choices": [{"index": 0, "text": "then: " + data["prompt"]}]}).encode()
                else:
                    self.send_error(404)
                    return
                self.send_response(fake.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_endpoint_teacher_sends_openai_requests():
    with FakeOpenAI() as server:
        teacher = EndpointTeacher(server.url, "big-model", api_key="k1", seed=7, progress=False)
        got = teacher.complete(PROMPTS, max_new_tokens=5, temperature=0.5, stop=["\n"], system=SYSTEM)
        assert got == ["answer: " + p for p in PROMPTS]
        assert len(server.requests) == 3
        path, body, headers = server.requests[0]
        assert path == "/v1/chat/completions"
        assert headers["Authorization"] == "Bearer k1"
        assert {k: v for k, v in body.items() if k != "messages"} == {
            "model": "big-model", "max_tokens": 5, "temperature": 0.5, "stop": ["\n"], "seed": 7}
        assert body["messages"][0] == {"role": "system", "content": SYSTEM}
        assert sorted(b["messages"][1]["content"] for _, b, _ in server.requests) == sorted(PROMPTS)

        plain = EndpointTeacher(server.url + "/v1/", "big-model", progress=False)  # an API root works too
        assert plain.complete(PROMPTS[:2], max_new_tokens=3, chat=False) == ["then: " + p for p in PROMPTS[:2]]
        path, body, headers = server.requests[-1]
        assert path == "/v1/completions" and "Authorization" not in headers
        assert body == {"model": "big-model", "max_tokens": 3, "temperature": 0.0, "prompt": body["prompt"]}


def test_endpoint_down_is_a_clear_error():
    url = f"http://127.0.0.1:{free_port()}"
    teacher = EndpointTeacher(url, "m", progress=False)
    with pytest.raises(SlmError) as e:
        teacher.complete(PROMPTS, max_new_tokens=4)
    assert str(e.value) == (f"cannot reach teacher endpoint {url}/v1/chat/completions: connection refused "
                            f"(is the server running?)")
    with pytest.raises(SlmError, match="http"):
        EndpointTeacher("localhost:8000", "m")


def test_endpoint_error_status_names_status_and_message():
    with FakeOpenAI(status=404) as server:
        with pytest.raises(SlmError) as e:
            EndpointTeacher(server.url, "x", progress=False).complete(["hi"], max_new_tokens=4)
        assert str(e.value) == (f"teacher endpoint {server.url}/v1/chat/completions answered HTTP 404 Not Found: "
                                f"model 'x' does not exist")
    with FakeOpenAI(status=503, body=b"<html>overloaded</html>") as server:
        teacher = EndpointTeacher(server.url, "x", retries=1, progress=False)
        started = time.perf_counter()
        with pytest.raises(SlmError, match="HTTP 503 Service Unavailable: <html>overloaded</html>"):
            teacher.complete(["hi"], max_new_tokens=4)
        assert len(server.requests) == 2  # one retry, after 1 s (no Retry-After)
        assert time.perf_counter() - started >= 1


# ----------------------------------------------------------------- cache
def test_cache_second_run_asks_nothing_and_partial_cache_asks_the_rest(tmp_path):
    path = tmp_path / "teacher.jsonl"
    with FakeOpenAI() as server:
        def cached():
            return CachedTeacher(EndpointTeacher(server.url, "big", progress=False), path)

        first = cached().complete(PROMPTS[:2], max_new_tokens=5, system=SYSTEM)
        assert len(server.requests) == 2
        teacher = cached()
        assert len(teacher) == 2
        everything = teacher.complete(PROMPTS + [PROMPTS[2]], max_new_tokens=5, system=SYSTEM)
        assert everything[:2] == first and everything == ["answer: " + p for p in PROMPTS + [PROMPTS[2]]]
        assert len(server.requests) == 3  # only the missing prompt, once although it is listed twice
        assert cached().complete(PROMPTS, max_new_tokens=5, system=SYSTEM) == everything[:3]
        assert len(server.requests) == 3
        # any change to what decides an answer is a different entry
        cached().complete(PROMPTS[:1], max_new_tokens=6, system=SYSTEM)
        cached().complete(PROMPTS[:1], max_new_tokens=5)
        assert len(server.requests) == 5
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 5
    first_prompt = next(line for line in lines if line["prompt"] == PROMPTS[0] and line["max_new_tokens"] == 5
                        and line["system"] == SYSTEM)
    assert first_prompt == {"key": cache_key("big", PROMPTS[0], Ask.make(5, system=SYSTEM)), "model": "big",
                        "prompt": PROMPTS[0], "system": SYSTEM, "max_new_tokens": 5, "temperature": 0.0,
                        "stop": [], "chat": True, "text": "answer: " + PROMPTS[0]}


def test_a_truncated_last_line_is_dropped_with_a_warning(tmp_path):
    path = tmp_path / "teacher.jsonl"
    with FakeOpenAI() as server:
        one_at_a_time = EndpointTeacher(server.url, "big", concurrency=1, progress=False)
        CachedTeacher(one_at_a_time, path).complete(PROMPTS, 4)
        whole = path.read_bytes()
        path.write_bytes(whole[:-25])  # the run died while writing the third answer
        with pytest.warns(UserWarning, match="ignoring its last line"):
            teacher = CachedTeacher(EndpointTeacher(server.url, "big", progress=False), path)
        assert len(teacher) == 2
        assert teacher.complete(PROMPTS, 4) == ["answer: " + p for p in PROMPTS]
        assert len(server.requests) == 4  # the lost answer only
    assert [json.loads(line)["prompt"] for line in path.read_text().splitlines()] == PROMPTS
    # a last line that is whole but for its newline is kept (and the newline added)
    path.write_bytes(whole[:-1])
    assert len(CachedTeacher(EndpointTeacher("http://127.0.0.1:1", "big"), path)) == 3
    assert path.read_bytes() == whole
    # damage anywhere else is not a crash's doing: an error naming the line
    path.write_bytes(b"not json\n" + whole)
    with pytest.raises(SlmError, match="line 1 is not a cache entry"):
        CachedTeacher(EndpointTeacher("http://127.0.0.1:1", "big"), path)


class Flaky(Teacher):
    """Answers the first ``n`` prompts, then fails: a run that dies part way."""

    model_id, progress = "flaky", False

    def __init__(self, n, seconds=0.0):
        self.n, self.seconds, self.asked = n, seconds, []

    def answers(self, prompts, ask):
        for i, p in enumerate(prompts):
            if len(self.asked) == self.n:
                raise SlmError("teacher went away")
            time.sleep(self.seconds)
            self.asked.append(p)
            yield i, p.upper()


def test_a_failed_run_keeps_every_answer_it_got(tmp_path):
    path = tmp_path / "c.jsonl"
    with pytest.raises(SlmError, match="went away"):
        CachedTeacher(Flaky(2), path).complete(PROMPTS, 4)
    again = Flaky(10)
    assert CachedTeacher(again, path).complete(PROMPTS, 4) == [p.upper() for p in PROMPTS]
    assert again.asked == PROMPTS[2:]


def test_progress_bar_counts_prompts_and_cached_ones(tmp_path, capsys):
    path = tmp_path / "c.jsonl"
    teacher = Flaky(10, seconds=0.15)  # slow enough for tqdm to redraw
    teacher.progress = True
    CachedTeacher(teacher, path).complete(PROMPTS[:2], 4)
    out = capsys.readouterr().err
    assert "teacher flaky" in out and "2/2" in out and "prompt/s" in out
    CachedTeacher(teacher, path).complete(PROMPTS, 4)
    out = capsys.readouterr().err
    assert "(2 cached)" in out and "1/1" in out
    CachedTeacher(teacher, path, progress=False).complete(PROMPTS, 4)
    assert capsys.readouterr().err == ""


# ------------------------------------------------------- real slm serve
def test_endpoint_teacher_against_slm_serve_matches_local_teacher(lm):
    uvicorn = pytest.importorskip("uvicorn")
    from slmkit.serve.app import create_app

    app = create_app(lm, model_id="smol", api_key="key", max_batch=4, max_queue=16)
    web = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not web.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        base = f"http://127.0.0.1:{web.config.port}"
        remote = EndpointTeacher(base, "smol", api_key="key", concurrency=1, progress=False)
        local = LocalTeacher(lm, batch_size=1, progress=False)
        assert remote.complete(PROMPTS[:2], 5, system=SYSTEM) == local.complete(PROMPTS[:2], 5, system=SYSTEM)
        with pytest.raises(SlmError, match="HTTP 401 Unauthorized: invalid API key"):
            EndpointTeacher(base, "smol", api_key="wrong", progress=False).complete(["hi"], 4)
    finally:
        web.should_exit = True
        thread.join(30)
