// Apps and one function's page: its settings, health, charts and latest jobs.

import { jobColumns } from "./jobs.js";
import { el, facts, fill, fmtSeconds, href, link, section, setRows, table, tagsText, timeEl } from "./lib.js";
import { liveSeries } from "./overview.js";

export function render(main, ctx) {
  const columns = [
    { label: "App", cell: (a) => el("strong", { text: a.name }) },
    { label: "Version", cell: (a) => `v${a.version}`, class: "num" },
    {
      label: "Functions",
      cell: (a) =>
        el(
          "span",
          { class: "fn-list" },
          a.functions.map((f) => link(f.name, href("apps", a.name, f.name), { class: "fn-link" })),
        ),
    },
    { label: "Tags", cell: (a) => tagsText(a.tags) },
    { label: "Updated", cell: (a) => timeEl(a.updated_at) },
  ];
  const wrap = table(columns, [], { id: "apps-table" });
  main.append(el("div", { class: "page-head" }, el("h1", {}, "Apps")), el("section", { class: "card" }, wrap));
  const t = wrap.querySelector("table");
  ctx.every(async () => {
    const data = await ctx.api("/apps");
    if (!ctx.alive()) return;
    const appsList = [...data.apps].sort((a, b) => a.name.localeCompare(b.name));
    setRows(t, columns, appsList, "No apps deployed yet: run `ember deploy FILE`.");
  }, 5000);
}

function gpuText(spec) {
  const gpus = spec.gpu || [];
  if (!gpus.length) return "none (CPU)";
  const mem = spec.gpu_memory_mib ? ` (${spec.gpu_memory_mib} MiB reserved on one GPU)` : "";
  return gpus.join(" or ") + mem;
}

function settings(app, fn) {
  const spec = fn.spec || {};
  const s = spec.scaling || {};
  const env = (app.envs || {})[fn.unit];
  return facts([
    ["Kind", fn.kind],
    ["GPU", gpuText(spec)],
    ["Workers", `${s.min_workers ?? 0} min · ${s.max_workers ?? "–"} max${s.buffer_workers ? ` · ${s.buffer_workers} buffer` : ""}`],
    ["Idle timeout", fmtSeconds(s.idle_timeout)],
    ["Concurrency", String(s.concurrency ?? 1)],
    ["Prewarm", s.prewarm || "fixed keep-alive"],
    ["Timeout", fmtSeconds(spec.timeout)],
    ["Retries", String(spec.retries ?? 0)],
    ["CPU / memory", `${spec.cpu ? `${spec.cpu} CPU` : "default CPU"} · ${spec.memory_mib ? `${spec.memory_mib} MiB` : "default memory"}`],
    ["Env", env ? el("code", { text: env }) : "the server's Python"],
    ["Secrets", (spec.secrets || []).join(", ") || "–"],
    ["Tags", tagsText({ ...(app.tags || {}), ...(spec.tags || {}) })],
    ["App version", `v${app.version}, updated `],
  ]);
}

function counts(obj) {
  const entries = Object.entries(obj || {});
  if (!entries.length) return el("span", { class: "muted", text: "none" });
  return el(
    "span",
    { class: "counts" },
    entries.map(([k, v]) => el("span", { class: `count count-${k.toLowerCase()}` }, el("b", { text: String(v) }), ` ${k.toLowerCase()}`)),
  );
}

export async function renderFunction(main, ctx) {
  const [appName, ...rest] = ctx.args;
  const fnName = rest.join("/");
  main.append(
    el(
      "div",
      { class: "page-head" },
      el("p", { class: "crumbs" }, link("Apps", "#/apps"), " / ", appName),
      el("h1", {}, `${appName}/${fnName}`),
    ),
  );
  const info = el("section", { class: "card" }, el("h2", {}, "Settings"), el("p", { class: "muted", text: "Loading…" }));
  const healthBody = el("div", { id: "fn-health" }, el("p", { class: "muted", text: "Loading…" }));
  const health = section("Health", healthBody);
  main.append(el("div", { class: "two-col" }, info, health));

  const app = await ctx.api(`/apps/${encodeURIComponent(appName)}`);
  if (!ctx.alive()) return;
  const fn = app.functions.find((f) => f.name === fnName);
  if (!fn) {
    fill(info, el("h2", {}, "Settings"), el("p", {}, `No function ${fnName} in ${appName} v${app.version}.`));
    return;
  }
  const dl = settings(app, fn);
  dl.lastElementChild.append(timeEl(app.updated_at));
  fill(info, el("h2", {}, "Settings"), dl);

  const fnPath = `/apps/${encodeURIComponent(appName)}/${encodeURIComponent(fnName)}`;
  ctx.every(async () => {
    const h = await ctx.api(`${fnPath}/health`);
    if (!ctx.alive()) return;
    fill(
      healthBody,
      facts([
        ["Jobs", counts(h.jobs)],
        ["Workers", counts(h.workers)],
        ["Version", `v${h.version}`],
      ]),
    );
  }, 2000);

  const charts = el("section", { class: "card" }, el("h2", {}, "Last hour"));
  main.append(charts);
  liveSeries(charts, ctx, { app: appName, function: fnName });

  const columns = jobColumns().filter((c) => c.label !== "Function");
  const wrap = table(columns, [], { id: "fn-jobs" });
  main.append(
    section("Latest jobs", wrap, el("p", {}, link("All jobs of this function", `#/jobs?function=${encodeURIComponent(`${appName}/${fnName}`)}`))),
  );
  const t = wrap.querySelector("table");
  ctx.every(async () => {
    const data = await ctx.api("/jobs", { app: appName, function: fnName, limit: 20 });
    if (!ctx.alive()) return;
    setRows(t, columns, data.jobs, "No jobs yet.");
  }, 2000);
}
