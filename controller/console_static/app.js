// vmferry web console: plain JavaScript, no framework, no CDN.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const MiB = 1024 * 1024;
let state = { migrations: [], vms: [], nodes: [], errors: {} };
let events = null;
let metricsTimer = null;
let dialogVm = null;

function fmtBytes(n) {
  if (!n) return "0 B";
  if (n >= 1024 * MiB) return (n / 1024 / MiB).toFixed(2) + " GiB";
  if (n >= MiB) return (n / MiB).toFixed(1) + " MiB";
  return (n / 1024).toFixed(0) + " KiB";
}
const fmtRate = (n) => (n ? fmtBytes(n) + "/s" : "–");
const fmtSecs = (s) => (s >= 60 ? Math.floor(s / 60) + "m " + Math.round(s % 60) + "s" : s.toFixed(1) + "s");

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

async function start() {
  try {
    const me = await api("GET", "/api/whoami");
    $("#who").textContent = me.user + (me.via === "certificate" ? " (certificate)" : "");
    $("#logout").hidden = !me.session;
    $("#login").hidden = true;
    $("#app").hidden = false;
    $("#tabs").hidden = false;
    connect();
  } catch (e) {
    $("#login").hidden = false;
    $("#app").hidden = true;
    $("#tabs").hidden = true;
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
    showMessage("Login refused: " + e.message);
  }
});

$("#logout").addEventListener("click", async () => {
  await api("POST", "/api/logout", {});
  if (events) events.close();
  location.reload();
});

// -- live data -----------------------------------------------------------------------------

function connect() {
  if (events) events.close();
  events = new EventSource("/api/events");
  events.addEventListener("state", (ev) => render(JSON.parse(ev.data)));
  events.onerror = () => {
    // The browser reconnects by itself; meanwhile poll once so the page stays fresh.
    api("GET", "/api/state").then(render).catch(() => {});
  };
}

function render(next) {
  state = next;
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

function renderMigrations() {
  const body = $("#migrations tbody");
  body.replaceChildren();
  for (const m of state.migrations) {
    const tr = document.createElement("tr");
    tr.dataset.migration = m.namespace + "/" + m.name;
    tr.dataset.phase = m.phase;
    cell(tr, m.name);
    cell(tr, m.vmi);
    const ph = cell(tr, (m.phase || "Pending") + (m.deleting ? " (canceling)" : ""), "phase phase-" + m.phase);
    if (m.failureReason) ph.title = m.failureReason;
    cell(tr, (m.source || "?") + " → " + (m.target || "?"));
    const done = m.phase === "Succeeded" ? 1 : m.total ? Math.min(1, m.processed / m.total) : 0;
    const bar = cell(tr, "");
    bar.innerHTML = '<span class="bar"><span></span></span> ';
    bar.querySelector(".bar > span").style.width = (done * 100).toFixed(0) + "%";
    bar.appendChild(document.createTextNode((done * 100).toFixed(0) + "%"));
    bar.className = "progress";
    cell(tr, fmtBytes(m.processed), "num processed");
    cell(tr, fmtBytes(m.remaining), "num remaining");
    cell(tr, fmtRate(m.transferRate), "num rate");
    cell(tr, fmtRate(m.dirtyRate), "num dirty");
    cell(tr, fmtSecs(m.elapsed), "num elapsed");
    body.appendChild(tr);
  }
  $("#tab-migrations .empty").hidden = state.migrations.length > 0;
}

function renderVms() {
  const body = $("#vms tbody");
  body.replaceChildren();
  for (const vm of state.vms) {
    const tr = document.createElement("tr");
    tr.dataset.vm = vm.namespace + "/" + vm.name;
    cell(tr, vm.namespace);
    cell(tr, vm.name);
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
    body.appendChild(tr);
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

// -- tabs and the metrics charts -----------------------------------------------------------------

for (const btn of document.querySelectorAll("#tabs button")) {
  btn.addEventListener("click", () => selectTab(btn.dataset.tab));
}

function selectTab(name) {
  for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("active", b.dataset.tab === name);
  for (const s of document.querySelectorAll(".tab")) s.hidden = s.id !== "tab-" + name;
  clearInterval(metricsTimer);
  if (name === "metrics") {
    loadMetrics();
    metricsTimer = setInterval(loadMetrics, 2000);
  }
}

async function loadMetrics() {
  try {
    const h = await api("GET", "/api/metrics-history");
    const s = h.samples;
    chart("#chart-phases", s, {
      pending: (x) => x.pending, scheduling: (x) => x.scheduling, running: (x) => x.running,
    });
    const per = (field, scale) => {
      const names = new Set();
      for (const x of s) for (const k of Object.keys(x.migrations)) names.add(k);
      const series = {};
      for (const k of names) series[k] = (x) => (x.migrations[k] ? x.migrations[k][field] / scale : null);
      return series;
    };
    chart("#chart-rate", s, per("transferRate", MiB));
    chart("#chart-remaining", s, per("remaining", MiB));
    chart("#chart-dirty", s, per("dirtyRate", MiB));
  } catch (e) {
    showMessage("Metrics: " + e.message);
  }
}

const COLORS = ["#0b5cad", "#d64545", "#1b7f3b", "#b7791f", "#6b46c1", "#2c7a7b", "#c05621"];

function chart(sel, samples, series) {
  const svg = $(sel);
  const W = 420, H = 180, L = 40, B = 18, T = 8, R = 8;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const ns = "http://www.w3.org/2000/svg";
  const el = (tag, attrs, text) => {
    const e = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    svg.appendChild(e);
    return e;
  };
  svg.replaceChildren();
  if (!samples.length) return;
  const t0 = samples[0].t, t1 = Math.max(samples[samples.length - 1].t, t0 + 1);
  let max = 1;
  for (const fn of Object.values(series)) for (const x of samples) { const v = fn(x); if (v != null && v > max) max = v; }
  const px = (t) => L + ((t - t0) / (t1 - t0)) * (W - L - R);
  const py = (v) => H - B - (v / max) * (H - B - T);
  el("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" });
  el("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" });
  el("text", { x: 2, y: T + 8 }, max >= 10 ? max.toFixed(0) : max.toFixed(1));
  el("text", { x: 2, y: H - B }, "0");
  el("text", { x: L, y: H - 4 }, "-" + Math.round(t1 - t0) + "s");
  el("text", { x: W - R - 20, y: H - 4 }, "now");
  Object.entries(series).forEach(([name, fn], i) => {
    const color = COLORS[i % COLORS.length];
    let d = "", pen = false;
    for (const x of samples) {
      const v = fn(x);
      if (v == null) { pen = false; continue; }
      d += (pen ? "L" : "M") + px(x.t).toFixed(1) + " " + py(v).toFixed(1) + " ";
      pen = true;
    }
    if (d) el("path", { d, fill: "none", stroke: color, "stroke-width": 1.5, "data-series": name });
    el("text", { x: L + 6 + 110 * (i % 3), y: T + 10 + 12 * Math.floor(i / 3), fill: color, class: "legend" }, name);
  });
}

start();
