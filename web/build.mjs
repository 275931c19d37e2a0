// Bundle the browser client (dist/weir-call.js, ESM, matrix-js-sdk included), the in-page test
// probe (dist/probe.js) and the frame-encryption worker (dist/e2ee-worker.js) with esbuild.
// Run by scripts/setup.sh; `npm run build` does the same.
import { build } from "esbuild";
import { copyFileSync, mkdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const out = join(here, "dist");
mkdirSync(out, { recursive: true });

const common = {
  bundle: true,
  format: "esm",
  platform: "browser",
  target: ["chrome120"],
  sourcemap: "linked",
  logLevel: "warning",
  legalComments: "none",
  define: { "process.env.NODE_ENV": '"production"', global: "globalThis" },
};

await build({ ...common, entryPoints: [join(here, "src/weir-call.js")], outfile: join(out, "weir-call.js") });
await build({ ...common, entryPoints: [join(here, "src/probe.js")], outfile: join(out, "probe.js") });
// The frame-encryption worker (frame-crypto.js bundled in): a module worker, `new Worker(url, {type: "module"})`.
await build({ ...common, entryPoints: [join(here, "src/e2ee/transform-worker.js")], outfile: join(out, "e2ee-worker.js") });

// The web app (dist/app/, what the focus serves with `[web] root`): its bundle, page and
// stylesheet, the embedding example, the worker, and the crypto WebAssembly, which the bundled
// @matrix-org/matrix-sdk-crypto-wasm fetches from ./pkg/ next to the bundle (import.meta.url).
const app = join(out, "app");
mkdirSync(join(app, "pkg"), { recursive: true });
await build({
  ...common,
  entryPoints: { app: join(here, "app/main.ts"), embed: join(here, "app/embed.ts") },
  outdir: app,
  minify: true,
});
await build({ ...common, minify: true, entryPoints: [join(here, "src/e2ee/transform-worker.js")], outfile: join(app, "e2ee-worker.js") });
for (const f of ["index.html", "app.css", "embed.html"]) copyFileSync(join(here, "app", f), join(app, f));
const wasmDir = join(here, "node_modules/@matrix-org/matrix-sdk-crypto-wasm");
copyFileSync(join(wasmDir, "pkg/matrix_sdk_crypto_wasm_bg.wasm"), join(app, "pkg/matrix_sdk_crypto_wasm_bg.wasm"));
console.log(`built weir-call.js, probe.js and e2ee-worker.js in ${out}, and the web app in ${app}`);
