"""The browser playground at `/`.

The fast test builds the app in-process: `/` and `/static/*` are served (and 404 with
--disable-playground), and the page loads nothing from outside the server. The browser tests drive
Debian's headless Chromium with Playwright against one real server (embedded SmolLM2, --api-key):
the key prompt, streamed text that grows, the facts line under a reply, prefix-cache hits on the
second turn, the JSON-schema box, and the stop button freeing the request on the server.
"""

from __future__ import annotations

import json
import re
import time

import pytest
from fastapi.testclient import TestClient

from browser import browser_missing, launch_chromium
from conftest import SERVER_MAX_MODEL_LEN, SkiffServer
from server.app import create_app
from server.config import ServerConfig, parse_args
from server.playground import STATIC_DIR
from server.process_util import IpcPaths, ModelInfo

KEY = "playground-key"


# ----------------------------------------------------------------------------- in-process


def _app(tmp_path, **config) -> TestClient:
    # No `with`: the lifespan (the engine client) does not start; these routes do not need it.
    app = create_app(ServerConfig(chat_template="{{ messages }}", **config), ModelInfo(256, 1000, (2,), ""),
                     IpcPaths.in_dir(str(tmp_path)))
    return TestClient(app)


def test_playground_routes_and_flag(tmp_path):
    client = _app(tmp_path, api_key="k")
    page = client.get("/")  # the page is public; the API behind it still wants the key
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    for name, kind in (("app.js", "javascript"), ("style.css", "text/css"), ("favicon.svg", "image/svg+xml")):
        res = client.get("/static/" + name)
        assert res.status_code == 200 and kind in res.headers["content-type"], name
    assert client.get("/v1/models").status_code == 401
    assert client.get("/static/missing.js").json()["error"]["code"] == "not_found"
    assert "/" not in client.get("/openapi.json").json()["paths"]

    assert parse_args(["--disable-playground"]).disable_playground
    off = _app(tmp_path, disable_playground=True)
    for path in ("/", "/static/app.js"):
        res = off.get(path)
        assert res.status_code == 404 and res.json()["error"]["code"] == "not_found", path


def test_page_loads_nothing_from_outside():
    for path in STATIC_DIR.iterdir():
        text = path.read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text, re.I) or path.suffix == ".svg", path
        assert "@import" not in text and "url(" not in text, path


# ----------------------------------------------------------------------------- in a browser


@pytest.fixture(scope="module")
def server():
    if browser_missing():
        pytest.skip(browser_missing())
    srv = SkiffServer("--max-model-len", str(SERVER_MAX_MODEL_LEN), api_key=KEY).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = launch_chromium(p)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    """A fresh tab (its own sessionStorage) on the playground, the key not yet given."""
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda e: errors.append(str(e)))
    tab.goto(server.url + "/")
    yield tab
    context.close()
    assert not errors, errors


def _give_key(page, key: str) -> None:
    page.wait_for_selector("#key-dialog[open]")
    page.fill("#key-input", key)
    page.click("#key-save")


def _wait_for(page, js: str, timeout_s: float = 60.0) -> None:
    """Poll `js` (a function) until it returns truthy. Not page.wait_for_function: that evaluates its
    predicate with eval() inside the page, which the page's Content-Security-Policy forbids."""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(js):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {js}")
        time.sleep(0.05)


def _has_models(page) -> None:
    _wait_for(page, "() => document.querySelector('#model').options.length > 0", 15)


def _unlock(page) -> None:
    _give_key(page, KEY)
    _has_models(page)


def _ask(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def _last_reply(page):
    return page.locator(".msg.assistant").last


def _record_lengths(page) -> None:
    """Record the last reply's text length at every DOM change (no polling gaps)."""
    page.evaluate("""() => {
        window.__lengths = [];
        new MutationObserver(() => {
            const replies = document.querySelectorAll('.msg.assistant .body');
            if (replies.length) window.__lengths.push(replies[replies.length - 1].textContent.length);
        }).observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true});
    }""")


@pytest.mark.slow
def test_wrong_key_shows_error_right_key_works(page):
    _give_key(page, "not-the-key")
    error = page.locator("#key-error")
    error.wait_for(state="visible")
    assert "refused" in error.inner_text() and "API key" in error.inner_text()
    assert page.locator("#model option").count() == 0
    _give_key(page, KEY)
    _has_models(page)
    assert page.input_value("#model") == "SmolLM2-135M-Instruct"
    assert page.evaluate("sessionStorage.getItem('skiff.apiKey')") == KEY
    assert page.evaluate("localStorage.length") == 0


@pytest.mark.slow
def test_markdown_is_escaped_and_errors_are_shown(page):
    html = page.evaluate("""() => renderMarkdown(
        "<img src=x onerror=alert(1)> **bold** and `<b>code</b>`\\n\\n- one\\n- *two*\\n\\n```py\\nif a < b:\\n    pass")""")
    assert "<img" not in html and "<b>" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "<strong>bold</strong>" in html and "<code>&lt;b&gt;code&lt;/b&gt;</code>" in html
    assert "<ul><li>one</li><li><em>two</em></li></ul>" in html
    assert '<pre data-lang="py"><code>if a &lt; b:\n    pass</code></pre>' in html  # an open fence while streaming

    _unlock(page)
    page.fill("#schema", "{not json")  # caught in the page, nothing sent
    _ask(page, "hello")
    assert "not valid JSON" in page.locator("#schema-error").inner_text()
    assert page.locator(".msg").count() == 0
    page.fill("#schema", json.dumps({"type": "no-such-type"}))  # the server's 400, shown under the turn
    page.click("#send")
    error = _last_reply(page).locator(".facts.error")
    error.wait_for()
    assert error.inner_text().startswith("Error 400: "), error.inner_text()


@pytest.mark.slow
def test_streams_reply_with_facts_and_cache_hits(page):
    _unlock(page)
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "40")
    _record_lengths(page)
    _ask(page, "What is the capital of France?")
    facts = _last_reply(page).locator(".facts")
    facts.wait_for(timeout=60_000)
    text = facts.inner_text()
    assert re.search(r"^\d+ tokens$", text, re.M) and "TTFT" in text and "tok/s" in text, text
    assert "finish: " in text and "prompt tokens cached" in text, text
    final = len(_last_reply(page).locator(".body").inner_text())
    seen = set(page.evaluate("window.__lengths"))
    growing = {n for n in seen if 0 < n < final}
    assert len(growing) >= 2, f"the reply did not grow while streaming: {sorted(seen)} (final {final})"
    assert "Paris" in _last_reply(page).inner_text()

    # The second turn's prompt starts with the first's: the prefix cache serves part of it.
    _ask(page, "And of Italy?")
    page.locator(".msg.assistant").nth(1).locator(".facts").wait_for(timeout=60_000)
    cached = re.search(r"(\d+)/(\d+) prompt tokens cached", _last_reply(page).inner_text())
    assert cached and int(cached.group(1)) > 0, _last_reply(page).inner_text()
    assert re.fullmatch(r"\d+", page.locator("#st-running").inner_text())  # the strip reads /metrics
    assert re.fullmatch(r"\d+(\.\d)?%", page.locator("#st-kv").inner_text())

    # New chat, then the JSON-schema box: the reply is JSON that follows the schema.
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0
    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 20}},
              "required": ["capital"], "additionalProperties": False}
    page.fill("#schema", json.dumps(schema))
    _ask(page, "What is the capital of France? Answer in JSON.")
    _last_reply(page).locator(".facts").wait_for(timeout=60_000)
    assert set(json.loads(_last_reply(page).locator("pre").inner_text())) == {"capital"}


@pytest.mark.slow
def test_stop_frees_the_request(page, server):
    _unlock(page)
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "400")
    _ask(page, "Write a long story about a dragon who learns to sail across the sea.")
    _wait_for(page, "() => { const b = document.querySelectorAll('.msg.assistant .body');"
                    " return b.length && b[b.length - 1].textContent.length > 20; }")
    deadline = time.monotonic() + 5  # the scheduler publishes its gauges every 0.25 s
    while server.metrics()["skiff:num_running_requests"] != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metrics()["skiff:num_running_requests"] == 1
    assert _last_reply(page).locator(".facts").count() == 0, "the reply finished before stop was pressed"
    page.click("#stop")
    facts = _last_reply(page).locator(".facts")
    facts.wait_for()
    assert facts.inner_text().startswith("stopped after"), facts.inner_text()
    idle = server.wait_idle(timeout_s=5)  # the server saw the disconnect and aborted the request
    assert idle["skiff:kv_cache_usage"] == 0
    assert page.locator("#send").is_visible() and not page.locator("#stop").is_visible()
    deadline = time.monotonic() + 5  # and the page's status strip follows the gauge back to 0
    while page.locator("#st-running").inner_text() != "0" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert page.locator("#st-running").inner_text() == "0"
