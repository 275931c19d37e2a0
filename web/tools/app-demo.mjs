// A local weir deployment a person can open: a throw-away Synapse, the focus serving the web
// app, and two simulated people (bob and carol, headless pages of the app with canvas cameras)
// already in the call of an encrypted room that invites you. Prints the URL and your login,
// and stays up until Ctrl-C. Everything listens on 127.0.0.1.
//
//   node web/tools/app-demo.mjs      (scripts/demo.sh runs setup and the build first)
//
// Environment: WEIR_FOCUS_BIN (default target/debug/weir-focus), WEIR_DEMO_HTTP_PORT (the
// focus's HTTP port, default 8090), WEIR_KEEP_TMP=1 (keep the work dir and its logs).

import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";
import { Synapse, Focus, CHROMIUM, CHROMIUM_ARGS, DIST, log, waitFor } from "../test/harness.mjs";
import { PEOPLE, openApp, signIn } from "../test/app-harness.mjs";

const dir = mkdtempSync(join(tmpdir(), "weir-demo-"));
const state = { syn: null, focus: null, browser: null };
let stopping = false;

async function teardown() {
  log("closing the browser");
  await state.browser?.close().catch(() => undefined);
  log("stopping the focus");
  await state.focus?.stop().catch(() => undefined);
  log("stopping Synapse");
  state.syn?.stop();
  if (!process.env.WEIR_KEEP_TMP) rmSync(dir, { recursive: true, force: true });
}

async function stop(sig) {
  if (stopping) return;
  stopping = true;
  log(`${sig}: stopping the demo`);
  await teardown();
  process.exit(0);
}
process.once("SIGINT", () => void stop("SIGINT"));
process.once("SIGTERM", () => void stop("SIGTERM"));

try {
  log(`work dir ${dir}; starting Synapse`);
  state.syn = await Synapse.start(join(dir, "synapse"));
  const focusUser = await state.syn.register("focus", "focus-demo-password");
  const you = await state.syn.register("alice", "alice");
  const sims = [];
  for (const person of PEOPLE.slice(1)) sims.push({ ...person, user: await state.syn.register(person.name, person.name) });

  state.focus = await Focus.start({
    syn: state.syn,
    user: focusUser,
    dir,
    httpPort: Number(process.env.WEIR_DEMO_HTTP_PORT ?? 8090),
    extra: ["[web]", `root = ${JSON.stringify(join(DIST, "app"))}`],
  });
  await state.focus.waitHealthy();
  const url = `${state.focus.baseUrl}/`;

  // bob makes an encrypted room for the call and invites you, carol and the focus
  const enc = encodeURIComponent;
  const [bob, carol] = sims;
  const room = await state.syn.api(bob.user.accessToken, "POST", "/_matrix/client/v3/createRoom", {
    name: "weir demo",
    preset: "private_chat",
    invite: [you.userId, carol.user.userId, focusUser.userId],
    power_level_content_override: { events: { "org.matrix.msc3401.call": 0, "org.matrix.msc3401.call.member": 0 } },
    initial_state: [{ type: "m.room.encryption", state_key: "", content: { algorithm: "m.megolm.v1.aes-sha2" } }],
  });
  await state.syn.api(carol.user.accessToken, "POST", `/_matrix/client/v3/join/${enc(room.room_id)}`, {});

  log("bob and carol open the app and join the call");
  // our own SIGINT handler tears down (Playwright's would exit first and leave Synapse running)
  state.browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS, handleSIGINT: false, handleSIGTERM: false, handleSIGHUP: false });
  for (const p of sims) {
    const page = await openApp(state.browser, url, p, { viewport: { width: 640, height: 400 } });
    Object.assign(p, page);
    await signIn(p, state.syn.baseUrl);
    await p.page.getByRole("button", { name: "Join the call in weir demo" }).click({ timeout: 30000 });
    await p.page.locator('.connection[data-state="connected"]').waitFor({ timeout: 60000 });
  }
  await waitFor("bob and carol to see each other", async () => {
    for (const p of sims) if ((await p.page.locator("figure.tile video").count()) < 2) return false;
    return true;
  }, { timeoutMs: 60000 });

  console.log(`
  weir is running. Open ${url} in a browser on this machine and sign in:

      homeserver  ${state.syn.baseUrl} (filled in)
      username    alice
      password    alice

  Accept the invitation to "weir demo" and join its call: bob (green) and carol (blue) are in
  it already, with canvas cameras and a tone each. The call is end-to-end encrypted.

  Logs: ${dir} (kept with WEIR_KEEP_TMP=1). Ctrl-C stops everything.
`);
  // stay up until Ctrl-C: nothing else to do
  await new Promise(() => {});
} catch (e) {
  console.error(`demo failed: ${e.stack ?? e}`);
  if (state.focus) console.error(state.focus.tailText(40));
  await teardown();
  process.exit(1);
}
