// An embedded NSML platform (`nsmld up`) for one test file or one bench run: its own temporary data directory,
// a free port chosen by the kernel, the `nsml` CLI with one configuration directory per user, and a stop that
// ends the server's whole process group.
import { spawn } from "node:child_process";
import { copyFileSync, createWriteStream, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

export const E2E_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
export const REPO = path.resolve(E2E_DIR, "..", "..");
export const OUT_DIR = path.join(E2E_DIR, "out");
export const FIXTURES = path.join(E2E_DIR, "fixtures");

/** Where `nsmld` and `nsml` are: $NSML_BIN_DIR, else the workspace's debug build. */
export function binDir() {
  return process.env.NSML_BIN_DIR ? path.resolve(process.env.NSML_BIN_DIR) : path.join(REPO, "target", "debug");
}

export function bin(name) {
  const p = path.join(binDir(), name);
  if (!existsSync(p)) {
    throw new Error(`${p} does not exist: build the platform first (cargo build --workspace --bins) or set NSML_BIN_DIR`);
  }
  return p;
}

/** The demo competition's users (examples/competition.toml). */
export const PASSWORDS = { alice: "alice-pass", bob: "bob-pass", host: "host-pass" };

// Every server started by this process (pid → its temporary directory), killed and removed if the process
// exits without stopping them.
const running = new Map();
process.on("exit", () => {
  for (const [pid, tmp] of running) {
    try {
      process.kill(-pid, "SIGKILL");
    } catch {
      // already gone
    }
    if (!process.env.NSML_E2E_KEEP) rmSync(tmp, { recursive: true, force: true });
  }
});

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/**
 * Polls `fn` until it returns a truthy value (which is returned) or `timeout` ms pass (then throws, naming
 * `what` and the last value or error seen). For conditions outside the browser (the CLI's view).
 */
export async function waitUntil(fn, { timeout = 60_000, interval = 250, what = "the condition" } = {}) {
  const end = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      const v = await fn();
      if (v) return v;
      last = v;
    } catch (e) {
      last = e;
    }
    if (Date.now() > end) {
      const detail = last instanceof Error ? last.message : JSON.stringify(last);
      throw new Error(`waited ${timeout / 1000} s for ${what}; last: ${detail}`);
    }
    await sleep(interval);
  }
}

export class Platform {
  constructor(child, url, tmp, dataDir, log, logPath, label) {
    this.child = child;
    this.url = url;
    this.tmp = tmp;
    this.dataDir = dataDir;
    this.log = log; // the stream the server's output goes to
    this.logPath = logPath;
    this.label = label;
    this.logins = new Map();
  }

  /**
   * Starts `nsmld up` on a fresh data directory and waits (up to 120 s) for it to print its address.
   * `competitions`: manifests to apply instead of the example; `env`: extra environment for the server;
   * `label`: `stop()` leaves a copy of the server's log at out/nsmld-LABEL.log (the test files pass their name,
   * and the run's failure summary prints the tail of a failed file's log).
   */
  static async start({ competitions = [], env = {}, args = [], label = "" } = {}) {
    const tmp = mkdtempSync(path.join(os.tmpdir(), "nsml-e2e-"));
    const dataDir = path.join(tmp, "data");
    const logPath = path.join(tmp, "nsmld.log");
    const log = createWriteStream(logPath);
    const argv = ["up", "--data-dir", dataDir, "--listen", "127.0.0.1:0", "--gpus", "0", ...args];
    for (const c of competitions) argv.push("--competition", c);
    const child = spawn(bin("nsmld"), argv, {
      cwd: REPO,
      detached: true, // its own process group, so stop() ends everything it started
      stdio: ["ignore", "pipe", "pipe"],
      env: { ...process.env, NO_COLOR: "1", ...env },
    });
    running.set(child.pid, tmp);
    child.stderr.pipe(log);
    const url = await new Promise((resolve, reject) => {
      let buf = "";
      const timer = setTimeout(() => reject(new Error("nsmld did not print `nsmld ready at` within 120 s")), 120_000);
      child.stdout.on("data", (d) => {
        log.write(d);
        buf += d.toString();
        const m = buf.match(/nsmld ready at (http:\/\/\S+)/);
        if (m) {
          clearTimeout(timer);
          resolve(m[1]);
        }
      });
      child.on("exit", (code, sig) => {
        clearTimeout(timer);
        reject(new Error(`nsmld exited (${code ?? sig}) before it was ready; its log: ${logPath}`));
      });
    }).catch((e) => {
      try {
        process.kill(-child.pid, "SIGKILL");
      } catch {
        // gone
      }
      running.delete(child.pid);
      throw e;
    });
    return new Platform(child, url, tmp, dataDir, log, logPath, label);
  }

  /** The host token `nsmld up` wrote. */
  adminToken() {
    return readFileSync(path.join(this.dataDir, "admin.token"), "utf8").trim();
  }

  /** The tail of the server's log, for failure messages. */
  logTail(lines = 40) {
    try {
      return readFileSync(this.logPath, "utf8").split("\n").slice(-lines).join("\n");
    } catch {
      return "";
    }
  }

  /**
   * Runs `nsml ARGS` as `user` (their own NSML_CONFIG_DIR; "admin" uses the host token) in `cwd`, feeding
   * `stdin`. Resolves to { code, stdout, stderr, all }.
   */
  cli(user, args, { cwd = REPO, stdin = "", timeout = 180_000 } = {}) {
    const configDir = path.join(this.tmp, `cli-${user}`);
    mkdirSync(configDir, { recursive: true });
    const env = { ...process.env, NSML_SERVER: this.url, NSML_CONFIG_DIR: configDir, NO_COLOR: "1" };
    delete env.NSML_TOKEN;
    if (user === "admin") env.NSML_TOKEN = this.adminToken();
    return new Promise((resolve, reject) => {
      const child = spawn(bin("nsml"), args, { cwd, env, stdio: ["pipe", "pipe", "pipe"] });
      let stdout = "";
      let stderr = "";
      const timer = setTimeout(() => child.kill("SIGKILL"), timeout);
      child.stdout.on("data", (d) => (stdout += d));
      child.stderr.on("data", (d) => (stderr += d));
      child.on("error", reject);
      child.on("close", (code, sig) => {
        clearTimeout(timer);
        resolve({ code: code ?? (sig ? 128 : -1), stdout, stderr, all: stdout + stderr, args });
      });
      // A command that does not read its input may exit before it is written.
      child.stdin.on("error", () => {});
      child.stdin.end(stdin);
    });
  }

  /** Like cli() but throws (with everything it printed) unless it exits 0. */
  async ok(user, args, opts) {
    const r = await this.cli(user, args, opts);
    if (r.code !== 0) throw new Error(`nsml ${args.join(" ")} (as ${user}) exited ${r.code}:\n${r.all}`);
    return r;
  }

  /** `nsml login` for a user of the demo competition (or with the given password). */
  async login(user, password = PASSWORDS[user]) {
    await this.ok(user, ["login", "-u", user, "--password-stdin"], { stdin: `${password}\n` });
  }

  /** `nsml run` in `dir`; resolves to the session's name. */
  async run(user, dir, args) {
    const r = await this.ok(user, ["run", ...args], { cwd: dir });
    const m = r.stdout.match(/Session (\S+) is started/);
    if (!m) throw new Error(`nsml run printed no session name:\n${r.all}`);
    return m[1];
  }

  /** The user's sessions as `nsml ps -a -j` lists them. */
  async sessions(user) {
    const r = await this.ok(user, ["ps", "-a", "-j"]);
    return JSON.parse(r.stdout);
  }

  /** Waits (up to `timeout`) until the session has ended; resolves to its `ps -j` entry. */
  async waitEnded(user, name, timeout = 120_000) {
    return waitUntil(
      async () => {
        const s = (await this.sessions(user)).find((x) => x.name === name);
        return s && ["exited", "failed", "stopped"].includes(s.status) ? s : false;
      },
      { timeout, interval: 300, what: `${name} to end` },
    );
  }

  /** Stops the server: SIGTERM to its process group, SIGKILL after 20 s. Keeps the data with NSML_E2E_KEEP=1. */
  async stop() {
    const child = this.child;
    if (child.exitCode === null && child.signalCode === null) {
      const exited = new Promise((r) => child.once("exit", r));
      try {
        process.kill(-child.pid, "SIGTERM");
      } catch {
        // gone
      }
      const t = setTimeout(() => {
        try {
          process.kill(-child.pid, "SIGKILL");
        } catch {
          // gone
        }
      }, 20_000);
      await exited;
      clearTimeout(t);
    }
    // Anything the server left in its group.
    try {
      process.kill(-child.pid, "SIGKILL");
    } catch {
      // none left
    }
    running.delete(child.pid);
    if (this.label) {
      // The server's output is all in once the log stream has finished (its stderr pipe ends it).
      await new Promise((r) => {
        if (this.log.writableFinished) return r();
        const t = setTimeout(r, 5_000);
        this.log.once("finish", () => {
          clearTimeout(t);
          r();
        });
      });
      mkdirSync(OUT_DIR, { recursive: true });
      copyFileSync(this.logPath, path.join(OUT_DIR, `nsmld-${this.label}.log`));
    }
    if (!process.env.NSML_E2E_KEEP) rmSync(this.tmp, { recursive: true, force: true });
  }
}
