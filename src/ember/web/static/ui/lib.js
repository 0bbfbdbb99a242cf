// Formatting and DOM helpers. Data only ever reaches the page as text nodes or attributes,
// never through innerHTML, so a job's output or a tag value cannot inject markup.

export const STATUSES = ["IN_QUEUE", "IN_PROGRESS", "COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"];
export const TERMINAL = new Set(["COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"]);

/** el("a", {href: "#/x", class: "c"}, "text", child): an element with attributes and children. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = String(value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key === "style" && typeof value === "object") Object.assign(node.style, value);
    else if (key.startsWith("on") && typeof value === "function") {
      node.addEventListener(key.slice(2), value);
    } else if (value === true) node.setAttribute(key, "");
    else node.setAttribute(key, String(value));
  }
  append(node, ...children);
  return node;
}

export function append(node, ...children) {
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
  return node;
}

/** Replace a node's children, in one go. */
export function fill(node, ...children) {
  clear(node);
  return append(node, ...children);
}

/** Milliseconds, in the unit that reads best. */
export function fmtMs(ms) {
  if (ms === null || ms === undefined || !Number.isFinite(ms)) return "–";
  const a = Math.abs(ms);
  if (a === 0) return "0 ms";
  if (a < 1) return `${ms.toFixed(2)} ms`;
  if (a < 10) return `${ms.toFixed(1)} ms`;
  if (a < 1000) return `${Math.round(ms)} ms`;
  if (a < 10000) return `${(ms / 1000).toFixed(2)} s`;
  if (a < 60000) return `${(ms / 1000).toFixed(1)} s`;
  const s = Math.round(ms / 1000);
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
}

export function fmtSeconds(s) {
  return s === null || s === undefined ? "–" : fmtMs(s * 1000);
}

/** US dollars with enough digits that a tiny non-zero cost never reads as $0.00. */
export function fmtMoney(usd) {
  if (usd === null || usd === undefined || !Number.isFinite(usd)) return "–";
  if (usd === 0) return "$0";
  const a = Math.abs(usd);
  const sign = usd < 0 ? "-" : "";
  if (a >= 1) return `${sign}$${a.toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 })}`;
  // two significant digits after the leading zeros, at most 10 decimals
  const digits = Math.min(10, Math.max(2, Math.ceil(-Math.log10(a)) + 1));
  let text = a.toFixed(digits);
  if (Number(text) === 0) return `${sign}<$0.0000000001`;
  text = text.replace(/(\.\d*?[1-9])0+$/, "$1");
  return `${sign}$${text}`;
}

export function fmtNum(n, digits = 0) {
  if (n === null || n === undefined || !Number.isFinite(n)) return "–";
  return n.toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: 0 });
}

export function fmtBytes(b) {
  if (b === null || b === undefined) return "–";
  if (b < 1024) return `${b} B`;
  if (b < 1024 ** 2) return `${(b / 1024).toFixed(1)} KiB`;
  if (b < 1024 ** 3) return `${(b / 1024 ** 2).toFixed(1)} MiB`;
  return `${(b / 1024 ** 3).toFixed(1)} GiB`;
}

export function fmtMib(mib) {
  if (mib === null || mib === undefined) return "–";
  return mib >= 1024 ? `${fmtNum(mib / 1024, 1)} GiB` : `${mib} MiB`;
}

function pad(n) {
  return String(n).padStart(2, "0");
}

/** Epoch seconds as local "YYYY-MM-DD HH:MM:SS". */
export function fmtTime(epoch) {
  if (epoch === null || epoch === undefined) return "–";
  const d = new Date(epoch * 1000);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

export function fmtClock(epoch) {
  const d = new Date(epoch * 1000);
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

/** "12 s ago", "3 min ago", "in 2 h". */
export function fmtRel(epoch, now = Date.now() / 1000) {
  if (epoch === null || epoch === undefined) return "–";
  const delta = now - epoch;
  const a = Math.abs(delta);
  let text;
  if (a < 5) return "just now";
  if (a < 60) text = `${Math.round(a)} s`;
  else if (a < 3600) text = `${Math.round(a / 60)} min`;
  else if (a < 86400) text = `${Math.round(a / 3600)} h`;
  else text = `${Math.round(a / 86400)} d`;
  return delta >= 0 ? `${text} ago` : `in ${text}`;
}

/** A <time> showing relative time, the absolute one in its title. */
export function timeEl(epoch) {
  if (epoch === null || epoch === undefined) return el("span", { class: "muted", text: "–" });
  return el("time", { datetime: new Date(epoch * 1000).toISOString(), title: fmtTime(epoch), text: fmtRel(epoch) });
}

export function badge(status) {
  const kind = String(status || "").toLowerCase().replace(/[^a-z_]/g, "");
  return el("span", { class: `badge badge-${kind}`, text: status || "–" });
}

/** Text cut to `limit` characters, with whether it was cut. */
export function cut(text, limit) {
  if (text.length <= limit) return { text, cut: false };
  return { text: text.slice(0, limit), cut: true };
}

export function pretty(value) {
  if (value === undefined) return "";
  try {
    return JSON.stringify(value, null, 2);
  } catch {
    return String(value);
  }
}

/** "#/apps/a/b" from parts, each part encoded. */
export function href(...parts) {
  return `#/${parts.map((p) => encodeURIComponent(p)).join("/")}`;
}

export function link(text, target, attrs = {}) {
  return el("a", { href: target, ...attrs }, text);
}

/**
 * A table: columns [{label, cell(row) -> Node|string, class}], inside a container that
 * scrolls sideways on narrow screens.
 */
export function table(columns, rows, attrs = {}) {
  const body = el("tbody");
  const t = el(
    "table",
    attrs,
    el("thead", {}, el("tr", {}, columns.map((c) => el("th", { scope: "col", class: c.class }, c.label)))),
    body,
  );
  setRows(t, columns, rows);
  return el("div", { class: "table-wrap" }, t);
}

export function setRows(tableNode, columns, rows, empty = "Nothing yet.") {
  const body = tableNode.tBodies[0];
  clear(body);
  if (!rows.length) {
    body.append(el("tr", {}, el("td", { colspan: columns.length, class: "muted empty", text: empty })));
    return;
  }
  for (const row of rows) body.append(rowOf(columns, row));
}

export function rowOf(columns, row) {
  return el("tr", {}, columns.map((c) => el("td", { class: c.class }, c.cell(row))));
}

/** A definition list from [label, value] pairs. */
export function facts(pairs) {
  const dl = el("dl", { class: "facts" });
  for (const [label, value] of pairs) dl.append(el("dt", {}, label), el("dd", {}, value ?? "–"));
  return dl;
}

export function section(title, ...children) {
  return el("section", { class: "card" }, el("h2", {}, title), ...children);
}

export function tagsText(tags) {
  const entries = Object.entries(tags || {});
  if (!entries.length) return el("span", { class: "muted", text: "–" });
  return el("span", {}, entries.map(([k, v]) => el("span", { class: "tag", text: `${k}=${v}` })));
}
