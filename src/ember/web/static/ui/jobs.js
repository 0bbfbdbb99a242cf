// The job list: filters by function, status and id prefix, "Load more" through next_cursor,
// and a refresh every 2 s unless a filter has focus (so typing is never interrupted).

import { STATUSES, badge, el, fmtMoney, fmtMs, href, link, rowOf, setRows, table, timeEl } from "./lib.js";

export { renderJob } from "./job.js";

const PAGE = 50;
const MAX_LIMIT = 500;

export function jobColumns() {
  return [
    { label: "Id", cell: (j) => link(j.id, href("jobs", j.id), { class: "mono" }) },
    { label: "Function", cell: (j) => link(`${j.app}/${j.function}`, href("apps", j.app, j.function)) },
    { label: "Status", cell: (j) => badge(j.status) },
    { label: "Created", cell: (j) => timeEl(j.created_at) },
    { label: "Duration", cell: (j) => fmtMs(j.total_ms), class: "num" },
    { label: "Cost", cell: (j) => fmtMoney(j.cost_usd), class: "num" },
  ];
}

function select(id, label, options, value) {
  const node = el(
    "select",
    { id, name: id },
    options.map(([v, text]) => el("option", { value: v, selected: v === value }, text)),
  );
  return { node, field: el("div", { class: "field" }, el("label", { for: id, text: label }), node) };
}

export function render(main, ctx) {
  const initialFn = ctx.query.get("function") || "";
  const initialStatus = ctx.query.get("status") || "";
  const fnSel = select("filter-function", "Function", [["", "all functions"]], initialFn);
  if (initialFn) fnSel.node.append(el("option", { value: initialFn, selected: true }, initialFn));
  const statusSel = select(
    "filter-status",
    "Status",
    [["", "all"], ...STATUSES.map((s) => [s, s])],
    initialStatus,
  );
  const idInput = el("input", {
    id: "filter-id",
    name: "filter-id",
    type: "search",
    placeholder: "id prefix",
    autocomplete: "off",
    spellcheck: "false",
  });
  const filters = el(
    "form",
    { class: "filters", role: "search" },
    fnSel.field,
    statusSel.field,
    el("div", { class: "field" }, el("label", { for: "filter-id", text: "Id" }), idInput),
  );
  filters.addEventListener("submit", (e) => e.preventDefault());
  const columns = jobColumns();
  const wrap = table(columns, [], { id: "jobs-table" });
  const t = wrap.querySelector("table");
  const more = el("button", { type: "button", id: "jobs-more", class: "secondary", hidden: true }, "Load more");
  const count = el("span", { class: "muted", id: "jobs-count" });
  main.append(
    el("div", { class: "page-head" }, el("h1", {}, "Jobs")),
    el("section", { class: "card" }, filters, wrap, el("div", { class: "table-foot" }, count, more)),
  );

  let rows = [];
  let cursor = null;
  let generation = 0; // a filter change makes answers to older queries stale

  const query = () => {
    const q = {};
    const fn = fnSel.node.value;
    if (fn) {
      const i = fn.indexOf("/");
      q.app = fn.slice(0, i);
      q.function = fn.slice(i + 1);
    }
    if (statusSel.node.value) q.status = statusSel.node.value;
    const id = idInput.value.trim();
    if (id) q.id = id;
    return q;
  };

  const show = () => {
    setRows(t, columns, rows, "No jobs match.");
    more.hidden = !cursor;
    count.textContent = `${rows.length} job${rows.length === 1 ? "" : "s"}${cursor ? " shown" : ""}`;
  };

  /** The first rows.length (at least a page) jobs again: new ones appear, old ones update. */
  const refresh = async () => {
    const gen = generation;
    const limit = Math.min(MAX_LIMIT, Math.max(PAGE, rows.length));
    const data = await ctx.api("/jobs", { ...query(), limit });
    if (!ctx.alive() || gen !== generation) return;
    rows = data.jobs;
    cursor = data.next_cursor;
    show();
  };

  more.addEventListener("click", async () => {
    if (!cursor) return;
    const gen = generation;
    more.disabled = true;
    try {
      const data = await ctx.api("/jobs", { ...query(), limit: PAGE, cursor });
      if (!ctx.alive() || gen !== generation) return;
      const seen = new Set(rows.map((r) => r.id));
      const fresh = data.jobs.filter((j) => !seen.has(j.id));
      rows = rows.concat(fresh);
      cursor = data.next_cursor;
      for (const j of fresh) t.tBodies[0].append(rowOf(columns, j));
      more.hidden = !cursor;
      count.textContent = `${rows.length} jobs${cursor ? " shown" : ""}`;
    } catch (err) {
      ctx.fail(err);
    } finally {
      more.disabled = false;
    }
  });

  const restart = () => {
    generation += 1;
    rows = [];
    cursor = null;
    refresh().catch((err) => ctx.fail(err));
  };
  fnSel.node.addEventListener("change", restart);
  statusSel.node.addEventListener("change", restart);
  let typing = null;
  idInput.addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(restart, 250);
  });
  ctx.onDispose(() => clearTimeout(typing));

  ctx.api("/apps")
    .then((data) => {
      if (!ctx.alive()) return;
      const names = data.apps.flatMap((a) => a.functions.map((f) => `${a.name}/${f.name}`)).sort();
      const current = fnSel.node.value;
      for (const opt of [...fnSel.node.options].slice(1)) opt.remove();
      for (const name of names) fnSel.node.append(el("option", { value: name, selected: name === current }, name));
      if (current && !names.includes(current)) {
        fnSel.node.append(el("option", { value: current, selected: true }, current));
      }
    })
    .catch((err) => ctx.fail(err));

  ctx.every(refresh, 2000, () => !filters.contains(document.activeElement));
}
