// Drives the dashboard in Debian's Chromium (playwright-core; no browser is downloaded)
// for tests/test_dashboard.py. Usage: node tests/ui/dashboard.mjs SCENARIO
// Environment: HUB_URL (the REST port), HUB_KEY, HUB_ADMIN_TOKEN, HUB_OWNER,
// ARTIFACTS (folder for screenshots). Prints one JSON object (what the page showed)
// as its last line; Python asserts on it. Every page is checked with axe-core and
// screenshotted at a laptop and a phone width.
import { readFileSync, mkdirSync } from "node:fs";
import { createRequire } from "node:module";
import { chromium } from "playwright-core";

const require = createRequire(import.meta.url);
const AXE = readFileSync(require.resolve("axe-core/axe.min.js"), "utf8");
const BASE = process.env.HUB_URL;
const ARTIFACTS = process.env.ARTIFACTS;
const CHROMIUM = process.env.CHROMIUM || "/usr/lib/chromium/chromium";
const SIZES = { laptop: { width: 1366, height: 850 }, phone: { width: 390, height: 844 } };
const result = { axe: {}, screenshots: [], csp_violations: [], console_errors: [] };

async function open(browser) {
  const context = await browser.newContext({ viewport: SIZES.laptop });
  const page = await context.newPage();
  page.on("console", (msg) => {
    const text = msg.text();
    if (/Content.Security.Policy/i.test(text)) result.csp_violations.push(text);
    else if (msg.type() === "error" && !/status of 4\d\d/.test(text)) result.console_errors.push(text);
  });
  page.on("pageerror", (err) => result.console_errors.push(String(err)));
  page.on("dialog", (dialog) => dialog.accept());
  page.on("request", (req) => {
    for (const secret of [process.env.HUB_KEY, process.env.HUB_ADMIN_TOKEN]) {
      if (secret && req.url().includes(secret)) result.token_in_url = req.url();
    }
  });
  return { context, page };
}

// Serious and critical axe violations on the page as it is now.
async function axe(page, name) {
  await page.evaluate(AXE);
  const found = await page.evaluate(async () => {
    const report = await window.axe.run(document, { resultTypes: ["violations"] });
    return report.violations.map((v) => ({ id: v.id, impact: v.impact, nodes: v.nodes.map((n) => n.target.join(" ")) }));
  });
  result.axe[name] = found.filter((v) => v.impact === "serious" || v.impact === "critical");
}

async function shoot(page, name) {
  mkdirSync(ARTIFACTS, { recursive: true });
  for (const [size, viewport] of Object.entries(SIZES)) {
    await page.setViewportSize(viewport);
    await page.waitForTimeout(150);
    const path = `${ARTIFACTS}/${name}-${size}.png`;
    await page.screenshot({ path, fullPage: true });
    result.screenshots.push(path);
  }
  await page.setViewportSize(SIZES.laptop);
}

async function check(page, name) {
  await axe(page, name);
  await shoot(page, name);
}

async function signIn(page, token) {
  await page.goto(`${BASE}/ui/`);
  await page.getByLabel("API key or admin token").fill(token);
  await page.getByRole("button", { name: "Sign in" }).click();
}

async function go(page, label) {
  await page.getByRole("navigation", { name: "Pages" }).getByRole("link", { name: label, exact: true }).click();
  await page.getByRole("heading", { level: 1, name: label }).waitFor();
}

const text = async (page, testid) => (await page.getByTestId(testid).first().innerText()).trim();
const rows = (page, testid) =>
  page.getByTestId(testid).locator("tbody tr").evaluateAll((trs) =>
    trs.map((tr) => Object.fromEntries([...tr.querySelectorAll("td")].map((td) => [td.dataset.col || "", td.innerText.trim()])))
  );
const cells = (page, testid) =>
  page.getByTestId(testid).locator("tbody tr").evaluateAll((trs) => trs.map((tr) => [...tr.querySelectorAll("td")].map((td) => td.innerText.trim())));

async function owner(browser) {
  const { page } = await open(browser);
  await signIn(page, process.env.HUB_KEY);
  await page.getByRole("heading", { level: 1, name: "Overview" }).waitFor();
  await page.getByTestId("balance").waitFor();
  result.signed_in_as = await text(page, "signed-in-as");
  result.balance = await text(page, "balance");
  result.available = await text(page, "available");
  result.owner_keys = await cells(page, "owner-keys");
  await check(page, "owner-overview");

  await go(page, "Usage");
  await page.getByTestId("total-calls").waitFor();
  await page.getByTestId("chart").locator("canvas").waitFor();
  result.totals = {
    calls: await text(page, "total-calls"),
    errors: await text(page, "total-errors"),
    input: await text(page, "total-input"),
    output: await text(page, "total-output"),
    credits: await text(page, "total-credits"),
  };
  result.by_model = await cells(page, "usage-by-model");
  result.by_day = await cells(page, "usage-by-day");
  result.chart_label = await page.getByTestId("chart").getAttribute("aria-label");
  await check(page, "owner-usage");
  await page.getByLabel("Chart shows").selectOption("credits");
  result.credits_chart_label = await page.getByTestId("chart").getAttribute("aria-label");
  await shoot(page, "owner-usage-credits");
  // A range with no calls says what to do next.
  await page.getByLabel("From (UTC)").fill("2020-01-01");
  await page.getByLabel("To (UTC)").fill("2020-01-31");
  await page.getByRole("button", { name: "Show", exact: true }).click();
  await page.getByTestId("empty").first().waitFor();
  result.empty_range = await text(page, "empty");
  result.empty_range_calls = await text(page, "total-calls");

  await go(page, "Recent calls");
  await page.getByTestId("calls").waitFor();
  result.calls = await cells(page, "calls");
  await check(page, "owner-calls");
}

// While a call is in flight: its credit reservation is listed.
async function reservations(browser) {
  const { page } = await open(browser);
  await signIn(page, process.env.HUB_KEY);
  await page.getByTestId("reservations").waitFor();
  result.reservations = await cells(page, "reservations");
  result.reserved = await text(page, "reserved");
  result.available = await text(page, "available");
  await check(page, "owner-reservations");
}

async function admin(browser) {
  const { page } = await open(browser);
  await signIn(page, process.env.HUB_ADMIN_TOKEN);
  await page.getByRole("heading", { level: 1, name: "Usage" }).waitFor();
  result.signed_in_as = await text(page, "signed-in-as");
  await page.getByTestId("total-calls").waitFor();
  result.all_calls = await text(page, "total-calls");
  await check(page, "admin-usage");

  // Create a key, read its secret once, use it, revoke it, see it refused.
  await go(page, "Keys");
  const newOwner = process.env.HUB_NEW_OWNER;
  await page.getByLabel("Owner").fill(newOwner);
  await page.getByLabel("Name").fill("dashboard-made");
  await page.getByRole("button", { name: "Create key" }).click();
  const secret = await text(page, "new-secret");
  result.secret_prefix = secret.slice(0, 4);
  await check(page, "admin-keys");
  const chat = async () => {
    const answer = await fetch(`${BASE}/v1/chat/completions`, {
      method: "POST",
      headers: { authorization: `Bearer ${secret}`, "content-type": "application/json" },
      body: JSON.stringify({ model: "openai/gpt-4o-mini", messages: [{ role: "user", content: "one two three" }] }),
    });
    return { status: answer.status, body: await answer.json() };
  };
  result.before_grant = await chat();
  await go(page, "Credits");
  await page.getByLabel("Owner").fill(newOwner);
  await page.getByLabel("Credits", { exact: true }).fill("5");
  await page.getByRole("button", { name: "Grant" }).click();
  result.granted = await text(page, "done");
  await check(page, "admin-credits");
  result.after_grant = await chat();

  await go(page, "Accounts");
  await page.getByLabel("Owner").fill(newOwner);
  await page.getByRole("button", { name: "Show", exact: true }).click();
  await page.getByTestId("balance").waitFor();
  result.new_owner_balance = await text(page, "balance");
  await check(page, "admin-accounts");

  await go(page, "Keys");
  const keyRow = page.getByTestId("keys").locator("tbody tr", { hasText: "dashboard-made" });
  await keyRow.getByRole("button", { name: /^Revoke/ }).click();
  await keyRow.getByText("revoked").waitFor();
  result.after_revoke = await chat();

  await go(page, "Credentials");
  await page.getByLabel("Provider", { exact: true }).fill("openai");
  await page.getByLabel("Provider's API key").fill(process.env.HUB_PROVIDER_SECRET);
  await page.getByLabel("Label (optional)").fill("from-dashboard");
  await page.getByRole("button", { name: "Add credential" }).click();
  await page.getByTestId("credentials").waitFor();
  result.credentials = await cells(page, "credentials");
  result.credentials_page_text = await page.locator("main").innerText();
  await check(page, "admin-credentials");
  await page.getByTestId("credentials").getByRole("button", { name: /^Remove/ }).first().click();
  await page.getByTestId("empty").waitFor();
  result.credentials_after_remove = await text(page, "empty");

  await go(page, "Health");
  await page.getByTestId("health").waitFor();
  result.health = await rows(page, "health");
  await check(page, "admin-health");

  await go(page, "Recent calls");
  await page.getByTestId("calls").waitFor();
  result.admin_calls = (await cells(page, "calls")).length;
  await check(page, "admin-calls");
}

async function wrong(browser) {
  const { page } = await open(browser);
  await page.goto(`${BASE}/ui/`);
  result.pristine = (await page.locator("main").innerText()).trim();
  for (const [name, token] of [
    ["key", "ahk_abcdefgh_" + "x".repeat(43)],
    ["admin", "not-the-admin-token"],
  ]) {
    await signIn(page, token);
    await page.getByTestId("error").waitFor();
    result[`${name}_error`] = await text(page, "error");
    result[`${name}_nav`] = await page.getByRole("navigation").count();
    result[`${name}_storage`] = await page.evaluate(() => sessionStorage.length);
    result[`${name}_body`] = (await page.locator("body").innerText()).trim();
  }
  await check(page, "signin-error");
}

async function keyboard(browser) {
  const { page } = await open(browser);
  await page.goto(`${BASE}/ui/`);
  await page.keyboard.press("Tab");
  result.first_focus = await page.evaluate(() => document.activeElement?.id || document.activeElement?.tagName);
  await page.keyboard.type(process.env.HUB_KEY);
  await page.keyboard.press("Enter");
  await page.getByRole("heading", { level: 1, name: "Overview" }).waitFor();
  await page.getByTestId("balance").waitFor();
  // A new page puts the focus on its heading; from there, back (Shift+Tab) through the
  // header to the navigation, and open "Usage" with the keyboard only.
  await page.waitForFunction(() => document.activeElement?.id === "page-title");
  const visited = [];
  for (let i = 0; i < 12; i += 1) {
    await page.keyboard.press("Shift+Tab");
    const focused = await page.evaluate(() => ({
      text: document.activeElement?.innerText?.trim() || "",
      outline: getComputedStyle(document.activeElement).outlineStyle,
    }));
    visited.push(focused.text);
    if (focused.text === "Usage") {
      result.focus_outline = focused.outline;
      await page.keyboard.press("Enter");
      break;
    }
  }
  result.tab_order = visited;
  await page.getByRole("heading", { level: 1, name: "Usage" }).waitFor();
  // The page moves the focus in an effect, just after it renders the heading: wait for
  // it a while (reading it at once failed once in CI), then record where it is.
  await page.waitForFunction(() => document.activeElement?.id === "page-title", null, { timeout: 5000 }).catch(() => {});
  result.focused_after_nav = await page.evaluate(() => document.activeElement?.id);
  result.url = page.url();
  await page.getByTestId("total-calls").waitFor();
  await check(page, "keyboard-usage");
}

// The sign-in page as it first appears (a screenshot for the record).
async function signin(browser) {
  const { page } = await open(browser);
  await page.goto(`${BASE}/ui/`);
  await page.getByLabel("API key or admin token").waitFor();
  await check(page, "signin");
}

const SCENARIOS = { owner, reservations, admin, wrong, keyboard, signin };
const scenario = SCENARIOS[process.argv[2]];
if (!scenario) {
  console.error(`usage: node dashboard.mjs ${Object.keys(SCENARIOS).join("|")}`);
  process.exit(2);
}
const browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox", "--disable-gpu"] });
try {
  await scenario(browser);
} catch (exc) {
  result.failure = String(exc.stack || exc);
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
