"""The playground page of `gptlab serve` in a real headless Chromium: type a prompt, press
Generate, watch the answer stream in; a request over the limits shows the server's message.

Needs Debian's /usr/bin/chromium (scripts/install_browser.sh) and the `playwright` package;
Playwright drives that Chromium and never downloads a browser of its own.
"""

from __future__ import annotations

from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip("no /usr/bin/chromium; install it with scripts/install_browser.sh", allow_module_level=True)

import httpx  # noqa: E402
from playwright.sync_api import Browser, Page, sync_playwright  # noqa: E402

from test_serve import PROMPT, ServerProcess, save_tiny_checkpoint  # noqa: E402

CHROMIUM_ARGS = [
    "--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic",
]  # fmt: skip
WAIT_MS = 30_000


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> ServerProcess:
    checkpoint = save_tiny_checkpoint(tmp_path_factory.mktemp("serve") / "tiny.pth")
    server = ServerProcess(checkpoint, "--max_tokens_limit", "100")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser() -> Browser:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def open_page(browser: Browser, url: str) -> Page:
    page = browser.new_page()
    page.set_default_timeout(WAIT_MS)
    page.goto(url + "/")
    return page


@pytest.fixture(scope="module")
def page(browser: Browser, server: ServerProcess) -> Page:
    return open_page(browser, server.url)


def set_controls(page: Page, prompt: str, temperature: str, max_tokens: str) -> None:
    page.fill("#prompt", prompt)
    page.fill("#max-tokens", max_tokens)
    page.eval_on_selector(
        "#temperature",
        "(slider, value) => { slider.value = value; slider.dispatchEvent(new Event('input')); }",
        temperature,
    )


def test_typed_prompt_streams_into_the_page(page: Page, server: ServerProcess):
    page.wait_for_function("document.getElementById('model').textContent.includes('tiny')")  # /health answered
    set_controls(page, PROMPT, temperature="0", max_tokens="40")
    # Count the updates of the output, to see the text arrive piece by piece.
    page.evaluate(
        "window.updates = 0; new MutationObserver(() => window.updates++)"
        ".observe(document.getElementById('completion'), {childList: true, characterData: true, subtree: true})"
    )
    page.click("#generate")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('done')")

    expected = httpx.post(
        server.url + "/v1/completions", json={"prompt": PROMPT, "temperature": 0, "max_tokens": 40}, timeout=30
    ).json()["choices"][0]["text"]
    assert expected
    assert page.text_content("#prompt-echo") == PROMPT
    assert page.text_content("#completion") == expected
    assert page.evaluate("window.updates") > 1
    assert page.text_content("#status") == "done (length reached)"
    assert page.is_enabled("#generate") and not page.is_enabled("#stop")


def test_request_over_a_limit_shows_the_servers_message(page: Page):
    set_controls(page, PROMPT, temperature="0.8", max_tokens="500")
    page.click("#generate")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('error')")
    assert "--max_tokens_limit" in page.text_content("#status")
    assert page.text_content("#completion") == ""


def test_page_asks_for_the_api_key_of_a_server_that_needs_one(browser: Browser, tmp_path: Path):
    keyed = ServerProcess(save_tiny_checkpoint(tmp_path / "tiny.pth"), "--api_key", "page-key")
    try:
        page = open_page(browser, keyed.url)
        page.wait_for_function("document.getElementById('model').textContent.includes('tiny')")
        assert page.is_visible("#api-key")  # /health said a key is needed
        set_controls(page, PROMPT, temperature="0", max_tokens="5")
        page.click("#generate")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('error')")
        assert "API key" in page.text_content("#status")
        page.fill("#api-key", "page-key")
        page.click("#generate")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('done')")
        assert page.text_content("#completion") != ""
    finally:
        keyed.stop()


def test_page_of_a_server_without_a_key_shows_no_key_field(page: Page):
    page.wait_for_function("document.getElementById('model').textContent.includes('tiny')")
    assert not page.is_visible("#api-key")
