import { defineConfig } from "@playwright/test";

// Each test file starts its own `nsmld up` (lib/platform.mjs); the files run one at a time, since the machine
// may be small and busy. Waits are for conditions, with generous bounds; nothing asserts on elapsed time.
export default defineConfig({
  testDir: "./tests",
  outputDir: "./test-results",
  fullyParallel: false,
  workers: 1,
  retries: 0,
  timeout: 6 * 60_000,
  expect: { timeout: 60_000 },
  reporter: [["list"], ["json", { outputFile: "out/results.json" }]],
  use: {
    browserName: "chromium",
    headless: true,
    viewport: { width: 1280, height: 900 },
    actionTimeout: 60_000,
    navigationTimeout: 60_000,
    trace: "retain-on-failure",
    screenshot: "only-on-failure",
    launchOptions: {
      executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
      args: ["--no-sandbox", "--disable-dev-shm-usage"],
    },
  },
});
