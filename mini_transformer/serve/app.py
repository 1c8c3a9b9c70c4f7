"""The FastAPI application: OpenAI-compatible endpoints over the :class:`~.scheduler.Scheduler`.

Endpoints: ``GET /v1/models`` (and ``/v1/models/{id}``), ``POST /v1/completions``, ``POST
/v1/chat/completions`` (both streamed as server-sent events ending in ``data: [DONE]`` when
``stream`` is true), ``GET /health``, ``GET /metrics`` (Prometheus text) and ``GET /`` (the
playground page).

Errors are OpenAI's JSON, ``{"error": {"message", "type", "param", "code"}}``: 400 for a body
that is not JSON, a field of the wrong type, an unknown field or a value out of range; 401
without the API key (on ``/v1/*``); 404 for an unknown model or path; 413 for a body over the
limit; 503 when every batch row is busy and the queue is full (with ``Retry-After``), or while
shutting down.

Requests never block each other: the event loop only tokenizes, hands sequences to the
scheduler thread and turns the tokens it sends back into text (each choice's own detokenizer
and stop strings). A client that goes away (a closed stream, or a dropped connection while it
waits for a whole response) cancels its sequences, and their rows are free for the next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from importlib import resources
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import UserError
from ..generation import SamplingParams, StopStrings, TextStreamer
from ..session import InvalidSetting, Session, check_settings
from .chat import ChatFormatter
from .metrics import Metrics
from .scheduler import Event, Finished, QueueFull, Scheduler, SchedulerStopped, SequenceRequest, Token
from .schema import ChatRequest, CompletionRequest, SamplingFields

log = logging.getLogger("mini_transformer.serve")

# Paths counted under their own name in /metrics; anything else is "other" (unbounded labels
# from scanners would grow the metrics without end).
KNOWN_PATHS = ("/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask for. ``max_prompt_tokens`` bounds the prompt as sent (a prompt
    longer than the model's context keeps its last ``block_size`` tokens)."""

    max_body_bytes: int = 1_000_000
    max_prompt_tokens: int = 4096
    max_tokens: int = 1024


# -- errors -----------------------------------------------------------------------------------

class APIError(Exception):
    """An error answered as OpenAI's JSON with ``status``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 code: Optional[str] = None, param: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers


def error_body(message: str, type: str, code: Optional[str] = None, param: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error_body(error.message, error.type, error.code, error.param), error.status,
                        headers=error.headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, Optional[str]]:
    """One line for the first problem pydantic found, and the field it is about."""
    first = exc.errors()[0]
    kind = first.get("type", "")
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    field = ".".join(loc) or None
    if kind == "json_invalid":
        return f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})", None
    if kind == "missing" and field:
        return f"{field} is required", field
    if kind == "extra_forbidden":
        return f"unknown field {field!r}; see the API reference for the fields this endpoint takes", field
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return (f"{field}: {message}" if field else f"the request body is invalid: {message}"), field


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, field = _validation_message(exc)
        return error_response(APIError(400, message, param=field))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(exc.status_code)
        return error_response(APIError(exc.status_code, message, code=code, headers=exc.headers))

    @app.exception_handler(InvalidSetting)
    async def _setting(request: Request, exc: InvalidSetting):
        return error_response(APIError(400, str(exc), param=exc.setting))

    @app.exception_handler(UserError)
    async def _user(request: Request, exc: UserError):
        return error_response(APIError(400, str(exc)))

    @app.exception_handler(QueueFull)
    async def _full(request: Request, exc: QueueFull):
        return error_response(APIError(503, f"the server is busy ({exc}); retry shortly", "server_error",
                                       "queue_full", headers={"Retry-After": "1"}))

    @app.exception_handler(SchedulerStopped)
    async def _stopping(request: Request, exc: SchedulerStopped):
        return error_response(APIError(503, "the server is shutting down", "server_error", "shutting_down"))


# -- ASGI middleware: the checks that come before any route -------------------------------------

async def _send_error(send, error: APIError) -> None:
    body = json.dumps(error_body(error.message, error.type, error.code, error.param)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    """The API key on ``/v1/*`` (compared in constant time) and the body size limit."""

    def __init__(self, app, api_key: Optional[str], max_body_bytes: int):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.api_key is not None and scope["path"].startswith("/v1/"):
            scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.api_key):
                return await _send_error(send, APIError(
                    401, "a valid API key is required: send it as 'Authorization: Bearer KEY'", code="invalid_api_key"))
        limit = self.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _send_error(send, _too_large(limit))
        received = 0

        async def limited_receive():
            # A chunked body declares no length: count what arrives.
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise StarletteHTTPException(413, _too_large(limit).message)
            return message

        await self.app(scope, limited_receive, send)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is over the server's limit of {limit} bytes", code="body_too_large")


class AccessLogMiddleware:
    """One log line per request, once its response is complete: method, path, status, tokens, time."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500

        async def recording_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            state = scope.get("state") or {}
            path = scope["path"]
            note = " (client left)" if state.get("client_left") else ""
            log.info("%s %s %d tokens=%d %.3fs%s", scope["method"], path, status, state.get("tokens", 0),
                     time.perf_counter() - start, note)
            self.metrics.request(scope["method"], path if path in KNOWN_PATHS else "other", status)


# -- generation: the sequences of one request ---------------------------------------------------

class GenerationFailed(Exception):
    """The scheduler could not finish a sequence (a failed step, or shutdown)."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status = status


class _Choice:
    """One sequence's text: its detokenizer, stop strings, token count and finish reason."""

    def __init__(self, decode, stops: Sequence[str]):
        self.streamer = TextStreamer(decode)
        self.stops = StopStrings(stops)
        self.tokens = 0
        self.finish_reason: Optional[str] = None


class Job:
    """The sequences of one request, submitted together; their events come back on the event loop."""

    def __init__(self, server: "Server", requests: list[SequenceRequest], stops: Sequence[str], arrived: float):
        self.server = server
        self.arrived = arrived
        self.choices = [_Choice(server.session.tokenizer.decode, stops) for _ in requests]
        self.events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.handles = []
        try:
            for i, request in enumerate(requests):
                self.handles.append(server.scheduler.submit(request, partial(self._deliver, loop, i)))
        except BaseException:
            self.cancel()
            raise

    def _deliver(self, loop: asyncio.AbstractEventLoop, index: int, event: Event) -> None:
        loop.call_soon_threadsafe(self.events.put_nowait, (index, event))  # on the scheduler thread

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.choices)

    @property
    def done(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()

    async def pieces(self) -> AsyncIterator[tuple[int, str, Optional[str]]]:
        """``(choice, text, finish_reason)`` as text becomes final; the last of each choice has its reason."""
        while not self.done:
            index, event = await self.events.get()
            choice = self.choices[index]
            if choice.finish_reason is not None:
                continue  # tokens that were on their way when a stop string matched
            if isinstance(event, Token):
                if self.completion_tokens == 0:
                    self.server.metrics.first_token(time.perf_counter() - self.arrived)
                choice.tokens += 1
                piece = choice.stops.feed(choice.streamer.put(event.id))
                if choice.stops.stopped:
                    self.handles[index].cancel()  # frees the row now
                    choice.finish_reason = "stop"
                yield index, piece, choice.finish_reason
            else:
                yield index, self._finish(choice, event), choice.finish_reason

    @staticmethod
    def _finish(choice: _Choice, event: Finished) -> str:
        if event.reason == "error":
            raise GenerationFailed(f"generation failed: {event.message}")
        if event.reason == "cancelled":
            raise GenerationFailed("the server is shutting down", status=503)
        tail = choice.stops.feed(choice.streamer.flush()) + choice.stops.flush()
        choice.finish_reason = "stop" if event.reason == "stop" or choice.stops.stopped else "length"
        return tail


# -- the server -------------------------------------------------------------------------------

class Server:
    """What the routes share: the session (model, tokenizer, default settings), scheduler, limits."""

    def __init__(self, session: Session, scheduler: Scheduler, model_name: str, limits: ServerLimits):
        self.session = session
        self.scheduler = scheduler
        self.model_name = model_name
        self.limits = limits
        self.metrics = Metrics()
        self.chat = ChatFormatter(session.tokenizer, session.bos_prefix())
        self.created = int(time.time())

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {self.model_name!r}",
                           code="model_not_found", param="model")

    def sequence_requests(self, body: SamplingFields, prompts: list[list[int]], max_tokens: Optional[int]) -> list[SequenceRequest]:
        """Each prompt's ``n`` sequences, with the body's settings over the checkpoint's defaults."""
        defaults = self.session.settings
        chosen = {"temperature": body.temperature, "top_k": body.top_k, "top_p": body.top_p, "min_p": body.min_p,
                  "repetition_penalty": body.repetition_penalty}
        values = {**defaults.sampling(), **{k: v for k, v in chosen.items() if v is not None}}
        check_settings({k: v for k, v in chosen.items() if v is not None})
        limit = self.limits.max_tokens
        if max_tokens is None:
            max_tokens = min(defaults.max_tokens, limit) or 1
        elif not 1 <= max_tokens <= limit:
            raise APIError(400, f"max_tokens must be in [1, {limit}] (the server's limit), got {max_tokens}",
                           param="max_tokens")
        for ids in prompts:
            if len(ids) > self.limits.max_prompt_tokens:
                raise APIError(400, f"the prompt has {len(ids)} tokens, over the server's limit of "
                                    f"{self.limits.max_prompt_tokens}; shorten it", code="context_length_exceeded")
        sampling = SamplingParams(**values)
        stop_ids = frozenset(self.session.stop_ids)
        seed = body.seed
        return [SequenceRequest(ids, max_tokens, sampling, None if seed is None else seed + j, stop_ids)
                for ids in prompts for j in range(body.n)]


def create_app(session: Session, scheduler: Scheduler, *, model_name: str, api_key: Optional[str] = None,
               limits: ServerLimits = ServerLimits()) -> FastAPI:
    """The application; its lifespan starts the scheduler's thread and stops it at shutdown."""
    server = Server(session, scheduler, model_name, limits)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.stop)

    app = FastAPI(title="mini-transformer", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    install_error_handlers(app)
    app.add_middleware(GuardMiddleware, api_key=api_key, max_body_bytes=limits.max_body_bytes)
    app.add_middleware(AccessLogMiddleware, metrics=server.metrics)  # outermost: sees every answer

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return HTMLResponse(resources.files(__package__).joinpath("static/playground.html").read_text("utf-8"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "running": scheduler.running, "waiting": scheduler.waiting}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(server.metrics.render(scheduler.waiting, scheduler.running, scheduler.max_batch),
                                 media_type="text/plain; version=0.0.4")

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": server.created, "owned_by": "mini-transformer",
                "max_model_len": session.block_size}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        server.check_model(name)
        return model_card()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        arrived = time.perf_counter()
        server.check_model(body.model)
        prompts = []
        for i, text in enumerate(body.prompts()):
            prompts.append(session.encode(text, name=f"prompt {i}").ids)
        sequences = server.sequence_requests(body, prompts, body.max_tokens)
        job = Job(server, sequences, body.stop_strings(), arrived)
        reply = _Reply("cmpl", "text_completion", model_name, sum(map(len, prompts)))
        if body.stream:
            return _stream(request, job, reply.completion_chunk, reply, _include_usage(body))
        texts = await _collect(request, job, reply)
        choices = [{"index": i, "text": texts[i], "logprobs": None, "finish_reason": c.finish_reason}
                   for i, c in enumerate(job.choices)]
        return reply.whole("text_completion", choices, job)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        arrived = time.perf_counter()
        server.check_model(body.model)
        messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                    for m in body.messages]
        prompt = server.chat.encode(messages)
        sequences = server.sequence_requests(body, [prompt], body.token_limit())
        job = Job(server, sequences, [*body.stop_strings(), *server.chat.extra_stops], arrived)
        reply = _Reply("chatcmpl", "chat.completion.chunk", model_name, len(prompt))
        if body.stream:
            return _stream(request, job, reply.chat_chunk, reply, _include_usage(body), first=reply.role_chunks(job))
        texts = await _collect(request, job, reply)
        choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": None,
                    "finish_reason": c.finish_reason} for i, c in enumerate(job.choices)]
        return reply.whole("chat.completion", choices, job)

    return app


def _include_usage(body: SamplingFields) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


class _Reply:
    """The parts every response of one request shares: id, object, created, model, usage."""

    def __init__(self, prefix: str, chunk_object: str, model: str, prompt_tokens: int):
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.chunk_object = chunk_object
        self.created = int(time.time())
        self.model = model
        self.prompt_tokens = prompt_tokens

    def _head(self, object: str) -> dict[str, Any]:
        return {"id": self.id, "object": object, "created": self.created, "model": self.model}

    def usage(self, job: Job) -> dict[str, int]:
        completion = job.completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def whole(self, object: str, choices: list[dict], job: Job) -> dict[str, Any]:
        return {**self._head(object), "choices": choices, "usage": self.usage(job)}

    def completion_chunk(self, index: int, text: str, finish: Optional[str]) -> dict[str, Any]:
        return {**self._head(self.chunk_object),
                "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}]}

    def chat_chunk(self, index: int, text: str, finish: Optional[str]) -> dict[str, Any]:
        delta = {"content": text} if text else {}
        return {**self._head(self.chunk_object),
                "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    def role_chunks(self, job: Job) -> list[dict[str, Any]]:
        return [{**self._head(self.chunk_object), "choices": [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]}
            for i in range(len(job.choices))]

    def usage_chunk(self, job: Job) -> dict[str, Any]:
        return {**self._head(self.chunk_object), "choices": [], "usage": self.usage(job)}


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _record(request: Request, job: Job) -> None:
    """What the access log and the metrics count for this request."""
    request.state.tokens = job.completion_tokens
    if not job.done:
        request.state.client_left = True


def _stream(request: Request, job: Job, chunk, reply: _Reply, include_usage: bool,
            first: Sequence[dict] = ()) -> StreamingResponse:
    """Server-sent events: ``first``, one chunk per piece of text, the usage if asked, ``[DONE]``.

    When the client closes the connection, Starlette cancels this generator; its ``finally``
    cancels the sequences, which leave the batch before the next step.
    """
    server: Server = request.app.state.server

    async def events() -> AsyncIterator[str]:
        try:
            for data in first:
                yield _sse(data)
            async for index, text, finish in job.pieces():
                if text or finish:
                    yield _sse(chunk(index, text, finish))
            if include_usage:
                yield _sse(reply.usage_chunk(job))
        except GenerationFailed as exc:
            # The status line is long gone: the error travels as an event, as OpenAI's does.
            yield _sse(error_body(str(exc), "server_error"))
        finally:
            job.cancel()
            _record(request, job)
            server.metrics.tokens(reply.prompt_tokens, job.completion_tokens)
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _collect(request: Request, job: Job, reply: _Reply) -> list[str]:
    """Each choice's whole text; a client that disconnects meanwhile cancels the job."""
    server: Server = request.app.state.server
    texts = [""] * len(job.choices)

    async def gather() -> None:
        async for index, text, _ in job.pieces():
            texts[index] += text

    async def client_gone() -> None:
        # The body has been read, so the next message can only be the disconnect.
        while (await request.receive())["type"] != "http.disconnect":
            pass

    gathering, watching = asyncio.ensure_future(gather()), asyncio.ensure_future(client_gone())
    try:
        await asyncio.wait({gathering, watching}, return_when=asyncio.FIRST_COMPLETED)
        if gathering.done():
            gathering.result()  # raises GenerationFailed
        return texts
    except GenerationFailed as exc:
        raise APIError(exc.status, str(exc), "server_error") from None
    finally:
        watching.cancel()
        gathering.cancel()
        job.cancel()
        _record(request, job)
        server.metrics.tokens(reply.prompt_tokens, job.completion_tokens)
