// The dashboard shell: sign-in, the API wrapper, the error banner, the nav and the hash router.
// Each page module exports render(main, ctx); ctx carries the API and the page's lifetime, so
// leaving a page aborts its requests and stops its polling and charts.

import { el, fill } from "./lib.js";
import * as overview from "./overview.js";
import * as apps from "./apps.js";
import * as jobs from "./jobs.js";
import * as usage from "./usage.js";
import * as gpus from "./gpus.js";
import * as audit from "./audit.js";

const TOKEN_KEY = "ember.token";
const NAV = [
  ["overview", "Overview"],
  ["apps", "Apps"],
  ["jobs", "Jobs"],
  ["usage", "Usage"],
  ["gpus", "GPUs"],
  ["audit", "Audit", "admin"],
];

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

let whoami = null;
let page = null; // {controller, disposers}
const main = document.getElementById("main");
const banner = document.getElementById("banner");

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

/** GET (or another method) under /v1, as JSON; an error answer throws its message. */
export async function api(path, params = {}, { signal, method = "GET", body } = {}) {
  const query = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null && v !== "") query.set(k, String(v));
  }
  const qs = query.toString();
  const headers = { Authorization: `Bearer ${token() || ""}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(`/v1${path}${qs ? `?${qs}` : ""}`, {
      method,
      headers,
      signal,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, "network", "Cannot reach the server.");
  }
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  if (!response.ok) {
    const e = data && data.error;
    throw new ApiError(response.status, e?.code || "error", e?.message || `HTTP ${response.status}`);
  }
  return data;
}

export function showError(message) {
  fill(
    banner,
    el("span", { class: "banner-text", text: message }),
    el("button", { type: "button", class: "banner-close", "aria-label": "Dismiss", onclick: hideError }, "×"),
  );
  banner.hidden = false;
}

export function hideError() {
  banner.hidden = true;
  fill(banner);
}

function dispose() {
  if (!page) return;
  page.controller.abort();
  for (const fn of page.disposers) {
    try {
      fn();
    } catch (err) {
      console.warn(err);
    }
  }
  page = null;
}

/** What a page gets: the API bound to its lifetime, polling, and error reporting. */
function context(args) {
  const controller = new AbortController();
  const disposers = [];
  page = { controller, disposers };
  const alive = () => !controller.signal.aborted;
  const ctx = {
    args,
    whoami,
    alive,
    api: (path, params, opts = {}) => api(path, params, { ...opts, signal: controller.signal }),
    onDispose: (fn) => disposers.push(fn),
    /** Report an error of this page (ignores aborts after leaving it); a 401 signs out. */
    fail(err) {
      if (!alive() || err.name === "AbortError") return;
      if (err.status === 401) {
        signOut(err.message);
        return;
      }
      console.warn(err);
      showError(err.message || String(err));
    },
    /**
     * Run fn now and then every `ms`, never two at once; paused while the tab is hidden and
     * skipped while `when()` says no. fn's errors go to the banner; a success clears a
     * banner that a failed poll had raised.
     */
    every(fn, ms, when = () => true) {
      let timer = null;
      let failed = false;
      const tick = async () => {
        timer = null;
        if (!alive()) return;
        if (!document.hidden && when()) {
          try {
            await fn();
            if (failed && alive()) hideError();
            failed = false;
          } catch (err) {
            failed = err.name !== "AbortError";
            ctx.fail(err);
          }
        }
        if (alive()) timer = setTimeout(tick, ms);
      };
      const wake = () => {
        if (!document.hidden && timer !== null && alive()) {
          clearTimeout(timer);
          tick();
        }
      };
      document.addEventListener("visibilitychange", wake);
      disposers.push(() => {
        if (timer !== null) clearTimeout(timer);
        document.removeEventListener("visibilitychange", wake);
      });
      tick();
    },
  };
  return ctx;
}

function renderHeader() {
  const nav = document.getElementById("nav");
  const who = document.getElementById("who");
  if (!whoami) {
    fill(nav);
    fill(who);
    return;
  }
  const links = NAV.filter(([, , scope]) => !scope || whoami.scope === scope);
  fill(
    nav,
    links.map(([route, label]) => el("a", { href: `#/${route}`, "data-route": route, text: label })),
  );
  fill(
    who,
    el("span", { class: "who-label", text: "workspace" }),
    el("strong", { id: "workspace", text: whoami.workspace }),
    el("span", { id: "scope", class: "scope", title: `token ${whoami.token}`, text: whoami.scope }),
    el("button", { type: "button", id: "signout", class: "secondary", onclick: () => signOut() }, "Sign out"),
  );
}

function markNav(route) {
  for (const a of document.querySelectorAll("#nav a")) {
    if (a.dataset.route === route) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  whoami = null;
  dispose();
  renderHeader();
  renderSignIn(message);
}

function renderSignIn(message) {
  hideError();
  document.title = "Sign in · ember";
  const input = el("input", {
    id: "token",
    type: "password",
    name: "token",
    autocomplete: "current-password",
    required: true,
    spellcheck: "false",
    placeholder: "ember_…",
  });
  const error = el("p", { id: "signin-error", class: "form-error", role: "alert" });
  if (message) error.textContent = message;
  const button = el("button", { type: "submit", id: "signin" }, "Sign in");
  const form = el(
    "form",
    { class: "card signin", novalidate: true },
    el("h1", {}, "Sign in"),
    el("p", { class: "muted" }, "Paste an API token. It stays in this tab only (session storage) and shows its own workspace."),
    el("label", { for: "token" }, "Token"),
    input,
    error,
    button,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const value = input.value.trim();
    if (!value) {
      error.textContent = "Paste a token first.";
      return;
    }
    button.disabled = true;
    sessionStorage.setItem(TOKEN_KEY, value);
    try {
      whoami = await api("/whoami");
    } catch (err) {
      sessionStorage.removeItem(TOKEN_KEY);
      error.textContent = err.message;
      button.disabled = false;
      return;
    }
    renderHeader();
    if (!location.hash || location.hash === "#" || location.hash === "#/") location.hash = "#/overview";
    else route();
  });
  fill(main, form);
  input.focus();
}

const ROUTES = {
  overview: (m, ctx) => overview.render(m, ctx),
  apps: (m, ctx) => (ctx.args.length >= 2 ? apps.renderFunction(m, ctx) : apps.render(m, ctx)),
  jobs: (m, ctx) => (ctx.args.length >= 1 ? jobs.renderJob(m, ctx) : jobs.render(m, ctx)),
  usage: (m, ctx) => usage.render(m, ctx),
  gpus: (m, ctx) => gpus.render(m, ctx),
  audit: (m, ctx) => audit.render(m, ctx),
};

function route() {
  if (!whoami) return;
  const [raw, search = ""] = location.hash.replace(/^#\/?/, "").split("?", 2);
  const parts = raw.split("/").filter(Boolean).map((p) => {
    try {
      return decodeURIComponent(p);
    } catch {
      return p;
    }
  });
  const name = parts[0] || "overview";
  const args = parts.slice(1);
  dispose();
  hideError();
  markNav(name);
  const handler = ROUTES[name];
  if (!handler || (name === "audit" && whoami.scope !== "admin")) {
    fill(main, el("section", { class: "card" }, el("h1", {}, "Not found"), el("p", {}, "No such page. ", el("a", { href: "#/overview" }, "Go to the overview."))));
    return;
  }
  const label = NAV.find(([r]) => r === name)?.[1] || name;
  document.title = `${[label, ...args].join(" · ")} · ember`;
  fill(main);
  const ctx = context(args);
  ctx.query = new URLSearchParams(search);
  Promise.resolve()
    .then(() => handler(main, ctx))
    .catch((err) => ctx.fail(err));
}

async function start() {
  window.addEventListener("hashchange", route);
  if (!token()) {
    renderSignIn();
    return;
  }
  try {
    whoami = await api("/whoami");
  } catch (err) {
    if (err.status === 401) {
      signOut(err.message);
      return;
    }
    renderSignIn();
    showError(err.message);
    return;
  }
  renderHeader();
  route();
}

start();
