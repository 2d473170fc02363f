"""`gptlab serve` against hostile or broken clients: bodies too large or too slow, prompts too
long to encode, foreign Host headers, missing API keys, and bodies no parser should choke on.
Every refusal is OpenAI's error object. Raw sockets where a well-behaved client library would
hide what is tested (a body never sent, one that stops half-way)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="gptlab serve needs the [serve] extra (fastapi, uvicorn)")
import httpx  # noqa: E402
import uvicorn  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from gptlab.cli.serve import exposure_warning, listen  # noqa: E402
from gptlab.errors import GptlabError  # noqa: E402
from gptlab.serve import ServeLimits  # noqa: E402
from gptlab.serve.app import create_app  # noqa: E402
from gptlab.serve.prompts import max_bytes_per_token  # noqa: E402
from gptlab.serve.schemas import ApiError, CompletionRequest, ServeAccess  # noqa: E402
from gptlab.tokenizers import CharTokenizer  # noqa: E402

from test_serve import PROMPT, TOKENIZER, ScriptedModel, ServerProcess, save_tiny_checkpoint, tiny_gpt  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def assert_openai_error(response: httpx.Response, status: int, *words: str) -> dict:
    """The response is `status` with exactly OpenAI's error object, whose message holds `words`."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "param", "code"}
    for word in words:
        assert word in body["error"]["message"]
    return body["error"]


def client_for(model=None, access: ServeAccess | None = None, host: str = "localhost", **limits) -> TestClient:
    app = create_app(model or tiny_gpt(), TOKENIZER, ServeLimits(**limits), model_name="tiny", access=access)
    return TestClient(app, base_url=f"http://{host}", raise_server_exceptions=False)


@contextmanager
def served(app) -> Iterator[int]:
    """`app` under uvicorn on a free port of 127.0.0.1, in a thread; yields the port."""
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    listener = listen("127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)
        yield listener.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def post_head(port: int, *headers: str) -> str:
    """The head of a POST /v1/completions of JSON, with `headers` added, for raw_exchange."""
    return "\n".join(
        ("POST /v1/completions HTTP/1.1", f"Host: localhost:{port}", "Content-Type: application/json", *headers, "")
    )


def raw_exchange(
    port: int, head: str, body_parts: tuple[bytes, ...] = (), wait_s: float = 10
) -> tuple[int, dict, dict, bool]:
    """Send a request head and some body parts, then read the answer: (status, headers, JSON
    body, whether the server closed the connection after it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n")
        for part in body_parts:
            sock.sendall(part)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"the server closed the connection without answering: {data!r}"
            data += chunk
        head_bytes, _, content = data.partition(b"\r\n\r\n")
        status_line, *header_lines = head_bytes.decode().split("\r\n")
        headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)}
        while len(content) < int(headers["content-length"]):
            content += sock.recv(65536)
        try:
            closed = sock.recv(1) == b""
        except TimeoutError:
            closed = False
        return int(status_line.split()[1]), headers, json.loads(content), closed


# ---- the body: its size and its time ---------------------------------------------------------


def test_body_over_the_limit_is_refused_from_its_content_length_before_it_is_sent():
    with served(create_app(tiny_gpt(), TOKENIZER, ServeLimits(max_body_bytes=1000))) as port:
        status, headers, body, closed = raw_exchange(port, post_head(port, "Content-Length: 30000000"))  # no body comes
    assert status == 413 and set(body["error"]) == {"message", "type", "param", "code"}
    assert "30,000,000 bytes" in body["error"]["message"] and "--max_body_bytes" in body["error"]["message"]
    assert headers["connection"] == "close" and closed


def test_chunked_body_is_refused_as_soon_as_it_passes_the_limit():
    with served(create_app(tiny_gpt(), TOKENIZER, ServeLimits(max_body_bytes=1000))) as port:
        chunk = b"400\r\n" + b" " * 0x400 + b"\r\n"  # 1024 bytes, and no last chunk: the body never ends
        status, headers, body, closed = raw_exchange(
            port, post_head(port, "Transfer-Encoding: chunked"), (chunk, chunk)
        )
    assert status == 413 and "longer than that" in body["error"]["message"]
    assert closed


def test_client_that_keeps_sending_after_the_refusal_still_reads_it():
    # Closing with the client's bytes unread would send a TCP reset that can destroy the 413
    # before the client reads it: the server reads and drops the rest first (a lingering close).
    body = b" " * 2**20
    chunk = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    with served(create_app(tiny_gpt(), TOKENIZER, ServeLimits(max_body_bytes=1000))) as port:
        for _ in range(3):
            status, _, answer, closed = raw_exchange(port, post_head(port, "Transfer-Encoding: chunked"), (chunk,))
            assert status == 413 and "longer than that" in answer["error"]["message"] and closed


def test_body_that_stops_arriving_gets_408_and_the_connection_closed():
    with served(create_app(tiny_gpt(), TOKENIZER, ServeLimits(body_timeout=0.5))) as port:
        started = time.monotonic()
        status, headers, body, closed = raw_exchange(
            port, post_head(port, "Content-Length: 100"), (b'{"prompt": "Once',)
        )
        waited = time.monotonic() - started
        assert httpx.get(f"http://127.0.0.1:{port}/health").json()["in_flight"] == 0
    assert status == 408 and "--body_timeout" in body["error"]["message"] and closed
    assert 0.4 < waited < 5


def test_body_within_the_limits_is_read_whole_over_http():
    with served(create_app(tiny_gpt(), TOKENIZER, ServeLimits(max_body_bytes=1000, body_timeout=5))) as port:
        content = json.dumps({"prompt": PROMPT, "max_tokens": 3}).encode()
        head = post_head(port, f"Content-Length: {len(content)}")
        status, _, body, _ = raw_exchange(port, head, (content[:10], content[10:]))  # in two pieces
    assert status == 200 and body["usage"]["completion_tokens"] == 3


def test_oversized_body_through_a_client_library_gets_the_413_message():
    response = client_for(max_body_bytes=1000).post("/v1/completions", json={"prompt": "x" * 5000})
    assert_openai_error(response, 413, "5,0", "--max_body_bytes")


# ---- prompts too long to be worth encoding ---------------------------------------------------


def test_prompt_longer_in_bytes_than_the_limit_can_hold_is_refused_before_encoding_or_taking_a_slot(monkeypatch):
    gate = threading.Event()
    encoded: list[str] = []
    encode = TOKENIZER.encode
    monkeypatch.setattr(TOKENIZER, "encode", lambda text, *a: encoded.append(text) or encode(text, *a))
    bound = max_bytes_per_token(TOKENIZER)
    model = ScriptedModel(encode(" the end"), gate=gate)
    with client_for(model, max_concurrent=1, max_prompt_tokens=20) as client:
        busy = threading.Thread(target=lambda: client.post("/v1/completions", json={"prompt": PROMPT}))
        busy.start()  # holds the only slot until the gate opens
        try:
            wait_for(
                lambda: encoded and client.get("/health").json()["in_flight"] == 1, "the first request never started"
            )
            encoded.clear()
            too_long = "é" * (20 * bound // 2 + 1)  # 2 bytes a character: one byte over what 20 tokens hold
            response = client.post("/v1/completions", json={"prompt": [PROMPT, too_long]})
            error = assert_openai_error(response, 400, "prompt 1 is", "bytes", "--max_prompt_tokens")
            assert error["param"] == "prompt" and encoded == []  # refused unread, and not 429: no slot asked for
        finally:
            gate.set()
            busy.join(timeout=30)
        # Within the byte bound but over the token limit: encoded, refused, and its slot given back.
        over_in_tokens = "{~}" * 10  # rare characters: a token each
        n_tokens = len(encode(over_in_tokens))
        assert len(over_in_tokens.encode()) <= 20 * bound and n_tokens > 20
        assert_openai_error(client.post("/v1/completions", json={"prompt": over_in_tokens}), 400, f"{n_tokens} tokens")
        assert client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize(
    "text", ["Once upon a time", " the the", "日本語のテキスト", "\x00\x7f\ud800", "🎉" * 9, "a" * 300]
)
def test_bytes_per_token_bounds_every_encoding(text):
    bound = max_bytes_per_token(TOKENIZER)
    # The toy tokenizer's longest tokens, repeated, are the densest text it can read.
    longest = max(range(TOKENIZER.vocab_size), key=lambda i: len(TOKENIZER.token_bytes(i)))
    for sample in (text, TOKENIZER.decode([longest]) * 7):
        size = len(sample.encode("utf-8", "replace"))
        assert size <= bound * len(TOKENIZER.encode(sample))
    assert bound >= len(TOKENIZER.token_bytes(longest))
    assert max_bytes_per_token(CharTokenizer("abc")) == 4  # unknown characters (up to 4 bytes) read as <UNK>


# ---- Host names and API keys -----------------------------------------------------------------


@pytest.mark.parametrize(
    "host, allowed, ok",
    [
        ("localhost:8000", (), True),
        ("127.0.0.1", (), True),
        ("[::1]:8000", (), True),
        ("LOCALHOST.:80", (), True),
        ("attacker.example:8000", (), False),
        ("127.0.0.1.attacker.example", (), False),
        ("box.lan:8000", ("box.lan",), True),
        ("other.lan", ("box.lan",), False),
        ("anything.example", ("*",), True),
    ],
)
def test_host_allow_list(host, allowed, ok):
    client = client_for(access=ServeAccess(allowed_hosts=allowed))
    response = client.get("/health", headers={"host": host})
    if ok:
        assert response.status_code == 200 and response.json()["status"] == "ok"
    else:
        assert_openai_error(response, 400, "--allowed_hosts")
        assert client.post("/v1/completions", json={"prompt": PROMPT}, headers={"host": host}).status_code == 400


def test_api_key_is_required_on_the_api_but_not_on_the_page_or_health():
    client = client_for(access=ServeAccess(api_key="s3cret key"))
    body = {"prompt": PROMPT, "max_tokens": 2}
    missing = client.post("/v1/completions", json=body)
    assert assert_openai_error(missing, 401, "Authorization: Bearer")["code"] == "invalid_api_key"
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = client.post("/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"})
    assert_openai_error(wrong, 401, "wrong")
    assert_openai_error(client.get("/v1/models", headers={"Authorization": "Basic s3cret key"}), 401)
    right = client.post("/v1/completions", json=body, headers={"Authorization": "bearer s3cret key"})
    assert right.status_code == 200 and right.json()["usage"]["completion_tokens"] == 2
    assert client.get("/health").json()["api_key_required"] is True
    assert client.get("/").status_code == 200
    assert client_for().get("/health").json()["api_key_required"] is False


def test_exposure_warning_only_for_a_reachable_address_without_a_key():
    warning = exposure_warning("0.0.0.0", ServeAccess())
    assert "without an API key" in warning and "--api_key" in warning
    assert exposure_warning("192.168.1.5", ServeAccess()) is not None
    assert exposure_warning("0.0.0.0", ServeAccess(api_key="k")) is None
    assert exposure_warning("127.0.0.1", ServeAccess()) is None and exposure_warning("::1", ServeAccess()) is None


def test_serve_command_takes_its_key_from_the_environment_and_extra_host_names(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("GPTLAB_API_KEY", "from-the-environment")
    server = ServerProcess(save_tiny_checkpoint(tmp_path / "tiny.pth"), "--allowed_hosts", "box.lan, gptlab.test")
    try:
        body = {"prompt": PROMPT, "max_tokens": 2}
        with httpx.Client(base_url=server.url, timeout=30) as http:
            assert http.post("/v1/completions", json=body).status_code == 401
            key = {"Authorization": "Bearer from-the-environment"}
            assert http.post("/v1/completions", json=body, headers=key).status_code == 200
            assert http.get("/health", headers={"host": "gptlab.test:80"}).status_code == 200
            assert http.get("/health", headers={"host": "other.test"}).status_code == 400
    finally:
        server.stop()
    assert "warning" not in server.log  # 127.0.0.1: no one else can reach it


def test_empty_api_key_is_a_clear_error(monkeypatch):
    import argparse

    from gptlab.cli.serve import add_serve_parser

    monkeypatch.delenv("GPTLAB_API_KEY", raising=False)
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", "--model_path", "never_read.pth", "--api_key", " "])
    with pytest.raises(GptlabError, match="--api_key is empty"):
        args.handler(args)


# ---- every error is OpenAI's error object ----------------------------------------------------


@pytest.mark.parametrize(
    "content, status, words",
    [
        (b'{"prompt": "\xff\xfe"}', 400, ["not valid UTF-8"]),
        (b"[" * 100_000 + b"]" * 100_000, 400, ["nested too deeply"]),
        (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, ["nested too deeply"]),
        (b'{"prompt": "a", "max_tokens": }', 400, ["not valid JSON"]),
    ],
    ids=["invalid-utf8", "nested-100000", "nested-prompt", "malformed"],
)
def test_bodies_that_do_not_parse_get_openai_errors(content, status, words):
    client = client_for()
    response = client.post("/v1/completions", content=content, headers={"content-type": "application/json"})
    assert_openai_error(response, status, *words)
    assert client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1}).status_code == 200


def test_unknown_paths_methods_and_server_failures_get_openai_errors(monkeypatch):
    client = client_for()
    assert_openai_error(client.get("/v2/nothing"), 404, "GET /v2/nothing", "/v1/completions")
    assert_openai_error(client.get("/v1/completions"), 405, "POST")

    def broken(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(TOKENIZER, "encode", broken)
    error = assert_openai_error(client.post("/v1/completions", json={"prompt": PROMPT}), 500, "log")
    assert error["type"] == "server_error" and "secret internals" not in error["message"]  # no internals leak out
    monkeypatch.undo()
    assert client.get("/health").json()["in_flight"] == 0  # the failed request gave its slot back


@pytest.mark.parametrize(
    "data",
    [
        {"prompt": [1] * 100_000},
        {f"field_{i}": 0 for i in range(20_000)},
        {"prompt": PROMPT, "stream_options": {f"x{i}": 0 for i in range(20_000)}},
        {"logit_bias": {str(i): "high" for i in range(20_000)}},
    ],
    ids=["prompt-items", "unknown-fields", "unknown-options", "logit-bias"],
)
def test_bodies_with_many_bad_values_get_one_error_not_one_per_value(data):
    """Pydantic reports every bad value; a 4 MB body holds millions (measured: 2 million errors, 20 s, 2.5 GB)."""
    try:
        CompletionRequest.model_validate(data).sample_config()
    except ValidationError as err:
        assert err.error_count() <= 2
    except ApiError as err:
        assert err.status == 400
    else:
        raise AssertionError("the request was accepted")
    response = client_for().post("/v1/completions", json=data)
    assert response.status_code in (400, 422)
    assert_openai_error(response, response.status_code)


def test_health_answers_while_prompts_encode_and_the_model_generates(monkeypatch):
    """Encoding and generation run off the event loop: /health answers in the meantime."""
    gate = threading.Event()
    encode = TOKENIZER.encode
    model = ScriptedModel(encode(" the end"), delay=0.3)
    monkeypatch.setattr(TOKENIZER, "encode", lambda *a: gate.wait(30) and encode(*a))
    with client_for(model, max_concurrent=2) as client:
        post = lambda: client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4})  # noqa: E731
        threads = [threading.Thread(target=post) for _ in range(2)]
        for thread in threads:
            thread.start()
        try:
            wait_for(lambda: client.get("/health").json()["in_flight"] == 2, "the requests never reached encoding")
            assert_health_answers_at_once(client)  # both requests are stuck in encoding
            gate.set()
            wait_for(lambda: model.forward_calls > 0, "the model never started")
            assert_health_answers_at_once(client)  # the model generates (0.3 s a step)
        finally:
            gate.set()
            for thread in threads:
                thread.join(timeout=30)


def wait_for(condition, failure: str, within_s: float = 10) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, failure
        time.sleep(0.01)


def assert_health_answers_at_once(client: TestClient) -> None:
    started = time.monotonic()
    assert client.get("/health").status_code == 200
    assert time.monotonic() - started < 1
