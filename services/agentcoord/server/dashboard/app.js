// agentcoord dashboard: plain JS, no library. Reads /api/*, follows /api/stream (SSE).
"use strict";

const token = new URLSearchParams(location.search).get("token");
const withToken = (path) => (token ? `${path}${path.includes("?") ? "&" : "?"}token=${encodeURIComponent(token)}` : path);
const api = async (path) => (await fetch(withToken(path))).json();
const $ = (selector) => document.querySelector(selector);
let openTask = null;

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text ?? "";
  if (className) td.className = className;
  return td;
}

function row(cells, onClick) {
  const tr = document.createElement("tr");
  cells.forEach((c) => tr.appendChild(c));
  if (onClick) {
    tr.className = "clickable";
    tr.addEventListener("click", onClick);
  }
  return tr;
}

function when(iso) {
  return iso ? new Date(iso).toLocaleTimeString() : "";
}

function bar(done, total) {
  const td = document.createElement("td");
  td.innerHTML = `<span class="bar"><span style="width:${total ? (100 * done) / total : 0}%"></span></span> ${done}/${total}`;
  return td;
}

async function loadAgents() {
  const { agents } = await api("api/agents");
  const body = $("#agents tbody");
  body.replaceChildren(
    ...agents.map((a) =>
      row([
        cell(a.agent_id),
        cell(a.role),
        cell(a.state, `state-${a.state}`),
        cell(a.capabilities.join(", ")),
        cell(a.skills.map((s) => s.name || s.id).join(", ")),
        bar(a.active_subtasks, a.capacity),
        cell(when(a.last_heartbeat_time)),
        cell(a.held_subtask_ids.join(", ")),
      ])
    )
  );
  body.dataset.count = agents.length;
}

async function loadTasks() {
  const { tasks } = await api("api/tasks");
  $("#tasks tbody").replaceChildren(
    ...tasks.map((t) => {
      const c = t.counts;
      const total = Object.values(c).reduce((x, y) => x + y, 0);
      return row(
        [cell(t.task_id), cell(t.title), cell(t.state, `state-${t.state}`), bar(c.succeeded, total), cell(when(t.update_time))],
        () => showTask(t.task_id)
      );
    })
  );
}

async function showTask(taskId) {
  openTask = taskId;
  const { task, subtasks } = await api(`api/tasks/${encodeURIComponent(taskId)}`);
  $("#task-panel").hidden = false;
  $("#task-title").textContent = `${task.title} (${task.task_id})`;
  $("#task-facts").textContent = `state ${task.state}${task.failure ? ", failure: " + task.failure.message : ""}`;
  // Layers of the DAG: a sub-task sits one layer after its deepest prerequisite.
  const depth = {};
  for (const s of subtasks) depth[s.subtask_id] = Math.max(0, ...s.depends_on.map((d) => (depth[d] ?? 0) + 1));
  const layers = [];
  for (const s of subtasks) (layers[depth[s.subtask_id]] ??= []).push(s);
  $("#dag").replaceChildren(
    ...layers.map((layer) => {
      const column = document.createElement("div");
      column.className = "layer";
      for (const s of layer) {
        const node = document.createElement("div");
        node.className = `node state-${s.state}`;
        node.dataset.localId = s.local_id;
        node.dataset.state = s.state;
        const failure = s.last_failure ? `${s.last_failure.failure_class}: ${s.last_failure.message}` : "";
        node.innerHTML = "<b></b><small class=state></small><small class=holder></small><small class=attempts></small><small class=failure></small><small class=result></small>";
        node.querySelector("b").textContent = `${s.local_id} · ${s.title}`;
        node.querySelector(".state").textContent = s.state;
        node.querySelector(".holder").textContent = s.agent_id ? `holder ${s.agent_id}` : "";
        node.querySelector(".attempts").textContent = `attempts ${s.attempt}/${s.max_attempts}`;
        node.querySelector(".failure").textContent = failure;
        node.querySelector(".result").textContent = s.result ? `result ${s.result}` : "";
        column.appendChild(node);
      }
      return column;
    })
  );
}

function logRow(c) {
  return row([cell(c.revision), cell(when(c.time)), cell(c.service), cell(c.kind), cell(c.subject), cell(c.agent_id)]);
}

function filters() {
  const form = new FormData($("#filters"));
  const params = new URLSearchParams();
  for (const name of ["agent", "service", "kind", "subject", "since"]) if (form.get(name)) params.set(name, form.get(name));
  return params;
}

function matches(c, params) {
  return (
    (!params.get("agent") || c.agent_id === params.get("agent")) &&
    (!params.get("service") || c.service === params.get("service")) &&
    (!params.get("kind") || c.kind === params.get("kind")) &&
    (!params.get("subject") || c.subject === params.get("subject"))
  );
}

async function loadLog() {
  const response = await api(`api/events?${filters()}`);
  const body = $("#log tbody");
  if (response.error) {
    body.replaceChildren(row([cell(response.error.message)]));
    return;
  }
  body.replaceChildren(...response.changes.reverse().map(logRow));
}

let pending = null;
function refresh(kinds) {
  // Coalesce bursts of changes into one reload of what they touch.
  pending ??= new Set();
  kinds.forEach((k) => pending.add(k));
  setTimeout(async () => {
    const touched = pending;
    pending = null;
    if (!touched) return;
    if (touched.has("agent")) await loadAgents();
    if (touched.has("task")) {
      await loadTasks();
      if (openTask) await showTask(openTask);
    }
  }, 100);
}

function follow() {
  const source = new EventSource(withToken("api/stream"));
  source.onopen = () => {
    $("#live").textContent = "live";
    $("#live").className = "badge on";
  };
  source.onerror = () => {
    $("#live").textContent = "reconnecting…";
    $("#live").className = "badge off";
  };
  source.onmessage = (event) => {
    const changes = JSON.parse(event.data);
    if (!changes.length) return;
    const kinds = new Set();
    for (const c of changes) {
      if (c.kind.startsWith("agent.")) kinds.add("agent");
      if (c.kind.startsWith("task.") || c.kind.startsWith("subtask.")) kinds.add("task", "agent");
      if (c.kind.startsWith("subtask.")) kinds.add("agent"); // held sub-tasks and load
    }
    refresh(kinds);
    if (new FormData($("#filters")).get("tail")) {
      const params = filters();
      const body = $("#log tbody");
      for (const c of changes) if (matches(c, params)) body.prepend(logRow(c));
      while (body.children.length > 500) body.lastChild.remove();
    }
  };
}

$("#filters").addEventListener("submit", (event) => {
  event.preventDefault();
  loadLog();
});

Promise.all([loadAgents(), loadTasks(), loadLog()]).then(follow);
setInterval(loadAgents, 5000); // heartbeats (load, last heartbeat) are not in the change log
