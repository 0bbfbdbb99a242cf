// Cost of the last 24 hours by function or by tag (GET /v1/usage), and each policy's budget.

import { makeChart, setGroups } from "./charts.js";
import { badge, el, fill, fmtMoney, fmtNum, fmtSeconds, fmtTime, section, setRows, table, tagsText, timeEl } from "./lib.js";

const DAY = 86400;
const HOUR = 3600;

function keyText(key, group) {
  const value = key[group];
  if (value === undefined || value === "") return group.startsWith("tag:") ? "(untagged)" : "–";
  return String(value);
}

function hourLabel(epoch) {
  const d = new Date(epoch * 1000);
  return `${String(d.getHours()).padStart(2, "0")}:00`;
}

/** Tag names the workspace uses: on apps, functions and policies. */
function tagNames(apps, policies) {
  const names = new Set();
  for (const a of apps) {
    for (const k of Object.keys(a.tags || {})) names.add(k);
    for (const f of a.functions) for (const k of Object.keys(f.spec?.tags || {})) names.add(k);
  }
  for (const p of policies) for (const k of Object.keys(p.tags || {})) names.add(k);
  return [...names].sort();
}

function budgetRow(p) {
  const row = el("div", { class: "policy", "data-policy": p.name });
  const head = el(
    "div",
    { class: "policy-head" },
    el("strong", { text: p.name }),
    tagsText(p.tags),
    p.blocked ? el("span", { class: "badge badge-failed", text: "blocked" }) : null,
    el("span", { class: "muted", text: `${p.action} · per ${p.period}` }),
  );
  row.append(head);
  if (p.budget_usd === null || p.budget_usd === undefined) {
    row.append(el("p", { class: "muted" }, `${fmtMoney(p.spent_usd)} spent this ${p.period}; no budget.`));
    return row;
  }
  const share = p.budget_usd > 0 ? p.spent_usd / p.budget_usd : p.spent_usd > 0 ? 1 : 0;
  const level = share >= 1 ? "over" : share >= 0.8 ? "near" : "ok";
  const bar = el(
    "div",
    {
      class: `burn burn-${level}`,
      role: "progressbar",
      "aria-label": `${p.name} budget spent`,
      "aria-valuemin": "0",
      "aria-valuemax": String(p.budget_usd),
      "aria-valuenow": String(p.spent_usd),
    },
    el("span", { class: "burn-fill", style: { width: `${Math.min(100, share * 100)}%` } }),
  );
  row.append(
    bar,
    el(
      "p",
      { class: "muted" },
      `${fmtMoney(p.spent_usd)} of ${fmtMoney(p.budget_usd)} (${fmtNum(share * 100, 1)}%) · resets `,
      el("span", { title: fmtTime(p.reset_at) }, timeEl(p.reset_at)),
      p.max_gpus !== null && p.max_gpus !== undefined ? ` · ${p.gpus_held ?? 0} of ${p.max_gpus} GPUs held` : "",
    ),
  );
  return row;
}

export async function render(main, ctx) {
  const groupSel = el("select", { id: "usage-group", name: "usage-group" }, el("option", { value: "function" }, "by function"));
  const total = el("span", { class: "stat-value", id: "usage-total", text: "–" });
  const canvas = el("canvas", { id: "chart-usage", role: "img", "aria-label": "Cost per hour" });
  const columns = [
    { label: "Group", cell: (g) => g.label },
    { label: "Cost", cell: (g) => fmtMoney(g.cost_usd), class: "num" },
    { label: "GPU time", cell: (g) => fmtSeconds(g.gpu_seconds), class: "num" },
    { label: "CPU time", cell: (g) => fmtSeconds(g.cpu_seconds), class: "num" },
    { label: "Cold starts", cell: (g) => fmtNum(g.cold_starts), class: "num" },
    { label: "Idle", cell: (g) => `${fmtNum(g.idle_fraction * 100, 1)}%`, class: "num" },
  ];
  const wrap = table(columns, [], { id: "usage-table" });
  const t = wrap.querySelector("table");
  const policiesBox = el("div", { id: "policies" }, el("p", { class: "muted", text: "Loading…" }));
  main.append(
    el("div", { class: "page-head" }, el("h1", {}, "Usage"), el("p", { class: "muted" }, "Metered cost of the last 24 hours, per hour.")),
    el(
      "section",
      { class: "card" },
      el(
        "div",
        { class: "card-head" },
        el("div", { class: "stat" }, el("span", { class: "stat-label", text: "Cost, last 24 h" }), total),
        el("div", { class: "field" }, el("label", { for: "usage-group", text: "Group" }), groupSel),
      ),
      el("div", { class: "chart-box tall" }, canvas),
      wrap,
    ),
    section("Policies", policiesBox),
  );
  const chart = makeChart(canvas, "bar", [], {
    responsive: true,
    maintainAspectRatio: false,
    animation: false,
    interaction: { mode: "index", intersect: false },
    plugins: {
      legend: { position: "bottom", labels: { boxWidth: 10, boxHeight: 10, font: { size: 11 } } },
      tooltip: { callbacks: { label: (c) => `${c.dataset.label}: ${fmtMoney(c.parsed.y)}` } },
    },
    scales: {
      x: { stacked: true, grid: { display: false }, ticks: { maxRotation: 0, autoSkip: true, font: { size: 10 } } },
      y: { stacked: true, beginAtZero: true, grid: { color: "#eef0f3" }, ticks: { font: { size: 10 }, callback: (v) => fmtMoney(v) } },
    },
  });
  ctx.onDispose(() => chart && chart.destroy());

  const loadUsage = async () => {
    const group = groupSel.value;
    const now = Date.now() / 1000;
    const since = Math.floor((now - DAY) / HOUR) * HOUR;
    const [hourly, totals] = await Promise.all([
      ctx.api("/usage", { group_by: group, granularity: "hour", since }),
      ctx.api("/usage", { group_by: group, since }),
    ]);
    if (!ctx.alive() || group !== groupSel.value) return;
    const starts = [];
    for (let s = since; s <= now; s += HOUR) starts.push(s);
    const index = new Map(starts.map((s, i) => [s, i]));
    const series = new Map();
    for (const g of hourly.groups) {
      const label = keyText(g.key, group);
      if (!series.has(label)) series.set(label, new Array(starts.length).fill(0));
      const i = index.get(g.start);
      if (i !== undefined) series.get(label)[i] += g.cost_usd;
    }
    setGroups(chart, starts.map(hourLabel), [...series].map(([label, data]) => ({ label, data })));
    const rows = totals.groups.map((g) => ({ ...g, label: keyText(g.key, group) })).sort((a, b) => b.cost_usd - a.cost_usd);
    setRows(t, columns, rows, "No usage in the last 24 hours.");
    const sum = rows.reduce((a, g) => a + g.cost_usd, 0);
    total.textContent = fmtMoney(sum);
    total.dataset.total = String(sum);
  };

  const loadPolicies = async () => {
    let policies = [];
    try {
      policies = (await ctx.api("/policies")).policies;
    } catch (err) {
      if (err.status !== 403) throw err;
      fill(policiesBox, el("p", { class: "muted", text: err.message }));
      return [];
    }
    if (!ctx.alive()) return policies;
    fill(
      policiesBox,
      policies.length ? policies.map(budgetRow) : el("p", { class: "muted", text: "No policies: `ember policy create` sets tags and budgets." }),
    );
    return policies;
  };

  groupSel.addEventListener("change", () => loadUsage().catch((err) => ctx.fail(err)));
  const [apps, policies] = await Promise.all([ctx.api("/apps"), loadPolicies()]);
  if (!ctx.alive()) return;
  for (const name of tagNames(apps.apps, policies)) {
    groupSel.append(el("option", { value: `tag:${name}` }, `by tag ${name}`));
  }
  ctx.every(loadUsage, 10000);
  let first = true;
  ctx.every(async () => {
    if (first) {
      first = false;
      return;
    }
    await loadPolicies();
  }, 10000);
}
