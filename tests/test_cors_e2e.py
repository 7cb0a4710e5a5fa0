"""CORS for browser front ends on other origins (LLMQ_CORS_ALLOW_ORIGINS),
shown in a real headless Chromium: a page served by a tiny static server on
another port makes a streaming fetch to the API, and writes into its DOM
what came back. Preflights are checked with plain httpx."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlencode

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page

from api.jobs.lifecycle import JOB_ID_HEADER
from tests.browser import needs_chromium
from tests.conftest import Stack
from tests.procs import ARTIFACTS, Proc, start_api

FETCH_TIMEOUT_MS = 120_000

pytestmark = [
    pytest.mark.e2e,
    needs_chromium,
]

# The front end on the other origin: one streaming chat request, sent the way
# a browser client of an OpenAI API sends it (JSON body and a Bearer key, so
# the browser must ask first with a preflight), and its outcome in #result.
PROBE_PAGE = b"""<!doctype html>
<meta charset="utf-8"><title>CORS probe</title>
<pre id="result" data-state="running">running</pre>
<script>
(async () => {
  const q = new URLSearchParams(location.search);
  const out = document.getElementById("result");
  try {
    const res = await fetch(q.get("api") + "/v1/chat/completions", {
      method: "POST",
      headers: {"Content-Type": "application/json", "Authorization": "Bearer unused"},
      body: JSON.stringify({model: q.get("model"), max_tokens: 8, stream: true,
                            messages: [{role: "user", content: "Say hello."}]}),
    });
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buf = "", text = "", chunks = 0, done = false;
    for (;;) {
      const r = await reader.read();
      if (r.done) break;
      buf += decoder.decode(r.value, {stream: true});
      const lines = buf.split("\\n");
      buf = lines.pop();
      for (const line of lines) {
        if (!line.startsWith("data: ")) continue;
        if (line === "data: [DONE]") { done = true; continue; }
        const ev = JSON.parse(line.slice(6));
        chunks++;
        for (const c of ev.choices || []) text += (c.delta && c.delta.content) || "";
      }
    }
    out.dataset.requestId = res.headers.get("x-request-id") || "";
    out.dataset.chunks = chunks;
    out.dataset.text = text;
    out.textContent = `ok ${res.status} chunks=${chunks} done=${done} text=${text}`;
  } catch (e) {
    out.textContent = `error ${e.name}: ${e.message}`;
  }
  out.dataset.state = "finished";
})();
</script>
"""


class _ProbeHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(PROBE_PAGE)))
        self.end_headers()
        self.wfile.write(PROBE_PAGE)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def origins() -> Iterator[tuple[str, str]]:
    """Two static servers, i.e. two origins: the allowed one and a stranger."""
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), _ProbeHandler) for _ in range(2)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        allowed, stranger = (f"http://127.0.0.1:{s.server_address[1]}" for s in servers)
        yield allowed, stranger
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


@dataclass
class Apis:
    exact: str  # LLMQ_CORS_ALLOW_ORIGINS=<allowed origin>
    star: str  # LLMQ_CORS_ALLOW_ORIGINS=*
    closed: str  # the stack's API: no CORS setting


@pytest.fixture(scope="module")
def apis(stack: Stack, origins: tuple[str, str]) -> Iterator[Apis]:
    allowed, _ = origins
    procs: list[Proc] = []
    try:
        exact_proc, exact = start_api({**stack.env, "LLMQ_CORS_ALLOW_ORIGINS": allowed}, name="api-cors-exact")
        procs.append(exact_proc)
        star_proc, star = start_api({**stack.env, "LLMQ_CORS_ALLOW_ORIGINS": "*"}, name="api-cors-star")
        procs.append(star_proc)
        yield Apis(exact=exact, star=star, closed=stack.base_url)
    finally:
        for proc in procs:
            proc.stop()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context()
    pg = context.new_page()
    try:
        yield pg
    finally:
        context.close()


def probe(page: Page, origin: str, api: str, model: str) -> tuple[str, dict[str, str]]:
    """Load the probe page from ``origin`` against ``api``; what it wrote, and
    the console lines (Chromium explains a CORS refusal there)."""
    console: list[str] = []

    def note(msg: ConsoleMessage) -> None:
        console.append(msg.text)

    page.on("console", note)
    try:
        page.goto(f"{origin}/?{urlencode({'api': api, 'model': model})}")
        page.wait_for_selector("#result[data-state=finished]", timeout=FETCH_TIMEOUT_MS)
    finally:
        page.remove_listener("console", note)
    result = page.locator("#result")
    data = {k: result.get_attribute(f"data-{k}") or "" for k in ("request-id", "chunks", "text")}
    data["console"] = "\n".join(console)
    return result.inner_text(), data


def test_cross_origin_streaming_works_only_where_allowed(stack: Stack, apis: Apis, origins: tuple[str, str],
                                                         page: Page) -> None:
    allowed, stranger = origins
    for api in (apis.exact, apis.star):
        text, data = probe(page, allowed, api, stack.model)
        assert text.startswith("ok 200") and "done=true" in text, (api, text, data)
        assert int(data["chunks"]) >= 2 and data["text"].strip()
        # expose_headers: the job id header is readable across origins
        assert data["request-id"].startswith("chatcmpl-")
    page.screenshot(path=str(ARTIFACTS / "cors-allowed.png"))

    # No CORS settings: the browser refuses to hand the answer to another origin.
    text, data = probe(page, allowed, apis.closed, stack.model)
    assert text.startswith("error TypeError"), text
    assert "CORS" in data["console"], data["console"]
    # A listed origin is not "any origin": a page elsewhere is refused too...
    text, data = probe(page, stranger, apis.exact, stack.model)
    assert text.startswith("error TypeError"), text
    # ...unless the API says "*".
    text, _ = probe(page, stranger, apis.star, stack.model)
    assert text.startswith("ok 200"), text


PREFLIGHT_HEADERS = {"Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization, content-type"}


def _header_set(value: str | None) -> set[str]:
    return {v.strip().lower() for v in (value or "").split(",") if v.strip()}


def test_preflight_headers(stack: Stack, apis: Apis, origins: tuple[str, str]) -> None:
    allowed, stranger = origins
    url = "/v1/chat/completions"

    r = httpx.options(apis.exact + url, headers={"Origin": allowed, **PREFLIGHT_HEADERS})
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == allowed
    assert {"get", "post", "options"} <= _header_set(r.headers["access-control-allow-methods"])
    assert {"authorization", "content-type"} <= _header_set(r.headers["access-control-allow-headers"])
    assert "origin" in _header_set(r.headers.get("vary"))
    assert "access-control-allow-credentials" not in r.headers

    r = httpx.options(apis.exact + url, headers={"Origin": stranger, **PREFLIGHT_HEADERS})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers

    r = httpx.options(apis.exact + url, headers={"Origin": allowed, "Access-Control-Request-Method": "POST",
                                                 "Access-Control-Request-Headers": "x-not-allowed"})
    assert r.status_code == 400, "a header outside LLMQ_CORS_ALLOW_HEADERS must be refused"

    r = httpx.options(apis.star + url, headers={"Origin": stranger, **PREFLIGHT_HEADERS})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    assert {"authorization", "content-type"} <= _header_set(r.headers["access-control-allow-headers"])

    r = httpx.options(apis.closed + url, headers={"Origin": allowed, **PREFLIGHT_HEADERS})
    assert r.status_code == 405 and "access-control-allow-origin" not in r.headers

    # Simple requests: the allow-origin and expose headers ride on the answer itself.
    r = httpx.get(apis.exact + "/v1/models", headers={"Origin": allowed})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == allowed
    assert JOB_ID_HEADER in _header_set(r.headers.get("access-control-expose-headers"))
    r = httpx.get(apis.exact + "/v1/models", headers={"Origin": stranger})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    r = httpx.get(apis.closed + "/v1/models", headers={"Origin": allowed})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
