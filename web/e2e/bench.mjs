// The website's bench: figures measured in headless Chromium against embedded `nsmld up` servers it starts.
// Prints figures only; nothing passes or fails on them. See README.md for what each figure means.
//
//   node bench.mjs [--loads N] [--board-seconds S] [--board-workers W] [--flood-rate R] [--flood-seconds S]
import { chromium } from "@playwright/test";
import { gzipSync } from "node:zlib";
import { mkdirSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { FIXTURES, OUT_DIR, PASSWORDS, Platform, REPO, binDir, sleep } from "./lib/platform.mjs";

const opt = (name, def) => {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? Number(process.argv[i + 1]) : def;
};
const LOADS = opt("loads", 25);
const BOARD_SECONDS = opt("board-seconds", 120);
const BOARD_WORKERS = opt("board-workers", 8);
const BOARD_MAX = opt("board-max", 10_000);
const FLOOD_RATE = opt("flood-rate", 10_000);
const FLOOD_SECONDS = opt("flood-seconds", 5);
const EXECUTABLE = process.env.CHROMIUM ?? "/usr/bin/chromium";

const say = (s = "") => console.log(s);
const ms = (x) => `${x.toFixed(1)} ms`;
const kb = (b) => `${(b / 1024).toFixed(1)} KB`;
function pct(xs, p) {
  const s = [...xs].sort((a, b) => a - b);
  if (!s.length) return NaN;
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))];
}

// --------------------------------------------------------------------------------------------------- helpers

async function signedInCookies(browser, url, user) {
  const ctx = await browser.newContext();
  const page = await ctx.newPage();
  await page.goto(`${url}/`);
  await page.getByTestId("signin-username").fill(user);
  await page.getByTestId("signin-password").fill(PASSWORDS[user]);
  await page.getByTestId("signin-submit").click();
  await page.getByTestId("whoami").waitFor({ timeout: 60_000 });
  const cookies = await ctx.cookies();
  await ctx.close();
  return cookies;
}

// Installed before the page's own scripts: notes when the first board row enters the DOM and when the frame
// after it has been produced (rendered), relative to the navigation's start (performance.now()).
const BOARD_PROBE = () => {
  const w = window;
  w.__rowsAt = undefined;
  w.__rowsPainted = undefined;
  const check = () => {
    if (w.__rowsAt === undefined && document.querySelector("[data-testid=board-row]")) {
      w.__rowsAt = performance.now();
      requestAnimationFrame(() => setTimeout(() => (w.__rowsPainted = performance.now()), 0));
    }
  };
  new MutationObserver(check).observe(document, { subtree: true, childList: true });
};

async function timeBoardLoad(page, url) {
  await page.goto(url);
  await page.waitForFunction(() => window.__rowsPainted !== undefined, null, { timeout: 60_000, polling: 50 });
  return page.evaluate(() => ({
    rows: window.__rowsAt,
    painted: window.__rowsPainted,
    fcp: performance.getEntriesByName("first-contentful-paint")[0]?.startTime ?? NaN,
  }));
}

// ------------------------------------------------------------------------------------------ 1. first paint

async function firstPaint(browser, p) {
  say("== Dataset board: first paint (navigation start → first board row in the DOM → the next frame)");
  const cookies = await signedInCookies(browser, p.url, "alice");
  const url = `${p.url}/#/board/t1-cls`;

  // Cold: a fresh browser context each time (empty HTTP cache), already signed in (its cookie).
  const cold = [];
  let bundle = [];
  for (let i = 0; i < LOADS; i++) {
    const ctx = await browser.newContext();
    await ctx.addCookies(cookies);
    await ctx.addInitScript(BOARD_PROBE);
    const page = await ctx.newPage();
    const assets = [];
    if (i === 0) {
      page.on("response", (r) => {
        const t = r.request().resourceType();
        if ((t === "script" || t === "stylesheet") && r.url().startsWith(p.url)) assets.push(r);
      });
    }
    cold.push(await timeBoardLoad(page, url));
    if (i === 0) {
      for (const r of assets) {
        const body = await r.body();
        bundle.push({ url: new URL(r.url()).pathname, raw: body.length, gz: gzipSync(body, { level: 9 }).length, enc: r.headers()["content-encoding"] ?? "" });
      }
      mkdirSync(OUT_DIR, { recursive: true });
      await page.screenshot({ path: path.join(OUT_DIR, "bench-board.png") });
    }
    await ctx.close();
  }
  // Warm: one tab reloading (HTTP cache warm, same cookie).
  const ctx = await browser.newContext();
  await ctx.addCookies(cookies);
  await ctx.addInitScript(BOARD_PROBE);
  const page = await ctx.newPage();
  await timeBoardLoad(page, url);
  const warm = [];
  for (let i = 0; i < LOADS; i++) {
    await page.goto("about:blank");
    warm.push(await timeBoardLoad(page, url));
  }
  await ctx.close();

  const line = (label, xs) => say(`  ${label.padEnd(40)} p50 ${ms(pct(xs, 50)).padStart(9)}   p90 ${ms(pct(xs, 90)).padStart(9)}   (n=${xs.length})`);
  line("cold cache: rows rendered (painted)", cold.map((x) => x.painted));
  line("cold cache: rows in the DOM", cold.map((x) => x.rows));
  line("cold cache: first contentful paint", cold.map((x) => x.fcp));
  line("warm cache: rows rendered (painted)", warm.map((x) => x.painted));
  line("warm cache: first contentful paint", warm.map((x) => x.fcp));
  say();
  say("== Bundle: the JS and CSS files the board page loads (gzip -9 of each, summed)");
  for (const b of bundle) say(`  ${b.url.padEnd(40)} ${kb(b.raw).padStart(10)} raw  ${kb(b.gz).padStart(9)} gzip -9   (served ${b.enc || "identity"})`);
  const raw = bundle.reduce((a, b) => a + b.raw, 0);
  const gz = bundle.reduce((a, b) => a + b.gz, 0);
  say(`  ${"total".padEnd(40)} ${kb(raw).padStart(10)} raw  ${kb(gz).padStart(9)} gzip -9   (${gz} bytes)`);
  say();
  return cookies;
}

// ------------------------------------------------------------------------------------------- 2. log tail

async function logTail(browser, p, cookies) {
  say(`== Log tail: a session printing ${FLOOD_RATE.toLocaleString()} lines/s for ${FLOOD_SECONDS} s, followed on its page`);
  const ctx = await browser.newContext();
  await ctx.addCookies(cookies);
  const page = await ctx.newPage();
  await page.goto(`${p.url}/#/sessions`);
  await page.getByTestId("whoami").waitFor({ timeout: 60_000 });
  const name = await p.run("alice", path.join(FIXTURES, "flood"), [
    "-d", "t1-cls", "-g", "0", "-a", `--rate ${FLOOD_RATE} --seconds ${FLOOD_SECONDS} --delay 4`, "-m", "log tail bench",
  ]);
  await page.goto(`${p.url}/#/session/${name}`);
  await page.getByTestId("log-count").waitFor({ timeout: 60_000 });
  // Every frame: the line count the page shows and the wall clock; also the long tasks.
  await page.evaluate(() => {
    const w = window;
    w.__frames = [];
    w.__long = [];
    new PerformanceObserver((l) => l.getEntries().forEach((e) => w.__long.push(e.duration))).observe({ type: "longtask", buffered: false });
    const tick = () => {
      const text = document.querySelector("[data-testid=log-count]")?.textContent ?? "";
      const n = Number((text.match(/^[\d,.\s]+/)?.[0] ?? "0").replace(/\D/g, ""));
      w.__frames.push([performance.now(), Date.now(), n]);
      if (!w.__stopFrames) requestAnimationFrame(tick);
    };
    requestAnimationFrame(tick);
  });
  const ended = await p.waitEnded("alice", name, 300_000);
  const logs = (await p.ok("alice", ["logs", name])).stdout.split("\n").filter((l) => l !== "");
  const done = logs.find((l) => l.startsWith("flood done")) ?? "";
  const m = done.match(/flood done (\d+) lines in ([\d.]+) s, from (\d+) to (\d+)/);
  const total = logs.length;
  // Wait until the page shows every line (or 120 s pass).
  const deadline = Date.now() + 120_000;
  for (;;) {
    const n = await page.evaluate(() => window.__frames.at(-1)?.[2] ?? 0);
    if (n >= total || Date.now() > deadline) break;
    await sleep(200);
  }
  await page.evaluate(() => (window.__stopFrames = true));
  const { frames, long } = await page.evaluate(() => ({ frames: window.__frames, long: window.__long }));
  await page.screenshot({ path: path.join(OUT_DIR, "bench-log-tail.png") });
  await ctx.close();

  if (!m) {
    say(`  the session did not print its last line (status ${ended.status}); its log has ${total} lines`);
    say();
    return;
  }
  const [printed, took, fromWall, toWall] = [Number(m[1]), Number(m[2]), Number(m[3]), Number(m[4])];
  // Frames from the first flood line shown to the last line shown.
  const before = logs.findIndex((l) => l.startsWith("flood 0000000 "));
  const lastN = frames.at(-1)[2];
  const startF = frames.find((f) => f[2] > before) ?? frames[0];
  const endF = frames.find((f) => f[2] >= Math.min(total, lastN)) ?? frames.at(-1);
  const during = frames.filter((f) => f[0] >= startF[0] && f[0] <= endF[0]);
  const deltas = during.slice(1).map((f, i) => f[0] - during[i][0]);
  const showRate = ((endF[2] - startF[2]) / Math.max(1e-9, endF[0] - startF[0])) * 1000;
  say(`  the program printed ${printed.toLocaleString()} lines in ${took.toFixed(2)} s (${Math.round(printed / took).toLocaleString()} lines/s); its log holds ${total.toLocaleString()} lines`);
  say(`  the page showed ${lastN.toLocaleString()} of them${lastN >= total ? " (all)" : ""}`);
  say(`  lines shown per second while the flood arrived: ${Math.round(showRate).toLocaleString()}`);
  say(`  last line printed → shown in the page: ${ms(endF[1] - toWall)}`);
  say(`  frames while it arrived: ${deltas.length}, ${(deltas.length / ((endF[0] - startF[0]) / 1000)).toFixed(1)} fps; frame p50 ${ms(pct(deltas, 50))}, p99 ${ms(pct(deltas, 99))}, longest ${ms(Math.max(0, ...deltas))}; frames over 50 ms: ${deltas.filter((d) => d > 50).length}`);
  say(`  long tasks (>50 ms) on the page during the run: ${long.length}${long.length ? `, longest ${ms(Math.max(...long))}` : ""}`);
  say();
}

// -------------------------------------------------------------------------------------------- 3. big board

async function bigBoard(browser) {
  say(`== Big board: teams created and scored through the platform for ${BOARD_SECONDS} s (${BOARD_WORKERS} at a time, at most ${BOARD_MAX.toLocaleString()}), then scrolled`);
  const p = await Platform.start();
  try {
    const baseline = path.join(REPO, "examples", "baseline");
    let next = 0;
    let scored = 0;
    let failed = 0;
    let firstError = "";
    const started = Date.now();
    const stopAt = started + BOARD_SECONDS * 1000;
    const worker = async () => {
      while (Date.now() < stopAt && next < BOARD_MAX) {
        const i = next++;
        const user = `bench${String(i).padStart(5, "0")}`;
        const team = `team${String(i).padStart(5, "0")}`;
        try {
          await p.ok("admin", ["admin", "user", "add", user, "--team", team, "--competition", "demo", "--password-stdin"], { stdin: `pw-${user}\n` });
          await p.login(user, `pw-${user}`);
          const name = await p.run(user, baseline, ["-d", "t1-cls", "-g", "0", "-c", "1", "--memory", "1G", "-a", `--epochs 1 --seed ${i} --lr ${(0.02 + (i % 50) * 0.004).toFixed(3)}`]);
          await p.ok(user, ["logs", "-f", name]); // returns when the session has ended
          let r;
          for (let k = 0; k < 20; k++) {
            r = await p.cli(user, ["submit", name, "0"]);
            if (r.code === 0) break;
            await sleep(500);
          }
          if (r.code !== 0) throw new Error(r.all);
          scored++;
        } catch (e) {
          failed++;
          if (!firstError) firstError = String(e.message ?? e).slice(0, 300);
        }
      }
    };
    await Promise.all(Array.from({ length: BOARD_WORKERS }, worker));
    const tookS = (Date.now() - started) / 1000;
    say(`  ${scored.toLocaleString()} teams scored in ${tookS.toFixed(0)} s (${(scored / tookS).toFixed(1)} teams/s; each: user add, login, run, submit); ${failed} failed${firstError ? ` (first: ${firstError.replace(/\n/g, " ")})` : ""}`);

    const cookies = await signedInCookies(browser, p.url, "alice");
    const ctx = await browser.newContext({ viewport: { width: 1280, height: 900 } });
    await ctx.addCookies(cookies);
    await ctx.addInitScript(BOARD_PROBE);
    const page = await ctx.newPage();
    const { rowcount, paint } = await paintBoard(page, p.url);
    say(`  the board lists ${rowcount.toLocaleString()} teams; first paint with them ${paint}`);

    const res = await scrollBoard(page);
    await page.screenshot({ path: path.join(OUT_DIR, "bench-board-bottom.png") });
    await ctx.close();
    reportScroll(res, rowcount);
  } finally {
    await p.stop();
  }
  say();
}

// Loads the t1-cls board five times in one tab: how many teams it lists, and its first paint (warm cache).
async function paintBoard(page, url) {
  const loads = [];
  for (let i = 0; i < 5; i++) {
    await page.goto("about:blank");
    loads.push(await timeBoardLoad(page, `${url}/#/board/t1-cls`));
  }
  const rowcount = Number(await page.locator(".vtable").first().getAttribute("aria-rowcount"));
  const painted = loads.map((x) => x.painted);
  return { rowcount, paint: `(warm cache, n=5): p50 ${ms(pct(painted, 50))}, p90 ${ms(pct(painted, 90))}` };
}

// Scrolls the board's own scrolling area from top to bottom, `px` per frame (120: a brisk wheel), timing frames.
async function scrollBoard(page, px = 120) {
  return page.evaluate(
    (px) =>
      new Promise((resolve) => {
        const el = document.querySelector("[data-testid=board-table]");
        const long = [];
        const po = new PerformanceObserver((l) => l.getEntries().forEach((e) => long.push(e.duration)));
        po.observe({ type: "longtask", buffered: false });
        el.scrollTop = 0;
        const deltas = [];
        let last = 0;
        const t0 = performance.now();
        const step = (t) => {
          if (last) deltas.push(t - last);
          last = t;
          const max = el.scrollHeight - el.clientHeight;
          if (el.scrollTop >= max - 1) {
            po.disconnect();
            const ranks = Array.from(el.querySelectorAll("[data-testid=board-row]"), (r) => Number(r.getAttribute("data-rank")));
            resolve({ deltas, ms: t - t0, height: el.scrollHeight, lastRank: Math.max(...ranks), long });
            return;
          }
          el.scrollTop = Math.min(max, el.scrollTop + px);
          requestAnimationFrame(step);
        };
        requestAnimationFrame(step);
      }),
    px,
  );
}

function reportScroll(res, rowcount) {
  const d = res.deltas;
  say(`  scrolled ${Math.round(res.height).toLocaleString()} px top to bottom in ${(res.ms / 1000).toFixed(2)} s: ${d.length} frames, ${(d.length / (res.ms / 1000)).toFixed(1)} fps`);
  say(`  frame p50 ${ms(pct(d, 50))}, p99 ${ms(pct(d, 99))}, longest ${ms(Math.max(...d))}; frames over 50 ms: ${d.filter((x) => x > 50).length}; long tasks: ${res.long.length}`);
  say(`  at the bottom the page shows rank ${res.lastRank} of ${rowcount}`);
}

// ------------------------------------------------------------------------------------- 4. a 10,000-row board

// Protobuf encoding of a `BoardResponse`, enough for a board answer (leaderboard.proto).
function varint(n) {
  const out = [];
  let v = BigInt(n);
  do {
    let b = Number(v & 0x7fn);
    v >>= 7n;
    if (v) b |= 0x80;
    out.push(b);
  } while (v);
  return out;
}
const field = (no, wire) => varint((no << 3) | wire);
const str = (no, s) => {
  const b = Buffer.from(s);
  return [...field(no, 2), ...varint(b.length), ...b];
};
const u64 = (no, v) => [...field(no, 0), ...varint(v)];
const dbl = (no, v) => {
  const b = Buffer.alloc(8);
  b.writeDoubleLE(v);
  return [...field(no, 1), ...b];
};
function boardAnswer(teams) {
  const now = Date.now();
  const msg = [...str(1, "t1-cls"), ...str(2, "demo"), ...str(3, "accuracy"), ...u64(4, 1)];
  for (let i = 0; i < teams; i++) {
    const team = `team${String(i).padStart(5, "0")}`;
    const row = [
      ...u64(1, i + 1),
      ...str(2, team),
      ...dbl(3, 0.99 - i / (teams * 2)),
      ...str(4, `${team}/t1-cls/1/2`),
      ...u64(5, 1 + (i % 7)),
      ...u64(6, now - i * 1000),
      ...u64(7, now - i * 1000),
    ];
    msg.push(...field(6, 2), ...varint(row.length), ...row);
  }
  const body = Buffer.from(msg);
  const trailer = Buffer.from("grpc-status:0\r\n");
  const frame = (flag, b) => {
    const h = Buffer.alloc(5);
    h[0] = flag;
    h.writeUInt32BE(b.length, 1);
    return Buffer.concat([h, b]);
  };
  return Buffer.concat([frame(0, body), frame(0x80, trailer)]);
}

async function wideBoard(browser, p, cookies) {
  const TEAMS = 10_000;
  say(`== A board of ${TEAMS.toLocaleString()} teams: the page as served, its board answer (a real BoardResponse of ${TEAMS.toLocaleString()} rows) put in place of the platform's by the browser`);
  const answer = boardAnswer(TEAMS);
  const ctx = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  await ctx.addCookies(cookies);
  await ctx.addInitScript(BOARD_PROBE);
  await ctx.route(/LeaderboardService\/(WatchBoard|Board)$/, (route) =>
    route.fulfill({ status: 200, headers: { "content-type": "application/grpc-web+proto" }, body: answer }),
  );
  const page = await ctx.newPage();
  const { rowcount, paint } = await paintBoard(page, p.url);
  say(`  the answer: ${kb(answer.length)}; the board lists ${rowcount.toLocaleString()} teams; first paint ${paint}`);
  // 400,000 px of rows: scrolled 600 px a frame, a fast fling.
  const res = await scrollBoard(page, 600);
  await page.screenshot({ path: path.join(OUT_DIR, "bench-board-10000.png") });
  await ctx.close();
  reportScroll(res, rowcount);
  say();
}

// ------------------------------------------------------------------------------------------------- main

async function main() {
  const browser = await chromium.launch({ executablePath: EXECUTABLE, args: ["--no-sandbox", "--disable-dev-shm-usage"] });
  say(`NSML website bench — ${new Date().toISOString()}`);
  say(`  ${browser.version()} headless, viewport 1280x720 (the big board 1280x900); binaries ${binDir()}`);
  say(`  machine: ${os.cpus().length} CPUs (${os.cpus()[0]?.model ?? "?"}), load average ${os.loadavg().map((x) => x.toFixed(2)).join(" ")}`);
  say();
  const p = await Platform.start();
  try {
    await p.login("alice");
    await p.login("bob");
    const baseline = path.join(REPO, "examples", "baseline");
    for (const [user, epochs] of [["alice", 3], ["bob", 2]]) {
      const name = await p.run(user, baseline, ["-d", "t1-cls", "-g", "0", "-a", `--epochs ${epochs}`]);
      await p.waitEnded(user, name);
      await p.ok(user, ["submit", name, String(epochs - 1)]);
    }
    const cookies = await firstPaint(browser, p);
    await logTail(browser, p, cookies);
    await wideBoard(browser, p, cookies);
  } finally {
    await p.stop();
  }
  await bigBoard(browser);
  say(`  load average at the end ${os.loadavg().map((x) => x.toFixed(2)).join(" ")}`);
  await browser.close();
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
