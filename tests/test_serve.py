"""`gptlab serve` and `gptlab generate --interactive`: the completions API (whole and streamed,
against generation.generate), its limits and errors, concurrency, the CLI over real HTTP, and
the prompt loop with fake input."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("fastapi", reason="gptlab serve needs the [serve] extra (fastapi, uvicorn)")
httpx = pytest.importorskip("httpx", reason="the API tests need httpx")
from fastapi.testclient import TestClient  # noqa: E402

from gptlab.cli.interactive import run_interactive  # noqa: E402
from gptlab.cli.serve import add_serve_parser, listen  # noqa: E402
from gptlab.config import DatasetConfig, ModelConfig, SampleConfig, TrainConfig  # noqa: E402
from gptlab.errors import GptlabError  # noqa: E402
from gptlab.generation import generate  # noqa: E402
from gptlab.models import GPT, KVCache  # noqa: E402
from gptlab.serve import ServeLimits  # noqa: E402
from gptlab.serve.app import create_app  # noqa: E402
from gptlab.serve.runner import ModelRunner  # noqa: E402
from gptlab.tokenizers import load_tokenizer  # noqa: E402
from gptlab.training import save_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = load_tokenizer(None, ROOT / "toy_data" / "tiny_sp")
PROMPT = "Once upon a time"


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def tiny_gpt(seq_len: int = 64) -> GPT:
    torch.manual_seed(0)
    config = ModelConfig(
        embed_dim=32,
        n_heads=4,
        num_layers=2,
        seq_len=seq_len,
        tgt_vocab_size=TOKENIZER.vocab_size,
        dropout=0.0,
        tie_embeddings=False,
    )
    model = GPT(config).eval()
    with torch.no_grad():  # larger weights than a fresh model's: its greedy text varies, its samples differ
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.normal_(0, weight.size(1) ** -0.5)
    return model


class ScriptedModel(nn.Module):
    """A stand-in for a trained model whose every row says `script` (token ids), then <EOS>.

    `gate` (if set) holds each forward pass until it opens, `delay` seconds slow each one down;
    `interrupt_after` raises KeyboardInterrupt (as Ctrl-C would) at that step, once.
    """

    def __init__(
        self,
        script: list[int],
        gate: threading.Event | None = None,
        delay: float = 0.0,
        interrupt_after: int | None = None,
    ):
        super().__init__()
        self.config = ModelConfig(
            embed_dim=4, n_heads=1, num_layers=1, seq_len=64, tgt_vocab_size=TOKENIZER.vocab_size, dropout=0.0
        )
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the engine a device to read
        self.script, self.gate, self.delay, self.interrupt_after = script, gate, delay, interrupt_after
        self.forward_calls = 0

    def new_kv_cache(self, batch: int, max_len: int | None = None, pad: torch.Tensor | None = None) -> KVCache:
        cache = KVCache(batch, 1, 1, self.config.seq_len, 1, pad=pad)
        cache.step = 0  # this generation's forward passes so far
        return cache

    def forward(self, idx: torch.Tensor, kv_cache: KVCache, **options) -> tuple[torch.Tensor, None]:
        if self.gate is not None:
            assert self.gate.wait(timeout=30), "the test never opened the gate"
        time.sleep(self.delay)
        B, T = idx.shape
        kv_cache.advance(T)
        step, kv_cache.step = kv_cache.step, kv_cache.step + 1
        self.forward_calls += 1
        if step == self.interrupt_after:
            self.interrupt_after = None
            raise KeyboardInterrupt
        token = self.script[step] if step < len(self.script) else TOKENIZER.eos_id
        logits = torch.full((B, T, self.config.tgt_vocab_size), -10.0)
        logits[:, -1, token] = 10.0
        return logits, None


def client_for(model: nn.Module, **limits) -> TestClient:
    # A loopback name in the Host header, as a local client sends (TestClient's own is "testserver").
    return TestClient(
        create_app(model, TOKENIZER, ServeLimits(**limits), model_name="tiny"), base_url="http://localhost"
    )


def post(client: TestClient, **body) -> httpx.Response:
    return client.post("/v1/completions", json={"prompt": PROMPT, **body})


def read_events(lines: Iterator[str]) -> list[dict | str]:
    """The payloads of a server-sent-event stream; checks the `data: ...` + blank line framing."""
    events, lines = [], list(lines)
    for data, blank in zip(lines[::2], lines[1::2], strict=True):
        assert data.startswith("data: ") and blank == ""
        payload = data.removeprefix("data: ")
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def stream(client: TestClient, **body) -> list[dict | str]:
    with client.stream("POST", "/v1/completions", json={"prompt": PROMPT, "stream": True, **body}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return read_events(response.iter_lines())


# ---- the completions API ---------------------------------------------------------------------


def test_greedy_completion_has_openai_shape_and_equals_generate():
    model = tiny_gpt()
    response = post(client_for(model), max_tokens=12, temperature=0, model="whatever")
    assert response.status_code == 200
    body = response.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["model"] == "tiny" and isinstance(body["created"], int)
    expected = generate(model, TOKENIZER, PROMPT, SampleConfig(max_new_tokens=12, temperature=0))[0]
    assert len(set(expected)) > 1  # the model says something, not one letter repeated
    assert body["choices"] == [{"text": expected, "index": 0, "logprobs": None, "finish_reason": "length"}]
    prompt_tokens = len(TOKENIZER.encode(PROMPT))
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens, "completion_tokens": 12, "total_tokens": prompt_tokens + 12
    }  # fmt: skip


def test_streamed_choices_equal_the_whole_response_and_generate():
    model = tiny_gpt()
    client = client_for(model)
    settings = {"max_tokens": 15, "temperature": 1.0, "top_p": 0.9, "seed": 7, "n": 2}
    whole = post(client, **settings).json()
    events = stream(client, **settings, stream_options={"include_usage": True})

    assert events[-1] == "[DONE]"
    *chunks, usage_chunk = events[:-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]
    texts, finish = ["", ""], [None, None]
    for chunk in chunks:
        assert chunk["object"] == "text_completion" and chunk["id"] == chunks[0]["id"] and chunk["model"] == "tiny"
        (piece,) = chunk["choices"]
        assert finish[piece["index"]] is None  # nothing after a choice's finish_reason
        texts[piece["index"]] += piece["text"]
        finish[piece["index"]] = piece["finish_reason"]
    assert len(chunks) > 4  # streamed in pieces, not in one go
    assert [{"text": t, "finish": f} for t, f in zip(texts, finish)] == [
        {"text": c["text"], "finish": c["finish_reason"]} for c in whole["choices"]
    ]
    expected = generate(model, TOKENIZER, PROMPT, SampleConfig(max_new_tokens=15, top_p=0.9, seed=7, num_samples=2))
    assert texts == expected and texts[0] != texts[1]


def test_several_prompts_number_their_choices_prompt_by_prompt():
    model = tiny_gpt()
    prompts = [PROMPT, "The cat"]
    body = post(client_for(model), prompt=prompts, n=2, max_tokens=6, temperature=0).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    for prompt, pair in zip(prompts, (body["choices"][:2], body["choices"][2:])):
        expected = generate(model, TOKENIZER, prompt, SampleConfig(max_new_tokens=6, temperature=0))[0]
        assert [c["text"] for c in pair] == [expected, expected]
    assert body["usage"]["prompt_tokens"] == sum(len(TOKENIZER.encode(p)) for p in prompts)


def test_eos_and_stop_strings_end_a_choice_with_stop():
    script = TOKENIZER.encode(" the cat sat on the mat")
    client = client_for(ScriptedModel(script))
    at_eos = post(client, max_tokens=40).json()
    assert at_eos["choices"][0]["text"] == " the cat sat on the mat"
    assert at_eos["choices"][0]["finish_reason"] == "stop"
    assert at_eos["usage"]["completion_tokens"] == len(script) + 1  # the <EOS> counts

    at_stop = post(client, max_tokens=40, stop=["zebra", " on"]).json()
    assert at_stop["choices"][0] | {"logprobs": None} == {
        "text": " the cat sat",
        "index": 0,
        "logprobs": None,
        "finish_reason": "stop",
    }
    streamed = stream(client, max_tokens=40, stop=" on")
    assert "".join(e["choices"][0]["text"] for e in streamed[:-1]) == " the cat sat"
    assert streamed[-2]["choices"][0]["finish_reason"] == "stop"

    cut = post(client, max_tokens=2).json()
    assert cut["choices"][0]["text"] == TOKENIZER.decode(script[:2])
    assert cut["choices"][0]["finish_reason"] == "length" and cut["usage"]["completion_tokens"] == 2


def test_health_models_and_page():
    client = client_for(tiny_gpt(), max_tokens_limit=50)
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny" and health["in_flight"] == 0
    assert health["limits"]["max_tokens_limit"] == 50 and health["limits"]["max_prompt_tokens"] == 64
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="generate"' in page.text and "/v1/completions" in page.text
    assert "://" not in page.text  # offline: no external script or style


def test_openai_fields_sent_at_their_off_values_are_accepted():
    client = client_for(tiny_gpt())
    body = {
        "prompt": PROMPT, "max_tokens": 3, "frequency_penalty": 0, "presence_penalty": 0.0, "logprobs": None,
        "echo": False, "best_of": 1, "logit_bias": {}, "suffix": None, "user": "someone",
    }  # fmt: skip
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({"max_tokens": 51}, 400, ["max_tokens=51", "--max_tokens_limit"]),
        ({"prompt": "a b c " * 40}, 400, ["tokens", "--max_prompt_tokens"]),
        ({"n": 3, "prompt": ["a", "b"]}, 400, ["6 completions", "--max_choices"]),
        ({"prompt": []}, 400, ["empty list"]),
        ({"temperature": -1}, 400, ["temperature", "greater than or equal to 0"]),
        ({"max_tokens": 0}, 400, ["max_tokens", "greater than 0"]),
        ({"n": 0}, 400, ["n:", "greater than 0"]),
        ({"stop": ["", "x"]}, 400, ["stop", "empty"]),
        ({"prompt": 42}, 422, ["prompt", "string"]),
        ({"stop": ["a", "b", "c", "d", "e"]}, 422, ["stop", "at most 4"]),
        ({"max_tokens": "many"}, 422, ["max_tokens", "integer"]),
        ({"foo": 1}, 422, ["unknown field 'foo'", "max_tokens"]),
        ({"frequency_penalty": 0.5}, 400, ["frequency_penalty is not supported", "repetition_penalty"]),
        ({"logit_bias": {"50": 100}}, 400, ["logit_bias is not supported"]),
        ({"best_of": 3}, 400, ["best_of is not supported"]),
        ({"logprobs": 0}, 400, ["logprobs is not supported"]),  # 0 still asks for the chosen tokens' logprobs
        (
            {"stream": True, "stream_options": {"include_usage": True, "x": 1}},
            422,
            ["unknown field 'stream_options.x'"],
        ),
        ({"temperature": 1000}, 400, ["temperature", "less than or equal to 100"]),
    ],
)
def test_requests_beyond_limits_or_invalid_get_4xx_with_a_message(body, status, words):
    client = client_for(tiny_gpt(), max_tokens_limit=50, max_prompt_tokens=20, max_choices=4)
    response = client.post("/v1/completions", json={"prompt": PROMPT, **body})
    assert response.status_code == status
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    for word in words:
        assert word in error["message"]
    assert post(client, max_tokens=2).status_code == 200  # and the server goes on


@pytest.mark.parametrize("content", [b"{not json", b"", b"[1, 2]"])
def test_body_that_is_not_a_json_object_is_refused(content):
    response = client_for(tiny_gpt()).post(
        "/v1/completions", content=content, headers={"content-type": "application/json"}
    )
    assert response.status_code in (400, 422)
    assert "JSON object" in response.json()["error"]["message"]


def test_prompt_longer_than_the_context_keeps_its_tail_when_the_limit_allows():
    model = tiny_gpt(seq_len=16)
    long_prompt = "the cat sat on the mat and " * 5
    assert len(TOKENIZER.encode(long_prompt)) > 16
    body = post(client_for(model, max_prompt_tokens=1000), prompt=long_prompt, max_tokens=5, temperature=0).json()
    cfg = SampleConfig(max_new_tokens=5, temperature=0)
    expected = generate(model, TOKENIZER, long_prompt, cfg, notice=lambda _: None)
    assert body["choices"][0]["text"] == expected[0] and body["usage"]["prompt_tokens"] == 16


def test_busy_server_answers_429_and_keeps_answering_while_generating():
    gate = threading.Event()
    script = TOKENIZER.encode(" the end")
    with client_for(ScriptedModel(script, gate=gate), max_concurrent=1) as client:
        first: list[httpx.Response] = []
        worker = threading.Thread(target=lambda: first.append(post(client, max_tokens=10)))
        worker.start()
        try:
            deadline = time.monotonic() + 10
            while client.get("/health").json()["in_flight"] == 0:  # the event loop answers meanwhile
                assert time.monotonic() < deadline, "the first request never started"
                time.sleep(0.01)
            busy = post(client, max_tokens=10)
            assert busy.status_code == 429
            assert busy.json()["error"]["type"] == "rate_limit_error"
            assert "--max_concurrent" in busy.json()["error"]["message"]
        finally:
            gate.set()
            worker.join(timeout=30)
        assert first[0].status_code == 200 and first[0].json()["choices"][0]["text"] == " the end"
        assert post(client, max_tokens=10).status_code == 200  # the slot is free again


def test_a_reader_that_leaves_stops_the_generation():
    model = ScriptedModel(TOKENIZER.encode(" the cat sat on the mat" * 20), delay=0.02)
    runner = ModelRunner(model, TOKENIZER, capacity=1)

    async def read_one_piece_then_leave() -> None:
        job = runner.submit([TOKENIZER.encode(PROMPT)], SampleConfig(max_new_tokens=60))
        events = job.events()
        await anext(events)
        await events.aclose()  # what a client hanging up does to its stream
        deadline = time.monotonic() + 10
        while runner.in_flight:
            assert time.monotonic() < deadline, "the job never ended"
            await asyncio.sleep(0.01)

    asyncio.run(read_one_piece_then_leave())
    runner.shutdown()
    assert model.forward_calls < 30  # stopped long before its 60 tokens


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_a_client_that_hangs_up_frees_the_model_over_http(stream):
    import uvicorn

    model = ScriptedModel(TOKENIZER.encode(" the cat sat on the mat" * 20), delay=0.02)
    server = uvicorn.Server(uvicorn.Config(create_app(model, TOKENIZER), log_level="warning"))
    listener = listen("127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        body = {"prompt": PROMPT, "max_tokens": 100, "stream": stream}
        if stream:
            with httpx.stream("POST", url + "/v1/completions", json=body) as response:
                next(response.iter_lines())  # one chunk, then hang up
        else:
            with pytest.raises(httpx.ReadTimeout):  # the answer is not ready: give up waiting, hang up
                httpx.post(url + "/v1/completions", json=body, timeout=0.3)
        deadline = time.monotonic() + 10
        while httpx.get(url + "/health").json()["in_flight"]:
            assert time.monotonic() < deadline, "the generation went on after its client left"
            time.sleep(0.02)
        assert model.forward_calls < 50  # of the 100 tokens asked for
    finally:
        server.should_exit = True
        thread.join(timeout=10)


# ---- gptlab serve on the command line, over real HTTP ----------------------------------------

SERVE = """
import argparse, sys
from gptlab.cli.serve import add_serve_parser
parser = argparse.ArgumentParser()
add_serve_parser(parser.add_subparsers())
args = parser.parse_args(["serve", *sys.argv[1:]])
args.handler(args)
"""


def save_tiny_checkpoint(path: Path) -> Path:
    """A tiny GPT with the toy tokenizer, saved as `gptlab train` would."""
    model = tiny_gpt()
    return save_checkpoint(path, model, TOKENIZER, model.config, DatasetConfig(), TrainConfig(), step=0, epoch=0)


class ServerProcess:
    """`gptlab serve` on a free port of 127.0.0.1, in a subprocess; `url` once it listens."""

    def __init__(self, checkpoint: Path, *flags: str):
        command = [sys.executable, "-c", SERVE, "--model_path", str(checkpoint), "--port", "0", "--device", "cpu"]
        command += flags
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        log = []
        for line in self.process.stdout:  # until "serving NAME at http://127.0.0.1:PORT/ (...)"
            log.append(line)
            if line.startswith("serving"):
                break
        else:
            self.stop()
            raise AssertionError("gptlab serve did not start:\n" + "".join(log))
        self.url = line.split(" at ")[1].split()[0].rstrip("/")
        self.lines = log
        threading.Thread(target=lambda: log.extend(self.process.stdout), daemon=True).start()  # keep the pipe flowing

    @property
    def log(self) -> str:
        """What the server printed so far (stdout and stderr)."""
        return "".join(self.lines)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def test_serve_command_answers_over_http(tmp_path: Path):
    server = ServerProcess(save_tiny_checkpoint(tmp_path / "tiny.pth"), "--max_tokens_limit", "30")
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            assert http.get("/health").json()["limits"]["max_tokens_limit"] == 30
            body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}
            whole = http.post("/v1/completions", json=body).json()
            assert whole["model"] == "tiny" and whole["choices"][0]["finish_reason"] == "length"
            with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
                events = read_events(response.iter_lines())
            assert "".join(e["choices"][0]["text"] for e in events[:-1]) == whole["choices"][0]["text"]
            assert http.post("/v1/completions", json={**body, "max_tokens": 31}).status_code == 400
    finally:
        server.stop()
    assert server.process.returncode is not None


def test_serve_command_accepts_int8_weights(tmp_path: Path):
    server = ServerProcess(save_tiny_checkpoint(tmp_path / "tiny.pth"), "--dtype", "int8")
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0}
            answer = http.post("/v1/completions", json=body).json()
    finally:
        server.stop()
    assert answer["choices"][0]["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == 6


def test_taken_port_bad_port_and_bad_limit_are_clear_errors(tmp_path: Path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(GptlabError, match=f"cannot listen on 127.0.0.1:{port}.*--port"):
            listen("127.0.0.1", port)
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    checkpoint = str(tmp_path / "never_read.pth")  # both errors come before loading the model
    bad_flags = [(["--port", "70000"], "--port 70000 is not a TCP port"), (["--max_concurrent", "0"], "max_concurrent")]
    for flags, message in bad_flags:
        args = parser.parse_args(["serve", "--model_path", checkpoint, *flags])
        with pytest.raises(GptlabError, match=message):
            args.handler(args)


# ---- gptlab generate --interactive -----------------------------------------------------------


def fake_input(*lines: str):
    """An input() that returns `lines` one by one, then signals end of input like Ctrl-D."""
    remaining = list(lines)

    def read(prompt: str) -> str:
        if not remaining:
            raise EOFError
        return remaining.pop(0)

    return read


def test_interactive_answers_each_prompt_until_an_empty_line():
    model = tiny_gpt()
    cfg = SampleConfig(max_new_tokens=8, temperature=0)
    output = io.StringIO()
    run_interactive(model, TOKENIZER, cfg, input_fn=fake_input(PROMPT, "The cat", "", "never read"), output=output)
    answers = [generate(model, TOKENIZER, prompt, cfg)[0] for prompt in (PROMPT, "The cat")]
    text = output.getvalue()
    assert f"{PROMPT}{answers[0]}\n" in text and f"The cat{answers[1]}\n" in text
    assert "never read" not in text


def test_interactive_ends_at_end_of_input_and_ctrl_c_stops_one_answer_only():
    model = ScriptedModel(TOKENIZER.encode(" the cat sat on the mat"), interrupt_after=3)
    output = io.StringIO()
    cfg = SampleConfig(max_new_tokens=20)
    run_interactive(model, TOKENIZER, cfg, input_fn=fake_input("first", "second"), output=output)
    first, second = output.getvalue().split("\n\n")[:2]
    assert first.endswith("[stopped]") and " the cat sat on the mat" not in first
    assert second.endswith("second the cat sat on the mat")
