// The Metrics tab's charts, drawn with uPlot (vendored from the npm registry: uPlot 1.6.32,
// uPlot.iife.min.js + uPlot.min.css, MIT licence in LICENSE.uPlot). Time axes, a grid,
// coloured legends with live values, a tooltip at the cursor, a fixed time window, and a
// point for every sample so that a migration seen in one or two samples still shows.
"use strict";

const CHART_COLORS = ["#0b5cad", "#d64545", "#1b7f3b", "#b7791f", "#6b46c1", "#2c7a7b", "#c05621", "#97266d"];
const charts = new Map(); // element id -> {plot, key, window: {min, max}}
window.vmferryCharts = charts; // for the browser tests

function chartColor(i) {
  return CHART_COLORS[i % CHART_COLORS.length];
}

function fmtValue(v) {
  if (v == null) return "–";
  if (Math.abs(v) >= 100) return v.toFixed(0);
  if (Math.abs(v) >= 10) return v.toFixed(1);
  return v.toFixed(2).replace(/\.?0+$/, "") || "0";
}

function fmtClock(t) {
  return new Date(t * 1000).toLocaleTimeString([], { hour12: false });
}

// A tooltip next to the cursor: the time and every series' value at that sample.
function tooltipPlugin() {
  let tip = null;
  return {
    hooks: {
      init: (u) => {
        tip = document.createElement("div");
        tip.className = "u-tooltip";
        tip.hidden = true;
        u.over.appendChild(tip);
        u.over.addEventListener("mouseleave", () => { tip.hidden = true; });
      },
      setCursor: (u) => {
        const idx = u.cursor.idx;
        if (idx == null || u.cursor.left == null || u.cursor.left < 0) { tip.hidden = true; return; }
        const time = document.createElement("div");
        time.textContent = fmtClock(u.data[0][idx]);
        const rows = [time];
        for (let i = 1; i < u.series.length; i++) {
          const v = nearValue(u, i, idx);
          if (v == null) continue;
          const row = document.createElement("div");
          row.textContent = u.series[i].label + ": " + fmtValue(v);
          row.style.color = chartColor(i - 1);
          rows.push(row);
        }
        tip.replaceChildren(...rows);
        tip.hidden = rows.length < 2;
        const left = Math.min(u.cursor.left + 12, u.over.clientWidth - tip.offsetWidth - 4);
        tip.style.left = Math.max(0, left) + "px";
        tip.style.top = Math.max(0, u.cursor.top - tip.offsetHeight - 8) + "px";
      },
    },
  };
}

// The value of series i at the sample nearest the cursor that has one, within NEAR_PX
// pixels: a sparse series (a one-second migration) is found without pixel-exact aim.
const NEAR_PX = 10;
function nearValue(u, i, idx) {
  const xs = u.data[0], ys = u.data[i];
  let best = null, bestDist = NEAR_PX + 1;
  for (let d = 0; d < xs.length; d++) {
    for (const j of [idx - d, idx + d]) {
      if (j < 0 || j >= xs.length || ys[j] == null) continue;
      const dist = Math.abs(u.valToPos(xs[j], "x") - u.cursor.left);
      if (dist < bestDist) { best = ys[j]; bestDist = dist; }
    }
    if (d > 0 && Math.abs(u.valToPos(xs[Math.max(0, idx - d)], "x") - u.cursor.left) > NEAR_PX &&
        Math.abs(u.valToPos(xs[Math.min(xs.length - 1, idx + d)], "x") - u.cursor.left) > NEAR_PX) break;
  }
  return best;
}

function nonZero(u, seriesIdx) {
  const ys = u.data[seriesIdx];
  const idxs = [];
  for (let j = 0; j < ys.length; j++) if (ys[j] != null && ys[j] !== 0) idxs.push(j);
  return idxs;
}

// Draw (or update) the chart in element `id`: xs are sample times (s), series a list of
// {label, values}; the x axis spans [end - windowSeconds, end].
function drawChart(id, xs, series, windowSeconds, end) {
  const el = document.getElementById(id);
  const key = series.map((s) => s.label).join("\u0000");
  let entry = charts.get(id);
  if (!entry || entry.key !== key) {
    if (entry) entry.plot.destroy();
    const box = { min: end - windowSeconds, max: end };
    const opts = {
      width: Math.max(320, el.clientWidth || 420),
      height: 220,
      scales: {
        x: { time: true, range: () => [box.min, box.max] },
        y: { range: (u, min, max) => [0, Math.max(1, (max || 0) * 1.1)] },
      },
      series: [
        { label: "time", value: (u, v) => (v == null ? "–" : fmtClock(v)) },
        ...series.map((s, i) => ({
          label: s.label,
          stroke: chartColor(i),
          width: 2,
          spanGaps: false,
          // A point on every non-zero sample (zeros are the line): sparse data stays visible.
          points: { show: true, size: 6, fill: chartColor(i), stroke: chartColor(i), filter: nonZero },
          value: (u, v) => fmtValue(v),
        })),
      ],
      axes: [
        { grid: { show: true, stroke: "#e4e7eb", width: 1 }, ticks: { stroke: "#d9e2ec" } },
        { grid: { show: true, stroke: "#e4e7eb", width: 1 }, ticks: { stroke: "#d9e2ec" }, size: 56 },
      ],
      legend: { show: true, live: true },
      cursor: { drag: { x: false, y: false }, points: { size: 8 } },
      plugins: [tooltipPlugin()],
    };
    entry = { plot: new uPlot(opts, [xs, ...series.map((s) => s.values)], el), key, box };
    charts.set(id, entry);
  }
  entry.box.min = end - windowSeconds;
  entry.box.max = end;
  entry.plot.setData([xs, ...series.map((s) => s.values)]);
}
