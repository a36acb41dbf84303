// The merchant dashboard in headless Chromium, against the running service
// (scripts/browser-test.sh starts it and seeds the usage).
//
// The same story at a desktop's and at a phone's width: a bad token is sent
// back to sign-in; the real one shows the balance and a chart whose totals
// are the usage API's; pausing an app makes a consume fail and resuming it
// lets it through; a key is created (its secret shown once), charges, and
// once revoked is refused; a bad configuration's 422 lands on its field.
// No axe-core violation of WCAG 2.x level A or AA, no Content-Security-
// Policy violation, no script error. A screenshot of each state.
//
// Then, against a second process with billing configured (Stripe's
// stand-in, a publishable key, Stripe.js stood in for): tokens bought are
// credited and counted, and an upgrade takes effect at once.
//
//   BASE_URL=http://127.0.0.1:8097 TOKEN=<jwt> BILLING_URL=http://127.0.0.1:8099 \
//     BILLING_TOKENS="<jwt> <jwt>" SCREENSHOTS=dir node dashboard.test.mjs
import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import { readFileSync, statSync } from "node:fs";
import { createServer } from "node:http";
import { createRequire } from "node:module";
import { chromium } from "playwright-core";

const require = createRequire(import.meta.url);
const AXE = readFileSync(require.resolve("axe-core/axe.min.js"), "utf8");
const { BASE_URL: base, TOKEN: token, SCREENSHOTS: shots } = process.env;
assert.ok(base && token && shots, "BASE_URL, TOKEN and SCREENSHOTS are set");

const WIDTHS = [
  { name: "desktop", viewport: { width: 1280, height: 900 } },
  { name: "phone", viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true, deviceScaleFactor: 2 },
];
const STATES = ["sign-in", "signed-out-by-401", "overview", "app-paused", "key-created", "configuration-refused", "alert-attempts", "billing"];

// A merchant's webhook receiver on loopback (plain http to loopback is what
// the service allows outside production): it keeps every delivery, and
// answers 500 to the next `receiver.failures` of them.
const receiver = { deliveries: [], failures: 0 };
const hooks = createServer((request, response) => {
  let body = "";
  request.on("data", (chunk) => (body += chunk));
  request.on("end", () => {
    receiver.deliveries.push({ signature: request.headers["connected-apps-signature"], body });
    const failing = receiver.failures > 0;
    if (failing) receiver.failures--;
    response.writeHead(failing ? 500 : 200).end(failing ? "busy" : "ok");
  });
});
await new Promise((resolve) => hooks.listen(0, "127.0.0.1", resolve));
const hooksUrl = `http://127.0.0.1:${hooks.address().port}`;

/** Whether a delivery carries a v1 signature under `secret` (Stripe's scheme). */
function signedWith({ signature, body }, secret) {
  const parts = signature.split(",").map((p) => p.split("="));
  const t = parts.find(([k]) => k === "t")[1];
  const expected = createHmac("sha256", secret).update(`${t}.${body}`).digest("hex");
  return parts.some(([k, v]) => k === "v1" && v === expected);
}

/** Waits until the receiver holds `count` deliveries. */
async function delivered(count) {
  for (let i = 0; i < 100 && receiver.deliveries.length < count; i++) await new Promise((resolve) => setTimeout(resolve, 100));
  assert.equal(receiver.deliveries.length, count, "deliveries at the receiver");
}
// Stripe.js stands in as Stripe's REST API does (scripts/stripe-standin.py):
// the card form is a note, and a card set up is Stripe's test card that pays.
const STRIPE_JS = `window.Stripe = () => ({
  elements: () => ({ create: () => ({ mount: (where) => (typeof where === "string" ? document.querySelector(where) : where).append("Card: Stripe's test card (stand-in)") }) }),
  confirmCardSetup: async (secret) => ({ setupIntent: { id: secret.split("_secret")[0], payment_method: "pm_card_visa" } }),
  confirmCardPayment: async () => ({ paymentIntent: { status: "succeeded" } }),
});`;

/** The public API, as the merchant's own backend would call it. */
async function call(method, path, { bearer = token, body, at = base } = {}) {
  const response = await fetch(at + path, {
    method,
    headers: { Authorization: `Bearer ${bearer}`, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  return { status: response.status, body: await response.json().catch(() => null) };
}

/** Waits until `predicate` holds in the page. (page.waitForFunction polls
 * with eval, which the page's Content-Security-Policy rightly forbids.) */
async function until(page, predicate, what) {
  for (let i = 0; i < 100; i++) {
    if (await page.evaluate(predicate)) return;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  assert.fail(`timed out waiting for ${what}`);
}

/** Runs one step; on failure, says what the page was telling the user. */
async function step(page, name, fn) {
  process.stdout.write(`  ${name} … `);
  try {
    await fn();
  } catch (error) {
    const notice = await page.locator("#notice").textContent().catch(() => "");
    const fields = await page.locator(".field-error:not(:empty)").allTextContents().catch(() => []);
    process.stdout.write(`FAILED (the page's notice: "${notice}"; field errors: ${JSON.stringify(fields)})\n`);
    throw error;
  }
  process.stdout.write("ok\n");
}

/** A page at `width` that records script errors and CSP violations, and
 * the helpers every story uses. */
async function open(browser, width) {
  const context = await browser.newContext({ viewport: width.viewport, isMobile: width.isMobile, hasTouch: width.hasTouch, deviceScaleFactor: width.deviceScaleFactor ?? 1 });
  const page = await context.newPage();
  const problems = [];
  page.on("pageerror", (error) => problems.push(`script error: ${error.message}`));
  page.on("console", (message) => {
    if (message.type() === "error" && !/status of 4\d\d/.test(message.text())) problems.push(`console: ${message.text()}`);
  });
  await page.exposeFunction("reportViolation", (v) => problems.push(`CSP: ${v}`));
  await page.addInitScript(() => {
    document.addEventListener("securitypolicyviolation", (e) => window.reportViolation(`${e.violatedDirective} ${e.blockedURI}`));
  });
  page.on("dialog", (dialog) => dialog.accept());
  const shot = (state) => page.screenshot({ path: `${shots}/${state}-${width.name}.png`, fullPage: true });
  const accessible = async (what) => {
    await page.evaluate(AXE);
    const result = await page.evaluate(() => window.axe.run(document, { runOnly: { type: "tag", values: ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"] } }));
    const found = result.violations.map((v) => `${v.id} (${v.impact}): ${v.nodes.map((n) => n.target.join(" ")).join(", ")}`);
    assert.deepEqual(found, [], `axe-core violations on ${what}`);
  };
  return { context, page, problems, shot, accessible };
}

async function story(browser, width) {
  console.log(`dashboard at ${width.name} width (${width.viewport.width}px):`);
  const { context, page, problems, shot, accessible } = await open(browser, width);

  await step(page, "the page comes with its security headers", async () => {
    const response = await page.goto(`${base}/dashboard/`);
    const headers = response.headers();
    assert.equal(response.status(), 200);
    assert.match(headers["content-security-policy"], /script-src 'self';/);
    assert.match(headers["content-security-policy"], /connect-src 'self'/);
    assert.doesNotMatch(headers["content-security-policy"], /unsafe-inline|unsafe-eval/);
    assert.equal(headers["x-content-type-options"], "nosniff");
    assert.equal(headers["referrer-policy"], "no-referrer");
    const css = await page.locator('link[rel="stylesheet"]').getAttribute("href");
    assert.match(css, /^assets\/app\.[0-9a-f]{12}\.css$/);
    const asset = await fetch(new URL(css, `${base}/dashboard/`));
    assert.match(asset.headers.get("cache-control"), /max-age=31536000, immutable/);
  });

  await step(page, "signed out, it asks for a token", async () => {
    await page.getByLabel("Access token").waitFor();
    await accessible("sign-in");
    await shot("sign-in");
  });

  await step(page, "a token the service refuses (401) returns to sign-in with the contract's message", async () => {
    const forged = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJub2JvZHkifQ.c2lnbmF0dXJl";
    await page.getByLabel("Access token").fill(forged);
    await page.getByRole("button", { name: "Sign in" }).click();
    const refused = await call("GET", "/api/v1/customer/tokens/usage", { bearer: forged });
    assert.equal(refused.status, 401);
    await page.locator("#notice.error", { hasText: refused.body.error.message }).waitFor();
    await page.getByLabel("Access token").waitFor();
    await shot("signed-out-by-401");
  });

  await step(page, "signed in from the keyboard, the balance and the chart's totals are the usage API's", async () => {
    await page.getByLabel("Access token").fill(token);
    await page.keyboard.press("Tab");
    assert.equal(await page.evaluate(() => document.activeElement.textContent), "Sign in", "Tab moves from the token to its button");
    await page.keyboard.press("Enter");
    const { body: usage } = await call("GET", "/api/v1/customer/tokens/usage?breakdown=app");
    const period = usage.current_period;
    const figure = (name) => page.locator(`[data-figure="${name}"]`);
    await figure("used").filter({ hasText: new Intl.NumberFormat("en").format(period.tokens_used) }).waitFor();
    assert.equal(await figure("remaining").textContent(), new Intl.NumberFormat("en").format(period.tokens_remaining));
    assert.equal(await figure("total").textContent(), new Intl.NumberFormat("en").format(period.tokens_total));
    assert.ok(period.tokens_used > 0, "the seeded usage is there");
    assert.equal(Number(await page.locator("#gauge").getAttribute("value")), period.tokens_used);

    await page.locator("#daily[data-total]").waitFor({ state: "attached" });
    // Usage and the catalog load side by side: wait for the apps' names.
    await until(page, () => window.Chart?.getChart("daily-chart")?.data.datasets.map((d) => d.label).sort().join() === "Eyewear Recommendations,Virtual Try-On", "the chart of two apps by name");
    const chart = await page.evaluate(() => {
      const c = window.Chart.getChart("daily-chart");
      return { labels: c.data.labels, sets: c.data.datasets.map((d) => ({ label: d.label, data: d.data })) };
    });
    const apiDays = usage.daily_usage;
    assert.deepEqual(chart.labels, apiDays.map((d) => d.date));
    const perDay = chart.labels.map((_, i) => chart.sets.reduce((sum, set) => sum + set.data[i], 0));
    assert.deepEqual(perDay, apiDays.map((d) => d.tokens), "each day's stacked bar is the day's tokens");
    const byApp = Object.fromEntries(usage.usage_by_app.map((a) => [a.app_name, a.tokens_consumed]));
    const chartByApp = Object.fromEntries(chart.sets.map((s) => [s.label, s.data.reduce((a, b) => a + b, 0)]));
    assert.deepEqual(chartByApp, byApp, "each app's stack sums to its usage_by_app");
    const tableTotal = apiDays.reduce((sum, d) => sum + d.tokens, 0);
    await page.getByText("Table view").click();
    const format = (n) => new Intl.NumberFormat("en").format(n);
    await page.locator("#daily-table caption", { hasText: `${format(tableTotal)} in all` }).waitFor();
    const tryOn = page.locator("#by-app tr", { has: page.locator("th", { hasText: "Virtual Try-On" }) });
    assert.equal(await tryOn.locator("td").first().textContent(), format(byApp["Virtual Try-On"]));
    await page.locator('[data-plan="professional"]', { hasText: "current" }).waitFor();
    // Billing is not configured here (no STRIPE_PUBLISHABLE_KEY): no Stripe actions.
    assert.equal(await page.getByRole("button", { name: /Change plan|Buy/ }).count(), 0);
    // The other width's story may have crossed a threshold: the customer is the same.
    const { body: alerts } = await call("GET", "/api/v1/customer/alerts/events");
    await page.locator("#alerts", { hasText: alerts.events.length ? "Crossings, newest first" : "No threshold crossed yet." }).waitFor();
    await accessible("the overview");
    await shot("overview");
  });

  await step(page, "a date range redraws the chart from the API; a backwards one is refused on its field", async () => {
    const today = new Date().toISOString().slice(0, 10);
    await page.getByLabel("From", { exact: true }).fill(today);
    await page.getByLabel("To", { exact: true }).fill(today);
    await page.getByRole("button", { name: "Show" }).click();
    await until(page, () => window.Chart.getChart("daily-chart").data.labels.length === 1, "the chart of one day");
    const { body: usage } = await call("GET", `/api/v1/customer/tokens/usage?from=${today}&to=${today}`);
    const drawn = await page.evaluate(() => window.Chart.getChart("daily-chart").data.datasets.reduce((sum, d) => sum + d.data[0], 0));
    assert.equal(drawn, usage.daily_usage[0].tokens);
    await page.getByLabel("From", { exact: true }).fill("2026-01-02");
    await page.getByLabel("To", { exact: true }).fill("2026-01-01");
    await page.getByRole("button", { name: "Show" }).click();
    const refused = await call("GET", "/api/v1/customer/tokens/usage?from=2026-01-02&to=2026-01-01");
    assert.equal(refused.status, 422);
    await page.locator("#from-error", { hasText: refused.body.error.details[0].message }).waitFor();
    assert.equal(await page.getByLabel("From", { exact: true }).getAttribute("aria-invalid"), "true");
  });

  await step(page, "pausing an app makes its consumes fail; resuming lets them through", async () => {
    const app = page.locator('[data-app="vto-001"]');
    await app.getByRole("button", { name: "Pause Virtual Try-On" }).click();
    await app.locator(".badge", { hasText: "paused" }).waitFor();
    const refused = await call("POST", "/api/v1/customer/tokens/consume", { body: { app_id: "vto-001" } });
    assert.equal(refused.status, 403);
    assert.equal(refused.body.error.code, "app_not_active");
    await shot("app-paused");
    await app.getByRole("button", { name: "Resume Virtual Try-On" }).click();
    await app.locator(".badge", { hasText: "active" }).waitFor();
    const charged = await call("POST", "/api/v1/customer/tokens/consume", { body: { app_id: "vto-001" } });
    assert.equal(charged.status, 200);
  });

  await step(page, "a key is created (its secret shown once), charges, and once revoked is refused", async () => {
    const name = `browser ${width.name}`;
    await page.getByLabel("Name (optional)").fill(name);
    await page.getByRole("button", { name: "Create key" }).click();
    const secret = await page.locator("[data-secret]").textContent();
    assert.match(secret, /^ak_(live|test)_/);
    const row = page.locator("tr", { hasText: name });
    await row.waitFor();
    await accessible("a new key");
    await shot("key-created");
    const consumeWithKey = () => fetch(`${base}/api/v1/customer/tokens/consume`, {
      method: "POST", headers: { "X-API-Key": secret, "Content-Type": "application/json" }, body: JSON.stringify({ app_id: "vto-001" }),
    });
    assert.equal((await consumeWithKey()).status, 200);
    await row.getByRole("button", { name: /^Revoke/ }).click();
    await page.locator("tr", { hasText: name }).locator(".badge", { hasText: "revoked" }).waitFor();
    assert.equal((await consumeWithKey()).status, 401);
  });

  await step(page, "a configuration the API refuses (422) shows its message on the field", async () => {
    const app = page.locator('[data-app="rec-001"]');
    await app.getByText("Configure").click();
    const field = app.getByLabel("max results");
    await field.fill("2.5");
    await app.getByRole("button", { name: "Save Eyewear Recommendations" }).click();
    const { body } = await call("PATCH", "/api/v1/customer/apps/rec-001", { body: { configuration: { max_results: 2.5 } } });
    const detail = body.error.details.find((d) => d.field === "configuration.max_results");
    assert.ok(detail, "the API names the field");
    await app.locator(`[aria-invalid="true"][name="configuration.max_results"]`).waitFor();
    const describedBy = await field.getAttribute("aria-describedby");
    assert.equal(await page.locator(`#${describedBy}`).textContent(), detail.message);
    await accessible("a refused configuration");
    await shot("configuration-refused");
    await field.fill("4");
    await app.getByRole("button", { name: "Save Eyewear Recommendations" }).click();
    await page.locator("#notice", { hasText: "Eyewear Recommendations saved." }).waitFor();
    const { body: mine } = await call("GET", "/api/v1/customer/apps");
    assert.equal(mine.apps.find((a) => a.app.id === "rec-001").configuration.max_results, 4);
  });

  await step(page, "deactivating an app stops its consumes and takes it off the list", async () => {
    await page.getByRole("button", { name: "Deactivate Eyewear Recommendations" }).click();
    await page.locator("#notice", { hasText: "Eyewear Recommendations deactivated." }).waitFor();
    await page.locator('[data-app="rec-001"]').waitFor({ state: "detached" });
    const refused = await call("POST", "/api/v1/customer/tokens/consume", { body: { app_id: "rec-001" } });
    assert.equal(refused.body.error.code, "app_not_active");
    // Activated again through the API, for the next width's story.
    assert.equal((await call("POST", "/api/v1/customer/apps/rec-001/activate", { body: { configuration: {} } })).status, 200);
  });

  await step(page, "usage alert settings: a bad threshold is refused on its field; a webhook URL gets its secret once", async () => {
    const thresholds = page.getByLabel("Thresholds, % of the allowance (comma separated)");
    await thresholds.fill("0, 100");
    await page.getByRole("button", { name: "Save alerts" }).click();
    const refused = await call("PUT", "/api/v1/customer/alerts", { body: { thresholds: [0, 100] } });
    assert.equal(refused.status, 422);
    await page.locator("#alert-thresholds-error", { hasText: refused.body.error.details[0].message }).waitFor();
    const { body: before } = await call("GET", "/api/v1/customer/alerts");
    await thresholds.fill("50, 90");
    await page.getByLabel("Webhook URL").fill(`${hooksUrl}/hooks/usage-${width.name}`);
    await page.getByRole("button", { name: "Save alerts" }).click();
    await page.locator("#notice", { hasText: "Alerts saved." }).waitFor();
    // The secret comes with the first URL only (the other width's story may
    // have set one: the customer is the same).
    if (before.webhook_url === null) await page.locator("#alert-secret", { hasText: "whsec_" }).waitFor();
    else assert.equal(await page.locator("#alert-secret").isHidden(), true);
    const { body: saved } = await call("GET", "/api/v1/customer/alerts");
    assert.deepEqual(saved.thresholds, [50, 90]);
    assert.equal(saved.webhook_url, `${hooksUrl}/hooks/usage-${width.name}`);
  });

  await step(page, "a test event reaches the receiver; a rotated secret signs beside the old one", async () => {
    const before = receiver.deliveries.length;
    await page.getByRole("button", { name: "Send test event" }).click();
    await delivered(before + 1);
    await page.locator("#alert-test-outcome", { hasText: "Delivered (answered 200" }).waitFor();
    assert.equal(JSON.parse(receiver.deliveries[before].body).type, "usage.test");
    await page.getByRole("button", { name: "Rotate secret" }).click();
    await page.locator("#notice", { hasText: "Signing secret rotated." }).waitFor();
    // The overlap line comes with the rotated secret only, never with the one
    // the first save showed: the code beside it is the new secret.
    await page.locator("#alert-secret", { hasText: "also carry a signature with the previous secret" }).waitFor();
    const secret = await page.locator("#alert-secret code").textContent();
    assert.match(secret, /^whsec_/);
    await page.getByRole("button", { name: "Send test event" }).click();
    await delivered(before + 2);
    const [old, rotated] = receiver.deliveries.slice(before);
    assert.equal(rotated.signature.match(/v1=/g).length, 2, rotated.signature);
    assert.ok(signedWith(rotated, secret), "signed with the new secret");
    assert.ok(!signedWith(old, secret), "the event before the rotation was not");
    await accessible("a rotated secret");
  });

  await step(page, "a crossing's attempts are listed, a failed one first; it is resent with its id", async () => {
    // A threshold just above the period's usage, and the consume that crosses it.
    const { body: usage } = await call("GET", "/api/v1/customer/tokens/usage");
    const { tokens_used: used, tokens_total: total } = usage.current_period;
    const threshold = Math.floor((used * 100) / total) + 1;
    assert.equal((await call("PUT", "/api/v1/customer/alerts", { body: { thresholds: [threshold] } })).status, 200);
    receiver.failures = 1;
    const before = receiver.deliveries.length;
    const crossing = await call("POST", "/api/v1/customer/tokens/consume", { body: { app_id: "rec-001", tokens_consumed: Math.ceil((total * threshold) / 100) - used } });
    assert.equal(crossing.status, 200);
    // The worker's attempt fails (500); its retry lands.
    await delivered(before + 2);
    let event;
    for (let i = 0; i < 50 && event?.delivery !== "delivered"; i++) {
      event = (await call("GET", "/api/v1/customer/alerts/events")).body.events.find((e) => e.threshold === threshold);
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    assert.equal(event?.delivery, "delivered");
    await page.getByRole("button", { name: "Refresh deliveries" }).click();
    await page.getByRole("button", { name: `Attempts at the ${threshold} % crossing` }).click();
    const attempts = page.locator("tr.attempts");
    await attempts.getByRole("cell", { name: "answered 500 Internal Server Error", exact: true }).waitFor();
    await attempts.getByRole("cell", { name: "200", exact: true }).waitFor();
    await accessible("a crossing's attempts");
    await shot("alert-attempts");
    await page.getByRole("button", { name: `Resend the ${threshold} % crossing` }).click();
    await page.locator("#notice", { hasText: "Resent: Delivered" }).waitFor();
    await delivered(before + 3);
    const ids = receiver.deliveries.slice(before).map((d) => JSON.parse(d.body).id);
    assert.deepEqual(ids, [event.id, event.id, event.id], "every attempt and the resend carry the event's id");
  });

  await step(page, "signing out forgets the session, the secret shown once included", async () => {
    assert.match(await page.locator("#key-secret").textContent(), /ak_(live|test)_/);
    await page.getByRole("button", { name: "Sign out" }).click();
    await page.getByLabel("Access token").waitFor();
    assert.equal(await page.locator("#key-secret").textContent(), "");
    assert.equal(await page.evaluate(() => sessionStorage.length), 0);
  });

  assert.deepEqual(problems, [], "no script error or CSP violation");
  await context.close();
}

/** Billing configured (a publishable key, Stripe's stand-in): buying
 * tokens and changing plan through the page. */
async function billingStory(browser, width, { url, bearer }) {
  console.log(`billing at ${width.name} width:`);
  const { context, page, problems, shot, accessible } = await open(browser, width);
  await page.route("https://js.stripe.com/v3/", (route) => route.fulfill({ contentType: "text/javascript", body: STRIPE_JS }));
  const figure = (name) => page.locator(`[data-figure="${name}"]`);

  await step(page, "with a publishable key, the page allows Stripe.js and offers the billing actions", async () => {
    const response = await page.goto(`${url}/dashboard/#token=${bearer}`);
    assert.match(response.headers()["content-security-policy"], /script-src 'self' https:\/\/js\.stripe\.com https:\/\/\*\.js\.stripe\.com;/);
    await page.getByRole("button", { name: "Change plan" }).waitFor();
    await page.locator("#card", { hasText: "stand-in" }).waitFor();
  });

  await step(page, "tokens bought are credited and counted in the total", async () => {
    await page.getByLabel("Buy tokens").fill("1000");
    // A double click buys once: the total below is 1,000 more, not 2,000.
    await page.getByRole("button", { name: "Buy" }).dblclick();
    await page.locator("#notice", { hasText: "1,000 tokens bought and credited." }).waitFor();
    const { body: usage } = await call("GET", "/api/v1/customer/tokens/usage", { bearer, at: url });
    assert.equal(usage.current_period.tokens_total, 11_000);
    await figure("total").filter({ hasText: "11,000" }).waitFor();
    assert.equal(await figure("purchased").textContent(), "1,000");
    await accessible("billing");
    await shot("billing");
  });

  await step(page, "an upgrade takes effect at once", async () => {
    await page.getByLabel("Change plan to").selectOption("enterprise");
    await page.getByRole("button", { name: "Change plan" }).click();
    await page.locator("#notice", { hasText: "Plan changed to Enterprise." }).waitFor();
    const { body: subscription } = await call("GET", "/api/v1/customer/billing/subscription", { bearer, at: url });
    assert.equal(subscription.plan_id, "enterprise");
    await figure("total").filter({ hasText: "Unlimited" }).waitFor();
  });

  assert.deepEqual(problems, [], "no script error or CSP violation");
  await context.close();
}

/** Each state at each width: a PNG of that width (device pixels), not blank. */
function checkScreenshots() {
  for (const width of WIDTHS) {
    for (const state of STATES) {
      const file = `${shots}/${state}-${width.name}.png`;
      const png = readFileSync(file);
      assert.equal(png.subarray(1, 4).toString(), "PNG", file);
      const pixels = png.readUInt32BE(16);
      assert.equal(pixels, width.viewport.width * (width.deviceScaleFactor ?? 1), `${file} is ${width.viewport.width}px wide`);
      assert.ok(statSync(file).size > 8_000, `${file} is not blank`);
    }
  }
  console.log(`screenshots: ${WIDTHS.length * STATES.length} in ${shots}`);
}

const browser = await chromium.launch({ executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium", args: ["--no-sandbox"] });
const billing = { url: process.env.BILLING_URL, bearers: (process.env.BILLING_TOKENS ?? "").split(" ") };
assert.ok(billing.url && billing.bearers.length === WIDTHS.length, "BILLING_URL and a BILLING_TOKENS token per width are set");
try {
  for (const width of WIDTHS) await story(browser, width);
  for (const [i, width] of WIDTHS.entries()) await billingStory(browser, width, { url: billing.url, bearer: billing.bearers[i] });
} finally {
  await browser.close();
  hooks.close();
}
checkScreenshots();
console.log("dashboard: all checks passed");
