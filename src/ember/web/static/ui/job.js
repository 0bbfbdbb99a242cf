// One job: its status, cost, timings bar, input, output, error and log lines. It refreshes
// every 2 s until the job ends.

import { TERMS } from "./charts.js";
import {
  TERMINAL,
  badge,
  cut,
  el,
  facts,
  fill,
  fmtBytes,
  fmtClock,
  fmtMoney,
  fmtMs,
  fmtNum,
  fmtTime,
  href,
  link,
  pretty,
  section,
  tagsText,
  timeEl,
} from "./lib.js";

const OUTPUT_LIMIT = 8 * 1024;

function timingBar(timings) {
  const bar = el("div", { id: "timing-bar", class: "timing-bar", role: "img" });
  const legend = el("ul", { class: "legend", id: "timing-legend" });
  if (!timings) {
    bar.classList.add("empty");
    bar.setAttribute("aria-label", "no timings yet");
    return el("div", {}, bar, el("p", { class: "muted", text: "No timings yet: the job has not ended." }));
  }
  const parts = TERMS.map(([key, label, color]) => ({ key, label, color, ms: timings[key] || 0 }));
  const sum = parts.reduce((a, p) => a + p.ms, 0) || 1;
  bar.dataset.total = String(timings.total_ms);
  bar.setAttribute("aria-label", parts.map((p) => `${p.label} ${fmtMs(p.ms)}`).join(", "));
  for (const p of parts) {
    const share = (p.ms / sum) * 100;
    if (share > 0) {
      bar.append(
        el("span", {
          class: "seg",
          title: `${p.label}: ${fmtMs(p.ms)}`,
          "data-term": p.key,
          style: { width: `${share}%`, background: p.color },
        }),
      );
    }
    legend.append(
      el(
        "li",
        {},
        el("span", { class: "swatch", style: { background: p.color } }),
        `${p.label} `,
        el("b", { text: fmtMs(p.ms) }),
      ),
    );
  }
  legend.append(el("li", { class: "legend-total" }, "total ", el("b", { text: fmtMs(timings.total_ms) })));
  return el("div", {}, bar, legend);
}

function outputBlock(job) {
  const pre = el("pre", { id: "job-output", class: "code" });
  if (job.output === null || job.output === undefined) {
    pre.textContent = TERMINAL.has(job.status) ? "null" : "(not yet)";
    return [pre];
  }
  const full = pretty(job.output);
  const shown = cut(full, OUTPUT_LIMIT);
  pre.textContent = shown.text;
  const note = shown.cut
    ? el("p", { class: "note", id: "job-output-note", text: `Showing the first 8 KiB of ${fmtBytes(new Blob([full]).size)}; the whole output is at GET /v1/jobs/${job.id}.` })
    : null;
  return [pre, note];
}

function errorBlock(error) {
  if (!error) return null;
  return section(
    "Error",
    el("p", { class: "error-line" }, el("strong", { text: error.type }), ": ", error.message),
    error.traceback ? el("pre", { class: "code traceback", id: "job-traceback", text: error.traceback }) : null,
  );
}

function summary(job) {
  const cost = job.cost || {};
  return facts([
    ["Status", badge(job.status)],
    ["Function", link(`${job.app}/${job.function}`, href("apps", job.app, job.function))],
    ["Attempts", String(job.attempts ?? 0)],
    ["Created", el("span", {}, fmtTime(job.created_at), " (", timeEl(job.created_at), ")")],
    ["Finished", job.finished_at ? fmtTime(job.finished_at) : "–"],
    ["Cost", job.cost ? fmtMoney(cost.usd) : "–"],
    ["GPU / CPU", job.cost ? `${fmtNum(cost.gpu_seconds, 3)} GPU s · ${fmtNum(cost.cpu_seconds, 3)} CPU s` : "–"],
    ["Tags", tagsText(job.tags)],
    ...(job.reason ? [["Waiting", job.reason]] : []),
  ]);
}

function logText(lines) {
  if (!lines.length) return "No log lines for this job.";
  return lines.map((l) => `${fmtClock(l.ts)} ${l.stream === "stderr" ? "! " : "  "}${l.line}`).join("\n");
}

export async function renderJob(main, ctx) {
  const id = ctx.args.join("/");
  const head = el("div", { class: "page-head" }, el("p", { class: "crumbs" }, link("Jobs", "#/jobs"), " / job"), el("h1", { class: "mono", text: id }));
  const summaryBox = section("Job", el("p", { class: "muted", text: "Loading…" }));
  const timingBox = section("Timings", el("div", {}));
  const errorBox = el("div", {});
  const inputPre = el("pre", { id: "job-input", class: "code", text: "Loading…" });
  const inputNote = el("p", { class: "note", id: "job-input-note", hidden: true });
  const outputBox = el("div", {});
  const logsPre = el("pre", { id: "job-logs", class: "code logs", text: "Loading…" });
  main.append(
    head,
    el("div", { class: "two-col" }, summaryBox, timingBox),
    errorBox,
    el("div", { class: "two-col" }, section("Input", inputPre, inputNote), section("Output", outputBox)),
    section("Logs", logsPre),
  );

  ctx
    .api(`/jobs/${encodeURIComponent(id)}/input`)
    .then((data) => {
      if (!ctx.alive()) return;
      let text = data.input;
      if (!data.truncated) {
        try {
          text = JSON.stringify(JSON.parse(text), null, 2);
        } catch {
          // shown as stored
        }
      }
      inputPre.textContent = text;
      if (data.truncated) {
        inputNote.hidden = false;
        inputNote.textContent = `Truncated: showing ${fmtBytes(new Blob([data.input]).size)} of ${fmtBytes(data.bytes)}.`;
      }
    })
    .catch((err) => {
      if (err.name === "AbortError") return;
      inputPre.textContent = `Input unavailable: ${err.message}`;
    });

  let ended = false;
  let lastStatus = null;
  const loadLogs = async (job) => {
    const data = await ctx.api(`/apps/${encodeURIComponent(job.app)}/${encodeURIComponent(job.function)}/logs`, { job: job.id, tail: 1000 });
    if (!ctx.alive()) return;
    const lines = data.lines.filter((l) => !l.job || l.job === job.id);
    logsPre.textContent = logText(lines);
  };
  ctx.every(
    async () => {
      let job;
      try {
        job = await ctx.api(`/jobs/${encodeURIComponent(id)}`);
      } catch (err) {
        if (err.status !== 404) throw err;
        ended = true;
        fill(summaryBox, el("h2", {}, "Job"), el("p", { class: "form-error", text: err.message }));
        logsPre.textContent = "";
        return;
      }
      if (!ctx.alive()) return;
      ended = TERMINAL.has(job.status);
      if (job.status !== lastStatus || !ended) {
        fill(summaryBox, el("h2", {}, "Job"), summary(job));
        fill(timingBox, el("h2", {}, "Timings"), timingBar(job.timings));
        fill(errorBox, errorBlock(job.error));
        fill(outputBox, ...outputBlock(job));
      }
      lastStatus = job.status;
      try {
        await loadLogs(job);
      } catch (err) {
        if (err.name === "AbortError") return;
        logsPre.textContent = `Logs unavailable: ${err.message}`;
      }
    },
    2000,
    () => !ended,
  );
}
