// Signing in through the form, a refused password, and signing out.
import { test, expect } from "@playwright/test";
import { Platform } from "../lib/platform.mjs";
import { shot, signIn } from "./helpers";

test.describe.configure({ mode: "serial" });

let p: Platform;

test.beforeAll(async () => {
  p = await Platform.start({ label: "signin" });
});

test.afterAll(async () => {
  await p?.stop();
});

test("a wrong password is refused with a message and no cookie", async ({ page, context }) => {
  await page.goto(`${p.url}/`);
  await expect(page.getByTestId("signin-form")).toBeVisible();
  await shot(page, "signin");
  await page.getByTestId("signin-username").fill("alice");
  await page.getByTestId("signin-password").fill("not-the-password");
  await page.getByTestId("signin-submit").click();
  await expect(page.getByTestId("signin-error")).toBeVisible();
  await expect(page.getByTestId("signin-error")).not.toBeEmpty();
  await shot(page, "signin-refused");
  await expect(page.getByTestId("whoami")).toHaveCount(0);
  expect((await context.cookies()).filter((c) => c.name.startsWith("nsml"))).toEqual([]);
});

test("alice signs in through the form and sees her team; the token is an HttpOnly cookie", async ({ page, context }) => {
  await signIn(page, p.url, "alice");
  await expect(page.getByTestId("whoami")).toContainText("alice");
  await expect(page.getByTestId("whoami")).toContainText("demo");
  await expect(page.getByTestId("competition-title")).toContainText("NSML demo competition");
  // Participants get no host menu.
  await expect(page.getByTestId("nav-host")).toHaveCount(0);
  const cookies = (await context.cookies()).filter((c) => c.name.startsWith("nsml"));
  expect(cookies.length).toBe(1);
  expect(cookies[0].httpOnly).toBe(true);
  // Script on the page cannot read it.
  expect(await page.evaluate(() => document.cookie)).not.toContain(cookies[0].value);
  // A reload stays signed in.
  await page.reload();
  await expect(page.getByTestId("whoami")).toContainText("alice");
});

test("sign out returns to the sign-in form and the session is gone", async ({ page, context }) => {
  await signIn(page, p.url, "alice");
  const before = (await context.cookies()).filter((c) => c.name.startsWith("nsml"));
  expect(before.length).toBe(1);
  await page.getByTestId("signout").click();
  await expect(page.getByTestId("signin-form")).toBeVisible();
  await expect(page.getByTestId("whoami")).toHaveCount(0);
  // Still signed out after a reload.
  await page.reload();
  await expect(page.getByTestId("signin-form")).toBeVisible();
  // The old token no longer works even if someone kept it.
  const other = await context.browser()!.newContext();
  await other.addCookies(before);
  const again = await other.newPage();
  await again.goto(`${p.url}/`);
  await expect(again.getByTestId("signin-form")).toBeVisible();
  await other.close();
});
