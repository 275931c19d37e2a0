// Interop harness: a real Synapse, the weir focus binary, and stock matrix-js-sdk 43 clients in
// Debian's Chromium. Used by web/test/*.test.mjs and web/tools/demo.mjs.
//
// Everything listens on 127.0.0.1 only. Every wait is a poll with a deadline; nothing sleeps to
// synchronise. teardown() always closes the browser, SIGTERMs the focus and stops Synapse.

import { spawn, spawnSync } from "node:child_process";
import { createHmac, randomBytes } from "node:crypto";
import { createServer } from "node:http";
import { createServer as createNetServer } from "node:net";
import { mkdtempSync, mkdirSync, readFileSync, writeFileSync, existsSync, createWriteStream, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve, extname } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
export const REPO = resolve(here, "../..");
export const WEB = resolve(here, "..");
export const DIST = join(WEB, "dist");

export const CHROMIUM = process.env.WEIR_CHROMIUM ?? "/usr/bin/chromium";
export const CHROMIUM_ARGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--use-fake-ui-for-media-stream",
  "--use-fake-device-for-media-stream",
  "--autoplay-policy=no-user-gesture-required",
  // Chromium leaves loopback out of WebRTC's network list by default, so on a machine whose only
  // other interface is not loopback it would offer no 127.0.0.1 candidate at all. With this switch
  // it gathers 127.0.0.1 (and ::1) first, at a higher priority than the other interfaces, so the
  // pair with the focus's 127.0.0.1 candidate is the one chosen (the test checks the selected pair).
  "--allow-loopback-in-peer-connection",
  // three pages share one browser; none of them may be throttled as a background tab
  "--disable-background-timer-throttling",
  "--disable-renderer-backgrounding",
  "--disable-backgrounding-occluded-windows",
];

export const FOCUS_DEVICE_ID = "WEIRFOCUS";
export const FOCUS_SESSION_ID = "sfu";

export function log(...a) {
  const ts = new Date().toISOString().slice(11, 23);
  console.log(`[${ts}]`, ...a);
}

export async function sleep(ms) {
  await new Promise((r) => setTimeout(r, ms));
}

/** Thrown from a waitFor predicate to stop waiting at once (the awaited thing can no longer happen). */
export class Fatal extends Error {}

/**
 * Poll fn until it returns a truthy value; throw with `what` and the last value/error on timeout.
 * An error thrown by fn is retried, except a Fatal, which ends the wait at once.
 */
export async function waitFor(what, fn, { timeoutMs = 30000, intervalMs = 200 } = {}) {
  const deadline = Date.now() + timeoutMs;
  let last;
  let lastErr;
  for (;;) {
    try {
      last = await fn();
      lastErr = undefined;
      if (last) return last;
    } catch (e) {
      if (e instanceof Fatal) throw new Error(`gave up waiting for ${what}: ${e.message}`);
      lastErr = e;
    }
    if (Date.now() >= deadline) {
      const detail = lastErr ? `last error: ${lastErr.stack ?? lastErr}` : `last value: ${JSON.stringify(last)}`;
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}; ${detail}`);
    }
    await sleep(intervalMs);
  }
}

/**
 * Test steps that build on each other (one call, then hangup, rejoin...): after a failure the
 * rest are skipped instead of each waiting out its own timeout. `fail()` marks a failure
 * outside a step (the set-up).
 */
export function stepChain() {
  const chain = {
    failed: false,
    fail() {
      chain.failed = true;
    },
    async step(t, fn) {
      if (chain.failed) {
        t.skip("an earlier step failed");
        return;
      }
      try {
        await fn();
      } catch (e) {
        chain.failed = true;
        throw e;
      }
    },
  };
  return chain;
}

export async function freePort() {
  return new Promise((resolvePort, reject) => {
    const srv = createNetServer();
    srv.unref();
    srv.on("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolvePort(port));
    });
  });
}

/** A short random hex string for account names and passwords. */
export function suffix() {
  return randomBytes(5).toString("hex");
}

/** Run a command to completion (killed after timeoutMs); resolves {status, signal, stdout, stderr}. */
export function runBounded(cmd, args, { env = process.env, timeoutMs = 120000 } = {}) {
  return new Promise((resolveRun) => {
    const child = spawn(cmd, args, { env, stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (b) => (stdout += b));
    child.stderr.on("data", (b) => (stderr += b));
    const timer = setTimeout(() => {
      stderr += `\n(killed after ${timeoutMs} ms)`;
      child.kill("SIGKILL");
    }, timeoutMs);
    child.on("error", (e) => {
      clearTimeout(timer);
      resolveRun({ status: null, signal: null, stdout, stderr: `${stderr}\n${e.stack ?? e}` });
    });
    child.on("close", (status, signal) => {
      clearTimeout(timer);
      resolveRun({ status, signal, stdout, stderr });
    });
  });
}

// ------------------------------------------------------------------------------------------------
// Synapse

export class Synapse {
  constructor(dir, port, fedPort = null) {
    this.dir = dir;
    this.port = port;
    /** The federation (TLS) port of a federating server, else null. */
    this.fedPort = fedPort;
    /** The Matrix server name: user ids are `@name:${serverName}`. */
    this.serverName = fedPort ? `localhost:${fedPort}` : "localhost";
    this.baseUrl = `http://127.0.0.1:${port}`;
    this.started = false;
  }

  /**
   * A server with no federation at all (server name `localhost`). `appservices`: registration
   * files it loads (the focus as an application service).
   */
  static async start(dir, { appservices = [] } = {}) {
    return Synapse.launch(dir, null, undefined, appservices);
  }

  /**
   * A server that federates over loopback with the other federating ones (`scripts/synapse.sh
   * start-fed`): server name `localhost:FED_PORT`, so users look like `@alice:localhost:18448`.
   * Two can start at once (this does not block the event loop).
   */
  static async startFederating(dir) {
    const port = await freePort();
    let fedPort = await freePort();
    while (fedPort === port) fedPort = await freePort();
    return Synapse.launch(dir, fedPort, port);
  }

  static async launch(dir, fedPort, clientPort, appservices = []) {
    const port = clientPort ?? (await freePort());
    const s = new Synapse(dir, port, fedPort);
    const t0 = Date.now();
    const args = fedPort
      ? [join(REPO, "scripts/synapse.sh"), "start-fed", dir, String(port), String(fedPort)]
      : [join(REPO, "scripts/synapse.sh"), "start", dir, String(port)];
    // A first start creates the sqlite schema: slow on a busy machine, so give the federating
    // servers (started two at a time) the same margin scripts/federation-check.sh does.
    let env = fedPort ? { ...process.env, SYNAPSE_START_TIMEOUT: process.env.SYNAPSE_START_TIMEOUT ?? "180" } : process.env;
    if (appservices.length) env = { ...env, WEIR_SYNAPSE_APPSERVICES: appservices.join(",") };
    const timeoutMs = fedPort ? 240000 : 120000;
    const r = await runBounded("bash", args, { env, timeoutMs });
    if (r.status !== 0) {
      throw new Error(`scripts/synapse.sh ${args[1]} failed (${r.status ?? r.signal}):\n${r.stdout}\n${r.stderr}`);
    }
    s.started = true;
    s.startMs = Date.now() - t0;
    s.sharedSecret = readFileSync(join(dir, "shared_secret"), "utf8").trim();
    return s;
  }

  stop() {
    if (!this.started) return;
    this.started = false;
    const r = spawnSync("bash", [join(REPO, "scripts/synapse.sh"), "stop", this.dir], { encoding: "utf8", timeout: 60000 });
    if (r.status !== 0) log(`synapse stop failed: ${r.stdout}${r.stderr}`);
  }

  async api(token, method, path, body) {
    const res = await fetch(`${this.baseUrl}${path}`, {
      method,
      headers: { "Content-Type": "application/json", ...(token ? { Authorization: `Bearer ${token}` } : {}) },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await res.text();
    let json;
    try {
      json = text ? JSON.parse(text) : {};
    } catch {
      json = { raw: text };
    }
    if (!res.ok) {
      const err = new Error(`${method} ${path} -> HTTP ${res.status}: ${text.slice(0, 500)}`);
      err.status = res.status;
      err.body = json;
      throw err;
    }
    return json;
  }

  /** Register through the shared-secret admin API (nonce + HMAC-SHA1). Returns {userId, accessToken, deviceId}. */
  async register(localpart, password, { admin = false } = {}) {
    const { nonce } = await this.api(null, "GET", "/_synapse/admin/v1/register");
    const mac = createHmac("sha1", this.sharedSecret)
      .update(`${nonce}\0${localpart}\0${password}\0${admin ? "admin" : "notadmin"}`)
      .digest("hex");
    const r = await this.api(null, "POST", "/_synapse/admin/v1/register", {
      nonce,
      username: localpart,
      password,
      admin,
      mac,
    });
    return { userId: r.user_id, accessToken: r.access_token, deviceId: r.device_id, localpart, password };
  }

  homeserverLogTail(lines = 40) {
    try {
      const all = readFileSync(join(this.dir, "homeserver.log"), "utf8").split("\n");
      return all.slice(-lines).join("\n");
    } catch {
      return "(no homeserver.log)";
    }
  }
}

export const CALL_STATE_TYPE = "org.matrix.msc3401.call";
export const CALL_MEMBER_TYPE = "org.matrix.msc3401.call.member";

export function genConfId() {
  // js-sdk's genCallID(): Date.now() followed by 16 random alphanumerics
  const chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
  let s = String(Date.now());
  const b = randomBytes(16);
  for (const x of b) s += chars[x % chars.length];
  return s;
}

/** alice creates a room members may put call state in, sends the call state, invites the focus. */
export async function createCallRoom(syn, creator, { focusUserId, invite = [] } = {}) {
  const room = await syn.api(creator.accessToken, "POST", "/_matrix/client/v3/createRoom", {
    preset: "public_chat",
    name: "weir interop",
    // as in the wire fixture: members may send the call state types at level 0
    power_level_content_override: {
      events: { [CALL_STATE_TYPE]: 0, [CALL_MEMBER_TYPE]: 0 },
      events_default: 0,
      state_default: 50,
      invite: 0,
      users_default: 0,
    },
    invite,
  });
  const roomId = room.room_id;
  const confId = genConfId();
  const enc = encodeURIComponent;
  await syn.api(
    creator.accessToken,
    "PUT",
    `/_matrix/client/v3/rooms/${enc(roomId)}/state/${enc(CALL_STATE_TYPE)}/${enc(confId)}`,
    { "m.intent": "m.room", "m.type": "m.video", "io.element.ptt": false },
  );
  if (focusUserId) {
    await syn.api(creator.accessToken, "POST", `/_matrix/client/v3/rooms/${enc(roomId)}/invite`, {
      user_id: focusUserId,
    });
  }
  return { roomId, confId };
}

/** Join roomId; `via`: server names to join through (needed to join a remote room over federation). */
export async function joinRoom(syn, user, roomId, { via = [] } = {}) {
  const q = via.length ? `?${via.map((v) => `server_name=${encodeURIComponent(v)}`).join("&")}` : "";
  await syn.api(user.accessToken, "POST", `/_matrix/client/v3/join/${encodeURIComponent(roomId)}${q}`, {});
}

export async function joinedMembers(syn, token, roomId) {
  const r = await syn.api(token, "GET", `/_matrix/client/v3/rooms/${encodeURIComponent(roomId)}/joined_members`);
  return Object.keys(r.joined ?? {});
}

// ------------------------------------------------------------------------------------------------
// Focus process

/** Read CPU seconds (utime+stime) and memory of a process from /proc. */
export function procStats(pid) {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    // fields after the ")" of comm: state is field 3; utime 14, stime 15 (1-based)
    const rest = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    const utime = Number(rest[11]);
    const stime = Number(rest[12]);
    const numThreads = Number(rest[17]);
    const status = readFileSync(`/proc/${pid}/status`, "utf8");
    const kb = (k) => {
      const m = status.match(new RegExp(`^${k}:\\s+(\\d+) kB`, "m"));
      return m ? Number(m[1]) : null;
    };
    return {
      t: Date.now(),
      cpuSeconds: (utime + stime) / CLK_TCK,
      userSeconds: utime / CLK_TCK,
      sysSeconds: stime / CLK_TCK,
      rssKiB: kb("VmRSS"),
      hwmKiB: kb("VmHWM"),
      threads: numThreads,
    };
  } catch {
    return null;
  }
}
const CLK_TCK = (() => {
  const r = spawnSync("getconf", ["CLK_TCK"], { encoding: "utf8" });
  const n = Number(r.stdout?.trim());
  return n > 0 ? n : 100;
})();

export class Focus {
  constructor({ bin, configPath, dir, httpPort, user, deviceId = FOCUS_DEVICE_ID, sessionId = FOCUS_SESSION_ID, name = "focus" }) {
    this.bin = bin;
    this.configPath = configPath;
    this.dir = dir;
    this.httpPort = httpPort;
    this.user = user;
    this.deviceId = deviceId;
    this.sessionId = sessionId;
    this.name = name;
    this.proc = null;
    this.tail = [];
    this.exit = null;
  }

  static binPath() {
    const p = process.env.WEIR_FOCUS_BIN ?? "target/debug/weir-focus";
    return resolve(REPO, p);
  }

  /**
   * Write a config for `user` (registered on `syn`, with its password) and start the focus.
   * `deviceId`/`sessionId`: the focus device participants call (default WEIRFOCUS / sfu).
   * `name`: the stem of its files in `dir` (NAME.toml, NAME.log, NAME-state/); give each focus
   * sharing a dir its own. `media`: more lines for its [media] section. `appservice`
   * ({asToken, hsToken}): the focus runs as an application service (no password; Synapse must
   * load the registration `Focus.registration` makes), on `httpPort`.
   */
  static async start({ syn, user, dir, deviceId = FOCUS_DEVICE_ID, sessionId = FOCUS_SESSION_ID, name = "focus", media = [], appservice = null, httpPort = null, extra = [] }) {
    const bin = Focus.binPath();
    const { configPath, port } = await Focus.writeConfig({ homeserverUrl: syn.baseUrl, user, dir, deviceId, sessionId, name, media, appservice, httpPort, extra });
    const f = new Focus({ bin, configPath, dir, httpPort: port, user, deviceId, sessionId, name });
    f.spawn();
    return f;
  }

  /**
   * The application-service registration of a focus configured as `start` would (printed by
   * `weir-focus --appservice-registration`), written to DIR/NAME-appservice.yaml: its path.
   */
  static async registration({ homeserverUrl, user, dir, name = "focus", appservice, httpPort }) {
    const { configPath } = await Focus.writeConfig({ homeserverUrl, user, dir, name, appservice, httpPort });
    const r = spawnSync(Focus.binPath(), ["--config", configPath, "--appservice-registration"], { encoding: "utf8", timeout: 10000 });
    if (r.status !== 0) throw new Error(`weir-focus --appservice-registration failed: ${r.stderr}`);
    const path = join(dir, `${name}-appservice.yaml`);
    writeFileSync(path, r.stdout);
    return path;
  }

  static async writeConfig({ homeserverUrl, user, dir, deviceId = FOCUS_DEVICE_ID, sessionId = FOCUS_SESSION_ID, name = "focus", media = [], appservice = null, httpPort = null, extra = [] }) {
    const bin = Focus.binPath();
    if (!existsSync(bin)) throw new Error(`focus binary not found at ${bin} (build it with cargo build -p weir-focus, or set WEIR_FOCUS_BIN)`);
    const stateDir = join(dir, `${name}-state`);
    mkdirSync(stateDir, { recursive: true });
    const port = httpPort ?? (await freePort());
    const configPath = join(dir, `${name}.toml`);
    const q = (s) => JSON.stringify(s); // TOML basic strings accept JSON string escapes for our values
    const credentials = appservice
      ? [`appservice_as_token = ${q(appservice.asToken)}`, `appservice_hs_token = ${q(appservice.hsToken)}`]
      : [`password = ${q(user.password)}`];
    writeFileSync(
      configPath,
      [
        "[matrix]",
        `homeserver_url = ${q(homeserverUrl)}`,
        `user_id = ${q(user.userId)}`,
        ...credentials,
        `device_id = ${q(deviceId)}`,
        `session_id = ${q(sessionId)}`,
        `state_dir = ${q(stateDir)}`,
        "",
        "[media]",
        'bind_ip = "127.0.0.1"',
        'advertise_ips = ["127.0.0.1"]',
        ...media,
        "",
        "[http]",
        `listen = ${q(`127.0.0.1:${port}`)}`,
        "",
        ...extra,
        "",
      ].join("\n"),
    );
    return { configPath, port };
  }

  /** What a participant calls: {userId, deviceId, sessionId}. */
  get info() {
    return { userId: this.user.userId, deviceId: this.deviceId, sessionId: this.sessionId };
  }

  spawn() {
    this.logPath = join(this.dir, `${this.name}.log`);
    const logFile = createWriteStream(this.logPath, { flags: "a" });
    this.exit = null;
    this.proc = spawn(this.bin, ["--config", this.configPath], {
      cwd: this.dir,
      env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? "info", RUST_BACKTRACE: "1", NO_COLOR: "1" },
      stdio: ["ignore", "pipe", "pipe"],
    });
    this.pid = this.proc.pid;
    const onData = (which) => (buf) => {
      logFile.write(buf);
      for (const line of buf.toString("utf8").split("\n")) {
        if (!line) continue;
        this.tail.push(`${which}: ${line}`);
        if (this.tail.length > 400) this.tail.shift();
      }
    };
    this.proc.stdout.on("data", onData("out"));
    this.proc.stderr.on("data", onData("err"));
    this.exited = new Promise((r) => {
      this.proc.on("exit", (code, signal) => {
        this.exit = { code, signal };
        logFile.end();
        r(this.exit);
      });
    });
  }

  get baseUrl() {
    return `http://127.0.0.1:${this.httpPort}`;
  }

  async waitHealthy(timeoutMs = 60000) {
    await waitFor(
      "focus /healthz to return 200",
      async () => {
        if (this.exit) throw new Error(`focus exited early: ${JSON.stringify(this.exit)}\n${this.tailText(40)}`);
        const r = await fetch(`${this.baseUrl}/healthz`).catch(() => null);
        return r?.status === 200;
      },
      { timeoutMs, intervalMs: 100 },
    );
  }

  async metrics() {
    const r = await fetch(`${this.baseUrl}/metrics`);
    if (!r.ok) throw new Error(`/metrics -> ${r.status}`);
    return r.text();
  }

  /** Parse a few gauges/counters out of the Prometheus text (sum over labels). */
  async metricValues(names) {
    const text = await this.metrics().catch(() => "");
    const out = {};
    for (const n of names) {
      let sum = null;
      for (const line of text.split("\n")) {
        if (line.startsWith("#")) continue;
        const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)/);
        if (m && m[1] === n) sum = (sum ?? 0) + Number(m[3]);
      }
      out[n] = sum;
    }
    return out;
  }

  stats() {
    return this.pid && !this.exit ? procStats(this.pid) : null;
  }

  tailText(n = 80) {
    return this.tail.slice(-n).join("\n");
  }

  async stop(timeoutMs = 10000) {
    if (!this.proc || this.exit) return this.exit;
    this.proc.kill("SIGTERM");
    const t = setTimeout(() => {
      if (!this.exit) {
        log(`focus ignored SIGTERM for ${timeoutMs} ms; SIGKILL`);
        this.proc.kill("SIGKILL");
      }
    }, timeoutMs);
    const e = await this.exited;
    clearTimeout(t);
    return e;
  }
}


// ------------------------------------------------------------------------------------------------
// Static server for the browser bundle

const MIME = { ".js": "text/javascript", ".map": "application/json", ".html": "text/html; charset=utf-8" };

export const PAGE_HTML = `<!doctype html>
<html><head><meta charset="utf-8"><title>weir probe</title></head>
<body style="margin:0;background:#222">
<script type="module">
  import * as Weir from "/weir-call.js";
  import * as Probe from "/probe.js";
  window.Weir = Weir;
  window.Probe = Probe;
  window.weirReady = true;
</script>
</body></html>`;

export async function startStaticServer(root = DIST) {
  for (const f of ["weir-call.js", "probe.js"]) {
    if (!existsSync(join(root, f))) throw new Error(`${join(root, f)} missing: run scripts/setup.sh (or: cd web && npm run build)`);
  }
  const server = createServer((req, res) => {
    const url = new URL(req.url, "http://127.0.0.1");
    if (url.pathname === "/" || url.pathname === "/index.html") {
      res.writeHead(200, { "Content-Type": MIME[".html"], "Cache-Control": "no-store" });
      res.end(PAGE_HTML);
      return;
    }
    if (url.pathname === "/favicon.ico") {
      res.writeHead(204).end();
      return;
    }
    const name = url.pathname.replace(/^\/+/, "");
    if (!/^[A-Za-z0-9._-]+$/.test(name)) {
      res.writeHead(404).end();
      return;
    }
    const p = join(root, name);
    if (!existsSync(p)) {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, { "Content-Type": MIME[extname(p)] ?? "application/octet-stream", "Cache-Control": "no-store" });
    res.end(readFileSync(p));
  });
  const port = await new Promise((r, j) => {
    server.on("error", j);
    server.listen(0, "127.0.0.1", () => r(server.address().port));
  });
  return { server, port, url: `http://127.0.0.1:${port}/`, close: () => new Promise((r) => server.close(() => r())) };
}

// ------------------------------------------------------------------------------------------------
// Browser participants

export const PEOPLE = [
  { name: "alice", colour: "red" },
  { name: "bob", colour: "green" },
  { name: "carol", colour: "blue" },
];

export class Participant {
  constructor({ name, colour, user, page, context }) {
    this.name = name;
    this.colour = colour;
    this.user = user;
    this.page = page;
    this.context = context;
    this.console = [];
  }

  get userId() {
    return this.user.userId;
  }

  async eval(fn, arg) {
    return this.page.evaluate(fn, arg);
  }

  async snapshot() {
    return this.page.evaluate(() => window.Probe.snapshot());
  }

  consoleTail(n = 60) {
    return this.console.slice(-n).join("\n");
  }
}

/**
 * A new incognito context and page on the static server, logged in to `baseUrl` as `user` with
 * device `${NAME}DEV`, syncing, with its canvas camera and oscillator microphone (Probe.setup).
 */
export async function openParticipant({ browser, webUrl, baseUrl, name, colour, tone, user, camera }) {
  const context = await browser.newContext({ viewport: { width: 700, height: 300 } });
  const page = await context.newPage();
  const part = new Participant({ name, colour, user, page, context });
  page.on("console", (m) => {
    part.console.push(`${m.type()}: ${m.text()}`);
    if (part.console.length > 3000) part.console.shift();
  });
  page.on("pageerror", (e) => part.console.push(`pageerror: ${e.stack ?? e}`));
  await page.goto(webUrl);
  await page.waitForFunction(() => window.weirReady === true, null, { timeout: 30000 });
  part.session = await page.evaluate((a) => window.Probe.setup(a), {
    name,
    colour,
    baseUrl,
    user: user.localpart,
    password: user.password,
    deviceId: `${name.toUpperCase()}DEV`,
    toneHz: tone,
    camera,
  });
  part.tone = tone ?? 440;
  return part;
}

// ------------------------------------------------------------------------------------------------
// The whole set-up

export class Harness {
  /**
   * @param {object} [o]
   * @param {Array<{name: string, colour: string, camera?: object}>} [o.people] (`camera`: see
   *   probe.js setup)
   * @param {boolean} [o.withFocus] start a focus (else the caller plays the focus's Matrix side)
   * @param {string[]} [o.chromiumArgs] switches added to CHROMIUM_ARGS
   * @param {string[]} [o.focusMedia] lines added to the focus's [media] section
   * @param {boolean} [o.appservice] run the focus as an application service (the homeserver
   *   pushes its events; default: WEIR_FOCUS_APPSERVICE=1)
   */
  constructor({
    people = PEOPLE,
    withFocus = true,
    keepDir = !!process.env.WEIR_KEEP_TMP,
    chromiumArgs = [],
    focusMedia = [],
    appservice = process.env.WEIR_FOCUS_APPSERVICE === "1",
  } = {}) {
    this.appservice = appservice && withFocus;
    this.people = people;
    this.chromiumArgs = chromiumArgs;
    this.focusMedia = focusMedia;
    this.withFocus = withFocus;
    this.keepDir = keepDir;
    this.participants = [];
    this.timings = {};
    this.cleanups = [];
  }

  /** Synapse, users, room, focus (if withFocus), static server, browser and logged-in pages. */
  async start() {
    const t0 = Date.now();
    this.dir = mkdtempSync(join(tmpdir(), "weir-interop-"));
    log(`work dir ${this.dir}`);

    const sfx = suffix();
    if (this.appservice) {
      // The focus as an application service: its registration (made by the focus binary)
      // is loaded by Synapse at start, so both ports are chosen first.
      const synPort = await freePort();
      this.focusHttpPort = await freePort();
      this.asTokens = { asToken: `as${suffix()}${suffix()}`, hsToken: `hs${suffix()}${suffix()}` };
      this.focusUser = { userId: `@focus-${sfx}:localhost`, password: null };
      const reg = await Focus.registration({
        homeserverUrl: `http://127.0.0.1:${synPort}`,
        user: this.focusUser,
        dir: this.dir,
        appservice: this.asTokens,
        httpPort: this.focusHttpPort,
      });
      this.syn = await Synapse.launch(join(this.dir, "synapse"), null, synPort, [reg]);
      log(`focus runs as an application service (${reg})`);
    } else {
      this.syn = await Synapse.start(join(this.dir, "synapse"));
    }
    this.cleanups.push(() => this.syn.stop());
    this.timings.synapseStartMs = this.syn.startMs;
    log(`synapse up at ${this.syn.baseUrl} in ${this.syn.startMs} ms`);

    if (!this.appservice) this.focusUser = await this.syn.register(`focus-${sfx}`, `pw-${suffix()}`);
    this.users = {};
    for (const p of this.people) this.users[p.name] = await this.syn.register(`${p.name}-${sfx}`, `pw-${suffix()}`);
    const [creator, ...others] = this.people.map((p) => this.users[p.name]);
    this.creator = creator;

    const { roomId, confId } = await createCallRoom(this.syn, creator, {
      focusUserId: this.withFocus ? this.focusUser.userId : undefined,
    });
    this.roomId = roomId;
    this.confId = confId;
    for (const u of others) await joinRoom(this.syn, u, roomId);
    log(`room ${roomId}, conf ${confId}`);

    this.web = await startStaticServer();
    this.cleanups.push(() => this.web.close());

    const { chromium } = await import("playwright-core");
    // playwright's launch() always starts Chromium with a fresh temporary --user-data-dir of its
    // own (and refuses one passed in args); each context below is a separate incognito profile.
    this.browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: [...CHROMIUM_ARGS, ...this.chromiumArgs] });
    this.cleanups.push(() => this.browser.close());

    if (this.withFocus) {
      const tf = Date.now();
      this.focus = await Focus.start({
        syn: this.syn,
        user: this.focusUser,
        dir: this.dir,
        media: this.focusMedia,
        appservice: this.asTokens ?? null,
        httpPort: this.focusHttpPort ?? null,
      });
      log(`focus pid ${this.focus.pid}, http ${this.focus.baseUrl}, log ${this.focus.logPath}`);
      this.cleanups.push(() => this.focus.stop());
      await this.focus.waitHealthy();
      await waitFor(
        `focus ${this.focusUser.userId} to join ${roomId}`,
        async () => {
          if (this.focus.exit) throw new Error(`focus exited: ${JSON.stringify(this.focus.exit)}\n${this.focus.tailText(40)}`);
          return (await joinedMembers(this.syn, creator.accessToken, roomId)).includes(this.focusUser.userId);
        },
        { timeoutMs: 30000 },
      );
      this.timings.focusReadyMs = Date.now() - tf;
      log(`focus healthy and joined in ${this.timings.focusReadyMs} ms`);
    }

    for (const p of this.people) await this.addParticipant(p);
    this.timings.setupMs = Date.now() - t0;
    return this;
  }

  async addParticipant({ name, colour, camera }) {
    const part = await openParticipant({
      browser: this.browser,
      webUrl: this.web.url,
      baseUrl: this.syn.baseUrl,
      name,
      colour,
      user: this.users[name],
      camera,
    });
    this.participants.push(part);
    return part;
  }

  get focusInfo() {
    return { userId: this.focusUser.userId, deviceId: FOCUS_DEVICE_ID, sessionId: FOCUS_SESSION_ID };
  }

  /** Every focus process of the set-up (liveSnapshots and diagnostics watch them all). */
  get foci() {
    return this.focus ? [this.focus] : [];
  }

  /** Every Synapse of the set-up. */
  get synapses() {
    return this.syn ? [this.syn] : [];
  }

  async join(part, timeoutMs = 30000, { publishMember = true, options = {} } = {}) {
    const r = await part.page.evaluate((a) => window.Probe.joinCall(a), {
      roomId: this.roomId,
      confId: this.confId,
      focus: this.focusInfo,
      timeoutMs,
      publishMember,
      options,
    });
    log(`${part.name} placed call ${r.callId}`);
    return r;
  }

  byName(name) {
    return this.participants.find((p) => p.name === name);
  }

  async snapshots() {
    return Promise.all(this.participants.map((p) => p.snapshot()));
  }

  /**
   * Snapshots, failing fast (Fatal) if any participant expected in a call has had its call end
   * or the focus process has exited: nothing awaited can happen any more.
   */
  async liveSnapshots(expectInCall = this.participants.map((p) => p.name)) {
    for (const f of this.foci) {
      if (f.exit) throw new Fatal(`the focus ${f.name} (${f.user.userId}/${f.deviceId}) exited: ${JSON.stringify(f.exit)}`);
    }
    const snaps = await this.snapshots();
    for (const s of snaps) {
      if (!expectInCall.includes(s.name)) continue;
      const rec = s.calls[s.calls.length - 1];
      if (s.ended || s.callState === "ended") {
        throw new Fatal(`${s.name}'s call ${s.callId} ended (reason ${rec?.hangupReason ?? "?"}) after ${rec?.endedAt ? rec.endedAt - rec.startedAt : "?"} ms`);
      }
    }
    return snaps;
  }

  /** Printable evidence for a failure: focus log tail, each page's console tail, Synapse log tail. */
  async diagnostics({ consoleLines = 80, focusLines = 120 } = {}) {
    const out = [];
    for (const f of this.foci) {
      out.push(
        `----- ${f.name} ${f.user.userId}/${f.deviceId} (pid ${f.pid}, exit ${JSON.stringify(f.exit)}) last ${focusLines} lines; full log ${f.logPath}`,
      );
      out.push(f.tailText(focusLines));
    }
    for (const p of this.participants) {
      let snap = null;
      try {
        snap = await p.snapshot();
      } catch (e) {
        snap = `(snapshot failed: ${e.message})`;
      }
      out.push(`----- ${p.name} snapshot`);
      out.push(JSON.stringify(snap, null, 1));
      out.push(`----- ${p.name} browser console, last ${consoleLines} lines`);
      out.push(p.consoleTail(consoleLines));
    }
    for (const syn of this.synapses) {
      out.push(`----- synapse ${syn.serverName} (${syn.dir}) homeserver.log tail`);
      out.push(syn.homeserverLogTail(30));
    }
    return out.join("\n");
  }

  async teardown() {
    for (const p of this.participants) {
      try {
        await p.page.evaluate(() => window.Probe.shutdown());
      } catch {
        // page may be gone
      }
    }
    while (this.cleanups.length) {
      const c = this.cleanups.pop();
      try {
        await c();
      } catch (e) {
        log(`cleanup step failed: ${e.stack ?? e}`);
      }
    }
    if (this.dir && !this.keepDir) {
      try {
        rmSync(this.dir, { recursive: true, force: true });
      } catch {
        // best effort
      }
    } else if (this.dir) {
      log(`kept work dir ${this.dir}`);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// A cascade: several organisations, each a federating Synapse with its own focus (docs/cascading.md)

export function feedsOf(snap, userId) {
  return snap.feeds.filter((f) => f.owner === userId);
}

/** framesDecoded of userId's video in a snapshot, or null. */
export function framesOf(snap, userId) {
  const f = feedsOf(snap, userId).find((x) => x.video);
  return f ? f.video.framesDecoded : null;
}

export function fmtTable(rows, cols) {
  const widths = cols.map((c) => Math.max(c.length, ...rows.map((r) => String(r[c] ?? "").length)));
  const line = (vals) => vals.map((v, i) => String(v ?? "").padEnd(widths[i])).join("  ");
  return [line(cols), line(widths.map((w) => "-".repeat(w))), ...rows.map((r) => line(cols.map((c) => r[c])))].join("\n");
}
