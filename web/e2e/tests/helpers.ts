// Browser-side helpers shared by the tests: signing in through the form, screenshots, recording what a page
// showed over time, and reading a uPlot chart's points through its legend.
import { expect, type Locator, type Page } from "@playwright/test";
import { mkdirSync } from "node:fs";
import path from "node:path";
import { OUT_DIR, PASSWORDS } from "../lib/platform.mjs";

/** Opens the site and signs in through the sign-in form; waits until the header names the user. */
export async function signIn(page: Page, url: string, user: string, password: string = PASSWORDS[user]): Promise<void> {
  await page.goto(`${url}/`);
  await expect(page.getByTestId("signin-form")).toBeVisible();
  await page.getByTestId("signin-username").fill(user);
  await page.getByTestId("signin-password").fill(password);
  await page.getByTestId("signin-submit").click();
  await expect(page.getByTestId("whoami")).toContainText(user);
}

/** A full-page screenshot in web/e2e/out/NAME.png. */
export async function shot(page: Page, name: string): Promise<void> {
  mkdirSync(OUT_DIR, { recursive: true });
  // From the top (the header is sticky: scrolled, it would be drawn across the middle of a full-page shot), once
  // the last frame of whatever was just rendered has landed.
  // The pointer off to a corner, so that nothing is drawn hovered.
  await page.mouse.move(0, (page.viewportSize()?.height ?? 900) - 1);
  await page.evaluate(() => {
    window.scrollTo(0, 0);
    return new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
  });
  await page.screenshot({ path: path.join(OUT_DIR, `${name}.png`), fullPage: true });
}

/** Goes to a route of the single-page app by its hash (a same-document navigation, no reload). */
export async function go(page: Page, hash: string): Promise<void> {
  await page.evaluate((h) => {
    location.hash = h;
  }, hash);
}

/**
 * Marks the document, so that `stillSameDocument` can tell later that the page was not reloaded, and starts
 * recording every status the page shows for each session row (sessions table) and in the session page's facts.
 */
export async function recordStatuses(page: Page): Promise<void> {
  await page.evaluate(() => {
    const w = window as unknown as { __e2eMark: string; __seen: [string, string][] };
    w.__e2eMark = "same-document";
    w.__seen = [];
    const rec = () => {
      for (const row of document.querySelectorAll<HTMLElement>("[data-testid=session-row]")) {
        const name = row.dataset.session ?? "";
        const st = row.querySelector("[data-testid=session-status]")?.textContent ?? "";
        const last = w.__seen.filter((x) => x[0] === name).pop();
        if (!last || last[1] !== st) w.__seen.push([name, st]);
      }
    };
    new MutationObserver(rec).observe(document.body, { subtree: true, childList: true, characterData: true });
    rec();
  });
}

/** The statuses the page showed for `name`, in order, since recordStatuses. */
export async function statusesSeen(page: Page, name: string): Promise<string[]> {
  return page.evaluate(
    (n) => (window as unknown as { __seen: [string, string][] }).__seen.filter((x) => x[0] === n).map((x) => x[1]),
    name,
  );
}

export async function stillSameDocument(page: Page): Promise<boolean> {
  return page.evaluate(() => (window as unknown as { __e2eMark?: string }).__e2eMark === "same-document");
}

/** The text of every log line the log view has in the page (small logs: all are in view). */
export async function logTexts(page: Page): Promise<string[]> {
  return page.locator("[data-testid=log-lines] .log-text").allTextContents();
}

/**
 * The points of one uPlot chart, read the way a person reads them: the cursor swept across the plot area, the
 * legend's step and value noted at each position (uPlot snaps the cursor to the nearest point). Returns the
 * distinct steps in order with the first series' value at each.
 */
export async function plotPoints(page: Page, plot: Locator): Promise<{ step: string; value: string }[]> {
  const over = plot.locator(".u-over");
  await over.scrollIntoViewIfNeeded();
  const box = await over.boundingBox();
  if (!box) throw new Error("the plot has no drawing area");
  const seen = new Map<string, string>();
  for (let x = 1; x < box.width; x += 4) {
    await page.mouse.move(box.x + x, box.y + box.height / 2);
    const [step, value] = await plot.evaluate((el) =>
      Array.from(el.querySelectorAll(".u-legend .u-series .u-value"), (v) => (v.textContent ?? "").trim()),
    );
    if (step && step !== "--" && !seen.has(step)) seen.set(step, value ?? "");
  }
  await page.mouse.move(0, 0);
  return [...seen].map(([step, value]) => ({ step, value }));
}
