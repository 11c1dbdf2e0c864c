// Markup in what participants control (their session's output and memo) shows as text. The browser context
// bypasses the page's Content-Security-Policy, so what is tested is the page's escaping, not the CSP; a
// separate check asserts the CSP is sent.
import { test, expect, type Page } from "@playwright/test";
import path from "node:path";
import { FIXTURES, Platform } from "../lib/platform.mjs";
import { go, logTexts, shot, signIn } from "./helpers";

test.describe.configure({ mode: "serial" });

const SCRIPT = "<script>window.__pwned=1</script>";
const IMG = '<img src=x onerror="window.__pwned=1">';
const MEMO = `${SCRIPT} ${IMG}`;

let p: Platform;
let run = "";

test.beforeAll(async () => {
  p = await Platform.start({ label: "xss" });
  await p.login("alice");
  run = await p.run("alice", path.join(FIXTURES, "xss"), ["-d", "t1-cls", "-g", "0", "-m", MEMO]);
  await p.waitEnded("alice", run);
});

test.afterAll(async () => {
  await p?.stop();
});

async function notPwned(page: Page): Promise<void> {
  // Give an injected handler every chance to run: a few frames and a task.
  await page.evaluate(() => new Promise((r) => setTimeout(() => requestAnimationFrame(() => requestAnimationFrame(r)), 100)));
  expect(await page.evaluate(() => (window as unknown as { __pwned?: number }).__pwned)).toBeUndefined();
  // No element came out of the payloads.
  expect(await page.locator('img[src="x"]').count()).toBe(0);
  expect(await page.locator("main script").count()).toBe(0);
  expect(await page.locator("main b").filter({ hasText: "bold?" }).count()).toBe(0);
}

test("the page is served with a Content-Security-Policy that forbids inline script", async ({ request }) => {
  const res = await request.get(`${p.url}/`);
  const csp = res.headers()["content-security-policy"] ?? "";
  expect(csp).toContain("script-src 'self'");
  expect(csp).not.toContain("unsafe-inline");
});

test.describe("with the CSP bypassed", () => {
  test.use({ bypassCSP: true });

  test("a session's memo with markup shows as text in the sessions list", async ({ page }) => {
    await signIn(page, p.url, "alice");
    await page.getByTestId("nav-sessions").click();
    const row = page.locator(`[data-testid=session-row][data-session="${run}"]`);
    await expect(row).toBeVisible();
    await expect(row).toContainText(SCRIPT);
    await expect(row).toContainText(IMG);
    await notPwned(page);
    await shot(page, "xss-sessions");
  });

  test("a session's log lines and memo with markup show as text on the session page", async ({ page }) => {
    await signIn(page, p.url, "alice");
    await go(page, `#/session/${run}`);
    await expect(page.getByTestId("log-lines")).toContainText("xss session done");
    const lines = await logTexts(page);
    expect(lines).toContain(SCRIPT);
    expect(lines).toContain(IMG);
    expect(lines).toContain(`${IMG} on stderr`);
    expect(lines).toContain("<b>bold?</b> &amp; &lt;done&gt;");
    await expect(page.getByTestId("session-info")).toContainText(MEMO);
    await notPwned(page);
    await shot(page, "xss-session");
  });
});
