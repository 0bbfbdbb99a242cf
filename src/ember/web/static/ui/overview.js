// The workspace at a glance: headline figures and live charts of GET /v1/series.

import { SeriesCharts, recent } from "./charts.js";
import { el, fmtMs, fmtNum } from "./lib.js";

function stat(id, label, title) {
  const value = el("span", { class: "stat-value", id, text: "–" });
  return { node: el("div", { class: "stat", title }, el("span", { class: "stat-label", text: label }), value), value };
}

/** Headline figures plus the four charts, fed from one series query; shared with a function's page. */
export function liveSeries(root, ctx, params = {}) {
  const stats = {
    calls: stat("stat-calls", "Calls, last 5 min"),
    p95: stat("stat-p95", "p95, last 5 min", "the highest 30-second p95 of the last 5 minutes"),
    cold: stat("stat-cold", "Cold starts, last hour"),
    workers: stat("stat-workers", "Workers now"),
  };
  const grid = el("div", { class: "chart-grid" });
  root.append(el("div", { class: "stats" }, Object.values(stats).map((s) => s.node)), grid);
  const charts = new SeriesCharts(grid);
  ctx.onDispose(() => charts.destroy());
  let series = null;
  let fetched = 0;
  ctx.every(async () => {
    // The whole hour once a minute; in between only the last minute, merged in: a poll then
    // costs the server and the page two points, not the hour's 120. 30-second slots rather than
    // 10: a third of the bars to draw each second, for the same hour.
    const whole = !series || Date.now() - fetched > 60000;
    const got = await ctx.api("/series", { ...params, window: whole ? 3600 : 60, step: 30 });
    if (!ctx.alive()) return;
    if (whole) fetched = Date.now();
    series = whole ? got : merged(series, got);
    charts.update(series);
    const r = recent(series, 300);
    stats.calls.value.textContent = fmtNum(r.calls);
    stats.calls.value.dataset.total = String(r.calls);
    stats.p95.value.textContent = fmtMs(r.p95);
    stats.cold.value.textContent = fmtNum(series.totals?.cold_starts ?? 0);
    stats.workers.value.textContent = fmtNum(r.workers, 1);
  }, 1000);
}

/** `hour` with the points of `minute` (newer, the same step) put in place of its last ones. */
export function merged(hour, minute) {
  const points = hour.points.slice();
  const first = minute.points.length ? minute.points[0].t : Infinity;
  while (points.length && points[points.length - 1].t >= first) points.pop();
  points.push(...minute.points);
  const kept = points.slice(-Math.round(hour.window / hour.step));
  const sum = (key) => kept.reduce((n, p) => n + p[key], 0);
  return {
    ...hour,
    now: minute.now,
    points: kept,
    totals: { calls: sum("calls"), failed: sum("failed"), cold_starts: sum("cold_starts") },
  };
}

export function render(main, ctx) {
  main.append(
    el(
      "div",
      { class: "page-head" },
      el("h1", {}, "Overview"),
      el("p", { class: "muted" }, `Workspace ${ctx.whoami.workspace}, last hour in 30-second slots, live.`),
    ),
  );
  liveSeries(main, ctx);
}
