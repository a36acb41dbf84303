// The merchant dashboard: every number and action goes through the public
// API (API.md) with the merchant's JWT, as a merchant's own dashboard would.
// The token lives in sessionStorage only (gone when the tab closes); a link
// may carry it in the URL fragment (#token=…), which browsers never send.
"use strict";

const TOKEN = "connected-apps.token";
const PALETTE = ["#0b5cad", "#c2410c", "#15803d", "#7e22ce", "#b91c1c", "#0e7490", "#a16207", "#be185d", "#4d7c0f", "#475569"];
const $ = (selector, root = document) => root.querySelector(selector);

/** Builds an element: h("td", {class: "number"}, "12"). Text is never HTML. */
function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === false || value === null || value === undefined) continue;
    if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else if (name === "value") element.value = value;
    else if (name === "checked") element.checked = value;
    else element.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return element;
}

const number = (n) => (n < 0 ? "Unlimited" : new Intl.NumberFormat("en").format(n));
const day = (iso) => (iso ? new Date(iso).toLocaleDateString("en-GB", { year: "numeric", month: "short", day: "numeric", timeZone: "UTC" }) : "—");

/** An answer of the API other than 2xx, with the contract's error body. */
class ApiError extends Error {
  constructor(status, body) {
    super(body?.error?.message ?? `The service answered ${status}`);
    this.status = status;
    this.code = body?.error?.code ?? "unknown";
    this.details = body?.error?.details ?? [];
    this.body = body;
  }
}

/** An answer that arrived after its session ended (signed out, or signed in
 * again): never drawn. */
class Stale extends Error {}
let session = 0;

async function api(method, path, body, extraHeaders = {}) {
  const asked = session;
  const headers = { Authorization: `Bearer ${sessionStorage.getItem(TOKEN)}`, ...extraHeaders };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch {
    throw new ApiError(0, { error: { code: "network", message: "The service cannot be reached; check the connection and try again." } });
  }
  const data = await response.json().catch(() => null);
  if (asked !== session) throw new Stale();
  if (response.status === 401) {
    signOut(data?.error?.message ?? "Your session has ended; sign in again.");
    throw new ApiError(401, data);
  }
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

function notify(message, isError = false) {
  const notice = $("#notice");
  notice.classList.toggle("error", isError);
  notice.textContent = message;
}

/** Shows an error in a section instead of its content: never a blank page. */
function failed(section, error) {
  if (error instanceof Stale) return;
  fill(section, h("p", { class: "error", role: "alert" }, `${error.message} (${error.code})`));
}

/** Puts a section's content in place of its loading state. */
function fill(section, ...children) {
  const body = $(".body", section);
  body.removeAttribute("aria-busy");
  body.replaceChildren(...children);
}

/** The line a section shows when it has nothing to list. */
const nothing = (text) => h("p", { class: "muted" }, text);

/** Says what went wrong: a 422 on the form's fields, anything else in the
 * notice, in the contract's words. */
function report(error, form) {
  if (error instanceof Stale) return;
  if (form && error.status === 422) showFieldErrors(form, error);
  else notify(`${error.message} (${error.code})`, true);
}

/** Runs `work` with `button` disabled, so a second click sends nothing. */
async function busy(button, work) {
  if (button) button.disabled = true;
  try {
    return await work();
  } finally {
    if (button) button.disabled = false;
  }
}

/** The form's input for an API field path, or for the nearest field
 * holding it (`thresholds[0]` is shown on `thresholds`). */
function inputFor(form, field) {
  for (let path = field; path; path = path.replace(/(\[\d+\]|\.[^.[]+)$/, "")) {
    const input = form.querySelector(`[name="${CSS.escape(path)}"]`) ?? form.querySelector(`[data-field="${CSS.escape(path)}"]`);
    if (input) return input;
    if (!/(\[\d+\]|\.[^.[]+)$/.test(path)) return null;
  }
  return null;
}

/** Puts a 422's details on the form's fields (by name = the API's field path). */
function showFieldErrors(form, error) {
  clearFieldErrors(form);
  let placed = 0;
  for (const { field, message } of error.details) {
    const input = inputFor(form, field);
    const slot = input && document.getElementById(input.getAttribute("aria-describedby"));
    if (!slot) continue;
    input.setAttribute("aria-invalid", "true");
    slot.textContent = message;
    if (placed++ === 0) input.focus();
  }
  notify(placed ? "Some fields need another value." : `${error.message} (${error.code})`, true);
}

function clearFieldErrors(form) {
  for (const input of form.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
  for (const slot of form.querySelectorAll(".field-error")) slot.textContent = "";
}

// --- signing in and out ---------------------------------------------------

function signOut(message) {
  session++;
  sessionStorage.removeItem(TOKEN);
  // Nothing of the last merchant stays on the page, the secrets shown once
  // least of all.
  Object.assign(state, { plan: null, usage: null, range: null, catalog: new Map(), activations: [] });
  chart?.destroy();
  chart = null;
  for (const id of ["#key-secret", "#alert-secret"]) {
    const box = $(id);
    if (box) {
      box.hidden = true;
      box.replaceChildren();
    }
  }
  $("#dashboard").hidden = true;
  $("#sign-out").hidden = true;
  $("#sign-in").hidden = false;
  if (message) notify(message, true);
  $("#token").focus();
}

function start() {
  const fragment = new URLSearchParams(location.hash.slice(1));
  if (fragment.get("token")) {
    sessionStorage.setItem(TOKEN, fragment.get("token"));
    history.replaceState(null, "", location.pathname + location.search);
  }
  $("#sign-in-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("#token").value.trim();
    if (token.split(".").length !== 3) {
      $("#token").setAttribute("aria-invalid", "true");
      $("#token-error").textContent = "A token has three parts separated by dots.";
      $("#token").focus();
      return;
    }
    $("#token").removeAttribute("aria-invalid");
    $("#token-error").textContent = "";
    $("#token").value = "";
    sessionStorage.setItem(TOKEN, token);
    show();
  });
  $("#sign-out").addEventListener("click", () => {
    signOut();
    notify("Signed out.");
  });
  $("#range").addEventListener("submit", (event) => {
    event.preventDefault();
    const form = event.target;
    busy(event.submitter, () => loadUsage({ from: form.from.value, to: form.to.value }, form));
  });
  $("#new-key").addEventListener("submit", createKey);
  if (sessionStorage.getItem(TOKEN)) show();
  else signOut();
}

async function show() {
  session++;
  notify("");
  $("#sign-in").hidden = true;
  $("#dashboard").hidden = false;
  $("#sign-out").hidden = false;
  $("#main").focus();
  await Promise.allSettled([loadUsage(), loadApps(), loadKeys(), loadPlan(), loadAlerts()]);
}

// --- usage: the period, the daily chart and table, usage by app -----------

// `range`: the days last shown, which a refresh after an action shows again
// (not a range the API refused, still in the form).
const state = { plan: null, usage: null, range: null, catalog: new Map(), activations: [] };
let chart = null;
let usageAsked = 0;

/** Loads the usage report for `range` (default: the last shown, else the
 * period); `form` is the range form when it asked. */
async function loadUsage(range = state.range, form = null) {
  if (form) clearFieldErrors(form);
  const query = new URLSearchParams({ breakdown: "app" });
  if (range?.from) query.set("from", range.from);
  if (range?.to) query.set("to", range.to);
  const asked = ++usageAsked;
  try {
    const usage = await api("GET", `/api/v1/customer/tokens/usage?${query}`);
    // Two reports in flight (a range asked twice, a refresh): the last asked wins.
    if (asked !== usageAsked) return;
    state.usage = usage;
    state.range = range;
    form ??= $("#range");
    const days = usage.daily_usage;
    if (days.length) {
      form.from.value = days[0].date;
      form.to.value = days[days.length - 1].date;
    }
    renderPeriod();
    renderDaily(days);
    renderByApp(usage.usage_by_app);
  } catch (error) {
    if (form && error.status === 422) showFieldErrors(form, error);
    else for (const id of ["#period", "#daily", "#by-app"]) failed($(id), error);
  }
}

function renderPeriod() {
  const { current_period: p } = state.usage;
  const allowance = state.plan?.tokens_per_month;
  const unlimited = p.tokens_total < 0;
  // tokens_total is the allowance (or the usage past it) plus the purchased
  // tokens left; with the plan's allowance known, the purchased part follows.
  const purchased = unlimited || allowance === undefined ? null : p.tokens_total - Math.max(allowance, p.tokens_used);
  const figures = h("dl", { class: "figures" },
    h("div", {}, h("dt", {}, "Used"), h("dd", { "data-figure": "used" }, number(p.tokens_used))),
    h("div", {}, h("dt", {}, "Remaining"), h("dd", { "data-figure": "remaining" }, number(p.tokens_remaining))),
    h("div", {}, h("dt", {}, "Total"), h("dd", { "data-figure": "total" }, number(p.tokens_total))),
    h("div", {}, h("dt", {}, "Purchased tokens left"), h("dd", { "data-figure": "purchased" }, purchased === null ? "—" : number(purchased))),
    h("div", {}, h("dt", {}, "Period ends"), h("dd", { "data-figure": "ends" }, day(p.end_date))));
  const children = [figures];
  if (!unlimited && p.tokens_total > 0) {
    const share = Math.round((100 * p.tokens_used) / p.tokens_total);
    children.push(
      h("label", { for: "gauge" }, `Used ${share} % of this period's tokens`),
      h("meter", { id: "gauge", min: 0, max: p.tokens_total, low: p.tokens_total * 0.8, high: p.tokens_total * 0.95, optimum: 0, value: p.tokens_used }, `${share} %`));
  } else if (unlimited) {
    children.push(h("p", { class: "muted" }, "Unlimited plan: nothing is refused for balance."));
  }
  fill($("#period"), ...children);
}

function renderDaily(days) {
  const apps = [...new Set(days.flatMap((d) => Object.keys(d.apps ?? {})))].sort();
  const name = (slug) => state.catalog.get(slug)?.name ?? slug;
  const total = days.reduce((sum, d) => sum + d.tokens, 0);
  $("#daily-chart").setAttribute("aria-label",
    `Daily usage from ${days[0]?.date ?? "—"} to ${days.at(-1)?.date ?? "—"}: ${number(total)} tokens in all. The table view has every number.`);
  const datasets = apps.map((slug, i) => ({
    label: name(slug),
    data: days.map((d) => d.apps?.[slug] ?? 0),
    backgroundColor: PALETTE[i % PALETTE.length],
    stack: "tokens",
  }));
  if (window.Chart) {
    chart?.destroy();
    chart = new window.Chart($("#daily-chart"), {
      type: "bar",
      data: { labels: days.map((d) => d.date), datasets },
      options: {
        animation: false,
        maintainAspectRatio: false,
        scales: { x: { stacked: true }, y: { stacked: true, beginAtZero: true, title: { display: true, text: "tokens" } } },
        plugins: { legend: { position: "bottom" } },
      },
    });
  }
  $("#daily").dataset.total = total;
  $("#daily-table").replaceChildren(
    h("caption", {}, `Tokens per day (UTC), ${number(total)} in all`),
    h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Date"), apps.map((slug) => h("th", { scope: "col", class: "number" }, name(slug))), h("th", { scope: "col", class: "number" }, "Total"))),
    h("tbody", {}, days.map((d) => h("tr", {},
      h("th", { scope: "row" }, d.date),
      apps.map((slug) => h("td", { class: "number" }, number(d.apps?.[slug] ?? 0))),
      h("td", { class: "number" }, number(d.tokens))))));
  $(".body", $("#daily")).replaceChildren(total === 0 ? nothing("No usage in this range yet.") : "");
}

function renderByApp(rows) {
  if (!rows.length) return fill($("#by-app"), nothing("No app was used in this range."));
  fill($("#by-app"), h("table", {},
    h("caption", {}, "For the range shown above"),
    h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "App"), h("th", { scope: "col", class: "number" }, "Tokens"), h("th", { scope: "col", class: "number" }, "Sessions"), h("th", { scope: "col", class: "number" }, "Tokens per session"))),
    h("tbody", {}, rows.map((r) => h("tr", {},
      h("th", { scope: "row" }, r.app_name),
      h("td", { class: "number" }, number(r.tokens_consumed)),
      h("td", { class: "number" }, number(r.sessions)),
      h("td", { class: "number" }, r.avg_tokens_per_session ?? "—"))))));
}

// --- apps: activations, their configuration and embed code ----------------

/** Activations not deactivated: active or paused. */
const liveActivations = () => state.activations.filter((a) => a.app.status !== "disabled");

async function loadApps() {
  const section = $("#apps");
  try {
    // The catalog once a session (its route is limited per hour); the
    // activations after every change.
    if (!state.catalog.size) {
      const catalog = await api("GET", "/api/v1/apps?per_page=100");
      state.catalog = new Map(catalog.apps.map((app) => [app.id, app]));
    }
    state.activations = (await api("GET", "/api/v1/customer/apps")).apps;
    renderApps();
    renderKeyApps();
    if (state.usage) renderDaily(state.usage.daily_usage);
  } catch (error) {
    failed(section, error);
  }
}

function renderApps() {
  const live = liveActivations();
  if (!live.length) return fill($("#apps"), nothing("No app is active. Activate one from the catalog through the API."));
  fill($("#apps"), ...live.map(renderActivation));
}

function renderActivation(activation) {
  const { app } = activation;
  const slug = app.id;
  const paused = app.status === "paused";
  const embedId = `embed-${slug}`;
  const change = (button, method, path, payload, done) => busy(button, async () => {
    try {
      await api(method, path, payload);
      notify(done);
      await loadApps();
      $(`[data-app="${CSS.escape(slug)}"] button`)?.focus();
    } catch (error) {
      report(error);
    }
  });
  const configure = h("details", { class: "configure" }, h("summary", {}, "Configure"), configurationForm(activation));
  return h("article", { class: "app", "data-app": slug, "aria-labelledby": `app-${slug}` },
    h("header", {},
      h("h3", { id: `app-${slug}` }, app.name),
      h("span", { class: `badge ${app.status}` }, app.status)),
    h("div", { class: "actions" },
      h("button", {
        type: "button", class: "quiet",
        onclick: (e) => change(e.target, "PATCH", `/api/v1/customer/apps/${slug}`, { status: paused ? "active" : "paused" }, `${app.name} ${paused ? "resumed" : "paused"}.`),
      }, paused ? `Resume ${app.name}` : `Pause ${app.name}`),
      h("button", {
        type: "button", class: "danger",
        onclick: (e) => {
          if (confirm(`Deactivate ${app.name}? Its widget stops at once.`)) change(e.target, "POST", `/api/v1/customer/apps/${slug}/deactivate`, undefined, `${app.name} deactivated.`);
        },
      }, `Deactivate ${app.name}`)),
    configure,
    h("label", { for: embedId }, "Embed code"),
    h("textarea", { id: embedId, rows: 3, readonly: true }, activation.embed_code),
    h("div", { class: "actions" },
      h("button", {
        type: "button", class: "quiet",
        onclick: async () => {
          try {
            await navigator.clipboard.writeText(activation.embed_code);
            notify(`Embed code of ${app.name} copied.`);
          } catch {
            $(`#${embedId}`).select();
            notify("Copying is blocked here; the code is selected: press Ctrl+C.", true);
          }
        },
      }, "Copy embed code")));
}

/** A form generated from the app's configuration_schema; names are the API's field paths. */
function configurationForm(activation) {
  const slug = activation.app.id;
  const schema = state.catalog.get(slug)?.configuration_schema ?? {};
  const form = h("form", { novalidate: true, "data-configure": slug });
  const fields = (properties, values, path) => Object.entries(properties).map(([key, spec]) => {
    const name = `${path}.${key}`;
    const id = `${slug}-${name}`.replaceAll(".", "-");
    const errorId = `${id}-error`;
    const value = values?.[key] ?? spec.default;
    const label = key.replaceAll("_", " ");
    if (spec.type === "object") {
      return h("fieldset", {}, h("legend", {}, label), fields(spec.properties ?? {}, value, name));
    }
    let input;
    if (spec.type === "select") {
      input = h("select", { id, name, "aria-describedby": errorId, "data-type": "select" },
        (spec.options ?? []).map((option) => h("option", { value: option, selected: option === value }, option)));
    } else if (spec.type === "boolean") {
      return h("div", { class: "field" },
        h("label", {}, h("input", { type: "checkbox", id, name, "aria-describedby": errorId, "data-type": "boolean", checked: Boolean(value) }), label),
        h("span", { id: errorId, class: "field-error" }));
    } else {
      const numeric = spec.type === "integer" || spec.type === "number";
      input = h("input", { id, name, "aria-describedby": errorId, "data-type": spec.type, type: numeric ? "number" : "text", step: numeric ? "any" : false, value: value ?? "" });
    }
    return h("div", { class: "field" }, h("label", { for: id }, label), input, h("span", { id: errorId, class: "field-error" }));
  });
  form.append(...fields(schema, activation.configuration, "configuration"),
    h("button", { type: "submit" }, `Save ${activation.app.name}`));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearFieldErrors(form);
    const configuration = {};
    for (const input of form.querySelectorAll("[data-type]")) {
      const path = input.name.split(".").slice(1);
      let value;
      if (input.dataset.type === "boolean") value = input.checked;
      else if (input.dataset.type === "integer" || input.dataset.type === "number") {
        // Left empty: left out, so the app's default applies.
        if (input.value === "") continue;
        value = Number(input.value);
      } else value = input.value;
      let target = configuration;
      for (const part of path.slice(0, -1)) target = target[part] ??= {};
      target[path.at(-1)] = value;
    }
    await busy(event.submitter, async () => {
      try {
        await api("PATCH", `/api/v1/customer/apps/${slug}`, { configuration });
        notify(`${activation.app.name} saved.`);
        await loadApps();
      } catch (error) {
        report(error, form);
      }
    });
  });
  return form;
}

// --- embed keys -------------------------------------------------------------

function renderKeyApps() {
  const box = $("#key-apps");
  const live = liveActivations();
  box.replaceChildren(h("legend", {}, "Apps it may charge"),
    ...(live.length ? live.map((a) => h("label", {}, h("input", { type: "checkbox", name: "app_permissions", value: a.app.id, checked: true }), a.app.name))
      : [nothing("Activate an app first.")]));
  box.dataset.field = "app_permissions";
}

async function loadKeys() {
  const section = $("#keys");
  try {
    const { api_keys: keys } = await api("GET", "/api/v1/customer/api-keys");
    if (!keys.length) return fill(section, nothing("No embed key yet."));
    fill(section, h("table", {},
      h("caption", {}, "Keys are shown by their first characters only"),
      h("thead", {}, h("tr", {}, ["Key", "Name", "Apps", "Per hour", "Created", "Status", ""].map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, keys.map((key) => {
        const revoked = Boolean(key.revoked_at);
        return h("tr", { "data-key": key.id },
          h("td", {}, h("code", {}, `${key.key_prefix}…`)),
          h("td", {}, key.name ?? "—"),
          h("td", {}, key.app_permissions.join(", ")),
          h("td", { class: "number" }, number(key.rate_limit)),
          h("td", {}, day(key.created_at)),
          h("td", {}, h("span", { class: `badge ${revoked ? "revoked" : "active"}` }, revoked ? "revoked" : "active")),
          h("td", {}, revoked ? "" : h("button", {
            type: "button", class: "danger",
            onclick: (e) => {
              if (!confirm(`Revoke ${key.key_prefix}…? Widgets using it stop at once.`)) return;
              busy(e.target, async () => {
                try {
                  await api("DELETE", `/api/v1/customer/api-keys/${key.id}`);
                  notify(`Key ${key.key_prefix}… revoked.`);
                  await loadKeys();
                } catch (error) {
                  report(error);
                }
              });
            },
          }, `Revoke ${key.key_prefix}…`)));
      }))));
  } catch (error) {
    failed(section, error);
  }
}

function createKey(event) {
  event.preventDefault();
  busy(event.submitter, () => sendNewKey(event.target));
}

async function sendNewKey(form) {
  clearFieldErrors(form);
  const origins = form.allowed_origins.value.split(",").map((o) => o.trim()).filter(Boolean);
  const body = {
    app_permissions: [...form.querySelectorAll('[name="app_permissions"]:checked')].map((i) => i.value),
    rate_limit: form.rate_limit.value === "" ? undefined : Number(form.rate_limit.value),
    allowed_origins: origins,
  };
  // `form.name` would be the form's own name: the field is asked for by name.
  const name = form.elements.namedItem("name");
  if (name.value.trim()) body.name = name.value.trim();
  try {
    const created = await api("POST", "/api/v1/customer/api-keys", body);
    const secret = $("#key-secret");
    secret.hidden = false;
    secret.replaceChildren(
      h("p", {}, h("strong", {}, "Copy this key now: it is shown once.")),
      h("p", {}, h("code", { "data-secret": "" }, created.key)),
      h("button", {
        type: "button", class: "quiet",
        onclick: () => navigator.clipboard.writeText(created.key).then(() => notify("Key copied."), () => notify("Copying is blocked here; select the key and copy it.", true)),
      }, "Copy key"));
    secret.focus();
    notify(`Key ${created.key_prefix}… created.`);
    name.value = "";
    await loadKeys();
  } catch (error) {
    report(error, form);
  }
}

// --- the plan -----------------------------------------------------------------

async function loadPlan() {
  const section = $("#plan");
  try {
    const [{ plans }, subscription] = await Promise.all([
      api("GET", "/api/v1/customer/billing/plans"),
      api("GET", "/api/v1/customer/billing/subscription").catch((error) => (error.status === 404 ? null : Promise.reject(error))),
    ]);
    state.plan = plans.find((p) => p.id === subscription?.plan_id) ?? null;
    if (state.usage) renderPeriod();
    const billing = $('meta[name="stripe-publishable-key"]').content;
    const rows = plans.map((plan) => h("tr", { "data-plan": plan.id },
      h("th", { scope: "row" }, plan.name, plan.id === subscription?.plan_id ? h("span", { class: "badge active" }, " current") : ""),
      h("td", { class: "number" }, number(plan.tokens_per_month)),
      h("td", { class: "number" }, `$${(plan.price_cents / 100).toFixed(2)}`),
      h("td", {}, plan.features.join(", "))));
    fill(section,
      subscription
        ? h("p", {}, `${state.plan?.name ?? subscription.plan_id}, ${subscription.status}; this period ends ${day(subscription.current_period_end)}.`,
          subscription.pending_plan_id ? ` Changes to ${subscription.pending_plan_id} then.` : "",
          subscription.cancel_at_period_end ? " Cancelled at the period's end." : "")
        : h("p", {}, "No subscription."),
      h("div", { class: "scroll", tabindex: 0, role: "region", "aria-label": "Plans" }, h("table", {},
        h("thead", {}, h("tr", {}, ["Plan", "Tokens a month", "Price a month", "Includes"].map((t) => h("th", { scope: "col" }, t)))),
        h("tbody", {}, rows))),
      billing && subscription?.stripe_subscription_id ? billingActions(plans, subscription, billing) : "");
  } catch (error) {
    failed(section, error);
  }
}

/** Plan changes and token purchases, through Stripe.js (loaded only here). */
function billingActions(plans, subscription, publishableKey) {
  const form = h("form", { novalidate: true, class: "inline" },
    h("div", {}, h("label", { for: "plan-choice" }, "Change plan to"),
      h("select", { id: "plan-choice", name: "plan_id", "aria-describedby": "plan-choice-error" },
        plans.filter((p) => p.id !== subscription.plan_id).map((p) => h("option", { value: p.id }, p.name))),
      h("span", { id: "plan-choice-error", class: "field-error" })),
    h("button", { type: "submit" }, "Change plan"));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    busy(event.submitter, () => changePlan(form, publishableKey));
  });
  const purchase = h("form", { novalidate: true },
    h("div", { class: "field" }, h("label", { for: "buy-tokens" }, "Buy tokens"),
      h("input", { id: "buy-tokens", name: "tokens", type: "number", min: 1, step: 1, value: 1000, "aria-describedby": "buy-tokens-error" }),
      h("span", { id: "buy-tokens-error", class: "field-error" })),
    h("div", { id: "card", class: "field" }),
    h("button", { type: "submit" }, "Buy"));
  // Stripe's card form, mounted in this form (drawn anew with the plan).
  const card = loadStripe(publishableKey).then((stripe) => {
    const element = stripe.elements().create("card");
    element.mount(purchase.querySelector("#card"));
    return element;
  });
  card.catch(() => notify("Stripe cannot be reached; purchases are unavailable.", true));
  purchase.addEventListener("submit", (event) => {
    event.preventDefault();
    busy(event.submitter, () => buyTokens(purchase, publishableKey, card));
  });
  return h("div", { class: "billing" }, form, purchase);
}

async function changePlan(form, publishableKey) {
  const plan = form.plan_id.selectedOptions[0].textContent;
  try {
    const changed = await api("PATCH", "/api/v1/customer/billing/subscription", { plan_id: form.plan_id.value });
    notify(changed.pending_plan_id ? `${plan} starts when this period ends.` : `Plan changed to ${plan}.`);
    await Promise.all([loadPlan(), loadUsage()]);
  } catch (error) {
    // The upgrade's invoice needs the card holder (3-D Secure): Stripe.js
    // asks, and Stripe applies the upgrade once it is paid.
    const secret = error.status === 402 ? error.body?.error?.client_secret : null;
    if (!secret) return report(error, form);
    const stripe = await loadStripe(publishableKey);
    const { error: declined } = await stripe.confirmCardPayment(secret);
    notify(declined ? declined.message : `${plan} applies once Stripe confirms the payment.`, Boolean(declined));
  }
}

/** A purchase: the card set up through Stripe.js, then bought under an
 * Idempotency-Key kept until the service answers, so a purchase sent again
 * after a lost answer is charged once. */
async function buyTokens(purchase, publishableKey, card) {
  try {
    const stripe = await loadStripe(publishableKey);
    const intent = await api("POST", "/api/v1/customer/billing/setup-intent");
    const { setupIntent, error } = await stripe.confirmCardSetup(intent.client_secret, { payment_method: { card: await card } });
    if (error) throw new ApiError(402, { error: { code: error.code ?? "card_error", message: error.message } });
    purchase.dataset.key ||= crypto.randomUUID();
    const bought = await api("POST", "/api/v1/customer/billing/tokens/purchase",
      { tokens: Number(purchase.tokens.value), payment_method_id: setupIntent.payment_method },
      { "Idempotency-Key": purchase.dataset.key });
    delete purchase.dataset.key;
    if (bought.status === "requires_action" && bought.client_secret) {
      const { error: declined } = await stripe.confirmCardPayment(bought.client_secret);
      if (declined) throw new ApiError(402, { error: { code: declined.code ?? "card_error", message: declined.message } });
    }
    notify(bought.credited
      ? `${number(bought.tokens)} tokens bought and credited.`
      : `${number(bought.tokens)} tokens bought; they are credited when Stripe confirms the payment.`);
    await loadUsage();
  } catch (error) {
    // An answer refusing the purchase is final: the next one is another.
    if (error.status >= 400 && error.status < 500) delete purchase.dataset.key;
    report(error, purchase);
  }
}

/** Stripe.js, loaded once, only where billing is configured. */
let stripePromise = null;
function loadStripe(publishableKey) {
  stripePromise ??= new Promise((resolve, reject) => {
    const script = h("script", { src: "https://js.stripe.com/v3/" });
    script.addEventListener("load", () => resolve(window.Stripe(publishableKey)));
    script.addEventListener("error", reject);
    document.head.append(script);
  });
  return stripePromise;
}

// --- usage alerts -------------------------------------------------------------

async function saveAlerts(form, settings) {
  clearFieldErrors(form);
  const thresholds = form.thresholds.value.split(",").map((t) => t.trim()).filter(Boolean).map((t) => (Number.isNaN(Number(t)) ? t : Number(t)));
  const payload = { thresholds, enabled: form.enabled.checked };
  const url = form.webhook_url.value.trim();
  // An emptied field removes the URL (null); one never set stays unset.
  if (url) payload.webhook_url = url;
  else if (settings.webhook_url) payload.webhook_url = null;
  try {
    const saved = await api("PUT", "/api/v1/customer/alerts", payload);
    settings.webhook_url = saved.webhook_url;
    notify("Alerts saved.");
    return saved;
  } catch (error) {
    report(error, form);
    return null;
  }
}

/** Shows the signing secret a change made, once. */
function showSecret(secret, overlapEnds) {
  const box = $("#alert-secret");
  box.hidden = false;
  box.replaceChildren(h("p", {}, h("strong", {}, "Signing secret, shown once: "), h("code", {}, secret)),
    overlapEnds ? h("p", { class: "muted" }, `Until ${utc(overlapEnds)} UTC deliveries also carry a signature with the previous secret.`) : "");
}

const utc = (at) => new Date(at).toLocaleString("en-GB", { timeZone: "UTC" });

/** What became of one request to the webhook, in a line. */
function outcome(sent) {
  const answer = sent.http_status ? `answered ${sent.http_status}` : "no answer";
  return sent.delivered ? `Delivered (${answer}, ${sent.latency_ms} ms).` : `Not delivered: ${sent.error} (${sent.latency_ms} ms).`;
}

async function sendTest(button) {
  try {
    const sent = await api("POST", "/api/v1/customer/alerts/test", {});
    const line = $("#alert-test-outcome");
    line.textContent = `Test event ${sent.id}: ${outcome(sent)}`;
    line.classList.toggle("error", !sent.delivered);
  } catch (error) {
    report(error);
  }
}

async function rotateSecret() {
  if (!window.confirm("Make a new signing secret? The current one keeps signing for a day beside it.")) return;
  try {
    const rotated = await api("POST", "/api/v1/customer/alerts/rotate-secret", {});
    await loadAlerts();
    showSecret(rotated.signing_secret, rotated.previous_secret_expires_at);
    // After the new secret is on the page: whoever reads the notice reads it.
    notify("Signing secret rotated.");
  } catch (error) {
    report(error);
  }
}

/** Lists an event's attempts in the row below it (a second click hides them). */
async function showAttempts(event, row) {
  const next = row.nextElementSibling;
  if (next?.classList.contains("attempts")) {
    next.remove();
    return;
  }
  try {
    const { attempts } = await api("GET", `/api/v1/customer/alerts/events/${event.id}/attempts`);
    const list = attempts.length
      ? h("table", {}, h("caption", {}, `Attempts at the ${event.threshold} % crossing`),
        h("thead", {}, h("tr", {}, ["At", "By", "Answer", "Latency", "Next try"].map((t) => h("th", { scope: "col" }, t)))),
        h("tbody", {}, attempts.map((a) => h("tr", {},
          h("td", {}, utc(a.attempted_at)),
          h("td", {}, a.trigger),
          h("td", {}, a.error ?? `${a.http_status}`),
          h("td", { class: "number" }, `${a.latency_ms} ms`),
          h("td", {}, a.next_attempt_at ? utc(a.next_attempt_at) : "")))))
      : nothing("Not attempted yet.");
    row.after(h("tr", { class: "attempts" }, h("td", { colspan: 7 }, list)));
  } catch (error) {
    report(error);
  }
}

async function resend(event) {
  try {
    const sent = await api("POST", `/api/v1/customer/alerts/events/${event.id}/resend`, {});
    notify(`Resent: ${outcome(sent)}`, !sent.delivered);
    await loadAlerts();
  } catch (error) {
    report(error);
  }
}

async function loadAlerts() {
  const section = $("#alerts");
  try {
    const [settings, { events }] = await Promise.all([api("GET", "/api/v1/customer/alerts"), api("GET", "/api/v1/customer/alerts/events")]);
    const form = h("form", { novalidate: true },
      settings.endpoint_status === "disabled"
        ? h("p", { id: "alert-disabled", class: "error", role: "status" },
          `Deliveries are paused: ${settings.disabled_reason}. Fix the receiver, then save the URL again to resume; held crossings can be resent below.`)
        : "",
      h("div", { class: "grid" },
        h("div", {}, h("label", { for: "alert-url" }, "Webhook URL"),
          h("input", { id: "alert-url", name: "webhook_url", type: "url", value: settings.webhook_url ?? "", placeholder: "https://shop.example/hooks/usage", "aria-describedby": "alert-url-error" }),
          h("span", { id: "alert-url-error", class: "field-error" })),
        h("div", {}, h("label", { for: "alert-thresholds" }, "Thresholds, % of the allowance (comma separated)"),
          h("input", { id: "alert-thresholds", name: "thresholds", value: settings.thresholds.join(", "), "aria-describedby": "alert-thresholds-error" }),
          h("span", { id: "alert-thresholds-error", class: "field-error" }))),
      h("div", { class: "field" }, h("label", {}, h("input", { type: "checkbox", name: "enabled", checked: settings.enabled }), "Alerts on")),
      settings.signing_secret_hint ? h("p", { class: "muted" }, `Signing secret ends in ${settings.signing_secret_hint}.`) : "",
      settings.previous_secret_expires_at ? h("p", { class: "muted" }, `The previous secret also signs until ${utc(settings.previous_secret_expires_at)} UTC.`) : "",
      h("div", { id: "alert-secret", class: "secret", hidden: true }),
      h("div", { class: "actions" },
        h("button", { type: "submit" }, "Save alerts"),
        settings.webhook_url ? h("button", { type: "button", id: "alert-test", class: "quiet" }, "Send test event") : "",
        settings.signing_secret_hint ? h("button", { type: "button", id: "alert-rotate", class: "quiet" }, "Rotate secret") : ""),
      h("p", { id: "alert-test-outcome", role: "status" }));
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      busy(event.submitter, async () => {
        const saved = await saveAlerts(form, settings);
        if (!saved) return;
        // The panel again, with what saving changed (the buttons, an
        // endpoint enabled again), then the secret it made, once.
        await loadAlerts();
        if (saved.signing_secret) showSecret(saved.signing_secret);
      });
    });
    $("#alert-test", form)?.addEventListener("click", (event) => busy(event.currentTarget, () => sendTest()));
    $("#alert-rotate", form)?.addEventListener("click", (event) => busy(event.currentTarget, () => rotateSecret()));
    const history = events.length
      ? h("div", { class: "scroll", tabindex: 0, role: "region", "aria-label": "Alert deliveries" }, h("table", {},
        h("caption", {}, "Crossings, newest first"),
        h("thead", {}, h("tr", {}, ["Crossed", "Threshold", "Used", "Allowance", "Delivery", "Attempts", ""].map((t) => h("th", { scope: "col" }, t)))),
        h("tbody", {}, events.map((e) => {
          const row = h("tr", {},
            h("td", {}, utc(e.crossed_at)),
            h("td", { class: "number" }, `${e.threshold} %`),
            h("td", { class: "number" }, number(e.tokens_used)),
            h("td", { class: "number" }, number(e.tokens_total)),
            h("td", {}, e.delivery, e.last_error ? h("span", { class: "muted" }, ` (${e.last_error})`) : ""),
            h("td", { class: "number" }, `${e.attempts}`),
            h("td", {}));
          const actions = row.lastElementChild;
          const history = h("button", { type: "button", class: "quiet", "aria-label": `Attempts at the ${e.threshold} % crossing` }, "Attempts");
          history.addEventListener("click", () => showAttempts(e, row));
          actions.append(history);
          if (e.delivery !== "pending" && settings.webhook_url) {
            const again = h("button", { type: "button", class: "quiet", "aria-label": `Resend the ${e.threshold} % crossing` }, "Resend");
            again.addEventListener("click", (click) => busy(click.currentTarget, () => resend(e)));
            actions.append(" ", again);
          }
          return row;
        }))))
      : nothing("No threshold crossed yet.");
    const refresh = h("button", { type: "button", class: "quiet" }, "Refresh deliveries");
    refresh.addEventListener("click", (click) => busy(click.currentTarget, () => loadAlerts()));
    fill(section, form, h("h3", {}, "Deliveries"), refresh, history);
  } catch (error) {
    failed(section, error);
  }
}

start();
