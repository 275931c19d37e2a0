// Bundle the browser client (dist/weir-call.js, ESM, matrix-js-sdk included), the in-page test
// probe (dist/probe.js) with esbuild. Run by scripts/setup.sh; `npm run build` does the same.
import { build } from "esbuild";
import { mkdirSync } from "node:fs";
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
console.log(`built weir-call.js and probe.js in ${out}`);
