"""Teachers: where data-building methods (Orca 2, TinyGSM, SuperICL, FLAN / chain-of-thought, distillation)
get completions from a larger model.

A :class:`Teacher` answers ``complete(prompts, max_new_tokens, temperature, stop, system, chat)`` with one
string per prompt. Two kinds ask a model:

- :class:`LocalTeacher`: an slmkit model in this process (``slmkit.load(...)``), batched.
- :class:`EndpointTeacher`: any OpenAI-compatible HTTP endpoint (``slm serve``, vLLM, llama.cpp's server, a
  hosted API), with a few concurrent requests, standard library only.

and :class:`CachedTeacher` wraps either with a resumable JSONL cache, so that a long run that stops (a crash,
Ctrl-C, a lost connection) asks only for what is still missing when it is started again.

``chat=True`` sends each prompt as one user turn (after ``system``, when given) through the model's chat
template; ``chat=False`` continues the prompt text as it is, and takes no ``system``. Each teacher shows a
tqdm bar over prompts (rate and ETA) unless made with ``progress=False``. Teachers yield answers as they
finish through :meth:`Teacher.answers`; ``complete`` collects them in prompt order.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import http.client
import json
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path
from typing import Iterator, Sequence

from tqdm.auto import tqdm

from .engine.prompt_cache import PromptCache
from .errors import SlmError


@dataclass(frozen=True)
class Ask:
    """How to answer: everything besides the prompt that decides a teacher's answer (and its cache key)."""

    max_new_tokens: int
    temperature: float = 0.0
    stop: tuple[str, ...] = ()
    system: str | None = None
    chat: bool = True

    @classmethod
    def make(cls, max_new_tokens, temperature=0.0, stop=None, system=None, chat=True) -> "Ask":
        """A checked ``Ask``: a user's wrong type or value is a SlmError naming the argument."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, Integral) or max_new_tokens < 1:
            raise SlmError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, Real) or temperature < 0:
            raise SlmError(f"temperature must be a number >= 0, got {temperature!r}")
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        else:
            stop = tuple(stop)
        if not all(isinstance(s, str) and s for s in stop):
            raise SlmError(f"stop must be a string or a list of non-empty strings, got {stop!r}")
        if system is not None and not isinstance(system, str):
            raise SlmError(f"system must be a string, got {type(system).__name__}")
        if not isinstance(chat, bool):
            raise SlmError(f"chat must be True or False, got {chat!r}")
        if system is not None and not chat:
            raise SlmError("a system message needs chat=True: a plain completion has no system turn "
                           "(put the text in the prompt instead)")
        return cls(int(max_new_tokens), float(temperature), stop, system, chat)

    def messages(self, prompt: str) -> list[dict]:
        """The chat messages for ``prompt``: the system turn (if any), then the prompt as the user's turn."""
        head = [{"role": "system", "content": self.system}] if self.system is not None else []
        return head + [{"role": "user", "content": prompt}]


def _check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        raise SlmError("prompts must be a list of strings, got one string (wrap a single prompt in a list)")
    prompts = list(prompts)
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise SlmError(f"prompts[{i}] must be a string, got {type(p).__name__}")
    return prompts


class Teacher:
    """A larger model that answers prompts. Subclasses implement :meth:`answers`."""

    model_id: str = "teacher"
    progress: bool = True

    def complete(self, prompts: Sequence[str], max_new_tokens: int, temperature: float = 0.0,
                 stop: str | Sequence[str] | None = None, system: str | None = None,
                 chat: bool = True) -> list[str]:
        """One answer per prompt, in order. ``temperature`` 0 is greedy; ``stop`` strings end an answer
        (and are not part of it); ``system`` is a system message (chat only)."""
        ask = Ask.make(max_new_tokens, temperature, stop, system, chat)
        prompts = _check_prompts(prompts)
        out: list[str | None] = [None] * len(prompts)
        with self._bar(len(prompts)) as bar:
            for i, text in self.answers(prompts, ask):
                out[i] = text
                bar.update()
        return out  # type: ignore[return-value]

    def answers(self, prompts: list[str], ask: Ask) -> Iterator[tuple[int, str]]:
        """Yield ``(index into prompts, answer)`` as each answer is ready, in any order, each index once."""
        raise NotImplementedError

    def _bar(self, total: int, desc: str | None = None):
        return tqdm(total=total, desc=desc or f"teacher {self.model_id}", unit="prompt", dynamic_ncols=True,
                    disable=not self.progress, leave=False, file=sys.stderr)


# --------------------------------------------------------------- in-process
class LocalTeacher(Teacher):
    """An slmkit model in this process, ``batch_size`` prompts at a time (left-padded batches).

    ``chat=True`` gives what ``lm.complete_chats`` (``lm.chat`` for a batch) gives; ``chat=False`` what
    ``lm.complete`` does.
    ``seed`` makes sampling (temperature > 0) repeatable. ``reuse_prefix`` (default on) keeps the keys and
    values of the prefix the prompts share (a fixed instruction or few-shot context) between batches, so it
    is computed once (engine.prompt_cache)."""

    def __init__(self, lm, batch_size: int = 8, model_id: str | None = None, seed: int | None = None,
                 progress: bool = True, reuse_prefix: bool = True):
        for name in ("complete", "complete_chats"):
            if not hasattr(lm, name):
                raise SlmError(f"LocalTeacher needs a generative slmkit model (slmkit.load of a decoder); "
                               f"{type(lm).__name__} has no {name}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, Integral) or batch_size < 1:
            raise SlmError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.lm, self.batch_size, self.seed, self.progress = lm, int(batch_size), seed, progress
        self.prompt_cache = PromptCache() if reuse_prefix else None
        self.model_id = model_id or str(getattr(lm, "source", type(lm).__name__))

    def answers(self, prompts: list[str], ask: Ask) -> Iterator[tuple[int, str]]:
        lm = self.lm
        params = dict(max_new_tokens=ask.max_new_tokens, temperature=ask.temperature, stop=list(ask.stop),
                      seed=self.seed, prompt_cache=self.prompt_cache)
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start:start + self.batch_size]
            if ask.chat:
                done = lm.complete_chats([ask.messages(p) for p in batch], **params)
            else:
                done = lm.complete(batch, **params)
            for j, completion in enumerate(done):
                yield start + j, completion.text


# ----------------------------------------------------------------- over HTTP
RETRY_STATUSES = {429, 500, 502, 503, 504}


class EndpointTeacher(Teacher):
    """Any OpenAI-compatible endpoint: POST ``/v1/chat/completions`` (chat) or ``/v1/completions``.

    ``base_url`` is the server (``http://127.0.0.1:8000``) or its API root (``.../v1``, as the ``openai``
    client takes it). ``concurrency`` requests are in flight at once. A busy answer (429, 5xx) is retried
    ``retries`` times, after the server's Retry-After or 1, 2, 4... seconds. An endpoint that cannot be
    reached, does not answer within ``timeout`` seconds, or answers an error is a SlmError naming the URL
    and the cause."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 300.0,
                 concurrency: int = 4, retries: int = 2, seed: int | None = None, progress: bool = True):
        url = urllib.parse.urlsplit(str(base_url).strip())
        if url.scheme not in ("http", "https") or not url.netloc:
            raise SlmError(f"teacher endpoint must be an http(s) URL such as http://127.0.0.1:8000/v1, "
                           f"got {base_url!r}")
        root = str(base_url).strip().rstrip("/")
        self.api_root = root if root.endswith("/v1") else root + "/v1"
        if not isinstance(model, str) or not model:
            raise SlmError(f"EndpointTeacher needs the model's name on the endpoint, got {model!r}")
        if isinstance(concurrency, bool) or not isinstance(concurrency, Integral) or concurrency < 1:
            raise SlmError(f"concurrency must be a positive integer, got {concurrency!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, Real) or timeout <= 0:
            raise SlmError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        self.model_id = self.model = model
        self.api_key, self.timeout, self.concurrency = api_key, float(timeout), int(concurrency)
        self.retries, self.seed, self.progress = int(retries), seed, progress

    def request_body(self, prompt: str, ask: Ask) -> tuple[str, dict]:
        """(URL, JSON body) of the request for one prompt."""
        body: dict = {"model": self.model, "max_tokens": ask.max_new_tokens, "temperature": ask.temperature}
        if ask.chat:
            url = self.api_root + "/chat/completions"
            body["messages"] = ask.messages(prompt)
        else:
            url = self.api_root + "/completions"
            body["prompt"] = prompt
        if ask.stop:
            body["stop"] = list(ask.stop)
        if self.seed is not None:
            body["seed"] = self.seed
        return url, body

    def ask_one(self, prompt: str, ask: Ask) -> str:
        """The endpoint's answer to one prompt."""
        url, body = self.request_body(prompt, ask)
        answer = self._post(url, body)
        try:
            choice = answer["choices"][0]
            text = choice["message"]["content"] if ask.chat else choice["text"]
        except (KeyError, IndexError, TypeError):
            raise SlmError(f"teacher endpoint {url} answered without a completion: "
                           f"{_excerpt(json.dumps(answer))}") from None
        if not isinstance(text, str):
            raise SlmError(f"teacher endpoint {url} answered a {type(text).__name__} instead of text: "
                           f"{_excerpt(json.dumps(answer))}")
        return text

    def _post(self, url: str, body: dict) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode()
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
            except urllib.error.HTTPError as e:
                detail = _error_detail(e.read())
                if e.code in RETRY_STATUSES and attempt < self.retries:
                    time.sleep(_retry_after(e.headers.get("Retry-After"), attempt))
                    continue
                raise SlmError(f"teacher endpoint {url} answered HTTP {e.code} {e.reason}: {detail}") from None
            except urllib.error.URLError as e:
                reason = e.reason
                if isinstance(reason, (TimeoutError, socket.timeout)):
                    raise SlmError(f"teacher endpoint {url} did not answer within {self.timeout:g} s") from None
                raise SlmError(f"cannot reach teacher endpoint {url}: {_reason(reason)} "
                               f"(is the server running?)") from None
            except (TimeoutError, socket.timeout):
                raise SlmError(f"teacher endpoint {url} did not answer within {self.timeout:g} s") from None
            except (OSError, http.client.HTTPException) as e:
                raise SlmError(f"lost the connection to teacher endpoint {url}: {_reason(e)}") from None
            try:
                return json.loads(raw)
            except ValueError:
                raise SlmError(f"teacher endpoint {url} answered something that is not JSON: "
                               f"{_excerpt(raw.decode('utf-8', 'replace'))}") from None
        raise AssertionError("unreachable")

    def answers(self, prompts: list[str], ask: Ask) -> Iterator[tuple[int, str]]:
        pool = concurrent.futures.ThreadPoolExecutor(self.concurrency, thread_name_prefix="teacher")
        try:
            futures = {pool.submit(self.ask_one, p, ask): i for i, p in enumerate(prompts)}
            for future in concurrent.futures.as_completed(futures):
                yield futures[future], future.result()
        finally:  # an error (or a consumer that stops early): drop the requests not yet sent
            pool.shutdown(wait=True, cancel_futures=True)


def _excerpt(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _error_detail(raw: bytes) -> str:
    """The message of an OpenAI-style error body ({"error": {"message": ...}}), else the body's start."""
    text = raw.decode("utf-8", "replace")
    try:
        err = json.loads(text)["error"]
        message = err["message"] if isinstance(err, dict) else err
        if isinstance(message, str) and message:
            return _excerpt(message)
    except (ValueError, KeyError, TypeError):
        pass
    return _excerpt(text) or "(empty body)"


def _reason(reason) -> str:
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror.lower()
    return str(reason)


def _retry_after(header: str | None, attempt: int) -> float:
    try:
        return min(max(float(header), 0.0), 30.0)
    except (TypeError, ValueError):
        return float(2 ** attempt)


# ------------------------------------------------------------------- caching
def cache_key(model_id: str, prompt: str, ask: Ask) -> str:
    """sha256 (hex) of the JSON list [model_id, prompt, system, max_new_tokens, temperature, stop, chat]."""
    fields = [model_id, prompt, ask.system, ask.max_new_tokens, ask.temperature, list(ask.stop), ask.chat]
    return hashlib.sha256(json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


class CachedTeacher(Teacher):
    """``teacher`` with its answers kept in a JSONL file at ``path``, one line per answer, written (and
    flushed) as each answer arrives. Opening an existing file loads its answers, so a re-run asks the teacher
    only for prompts it has no answer to; a prompt asked twice in one call is asked once. A last line cut off
    by a crash is dropped from the file with a warning. Each line holds the answer and what it answers:
    ``{"key", "model", "prompt", "system", "max_new_tokens", "temperature", "stop", "chat", "text"}``, with
    ``key`` = :func:`cache_key`.

    With temperature > 0 the cache returns the first sampled answer again: to draw new samples, use
    another file (or another ``seed`` for the teacher, which is not part of the key)."""

    def __init__(self, teacher: Teacher, path: str | Path, progress: bool | None = None):
        if not isinstance(teacher, Teacher):
            raise SlmError(f"CachedTeacher wraps a Teacher, got {type(teacher).__name__}")
        self.teacher, self.path = teacher, Path(path)
        self.model_id = teacher.model_id
        self.progress = teacher.progress if progress is None else progress
        self.answered: dict[str, str] = {}
        self._load()

    def __len__(self) -> int:
        return len(self.answered)

    def _load(self) -> None:
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return
        if not self.path.is_file():
            raise SlmError(f"teacher cache {self.path} is not a file")
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline, else a line the writer did not finish
        at = 0
        for number, line in enumerate(lines, 1):
            at += len(line) + 1
            if line.strip():
                self._take(line, number)
        if tail.strip():
            try:
                self._take(tail, len(lines) + 1)
                with open(self.path, "ab") as f:  # whole but for its newline: complete it
                    f.write(b"\n")
            except SlmError:
                warnings.warn(f"teacher cache {self.path}: ignoring its last line ({len(tail)} bytes), cut off "
                              f"mid-write by an earlier run; that answer will be asked again", stacklevel=3)
                with open(self.path, "r+b") as f:
                    f.truncate(at)

    def _take(self, line: bytes, number: int) -> None:
        try:
            entry = json.loads(line)
            key, text = entry["key"], entry["text"]
        except (ValueError, KeyError, TypeError):
            raise SlmError(f"teacher cache {self.path} line {number} is not a cache entry: "
                           f"{_excerpt(line.decode('utf-8', 'replace'), 120)}") from None
        if not isinstance(key, str) or not isinstance(text, str):
            raise SlmError(f"teacher cache {self.path} line {number}: key and text must be strings")
        self.answered[key] = text

    def complete(self, prompts: Sequence[str], max_new_tokens: int, temperature: float = 0.0,
                 stop: str | Sequence[str] | None = None, system: str | None = None,
                 chat: bool = True) -> list[str]:
        ask = Ask.make(max_new_tokens, temperature, stop, system, chat)
        prompts = _check_prompts(prompts)
        out: list[str | None] = [None] * len(prompts)
        missing = 0
        for i, key in enumerate(self._keys(prompts, ask)):
            out[i] = self.answered.get(key)
            missing += out[i] is None
        found = len(prompts) - missing
        desc = f"teacher {self.model_id}" + (f" ({found} cached)" if found else "")
        with self._bar(missing, desc) as bar:  # rate and ETA over the prompts actually asked
            for _ in self._ask_missing(prompts, ask, out):
                bar.update()
        return out  # type: ignore[return-value]

    def answers(self, prompts: list[str], ask: Ask) -> Iterator[tuple[int, str]]:
        out: list[str | None] = [None] * len(prompts)
        for i, key in enumerate(self._keys(prompts, ask)):
            if key in self.answered:
                out[i] = self.answered[key]
                yield i, out[i]
        yield from self._ask_missing(prompts, ask, out)

    def _keys(self, prompts: list[str], ask: Ask) -> list[str]:
        return [cache_key(self.model_id, p, ask) for p in prompts]

    def _ask_missing(self, prompts: list[str], ask: Ask, out: list[str | None]) -> Iterator[tuple[int, str]]:
        """Ask the teacher for each distinct prompt with no answer in ``out``; record and yield each answer
        (for every index with that prompt) as it comes."""
        keys = self._keys(prompts, ask)
        where: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            if out[i] is None:
                where.setdefault(key, []).append(i)
        if not where:
            return
        todo = [where[key][0] for key in where]
        with open(self.path, "a", encoding="utf-8") as f:
            for j, text in self.teacher.answers([prompts[i] for i in todo], ask):
                i = todo[j]
                key = keys[i]
                entry = {"key": key, "model": self.model_id, "prompt": prompts[i], "system": ask.system,
                         "max_new_tokens": ask.max_new_tokens, "temperature": ask.temperature,
                         "stop": list(ask.stop), "chat": ask.chat, "text": text}
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")
                f.flush()
                self.answered[key] = text
                for same in where[key]:
                    out[same] = text
                    yield same, text
