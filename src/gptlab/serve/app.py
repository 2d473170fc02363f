"""The HTTP API and the playground page around one loaded model.

    POST /v1/completions         OpenAI's completions request and response, whole or streamed (SSE)
    POST /v1/chat/completions    OpenAI's chat request and response, for a model with a chat template
    GET  /v1/models              the one model served, as OpenAI's model list
    GET  /health                 liveness, load, limits and whether the model can chat
    GET  /                       a page to chat, or type a prompt, and watch the answer stream in

Every request first passes guard.py (Host, API key, body size and time); every error is
OpenAI's error object, whatever raised it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from gptlab.generation import Piece, SampleEnd, answer_end_ids
from gptlab.models import GPT
from gptlab.serve.chat_api import (
    NO_TEMPLATE,
    chat_stream_events,
    chat_whole_response,
    encode_conversation,
    gather_choices,
)
from gptlab.serve.chat_schemas import CHAT_UNSUPPORTED_OFF_VALUES, ChatCompletionRequest, ChatMeta
from gptlab.serve.guard import RequestGuard
from gptlab.serve.prompts import check_prompt_bytes, encode_prompts, max_bytes_per_token
from gptlab.serve.runner import Failed, Job, ModelRunner
from gptlab.serve.schemas import (
    UNSUPPORTED_FIELDS,
    ApiError,
    CompletionMeta,
    CompletionRequest,
    ServeAccess,
    ServeLimits,
    choice,
    error_body,
    error_kind,
    sse_event,
    usage,
)
from gptlab.tokenizers.base import Tokenizer

READ_FIELDS = {  # what an unknown field's error lists, per request schema
    CompletionRequest: ", ".join(name for name in CompletionRequest.model_fields if name not in UNSUPPORTED_FIELDS),
    ChatCompletionRequest: ", ".join(
        name for name in ChatCompletionRequest.model_fields if name not in CHAT_UNSUPPORTED_OFF_VALUES
    ),
}
JSON_EXAMPLE = 'a JSON object like {"prompt": "Once upon a time", "max_tokens": 50}'
CHAT_JSON_EXAMPLE = 'a JSON object like {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 50}'
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy may hold chunks back


def create_app(
    model: GPT,
    tokenizer: Tokenizer,
    limits: ServeLimits | None = None,
    model_name: str = "gptlab",
    access: ServeAccess | None = None,
) -> FastAPI:
    """A FastAPI app serving `model` (loaded once, by the caller) under the given limits, to
    the clients `access` lets in (by default: any that names a loopback host)."""
    limits, access = limits or ServeLimits(), access or ServeAccess()
    seq_len = model.config.seq_len
    max_prompt_tokens = limits.max_prompt_tokens or seq_len
    bytes_per_token = max_bytes_per_token(tokenizer)
    runner = ModelRunner(model, tokenizer, limits.max_concurrent)
    chat_end_ids = answer_end_ids(tokenizer)  # empty: the model has no chat template
    parse_turn = asyncio.Lock()
    page = resources.files("gptlab.serve").joinpath("page.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        runner.shutdown()

    app = FastAPI(title="gptlab", summary=f"completions from {model_name}", lifespan=lifespan)
    app.state.runner = runner
    app.add_middleware(RequestGuard, access=access, limits=limits)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(error_body(err.message, err.kind, err.param, err.code), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        message = describe_http_error(request, err)
        return JSONResponse(error_body(message, error_kind(err.status_code)), err.status_code, err.headers)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, err: Exception) -> JSONResponse:
        # Starlette logs the traceback after this answer is sent.
        message = "the server failed on this request (a bug in gptlab); its log has the traceback"
        return JSONResponse(error_body(message, "server_error"), status_code=500)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
        status, message, param = describe_validation_error(err.errors())
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=status)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground() -> str:
        return page

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok", "model": model_name, "context_tokens": seq_len, "in_flight": runner.in_flight,
            "limits": {**limits.model_dump(), "max_prompt_tokens": max_prompt_tokens},
            "api_key_required": access.api_key is not None, "chat": bool(chat_end_ids),
        }  # fmt: skip

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "gptlab"}]}

    async def encode_in_slot(encode: Any, *args: Any) -> tuple[Job, Any]:
        """A reserved job and encode(*args), run off the event loop (a long prompt takes a while)."""
        job = runner.reserve()
        try:
            return job, await run_in_threadpool(encode, *args)
        except BaseException:
            runner.release(job)
            raise

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await read_request(request, parse_turn, CompletionRequest, JSON_EXAMPLE)
        cfg = body.sample_config()
        prompts = body.prompts
        check_request_size(len(prompts), body.n, body.max_tokens, limits)
        check_prompt_bytes(prompts, max_prompt_tokens, bytes_per_token)
        job, prompt_ids = await encode_in_slot(encode_prompts, tokenizer, prompts, max_prompt_tokens, seq_len)
        runner.start(job, prompt_ids, cfg)
        meta = CompletionMeta(model=model_name)
        prompt_tokens = sum(len(ids) for ids in prompt_ids)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            events = stream_events(job, meta, prompt_tokens, include_usage)
            return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
        watcher = asyncio.create_task(cancel_when_gone(request, job))
        try:
            return await whole_response(job, meta, len(prompts) * body.n, prompt_tokens)
        finally:
            watcher.cancel()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        if not chat_end_ids:
            raise ApiError(400, NO_TEMPLATE, code="model_not_chat")
        body = await read_request(request, parse_turn, ChatCompletionRequest, CHAT_JSON_EXAMPLE)
        messages = body.conversation()
        cfg = body.sample_config(default_max_tokens=min(seq_len, limits.max_tokens_limit))
        check_request_size(1, body.n, cfg.max_new_tokens, limits)
        # The markers add ids, never bytes: content that is too long in bytes is too long in ids.
        check_prompt_bytes(["".join(m["content"] for m in messages)], max_prompt_tokens, bytes_per_token, "messages")
        job, prompt_ids = await encode_in_slot(encode_conversation, tokenizer, messages, max_prompt_tokens, seq_len)
        runner.start(job, [prompt_ids], cfg, chat_end_ids)
        meta = ChatMeta(model=model_name)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            events = chat_stream_events(job, meta, body.n, len(prompt_ids), include_usage)
            return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
        watcher = asyncio.create_task(cancel_when_gone(request, job))
        try:
            return await chat_whole_response(job, meta, body.n, len(prompt_ids))
        finally:
            watcher.cancel()

    return app


async def cancel_when_gone(request: Request, job: Job, every_s: float = 0.1) -> None:
    """Cancel `job` when its client hangs up. A streamed response notices by itself (its writes
    fail); a whole one writes nothing until the end, so it must ask."""
    while not await request.is_disconnected():
        await asyncio.sleep(every_s)
    job.cancelled.set()


def check_request_size(n_prompts: int, n: int, max_tokens: int, limits: ServeLimits) -> None:
    """ApiError 400 when a request asks for more than the server's limits allow."""
    if n_prompts == 0:
        raise ApiError(400, "prompt is an empty list; send a string or a list of strings", param="prompt")
    if n_prompts * n > limits.max_choices:
        raise ApiError(
            400,
            f"{n_prompts} prompt(s) x n={n} asks for {n_prompts * n} completions; this server makes at most "
            f"{limits.max_choices} per request (--max_choices): lower n or split the request",
            param="n",
        )
    if max_tokens > limits.max_tokens_limit:
        raise ApiError(
            400,
            f"max_tokens={max_tokens} is over this server's limit of {limits.max_tokens_limit} "
            "(--max_tokens_limit); ask for fewer",
            param="max_tokens",
        )


async def stream_events(job: Job, meta: CompletionMeta, prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
    """The completion as server-sent events: a chunk per text piece, one with each choice's
    finish_reason, the usage if asked for, then `data: [DONE]`."""
    completion_tokens = 0
    async for event in job.events():
        if isinstance(event, Piece):
            yield sse_event(meta.envelope([choice(event.index, event.text, None)]))
        elif isinstance(event, SampleEnd):
            completion_tokens += event.completion_tokens
            yield sse_event(meta.envelope([choice(event.index, "", event.finish_reason)]))
        elif isinstance(event, Failed):
            yield sse_event(error_body(event.message, error_kind(event.status)))
    if include_usage:
        yield sse_event({**meta.envelope([]), "usage": usage(prompt_tokens, completion_tokens)})
    yield sse_event("[DONE]")


async def whole_response(job: Job, meta: CompletionMeta, n_choices: int, prompt_tokens: int) -> dict[str, Any]:
    """The completion as one JSON object, once every choice has ended."""
    texts, ends = await gather_choices(job, n_choices)
    choices = [choice(i, texts[i], ends[i].finish_reason) for i in range(n_choices)]
    completion_tokens = sum(end.completion_tokens for end in ends.values())
    return {**meta.envelope(choices), "usage": usage(prompt_tokens, completion_tokens)}


async def read_request(request: Request, turn: asyncio.Lock, schema: type[BaseModel], example: str) -> Any:
    """The body as a `schema` (described by `example` in errors); ApiError 400 when it is not
    JSON, 422 when it is not one.

    Parsing holds the GIL throughout (json's C scanner): the densest body (1 MiB of empty lists,
    25 MB of Python objects) takes ~0.1 s. Bodies that arrive together take turns, each handing the event loop on before
    the next parse, so /health waits for one parse, not for all of them.
    """
    raw = await request.body()
    content_type = request.headers.get("content-type", "application/json").partition(";")[0].strip().lower()
    if content_type != "application/json" and not content_type.endswith("+json"):
        raise ApiError(422, f"the request body must be {example}, sent as Content-Type: application/json")
    async with turn:
        try:
            data = json.loads(raw)
        except UnicodeDecodeError:
            raise ApiError(400, f"the request body is not valid UTF-8; send {example}, encoded as UTF-8") from None
        except RecursionError:
            raise ApiError(400, f"the request body's JSON is nested too deeply to read; send {example}") from None
        except ValueError:
            raise ApiError(400, f"the request body is not valid JSON; send {example}") from None
        finally:
            await asyncio.sleep(0)  # the others' turn comes after what is waiting on the loop
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        status, message, param = describe_validation_error(err.errors(), schema, example)
        raise ApiError(status, message, param=param) from None


def describe_http_error(request: Request, err: HTTPException) -> str:
    """One line for an error Starlette raised: no such path, wrong method."""
    if err.status_code == 404:
        return (
            f"no such endpoint: {request.method} {request.url.path}; this server answers POST /v1/completions, "
            "POST /v1/chat/completions, GET /v1/models, GET /health and GET /"
        )
    if err.status_code == 405:
        allowed = (err.headers or {}).get("Allow", "another method")
        return f"{request.url.path} does not take {request.method}; use {allowed}"
    return str(err.detail)


def describe_validation_error(
    errors: Sequence[dict[str, Any]], schema: type[BaseModel] = CompletionRequest, example: str = JSON_EXAMPLE
) -> tuple[int, str, str | None]:
    """(status, one-line message, field) for a problem found in a request body read as `schema`."""
    # A value that fits one type of a union (stop: str | list[str]) fails the others on its
    # type; the error that says what is wrong is the one about the type that fits.
    first = next((error for error in errors if not error.get("type", "").endswith("_type")), errors[0])
    location = [part for part in first.get("loc", ()) if part != "body"]
    field = str(location[0]) if location else None
    if field is None:
        return 422, f"the request body must be {example}, sent as Content-Type: application/json", None
    if first.get("type") == "extra_forbidden" and len(location) > 1:  # inside an object, e.g. stream_options
        return 422, f"unknown field {item_path(location)!r}", field
    if first.get("type") == "extra_forbidden":
        return 422, f"unknown field {field!r}; the fields this server reads are {READ_FIELDS[schema]}", field
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if len(location) > 1 and isinstance(location[1], int):  # an item of a list of objects: messages[2].role
        field = item_path(location[:3])
    return 422, f"{field}: {message}", field


def item_path(location: Sequence[str | int]) -> str:
    """Example: ("messages", 2, "content") -> "messages[2].content"."""
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in location).lstrip(".")
