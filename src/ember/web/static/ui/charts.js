// Chart.js helpers (window.Chart, loaded by a classic <script> before the modules). Charts are
// made once per page and then updated in place with update("none"): polling every second
// must neither flicker nor leak canvases.

import { el, fill, fmtClock, fmtMs, fmtNum } from "./lib.js";

export const TERMS = [
  ["queue_ms", "queue", "#94a3b8"],
  ["cold_start_ms", "cold start", "#f59e0b"],
  ["load_ms", "load", "#a855f7"],
  ["exec_ms", "exec", "#2563eb"],
  ["post_ms", "post", "#10b981"],
];

export const WORKER_STATES = [
  ["STARTING", "#f59e0b"],
  ["IDLE", "#94a3b8"],
  ["BUSY", "#2563eb"],
  ["DRAINING", "#ef4444"],
];

export const PALETTE = ["#2563eb", "#10b981", "#f59e0b", "#a855f7", "#ef4444", "#0891b2", "#84cc16", "#ec4899", "#64748b", "#f97316"];

const hasChart = () => typeof window.Chart === "function";

function baseOptions({ stacked = false, yFormat = (v) => fmtNum(v, 2), legend = true, whole = false } = {}) {
  return {
    responsive: true,
    maintainAspectRatio: false,
    animation: false,
    normalized: true,
    interaction: { mode: "index", intersect: false },
    plugins: {
      legend: { display: legend, position: "bottom", labels: { boxWidth: 10, boxHeight: 10, font: { size: 11 } } },
      tooltip: { callbacks: { label: (c) => `${c.dataset.label}: ${yFormat(c.parsed.y)}` } },
    },
    scales: {
      x: {
        stacked,
        grid: { display: false },
        ticks: { maxRotation: 0, autoSkip: true, maxTicksLimit: 7, font: { size: 10 } },
      },
      y: {
        stacked,
        beginAtZero: true,
        grid: { color: "#eef0f3" },
        ticks: { font: { size: 10 }, callback: (v) => yFormat(v), maxTicksLimit: 6, ...(whole ? { precision: 0 } : {}) },
      },
    },
  };
}

/** A chart on `canvas`; without Chart.js (it failed to load) a note says so, and null comes back. */
export function makeChart(canvas, type, datasets, options) {
  if (!hasChart()) {
    canvas.replaceWith(el("p", { class: "muted", text: "Charts unavailable: Chart.js did not load." }));
    return null;
  }
  return new window.Chart(canvas, { type, data: { labels: [], datasets }, options });
}

/** New labels and data for each dataset, then a redraw without animation. */
export function setData(chart, labels, columns) {
  if (!chart) return;
  // A redraw is most of what a watched page costs: skip it when nothing it draws has changed.
  const drawn = JSON.stringify([labels[labels.length - 1], columns]);
  if (chart.$drawn === drawn) return;
  chart.$drawn = drawn;
  chart.data.labels = labels;
  columns.forEach((data, i) => {
    if (chart.data.datasets[i]) chart.data.datasets[i].data = data;
  });
  chart.update("none");
}

/** Datasets of a chart whose series come and go (usage groups): matched by label. */
export function setGroups(chart, labels, groups) {
  if (!chart) return;
  const byLabel = new Map(chart.data.datasets.map((d) => [d.label, d]));
  chart.data.datasets = groups.map((g, i) => {
    const d = byLabel.get(g.label) || { label: g.label, borderWidth: 0 };
    d.backgroundColor = PALETTE[i % PALETTE.length];
    d.data = g.data;
    return d;
  });
  chart.data.labels = labels;
  chart.update("none");
}

function card(id, title, noteId) {
  const canvas = el("canvas", { id, role: "img", "aria-label": title });
  const note = el("p", { class: "chart-note", id: noteId, "data-total": "0" });
  const head = el("div", { class: "chart-head" }, el("h3", {}, title));
  const box = el("div", { class: "chart-box" }, canvas);
  return { node: el("div", { class: "chart-card" }, head, box, note), canvas, note, head };
}

/**
 * The four series charts (calls/s, latency by term, cold starts, workers by state) of
 * GET /v1/series, for the workspace or one function; update(series) redraws them in place.
 */
export class SeriesCharts {
  constructor(container) {
    this.pct = "p95";
    this.series = null;
    const calls = card("chart-calls", "Calls per second", "calls-total");
    const latency = card("chart-latency", "Latency by term", "latency-total");
    const cold = card("chart-cold", "Cold starts", "cold-total");
    const workers = card("chart-workers", "Workers by state", "workers-total");
    const select = el(
      "select",
      { id: "latency-pct", "aria-label": "Latency percentile" },
      ["p50", "p95", "p99"].map((p) => el("option", { value: p, selected: p === this.pct }, p)),
    );
    select.addEventListener("change", () => {
      this.pct = select.value;
      if (this.series) this.update(this.series);
    });
    latency.head.append(select);
    fill(container, calls.node, latency.node, cold.node, workers.node);
    this.notes = { calls: calls.note, latency: latency.note, cold: cold.note, workers: workers.note };
    this.calls = makeChart(
      calls.canvas,
      "line",
      [
        { label: "calls/s", borderColor: "#2563eb", backgroundColor: "rgba(37,99,235,.12)", fill: true, pointRadius: 0, borderWidth: 1.5 },
        { label: "failed/s", borderColor: "#ef4444", backgroundColor: "rgba(239,68,68,.15)", fill: true, pointRadius: 0, borderWidth: 1.5 },
      ],
      baseOptions({ yFormat: (v) => fmtNum(v, 2) }),
    );
    this.latency = makeChart(
      latency.canvas,
      "bar",
      TERMS.map(([, label, color]) => ({ label, backgroundColor: color, borderWidth: 0, barPercentage: 1, categoryPercentage: 1 })),
      baseOptions({ stacked: true, yFormat: fmtMs }),
    );
    this.cold = makeChart(
      cold.canvas,
      "line",
      [{ label: "cold starts", borderColor: "#f59e0b", backgroundColor: "#f59e0b", fill: true, pointRadius: 0, borderWidth: 1, stepped: true }],
      baseOptions({ yFormat: (v) => fmtNum(v), legend: false, whole: true }),
    );
    this.workers = makeChart(
      workers.canvas,
      "line",
      WORKER_STATES.map(([state, color]) => ({
        label: state.toLowerCase(),
        borderColor: color,
        backgroundColor: `${color}99`,
        fill: true,
        pointRadius: 0,
        borderWidth: 1,
        stepped: true,
      })),
      baseOptions({ stacked: true, yFormat: (v) => fmtNum(v, 1) }),
    );
  }

  update(series) {
    this.series = series;
    const points = series.points || [];
    const step = series.step || 10;
    const labels = points.map((p) => fmtClock(p.t));
    setData(this.calls, labels, [points.map((p) => p.calls / step), points.map((p) => p.failed / step)]);
    const pct = this.pct;
    setData(
      this.latency,
      labels,
      TERMS.map(([key]) => points.map((p) => (p[pct] ? p[pct][key] : null))),
    );
    setData(this.cold, labels, [points.map((p) => p.cold_starts)]);
    setData(
      this.workers,
      labels,
      WORKER_STATES.map(([state]) => points.map((p) => (p.workers ? p.workers[state] || 0 : 0))),
    );
    const totals = series.totals || { calls: 0, failed: 0, cold_starts: 0 };
    const span = spanText(series.window || 3600);
    const n = this.notes;
    n.calls.dataset.total = String(totals.calls);
    n.calls.dataset.failed = String(totals.failed);
    n.calls.textContent = `${fmtNum(totals.calls)} call${totals.calls === 1 ? "" : "s"} in the last ${span}${totals.failed ? `, ${fmtNum(totals.failed)} failed` : ""}`;
    const withData = points.filter((p) => p[pct]);
    const worst = withData.reduce((m, p) => Math.max(m, p[pct].total_ms), 0);
    n.latency.dataset.total = String(withData.length);
    n.latency.textContent = withData.length ? `${pct} up to ${fmtMs(worst)} over ${withData.length} slot${withData.length === 1 ? "" : "s"} of ${step} s` : "No calls in this window";
    n.cold.dataset.total = String(totals.cold_starts);
    n.cold.textContent = `${fmtNum(totals.cold_starts)} cold start${totals.cold_starts === 1 ? "" : "s"} in the last ${span}`;
    const last = points[points.length - 1];
    const now = last && last.workers ? Object.values(last.workers).reduce((a, b) => a + b, 0) : 0;
    n.workers.dataset.total = String(Math.round(now));
    n.workers.textContent = `${fmtNum(now, 1)} worker${now === 1 ? "" : "s"} now (mean over the last ${step} s)`;
  }

  destroy() {
    for (const c of [this.calls, this.latency, this.cold, this.workers]) if (c) c.destroy();
  }
}

export function spanText(seconds) {
  if (seconds % 3600 === 0) return seconds === 3600 ? "hour" : `${seconds / 3600} hours`;
  if (seconds % 60 === 0) return `${seconds / 60} minutes`;
  return `${seconds} s`;
}

/** Headline figures of the last `seconds` of a series. */
export function recent(series, seconds = 300) {
  const points = series.points || [];
  const since = (series.now || Date.now() / 1000) - seconds;
  const tail = points.filter((p) => p.t + (series.step || 10) > since);
  const calls = tail.reduce((a, p) => a + p.calls, 0);
  const failed = tail.reduce((a, p) => a + p.failed, 0);
  const cold = tail.reduce((a, p) => a + p.cold_starts, 0);
  const p95 = tail.reduce((m, p) => (p.p95 ? Math.max(m, p.p95.total_ms) : m), -1);
  const last = points[points.length - 1];
  const workers = last && last.workers ? Object.values(last.workers).reduce((a, b) => a + b, 0) : 0;
  return { calls, failed, cold, p95: p95 < 0 ? null : p95, workers };
}
