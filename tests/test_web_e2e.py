"""The web chat page at ``/`` in a real headless Chromium (Playwright),
against the real stack: Redis, the API and a Celery worker with the demo
model. Screenshots land in test-artifacts/ (web-*.png)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest
import redis
from playwright.sync_api import Browser, Page, expect

from api.errors import APIError, no_live_worker, queue_full
from broker.keys import Keys
from tests.browser import needs_chromium
from tests.conftest import Stack
from tests.procs import ARTIFACTS, start_api

# Generous: the machine has two cores and other suites may run beside this one.
ANSWER_TIMEOUT_MS = 120_000

pytestmark = [
    pytest.mark.e2e,
    needs_chromium,
]


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh profile (empty localStorage) per test; a script error fails it."""
    context = browser.new_context(viewport={"width": 1180, "height": 800})
    pg = context.new_page()
    pg.set_default_timeout(60_000)
    expect.set_options(timeout=60_000)
    script_errors: list[str] = []
    pg.on("pageerror", lambda exc: script_errors.append(str(exc)))
    try:
        yield pg
    finally:
        context.close()
    assert not script_errors, script_errors


def open_chat(page: Page, base: str, model: str) -> None:
    page.goto(f"{base}/")
    page.wait_for_selector(f"#model option[value='{model}']", state="attached")
    page.select_option("#model", model)


def send(page: Page, text: str) -> None:
    page.fill("#prompt", text)
    page.click("#send")


def content_of(page: Page, index: int = -1) -> str:
    return page.evaluate("i => [...document.querySelectorAll('.msg.assistant .content')].at(i).textContent", index)


def watch_answer_lengths(page: Page) -> None:
    """Record the length of the newest answer at every DOM change, to tell a
    streamed answer (many lengths) from one that arrived whole."""
    page.evaluate("""() => {
        window.__lengths = [];
        window.__observer?.disconnect();
        window.__observer = new MutationObserver(() => {
            const all = document.querySelectorAll('.msg.assistant .content');
            if (all.length) window.__lengths.push(all[all.length - 1].textContent.length);
        });
        window.__observer.observe(document.getElementById('log'), {subtree: true, childList: true,
                                                                   characterData: true});
    }""")


def streamed_lengths(page: Page) -> list[int]:
    return sorted({n for n in page.evaluate("window.__lengths") if n > 0})


def wait_done(page: Page, count: int) -> None:
    answers = page.locator(".msg.assistant")
    expect(answers).to_have_count(count)
    expect(answers.nth(count - 1)).to_have_attribute("data-status", "done", timeout=ANSWER_TIMEOUT_MS)
    expect(page.locator("body")).to_have_attribute("data-state", "idle")


MARKDOWN_PROBE = """# Title
Some **bold**, *italic*, `a < b` and [a link](https://example.com/x?a=1&b=2).
<script>window.pwned = 1</script>
<img src=x onerror="window.pwned = 1">
[bad](javascript:window.pwned=1) and [data](data:text/html,hi) and "quotes" & 'apostrophes'
- one
- two with `code`

1. first
2. second

```python
print("<b>hi</b>")
```"""

SUMMARY_JS = """src => {
    const div = document.createElement('div');
    document.body.append(div);  // attached, so an injected handler would really run
    div.innerHTML = window.llmq.renderMarkdown(src);
    const els = [...div.querySelectorAll('*')];
    const out = {
        tags: [...new Set(els.map(e => e.tagName.toLowerCase()))].sort(),
        attrs: [...new Set(els.flatMap(e => [...e.attributes].map(a => a.name)))].sort(),
        hrefs: [...div.querySelectorAll('a')].map(a => a.getAttribute('href')),
        code: [...div.querySelectorAll('pre code')].map(c => c.textContent),
        items: [...div.querySelectorAll('li')].map(li => li.textContent),
        text: div.textContent,
    };
    div.remove();
    return out;
}"""


def test_page_is_served_offline_and_renders_markdown_safely(stack: Stack, page: Page) -> None:
    index = httpx.get(f"{stack.base_url}/")
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    assert '<script src="/static/app.js"' in index.text
    for path, kind in (("/static/app.js", "javascript"), ("/static/style.css", "text/css")):
        r = httpx.get(f"{stack.base_url}{path}")
        assert r.status_code == 200 and kind in r.headers["content-type"], (path, r.headers)
    assert httpx.get(f"{stack.base_url}/static/nope.js").status_code == 404

    requested: list[str] = []
    page.on("request", lambda req: requested.append(req.url))
    open_chat(page, stack.base_url, stack.model)
    # Nothing from a CDN: every request the page makes stays on this server.
    assert requested and all(u.startswith(stack.base_url) for u in requested), requested
    # Only chat models are offered (the card's `kind`).
    options = page.eval_on_selector_all("#model option", "os => os.map(o => o.value)")
    assert options == [stack.model]

    page.wait_for_timeout(300)  # give an injected <img onerror> time to fire, if one got through
    out = page.evaluate(SUMMARY_JS, MARKDOWN_PROBE)
    page.wait_for_timeout(300)
    assert page.evaluate("window.pwned") is None
    assert set(out["tags"]) <= {"h1", "p", "strong", "em", "code", "a", "br", "ul", "ol", "li", "pre"}, out["tags"]
    assert {"strong", "em", "code", "a", "ul", "ol", "pre", "h1"} <= set(out["tags"])
    assert set(out["attrs"]) <= {"href", "target", "rel", "class"}, out["attrs"]
    assert out["hrefs"] == ["https://example.com/x?a=1&b=2"]
    assert out["code"] == ['print("<b>hi</b>")']
    assert out["items"] == ["one", "two with code", "first", "second"]
    # The raw HTML from "the model" is shown as text, not run.
    assert "<script>window.pwned = 1</script>" in out["text"]
    assert "[bad](javascript:window.pwned=1)" in out["text"]
    assert "\"quotes\" & 'apostrophes'" in out["text"]

    # Narrow screens: settings stack above the chat and nothing runs off the side.
    page.set_viewport_size({"width": 390, "height": 760})
    for sel in ("#model", "#prompt", "#send"):
        box = page.locator(sel).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390, (sel, box)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    page.screenshot(path=str(ARTIFACTS / "web-narrow.png"))


def test_chat_streams_regenerates_keeps_history_and_clears(stack: Stack, page: Page) -> None:
    open_chat(page, stack.base_url, stack.model)
    page.fill("#system", "You are a helpful assistant. Answer in one short sentence.")
    page.fill("#max-tokens", "24")
    page.fill("#temperature", "0.8")
    watch_answer_lengths(page)
    send(page, "What is the capital of France?")
    wait_done(page, 1)
    first = page.locator(".msg.assistant").first
    assert content_of(page).strip()
    assert len(streamed_lengths(page)) >= 2, "the answer should arrive in pieces, not at once"
    expect(first.locator(".meta")).to_contain_text("tokens")
    expect(page.locator(".msg.user .content")).to_have_text("What is the capital of France?")
    page.screenshot(path=str(ARTIFACTS / "web-answer.png"))

    # Regenerate: the old answer goes, a new one streams into its place.
    old = first.element_handle()
    watch_answer_lengths(page)
    page.click("#regenerate")
    page.wait_for_function("el => !el.isConnected", arg=old)
    wait_done(page, 1)
    regenerated = content_of(page)
    assert regenerated.strip()
    assert len(streamed_lengths(page)) >= 2
    expect(page.locator(".msg.user")).to_have_count(1)

    # A second turn sends the whole history, with the settings from the form.
    with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as sent:
        send(page, "And of Germany?")
    body = json.loads(sent.value.post_data or "{}")
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user"]
    assert body["messages"][0]["content"].startswith("You are a helpful assistant.")
    assert body["messages"][1]["content"] == "What is the capital of France?"
    assert body["messages"][2]["content"].strip()
    assert body["messages"][3]["content"] == "And of Germany?"
    assert body["model"] == stack.model and body["stream"] is True
    assert (body["max_tokens"], body["temperature"], body["top_p"]) == (24, 0.8, 1)
    wait_done(page, 2)
    assert content_of(page).strip()

    page.click("#clear")
    expect(page.locator(".msg")).to_have_count(0)
    expect(page.locator("#empty")).to_be_visible()

    # A prompt past the context (max_tokens too) is refused before any stream: 400, shown as such.
    page.fill("#max-tokens", "1000000")
    send(page, "Hi")
    error = page.locator(".msg.assistant.error")
    expect(error).to_contain_text("HTTP 400", timeout=ANSWER_TIMEOUT_MS)
    expect(error).to_contain_text("context_length_exceeded")
    expect(error).to_contain_text("lower Max tokens")
    expect(page.locator("#regenerate")).to_have_text("Retry")


def test_stop_aborts_a_long_answer_and_the_job_is_cancelled(stack: Stack, page: Page) -> None:
    open_chat(page, stack.base_url, stack.model)
    page.fill("#max-tokens", "400")
    with page.expect_response(lambda r: r.url.endswith("/v1/chat/completions")) as answered:
        send(page, "Write a long story about a dragon who learns to bake bread. Use at least ten paragraphs.")
    job_id = answered.value.headers["x-request-id"]
    page.wait_for_function(
        "() => (document.querySelector('.msg.assistant .content')?.textContent.length ?? 0) > 40",
        timeout=ANSWER_TIMEOUT_MS,
    )
    page.click("#stop")
    bubble = page.locator(".msg.assistant").first
    expect(bubble).to_have_attribute("data-status", "stopped")
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    stopped_at = len(content_of(page))
    time.sleep(2.5)
    assert len(content_of(page)) == stopped_at, "the text kept growing after Stop"
    expect(bubble.locator(".meta")).to_have_text("stopped")
    expect(page.locator("#status")).to_have_text("Stopped")
    expect(page.locator("#stop")).to_be_disabled()
    expect(page.locator("#send")).to_be_enabled()
    page.screenshot(path=str(ARTIFACTS / "web-stopped.png"))

    # The API saw the client go and cancelled the job (the mark workers check).
    r = redis.Redis.from_url(stack.redis_url)
    try:
        deadline = time.monotonic() + 10
        while not r.exists(Keys().cancelled(job_id)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert r.exists(Keys().cancelled(job_id)), f"job {job_id} was not cancelled"
    finally:
        r.close()

    # Ready again: the partial story stays in the history and a new question is answered.
    page.fill("#max-tokens", "8")
    with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as sent:
        send(page, "Thanks! Now just say hello.")
    roles = [m["role"] for m in json.loads(sent.value.post_data or "{}")["messages"]]
    assert roles == ["user", "assistant", "user"]
    wait_done(page, 2)
    assert content_of(page).strip()


def test_bad_api_key_is_shown_then_the_right_key_works(stack: Stack, page: Page) -> None:
    proc, base = start_api({**stack.env, "LLMQ_API_KEYS": "secret"}, name="api-web-keys")
    try:
        page.goto(f"{base}/")  # the page itself needs no key
        banner = page.locator("#banner")
        expect(banner).to_contain_text("You didn't provide an API key")
        expect(banner).to_contain_text("HTTP 401")

        page.fill("#api-key", "wrong-key")
        page.fill("#max-tokens", "16")
        with page.expect_response(
            lambda r: "/v1/models" in r.url and r.request.headers.get("authorization") == "Bearer wrong-key"
        ) as listed:
            send(page, "Hello!")
        assert listed.value.status == 401
        expect(banner).to_contain_text("Incorrect API key provided.")
        expect(banner).to_contain_text("invalid_api_key")
        expect(banner).to_contain_text("Check the API key")
        expect(page.locator(".msg")).to_have_count(0)  # nothing was sent; the text waits in the box
        expect(page.locator("#prompt")).to_have_value("Hello!")
        page.screenshot(path=str(ARTIFACTS / "web-error.png"))

        page.fill("#api-key", "secret")
        page.wait_for_selector(f"#model option[value='{stack.model}']", state="attached")
        expect(banner).to_be_hidden()
        with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as sent:
            page.click("#send")
        assert sent.value.headers.get("authorization") == "Bearer secret"
        wait_done(page, 1)
        assert content_of(page).strip()
        assert page.evaluate("localStorage.getItem('llmq.apiKey')") == "secret"

        # A wrong key once a model is picked: the chat request itself gets the 401.
        page.fill("#api-key", "wrong-again")
        with page.expect_response(lambda r: r.url.endswith("/v1/chat/completions")) as answered:
            send(page, "Hello again!")
        assert answered.value.status == 401
        error = page.locator(".msg.assistant.error")
        expect(error).to_contain_text("Incorrect API key provided.")
        expect(error).to_contain_text("HTTP 401")
        expect(page.locator("body")).to_have_attribute("data-state", "idle")
        page.screenshot(path=str(ARTIFACTS / "web-error-chat.png"))

        page.reload()  # the key is kept in this browser
        expect(page.locator("#api-key")).to_have_value("wrong-again")
    finally:
        proc.stop()


def test_page_shows_queue_full_no_worker_and_mid_stream_errors(stack: Stack, page: Page) -> None:
    """How the page renders error shapes that one small worker cannot be made
    to produce on cue. The bodies are the API's own (api.errors), served by
    Playwright's request router: a test of the page, not of the server."""
    open_chat(page, stack.base_url, stack.model)
    worker_gone = APIError(504, "The worker sent nothing for 120 s; the job was abandoned.", type="server_error",
                           code="worker_timeout")
    stream = "".join(f"data: {json.dumps(ev)}\n\n" for ev in (
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"index": 0, "delta": {"content": "Partial **answer**"}}]},
        worker_gone.body(),
    )) + "data: [DONE]\n\n"
    full = queue_full(stack.model, 256, 2)
    replies = iter([
        {"status": 429, "headers": {"Retry-After": "2"}, "json": full.body()},
        {"status": 503, "json": no_live_worker(stack.model).body()},
        {"status": 200, "headers": {"content-type": "text/event-stream"}, "body": stream},
    ])
    page.route("**/v1/chat/completions", lambda route: route.fulfill(**next(replies)))
    page.fill("#max-tokens", "8")

    send(page, "one")
    error = page.locator(".msg.assistant.error").last
    expect(error).to_contain_text(full.message)
    expect(error).to_contain_text("HTTP 429 · queue_full — Retry in 2 s.")

    page.click("#regenerate")  # "Retry": same question
    expect(page.locator(".msg.assistant")).to_have_count(1)
    expect(error).to_contain_text("No live worker serves the model")
    expect(error).to_contain_text("HTTP 503 · no_live_worker")

    page.click("#regenerate")
    expect(error).to_contain_text("The worker sent nothing for 120 s")
    expect(error).to_contain_text("worker_timeout · during the stream")
    expect(error.locator(".content strong")).to_have_text("answer")  # what came before the error stays
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    page.screenshot(path=str(ARTIFACTS / "web-stream-error.png"))
