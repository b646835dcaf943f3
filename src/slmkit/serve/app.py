"""The OpenAI-compatible HTTP API on one loaded model, decoding concurrent requests together.

Endpoints: /v1/models, /v1/completions (text or token-id prompts, n, stop, seed, stream, logprobs and
``echo`` with the prompt's log-probabilities, which lm-evaluation-harness's ``local-completions`` needs),
/v1/chat/completions (the model's chat template, streaming), /tokenize, /detokenize, /tokenizer_info,
/health and /metrics, and a chat page at / with /v1/model_info (serve/page.py). Every request's sequences
go to one ``engine.batcher.Batcher``; a client that disconnects has its sequences cancelled.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from typing import AsyncIterator

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.batcher import Batcher, Event, QueueFull, Sequence
from ..engine.constrain import ConstraintCache
from ..engine.sampling import SamplingParams, make_generator, next_tokens
from ..errors import ContextLengthError, SlmError
from .protocol import (ChatRequest, CompletionRequest, DetokenizeRequest, Options, TokenizeRequest, error,
                       text_of)
from .page import PUBLIC_PATHS, add_chat_page
from .stats import Stats

POLL_SECONDS = 0.25  # how often a waiting non-streaming request checks whether its client is gone
RETRY_AFTER_SECONDS = 1
ECHO_BATCH_TOKENS = 2048  # padded prompt tokens per forward pass when scoring prompts (echo)


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


class Run:
    """The sequences of one request and the events they send back to the event loop."""

    def __init__(self, server: "Server", prompts: list[list[int]], params: list[SamplingParams],
                 logprobs: int | None, ignore_eos: bool = False):
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.sequences = [Sequence(p, sp, self._sink(i), logprobs, ignore_eos)
                          for i, (p, sp) in enumerate(zip(prompts, params))]
        self.finished = 0

    def _sink(self, i: int):
        return lambda ev: self.loop.call_soon_threadsafe(self.queue.put_nowait, (i, ev))

    def submit(self) -> None:
        try:
            for seq in self.sequences:
                self.server.batcher.submit(seq)
        except QueueFull as e:
            self.cancel()
            raise ApiError(503, f"server busy: {e}; retry later", "queue_full") from None

    def cancel(self) -> None:
        pending = [s for s in self.sequences if not s.cancelled and (s.state is None or s.state.finished is None)]
        for seq in pending:
            seq.cancel()
        if pending:
            self.server.stats.cancel(len(pending))

    async def events(self, request: Request) -> AsyncIterator[tuple[int, Event]]:
        while self.finished < len(self.sequences):
            try:
                i, ev = await asyncio.wait_for(self.queue.get(), POLL_SECONDS)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    self.cancel()
                    return
                continue
            if ev.error is not None:
                self.cancel()
                raise ApiError(500, ev.error, "engine_error")
            if ev.done is not None:
                self.finished += 1
            yield i, ev


class Server:
    def __init__(self, lm, model_id: str, api_key: str | None, max_batch: int, max_queue: int):
        self.lm, self.model_id, self.api_key = lm, model_id, api_key
        self.tok = lm.tokenizer
        self.context = lm.config.max_position_embeddings
        self.batcher = Batcher(lm.model, lm.tokenizer, lm.eos_ids, max_batch, max_queue)
        self.stats = Stats()
        self.created = int(time.time())
        self.quantization = lm.model.quant
        self.constraints = ConstraintCache()  # response_format constraints, compiled once per schema

    # ------------------------------------------------------------- helpers
    def check_model(self, name: str) -> None:
        if name != self.model_id:
            raise ApiError(404, f"model '{name}' does not exist; this server serves '{self.model_id}'",
                           "model_not_found", "model")

    def check_ids(self, ids: list[int]) -> None:
        if not ids:
            raise ApiError(400, "the prompt is empty", "empty_prompt", "prompt")
        vocab = self.lm.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is outside the vocabulary [0, {vocab})", param="prompt")

    def budget(self, prompt_len: int, max_tokens: int | None, param: str = "max_tokens") -> int:
        if max_tokens is None:
            max_tokens = self.context - prompt_len
        if prompt_len + max_tokens > self.context:
            raise ApiError(400, f"this model's context is {self.context} tokens; the prompt has {prompt_len} and "
                                f"{param} is {max_tokens} ({prompt_len + max_tokens} in all)",
                           "context_length_exceeded", param)
        return max_tokens

    def sampling(self, opts: Options, max_tokens: int, j: int) -> SamplingParams:
        seed = None if opts.seed is None else opts.seed + j  # n > 1: different, still reproducible, choices
        # response_format: compiled once (cached by its text), a processor of its own for every sequence; an
        # unsupported schema is an UnsupportedError (an SlmError), answered as 400 naming the feature
        constraint = self.constraints.response_format(opts.response_format)
        processors = () if constraint is None else (constraint.processor(self.tok, self.lm.eos_ids),)
        return SamplingParams(max_new_tokens=max_tokens, temperature=opts.temperature, top_p=opts.top_p,
                              seed=seed, stop=opts.stops(), logits_processors=processors)  # bad value: 400

    def token_text(self, token: int) -> str:
        return self.tok.decode([token])

    def prompt_logprobs(self, prompts: list[list[int]], top: int) -> list[tuple[list, list, torch.Tensor]]:
        """For each prompt: the log-probability of every token after the ones before it (the first has
        none), the ``top`` most likely tokens at each position, and the logits after the last token.
        Prompts run together, right-padded, longest first (runs on the engine thread)."""
        model = self.lm.model
        results: list = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        batches, batch = [], []
        for i in order:  # about ECHO_BATCH_TOKENS padded tokens per forward pass
            if batch and (len(batch) + 1) * len(prompts[batch[0]]) > ECHO_BATCH_TOKENS:
                batches.append(batch)
                batch = []
            batch.append(i)
        batches.append(batch)
        for batch in batches:
            width = len(prompts[batch[0]])
            x = torch.zeros((len(batch), width), dtype=torch.long)
            for r, i in enumerate(batch):
                x[r, :len(prompts[i])] = torch.tensor(prompts[i])
            hidden = model.features(x.to(model.device))  # causal: right padding never reaches real tokens
            for r, i in enumerate(batch):
                ids = prompts[i]
                logits = model.head(hidden[r, :len(ids)]).float()  # [len, vocab]
                lp = torch.log_softmax(logits[:-1], -1)
                targets = torch.tensor(ids[1:], device=lp.device)
                lps = [None] + lp.gather(1, targets[:, None])[:, 0].tolist()
                tops: list = [None]
                if top:
                    values, idx = lp.topk(top, dim=-1)
                    tops += [{self.token_text(int(t)): float(v) for t, v in zip(ri, rv)} for ri, rv in zip(idx, values)]
                else:
                    tops += [{} for _ in range(len(ids) - 1)]
                results[i] = (lps, tops, logits[-1])
        return results

    def echo_one_token(self, body, prompts, scored, rid: str, created: int) -> dict:
        """Prompt log-probabilities plus one new token, all from the scoring pass: what lm-evaluation-
        harness asks for (echo, logprobs, max_tokens=1) needs no decode step."""
        choices = []
        for i, (ids, (lps, tops, last)) in enumerate(zip(prompts, scored)):
            params = self.sampling(body, 1, 0)
            token = int(next_tokens(last[None], params, None, make_generator(params, last.device), [ids])[0])
            lp_all = torch.log_softmax(last, -1)
            top = {}
            if body.logprobs:
                values, idx = lp_all.topk(body.logprobs)
                top = {self.token_text(int(t)): float(v) for t, v in zip(idx, values)}
            stop = token in self.lm.eos_ids
            new_text = "" if stop else self.token_text(token)
            tokens = [self.token_text(t) for t in ids] + [self.token_text(token)]
            choices.append({"index": i, "text": self.tok.decode(ids) + new_text, "finish_reason": "stop" if stop else "length",
                            "logprobs": {"tokens": tokens, "token_logprobs": lps + [float(lp_all[token])],
                                         "top_logprobs": tops + [top], "text_offset": _offsets(tokens)}})
        prompt_tokens = sum(len(p) for p in prompts)
        self.stats.tokens(prompt_tokens, len(prompts))
        return {"id": rid, "object": "text_completion", "created": created, "model": self.model_id,
                "choices": choices, "usage": _usage(prompt_tokens, len(prompts))}

    async def on_engine(self, fn):
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.batcher.run_job(fn, lambda result: loop.call_soon_threadsafe(future.set_result, result))
        result = await future
        if isinstance(result, Exception):
            raise result
        return result


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def create_app(lm, model_id: str | None = None, api_key: str | None = None, max_batch: int = 32,
               max_queue: int = 256, engine_thread: bool = True) -> FastAPI:
    """The API for ``lm`` (an ``slmkit.LM``). With ``engine_thread`` the engine runs in a thread that starts
    and stops with the app; without, the caller runs ``app.state.server.batcher.run()`` (``serve`` does, on
    the main thread) and the app's shutdown stops it."""
    server = Server(lm, model_id or lm.source, api_key, max_batch, max_queue)
    app = FastAPI(title="slmkit", docs_url=None, redoc_url=None)
    app.state.server = server

    @app.on_event("startup")
    async def _start():
        if engine_thread:
            server.batcher.start()

    @app.on_event("shutdown")
    async def _stop():
        server.batcher.stop()

    # ------------------------------------------------------ errors and auth
    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if e.status == 503 else None
        kind = {401: "authentication_error", 404: "invalid_request_error", 503: "server_error",
                500: "server_error"}.get(e.status, "invalid_request_error")
        return error(e.status, e.message, kind, e.code, e.param, headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        problems = []
        for err in e.errors():
            if err.get("type") == "json_invalid":
                return error(400, f"the request body is not valid JSON: {err.get('ctx', {}).get('error', '')}".strip(),
                             code="invalid_json")
            where = ".".join(str(x) for x in err.get("loc", ())[1:]) or "body"
            problems.append(f"{where}: {err.get('msg')}")
        return error(400, "; ".join(problems[:3]), param=None, code="invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        return error(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None)

    @app.exception_handler(SlmError)
    async def _slm(request, e: SlmError):
        code = "context_length_exceeded" if isinstance(e, ContextLengthError) else None
        return error(400, str(e), code=code)

    @app.middleware("http")
    async def _auth_and_stats(request: Request, call_next):
        started = time.perf_counter()
        if server.api_key and request.url.path not in PUBLIC_PATHS:
            header = request.headers.get("authorization", "")
            token = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), server.api_key.encode()):
                message = "missing API key (send 'Authorization: Bearer KEY')" if not header \
                    else "invalid API key"
                response = error(401, message, "authentication_error", "invalid_api_key")
                server.stats.request(request.url.path, 401, time.perf_counter() - started)
                return response
        response = await call_next(request)
        server.stats.request(request.url.path, response.status_code, time.perf_counter() - started)
        return response

    # ----------------------------------------------------------- endpoints
    add_chat_page(app, server)  # GET / (the chat page) and GET /v1/model_info

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_id, "object": "model", "created": server.created,
                                            "owned_by": "slmkit", "max_model_len": server.context,
                                            "quantization": server.quantization}]}

    @app.get("/metrics")
    async def metrics():
        b = server.batcher
        return PlainTextResponse(server.stats.render(b.active, b.queued, b.steps))

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        tok = server.tok

        def name(i):
            return None if i is None else tok.id_to_token(i)

        return {"eos_token": name(tok.eos_id), "bos_token": name(tok.bos_id), "pad_token": name(tok.pad_id),
                "chat_template": tok.chat_template, "model_max_length": server.context}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        if body.messages is not None:
            text = server.tok.apply_chat_template(_messages(body.messages), add_generation_prompt=True)
            ids = server.tok.encode(text, add_special_tokens=False)
        elif body.prompt is not None:
            ids = server.tok.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        else:
            raise ApiError(400, "give 'prompt' or 'messages'", param="prompt")
        return {"tokens": ids, "count": len(ids), "max_model_len": server.context}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        vocab = server.tok.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is outside the vocabulary [0, {vocab})", param="tokens")
        return {"prompt": server.tok.decode(body.tokens)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        server.check_model(body.model)
        prompts = _prompt_ids(server, body.prompt)
        for ids in prompts:
            server.check_ids(ids)
        budgets = [server.budget(len(ids), body.max_tokens) for ids in prompts]
        if body.stream and body.echo:
            raise ApiError(400, "echo is not supported together with stream", param="echo")
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        echo_lp = []
        if body.echo and body.logprobs is not None:
            echo_lp = await server.on_engine(lambda: server.prompt_logprobs(prompts, body.logprobs))
            if budgets == [1] * len(prompts) and body.n == 1 and not body.stream:
                return server.echo_one_token(body, prompts, echo_lp, rid, created)  # lm-eval's request
        flat = [(p, j) for p in range(len(prompts)) for j in range(body.n)]
        params = [server.sampling(body, budgets[p], j) for p, j in flat]
        run = Run(server, [prompts[p] for p, _ in flat], params, body.logprobs, body.ignore_eos)
        run.submit()
        prompt_tokens = sum(len(p) for p in prompts)
        if body.stream:
            return StreamingResponse(_stream_completion(server, run, request, rid, created, body, prompt_tokens),
                                     media_type="text/event-stream")
        choices = [{"text": "", "tokens": [], "lps": [], "tops": [], "finish_reason": None} for _ in flat]
        completion_tokens = 0
        async for i, ev in run.events(request):
            c = choices[i]
            c["text"] += ev.delta
            if ev.token is not None:
                completion_tokens += 1
                if body.logprobs is not None:
                    c["tokens"].append(server.token_text(ev.token))
                    c["lps"].append(ev.logprob)
                    c["tops"].append({server.token_text(t): v for t, v in (ev.top_logprobs or {}).items()})
            if ev.done is not None:
                c["finish_reason"] = ev.done.finish_reason
                c["text"] = ev.done.text
        if run.finished < len(flat):  # the client left
            return JSONResponse({}, status_code=499)
        out = []
        for i, ((p, _), c) in enumerate(zip(flat, choices)):
            text, logprobs = c["text"], None
            prompt_text = server.tok.decode(prompts[p]) if body.echo else ""
            if body.logprobs is not None:
                tokens, lps, tops = c["tokens"], c["lps"], c["tops"]
                if body.echo:
                    p_lps, p_tops, _ = echo_lp[p]
                    tokens = [server.token_text(t) for t in prompts[p]] + tokens
                    lps, tops = p_lps + lps, p_tops + tops
                logprobs = {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops,
                            "text_offset": _offsets(tokens)}
            out.append({"index": i, "text": prompt_text + text, "logprobs": logprobs,
                        "finish_reason": c["finish_reason"]})
        server.stats.tokens(prompt_tokens, completion_tokens)
        return {"id": rid, "object": "text_completion", "created": created, "model": server.model_id,
                "choices": out, "usage": _usage(prompt_tokens, completion_tokens)}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        server.check_model(body.model)
        text = server.tok.apply_chat_template(_messages(body.messages), add_generation_prompt=True)
        ids = server.tok.encode(text, add_special_tokens=False)
        server.check_ids(ids)
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        budget = server.budget(len(ids), limit, "max_tokens")
        top = (body.top_logprobs or 0) if body.logprobs else None
        run = Run(server, [ids] * body.n, [server.sampling(body, budget, j) for j in range(body.n)], top,
                  body.ignore_eos)
        run.submit()
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return StreamingResponse(_stream_chat(server, run, request, rid, created, body, len(ids)),
                                     media_type="text/event-stream")
        contents = [""] * body.n
        reasons: list[str | None] = [None] * body.n
        lp_content: list[list] = [[] for _ in range(body.n)]
        completion_tokens = 0
        async for i, ev in run.events(request):
            if ev.token is not None:
                completion_tokens += 1
                if top is not None:
                    lp_content[i].append(_chat_logprob(server, ev))
            if ev.done is not None:
                contents[i] = ev.done.text
                reasons[i] = ev.done.finish_reason
        if run.finished < body.n:
            return JSONResponse({}, status_code=499)
        server.stats.tokens(len(ids), completion_tokens)
        choices = [{"index": i, "message": {"role": "assistant", "content": contents[i]},
                    "logprobs": {"content": lp_content[i]} if top is not None else None,
                    "finish_reason": reasons[i]} for i in range(body.n)]
        return {"id": rid, "object": "chat.completion", "created": created, "model": server.model_id,
                "choices": choices, "usage": _usage(len(ids), completion_tokens)}

    return app


# ------------------------------------------------------------------ helpers
def _messages(messages) -> list[dict]:
    return [{"role": m.role, "content": text_of(m.content)} for m in messages]


def _prompt_ids(server: Server, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        return [server.tok.encode(prompt)]
    if not prompt:
        raise ApiError(400, "the prompt is empty", "empty_prompt", "prompt")
    if isinstance(prompt[0], int):
        return [list(prompt)]
    if isinstance(prompt[0], str):
        return [server.tok.encode(p) for p in prompt]
    return [list(p) for p in prompt]


def _offsets(tokens: list[str]) -> list[int]:
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return offsets


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _chat_logprob(server: Server, ev: Event) -> dict:
    text = server.token_text(ev.token)
    return {"token": text, "logprob": ev.logprob, "bytes": list(text.encode()),
            "top_logprobs": [{"token": server.token_text(t), "logprob": v, "bytes": list(server.token_text(t).encode())}
                             for t, v in (ev.top_logprobs or {}).items()]}


def _stream_end(server, run: Run, rid, created, kind: str, prompt_tokens: int, completion_tokens: int):
    """After every sequence finished: the usage chunk and [DONE] (nothing when the client left)."""
    if run.finished == len(run.sequences):
        server.stats.tokens(prompt_tokens, completion_tokens)
        yield _sse({"id": rid, "object": kind, "created": created, "model": server.model_id,
                    "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
        yield "data: [DONE]\n\n"


def _stream_error(e: "ApiError") -> str:
    return _sse({"error": {"message": e.message, "type": "server_error", "code": e.code}})


async def _stream_completion(server, run: Run, request, rid, created, body, prompt_tokens):
    completion_tokens = 0
    try:
        async for i, ev in run.events(request):
            if ev.token is not None:
                completion_tokens += 1
            if not ev.delta and ev.done is None:
                continue
            logprobs = None
            if body.logprobs is not None and ev.token is not None:
                t = server.token_text(ev.token)
                logprobs = {"tokens": [t], "token_logprobs": [ev.logprob], "text_offset": [0],
                            "top_logprobs": [{server.token_text(k): v for k, v in (ev.top_logprobs or {}).items()}]}
            reason = None if ev.done is None else ev.done.finish_reason
            yield _sse({"id": rid, "object": "text_completion", "created": created, "model": server.model_id,
                        "choices": [{"index": i, "text": ev.delta, "logprobs": logprobs, "finish_reason": reason}]})
        for line in _stream_end(server, run, rid, created, "text_completion", prompt_tokens, completion_tokens):
            yield line
    except ApiError as e:
        yield _stream_error(e)
    finally:
        run.cancel()


async def _stream_chat(server, run: Run, request, rid, created, body, prompt_tokens):
    completion_tokens = 0

    def chunk(i, delta, reason=None, logprobs=None):
        return _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": server.model_id,
                     "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]})

    try:
        for i in range(len(run.sequences)):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for i, ev in run.events(request):
            if ev.token is not None:
                completion_tokens += 1
            lp = {"content": [_chat_logprob(server, ev)]} if run.sequences[i].logprobs is not None \
                and ev.token is not None else None
            if ev.delta or lp:
                yield chunk(i, {"content": ev.delta}, None, lp)
            if ev.done is not None:
                yield chunk(i, {}, ev.done.finish_reason)
        for line in _stream_end(server, run, rid, created, "chat.completion.chunk", prompt_tokens,
                                completion_tokens):
            yield line
    except ApiError as e:
        yield _stream_error(e)
    finally:
        run.cancel()
