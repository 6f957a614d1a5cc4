// Skiff playground: a chat page over the public API (/v1/models, /v1/chat/completions, /metrics).
// Plain browser JavaScript, no dependencies. The API key, when the server wants one, lives in this
// tab's sessionStorage only and goes out as "Authorization: Bearer <key>".
"use strict";

const KEY_STORE = "skiff.apiKey";
const METRICS_EVERY_MS = 1000;
const $ = (id) => document.getElementById(id);

const state = {
  messages: [],   // the conversation sent with each request (system prompt added at send time)
  ctrl: null,     // AbortController of the request in flight, if any
};

// ---------------------------------------------------------------------------- API

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? { Authorization: "Bearer " + key } : {};
}

async function errorMessage(res) {
  try {
    const body = await res.json();
    return (body.error && body.error.message) || JSON.stringify(body);
  } catch (_) {
    return `${res.status} ${res.statusText}`;
  }
}

// fetch with the key; a non-2xx answer becomes an ApiError carrying the server's message, and a 401
// also asks the user for a key.
async function api(path, init = {}) {
  const res = await fetch(path, { ...init, headers: { ...(init.headers || {}), ...authHeaders() } });
  if (!res.ok) {
    const message = await errorMessage(res);
    if (res.status === 401) askForKey(message);
    throw new ApiError(res.status, message);
  }
  return res;
}

// The `data:` payloads of an OpenAI server-sent-event stream, parsed, up to [DONE].
async function* sseEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer = (buffer + decoder.decode(value, { stream: true })).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

// ---------------------------------------------------------------------------- API key

function askForKey(serverMessage) {
  const hadKey = sessionStorage.getItem(KEY_STORE) !== null;
  sessionStorage.removeItem(KEY_STORE);
  const error = $("key-error");
  error.hidden = !hadKey;
  error.textContent = hadKey ? "The server refused this key: " + serverMessage : "";
  const dialog = $("key-dialog");
  if (!dialog.open) dialog.showModal();
  $("key-input").select();
}

function onKeySubmit(event) {
  event.preventDefault();
  const key = $("key-input").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_STORE, key);
  $("key-dialog").close();
  loadModels();
}

// ---------------------------------------------------------------------------- models and metrics

async function loadModels() {
  const select = $("model");
  try {
    const res = await api("/v1/models");
    const models = (await res.json()).data || [];
    const previous = select.value;
    select.replaceChildren(...models.map((m) => new Option(m.id, m.id)));
    if (models.some((m) => m.id === previous)) select.value = previous;
  } catch (e) {
    if (e.status !== 401) showBanner("Could not list models: " + e.message);
  }
}

// Prometheus text format -> {metric name: [values of its samples]}.
function parseMetrics(text) {
  const out = {};
  for (const line of text.split("\n")) {
    if (!line || line[0] === "#") continue;
    const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})?\s+(\S+)/);
    if (m) (out[m[1]] = out[m[1]] || []).push(Number(m[2]));
  }
  return out;
}

const sum = (xs) => (xs && xs.length ? xs.reduce((a, b) => a + b, 0) : null);
const mean = (xs) => (xs && xs.length ? sum(xs) / xs.length : null);
const percent = (x) => (x === null ? "–" : (100 * x).toFixed(x > 0 && x < 0.1 ? 1 : 0) + "%");
const count = (x) => (x === null ? "–" : String(Math.round(x)));

async function pollMetrics() {
  const strip = $("status");
  try {
    // /metrics is open on a plain Skiff server; a proxy may put it behind the key, so send it too.
    const res = await fetch("/metrics", { headers: authHeaders() });
    if (!res.ok) throw new Error(res.status === 401 ? "/metrics needs the API key" : `/metrics: ${res.status}`);
    const m = parseMetrics(await res.text());
    $("st-running").textContent = count(sum(m["skiff:num_running_requests"]));
    $("st-waiting").textContent = count(sum(m["skiff:num_waiting_requests"]));
    $("st-kv").textContent = percent(mean(m["skiff:kv_cache_usage"]));
    $("st-hit").textContent = percent(mean(m["skiff:prefix_cache_hit_rate"]));
    strip.classList.remove("stale");
    strip.title = "From /metrics, every second";
  } catch (e) {
    strip.classList.add("stale");
    strip.title = e.message;
  } finally {
    setTimeout(pollMetrics, document.hidden ? 5 * METRICS_EVERY_MS : METRICS_EVERY_MS);
  }
}

// ---------------------------------------------------------------------------- Markdown

function escapeHtml(s) {
  return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
    .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
}

// Inline spans of already-escaped text: `code`, **bold**, *italic* / _italic_.
function inline(s) {
  const codes = [];
  s = s.replace(/`([^`\n]+)`/g, (_, c) => `\u0000${codes.push(c) - 1}\u0000`);
  s = s.replace(/\*\*(\S(?:[^*\n]*?\S)?)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^\w])__(\S(?:[^_\n]*?\S)?)__(?!\w)/g, "$1<strong>$2</strong>")
    .replace(/(^|[^*\w])\*(\S(?:[^*\n]*?\S)?)\*(?![*\w])/g, "$1<em>$2</em>")
    .replace(/(^|[^_\w])_(\S(?:[^_\n]*?\S)?)_(?![_\w])/g, "$1<em>$2</em>");
  return s.replace(/\u0000(\d+)\u0000/g, (_, i) => `<code>${codes[Number(i)]}</code>`);
}

// A small, safe Markdown subset: the text is HTML-escaped first, so the only markup in the result is
// the tags added here. Fenced code blocks (an unclosed fence runs to the end, as while streaming),
// headings, bullet and numbered lists, paragraphs with line breaks, and the inline spans above.
function renderMarkdown(source) {
  const lines = escapeHtml(source.replace(/\u0000/g, "")).split("\n");
  const out = [];
  let para = [];
  let list = null;
  const flushPara = () => {
    if (para.length) out.push(`<p>${inline(para.join("\n")).replace(/\n/g, "<br>")}</p>`);
    para = [];
  };
  const flushList = () => {
    if (!list) return;
    const start = list.type === "ol" && list.start !== 1 ? ` start="${list.start}"` : "";
    out.push(`<${list.type}${start}>${list.items.map((i) => `<li>${inline(i)}</li>`).join("")}</${list.type}>`);
    list = null;
  };
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const fence = line.match(/^\s*```\s*([\w+#.-]*)\s*$/);
    if (fence) {
      flushPara(); flushList();
      const code = [];
      for (i++; i < lines.length && !/^\s*```\s*$/.test(lines[i]); i++) code.push(lines[i]);
      const lang = fence[1] ? ` data-lang="${fence[1]}"` : "";
      out.push(`<pre${lang}><code>${code.join("\n")}</code></pre>`);
      continue;
    }
    if (!line.trim()) { flushPara(); flushList(); continue; }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    if (heading) {
      flushPara(); flushList();
      const level = Math.min(heading[1].length + 2, 6);  // keep replies' headings below the page's
      out.push(`<h${level}>${inline(heading[2])}</h${level}>`);
      continue;
    }
    const bullet = line.match(/^\s*[-*+]\s+(.*)$/);
    const numbered = line.match(/^\s*(\d{1,9})[.)]\s+(.*)$/);
    if (bullet || numbered) {
      flushPara();
      const type = bullet ? "ul" : "ol";
      if (!list || list.type !== type) {
        flushList();
        list = { type, items: [], start: numbered ? Number(numbered[1]) : 1 };
      }
      list.items.push(bullet ? bullet[1] : numbered[2]);
      continue;
    }
    if (list && /^\s+\S/.test(line)) {  // an indented line continues the list item
      list.items[list.items.length - 1] += " " + line.trim();
      continue;
    }
    flushList();
    para.push(line);
  }
  flushPara(); flushList();
  return out.join("");
}

// ---------------------------------------------------------------------------- chat

function readParams() {
  const params = {};
  for (const id of ["temperature", "top_p", "max_tokens", "seed"]) {  // empty: the server's default
    const raw = $(id).value.trim();
    if (raw !== "") params[id] = Number(raw);
  }
  const schemaText = $("schema").value.trim();
  const schemaError = $("schema-error");
  schemaError.hidden = true;
  if (schemaText) {
    try {
      const schema = JSON.parse(schemaText);
      params.response_format = { type: "json_schema", json_schema: { name: "playground", schema, strict: true } };
    } catch (e) {
      schemaError.textContent = "The JSON schema is not valid JSON: " + e.message;
      schemaError.hidden = false;
      $("settings").open = true;
      return null;
    }
  }
  return params;
}

function addMessage(role) {
  $("empty").hidden = true;
  const el = document.createElement("article");
  el.className = "msg " + role;
  const body = document.createElement("div");
  body.className = "body";
  el.append(body);
  $("log").append(el);
  return el;
}

function nearBottom(log) {
  return log.scrollHeight - log.scrollTop - log.clientHeight < 80;
}

function scrollDown(force) {
  const log = $("log");
  if (force || nearBottom(log)) log.scrollTop = log.scrollHeight;
}

function renderReply(el, text, structured) {
  const body = el.querySelector(".body");
  if (structured) {
    let shown = text;
    try { shown = JSON.stringify(JSON.parse(text), null, 2); } catch (_) { /* partial JSON while streaming */ }
    body.innerHTML = `<pre><code>${escapeHtml(shown)}</code></pre>`;
  } else {
    body.innerHTML = renderMarkdown(text);
  }
}

function setFacts(el, parts, kind) {
  let facts = el.querySelector(".facts");
  if (!facts) {
    facts = document.createElement("div");
    el.append(facts);
  }
  facts.className = "facts" + (kind ? " " + kind : "");
  facts.replaceChildren(...parts.map((p) => {
    const span = document.createElement("span");
    span.textContent = p;
    return span;
  }));
}

function replyFacts(t) {
  const parts = [];
  const u = t.usage;
  const tokens = u ? u.completion_tokens : null;
  if (tokens !== null) parts.push(`${tokens} tokens`);
  if (t.first !== null) parts.push(`TTFT ${Math.round(t.first - t.start)} ms`);
  // Decode speed: tokens after the first over the time they took (TTFT is reported on its own).
  if (tokens !== null && tokens > 1 && t.last > t.first) {
    parts.push(`${((tokens - 1) / ((t.last - t.first) / 1000)).toFixed(1)} tok/s`);
  }
  if (u) {
    const cached = (u.prompt_tokens_details && u.prompt_tokens_details.cached_tokens) || 0;
    parts.push(`${cached}/${u.prompt_tokens} prompt tokens cached`);
  }
  if (t.finish) parts.push(`finish: ${t.finish}`);
  return parts;
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  document.body.classList.toggle("busy", busy);
}

async function send() {
  const input = $("input");
  const text = input.value.trim();
  if (!text || state.ctrl) return;
  const params = readParams();
  if (params === null) return;
  const model = $("model").value;
  if (!model) {
    await loadModels();
    if (!$("model").value) return;
  }
  input.value = "";

  const user = addMessage("user");
  user.querySelector(".body").textContent = text;
  state.messages.push({ role: "user", content: text });
  const reply = addMessage("assistant");
  reply.classList.add("pending");
  scrollDown(true);

  const system = $("system").value.trim();
  const messages = (system ? [{ role: "system", content: system }] : []).concat(state.messages);
  const body = { model: $("model").value, messages, stream: true, stream_options: { include_usage: true }, ...params };
  const structured = "response_format" in params;
  const ctrl = new AbortController();
  state.ctrl = ctrl;
  setBusy(true);

  const t = { start: performance.now(), first: null, last: null, usage: null, finish: null, chunks: 0 };
  let content = "";
  let frame = 0;
  const paint = () => {
    frame = 0;
    renderReply(reply, content, structured);
    scrollDown(false);
  };
  try {
    const res = await api("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body), signal: ctrl.signal,
    });
    for await (const event of sseEvents(res.body)) {
      if (event.error) throw new ApiError(event.error.code || 500, event.error.message);
      if (event.usage) t.usage = event.usage;
      for (const choice of event.choices || []) {
        const piece = choice.delta && choice.delta.content;
        if (piece) {
          const now = performance.now();
          if (t.first === null) t.first = now;
          t.last = now;
          t.chunks++;
          content += piece;
          reply.classList.remove("pending");
          if (!frame) frame = requestAnimationFrame(paint);
        }
        if (choice.finish_reason) t.finish = choice.finish_reason;
      }
    }
    if (frame) cancelAnimationFrame(frame);
    paint();
    state.messages.push({ role: "assistant", content });
    setFacts(reply, replyFacts(t));
  } catch (e) {
    if (frame) cancelAnimationFrame(frame);
    reply.classList.remove("pending");
    if (e.name === "AbortError") {
      paint();
      // Keep what arrived: the next turn continues from the partial reply, as a user would expect.
      if (content) state.messages.push({ role: "assistant", content });
      else state.messages.pop();
      const parts = [`stopped after ${t.chunks} chunks`];
      if (t.first !== null) parts.push(`TTFT ${Math.round(t.first - t.start)} ms`);
      setFacts(reply, parts, "stopped");
    } else {
      paint();
      if (!content) state.messages.pop();  // a refused request leaves no turn behind
      const status = e instanceof ApiError ? `${e.status}: ` : "";
      setFacts(reply, ["Error " + status + e.message], "error");
    }
  } finally {
    if (state.ctrl === ctrl) state.ctrl = null;
    setBusy(state.ctrl !== null);
    scrollDown(false);
  }
}

function stop() {
  if (state.ctrl) state.ctrl.abort();
}

function newChat() {
  stop();
  state.messages = [];
  const log = $("log");
  log.replaceChildren($("empty"));
  $("empty").hidden = false;
  $("input").focus();
}

function showBanner(text) {
  const el = addMessage("notice");
  el.querySelector(".body").textContent = text;
}

// ---------------------------------------------------------------------------- wiring

function init() {
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newChat);
  $("key-form").addEventListener("submit", onKeySubmit);
  if (window.matchMedia("(max-width: 760px)").matches) $("settings").open = false;
  loadModels();
  pollMetrics();
  $("input").focus();
}

document.addEventListener("DOMContentLoaded", init);
