// The Baton web console: sessions, a live session view, operations. Built on baton.js only.
// Test hooks: data-testid attributes (see the project's docs); never rely on classes.

import { Baton, BatonError, readToken } from "/console/baton.js";

const STORE_KEY = "baton.credential";
const app = document.getElementById("app");
const TRANSCRIPT_PAGE = 200;
const EVENT_LOG_MAX = 500;
// The API's session ids: 1–128 of [A-Za-z0-9._:-]. Browsers compile `pattern` with the `v`
// flag, where a `-` in a class must be escaped (unescaped, the pattern is invalid and ignored).
const SESSION_ID_PATTERN = "[A-Za-z0-9._:\\-]{1,128}";

let baton = new Baton({ credential: sessionStorage.getItem(STORE_KEY) });
let authOn = false;
let current = null; // the open session view, to close on navigation

function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === false || value === null || value === undefined) continue;
    if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else if (name === "testid") element.dataset.testid = value;
    else element.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) element.append(child);
  }
  return element;
}

// A BatonError's message already reads "code: message".
function errorText(error) {
  return error instanceof BatonError ? error.message : String(error);
}

async function start() {
  document.getElementById("sign-out").onclick = () => {
    sessionStorage.removeItem(STORE_KEY);
    baton = new Baton({ credential: null });
    location.hash = "#/";
    start();
  };
  try {
    await baton.agents();
  } catch (error) {
    if (error instanceof BatonError && error.status === 401) {
      authOn = true;
      return signIn(baton.credential ? errorText(error) : "");
    }
    app.replaceChildren(h("p", { testid: "error" }, errorText(error)));
    return;
  }
  authOn = authOn || !!baton.credential;
  const token = readToken(baton.credential);
  const who = document.getElementById("who");
  const opsLink = document.getElementById("ops-link");
  opsLink.hidden = true;
  if (token) {
    who.textContent = `token for ${token.session} (${token.scope})`;
  } else {
    who.textContent = baton.credential ? "signed in with a key" : "";
    // Who the caller is, the server does not say; the operations (`/metrics`) answer an
    // admin key, or anyone with access control off, and refuse a tenant key (403).
    seesOperations().then((admin) => {
      opsLink.hidden = !admin;
      if (baton.credential) who.textContent = `signed in with ${admin ? "an admin key" : "a tenant key"}`;
    });
  }
  document.getElementById("sign-out").hidden = !baton.credential;
  if (token && !location.hash.startsWith("#/s/")) location.hash = `#/s/${encodeURIComponent(token.session)}`;
  window.onhashchange = route;
  route();
}

async function seesOperations() {
  try {
    const headers = baton.credential ? { authorization: `Bearer ${baton.credential}` } : {};
    return (await fetch("/metrics", { method: "HEAD", headers })).ok;
  } catch {
    return false;
  }
}

function signIn(message) {
  const input = h("input", { type: "password", placeholder: "API key or session token", autocomplete: "off", size: 60 });
  const form = h("form", { testid: "sign-in" },
    h("h2", {}, "Sign in"),
    h("p", {}, "Access control is on: paste an API key or a session token. It is kept in this tab only."),
    input, " ", h("button", { type: "submit" }, "Sign in"),
    h("p", { testid: "error" }, message));
  form.onsubmit = (event) => {
    event.preventDefault();
    sessionStorage.setItem(STORE_KEY, input.value.trim());
    baton = new Baton({ credential: input.value.trim() });
    start();
  };
  app.replaceChildren(form);
}

let navigation = 0; // counts routings: a view whose request returns after the next one stays away

function route() {
  current?.close();
  current = null;
  navigation += 1;
  const hash = location.hash || "#/";
  if (hash.startsWith("#/s/")) {
    let id;
    try {
      id = decodeURIComponent(hash.slice(4));
    } catch {
      id = hash.slice(4);
    }
    return openSession(id);
  }
  if (hash === "#/ops") return opsView();
  return listView();
}

/// Fills a select with the agents of `GET /v1/agents`, the default one selected.
async function fillAgents(select, error) {
  try {
    const { agents: configured } = await baton.agents();
    select.replaceChildren(...configured.map((a) =>
      h("option", { value: a.name, selected: a.default }, `${a.name} (${a.kind})`)));
  } catch (e) {
    error.textContent = errorText(e);
  }
}

// --- Rendering: times, and JSON for people ----------------------------------------------------

const relativeFormat = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });
const timeOfDayFormat = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });
const dayFormat = new Intl.DateTimeFormat(undefined, { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
const clockFormat = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit" });

/** "just now", "5 minutes ago", "2 hours ago", then the local time (and day, if not today). */
function timeText(date, now = Date.now()) {
  const seconds = (now - date.getTime()) / 1000;
  if (Math.abs(seconds) < 45) return "just now";
  if (Math.abs(seconds) < 3600) return relativeFormat.format(-Math.round(seconds / 60), "minute");
  if (Math.abs(seconds) < 6 * 3600) return relativeFormat.format(-Math.round(seconds / 3600), "hour");
  return new Date(now).toDateString() === date.toDateString() ? timeOfDayFormat.format(date) : dayFormat.format(date);
}

/** A `<time>`: readable text (kept current), the exact RFC 3339 value in `datetime` and `title`
 *  (where a browser shows it on hover). */
function timeElement(iso) {
  if (!iso) return null;
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return h("time", {}, iso);
  return h("time", { datetime: iso, title: iso, "data-relative": true }, timeText(date));
}

/** The event log's: the local time of day, to the second. */
function clockElement(iso) {
  const date = new Date(iso);
  if (!iso || Number.isNaN(date.getTime())) return null;
  return h("time", { datetime: iso, title: iso }, clockFormat.format(date));
}

setInterval(() => {
  const now = Date.now();
  for (const element of document.querySelectorAll("time[data-relative]")) {
    element.textContent = timeText(new Date(element.dateTime), now);
  }
}, 20000);

function duration(from, to) {
  if (!from || !to) return null;
  const ms = new Date(to) - new Date(from);
  if (!(ms >= 0)) return null;
  if (ms < 1000) return `${ms} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(1)} s`;
  return `${Math.floor(ms / 60000)} min ${Math.round((ms % 60000) / 1000)} s`;
}

const CANCEL_REASONS = {
  cancel: "cancelled by a client",
  clear: "the conversation was cleared",
  interrupt: "interrupted by a newer message",
  timeout: "nobody answered in time",
  shutdown: "the server shut down",
  delete: "the session was deleted",
  disconnect: "its connection closed",
};

/** JSON as text when it parses, else the text itself (answers, tool arguments). */
function parseLoose(text) {
  if (typeof text !== "string") return text;
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

/** Any JSON value for people: text as text, lists joined, objects as names and values. */
function readable(value, depth = 0) {
  if (value === null || value === undefined) return h("span", { class: "muted" }, "none");
  if (typeof value !== "object") return h("span", { class: "value" }, String(value));
  if (depth > 4) return h("code", {}, JSON.stringify(value));
  if (Array.isArray(value)) {
    if (value.length === 0) return h("span", { class: "muted" }, "none");
    if (value.every((v) => v === null || typeof v !== "object")) return h("span", { class: "value" }, value.map(String).join(", "));
    return h("ol", { class: "values" }, ...value.map((v) => h("li", {}, readable(v, depth + 1))));
  }
  const entries = Object.entries(value);
  if (entries.length === 0) return h("span", { class: "muted" }, "nothing");
  return h("dl", { class: "values" }, ...entries.flatMap(([name, v]) => [h("dt", {}, name), h("dd", {}, readable(v, depth + 1))]));
}

/** The tool calls of a request (an `openai` agent's client-side tools), or null. */
function toolCalls(data) {
  return Array.isArray(data?.tool_calls) ? data.tool_calls : null;
}

/** What the agent asks, readably: the tool calls it wants run, or its question and the rest. */
function askBody(data) {
  const calls = toolCalls(data);
  if (calls) {
    return h("div", { class: "calls" }, ...calls.map((call) =>
      h("div", { class: "call" }, h("span", { class: "tool" }, call.name ?? "tool"), readable(parseLoose(call.arguments ?? call.input ?? null)))));
  }
  if (data && typeof data === "object" && !Array.isArray(data) && typeof data.question === "string") {
    const { question, options, ...rest } = data;
    return h("div", {}, h("p", { class: "question" }, question),
      Array.isArray(options) ? h("p", { class: "muted" }, `Options: ${options.map(String).join(", ")}`) : null,
      Object.keys(rest).length ? readable(rest) : null);
  }
  return typeof data === "string" ? h("p", { class: "question" }, data) : readable(data);
}

/** An ask in the transcript: pending, or with the answer it got. */
function askStep(request, { answered, answer }) {
  const calls = toolCalls(request.data);
  const step = h("div", { class: `step ask-step${answered ? "" : " pending"}` },
    h("div", { class: "step-title" }, calls ? "Asked you to run" : "Asked you"),
    askBody(request.data));
  if (!answered) {
    step.append(h("div", { class: "step-answer muted" }, "Waiting for your answer…"));
  } else if (calls && Array.isArray(answer?.tool_outputs)) {
    step.append(h("div", { class: "step-answer" }, h("span", { class: "label" }, "You returned"),
      ...answer.tool_outputs.map((output) => {
        const call = calls.find((c) => c.id === output.tool_call_id);
        return h("div", { class: "call" }, h("span", { class: "tool" }, call?.name ?? output.tool_call_id), readable(output.output));
      })));
  } else {
    step.append(h("div", { class: "step-answer" }, h("span", { class: "label" }, "You answered"), " ", readable(answer)));
  }
  return step;
}

/** A progress report (`task.progress`): a tool the agent used, a step, or any JSON. */
function progressStep(data) {
  if (typeof data === "string") return h("div", { class: "step" }, data);
  const tool = data && typeof data === "object" && !Array.isArray(data) && (typeof data.tool === "string" ? data.tool : typeof data.name === "string" ? data.name : null);
  if (tool) {
    const { tool: _tool, name: _name, ...rest } = data;
    const detail = rest.input ?? rest.arguments ?? rest.args;
    return h("div", { class: "step tool-step" }, h("div", { class: "step-title" }, "Used ", h("span", { class: "tool" }, tool)),
      readable(detail === undefined ? (Object.keys(rest).length ? rest : null) : parseLoose(detail)));
  }
  return h("div", { class: "step" }, h("div", { class: "step-title" }, "Progress"), readable(data));
}

// --- Sessions ------------------------------------------------------------------------------

async function listView() {
  const token = readToken(baton.credential);
  const error = h("p", { testid: "error" });
  const filter = h("input", { placeholder: "filter by id prefix", type: "search" });
  const list = h("div");
  const more = h("button", { hidden: true }, "More");
  const agents = h("select", { testid: "agent-select" });
  const newId = h("input", { placeholder: "new session id", pattern: SESSION_ID_PATTERN, required: true,
    title: "1–128 letters, digits and . _ : -" });
  const create = h("button", { type: "submit", class: "primary" }, "Create");
  let items = [];
  let next = null;
  const render = () => {
    const prefix = filter.value.trim();
    const shown = items.filter((s) => s.id.startsWith(prefix));
    // Spaces between the parts: the item's text holds the id as a whole word.
    list.replaceChildren(...shown.map((s) =>
      h("div", { testid: "session-item", class: "session-item" },
        h("a", { href: `#/s/${encodeURIComponent(s.id)}`, class: "session-id" }, s.id), " ",
        s.agent ? h("span", { class: "badge agent", title: "agent" }, s.agent) : null, " ",
        h("span", { class: `badge status`, "data-status": s.running ? s.running.status : "idle" }, s.running ? s.running.status : "idle"), " ",
        s.queued ? h("span", { class: "meta" }, `${s.queued} queued`) : null, " ",
        s.created_at ? h("span", { class: "meta" }, "created ", timeElement(s.created_at)) : null, " ",
        h("button", { class: "quiet danger", disabled: !!token, onclick: () => remove(s.id) }, "Delete"))));
    if (shown.length === 0) list.append(h("p", { class: "empty" }, items.length ? "No session starts with that." : "No sessions yet."));
    more.hidden = !next;
  };
  const load = async (after) => {
    try {
      const page = await baton.sessions({ after, limit: 100 });
      items = after ? items.concat(page.sessions) : page.sessions;
      next = page.next;
      render();
    } catch (e) {
      error.textContent = errorText(e);
    }
  };
  const remove = async (id) => {
    if (!window.confirm(`Delete session ${id} and everything in it?`)) return;
    try {
      await baton.deleteSession(id);
      items = items.filter((s) => s.id !== id);
      render();
    } catch (e) {
      error.textContent = errorText(e);
    }
  };
  filter.oninput = render;
  more.onclick = () => load(next);
  const form = h("form", { testid: "new-session", class: "row" }, newId, agents, create);
  form.onsubmit = async (event) => {
    event.preventDefault();
    try {
      await baton.createSession(newId.value.trim(), agents.value || undefined);
      location.hash = `#/s/${encodeURIComponent(newId.value.trim())}`;
    } catch (e) {
      error.textContent = errorText(e);
    }
  };
  app.replaceChildren(
    h("section", {}, h("h2", {}, "New session"), form),
    h("section", { testid: "session-list" }, h("div", { class: "row" }, h("h2", {}, "Sessions"), h("span", { class: "spacer" }), filter), list, more),
    error);
  if (token) {
    form.querySelectorAll("input, select, button").forEach((e) => (e.disabled = true));
  }
  await fillAgents(agents, error);
  if (token) {
    items = [{ id: token.session, agent: "", running: null, queued: 0 }];
    render();
  } else {
    await load(null);
  }
}

// --- One session -----------------------------------------------------------------------------

// Opening a session's stream would create it: a session that does not exist (a typo in a
// link) is offered, not created.
async function openSession(id) {
  const at = navigation;
  app.replaceChildren(h("p", { class: "meta" }, "Loading…"));
  let session;
  try {
    session = await baton.session(id);
  } catch (e) {
    if (at !== navigation) return;
    if (e instanceof BatonError && e.status === 404) return missingSession(id);
    app.replaceChildren(h("p", { testid: "error" }, errorText(e)));
    return;
  }
  if (at === navigation) sessionView(id, session);
}

function missingSession(id) {
  const token = readToken(baton.credential);
  const error = h("p", { testid: "error" });
  const agents = h("select", { testid: "agent-select", hidden: !!token });
  // A token cannot choose an agent (PUT is a key's), but a write token's stream creates its
  // session; a read token cannot create it at all.
  const create = h("button", { testid: "create-session", disabled: token?.scope === "read" }, `Create “${id}”`);
  create.onclick = async () => {
    error.textContent = "";
    try {
      if (!token) await baton.createSession(id, agents.value || undefined);
      sessionView(id, null);
    } catch (e) {
      error.textContent = errorText(e);
    }
  };
  app.replaceChildren(h("section", { testid: "no-such-session" },
    h("h2", {}, "No such session"),
    h("p", {}, "There is no session ", h("code", {}, id), token ? "." : " for these credentials. Nothing was created."),
    h("div", { class: "row" }, agents, create, h("a", { href: "#/" }, "Back to sessions")),
    error));
  if (!token) fillAgents(agents, error);
}

function sessionView(id, session) {
  const token = readToken(baton.credential);
  const readOnly = token?.scope === "read";
  const interactions = new Map(); // id → {data, element, response (Text), progress: [data…]}
  const order = []; // their ids, sorted (ids are time-ordered: almost always an append)
  let waitingFor = null;
  let shownFrom = 0;

  const agentName = h("span", { testid: "session-agent", class: "badge agent", title: "the session's agent" }, session?.agent ?? "");
  const state = h("span", { testid: "connection-state", class: "state", "data-state": "reconnecting" }, "connecting");
  const error = h("p", { testid: "error", class: "error", role: "alert" });
  const transcript = h("div", { testid: "transcript", class: "transcript" });
  const empty = h("p", { class: "empty" }, "No messages yet: write the first one below.");
  const earlier = h("button", { hidden: true, class: "quiet" }, "Show earlier");
  const composer = h("textarea", { testid: "composer", rows: 3, placeholder: readOnly ? "Read only" : "Write a message…" });
  const policy = h("select", { testid: "policy", title: "what to do when the agent is busy" },
    ...[["reject", "refuse"], ["enqueue", "queue"], ["interrupt", "interrupt"]].map(([p, label]) =>
      h("option", { value: p }, `${p === "reject" ? "reject" : p} — ${label} if busy`)));
  const send = h("button", { testid: "send", class: "primary", disabled: readOnly }, "Send");
  const cancel = h("button", { testid: "cancel", disabled: readOnly }, "Cancel");
  const clear = h("button", { testid: "clear", class: "danger", disabled: readOnly }, "Clear");
  const answerSlot = h("div");
  const contextText = h("textarea", { rows: 8, spellcheck: "false", class: "code" });
  const save = h("button", { disabled: readOnly }, "Save (replace)");
  const patch = h("button", { disabled: readOnly }, "Merge patch");
  const contextEditor = h("div", { testid: "context-editor" }, contextText, h("div", { class: "row" }, save, patch));
  const log = h("div", { testid: "event-log", class: "event-log" });
  composer.disabled = readOnly;
  policy.disabled = readOnly;

  app.replaceChildren(
    h("div", { class: "session-head" },
      h("a", { href: "#/", class: "back" }, "← Sessions"),
      h("h1", {}, id), agentName, state),
    h("div", { class: "grid" },
      h("div", { class: "column" },
        h("section", { class: "conversation" }, earlier, transcript, empty),
        h("section", { class: "compose" }, answerSlot, composer,
          h("div", { class: "row" }, send, policy, h("span", { class: "hint" }, "Ctrl+Enter sends"),
            h("span", { class: "spacer" }), cancel, clear),
          error)),
      h("div", { class: "column side" },
        h("section", {}, h("h2", {}, "Context"), contextEditor),
        h("section", {}, h("h2", {}, "Events"), log))));

  const stream = baton.open(id, { replay: true });
  current = stream;
  stream.onstate = (s) => {
    const shown = s === "connecting" ? "reconnecting" : s;
    state.dataset.state = shown;
    state.textContent = shown;
    if (s === "closed" && stream.error) error.textContent = errorText(stream.error);
  };
  stream.onhello = (session) => {
    agentName.textContent = session.agent;
    if (!contextText.matches(":focus")) contextText.value = JSON.stringify(session.context, null, 2);
  };

  const fail = (e) => (error.textContent = errorText(e));
  const act = (promise) => {
    error.textContent = "";
    return promise.catch(fail);
  };
  send.onclick = () => {
    const content = composer.value;
    if (!content.trim()) return;
    act(stream.send(content, { policy: policy.value }).then(() => (composer.value = "")));
  };
  composer.onkeydown = (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) send.click();
  };
  cancel.onclick = () => act(stream.cancel());
  clear.onclick = () => {
    if (window.confirm("Clear the conversation: cancel what runs and waits, forget everything?")) act(stream.clear());
  };
  const readContext = () => {
    try {
      return JSON.parse(contextText.value || "{}");
    } catch (e) {
      error.textContent = `invalid_request: the context is not JSON (${e.message})`;
      return null;
    }
  };
  save.onclick = () => {
    const value = readContext();
    if (value) act(stream.context({ set: value }));
  };
  patch.onclick = () => {
    const value = readContext();
    if (value) act(stream.context({ patch: value }));
  };
  earlier.onclick = () => {
    shownFrom = Math.max(0, shownFrom - TRANSCRIPT_PAGE);
    renderWindow();
  };

  const place = (id) => {
    let at = order.length;
    if (at > 0 && order[at - 1] > id) {
      let low = 0;
      while (low < at) {
        const mid = (low + at) >> 1;
        if (order[mid] < id) low = mid + 1;
        else at = mid;
      }
    }
    order.splice(at, 0, id);
    return at;
  };
  const renderWindow = () => {
    shownFrom = Math.min(shownFrom, Math.max(0, order.length - TRANSCRIPT_PAGE));
    transcript.replaceChildren(...order.slice(shownFrom).map((i) => interactions.get(i).element));
    earlier.hidden = shownFrom === 0;
    empty.hidden = order.length > 0;
  };

  // What follows the agent's label: status, how long it took, why it ended.
  const describe = (i) => {
    const parts = [h("span", { class: "badge status" }, i.status)];
    if (i.status === "queued") parts.push(h("span", {}, "waits for its turn"));
    const took = duration(i.started_at, i.finished_at);
    if (took) parts.push(h("span", {}, `took ${took}`));
    if (i.finished_at) parts.push(h("span", {}, "finished ", timeElement(i.finished_at)));
    return parts;
  };
  const outcome = (i) => {
    if (i.error) return h("p", { class: "outcome failed" }, `${i.error.code}: ${i.error.message}`);
    if (i.cancel_reason) return h("p", { class: "outcome" }, `Cancelled (${CANCEL_REASONS[i.cancel_reason] ?? i.cancel_reason}).`);
    return null;
  };
  const renderActivity = (entry) => {
    const i = entry.data;
    // A replay upserts each interaction several times: its parts are rebuilt only on a change.
    const key = `${i.status}|${i.finished_at}|${i.answers?.length ?? 0}|${i.request?.id}|${entry.progress.length}`;
    if (entry.rendered === key) return;
    entry.rendered = key;
    entry.steps.replaceChildren(...entry.progress.map(progressStep));
    const asks = (i.answers ?? []).map((exchange) => askStep(exchange.request, { answered: true, answer: exchange.answer }));
    if (i.status === "waiting" && i.request) asks.push(askStep(i.request, { answered: false }));
    entry.asks.replaceChildren(...asks);
    entry.outcome.replaceChildren(...[outcome(i)].filter(Boolean));
    entry.status.replaceChildren(...describe(i));
  };

  const upsert = (data) => {
    let entry = interactions.get(data.id);
    if (!entry) {
      const response = document.createTextNode("");
      const status = h("span", { class: "meta" });
      const steps = h("div", { class: "steps" });
      const asks = h("div", { class: "steps" });
      const outcomeSlot = h("div");
      const element = h("article", { testid: "interaction", class: "interaction", "data-id": data.id },
        h("div", { class: "turn you" },
          h("div", { class: "who" }, h("span", { class: "role" }, "You"), " ", timeElement(data.created_at)),
          h("div", { class: "bubble content" }, data.content)),
        h("div", { class: "turn agent" },
          h("div", { class: "who" }, h("span", { class: "role" }, "Agent"), " ", status),
          steps,
          h("div", { testid: "response", class: "bubble response" }, response),
          asks,
          outcomeSlot));
      entry = { data, element, response, status, steps, asks, outcome: outcomeSlot, progress: [] };
      interactions.set(data.id, entry);
      empty.hidden = true;
      const at = place(data.id);
      if (at === order.length - 1) {
        // The newest: appended; the window slides when it holds a page already.
        transcript.append(element);
        if (order.length - shownFrom > TRANSCRIPT_PAGE) {
          transcript.firstElementChild?.remove();
          shownFrom += 1;
          earlier.hidden = false;
        }
      } else if (at >= shownFrom) {
        transcript.insertBefore(element, interactions.get(order[at + 1]).element);
      } else {
        shownFrom += 1;
      }
    }
    entry.data = data;
    entry.element.dataset.status = data.status;
    if (entry.response.data !== data.response) entry.response.data = data.response;
    renderActivity(entry);
    return entry;
  };

  const showAnswerForm = (interaction) => {
    waitingFor = interaction.id;
    const request = interaction.request;
    const calls = toolCalls(request.data);
    const inputs = calls
      ? calls.map((call) => [call.id, h("input", { placeholder: `what ${call.name} returns (text or JSON)`, "aria-label": `output of ${call.name}` })])
      : [[null, h("input", { placeholder: "your answer (text or JSON)", "aria-label": "answer" })]];
    const options = !calls && Array.isArray(request.data?.options) ? request.data.options : [];
    const submit = h("button", { type: "submit", class: "primary", disabled: readOnly }, "Answer");
    const form = h("form", { testid: "answer-form", class: "ask" },
      h("div", { class: "ask-title" }, calls ? "The agent asks you to run:" : "The agent asks:"),
      askBody(request.data),
      ...inputs.map(([, input], n) => h("label", { class: "field" },
        calls ? h("span", {}, `Output of ${calls[n].name}`) : null, input)),
      h("div", { class: "row" }, submit,
        ...options.filter((o) => typeof o !== "object").map((option) =>
          h("button", { type: "button", class: "option", disabled: readOnly, onclick: () => {
            inputs[0][1].value = String(option);
            form.requestSubmit(submit);
          } }, String(option)))));
    form.onsubmit = (event) => {
      event.preventDefault();
      const answer = calls
        ? { tool_outputs: inputs.map(([tool_call_id, input]) => ({ tool_call_id, output: parseLoose(input.value) })) }
        : parseLoose(inputs[0][1].value);
      act(stream.answer(interaction.id, request.id, answer));
    };
    answerSlot.replaceChildren(form);
  };
  const hideAnswerForm = (interactionId) => {
    if (waitingFor === interactionId) {
      waitingFor = null;
      answerSlot.replaceChildren();
    }
  };

  let pendingLog = [];
  const flushLog = () => {
    // Only what can stay in the log is built.
    const entries = pendingLog.splice(0).slice(-EVENT_LOG_MAX).map((event) => {
      // The data is rendered when the entry is opened, not for every event that streams by.
      const entry = h("details", {}, h("summary", {}, `#${event.seq} ${event.type}`, " ", clockElement(event.at)));
      entry.addEventListener("toggle", () => {
        if (entry.open && entry.childElementCount === 1) entry.append(h("pre", {}, JSON.stringify(event.data, null, 1)));
      }, { once: true });
      return entry;
    });
    log.append(...entries);
    while (log.childElementCount > EVENT_LOG_MAX) log.firstElementChild.remove();
    log.scrollTop = log.scrollHeight;
  };

  stream.onevent = (event) => {
    if (pendingLog.length === 0) requestAnimationFrame(flushLog);
    pendingLog.push(event);
    const data = event.data;
    switch (event.type) {
      case "task.delta": {
        const entry = interactions.get(data.interaction_id);
        if (entry) {
          entry.response.appendData(data.text);
          entry.data.response += data.text;
        }
        break;
      }
      case "task.progress": {
        const entry = interactions.get(data.interaction_id);
        if (entry) {
          entry.progress.push(data.data);
          renderActivity(entry);
        }
        break;
      }
      case "interaction.queued":
      case "task.started":
      case "task.resumed":
      case "task.completed":
      case "task.failed":
      case "task.cancelled":
        upsert(data.interaction);
        hideAnswerForm(data.interaction.id);
        break;
      case "task.waiting":
        upsert(data.interaction);
        showAnswerForm(data.interaction);
        break;
      case "interaction.removed": {
        const entry = interactions.get(data.interaction_id);
        if (entry) {
          interactions.delete(data.interaction_id);
          const at = order.indexOf(data.interaction_id);
          order.splice(at, 1);
          if (at < shownFrom) shownFrom -= 1;
          entry.element.remove();
          empty.hidden = order.length > 0;
        }
        break;
      }
      case "context.updated":
        if (!contextText.matches(":focus")) contextText.value = JSON.stringify(data.context, null, 2);
        break;
      case "session.cleared":
        interactions.clear();
        order.length = 0;
        shownFrom = 0;
        transcript.replaceChildren();
        empty.hidden = false;
        hideAnswerForm(waitingFor);
        if (!contextText.matches(":focus")) contextText.value = "{}";
        break;
      case "session.deleted":
        error.textContent = "not_found: the session was deleted";
        break;
    }
  };
}

// --- Operations ------------------------------------------------------------------------------

function opsView() {
  const table = h("table", { testid: "operations" });
  const error = h("p", { testid: "error" });
  app.replaceChildren(h("section", {}, h("h2", {}, "Operations"), table, error));
  let last = null;
  const read = (text, name) => {
    const line = text.split("\n").find((l) => l.startsWith(name + " "));
    return line ? Number(line.split(" ")[1]) : 0;
  };
  const poll = async () => {
    try {
      const headers = baton.credential ? { authorization: `Bearer ${baton.credential}` } : {};
      const response = await fetch("/metrics", { headers });
      if (!response.ok) throw new BatonError(response.status, response.status === 403 ? "forbidden" : "error", "the metrics need an admin key");
      const text = await response.text();
      const now = performance.now();
      const accepted = read(text, "baton_messages_accepted_total");
      const rate = last ? ((accepted - last.accepted) * 1000) / (now - last.at) : 0;
      last = { accepted, at: now };
      table.replaceChildren(...[
        ["running tasks", read(text, "baton_running_tasks")],
        ["open connections", read(text, "baton_connections")],
        ["events published", read(text, "baton_events_published_total")],
        ["messages per second", rate.toFixed(1)],
      ].map(([name, value]) => h("tr", {}, h("th", {}, name), h("td", {}, String(value)))));
      error.textContent = "";
    } catch (e) {
      error.textContent = errorText(e);
    }
  };
  poll();
  const timer = setInterval(poll, 3000);
  current = { close: () => clearInterval(timer) };
}

start();
