"""The page's chat mode in a real headless Chromium, for a model with a chat template: turns
shown as a conversation, each answer streamed from /v1/chat/completions with the turns before
it, a new conversation, and the server's message when a request is refused.

Needs Debian's /usr/bin/chromium (scripts/install_browser.sh) and the `playwright` package.
"""

from __future__ import annotations

from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip("no /usr/bin/chromium; install it with scripts/install_browser.sh", allow_module_level=True)
pytest.importorskip("openai", reason="the chat tests share test_serve_chat's helpers, which need openai")

import httpx  # noqa: E402
from playwright.sync_api import Page  # noqa: E402

from gptlab.config import DatasetConfig, TrainConfig  # noqa: E402
from gptlab.training import save_checkpoint  # noqa: E402

from test_serve import ServerProcess  # noqa: E402
from test_serve_browser import browser, open_page  # noqa: E402, F401  (browser: a fixture)
from test_serve_chat import CHAT_TOKENIZER, chat_gpt  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> ServerProcess:
    model = chat_gpt()
    path = tmp_path_factory.mktemp("chat") / "chat.pth"
    save_checkpoint(path, model, CHAT_TOKENIZER, model.config, DatasetConfig(), TrainConfig(), step=0, epoch=0)
    server = ServerProcess(path, "--max_tokens_limit", "100")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def page(browser, server: ServerProcess) -> Page:  # noqa: F811
    page = open_page(browser, server.url)
    page.wait_for_function("document.getElementById('model').textContent.includes('chat')")  # /health answered
    return page


def set_sampling(page: Page, max_tokens: str) -> None:
    page.fill("#max-tokens", max_tokens)
    page.eval_on_selector(
        "#temperature", "(slider) => { slider.value = '0'; slider.dispatchEvent(new Event('input')); }"
    )


def say(page: Page, text: str) -> None:
    """Type a message, press Enter and wait until the answer has arrived."""
    page.fill("#message", text)
    page.press("#message", "Enter")
    page.wait_for_function("/^(done|error)/.test(document.getElementById('status').textContent)")


def turns(page: Page) -> list[tuple[str, str]]:
    """(class, text) of each turn on the page."""
    return page.eval_on_selector_all(
        "#conversation .turn", "turns => turns.map(t => [t.className, t.querySelector('.content').textContent])"
    )


def api_answer(server: ServerProcess, messages: list[dict]) -> str:
    body = {"messages": messages, "temperature": 0, "max_tokens": 12}
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30).json()["choices"][0]["message"][
        "content"
    ]


def test_chat_mode_streams_each_answer_with_the_conversation_so_far(page: Page, server: ServerProcess):
    assert page.is_visible("#chat-mode") and not page.is_visible("#complete-mode")  # the model can chat
    assert page.is_checked("#mode-chat")
    set_sampling(page, "12")
    page.evaluate(
        "window.updates = 0; new MutationObserver(() => window.updates++).observe("
        "document.getElementById('conversation'), {childList: true, characterData: true, subtree: true})"
    )
    say(page, "Once upon a time")
    first = api_answer(server, [{"role": "user", "content": "Once upon a time"}])
    assert turns(page) == [["turn user", "Once upon a time"], ["turn assistant", first]]
    assert page.evaluate("window.updates") > 3  # the turns, then the answer piece by piece
    assert page.input_value("#message") == ""

    say(page, "And then?")
    history = [
        {"role": "user", "content": "Once upon a time"}, {"role": "assistant", "content": first},
        {"role": "user", "content": "And then?"},
    ]  # fmt: skip
    second = api_answer(server, history)
    assert turns(page)[2:] == [["turn user", "And then?"], ["turn assistant", second]]
    assert second != api_answer(server, history[2:])  # the answer saw the turns before it

    page.click("#reset")
    assert turns(page) == []
    page.fill("#system", "Talk like a pirate.")
    say(page, "And then?")
    pirate = [{"role": "system", "content": "Talk like a pirate."}, {"role": "user", "content": "And then?"}]
    assert turns(page) == [["turn user", "And then?"], ["turn assistant", api_answer(server, pirate)]]
    page.fill("#system", "")


def test_refused_message_shows_the_servers_reason_and_comes_back_to_the_input(page: Page):
    page.click("#reset")
    set_sampling(page, "500")
    say(page, "Too long an answer, please")
    assert "--max_tokens_limit" in page.text_content("#status")
    assert turns(page) == [] and page.input_value("#message") == "Too long an answer, please"
    assert page.is_enabled("#send") and not page.is_enabled("#chat-stop")


def test_complete_mode_is_one_click_away(page: Page):
    page.check("#mode-complete")
    assert page.is_visible("#complete-mode") and not page.is_visible("#chat-mode")
    page.check("#mode-chat")
    assert page.is_visible("#chat-mode")
