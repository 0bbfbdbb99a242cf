// The workspace's audit trail (admin tokens only), newest first.

import { badge, el, fmtNum, fmtTime, setRows, table, timeEl } from "./lib.js";

const SPANS = [
  [3600, "last hour"],
  [86400, "last 24 hours"],
  [7 * 86400, "last 7 days"],
  [30 * 86400, "last 30 days"],
];
const SHOWN = 500;

export function render(main, ctx) {
  const span = el(
    "select",
    { id: "audit-span", name: "audit-span" },
    SPANS.map(([s, label]) => el("option", { value: String(s), selected: s === 86400 }, label)),
  );
  const columns = [
    { label: "Time", cell: (e) => el("span", { title: fmtTime(e.ts) }, timeEl(e.ts)) },
    { label: "Actor", cell: (e) => e.actor },
    { label: "Action", cell: (e) => el("code", { text: e.action }) },
    { label: "Target", cell: (e) => e.target || "–" },
    { label: "Outcome", cell: (e) => badge(e.outcome === "ok" ? "ok" : e.outcome) },
    { label: "Count", cell: (e) => fmtNum(e.count ?? 1), class: "num" },
    { label: "Source", cell: (e) => e.ip || "–" },
  ];
  const wrap = table(columns, [], { id: "audit-table" });
  const t = wrap.querySelector("table");
  const note = el("p", { class: "muted", id: "audit-count" });
  main.append(
    el("div", { class: "page-head" }, el("h1", {}, "Audit")),
    el(
      "section",
      { class: "card" },
      el("div", { class: "filters" }, el("div", { class: "field" }, el("label", { for: "audit-span", text: "Since" }), span)),
      wrap,
      note,
    ),
  );
  const load = async () => {
    const since = Math.floor(Date.now() / 1000) - Number(span.value);
    const data = await ctx.api("/audit", { since, limit: 100000 });
    if (!ctx.alive()) return;
    const events = [...data.events].reverse();
    setRows(t, columns, events.slice(0, SHOWN), "No events in this span.");
    note.textContent = events.length > SHOWN ? `Newest ${SHOWN} of ${fmtNum(events.length)} events.` : `${fmtNum(events.length)} events.`;
  };
  span.addEventListener("change", () => load().catch((err) => ctx.fail(err)));
  ctx.every(load, 10000, () => document.activeElement !== span);
}
