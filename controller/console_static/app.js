// vmferry web console: plain JavaScript, no framework, no CDN (charts: charts.js on uPlot).
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const MiB = 1024 * 1024;
let state = { migrations: [], vms: [], nodes: [], errors: {} };
let events = null;
let metricsTimer = null;
let vmTimer = null;
let dialogVm = null;
let currentVm = null; // {namespace, name} of the VM page
const sorting = { migrations: { key: "created", dir: -1 }, vms: { key: "name", dir: 1 } };

function fmtBytes(n) {
  if (!n) return "0 B";
  if (n >= 1024 * MiB) return (n / 1024 / MiB).toFixed(2) + " GiB";
  if (n >= MiB) return (n / MiB).toFixed(1) + " MiB";
  return (n / 1024).toFixed(0) + " KiB";
}
const fmtRate = (n) => (n ? fmtBytes(n) + "/s" : "–");
const fmtSecs = (s) => (s >= 60 ? Math.floor(s / 60) + "m " + Math.round(s % 60) + "s" : s.toFixed(1) + "s");
const fmtDowntime = (ms) => (ms == null ? "–" : ms >= 1000 ? (ms / 1000).toFixed(2) + " s" : Math.round(ms) + " ms");
const fmtWhen = (stamp) => (stamp ? new Date(stamp).toLocaleTimeString([], { hour12: false }) : "");

function showMessage(text, kind = "error") {
  const box = $("#message");
  box.textContent = text;
  box.className = kind === "error" ? "" : "info";
  box.hidden = !text;
}

async function api(method, path, body) {
  const opts = { method, headers: {}, credentials: "same-origin" };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const resp = await fetch(path, opts);
  let data = {};
  try { data = await resp.json(); } catch (e) { data = { error: resp.statusText }; }
  if (!resp.ok) {
    const err = new Error(data.error || resp.statusText);
    err.status = resp.status;
    err.reason = data.reason || "";
    throw err;
  }
  return data;
}

// -- login -------------------------------------------------------------------------------

function showLoggedOut() {
  if (events) { events.close(); events = null; }
  $("#login").hidden = false;
  $("#app").hidden = true;
  $("#tabs").hidden = true;
  $("#logout").hidden = true;
  $("#who").textContent = "";
}

async function start() {
  try {
    const me = await api("GET", "/api/whoami");
    $("#who").textContent = me.user + (me.via === "certificate" ? " (certificate)" : "");
    $("#logout").hidden = !me.session;
    $("#login").hidden = true;
    $("#app").hidden = false;
    $("#tabs").hidden = false;
    connect();
    route();
  } catch (e) {
    showLoggedOut();
    if (e.status !== 401) showMessage(e.message);
  }
}

$("#login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  try {
    await api("POST", "/api/login", { token: $("#token").value.trim() });
    $("#token").value = "";
    showMessage("");
    start();
  } catch (e) {
    showLoggedOut();
    showMessage("Login refused: " + e.message);
  }
});

$("#logout").addEventListener("click", async () => {
  await api("POST", "/api/logout", {});
  showLoggedOut();
  location.hash = "";
  location.reload();
});

// -- live data -----------------------------------------------------------------------------

function connect() {
  if (events) events.close();
  events = new EventSource("/api/events");
  events.addEventListener("state", (ev) => render(JSON.parse(ev.data)));
  events.onerror = () => {
    // The browser reconnects by itself; meanwhile poll once so the page stays fresh.
    api("GET", "/api/state").then(render).catch((e) => { if (e.status === 401) showLoggedOut(); });
  };
}

function render(next) {
  state = next;
  renderNamespaces();
  renderMigrations();
  renderVms();
  // What the user may not read is said apart from the action messages.
  const errs = Object.entries(state.errors || {});
  $("#read-errors").textContent = errs.map(([k, v]) => k + ": " + v).join("; ");
  $("#read-errors").hidden = errs.length === 0;
}

function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  tr.appendChild(td);
  return td;
}

function vmLink(namespace, name) {
  const a = document.createElement("a");
  a.href = "#vm/" + encodeURIComponent(namespace) + "/" + encodeURIComponent(name);
  a.textContent = name;
  a.className = "vm-link";
  return a;
}

// -- filter, search, sort ----------------------------------------------------------------------

function renderNamespaces() {
  const select = $("#ns-filter");
  const names = new Set([...state.vms, ...state.migrations].map((r) => r.namespace));
  const want = ["", ...[...names].sort()];
  const have = [...select.options].map((o) => o.value);
  if (want.join("\n") === have.join("\n")) return;
  const chosen = select.value;
  select.replaceChildren(...want.map((ns) => {
    const opt = document.createElement("option");
    opt.value = ns;
    opt.textContent = ns || "All namespaces";
    return opt;
  }));
  select.value = want.includes(chosen) ? chosen : "";
}

function visible(rows, fields) {
  const ns = $("#ns-filter").value;
  const words = $("#search").value.trim().toLowerCase().split(/\s+/).filter(Boolean);
  return rows.filter((r) => {
    if (ns && r.namespace !== ns) return false;
    const text = fields.map((f) => String(r[f] ?? "")).join(" ").toLowerCase();
    return words.every((w) => text.includes(w));
  });
}

function sorted(rows, table, derive = {}) {
  const { key, dir } = sorting[table];
  const value = (r) => (derive[key] ? derive[key](r) : r[key]);
  return [...rows].sort((a, b) => {
    const x = value(a), y = value(b);
    if (x == null && y == null) return 0;
    if (x == null) return 1;
    if (y == null) return -1;
    const c = typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y));
    return c * dir || String(a.name).localeCompare(String(b.name));
  });
}

for (const table of ["migrations", "vms"]) {
  for (const th of document.querySelectorAll(`#${table} th[data-sort]`)) {
    th.addEventListener("click", () => {
      const s = sorting[table];
      s.dir = s.key === th.dataset.sort ? -s.dir : 1;
      s.key = th.dataset.sort;
      table === "migrations" ? renderMigrations() : renderVms();
    });
  }
}
$("#ns-filter").addEventListener("change", () => { renderMigrations(); renderVms(); });
$("#search").addEventListener("input", () => { renderMigrations(); renderVms(); });

function markSorted(table) {
  for (const th of document.querySelectorAll(`#${table} th[data-sort]`)) {
    const on = th.dataset.sort === sorting[table].key;
    th.classList.toggle("sorted", on);
    th.dataset.dir = on ? (sorting[table].dir > 0 ? "asc" : "desc") : "";
  }
}

// -- tables --------------------------------------------------------------------------------------

const progressOf = (m) => (m.phase === "Succeeded" ? 1 : m.total ? Math.min(1, m.processed / m.total) : 0);
const reasonOf = (m) => m.failureReason || (m.abortStatus ? "abort " + m.abortStatus : "");

function migrationCells(tr, m, columns) {
  for (const col of columns) {
    if (col === "name") cell(tr, m.name, "name");
    else if (col === "namespace") cell(tr, m.namespace, "namespace");
    else if (col === "vmi") cell(tr, "", "vmi").appendChild(vmLink(m.namespace, m.vmi));
    else if (col === "phase") cell(tr, (m.phase || "Pending") + (m.deleting ? " (canceling)" : ""), "phase phase-" + m.phase);
    else if (col === "route") cell(tr, (m.source || "?") + " → " + (m.target || "?"), "route");
    else if (col === "progress") {
      const done = progressOf(m);
      const bar = cell(tr, "", "progress");
      const outer = document.createElement("span");
      outer.className = "bar";
      const inner = document.createElement("span");
      inner.style.width = (done * 100).toFixed(0) + "%";
      outer.appendChild(inner);
      bar.append(outer, " " + (done * 100).toFixed(0) + "%");
    } else if (col === "processed") cell(tr, fmtBytes(m.processed), "num processed");
    else if (col === "remaining") cell(tr, fmtBytes(m.remaining), "num remaining");
    else if (col === "rate") cell(tr, fmtRate(m.transferRate), "num rate");
    else if (col === "dirty") cell(tr, fmtRate(m.dirtyRate), "num dirty");
    else if (col === "downtime") cell(tr, fmtDowntime(m.downtimeMs), "num downtime");
    else if (col === "elapsed") cell(tr, fmtSecs(m.elapsed), "num elapsed");
    else if (col === "created") cell(tr, fmtWhen(m.created), "created");
    else if (col === "reason") cell(tr, reasonOf(m), "reason" + (m.phase === "Failed" ? " failed" : ""));
  }
}

function renderMigrations() {
  const body = $("#migrations tbody");
  const rows = sorted(
    visible(state.migrations, ["name", "namespace", "vmi", "phase", "source", "target", "failureReason"]),
    "migrations",
    { progress: progressOf, source: (m) => m.source + " " + m.target, failureReason: reasonOf },
  );
  body.replaceChildren(...rows.map((m) => {
    const tr = document.createElement("tr");
    tr.dataset.migration = m.namespace + "/" + m.name;
    tr.dataset.phase = m.phase;
    migrationCells(tr, m, ["name", "namespace", "vmi", "phase", "route", "progress", "processed",
      "remaining", "rate", "dirty", "downtime", "elapsed", "created", "reason"]);
    return tr;
  }));
  markSorted("migrations");
  $("#tab-migrations .empty").hidden = rows.length > 0;
}

function renderVms() {
  const body = $("#vms tbody");
  const rows = sorted(visible(state.vms, ["namespace", "name", "phase", "node", "migration"]), "vms");
  body.replaceChildren(...rows.map((vm) => {
    const tr = document.createElement("tr");
    tr.dataset.vm = vm.namespace + "/" + vm.name;
    cell(tr, vm.namespace);
    cell(tr, "", "name").appendChild(vmLink(vm.namespace, vm.name));
    cell(tr, vm.phase, "phase phase-" + vm.phase);
    cell(tr, vm.node || "–", "node");
    cell(tr, vm.migration || "–", "migration");
    const actions = cell(tr, "");
    // As in the reference, the actions are visible to every user; the API decides.
    const mig = document.createElement("button");
    mig.textContent = "Migrate";
    mig.className = "migrate";
    mig.disabled = vm.phase !== "Running" || !!vm.migration || !!vm.notMigratable;
    if (vm.notMigratable) mig.title = vm.notMigratable;  // e.g. the RWX rule's message
    mig.addEventListener("click", () => openMigrate(vm));
    const cancel = document.createElement("button");
    cancel.textContent = "Cancel migration";
    cancel.className = "cancel";
    cancel.disabled = !vm.migration;
    cancel.addEventListener("click", () => cancelMigration(vm));
    actions.append(mig, " ", cancel);
    return tr;
  }));
  markSorted("vms");
  $("#tab-vms .empty").hidden = rows.length > 0;
}

// -- the VM page ----------------------------------------------------------------------------------

async function loadVm() {
  if (!currentVm) return;
  const { namespace, name } = currentVm;
  try {
    const vm = await api("GET", "/api/vm?namespace=" + encodeURIComponent(namespace) + "&name=" + encodeURIComponent(name));
    if (!currentVm || currentVm.name !== name || currentVm.namespace !== namespace) return;
    const row = state.vms.find((v) => v.namespace === namespace && v.name === name);
    $("#vm-summary").textContent = row ? `${row.phase} on ${row.node || "no node"}` : "";
    const migs = $("#vm-migrations tbody");
    migs.replaceChildren(...vm.migrations.map((m) => {
      const tr = document.createElement("tr");
      tr.dataset.migration = m.namespace + "/" + m.name;
      tr.dataset.phase = m.phase;
      migrationCells(tr, m, ["name", "phase", "route", "downtime", "elapsed", "created", "reason"]);
      return tr;
    }));
    $("#vm-no-migrations").hidden = vm.migrations.length > 0;
    const evs = $("#vm-events tbody");
    evs.replaceChildren(...vm.events.map((e) => {
      const tr = document.createElement("tr");
      tr.className = "event-" + e.type;
      cell(tr, e.type, "type");
      cell(tr, e.reason, "reason");
      cell(tr, e.object);
      cell(tr, e.message, "message");
      cell(tr, String(e.count), "num");
      cell(tr, fmtWhen(e.last));
      cell(tr, e.source);
      return tr;
    }));
    $("#vm-no-events").hidden = vm.events.length > 0;
    $("#vm-yaml-vm").textContent = vm.yaml.VirtualMachine || "(no VirtualMachine: a standalone VMI)";
    $("#vm-yaml-vmi").textContent = vm.yaml.VirtualMachineInstance || "(not running: no VirtualMachineInstance)";
  } catch (e) {
    showMessage("VM " + namespace + "/" + name + ": " + e.message);
  }
}

// -- actions ---------------------------------------------------------------------------------

function openMigrate(vm) {
  dialogVm = vm;
  $("#migrate-vm").textContent = vm.namespace + "/" + vm.name + " runs on " + (vm.node || "?");
  const select = $("#migrate-node");
  select.replaceChildren();
  for (const n of state.nodes) {
    if (n.name === vm.node) continue;
    const opt = document.createElement("option");
    opt.value = n.hostname;
    opt.textContent = n.name + (n.ready ? "" : " (NotReady)") + (n.schedulable ? "" : " (unschedulable)");
    select.appendChild(opt);
  }
  $('input[name=target][value=auto]').checked = true;
  select.disabled = true;
  $("#migrate-dialog").showModal();
}

for (const radio of document.querySelectorAll("input[name=target]")) {
  radio.addEventListener("change", () => { $("#migrate-node").disabled = radio.value !== "specific" || !radio.checked; });
}
$("#migrate-close").addEventListener("click", () => $("#migrate-dialog").close());

$("#migrate-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  $("#migrate-dialog").close();
  const specific = $('input[name=target][value=specific]').checked;
  const body = { namespace: dialogVm.namespace, vm: dialogVm.name, node: specific ? $("#migrate-node").value : "" };
  try {
    const res = await api("POST", "/api/migrate", body);
    showMessage("Migration " + res.name + " of " + body.vm + " created", "info");
  } catch (e) {
    showMessage("Migrate " + body.vm + " refused: " + e.message);
  }
});

async function cancelMigration(vm) {
  try {
    const res = await api("POST", "/api/cancel", { namespace: vm.namespace, vm: vm.name });
    showMessage("Canceled " + res.canceled.join(", "), "info");
  } catch (e) {
    showMessage("Cancel migration of " + vm.name + " refused: " + e.message);
  }
}

// -- tabs (the location hash: #migrations, #vms, #metrics, #vm/NS/NAME) -----------------------------

for (const btn of document.querySelectorAll("#tabs button")) {
  btn.addEventListener("click", () => { location.hash = btn.dataset.tab; });
}
window.addEventListener("hashchange", route);

function route() {
  const parts = location.hash.replace(/^#/, "").split("/").map(decodeURIComponent);
  if (parts[0] === "vm" && parts.length === 3) {
    currentVm = { namespace: parts[1], name: parts[2] };
    $("#vm-title").textContent = "Virtual machine " + parts[1] + "/" + parts[2];
    selectTab("vm");
  } else {
    currentVm = null;
    selectTab(["vms", "metrics"].includes(parts[0]) ? parts[0] : "migrations");
  }
}

function selectTab(name) {
  const tabOf = name === "vm" ? "vms" : name;
  for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("active", b.dataset.tab === tabOf);
  for (const s of document.querySelectorAll(".tab")) s.hidden = s.id !== "tab-" + name;
  $("#toolbar").hidden = !["migrations", "vms"].includes(name);
  clearInterval(metricsTimer);
  clearInterval(vmTimer);
  if (name === "metrics") {
    loadMetrics();
    metricsTimer = setInterval(loadMetrics, 2000);
  } else if (name === "vm") {
    loadVm();
    vmTimer = setInterval(loadVm, 2000);
  }
}

// -- the metrics charts --------------------------------------------------------------------------

$("#metrics-window").addEventListener("change", loadMetrics);

async function loadMetrics() {
  try {
    const h = await api("GET", "/api/metrics-history");
    drawMetrics(h.samples, Number($("#metrics-window").value));
  } catch (e) {
    showMessage("Metrics: " + e.message);
  }
}

function drawMetrics(all, windowSeconds) {
  const end = all.length ? all[all.length - 1].t : Date.now() / 1000;
  // "finished" counts the migrations that ended since the previous sample: a migration
  // shorter than a sample period still shows as a point there.
  const finished = all.map((x, i) => (i === 0 ? 0 : Math.max(0, x.succeeded + x.failed - all[i - 1].succeeded - all[i - 1].failed)));
  const keep = all.map((x) => x.t >= end - windowSeconds);
  const samples = all.filter((_, i) => keep[i]);
  const xs = samples.map((x) => x.t);
  drawChart("chart-phases", xs, [
    { label: "pending", values: samples.map((x) => x.pending) },
    { label: "scheduling", values: samples.map((x) => x.scheduling) },
    { label: "running", values: samples.map((x) => x.running) },
    { label: "finished", values: finished.filter((_, i) => keep[i]).map((v) => v || null) },
  ], windowSeconds, end);
  const names = [];
  for (const x of samples) for (const k of Object.keys(x.migrations)) if (!names.includes(k)) names.push(k);
  const per = (field) => names.map((k) => ({
    label: samples.find((x) => x.migrations[k]).migrations[k].vmi + " (" + k.split("/")[1] + ")",
    values: samples.map((x) => (x.migrations[k] ? x.migrations[k][field] / MiB : null)),
  }));
  drawChart("chart-rate", xs, per("transferRate"), windowSeconds, end);
  drawChart("chart-remaining", xs, per("remaining"), windowSeconds, end);
  drawChart("chart-dirty", xs, per("dirtyRate"), windowSeconds, end);
}

start();
