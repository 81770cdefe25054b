// The dashboard's build: `make ui` (npx vite build --config ui/vite.config.mjs) writes
// ui/dist, which Envoy serves under /ui/ (server/bridge/envoy_config.py).
import { fileURLToPath } from "node:url";
import { defineConfig } from "vite";

const root = fileURLToPath(new URL(".", import.meta.url));

export default defineConfig({
  root,
  base: "/ui/",
  logLevel: "warn",
  oxc: { jsx: { runtime: "automatic", importSource: "preact" } },
  build: {
    outDir: "dist",
    emptyOutDir: true,
    // A strict Content-Security-Policy (no inline scripts or styles): nothing inlined.
    assetsInlineLimit: 0,
    modulePreload: { polyfill: false },
    sourcemap: false,
    target: "es2022",
  },
});
