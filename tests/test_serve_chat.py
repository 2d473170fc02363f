"""POST /v1/chat/completions: OpenAI's chat shape, whole and streamed, against the chat template
and the generator; where an answer ends; bad input and the server's limits as OpenAI errors; a
model without a chat template; and the official `openai` client against a server on 127.0.0.1."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("fastapi", reason="gptlab serve needs the [serve] extra (fastapi, uvicorn)")
openai = pytest.importorskip("openai", reason="the chat API tests need the openai client (the dev extra)")
from fastapi.testclient import TestClient  # noqa: E402

from gptlab.config import ModelConfig, SampleConfig  # noqa: E402
from gptlab.generation import Piece, SampleEnd, answer_end_ids, sample_events  # noqa: E402
from gptlab.models import GPT  # noqa: E402
from gptlab.serve import ServeLimits  # noqa: E402
from gptlab.serve.app import create_app  # noqa: E402
from gptlab.serve.schemas import ServeAccess  # noqa: E402
from gptlab.tokenizers.chat import encode_chat, end_of_turn_id, with_chat_tokens  # noqa: E402

from test_serve import TOKENIZER, ScriptedModel, read_events, tiny_gpt  # noqa: E402
from test_serve_guard import assert_openai_error, served  # noqa: E402

CHAT_TOKENIZER = with_chat_tokens(TOKENIZER)
MESSAGES = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Once upon a time"},
    {"role": "assistant", "content": "there was a cat."},
    {"role": "user", "content": "And then?"},
]

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def chat_gpt(seq_len: int = 64) -> GPT:
    """A tiny random GPT whose vocabulary holds the chat markers."""
    torch.manual_seed(0)
    config = ModelConfig(
        embed_dim=32, n_heads=4, num_layers=2, seq_len=seq_len, tgt_vocab_size=CHAT_TOKENIZER.vocab_size,
        dropout=0.0, tie_embeddings=False,
    )  # fmt: skip
    model = GPT(config).eval()
    with torch.no_grad():  # larger weights than a fresh model's: its greedy text varies
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.normal_(0, weight.size(1) ** -0.5)
    return model


class ScriptedChatModel(ScriptedModel):
    """ScriptedModel (test_serve.py) over the chat tokenizer's vocabulary; `prompts` records the
    ids each generation starts from."""

    def __init__(self, script: list[int], **options):
        super().__init__(script, **options)
        self.config = self.config.model_copy(update={"tgt_vocab_size": CHAT_TOKENIZER.vocab_size})
        self.prompts: list[list[int]] = []

    def forward(self, idx: torch.Tensor, kv_cache, **options):
        if kv_cache.step == 0:
            self.prompts.append(idx[0].tolist())
        return super().forward(idx, kv_cache, **options)


def chat_client(model=None, tokenizer=CHAT_TOKENIZER, access: ServeAccess | None = None, **limits) -> TestClient:
    app = create_app(model or chat_gpt(), tokenizer, ServeLimits(**limits), model_name="tiny", access=access)
    return TestClient(app, base_url="http://localhost", raise_server_exceptions=False)


def expected_answer(model: GPT, messages: list[dict], cfg: SampleConfig) -> tuple[str, str, int]:
    """(text, finish_reason, completion tokens) of the generator on the template's prompt."""
    ids = encode_chat(CHAT_TOKENIZER, messages, add_generation_prompt=True)
    text, end = "", None
    for event in sample_events(model, CHAT_TOKENIZER, [ids], cfg, end_ids=answer_end_ids(CHAT_TOKENIZER)):
        if isinstance(event, Piece):
            text += event.text
        elif isinstance(event, SampleEnd):
            end = event
    return text, end.finish_reason, end.completion_tokens


def stream_chat(client: TestClient, **body) -> list[dict | str]:
    with client.stream("POST", "/v1/chat/completions", json={"messages": MESSAGES, "stream": True, **body}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return read_events(response.iter_lines())


# ---- the API, in process ------------------------------------------------------------------------


def test_chat_completion_has_openai_shape_and_equals_the_generator_on_the_template():
    model = chat_gpt()
    response = chat_client(model).post(
        "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 12, "temperature": 0}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion" and body["model"] == "tiny"
    text, finish, completion_tokens = expected_answer(model, MESSAGES, SampleConfig(max_new_tokens=12, temperature=0))
    assert len(set(text)) > 1
    assert body["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}
    ]
    prompt_tokens = len(encode_chat(CHAT_TOKENIZER, MESSAGES, add_generation_prompt=True))
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }  # fmt: skip


def test_streamed_chunks_carry_deltas_that_add_up_to_the_whole_answer():
    model = chat_gpt()
    client = chat_client(model)
    settings = {"max_tokens": 15, "temperature": 1.0, "top_p": 0.9, "seed": 7, "n": 2}
    whole = client.post("/v1/chat/completions", json={"messages": MESSAGES, **settings}).json()
    events = stream_chat(client, **settings, stream_options={"include_usage": True})

    assert events[-1] == "[DONE]"
    *chunks, usage_chunk = events[:-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]
    roles = [c["choices"][0]["delta"] for c in chunks[:2]]
    assert roles == [{"role": "assistant", "content": ""}] * 2  # each choice's first chunk names the role
    texts, finish = ["", ""], [None, None]
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk" and chunk["id"] == chunks[0]["id"]
        assert chunk["usage"] is None  # present on every chunk when asked for, set on the last
        (choice,) = chunk["choices"]
        assert finish[choice["index"]] is None  # nothing after a choice's finish_reason
        texts[choice["index"]] += choice["delta"].get("content", "")
        finish[choice["index"]] = choice["finish_reason"]
    assert len(chunks) > 6  # streamed in pieces, not in one go
    assert texts == [c["message"]["content"] for c in whole["choices"]] and texts[0] != texts[1]
    assert finish == [c["finish_reason"] for c in whole["choices"]]
    cfg = SampleConfig(max_new_tokens=15, top_p=0.9, seed=7, num_samples=2)
    ids = encode_chat(CHAT_TOKENIZER, MESSAGES, add_generation_prompt=True)
    expected = ["", ""]
    for event in sample_events(model, CHAT_TOKENIZER, [ids], cfg, end_ids=answer_end_ids(CHAT_TOKENIZER)):
        if isinstance(event, Piece):
            expected[event.index] += event.text
    assert texts == expected


def test_an_answer_ends_at_the_end_of_turn_marker_or_a_role_marker():
    answer = CHAT_TOKENIZER.encode(" the cat sat")
    for marker in (end_of_turn_id(CHAT_TOKENIZER), CHAT_TOKENIZER.special_tokens["<|user|>"]):
        client = chat_client(ScriptedChatModel([*answer, marker, *CHAT_TOKENIZER.encode(" on the mat")]))
        body = client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 40}).json()
        assert body["choices"][0]["message"]["content"] == " the cat sat"
        assert body["choices"][0]["finish_reason"] == "stop"
        assert body["usage"]["completion_tokens"] == len(answer) + 1  # the marker counts
        streamed = stream_chat(client, max_tokens=40)
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in streamed[:-1]) == " the cat sat"
    stopped = client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 40, "stop": " sat"})
    assert stopped.json()["choices"][0]["message"]["content"] == " the cat"


def test_developer_role_text_parts_and_max_completion_tokens_are_read_as_openai_means_them():
    model = chat_gpt()
    client = chat_client(model)
    plain = client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 6, "temperature": 0}).json()
    openai_style = [
        {
            "role": "developer",
            "content": [{"type": "text", "text": "You answer "}, {"type": "text", "text": "briefly."}],
        },
        *MESSAGES[1:],
    ]
    body = {"messages": openai_style, "max_completion_tokens": 6, "temperature": 0}
    newer = client.post("/v1/chat/completions", json=body).json()
    assert newer["choices"] == plain["choices"] and newer["usage"] == plain["usage"]


def test_default_length_is_the_context_within_the_servers_limit():
    model = ScriptedChatModel([CHAT_TOKENIZER.encode("a")[0]] * 100)  # never ends by itself
    body = chat_client(model, max_tokens_limit=20).post("/v1/chat/completions", json={"messages": MESSAGES}).json()
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 20


def test_health_says_whether_the_model_can_chat_and_a_model_without_a_template_gets_400():
    assert chat_client().get("/health").json()["chat"] is True
    plain = chat_client(tiny_gpt(), tokenizer=TOKENIZER)
    assert plain.get("/health").json()["chat"] is False
    error = assert_openai_error(
        plain.post("/v1/chat/completions", json={"messages": MESSAGES}), 400, "no chat template", "--task chat"
    )
    assert error["type"] == "invalid_request_error"
    assert plain.post("/v1/completions", json={"prompt": "Once", "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize(
    "body, status, words, param",
    [
        ({"messages": []}, 400, ["messages is an empty list"], "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, 400, ["messages[0].role is 'tool'", "user"], None),
        (
            {"messages": [MESSAGES[1], {"role": "user"}]},
            422,
            ["messages[1].content", "required"],
            "messages[1].content",
        ),
        (
            {"messages": [{"role": "user", "content": "x", "nick": "a"}]},
            422,
            ["unknown field 'messages[0].nick'"],
            None,
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            422,
            ["only text is supported"],
            "messages[0].content",
        ),
        ({"messages": "hello"}, 422, ["messages:"], "messages"),
        ({"messages": MESSAGES, "prompt": "x"}, 422, ["unknown field 'prompt'", "messages"], "prompt"),
        ({}, 422, ["messages", "required"], "messages"),
        ({"messages": MESSAGES, "max_tokens": 51}, 400, ["max_tokens=51", "--max_tokens_limit"], "max_tokens"),
        ({"messages": MESSAGES, "n": 5}, 400, ["--max_choices"], "n"),
        ({"messages": MESSAGES, "temperature": -1}, 400, ["temperature", "greater than or equal to 0"], "temperature"),
        ({"messages": MESSAGES, "max_tokens": 5, "max_completion_tokens": 6}, 400, ["differ"], None),
        ({"messages": [{"role": "user", "content": "a b c " * 40}]}, 400, ["--max_prompt_tokens"], "messages"),
        ({"messages": [{"role": "user", "content": "x"}] * 20}, 400, ["conversation is", "tokens"], "messages"),
        ({"messages": MESSAGES, "logprobs": True}, 400, ["logprobs is not supported"], "logprobs"),
        ({"messages": MESSAGES, "tools": [{"type": "function"}]}, 400, ["tools is not supported"], "tools"),
        ({"messages": MESSAGES, "frequency_penalty": 0.5}, 400, ["repetition_penalty"], "frequency_penalty"),
    ],
)
def test_bad_chat_requests_get_openai_errors_naming_the_problem(body, status, words, param):
    client = chat_client(max_tokens_limit=50, max_prompt_tokens=40, max_choices=4)
    error = assert_openai_error(client.post("/v1/chat/completions", json=body), status, *words)
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param
    ok = client.post("/v1/chat/completions", json={"messages": MESSAGES[1:2], "max_tokens": 2})
    assert ok.status_code == 200  # and the server goes on


def test_too_long_conversation_has_openai_s_code_and_the_servers_limits_apply_to_the_route():
    client = chat_client(max_prompt_tokens=20)
    error = assert_openai_error(client.post("/v1/chat/completions", json={"messages": MESSAGES}), 400, "20")
    assert error["code"] == "context_length_exceeded"
    small = chat_client(max_body_bytes=500)
    big = {"messages": [{"role": "user", "content": "x" * 600}]}
    assert_openai_error(small.post("/v1/chat/completions", json=big), 413, "--max_body_bytes")
    keyed = chat_client(access=ServeAccess(api_key="sesame"))
    assert_openai_error(keyed.post("/v1/chat/completions", json={"messages": MESSAGES}), 401, "API key")
    opened = keyed.post(
        "/v1/chat/completions",
        json={"messages": MESSAGES, "max_tokens": 2},
        headers={"Authorization": "Bearer sesame"},
    )
    assert opened.status_code == 200
    body = json.dumps({"messages": MESSAGES}).encode()
    not_json = small.post("/v1/chat/completions", content=body[:-1], headers={"content-type": "application/json"})
    assert_openai_error(not_json, 400, "not valid JSON", '"messages"')


# ---- the official openai client against a server on 127.0.0.1 ----------------------------------


@pytest.fixture(scope="module")
def chat_server():
    """(base URL, model) of a chat model served by uvicorn on a free port of 127.0.0.1."""
    model = chat_gpt()
    app = create_app(model, CHAT_TOKENIZER, ServeLimits(max_tokens_limit=50), model_name="tiny-chat")
    with served(app) as port:
        yield f"http://127.0.0.1:{port}/v1", model


def openai_client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)


def test_openai_client_gets_the_answer_whole_and_streamed(chat_server):
    base_url, model = chat_server
    client = openai_client(base_url)
    whole = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=10, temperature=0)
    text, finish, completion_tokens = expected_answer(model, MESSAGES, SampleConfig(max_new_tokens=10, temperature=0))
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].message.content == text
    assert whole.choices[0].finish_reason == finish and whole.usage.completion_tokens == completion_tokens
    assert whole.model == "tiny-chat" and whole.object == "chat.completion"

    stream = client.chat.completions.create(
        model="tiny-chat", messages=MESSAGES, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == text and len([p for p in pieces if p]) > 1
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish


def test_openai_client_raises_the_servers_errors(chat_server):
    client = openai_client(chat_server[0])
    with pytest.raises(openai.BadRequestError, match="empty list"):
        client.chat.completions.create(model="tiny-chat", messages=[])
    with pytest.raises(openai.BadRequestError, match="role is 'tool'"):
        client.chat.completions.create(model="tiny-chat", messages=[{"role": "tool", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="--max_tokens_limit") as raised:
        client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=51)
    assert raised.value.param == "max_tokens"


def test_openai_client_against_a_model_without_a_chat_template():
    app = create_app(tiny_gpt(), TOKENIZER, ServeLimits(), model_name="plain")
    with served(app) as port:
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            openai_client(f"http://127.0.0.1:{port}/v1").chat.completions.create(model="plain", messages=MESSAGES)
