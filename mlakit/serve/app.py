"""The OpenAI-compatible HTTP API over an engine loop (:class:`~mlakit.serve.worker.Worker`; FastAPI).

Endpoints follow OpenAI's and vLLM's shapes so existing clients work unchanged:
``POST /v1/completions``, ``POST /v1/chat/completions`` (streaming as server-sent events:
``data: {...}`` chunks, then ``data: [DONE]``; ``stream_options.include_usage``), ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus text, vLLM's names with an ``mlakit:`` prefix).

Every error is an OpenAI-style body ``{"error": {"message", "type", "param", "code"}}`` with a 4xx
status for bad input (400 malformed or invalid values, 401 API key, 404 unknown model, 413 body
too large, 429 queue full with ``Retry-After``) and 500 for a failure inside one request.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from mlakit.engine import StreamEvent
from mlakit.errors import MlakitError
from mlakit.generate import SamplingConfig
from mlakit.serve.worker import INTERNAL_ERROR, Worker

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    """What the HTTP layer enforces (the engine's own limits live in EngineConfig).

    Attributes:
        model_name: the id clients pass as ``model`` (and ``/v1/models`` lists).
        api_key: when set, ``/v1/*`` requires ``Authorization: Bearer <api_key>``.
        max_queue: most requests waiting beyond the engine's batch; more get 429.
        max_body_bytes: largest request body accepted (413 beyond).
        max_seq_len: the model's context (prompt + new tokens must fit).
        max_batch_size: the engine's batch (requests running at once).
    """

    model_name: str
    max_seq_len: int
    max_batch_size: int
    api_key: str | None = None
    max_queue: int = 256
    max_body_bytes: int = 4 * 2**20


class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send fields we do not use; wrong types still fail


class StreamOptions(_Loose):
    include_usage: bool = False


class _Sampling(_Loose):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=100.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=-1, ge=-1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False


class ChatMessage(_Loose):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    headers = {"Retry-After": "1"} if status == 429 else None
    return JSONResponse(body, status_code=status, headers=headers)


class _Guard:
    """Pure ASGI middleware: API key and body-size checks on ``/v1/*`` before the app sees the request.

    Not Starlette's ``BaseHTTPMiddleware`` (``@app.middleware("http")``): that one re-streams every
    response body through an extra task and memory channel, which on a streamed completion costs a
    task switch per token on the event loop the engine thread shares the GIL with.
    """

    def __init__(self, app: Any, config: ServeConfig) -> None:
        self.app, self.config = app, config

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            refusal = None
            key = self.config.api_key
            if key and headers.get("authorization") != f"Bearer {key}":
                refusal = _error(
                    401, "invalid or missing API key (Authorization: Bearer <key>)", "authentication_error"
                )
            length = headers.get("content-length")
            if refusal is None and length is not None and length.isdigit() and int(length) > self.config.max_body_bytes:
                refusal = _error(
                    413, f"request body of {length} bytes exceeds the limit of {self.config.max_body_bytes}"
                )
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Metrics:
    """Prometheus metrics of one server (own registry: no process globals)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.running = Gauge("mlakit:num_requests_running", "Requests in the engine's batch", registry=r)
        self.waiting = Gauge("mlakit:num_requests_waiting", "Requests queued for the batch", registry=r)
        self.kv_usage = Gauge("mlakit:kv_cache_usage_perc", "Share of KV cache blocks in use (0-1)", registry=r)
        self.prompt_tokens = Counter("mlakit:prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter("mlakit:generation_tokens", "Generated tokens sent", registry=r)
        self.success = Counter("mlakit:request_success", "Finished requests by reason", ["finished_reason"], registry=r)
        self.ttft = Histogram("mlakit:time_to_first_token_seconds", "Time to first token", registry=r)
        self.itl = Histogram("mlakit:inter_token_latency_seconds", "Time between tokens", registry=r)
        self.e2e = Histogram("mlakit:e2e_request_latency_seconds", "Request latency", registry=r)

    def refresh(self, worker: Worker) -> None:
        stats = worker.stats()
        self.running.set(stats["running"])
        self.waiting.set(max(worker.num_pending - stats["running"], 0))
        self.kv_usage.set(stats["blocks_used"] / max(stats["blocks_total"], 1))


def build_app(worker: Worker, tokenizer: Any, config: ServeConfig, eos_ids: tuple[int, ...] = ()) -> FastAPI:
    """The FastAPI app. ``worker`` is started and stopped with the app (its lifespan)."""
    metrics = Metrics()
    ids = itertools.count()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="mlakit", lifespan=lifespan)
    app.state.metrics = metrics
    app.state.worker = worker

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(400, f"{loc or 'body'}: {first.get('msg', 'invalid request')}", param=loc or None)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.kind, exc.param)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error in %s", request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}", "internal_error")

    app.add_middleware(_Guard, config=config)

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        metrics.refresh(worker)
        return PlainTextResponse(generate_latest(metrics.registry).decode(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        card = {
            "id": config.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "mlakit",
            "max_model_len": config.max_seq_len,
        }
        return JSONResponse({"object": "list", "data": [card]})

    def sampling_for(body: _Sampling, prompt_len: int, max_tokens: int | None, logprobs: int | None) -> SamplingConfig:
        if body.model is not None and body.model != config.model_name:
            raise APIError(404, f"the model `{body.model}` does not exist; this server serves `{config.model_name}`",
                           "not_found_error", "model")  # fmt: skip
        if body.n != 1:
            raise APIError(400, f"n={body.n} is not supported: only n=1", param="n")
        room = config.max_seq_len - prompt_len
        if room < 1:
            raise APIError(400, f"the prompt has {prompt_len} tokens; this model's context is "
                           f"{config.max_seq_len} tokens", param="prompt")  # fmt: skip
        new = max_tokens if max_tokens is not None else room
        if new > room:
            raise APIError(400, f"this model's context is {config.max_seq_len} tokens; the prompt has {prompt_len} "
                           f"and max_tokens is {new}: at most {room} new tokens fit", param="max_tokens")  # fmt: skip
        try:
            return SamplingConfig(
                max_new_tokens=new,
                temperature=body.temperature,
                top_k=None if body.top_k <= 0 else body.top_k,
                top_p=None if body.top_p >= 1 else body.top_p,
                seed=body.seed,
                stop_tokens=() if body.ignore_eos else eos_ids,
                logprobs=logprobs,
            )
        except MlakitError as e:
            raise APIError(400, str(e)) from e

    def stops_of(body: _Sampling) -> tuple[str, ...]:
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 16 or any(not s for s in stops):
            raise APIError(400, "stop: at most 16 non-empty strings", param="stop")
        return tuple(stops)

    def admit() -> None:
        if worker.num_pending >= config.max_batch_size + config.max_queue:
            raise APIError(429, "the server is at capacity: retry later", "rate_limit_error")

    def encode_prompt(prompt: str | list[int] | list[str]) -> list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(
                    400, "one prompt per request (a list of several prompts is not supported)", param="prompt"
                )
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise APIError(400, "the prompt is empty", param="prompt")
            return tokenizer.encode(prompt)
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        return [int(t) for t in prompt]  # type: ignore[arg-type]

    async def run(
        request: Request, prompt: list[int], sampling: SamplingConfig, stops: tuple[str, ...]
    ) -> AsyncIterator[StreamEvent]:
        """The request's events; cancels it in the engine if the consumer stops early (disconnect)."""
        rid = f"{next(ids)}-{time.monotonic_ns()}"
        metrics.prompt_tokens.inc(len(prompt))
        start = last = time.monotonic()
        first = True
        queue = worker.submit(rid, prompt, sampling, stops)
        finished = False
        try:
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                now = time.monotonic()
                if event.token is not None:
                    metrics.generation_tokens.inc()
                    (metrics.ttft if first else metrics.itl).observe(now - (start if first else last))
                    first, last = False, now
                if event.finished:
                    finished = True
                    metrics.success.labels(event.finish_reason or "unknown").inc()
                    metrics.e2e.observe(now - start)
                yield event
                if event.finished:
                    return
        finally:
            if not finished:
                worker.cancel(rid)

    async def collect(events: AsyncIterator[StreamEvent]) -> tuple[list[StreamEvent], str, int]:
        """A non-streamed request's events, its text and token count; its error as an APIError (:func:`error_kind`)."""
        got = [ev async for ev in events]
        if not got:
            raise APIError(499, "client closed the request")
        if got[-1].error:
            raise APIError(*error_kind(got[-1]))
        return got, "".join(ev.text for ev in got), sum(ev.token is not None for ev in got)

    def error_kind(ev: StreamEvent) -> tuple[int, str, str]:
        """``(status, message, type)`` of a failed request: the engine refusing it (e.g. a prompt larger
        than the whole cache budget) is the client's error (400); a failed engine step is the server's (500)."""
        assert ev.error is not None
        if ev.finish_reason == INTERNAL_ERROR:
            return 500, ev.error, "internal_error"
        return 400, ev.error, "invalid_request_error"

    def usage(prompt: list[int], n: int) -> dict[str, int]:
        return {"prompt_tokens": len(prompt), "completion_tokens": n, "total_tokens": len(prompt) + n}

    def finish(reason: str | None) -> str | None:
        return {"budget": "length", "cancelled": "abort"}.get(reason or "", reason)

    def token_text(tok: int) -> str:
        return str(tokenizer.decode([tok]))

    def sse(payload: dict[str, Any]) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        if body.echo:
            raise APIError(400, "echo is not supported", param="echo")
        prompt = encode_prompt(body.prompt)
        sampling = sampling_for(
            body, len(prompt), body.max_tokens if body.max_tokens is not None else 16, body.logprobs
        )
        stops = stops_of(body)
        cid, created = f"cmpl-{next(ids)}", int(time.time())
        head = {"id": cid, "object": "text_completion", "created": created, "model": config.model_name}
        admit()
        events = run(request, prompt, sampling, stops)

        def logprobs_of(evs: list[StreamEvent], offset: int) -> dict[str, Any] | None:
            if body.logprobs is None:
                return None
            out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            for ev in evs:
                if ev.token is None:
                    continue
                out["tokens"].append(token_text(ev.token))
                out["token_logprobs"].append(ev.logprob)
                top: dict[str, float] = {}
                for t, lp in ev.top_logprobs or ():  # most likely first; tokens sharing a text keep the best
                    top.setdefault(token_text(t), lp)
                out["top_logprobs"].append(top)
                out["text_offset"].append(offset)
                offset += len(ev.text)
            return out

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            async def stream() -> AsyncIterator[str]:
                n, offset = 0, 0
                async for ev in events:
                    if ev.error:
                        status, message, kind = error_kind(ev)
                        yield sse({"error": {"message": message, "type": kind, "code": status}})
                        break
                    n += ev.token is not None
                    if ev.token is None and not ev.finished:
                        continue
                    choice = {"index": 0, "text": ev.text, "logprobs": logprobs_of([ev], offset),
                              "finish_reason": finish(ev.finish_reason) if ev.finished else None}  # fmt: skip
                    offset += len(ev.text)
                    yield sse({**head, "choices": [choice]})
                if include_usage:
                    yield sse({**head, "choices": [], "usage": usage(prompt, n)})
                yield "data: [DONE]\n\n"

            return StreamingResponse(stream(), media_type="text/event-stream")
        got = [ev async for ev in events]
        if not got:
            raise APIError(499, "client closed the request")
        if got[-1].error:
            status = 400 if got[-1].token is None and len(got) == 1 and "prompt" in got[-1].error else 500
            raise APIError(status, got[-1].error, "internal_error" if status == 500 else "invalid_request_error")
        text = "".join(ev.text for ev in got)
        n = sum(ev.token is not None for ev in got)
        choice = {
            "index": 0,
            "text": text,
            "logprobs": logprobs_of(got, 0),
            "finish_reason": finish(got[-1].finish_reason),
        }
        return JSONResponse({**head, "choices": [choice], "usage": usage(prompt, n)})

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Any:
        if body.logprobs:
            raise APIError(400, "logprobs is supported on /v1/completions only", param="logprobs")
        if not getattr(tokenizer, "has_chat_template", False):
            raise APIError(400, "this model's tokenizer has no chat template: use /v1/completions")
        try:
            prompt = tokenizer.encode_messages([{"role": m.role, "content": m.content} for m in body.messages])
        except Exception as e:  # jinja templates raise their own errors for conversations they refuse
            raise APIError(400, f"the chat template refused these messages: {e}", param="messages") from e
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        sampling = sampling_for(body, len(prompt), max_tokens, None)
        stops = stops_of(body)
        cid, created = f"chatcmpl-{next(ids)}", int(time.time())
        head = {"id": cid, "created": created, "model": config.model_name}
        admit()
        events = run(request, prompt, sampling, stops)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            chunk = {**head, "object": "chat.completion.chunk"}

            async def stream() -> AsyncIterator[str]:
                yield sse({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                 "finish_reason": None}]})  # fmt: skip
                n = 0
                async for ev in events:
                    if ev.error:
                        status, message, kind = error_kind(ev)
                        yield sse({"error": {"message": message, "type": kind, "code": status}})
                        break
                    n += ev.token is not None
                    if ev.text:
                        yield sse({**chunk, "choices": [{"index": 0, "delta": {"content": ev.text},
                                                         "finish_reason": None}]})  # fmt: skip
                    if ev.finished:
                        yield sse({**chunk, "choices": [{"index": 0, "delta": {},
                                                         "finish_reason": finish(ev.finish_reason)}]})  # fmt: skip
                if include_usage:
                    yield sse({**chunk, "choices": [], "usage": usage(prompt, n)})
                yield "data: [DONE]\n\n"

            return StreamingResponse(stream(), media_type="text/event-stream")
        got, text, n = await collect(events)
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "finish_reason": finish(got[-1].finish_reason)}
        return JSONResponse({**head, "object": "chat.completion", "choices": [choice], "usage": usage(prompt, n)})

    return app
