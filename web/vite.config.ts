import { defineConfig } from "vite";

// The gateway serves the built files at `/` under a strict Content-Security-Policy (no inline scripts or
// styles), so the build emits only external module scripts and stylesheets.
export default defineConfig({
  base: "/",
  esbuild: { jsx: "automatic", jsxImportSource: "preact" },
  build: {
    target: "es2022",
    outDir: "dist",
    assetsInlineLimit: 0,
    modulePreload: { polyfill: false },
    cssCodeSplit: false,
    sourcemap: false,
    chunkSizeWarningLimit: 600,
  },
  server: {
    // `npm run dev` against a local `nsmld up`: gRPC-Web calls and the sign-in endpoints go to the gateway.
    proxy: {
      "/nsml.v1.": "http://127.0.0.1:7100",
      "/web/": "http://127.0.0.1:7100",
    },
  },
});
