// llmq web chat: plain JavaScript, no build step, nothing from a CDN.
//
// Talks to this server's own OpenAI routes: GET /v1/models fills the model
// picker (chat models only), POST /v1/chat/completions with stream:true is
// read with fetch() and a ReadableStream reader, one `data: {...}` SSE line at
// a time. Stop aborts the fetch; the API cancels the job when its client goes.
//
// Safety: model output is never inserted as HTML. renderMarkdown() escapes
// the whole text first and only then adds the few tags it knows; links must
// be http(s). Everything else reaches the page through textContent.
"use strict";

(() => {
  // ------------------------------------------------------------ markdown

  const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  const escapeHtml = (s) => s.replace(/[&<>"']/g, (c) => ESCAPES[c]);

  // Placeholders keep code spans and links away from the emphasis rules.
  // NUL is removed from the input first, so it cannot be forged.
  const PH = "\u0000";
  // A URL in escaped text: no spaces, quotes are already entities, and the
  // only entity allowed inside is &amp; (query strings).
  const URL_BODY = "https?:\\/\\/(?:[^\\s&()<>\\u0000]|&amp;)+";
  const MD_LINK = new RegExp("\\[([^\\]\\u0000]+)\\]\\((" + URL_BODY + ")\\)", "g");
  const BARE_URL = new RegExp("\\b" + URL_BODY, "g");

  function link(url, label) {
    return `<a href="${url}" target="_blank" rel="noopener noreferrer nofollow">${label}</a>`;
  }

  function renderInline(text) {
    const saved = [];
    const keep = (html) => PH + (saved.push(html) - 1) + PH;
    text = text.replace(/`([^`\n]+)`/g, (_, code) => keep(`<code>${code}</code>`));
    text = text.replace(MD_LINK, (_, label, url) => keep(link(url, label)));
    text = text.replace(BARE_URL, (m) => {
      const tail = (m.match(/[.,;:!?*_]+$/) || [""])[0];
      const url = m.slice(0, m.length - tail.length);
      return keep(link(url, url)) + tail;
    });
    text = text
      .replace(/\*\*(?=\S)([\s\S]*?\S)\*\*/g, "<strong>$1</strong>")
      .replace(/(^|[^\w])__(?=\S)([\s\S]*?\S)__(?!\w)/g, "$1<strong>$2</strong>")
      .replace(/\*(?=[^\s*])([^*]*?[^\s*])\*/g, "<em>$1</em>")
      .replace(/(^|[^\w])_(?=[^\s_])([^_]*?[^\s_])_(?!\w)/g, "$1<em>$2</em>");
    return text.replace(/\u0000(\d+)\u0000/g, (_, i) => saved[Number(i)]).replace(/\n/g, "<br>");
  }

  const FENCE = /^\s{0,3}(```|~~~)\s*([\w.+#-]*)/;
  const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
  const RULE = /^\s{0,3}([-*_])(\s*\1){2,}\s*$/;
  const UL_ITEM = /^\s*[-*+]\s+(.*)$/;
  const OL_ITEM = /^\s*(\d{1,9})[.)]\s+(.*)$/;
  const QUOTE = /^\s{0,3}&gt;\s?(.*)$/; // lines are escaped already
  const startsBlock = (l) => FENCE.test(l) || HEADING.test(l) || UL_ITEM.test(l) || OL_ITEM.test(l) || QUOTE.test(l);

  // Block structure over lines that are already HTML-escaped.
  function blocks(lines) {
    const out = [];
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      let m;
      if ((m = line.match(FENCE))) {
        const fence = m[1];
        const body = [];
        i++;
        while (i < lines.length && !lines[i].trim().startsWith(fence)) body.push(lines[i++]);
        i++; // the closing fence; while streaming there may be none yet
        const cls = m[2] ? ` class="language-${m[2]}"` : "";
        out.push(`<pre><code${cls}>${body.join("\n")}</code></pre>`);
      } else if (!line.trim()) {
        i++;
      } else if ((m = line.match(HEADING))) {
        const n = m[1].length;
        out.push(`<h${n}>${renderInline(m[2])}</h${n}>`);
        i++;
      } else if (RULE.test(line)) {
        out.push("<hr>");
        i++;
      } else if (UL_ITEM.test(line) || OL_ITEM.test(line)) {
        const ordered = OL_ITEM.test(line);
        const item = ordered ? OL_ITEM : UL_ITEM;
        const start = ordered ? parseInt(line.match(OL_ITEM)[1], 10) : 1;
        const items = [];
        while (i < lines.length) {
          const l = lines[i];
          const im = l.match(item);
          if (im) {
            items.push(ordered ? im[2] : im[1]);
            i++;
          } else if (!l.trim()) {
            let j = i;
            while (j < lines.length && !lines[j].trim()) j++;
            if (j < lines.length && item.test(lines[j])) i = j;
            else break;
          } else if (/^\s+\S/.test(l) && !startsBlock(l)) {
            items[items.length - 1] += "\n" + l.trim(); // an indented continuation line
            i++;
          } else {
            break;
          }
        }
        const tag = ordered ? "ol" : "ul";
        const attr = ordered && start !== 1 ? ` start="${start}"` : "";
        out.push(`<${tag}${attr}>${items.map((t) => `<li>${renderInline(t)}</li>`).join("")}</${tag}>`);
      } else if (QUOTE.test(line)) {
        const inner = [];
        while (i < lines.length && QUOTE.test(lines[i])) inner.push(lines[i++].match(QUOTE)[1]);
        out.push(`<blockquote>${blocks(inner)}</blockquote>`);
      } else {
        const para = [];
        while (i < lines.length && lines[i].trim() && !startsBlock(lines[i]) && !RULE.test(lines[i])) {
          para.push(lines[i++].trim());
        }
        out.push(`<p>${renderInline(para.join("\n"))}</p>`);
      }
    }
    return out.join("\n");
  }

  function renderMarkdown(src) {
    const clean = String(src).replace(/\u0000/g, "").replace(/\r\n?/g, "\n");
    return blocks(escapeHtml(clean).split("\n"));
  }

  // ------------------------------------------------------------ API

  class ApiError extends Error {
    constructor(message, { status = null, code = null, type = null, retryAfter = null, midStream = false } = {}) {
      super(message);
      Object.assign(this, { status, code, type, retryAfter, midStream });
    }
  }

  // OpenAI-shaped bodies: {"error": {"message", "type", "param", "code"}}.
  async function errorFromResponse(res) {
    let body = null;
    try {
      body = await res.json();
    } catch (_) {
      /* not JSON: fall back to the status line */
    }
    const e = body && body.error;
    const message =
      (e && typeof e === "object" && e.message) ||
      (typeof e === "string" && e) ||
      (body && typeof body.detail === "string" && body.detail) ||
      `The server answered ${res.status} ${res.statusText}`.trim();
    return new ApiError(message, {
      status: res.status,
      code: e && e.code,
      type: e && e.type,
      retryAfter: res.headers.get("retry-after"),
    });
  }

  // Yields the payload of each `data:` line of a text/event-stream body.
  async function* sseData(res) {
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true });
        let nl;
        while ((nl = buf.indexOf("\n")) >= 0) {
          const line = buf.slice(0, nl).replace(/\r$/, "");
          buf = buf.slice(nl + 1);
          if (line.startsWith("data:")) yield line.slice(5).replace(/^ /, "");
        }
      }
      const last = (buf + decoder.decode()).replace(/\r$/, "");
      if (last.startsWith("data:")) yield last.slice(5).replace(/^ /, "");
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  // ------------------------------------------------------------ page state

  const $ = (id) => document.getElementById(id);
  const ui = {
    model: $("model"), refresh: $("refresh-models"), apiKey: $("api-key"), system: $("system"),
    temperature: $("temperature"), topP: $("top-p"), maxTokens: $("max-tokens"),
    banner: $("banner"), log: $("log"), empty: $("empty"), composer: $("composer"), prompt: $("prompt"),
    status: $("status"), send: $("send"), stop: $("stop"), regenerate: $("regenerate"), clear: $("clear"),
  };

  const store = {
    get(key, fallback = "") {
      try {
        const v = localStorage.getItem("llmq." + key);
        return v === null ? fallback : v;
      } catch (_) {
        return fallback;
      }
    },
    set(key, value) {
      try {
        localStorage.setItem("llmq." + key, value);
      } catch (_) {
        /* private mode: settings just do not persist */
      }
    },
  };

  const turns = []; // the conversation sent to the model: {role, content, el}
  let current = null; // AbortController of the running request
  let busy = false;
  let epoch = 0; // bumped by Clear, so a request that ends later leaves the new chat alone

  function authHeaders() {
    const key = ui.apiKey.value.trim();
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  const number = (v) => {
    const x = parseFloat(v);
    return Number.isFinite(x) ? x : null;
  };

  function setStatus(text) {
    ui.status.textContent = text;
  }

  function updateButtons() {
    const last = turns[turns.length - 1];
    document.body.dataset.state = busy ? "busy" : "idle";
    ui.send.disabled = busy;
    ui.stop.disabled = !busy;
    ui.regenerate.disabled = busy || !last;
    ui.regenerate.textContent = last && last.role === "user" ? "Retry" : "Regenerate";
    ui.empty.hidden = ui.log.querySelector(".msg") !== null;
  }

  function setBusy(value, status) {
    busy = value;
    if (status) setStatus(status);
    updateButtons();
  }

  function hintFor(err) {
    if (err.status === 401) return "Check the API key in Settings.";
    if (err.status === 429) return err.retryAfter ? `Retry in ${err.retryAfter} s.` : "Retry in a moment.";
    if (err.status === 503) return "Start a worker for this model, or pick another one.";
    if (err.code === "context_length_exceeded") return "Clear the conversation or lower Max tokens.";
    if (err.code === "model_not_found") return "Reload the model list.";
    return "";
  }

  // A readable error: the server's message, then status, code and a hint.
  function errorNode(err, title) {
    const box = document.createElement("div");
    box.className = "error-box";
    const head = document.createElement("strong");
    head.textContent = title ? `${title}: ` : "Error: ";
    const msg = document.createElement("span");
    msg.className = "error-message";
    msg.textContent = err instanceof ApiError ? err.message : `Cannot reach the API (${err.message || err}).`;
    box.append(head, msg);
    const facts = [];
    if (err.status) facts.push(`HTTP ${err.status}`);
    if (err.code || err.type) facts.push(err.code || err.type);
    if (err.midStream) facts.push("during the stream");
    const hint = err instanceof ApiError ? hintFor(err) : "Is the server up?";
    if (facts.length || hint) {
      const small = document.createElement("div");
      small.className = "error-meta";
      small.textContent = [facts.join(" · "), hint].filter(Boolean).join(" — ");
      box.append(small);
    }
    return box;
  }

  function showBanner(err, title) {
    ui.banner.replaceChildren(errorNode(err, title));
    ui.banner.hidden = false;
  }

  function showNotice(text) {
    ui.banner.textContent = text;
    ui.banner.hidden = false;
  }

  function hideBanner() {
    ui.banner.hidden = true;
    ui.banner.replaceChildren();
  }

  // ------------------------------------------------------------ models

  let modelsRequest = 0;

  async function loadModels() {
    const mine = ++modelsRequest;
    ui.refresh.disabled = true;
    try {
      const res = await fetch("/v1/models", { headers: authHeaders(), cache: "no-store" });
      if (!res.ok) throw await errorFromResponse(res);
      const body = await res.json();
      if (mine !== modelsRequest) return ui.model.value !== "";
      const chat = (body.data || []).filter((m) => (m.kind || "chat") === "chat");
      const wanted = ui.model.value || store.get("model");
      ui.model.replaceChildren(
        ...chat.map((m) => {
          const opt = document.createElement("option");
          opt.value = m.id;
          const extra = [];
          if (m.workers) extra.push(`${m.workers} worker${m.workers === 1 ? "" : "s"}`);
          if (m.context_length) extra.push(`ctx ${m.context_length}`);
          opt.textContent = extra.length ? `${m.id} (${extra.join(", ")})` : m.id;
          return opt;
        }),
      );
      if (chat.some((m) => m.id === wanted)) ui.model.value = wanted;
      if (chat.length) hideBanner();
      else showNotice("No chat model is served right now: start a worker (llmq worker --model-path ...), then reload.");
      return chat.length > 0;
    } catch (err) {
      // Keep the list we had: a key typo should not wipe the picker.
      if (mine === modelsRequest) showBanner(err, "Cannot list the models");
      return false;
    } finally {
      if (mine === modelsRequest) ui.refresh.disabled = false;
    }
  }

  // ------------------------------------------------------------ messages

  function addBubble(role, label) {
    const el = document.createElement("div");
    el.className = `msg ${role}`;
    const who = document.createElement("div");
    who.className = "who";
    who.textContent = label || role;
    const content = document.createElement("div");
    content.className = role === "assistant" ? "content md" : "content plain";
    const meta = document.createElement("div");
    meta.className = "meta";
    el.append(who, content, meta);
    ui.log.append(el);
    updateButtons();
    return el;
  }

  const part = (el, cls) => el.querySelector(`.${cls}`);

  function nearBottom() {
    const s = document.scrollingElement;
    return ui.log.scrollHeight - ui.log.scrollTop - ui.log.clientHeight < 80 ||
      s.scrollHeight - s.scrollTop - s.clientHeight < 80;
  }

  function scrollDown() {
    ui.log.scrollTop = ui.log.scrollHeight;
  }

  function removeAfter(el) {
    while (el && el.nextElementSibling) el.nextElementSibling.remove();
  }

  // A user turn whose answer failed leaves the history when a new message
  // is sent (it stays on screen, dimmed); Retry resends it instead.
  function dropUnanswered() {
    const last = turns[turns.length - 1];
    if (last && last.role === "user") {
      turns.pop();
      last.el.classList.add("unanswered");
      part(last.el, "meta").textContent = "not answered";
    }
  }

  function requestBody() {
    const messages = [];
    const system = ui.system.value.trim();
    if (system) messages.push({ role: "system", content: system });
    for (const t of turns) messages.push({ role: t.role, content: t.content });
    const body = { model: ui.model.value, messages, stream: true, stream_options: { include_usage: true } };
    const temperature = number(ui.temperature.value);
    const topP = number(ui.topP.value);
    const maxTokens = number(ui.maxTokens.value);
    if (temperature !== null) body.temperature = temperature;
    if (topP !== null) body.top_p = topP;
    if (maxTokens !== null) body.max_tokens = Math.max(1, Math.round(maxTokens));
    return body;
  }

  async function generate() {
    const myEpoch = epoch;
    const body = requestBody();
    const bubble = addBubble("assistant", `assistant · ${body.model}`);
    const content = part(bubble, "content");
    bubble.dataset.status = "waiting";
    const controller = new AbortController();
    current = controller;
    setBusy(true, "Waiting for a worker…");
    scrollDown();

    let text = "";
    let finish = null;
    let usage = null;
    let firstAt = null;
    let painted = true;
    const paint = () => {
      if (painted) return;
      painted = true;
      const stick = nearBottom();
      content.innerHTML = renderMarkdown(text); // escaped first: see renderMarkdown
      if (stick) scrollDown();
    };
    const schedulePaint = () => {
      if (!painted) return;
      painted = false;
      requestAnimationFrame(paint);
    };

    try {
      const res = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "text/event-stream", ...authHeaders() },
        body: JSON.stringify(body),
        signal: controller.signal,
      });
      if (!res.ok) throw await errorFromResponse(res);
      let sawDone = false;
      for await (const data of sseData(res)) {
        if (data === "[DONE]") {
          sawDone = true;
          break;
        }
        let ev;
        try {
          ev = JSON.parse(data);
        } catch (_) {
          continue;
        }
        if (ev.error) {
          const e = ev.error;
          throw new ApiError(e.message || "The answer failed.", { status: e.status || null, code: e.code,
            type: e.type, midStream: true });
        }
        for (const choice of ev.choices || []) {
          const piece = choice.delta && choice.delta.content;
          if (piece) {
            if (firstAt === null) {
              firstAt = performance.now();
              bubble.dataset.status = "streaming";
              setStatus("Streaming…");
            }
            text += piece;
            schedulePaint();
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
        if (ev.usage) usage = ev.usage;
      }
      if (!sawDone) throw new ApiError("The connection closed before the answer was complete.");
      painted = false;
      paint();
      if (myEpoch !== epoch) return;
      const facts = [];
      if (usage) {
        facts.push(`${usage.completion_tokens} tokens`);
        const secs = firstAt === null ? 0 : (performance.now() - firstAt) / 1000;
        if (secs > 0 && usage.completion_tokens > 1) facts.push(`${((usage.completion_tokens - 1) / secs).toFixed(1)} tok/s`);
      }
      if (finish === "length") facts.push("cut at max tokens");
      if (!text) content.textContent = "(empty answer)";
      part(bubble, "meta").textContent = facts.join(" · ");
      bubble.dataset.status = "done";
      turns.push({ role: "assistant", content: text, el: bubble });
      setStatus("Ready");
    } catch (err) {
      painted = false;
      paint();
      if (myEpoch !== epoch) return;
      if (controller.signal.aborted) {
        // Keep what arrived: it is part of the conversation, as in other chat UIs.
        if (text) turns.push({ role: "assistant", content: text, el: bubble });
        part(bubble, "meta").textContent = text ? "stopped" : "stopped before any text";
        bubble.dataset.status = "stopped";
        setStatus("Stopped");
      } else {
        bubble.classList.add("error");
        bubble.dataset.status = "error";
        bubble.append(errorNode(err, text ? "The answer broke off" : "Error"));
        setStatus("Error");
      }
    } finally {
      if (current === controller) current = null;
      if (myEpoch === epoch) setBusy(false);
      ui.prompt.focus();
    }
  }

  async function send(event) {
    event.preventDefault();
    const text = ui.prompt.value.trim();
    if (busy || !text) return;
    setBusy(true, "Loading models…");
    try {
      if (!ui.model.value && !(await loadModels())) {
        setStatus("Pick a model");
        return;
      }
    } finally {
      setBusy(false);
    }
    dropUnanswered();
    ui.prompt.value = "";
    const el = addBubble("user", "you");
    part(el, "content").textContent = text;
    turns.push({ role: "user", content: text, el });
    await generate();
  }

  function regenerate() {
    if (busy) return;
    const last = turns[turns.length - 1];
    if (!last) return;
    if (last.role === "assistant") {
      turns.pop();
      last.el.remove();
    }
    const user = turns[turns.length - 1];
    if (!user || user.role !== "user") return;
    user.el.classList.remove("unanswered");
    removeAfter(user.el); // error or stopped bubbles after it
    generate();
  }

  function stop() {
    if (current) current.abort();
  }

  function clear() {
    stop();
    epoch++;
    turns.length = 0;
    for (const el of ui.log.querySelectorAll(".msg")) el.remove();
    setBusy(false, "Ready");
    ui.prompt.focus();
  }

  // ------------------------------------------------------------ wiring

  function persist(input, key) {
    input.value = store.get(key, input.value);
    input.addEventListener("input", () => store.set(key, input.value));
  }

  function init() {
    persist(ui.apiKey, "apiKey");
    persist(ui.system, "system");
    persist(ui.temperature, "temperature");
    persist(ui.topP, "topP");
    persist(ui.maxTokens, "maxTokens");
    let keyTimer = null;
    ui.apiKey.addEventListener("input", () => {
      clearTimeout(keyTimer);
      keyTimer = setTimeout(loadModels, 300);
    });
    ui.model.addEventListener("change", () => store.set("model", ui.model.value));
    ui.refresh.addEventListener("click", loadModels);
    $("settings").addEventListener("submit", (e) => e.preventDefault());
    ui.composer.addEventListener("submit", send);
    ui.prompt.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        ui.composer.requestSubmit();
      }
    });
    ui.stop.addEventListener("click", stop);
    ui.regenerate.addEventListener("click", regenerate);
    ui.clear.addEventListener("click", clear);
    if (window.matchMedia("(max-width: 760px)").matches) $("settings-box").open = false;
    updateButtons();
    loadModels();
  }

  window.llmq = { renderMarkdown, escapeHtml };
  init();
})();
