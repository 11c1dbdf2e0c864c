// Prints what failed in the last browser run, from Playwright's JSON report (out/results.json): the tail of the
// server log (out/nsmld-FILE.log) of each test file with a failure, then errors outside any test, then each
// failed or timed-out test with the first lines of its errors. `run` prints it last, so that the failures are
// what the end of a CI log shows. Prints nothing when every test passed.
import { existsSync, readFileSync } from "node:fs";
import path from "node:path";
import { OUT_DIR } from "./platform.mjs";

const ERROR_LINES = 15;
const LOG_LINES = 20;

const reportPath = path.join(OUT_DIR, "results.json");
if (!existsSync(reportPath)) {
  console.log(`no report at ${reportPath}: Playwright did not get as far as running the tests`);
  process.exit(0);
}
const report = JSON.parse(readFileSync(reportPath, "utf8"));

// Strips the terminal's colour codes Playwright puts into error messages.
const plain = (s) => String(s ?? "").replace(/\u001b\[[0-9;]*m/g, "");
const head = (s, n) => {
  const lines = plain(s).split("\n");
  return lines.slice(0, n).join("\n") + (lines.length > n ? `\n… (${lines.length - n} more lines)` : "");
};

const failed = [];
function walk(suite, titles) {
  const here = suite.title && !suite.title.endsWith(".ts") ? [...titles, suite.title] : titles;
  for (const spec of suite.specs ?? []) {
    for (const t of spec.tests ?? []) {
      const bad = (t.results ?? []).filter((r) => r.status === "failed" || r.status === "timedOut");
      if (bad.length > 0) failed.push({ file: spec.file, title: [...here, spec.title].join(" › "), line: spec.line, results: bad });
    }
  }
  for (const s of suite.suites ?? []) walk(s, here);
}
for (const s of report.suites ?? []) walk(s, []);

const loose = report.errors ?? [];
if (failed.length === 0 && loose.length === 0) process.exit(0);

// The servers' logs first and the errors last: the end of the output is what a CI log's tail shows.
for (const file of new Set(failed.map((f) => f.file))) {
  const label = path.basename(file).replace(/\.spec\.ts$/, "");
  const log = path.join(OUT_DIR, `nsmld-${label}.log`);
  if (!existsSync(log)) continue;
  const lines = readFileSync(log, "utf8").trimEnd().split("\n");
  console.log(`\n--- the last ${Math.min(LOG_LINES, lines.length)} lines of ${file}'s server log (${log})`);
  console.log(lines.slice(-LOG_LINES).join("\n"));
}

console.log(`\n=== what failed (${failed.length} test(s)${loose.length ? `, ${loose.length} error(s) outside tests` : ""}) ===`);
for (const e of loose) console.log(`\n--- outside any test\n${head(e.message ?? e.stack, ERROR_LINES)}`);
for (const f of failed) {
  console.log(`\n--- ${f.file}:${f.line} › ${f.title}`);
  for (const r of f.results) {
    console.log(`status ${r.status} after ${(r.duration / 1000).toFixed(1)} s`);
    for (const e of r.errors ?? []) console.log(head(e.message ?? e.stack, ERROR_LINES));
  }
}
