"""What a request must pass before the app sees it, as ASGI middleware.

In this order: its Host is one the server answers to (a browser page whose name an attacker
points at 127.0.0.1, DNS rebinding, names its own host); it carries the API key, when the
server has one; its body is at most max_body_bytes (judged from Content-Length, else while it
arrives) and arrives within body_timeout seconds. Refusals are OpenAI error objects. The body
is read here, whole, and handed on to the app as one message.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gptlab.serve.schemas import ApiError, ServeAccess, ServeLimits, error_body, host_name

OPEN_PATHS = ("/", "/health")  # the page (which then asks for the key) and liveness probes
# After refusing a body it did not read, the server reads and drops what the client still sends
# before it closes: closing a socket with unread input sends a TCP reset, which can destroy the
# answer before the client has read it. Until the client is quiet this long, or at most:
LINGER_QUIET_S = 0.25
LINGER_MAX_S = 2.0


class ClientGone(Exception):
    """The client closed the connection before its body arrived: nobody to answer."""


class RequestGuard:
    def __init__(self, app: ASGIApp, access: ServeAccess, limits: ServeLimits):
        self.app, self.access, self.limits = app, access, limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        try:
            self.check_host(headers.get("host"))
            if self.access.api_key is not None and scope["path"] not in OPEN_PATHS:
                self.check_key(headers.get("authorization"))
            body = await self.read_body(headers.get("content-length"), receive)
        except ApiError as err:
            await send_error(send, err, receive)
            return
        except ClientGone:
            return
        await self.app(scope, replay(body, receive), send)

    def check_host(self, host: str | None) -> None:
        if host is None:
            raise ApiError(400, "the request has no Host header; send one naming this server")
        if not self.access.allows_host(host):
            raise ApiError(
                400,
                f"this server does not answer to the host name {host!r}; if that name is meant to reach it, "
                f"start the server with --allowed_hosts {host_name(host)}",
            )

    def check_key(self, authorization: str | None) -> None:
        scheme, _, key = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(
                401,
                "this server needs an API key: send the header Authorization: Bearer KEY",
                kind="invalid_request_error",
                code="invalid_api_key",
            )
        # Constant time: how long a comparison takes must not reveal how much of a guess is right.
        if not hmac.compare_digest(key.strip().encode(), self.access.api_key.encode()):
            raise ApiError(401, "the API key is wrong; send the server's key", code="invalid_api_key")

    async def read_body(self, content_length: str | None, receive: Receive) -> bytes:
        """The whole body; ApiError 413 when it is too large, 408 when it is too slow."""
        limit = self.limits.max_body_bytes
        if content_length is not None and content_length.isdigit() and int(content_length) > limit:
            raise body_too_large(int(content_length), limit)
        try:
            return await asyncio.wait_for(read_at_most(receive, limit), self.limits.body_timeout)
        except asyncio.TimeoutError:
            raise ApiError(
                408,
                f"the request body did not arrive within {self.limits.body_timeout:g} s (--body_timeout); "
                "send it at once",
                close=True,
            ) from None


async def read_at_most(receive: Receive, limit: int) -> bytes:
    """The body's chunks until the last; ApiError 413 once they pass `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise body_too_large(None, limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def body_too_large(size: int | None, limit: int) -> ApiError:
    what = f"{size:,} bytes" if size is not None else "longer than that"
    return ApiError(
        413,
        f"the request body is {what}; this server reads at most {limit:,} (--max_body_bytes): "
        "send a shorter prompt or fewer prompts",
        close=True,
    )


def replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that gives the app the body read already, then what the client sends next
    (its disconnect, which streamed and long answers listen for)."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed


async def send_error(send: Send, err: ApiError, receive: Receive) -> None:
    """The error as an HTTP response. When the body was not read (err.close), the connection is
    closed after the answer, once what the client still sends has been read and dropped."""
    content = json.dumps(error_body(err.message, err.kind, err.param, err.code)).encode()
    headers: list[tuple[bytes, bytes]] = [
        (b"content-type", b"application/json"), (b"content-length", str(len(content)).encode()),
    ]  # fmt: skip
    if err.close:  # what is left of the body would be read as the next request
        headers.append((b"connection", b"close"))
    if err.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    start: dict[str, Any] = {"type": "http.response.start", "status": err.status, "headers": headers}
    await send(start)
    # The server closes the connection when the response ends, so the answer goes out whole
    # (its Content-Length tells the client so) and ends only after the lingering read.
    await send({"type": "http.response.body", "body": content, "more_body": err.close})
    if err.close:
        await drain(receive)
        await send({"type": "http.response.body", "body": b""})


async def drain(receive: Receive) -> None:
    """Read and drop the rest of the request body until it ends, the client goes, the client is
    quiet for LINGER_QUIET_S, or LINGER_MAX_S have passed."""
    deadline = asyncio.get_running_loop().time() + LINGER_MAX_S
    while (left := deadline - asyncio.get_running_loop().time()) > 0:
        try:
            message = await asyncio.wait_for(receive(), min(LINGER_QUIET_S, left))
        except asyncio.TimeoutError:
            return
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            return
