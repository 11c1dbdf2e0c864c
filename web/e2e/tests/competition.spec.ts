// The participant's loop seen in the browser while the CLI drives it, then what a participant must not see,
// then the host's pages and the reveal of the private board. One `nsmld up` for the whole file; the tests run
// in order and build on each other (the run, then its submit, then the boards).
import { test, expect, type Browser, type BrowserContext, type Page } from "@playwright/test";
import { copyFileSync, existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { FIXTURES, Platform, REPO } from "../lib/platform.mjs";
import { go, logTexts, plotPoints, recordStatuses, shot, signIn, statusesSeen, stillSameDocument } from "./helpers";

test.describe.configure({ mode: "serial" });

let p: Platform;
let alice: BrowserContext;
let page: Page; // alice's main tab
let sessionTab: Page; // alice's second tab, on the session's page
let run = ""; // alice's training session
let cliLogs: string[] = [];
let cliScore = 0;
let bobRun = "";

test.beforeAll(async ({ browser }: { browser: Browser }) => {
  p = await Platform.start({ label: "competition" });
  await p.login("alice");
  await p.login("bob");
  alice = await browser.newContext();
});

test.afterAll(async () => {
  await alice?.close();
  await p?.stop();
});

/** examples/baseline/main.py with an entry that waits for the test's go-ahead (fixtures/gated). */
function gatedTrainingDir(): string {
  const dir = path.join(p.tmp, "train-gated");
  mkdirSync(dir, { recursive: true });
  copyFileSync(path.join(REPO, "examples", "baseline", "main.py"), path.join(dir, "main.py"));
  copyFileSync(path.join(FIXTURES, "gated", "e2e_entry.py"), path.join(dir, "e2e_entry.py"));
  return dir;
}

test("a run started with the CLI appears on the sessions page and turns Running, then Exited, without a reload", async () => {
  page = await alice.newPage();
  await signIn(page, p.url, "alice");
  await page.getByTestId("nav-sessions").click();
  await expect(page.getByTestId("sessions-empty")).toBeVisible();
  await shot(page, "sessions-empty");
  await recordStatuses(page);

  run = await p.run("alice", gatedTrainingDir(), ["-d", "t1-cls", "-g", "0", "-e", "e2e_entry.py", "-a", "--epochs 3", "-m", "baseline, 3 epochs"]);
  const row = page.locator(`[data-testid=session-row][data-session="${run}"]`);
  await expect(row).toBeVisible();
  await expect(row.getByTestId("session-status")).toHaveText("Running");
  await shot(page, "sessions-running");

  // The session's page in a second tab while the session waits: its first line must stream in.
  sessionTab = await alice.newPage();
  await sessionTab.goto(`${p.url}/#/session/${run}`);
  await expect(sessionTab.getByTestId("session-title")).toHaveText(run);
  const waiting = sessionTab.getByTestId("log-lines").getByText(/waiting for GO at /);
  await expect(waiting).toBeVisible();
  await shot(sessionTab, "session-running");
  const goPath = ((await waiting.textContent()) ?? "").match(/waiting for GO at (\S+)/)?.[1] ?? "";
  expect(existsSync(path.dirname(goPath)), `the session's code directory ${goPath} is visible to the test`).toBe(true);
  writeFileSync(goPath, "");

  await expect(sessionTab.getByTestId("session-info").getByTestId("session-status")).toHaveText("Exited", { timeout: 120_000 });
  await expect(row.getByTestId("session-status")).toHaveText("Exited");
  const seen = await statusesSeen(page, run);
  expect(seen, "statuses the sessions page showed").toContain("Running");
  expect(seen.indexOf("Running")).toBeLessThan(seen.indexOf("Exited"));
  expect(seen[seen.length - 1]).toBe("Exited");
  expect(await stillSameDocument(page), "the sessions page was not reloaded").toBe(true);
  await expect(row.getByTestId("session-summary")).toContainText("val/acc");
  await shot(page, "sessions");
});

test("its log lines stream into the session page and match `nsml logs`", async () => {
  cliLogs = (await p.ok("alice", ["logs", run])).stdout.split("\n").filter((l) => l !== "");
  expect(cliLogs.some((l) => l.startsWith("epoch 3/3 "))).toBe(true);
  // Every line after the first was printed after the test let the session go, i.e. while the page was open.
  await expect(sessionTab.getByTestId("log-count")).toContainText(`${cliLogs.length} lines`);
  const shown = (await logTexts(sessionTab)).map((l) => l.trimEnd());
  expect(shown).toEqual(cliLogs.map((l) => l.trimEnd()));
  await expect(sessionTab.locator(".logview")).toContainText("end of log");
});

test("its plot has one point per metric report", async () => {
  // main.py calls nsml.report once per epoch, right after printing `epoch k/N …`.
  const reports = cliLogs.filter((l) => /^epoch \d+\/\d+ /.test(l));
  expect(reports.length).toBe(3);
  const loss = sessionTab.locator('[data-testid=plot][data-metric="train/loss"]');
  const acc = sessionTab.locator('[data-testid=plot][data-metric="val/acc"]');
  await expect(loss).toBeVisible();
  await expect(acc).toBeVisible();
  for (const plot of [loss, acc]) {
    await expect.poll(async () => (await plotPoints(sessionTab, plot)).length, { timeout: 60_000 }).toBe(reports.length);
  }
  // The points are the reported values, step by step.
  const pts = await plotPoints(sessionTab, loss);
  expect(pts.map((x) => x.step)).toEqual(["0", "1", "2"]);
  reports.forEach((line, i) => {
    const printed = Number(line.match(/train_loss=([0-9.]+)/)?.[1]);
    expect(Math.abs(Number(pts[i].value) - printed)).toBeLessThan(1e-3);
  });
  await expect(sessionTab.getByTestId("checkpoint-row")).toHaveCount(3);
  await shot(sessionTab, "session");
});

test("a real submit made with the CLI appears on the board and in the submission history", async () => {
  await go(page, "#/");
  await page.locator("[data-testid=dataset-card][data-dataset=t1-cls]").click();
  await expect(page.getByTestId("board-empty")).toBeVisible();
  await recordStatuses(page); // marks the document

  const out = await p.ok("alice", ["submit", run, "2"]);
  expect(out.stdout).toContain("Done");
  cliScore = Number(out.stdout.match(/Score: (\S+)/)?.[1]);
  expect(Number.isFinite(cliScore)).toBe(true);

  const row = page.locator("[data-testid=board-row][data-team=demo]");
  await expect(row).toBeVisible();
  expect(await stillSameDocument(page), "the board updated live").toBe(true);
  const boardScore = ((await row.getByTestId("board-score").textContent()) ?? "").trim();
  expect(Math.abs(Number(boardScore) - cliScore)).toBeLessThan(0.006); // the CLI prints 2 decimals
  await expect(row).toContainText(`${run}/2`);
  await expect(row.getByTestId("board-rank")).toHaveText("1");
  await shot(page, "board-public");

  await page.getByTestId("nav-submissions").click();
  const sub = page.getByTestId("submission-row").first();
  await expect(sub.getByTestId("submission-status")).toHaveText("Scored");
  await expect(sub.getByTestId("submission-score")).toHaveText(boardScore);
  await expect(sub).toContainText(run);
  await expect(sub).toContainText("real");
  await shot(page, "submissions");
});

test("the quota page shows when the next real submit is allowed after that submit", async () => {
  await page.getByTestId("nav-quota").click();
  const next = page.locator("[data-testid=submit-row][data-dataset=t1-cls] [data-testid=quota-next-submit]");
  await expect(next).toContainText(/in \d/);
  const nextMs = Number(await next.getAttribute("data-next-ms"));
  // The CLI's own view: `t1-cls  <last success>  <next submit> (in 1h 0m)  …`.
  const q = (await p.ok("alice", ["quota"])).stdout;
  const line = q.split("\n").find((l) => l.startsWith("t1-cls")) ?? "";
  const cliNext = line.match(/(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) \(in /)?.[1] ?? "";
  expect(cliNext, `nsml quota: ${line}`).not.toBe("");
  expect(Math.abs(nextMs - Date.parse(cliNext.replace(" ", "T")))).toBeLessThan(1500);
  await expect(next).toContainText(cliNext);
  await expect(page.locator("[data-testid=submit-row][data-dataset=t2-reg] [data-testid=quota-next-submit]")).toContainText("now");
  await expect(page.locator("[data-testid=submit-row][data-dataset=t1-cls] [data-testid=quota-why]")).not.toBeEmpty();
  await shot(page, "quota");
});

test("a participant cannot see the private board", async () => {
  await go(page, "#/board/t1-cls");
  await expect(page.locator("[data-testid=board-row][data-team=demo]")).toBeVisible();
  await expect(page.getByTestId("private-switch")).toHaveCount(0);
  await go(page, "#/");
  await expect(page.getByTestId("overall-row").first()).toBeVisible();
  await expect(page.getByTestId("private-switch")).toHaveCount(0);
  await shot(page, "home");
  // Asking for it by its address is refused.
  await go(page, "#/board/t1-cls/private");
  await expect(page.getByTestId("error").first()).toBeVisible();
  await expect(page.getByTestId("board-row")).toHaveCount(0);
  await shot(page, "board-private-refused");
  const cli = await p.cli("alice", ["dataset", "board", "t1-cls", "--private"]);
  expect(cli.code, cli.all).not.toBe(0);
});

test("a participant cannot see another team's session or its logs", async () => {
  bobRun = await p.run("bob", path.join(REPO, "examples", "baseline"), ["-d", "t1-cls", "-g", "0", "-a", "--epochs 2"]);
  await p.waitEnded("bob", bobRun);
  const bobLogs = (await p.ok("bob", ["logs", bobRun])).stdout.split("\n").filter((l) => l.startsWith("epoch "));
  expect(bobLogs.length).toBe(2);

  await page.goto(`${p.url}/#/session/${bobRun}`);
  await expect(page.getByTestId("error").first()).toBeVisible();
  await expect(page.getByTestId("log-lines")).toHaveCount(0);
  await expect(page.getByTestId("session-info")).toHaveCount(0);
  for (const l of bobLogs) await expect(page.locator("body")).not.toContainText(l);
  await shot(page, "session-other-team-refused");

  await go(page, "#/sessions");
  await expect(page.locator(`[data-testid=session-row][data-session="${run}"]`)).toBeVisible();
  await expect(page.locator(`[data-testid=session-row][data-session="${bobRun}"]`)).toHaveCount(0);

  // Bob's team submits too, so the boards below rank two teams.
  await p.ok("bob", ["submit", bobRun, "1"]);
});

test("a host sees the private board, uses the host pages, and reveals the board; then alice sees it", async ({ browser }) => {
  const host = await browser.newContext();
  const hp = await host.newPage();
  await signIn(hp, p.url, "host");
  await expect(hp.getByTestId("nav-host")).toBeVisible();

  // The private board.
  await go(hp, "#/board/t1-cls");
  await expect(hp.getByTestId("board-row")).toHaveCount(2);
  await hp.getByTestId("private-switch-private").click();
  await expect(hp).toHaveURL(/#\/board\/t1-cls\/private$/);
  await expect(hp.getByTestId("board-row")).toHaveCount(2);
  await expect(hp.locator("[data-testid=board-row][data-team=rivals]")).toBeVisible();
  await shot(hp, "board-private");
  await go(hp, "#/");
  await expect(hp.getByTestId("overall-row")).toHaveCount(2);
  await hp.getByTestId("private-switch-private").click();
  await expect(hp.getByTestId("overall-row")).toHaveCount(2);
  await shot(hp, "home-host-private");

  // Competitions and teams.
  await hp.getByTestId("nav-host").click();
  const card = hp.locator("[data-testid=host-competition][data-competition=demo]");
  await expect(card).toBeVisible();
  await expect(card.getByTestId("host-teams")).toContainText("demo");
  await expect(card.getByTestId("host-teams")).toContainText("rivals");
  await shot(hp, "host");

  // Audit: explain the admission of alice's run.
  await hp.getByTestId("explain-input").fill(run);
  await hp.getByTestId("explain-submit").click();
  await expect(hp).toHaveURL(/#\/host\/explain\//);
  await expect(hp.getByTestId("explain-result")).toBeVisible();
  await expect(hp.getByTestId("explain-decision")).toContainText("granted");
  await expect(hp.getByTestId("explain-rule")).not.toBeEmpty();
  await expect(hp.getByTestId("explain-replay")).toContainText("matches the record");
  await shot(hp, "host-explain");

  // Audit: verify the chain, replay the decisions.
  await hp.getByTestId("verify-run").click();
  await expect(hp.getByTestId("verify-result")).toHaveAttribute("data-intact", "true");
  await hp.getByTestId("replay-run").click();
  await expect(hp.getByTestId("replay-result")).toContainText("all match");
  await hp.getByTestId("verify-result").scrollIntoViewIfNeeded();
  await shot(hp, "host-verify");

  // An override: one extra submit for team demo on t1-cls; alice's quota page shows it live.
  await go(page, "#/quota");
  await expect(page.getByTestId("quota-usage")).toBeVisible();
  await hp.getByTestId("override-team").selectOption("demo");
  await hp.getByTestId("override-dataset").selectOption("t1-cls");
  await hp.getByTestId("override-reason").fill("e2e: the scoring node was lost");
  await hp.getByTestId("override-submit").click();
  await expect(hp.getByTestId("override-result")).toContainText("e2e: the scoring node was lost");
  await shot(hp, "host-override");
  await expect(page.getByTestId("overrides")).toContainText("e2e: the scoring node was lost");
  await shot(page, "quota-override");

  // Reveal.
  hp.once("dialog", (d) => void d.accept());
  await hp.getByTestId("reveal-private").click();
  await expect(hp.getByTestId("private-revealed")).toBeVisible();
  await shot(hp, "host-revealed");
  await host.close();

  // Alice now gets the switch and the private board.
  await page.goto(`${p.url}/#/board/t1-cls`);
  await expect(page.getByTestId("private-switch")).toBeVisible();
  await page.getByTestId("private-switch-private").click();
  await expect(page.getByTestId("board-row")).toHaveCount(2);
  await expect(page.getByTestId("error")).toHaveCount(0);
  await shot(page, "board-private-revealed");
  const cli = await p.cli("alice", ["dataset", "board", "t1-cls", "--private"]);
  expect(cli.code, cli.all).toBe(0);
});

test("the quota page shows the competition's rounds, and a team's extension of one", async () => {
  const day = 86_400_000;
  const at = (ms: number) => new Date(ms).toISOString().replace(/\.\d{3}Z$/, "Z");
  const now = Date.now();
  // The example competition, its datasets read from the checkout, in a preliminary (open) and a final (not yet).
  const example = readFileSync(path.join(REPO, "examples", "competition.toml"), "utf8").replaceAll(
    'path = "datasets/',
    `path = "${path.join(REPO, "examples", "datasets")}/`,
  );
  const manifest = path.join(p.tmp, "rounds.toml");
  writeFileSync(
    manifest,
    `${example}
[[rounds]]
name = "preliminary"
datasets = ["t1-cls"]
opens = "${at(now - day)}"
closes = "${at(now + 30 * day)}"
submit_interval = "30m"

[[rounds]]
name = "final"
datasets = ["t2-reg"]
opens = "${at(now + 31 * day)}"
closes = "${at(now + 60 * day)}"
`,
  );
  await p.ok("admin", ["admin", "competition", "apply", manifest]);
  await p.ok("admin", [
    "admin", "override", "deadline", "--team", "demo", "--round", "preliminary",
    "--until", at(now + 40 * day), "--reason", "e2e: the team lost a day", "--competition", "demo",
  ]);

  await page.goto(`${p.url}/#/quota`);
  await page.reload();
  const pre = page.locator("[data-testid=round-row][data-round=preliminary]");
  const fin = page.locator("[data-testid=round-row][data-round=final]");
  await expect(pre).toHaveAttribute("data-state", "open");
  await expect(pre).toContainText("t1-cls");
  await expect(pre).toContainText("one every 30m");
  await expect(pre.getByTestId("round-extended")).toContainText("extended for the team");
  await expect(fin).toHaveAttribute("data-state", "upcoming");
  await expect(fin).toContainText("t2-reg");
  await expect(fin.getByTestId("round-extended")).toHaveCount(0);
  // The final's dataset takes submits only once the round opens.
  await expect(page.locator("[data-testid=submit-row][data-dataset=t2-reg] [data-testid=quota-next-submit]")).toContainText("when it opens");
  await expect(page.locator("[data-testid=submit-row][data-dataset=t2-reg] [data-testid=quota-why]")).toContainText("round `final` opens");
  await expect(page.getByTestId("overrides")).toContainText("extended deadline");
  await shot(page, "quota-rounds");

  // Each board names its round and where the round stands.
  await page.goto(`${p.url}/#/board/t2-reg`);
  await expect(page.getByTestId("board-round")).toContainText("round final, opens");
  await page.goto(`${p.url}/#/board/t1-cls`);
  await expect(page.getByTestId("board-round")).toContainText("round preliminary, open until");

  // The CLI refuses a run on the final's dataset, naming the round.
  const refused = await p.cli("alice", ["run", "-d", "t2-reg", "-g", "0"], { cwd: path.join(REPO, "examples", "baseline") });
  expect(refused.code, refused.all).not.toBe(0);
  expect(refused.all).toContain("final");
});
