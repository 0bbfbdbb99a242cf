// GPUs of each node (GET /v1/nodes), what this workspace runs on them, and its live workers.

import { badge, el, fill, fmtMib, fmtSeconds, href, link, section, setRows, table } from "./lib.js";

function holders(gpu) {
  if (!gpu.workers.length) {
    return el("span", { class: "muted", text: gpu.in_use ? "in use by another workspace" : "free" });
  }
  return el(
    "ul",
    { class: "plain" },
    gpu.workers.map((w) =>
      el(
        "li",
        {},
        el("code", { text: w.worker }),
        " ",
        link(`${w.app}/${w.unit}`, href("apps", w.app, w.unit)),
        " ",
        badge(w.state),
        w.memory_mib ? ` ${fmtMib(w.memory_mib)} reserved` : "",
        w.jobs.length ? ` · ${w.jobs.length} job${w.jobs.length === 1 ? "" : "s"}` : "",
      ),
    ),
  );
}

const gpuColumns = [
  { label: "GPU", cell: (g) => el("span", {}, el("strong", { text: `#${g.index} ${g.type}` }), g.simulated ? el("span", { class: "badge badge-simulated", text: "simulated" }) : null) },
  { label: "Memory", cell: (g) => fmtMib(g.memory_mib), class: "num" },
  { label: "Held by", cell: holders },
  { label: "UUID", cell: (g) => (g.uuid ? el("code", { class: "small", text: g.uuid }) : el("span", { class: "muted", text: "–" })) },
];

function nodeCard(node) {
  const simulated = node.gpus.length > 0 && node.gpus.every((g) => g.simulated);
  const wrap = table(gpuColumns, [], { class: "gpu-table", "data-node": node.name });
  setRows(wrap.querySelector("table"), gpuColumns, node.gpus, "No GPUs on this node: functions run on CPU.");
  return el(
    "section",
    { class: "card node" },
    el(
      "h2",
      {},
      node.name,
      " ",
      el("span", { class: "muted small", text: `${node.backend} backend · ${node.gpus.length} GPU${node.gpus.length === 1 ? "" : "s"}` }),
      simulated ? el("span", { class: "badge badge-simulated", text: "simulated" }) : null,
    ),
    wrap,
  );
}

export function render(main, ctx) {
  const nodesBox = el("div", { id: "nodes" }, el("p", { class: "muted", text: "Loading…" }));
  const columns = [
    { label: "Worker", cell: (w) => el("code", { text: w.id }) },
    { label: "Function", cell: (w) => link(`${w.app}/${w.unit}`, href("apps", w.app, w.unit)) },
    { label: "State", cell: (w) => badge(w.state) },
    { label: "GPUs", cell: (w) => (w.gpus.length ? `${w.gpu_type || ""} ${w.gpus.map((i) => `#${i}`).join(", ")}`.trim() : "–") },
    { label: "Jobs", cell: (w) => String(w.jobs.length), class: "num" },
    { label: "Version", cell: (w) => `v${w.version}`, class: "num" },
    { label: "Policy", cell: (w) => w.policy || "–" },
    { label: "Age", cell: (w) => fmtSeconds(w.age_s), class: "num" },
  ];
  const wrap = table(columns, [], { id: "workers-table" });
  const t = wrap.querySelector("table");
  main.append(
    el("div", { class: "page-head" }, el("h1", {}, "GPUs"), el("p", { class: "muted" }, "Each node's GPUs and which of this workspace's workers hold them.")),
    nodesBox,
    section("Workers", wrap),
  );
  ctx.every(async () => {
    const [nodes, workers] = await Promise.all([ctx.api("/nodes"), ctx.api("/workers")]);
    if (!ctx.alive()) return;
    fill(nodesBox, nodes.nodes.map(nodeCard));
    const live = [...workers.workers].sort((a, b) => `${a.app}/${a.unit}/${a.id}`.localeCompare(`${b.app}/${b.unit}/${b.id}`));
    setRows(t, columns, live, "No live workers: every function is scaled to zero.");
  }, 2000);
}
