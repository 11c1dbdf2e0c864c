import { defineConfig } from "vite";

// What the gateway sends with every file; `vite preview` sends it too, so a preview breaks where the gateway would.
const CSP =
  "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; " +
  "frame-ancestors 'none'; base-uri 'none'; form-action 'self'";
// The gateway that `npm run dev` and `vite preview` pass the API calls to.
const gateway = process.env.NSML_GATEWAY ?? "http://127.0.0.1:7100";

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
    // The gateway accepts a sign-in only from its own origin: the proxy presents the calls as coming from it.
    proxy: Object.fromEntries(
      ["/nsml.v1.", "/web/"].map((prefix) => [
        prefix,
        {
          target: gateway,
          changeOrigin: true,
          configure: (proxy: { on(event: "proxyReq", f: (req: { getHeader(n: string): unknown; setHeader(n: string, v: string): void }) => void): void }) =>
            proxy.on("proxyReq", (req) => {
              if (req.getHeader("origin")) req.setHeader("origin", gateway);
            }),
        },
      ]),
    ),
  },
  preview: {
    headers: { "Content-Security-Policy": CSP },
  },
});
