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
  const create = h("button", { type: "submit" }, "Create");
  let items = [];
  let next = null;
  const render = () => {
    const prefix = filter.value.trim();
    list.replaceChildren(...items.filter((s) => s.id.startsWith(prefix)).map((s) =>
      h("div", { testid: "session-item" },
        h("a", { href: `#/s/${encodeURIComponent(s.id)}` }, s.id),
        h("span", { class: "meta" }, `${s.agent} · ${s.running ? s.running.status : "idle"} · ${s.queued} queued`),
        h("button", { disabled: !!token, onclick: () => remove(s.id) }, "Delete"))));
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
    h("section", { testid: "session-list" }, h("h2", {}, "Sessions"), filter, list, more),
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
  const interactions = new Map(); // id → {data, element, response (Text)}
  const order = []; // their ids, sorted (ids are time-ordered: almost always an append)
  let waitingFor = null;
  let shownFrom = 0;

  const agentName = h("span", { testid: "session-agent", title: "agent" }, session?.agent ?? "");
  const state = h("span", { testid: "connection-state", "data-state": "reconnecting" }, "connecting");
  const error = h("p", { testid: "error" });
  const transcript = h("div", { testid: "transcript" });
  const earlier = h("button", { hidden: true }, "Show earlier");
  const composer = h("textarea", { testid: "composer", rows: 3, placeholder: "Message" });
  const policy = h("select", { testid: "policy" }, ...["reject", "enqueue", "interrupt"].map((p) => h("option", { value: p }, p)));
  const send = h("button", { testid: "send", disabled: readOnly }, "Send");
  const cancel = h("button", { testid: "cancel", disabled: readOnly }, "Cancel");
  const clear = h("button", { testid: "clear", disabled: readOnly }, "Clear");
  const answerSlot = h("div");
  const contextText = h("textarea", { rows: 6 });
  const save = h("button", { disabled: readOnly }, "Save (replace)");
  const patch = h("button", { disabled: readOnly }, "Merge patch");
  const contextEditor = h("div", { testid: "context-editor" }, contextText, h("div", { class: "row" }, save, patch));
  const log = h("div", { testid: "event-log" });
  composer.disabled = readOnly;
  policy.disabled = readOnly;

  app.replaceChildren(
    h("section", {}, h("div", { class: "row" }, h("h2", {}, `Session ${id}`), agentName, state)),
    h("div", { class: "grid" },
      h("div", {},
        h("section", {}, earlier, transcript),
        h("section", {}, answerSlot, composer, h("div", { class: "row" }, policy, send, cancel, clear), error)),
      h("div", {},
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
  };

  const describe = (i) => {
    const parts = [i.status];
    if (i.error) parts.push(`${i.error.code}: ${i.error.message}`);
    if (i.cancel_reason) parts.push(`reason: ${i.cancel_reason}`);
    parts.push(`created ${i.created_at}`);
    if (i.finished_at) parts.push(`finished ${i.finished_at}`);
    return parts.join(" · ");
  };

  const upsert = (data) => {
    let entry = interactions.get(data.id);
    if (!entry) {
      const response = document.createTextNode("");
      const element = h("div", { testid: "interaction", "data-id": data.id },
        h("div", { class: "content" }, data.content),
        h("div", { testid: "response" }, response),
        h("div", { class: "meta" }));
      entry = { data, element, response };
      interactions.set(data.id, entry);
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
    entry.element.querySelector(".meta").textContent = describe(data);
    return entry;
  };

  const showAnswerForm = (interaction) => {
    waitingFor = interaction.id;
    const request = interaction.request;
    const calls = Array.isArray(request.data?.tool_calls) ? request.data.tool_calls : null;
    const inputs = calls
      ? calls.map((call) => [call.id, h("input", { placeholder: `output of ${call.name}(${call.arguments})`, size: 50 })])
      : [[null, h("input", { placeholder: "answer (text or JSON)", size: 50 })]];
    const parse = (text) => {
      try {
        return JSON.parse(text);
      } catch {
        return text;
      }
    };
    const form = h("form", { testid: "answer-form" },
      h("div", {}, h("strong", {}, "The agent asks: "),
        typeof request.data?.question === "string" ? request.data.question : JSON.stringify(request.data)),
      ...inputs.map(([, input]) => h("div", {}, input)),
      h("button", { type: "submit", disabled: readOnly }, "Answer"));
    form.onsubmit = (event) => {
      event.preventDefault();
      const answer = calls
        ? { tool_outputs: inputs.map(([tool_call_id, input]) => ({ tool_call_id, output: parse(input.value) })) }
        : parse(inputs[0][1].value);
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
      const entry = h("details", {}, h("summary", {}, `#${event.seq} ${event.type}`));
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
      case "context.updated":
        if (!contextText.matches(":focus")) contextText.value = JSON.stringify(data.context, null, 2);
        break;
      case "session.cleared":
        interactions.clear();
        order.length = 0;
        shownFrom = 0;
        transcript.replaceChildren();
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
