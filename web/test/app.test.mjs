// The web app, as people use it: three people open the app the focus serves, sign in through its
// form, one creates an encrypted room and invites the others, they accept and join the call.
// Their cameras are canvases of their own colour, so each tile can be checked for the right
// person's picture. Then: everyone decodes everyone with end-to-end encryption (frames
// byte-identical from the sender's encrypt step to the receivers' decrypt step), mute and camera
// off show on the others' tiles, a shared screen comes and goes, the grid and speaker views are
// captured (docs/app-*.png) and checked, the controls are labelled and reachable by keyboard,
// the call survives a restart of the focus, someone leaves and comes back (keys rotate), and a
// page whose key exchange is blocked receives packets but decodes nothing and says why. No key
// ever appears in the focus's log, metrics, admin API or memory. And an unencrypted room gets
// an unencrypted call, which the page says.
//
//   scripts/in-netns.sh node --test web/test/app.test.mjs
//
// WEIR_APP_SCREENSHOTS=1 rewrites docs/app-grid.png and docs/app-speaker.png.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, writeFileSync, rmSync, openSync, readSync, closeSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";
import { Synapse, Focus, CHROMIUM, CHROMIUM_ARGS, DIST, REPO, log, waitFor, stepChain, suffix, freePort } from "./harness.mjs";
import { PEOPLE, SCREEN_RGB, openApp, signIn, clickControl, tiles, near, screenshotDistance } from "./app-harness.mjs";

const ADMIN_TOKEN = `admin-${suffix()}`;

const h = { dir: null, syn: null, focus: null, browser: null, pages: [], focusUser: null };
const chain = stepChain();

/**
 * The page looks like the screenshot committed in docs/ (same layout, tiles filled with the same
 * pictures; names and moving bars aside). WEIR_APP_SCREENSHOTS=1 rewrites the file first.
 */
async function matchesCommittedScreenshot(page, path) {
  const live = await page.screenshot();
  if (process.env.WEIR_APP_SCREENSHOTS === "1") writeFileSync(join(REPO, path), live);
  const d = await screenshotDistance(page, live, readFileSync(join(REPO, path)));
  log(`${path}: the page is ${d.toFixed(1)}/255 away from the committed screenshot`);
  // A tile missing or black, or the other layout, is 30 or more away; the same layout with new
  // names and bars is within 10.
  assert.ok(d < 15, `the page does not look like ${path} (distance ${d.toFixed(1)})`);
}

/**
 * Search every readable mapping of process `pid` for any of `needles` (Buffers). Needs the
 * right to read /proc/PID/mem (root, or ptrace rights over it). {bytes, regions, found}.
 */
function scanMemory(pid, needles) {
  const maps = readFileSync(`/proc/${pid}/maps`, "utf8").trim().split("\n");
  const fd = openSync(`/proc/${pid}/mem`, "r");
  let bytes = 0;
  let regions = 0;
  try {
    for (const line of maps) {
      const [range, perms, , , , path = ""] = line.split(/\s+/);
      if (!perms.startsWith("r") || path === "[vvar]" || path === "[vsyscall]" || path === "[vvar_vclock]") continue;
      const [start, end] = range.split("-").map((x) => BigInt(`0x${x}`));
      const size = Number(end - start);
      if (size > 512 * 1048576) continue;
      const buf = Buffer.alloc(size);
      let n;
      try {
        n = readSync(fd, buf, 0, size, start);
      } catch {
        continue; // a guard page or a mapping gone meanwhile
      }
      bytes += n;
      regions += 1;
      const region = buf.subarray(0, n);
      for (const k of needles) if (region.indexOf(k) !== -1) return { bytes, regions, found: `${k.toString("hex")} in ${line}` };
    }
  } finally {
    closeSync(fd);
  }
  return { bytes, regions, found: null };
}

const others = (p) => h.pages.filter((q) => q !== p);

/**
 * Every page of `pages` shows every other person of `among` in their colour, and the frames
 * keep coming.
 */
async function everyoneDecodesEveryone(what, pages = h.pages, among = h.pages) {
  const before = new Map();
  await waitFor(
    what,
    async () => {
      for (const p of pages) {
        const ts = await p.page.evaluate(tiles);
        for (const q of among.filter((x) => x !== p)) {
          const t = ts.find((x) => x.participant === q.id && x.purpose === "m.usermedia");
          if (!t || !near(t.rgb, q.rgb) || t.problem !== "") return false;
          const k = `${p.name}>${q.name}`;
          if (!before.has(k)) before.set(k, t.framesDecoded);
          if (t.framesDecoded < before.get(k) + 10) return false;
        }
      }
      return true;
    },
    { timeoutMs: 90000, intervalMs: 500 },
  );
}


async function tileOf(p, q, purpose = "m.usermedia") {
  return (await p.page.evaluate(tiles)).find((t) => t.participant === q.id && t.purpose === purpose) ?? null;
}

before(async () => {
  h.dir = mkdtempSync(join(tmpdir(), "weir-app-"));
  log(`work dir ${h.dir}`);
  try {
    h.syn = await Synapse.start(join(h.dir, "synapse"));
    const sfx = suffix();
    h.focusUser = await h.syn.register(`focus-${sfx}`, `pw-${suffix()}`);
    for (const person of PEOPLE) person.user = await h.syn.register(`${person.name}-${sfx}`, `pw-${suffix()}`);
    h.adminPort = await freePort();
    h.focus = await Focus.start({
      syn: h.syn,
      user: h.focusUser,
      dir: h.dir,
      extra: [
        "[web]",
        `root = ${JSON.stringify(join(DIST, "app"))}`,
        "",
        "[admin]",
        `listen = "127.0.0.1:${h.adminPort}"`,
        `token = ${JSON.stringify(ADMIN_TOKEN)}`,
      ],
    });
    await h.focus.waitHealthy();
    h.appUrl = `${h.focus.baseUrl}/`;
    h.browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS });
    for (const person of PEOPLE) h.pages.push(await openApp(h.browser, h.appUrl, person));
  } catch (e) {
    chain.fail();
    throw e;
  }
});

after(async () => {
  if (chain.failed) {
    for (const p of h.pages) {
      writeFileSync(join(h.dir, `${p.name}-console.log`), p.console.join("\n"));
      log(`--- ${p.name} console (last 30 weir lines; all in ${p.name}-console.log) ---\n${p.console.filter((l) => l.includes("[weir")).slice(-30).join("\n")}`);
      const ts = await p.page.evaluate(tiles).catch((e) => String(e));
      log(`--- ${p.name} tiles ---\n${JSON.stringify(ts, null, 1)}`);
      const known = await p.page
        .evaluate(() => {
          const c = window.weirApp.call?.conference;
          if (!c) return null;
          return c.encryptionStats().then((enc) => ({
            streams: c.streams,
            metadata: c.call?.call?.remoteSDPStreamMetadata ?? null,
            receivers: (c.call?.peerConnection?.getTransceivers() ?? []).map((t) => ({ mid: t.mid, dir: t.currentDirection, track: t.receiver.track?.id })),
            encryption: enc,
            subscription: c.sentSubscription,
            layers: c.call ? Object.fromEntries(c.call.layerRequests) : null,
            paused: [...c.paused],
            participants: c.participants().map((x) => ({ ...x, usermedia: x.usermedia?.id ?? null, screen: x.screen?.id ?? null })),
          }));
        })
        .catch((e) => String(e));
      writeFileSync(join(h.dir, `${p.name}-state.json`), JSON.stringify(known, null, 1));
      // what the page sends: each video encoding's stats and whether the sender has it active
      const sent = await p.page
        .evaluate(async () => {
          const pc = window.weirApp.call?.conference?.call?.peerConnection;
          if (!pc) return null;
          const stats = await pc.getStats();
          const out = [...stats.values()]
            .filter((s) => s.type === "outbound-rtp" && s.kind === "video")
            .map((s) => ({ mid: s.mid, rid: s.rid, ssrc: s.ssrc, active: s.active, packetsSent: s.packetsSent, framesEncoded: s.framesEncoded, frameWidth: s.frameWidth, limited: s.qualityLimitationReason }));
          const senders = pc.getTransceivers().map((t) => ({ mid: t.mid, direction: t.currentDirection, track: t.sender.track ? `${t.sender.track.kind} ${t.sender.track.readyState}` : null, encodings: t.sender.getParameters().encodings?.map((e) => `${e.rid ?? "-"}:${e.active}`) }));
          // the sending transforms' counters: a frame that cannot be encrypted is dropped
          const enc = await window.weirApp.call.conference.encryptionStats().catch((e) => String(e));
          const encrypting = typeof enc === "object" ? Object.values(enc).filter((x) => x.direction === "send" && !x.closed).map(({ kind, frames, encrypted, clear, dropped, lastError }) => ({ kind, frames, encrypted, clear, dropped, lastError })) : enc;
          return { out, senders, encrypting };
        })
        .catch((e) => String(e));
      log(`--- ${p.name} sending ---\n${JSON.stringify(sent)}`);
    }
    if (h.focus) log(`--- focus log tail ---\n${h.focus.tailText(60)}`);
    if (h.focus && !h.focus.exit) {
      const admin = await fetch(`http://127.0.0.1:${h.adminPort}/admin/v1/conferences`, { headers: { Authorization: `Bearer ${ADMIN_TOKEN}` } })
        .then((r) => r.text())
        .catch((e) => String(e));
      writeFileSync(join(h.dir, "admin.json"), admin);
      const metrics = await h.focus.metrics().catch((e) => String(e));
      writeFileSync(join(h.dir, "metrics.txt"), metrics);
      log(`--- focus drops ---\n${metrics.split("\n").filter((l) => /drop/.test(l) && !l.startsWith("#") && !/ 0$/.test(l)).join("\n")}`);
    }
  }
  await h.browser?.close().catch(() => undefined);
  await h.focus?.stop();
  h.syn?.stop();
  if (chain.failed) log(`kept work dir ${h.dir}`);
  else if (!process.env.WEIR_KEEP_TMP) rmSync(h.dir, { recursive: true, force: true });
});

test("each person signs in through the app's form, served by the focus", async (t) => {
  await chain.step(t, async () => {
    for (const p of h.pages) await signIn(p, h.syn.baseUrl);
  });
});

test("alice creates an encrypted room inviting bob and carol; they accept in the app", async (t) => {
  await chain.step(t, async () => {
    const [alice, bob, carol] = h.pages;
    await alice.page.getByLabel("Name", { exact: true }).fill("Weekly");
    await alice.page.getByLabel("Invite (Matrix ids, optional)").fill(`${bob.user.userId}, ${carol.user.userId}`);
    assert.equal(await alice.page.getByLabel("End-to-end encrypted calls").isChecked(), true, "rooms are encrypted by default");
    await alice.page.getByRole("button", { name: "Create room" }).click();
    await alice.page.getByRole("button", { name: "Start call in Weekly" }).or(alice.page.getByRole("button", { name: "Join the call in Weekly" })).waitFor({ timeout: 30000 });
    for (const p of [bob, carol]) {
      await p.page.getByRole("button", { name: "Accept the invitation to Weekly" }).click({ timeout: 30000 });
      await p.page.getByRole("button", { name: "Join the call in Weekly" }).waitFor({ timeout: 30000 });
    }
  });
});

test("all three join the call; everyone decodes everyone, encrypted end to end", async (t) => {
  await chain.step(t, async () => {
    // alice starts the call; bob and carol join it once it is up (as people do: someone starts)
    for (const p of h.pages) {
      await p.page.getByRole("button", { name: "Join the call in Weekly" }).click();
      await p.page.getByRole("toolbar", { name: "Call controls" }).waitFor();
      if (p === h.pages[0]) await p.page.locator('.connection[data-state="connected"]').waitFor({ timeout: 60000 });
    }
    await everyoneDecodesEveryone("every page to show both others' colours, decoding");
    for (const p of h.pages) {
      const enc = await p.page.locator("#encryption-state").textContent();
      assert.match(enc, /End-to-end encrypted/, `${p.name}'s page says the call is encrypted`);
      const stats = await p.page.evaluate(() => window.weirApp.call.conference.encryptionStats());
      const send = Object.values(stats).filter((s) => s.direction === "send");
      const recv = Object.values(stats).filter((s) => s.direction === "receive" && s.participant);
      assert.ok(send.some((s) => s.kind === "video" && s.encrypted > 0), `${p.name} encrypts video: ${JSON.stringify(send)}`);
      assert.ok(send.some((s) => s.kind === "audio" && s.encrypted > 0), `${p.name} encrypts audio`);
      for (const q of others(p)) {
        assert.ok(
          recv.some((s) => s.participant === q.id && s.kind === "video" && s.decrypted > 0),
          `${p.name} decrypts ${q.name}'s video: ${JSON.stringify(recv)}`,
        );
      }
      // nobody verified anybody's device here: every other tile says so
      await waitFor(`${p.name}'s tiles to name the unverified devices`, async () => {
        const ts = await p.page.evaluate(tiles);
        return others(p).every((q) => ts.find((x) => x.participant === q.id && x.purpose === "m.usermedia")?.label.includes("device not verified"));
      });
    }
  });
});

test("byte identity: what leaves each sender's encrypt step arrives unchanged at every receiver's decrypt step", async (t) => {
  await chain.step(t, async () => {
    for (const p of h.pages) await p.page.evaluate(() => window.weirApp.call.conference.media.audit(true, 5000));
    // two seconds of frames: wait until every receiver has recorded 40 frames from each sender
    const dumps = await waitFor(
      "40 audited frames per sender at every receiver",
      async () => {
        const all = await Promise.all(h.pages.map((p) => p.page.evaluate(() => window.weirApp.call.conference.media.auditDump())));
        const enough = h.pages.every((p, i) =>
          others(p).every((q) => Object.values(all[i]).filter((x) => x.direction === "receive" && x.participant === q.id).reduce((n, x) => n + x.frames.length, 0) >= 40),
        );
        return enough ? all : null;
      },
      { timeoutMs: 30000, intervalMs: 500 },
    );
    for (const [i, p] of h.pages.entries()) {
      const sent = new Map();
      for (const x of Object.values(dumps[i])) if (x.direction === "send") for (const [iv, hash] of x.frames) sent.set(iv, hash);
      for (const [j, q] of h.pages.entries()) {
        if (q === p) continue;
        let matched = 0;
        let differ = 0;
        for (const x of Object.values(dumps[j])) {
          if (x.direction !== "receive" || x.participant !== p.id) continue;
          for (const [iv, hash] of x.frames) {
            if (!sent.has(iv)) continue; // recorded before the sender's audit began
            if (sent.get(iv) === hash) matched += 1;
            else differ += 1;
          }
        }
        log(`${p.name} → ${q.name}: ${matched} frames identical, ${differ} different`);
        assert.equal(differ, 0, `${p.name} → ${q.name}: frames changed between encrypt and decrypt`);
        assert.ok(matched >= 20, `${p.name} → ${q.name}: only ${matched} frames matched by IV`);
      }
    }
  });
});

test("mute and camera off show on the others' tiles, and the picture comes back", async (t) => {
  await chain.step(t, async () => {
    const [alice, bob, carol] = h.pages;
    await clickControl(alice, "Mute", true);
    await waitFor("bob and carol to see alice muted", async () => {
      for (const p of [bob, carol]) if (!(await tileOf(p, alice))?.label.includes("muted")) return false;
      return true;
    });
    await clickControl(alice, "Mute", false);
    await clickControl(alice, "Camera off", true);
    await waitFor("bob and carol to see alice's camera off", async () => {
      for (const p of [bob, carol]) if ((await tileOf(p, alice))?.problem !== "camera-off") return false;
      return true;
    });
    await clickControl(alice, "Camera off", false);
    await everyoneDecodesEveryone("alice's picture to come back everywhere", [alice, bob, carol]);
  });
});

test("bob shares his screen: the others see it in its own tile, and it goes when he stops", async (t) => {
  await chain.step(t, async () => {
    const [alice, bob, carol] = h.pages;
    await clickControl(bob, "Share screen", true);
    await waitFor("alice and carol to decode bob's yellow screen", async () => {
      for (const p of [alice, carol]) {
        const s = await tileOf(p, bob, "m.screenshare");
        if (!s || !near(s.rgb, SCREEN_RGB) || s.framesDecoded < 10) return false;
      }
      return true;
    }, { timeoutMs: 60000, intervalMs: 500 });
    await clickControl(bob, "Share screen", false);
    await waitFor("bob's screen tile to go", async () => {
      for (const p of [alice, carol]) if (await tileOf(p, bob, "m.screenshare")) return false;
      return true;
    });
  });
});

test("grid and speaker views: laid out, filled, captured for docs/", async (t) => {
  await chain.step(t, async () => {
    const [alice, bob, carol] = h.pages;
    // The dominant speaker's tile goes first, and which of three identical fake microphones
    // the focus finds loudest depends on timing (carol in some runs, alice herself in others).
    // Bob and carol mute, so alice is the one speaker and the layout is the same every run.
    for (const p of [bob, carol]) await clickControl(p, "Mute", true);
    await waitFor("alice alone speaking, bob and carol muted", async () => {
      const ts = await alice.page.evaluate(tiles);
      const me = ts.find((x) => x.local);
      const others = ts.filter((x) => !x.local);
      return me?.label.includes("speaking now") && others.length === 2 && others.every((x) => x.label.includes("muted") && !x.label.includes("speaking"));
    });
    const grid = await alice.page.evaluate(tiles);
    assert.equal(grid.length, 3, "alice's grid: her own tile and two others");
    const areas = grid.map((x) => x.area);
    assert.ok(Math.max(...areas) / Math.min(...areas) < 1.5, `grid tiles are about the same size: ${areas}`);
    assert.ok(grid.every((x) => x.rgb !== null && x.rgb.some((c) => c > 100)), "every grid tile shows a picture");
    await matchesCommittedScreenshot(alice.page, "docs/app-grid.png");

    await clickControl(alice, "Speaker view", true);
    const speaker = await waitFor("a spotlight tile", async () => {
      const ts = await alice.page.evaluate(tiles);
      return ts.some((x) => x.spotlight) ? ts : null;
    });
    const spot = speaker.find((x) => x.spotlight);
    assert.ok(!spot.local, "the spotlight shows someone else");
    for (const x of speaker) if (x !== spot) assert.ok(spot.area > 3 * x.area, `the spotlight (${spot.area}) is much larger than ${x.participant} (${x.area})`);
    assert.ok(speaker.every((x) => x.rgb !== null), "every speaker-view tile shows a picture");
    await matchesCommittedScreenshot(alice.page, "docs/app-speaker.png");
    await clickControl(alice, "Speaker view", false);
    for (const p of [bob, carol]) await clickControl(p, "Mute", false);
  });
});

test("each tile asks for the size it shows; tiles off screen are not received; the numbers overlay", async (t) => {
  await chain.step(t, async () => {
    const [alice] = h.pages;
    // speaker view: the spotlight is large and gets a large layer, the thumbnails the smallest
    await clickControl(alice, "Speaker view", true);
    const sized = await waitFor(
      "alice to receive a larger layer in the spotlight than in the thumbnails",
      async () => {
        const ts = (await alice.page.evaluate(tiles)).filter((x) => !x.local);
        const spot = ts.find((x) => x.spotlight);
        const thumbs = ts.filter((x) => !x.spotlight);
        // (Chromium sends a 640×360 camera as 160 and 320 px layers, and 640 px only when the
        // estimate allows it: the spotlight must get a larger layer than every thumbnail)
        return spot && thumbs.length > 0 && thumbs.every((x) => x.frameWidth > 0 && x.frameWidth <= 160 && spot.frameWidth > x.frameWidth) ? ts : null;
      },
      { timeoutMs: 45000, intervalMs: 500 },
    );
    log(`alice's tiles in speaker view: ${sized.map((x) => `${x.participant.split(":")[0]} ${x.spotlight ? "spotlight" : "thumbnail"} ${x.frameWidth} px wide`).join(", ")}`);
    await clickControl(alice, "Speaker view", false);

    // the numbers overlay shows each tile's resolution, frame rate, bitrate and loss
    await clickControl(alice, "Show numbers", true);
    await waitFor("the numbers on alice's tiles", async () => {
      const ts = (await alice.page.evaluate(tiles)).filter((x) => !x.local);
      return ts.every((x) => /\d+×\d+ @ \d+ fps\n\d+ kbit\/s\nloss \d+\.\d %/.test(x.stats ?? ""));
    });
    await clickControl(alice, "Show numbers", false);

    // a small window shows one tile at a time: the others are not asked for, so not received
    await alice.page.setViewportSize({ width: 420, height: 260 });
    let last = null;
    const off = await waitFor(
      "the videos scrolled out of alice's small window to stop arriving while the one on screen flows",
      async () => {
        const ts = (await alice.page.evaluate(tiles)).filter((x) => !x.local);
        const visible = await alice.page.evaluate(() =>
          [...document.querySelectorAll("figure.tile")].filter((el) => {
            const r = el.getBoundingClientRect();
            const stage = document.querySelector(".tiles").getBoundingClientRect();
            return r.bottom > stage.top && r.top < stage.bottom;
          }).map((el) => el.dataset.participant),
        );
        const now = Object.fromEntries(ts.map((x) => [x.participant, x.packetsReceived]));
        const prev = last;
        last = { now, visible };
        if (!prev) return null;
        const hidden = ts.filter((x) => !visible.includes(x.participant));
        const shown = ts.filter((x) => visible.includes(x.participant));
        // a video no longer received has no receiver stats left, or counts no more packets
        const stopped = hidden.length > 0 && hidden.every((x) => x.packetsReceived <= (prev.now[x.participant] ?? 0));
        if (process.env.WEIR_TEST_DEBUG) log(JSON.stringify({ visible, now, prev: prev.now }));
        const flowing = shown.length > 0 && shown.every((x) => x.packetsReceived > (prev.now[x.participant] ?? 0));
        return stopped && flowing ? { hidden: hidden.map((x) => x.participant), shown: shown.map((x) => x.participant) } : null;
      },
      { timeoutMs: 30000, intervalMs: 1500 },
    );
    log(`in a 420×260 window alice receives ${off.shown.join(", ")} and not ${off.hidden.join(", ")}`);
    await alice.page.setViewportSize({ width: 960, height: 600 });
    await everyoneDecodesEveryone("alice to receive everyone again in her full window", [alice]);
  });
});

test("accessibility: the call's controls are named buttons reached with the keyboard", async (t) => {
  await chain.step(t, async () => {
    const { page } = h.pages[1];
    const aria = await page.getByRole("toolbar", { name: "Call controls" }).ariaSnapshot();
    for (const name of ["Mute", "Camera off", "Share screen", "Devices", "Speaker view", "Show numbers", "Leave"]) {
      assert.ok(aria.includes(`button "${name}"`), `the toolbar has a button named ${name}:\n${aria}`);
    }
    const tree = await page.locator("body").ariaSnapshot();
    assert.match(tree, /status: Connected/, `the connection state is a status:\n${tree}`);
    const reached = new Set();
    await page.locator("body").focus();
    for (let i = 0; i < 30; i++) {
      await page.keyboard.press("Tab");
      reached.add(await page.evaluate(() => document.activeElement?.textContent?.trim() || document.activeElement?.getAttribute("aria-label") || ""));
    }
    for (const name of ["Mute", "Camera off", "Share screen", "Leave"]) assert.ok(reached.has(name), `Tab reaches ${name}: ${[...reached].join(" | ")}`);
  });
});

test("the focus restarts: every page reconnects by itself and decodes everyone again", async (t) => {
  await chain.step(t, async () => {
    const exit = await h.focus.stop();
    log(`focus stopped: ${JSON.stringify(exit)}`);
    await waitFor("every page to notice the lost connection", async () => {
      for (const p of h.pages) if ((await p.page.locator(".connection").getAttribute("data-state")) === "connected") return false;
      return true;
    });
    h.focus.spawn();
    await h.focus.waitHealthy();
    await waitFor("every page to say Connected again", async () => {
      for (const p of h.pages) if ((await p.page.locator(".connection").getAttribute("data-state")) !== "connected") return false;
      return true;
    }, { timeoutMs: 90000, intervalMs: 500 });
    await everyoneDecodesEveryone("everyone to decode everyone after the restart");
  });
});

test("bob reloads his page in the middle of the call: he joins again and everyone decodes everyone", async (t) => {
  await chain.step(t, async () => {
    const [, bob] = h.pages;
    // no Leave: the page is simply reloaded (a crash, a browser restart); his keys are gone
    await bob.page.reload();
    await bob.page.getByRole("button", { name: "Join the call in Weekly" }).click({ timeout: 60000 });
    await everyoneDecodesEveryone("everyone to decode everyone after bob's reload");
  });
});

test("carol leaves and rejoins: the others drop her tile and make new keys; she decodes everyone again", async (t) => {
  await chain.step(t, async () => {
    const [alice, bob, carol] = h.pages;
    const indexOf = (p) => p.page.evaluate(() => window.weirApp.call.conference.keys.index);
    const before = { alice: await indexOf(alice), bob: await indexOf(bob) };
    await clickControl(carol, "Leave");
    await carol.page.getByRole("heading", { name: "Rooms" }).waitFor();
    await waitFor("carol's tile to go from alice's and bob's calls", async () => {
      for (const p of [alice, bob]) if (await tileOf(p, carol)) return false;
      return true;
    });
    await waitFor("alice and bob to make new keys", async () => (await indexOf(alice)) !== before.alice && (await indexOf(bob)) !== before.bob);
    await carol.page.getByRole("button", { name: "Join the call in Weekly" }).click();
    await everyoneDecodesEveryone("everyone to decode everyone after carol rejoined");
  });
});

test("the embedding example: carol joins from embed.html, a page that embeds the call with the library", async (t) => {
  await chain.step(t, async () => {
    const [alice, bob, carol] = h.pages;
    const roomId = await alice.page.evaluate(() => window.weirApp.call.conference.roomId);
    await clickControl(carol, "Leave");
    await carol.page.getByRole("heading", { name: "Rooms" }).waitFor();
    // the same origin, so the example uses the session the app saved
    await carol.page.goto(`${h.appUrl}embed.html#room=${encodeURIComponent(roomId)}`);
    await carol.page.getByText("Call: connected").waitFor({ timeout: 60000 });
    const colours = await waitFor(
      "carol's embedded call to show alice's and bob's pictures",
      async () => {
        const seen = await carol.page.evaluate(() => {
          const c = document.createElement("canvas");
          c.width = 8;
          c.height = 8;
          const g = c.getContext("2d", { willReadFrequently: true });
          return [...document.querySelectorAll("#call video")].map((v) => {
            if (v.videoWidth === 0) return null;
            g.drawImage(v, v.videoWidth / 4, v.videoHeight / 4, v.videoWidth / 2, v.videoHeight / 2, 0, 0, 8, 8);
            const d = g.getImageData(0, 0, 8, 8).data;
            return [0, 1, 2].map((i) => Math.round([...d].filter((_, k) => k % 4 === i).reduce((a, b) => a + b, 0) / 64));
          });
        });
        return [alice, bob].every((q) => seen.some((rgb) => near(rgb, q.rgb))) ? seen : null;
      },
      { timeoutMs: 60000, intervalMs: 500 },
    );
    log(`carol's embedded call shows ${JSON.stringify(colours)}`);
    // and alice and bob see her (the embedded page encrypts with its own key, sent as the app does)
    await waitFor("alice and bob to decode carol from the embedded page", async () => {
      for (const p of [alice, bob]) {
        const tile = await tileOf(p, carol);
        if (!tile || !near(tile.rgb, carol.rgb) || tile.problem !== "") return false;
      }
      return true;
    }, { timeoutMs: 60000, intervalMs: 500 });
    await carol.page.getByRole("button", { name: "Leave" }).click();
    await waitFor("carol's tile to go after she leaves the embedded call", async () => {
      for (const p of [alice, bob]) if (await tileOf(p, carol)) return false;
      return true;
    });
    await carol.page.goto(h.appUrl);
    await carol.page.getByRole("heading", { name: "Rooms" }).waitFor({ timeout: 60000 });
  });
});

test("a page whose key exchange is blocked receives the packets but decodes nothing, and says why", async (t) => {
  await chain.step(t, async () => {
    const [alice, bob, carol] = h.pages;
    await carol.context.addInitScript(() => (window.__weirBlockKeyExchange = true));
    await carol.page.reload();
    await carol.page.getByRole("button", { name: "Join the call in Weekly" }).click({ timeout: 60000 });
    const seen = await waitFor(
      "carol to receive alice's and bob's video packets while her tiles wait for keys",
      async () => {
        const ts = await carol.page.evaluate(tiles);
        const ab = [alice, bob].map((q) => ts.find((x) => x.participant === q.id && x.purpose === "m.usermedia"));
        return ab.every((x) => x && x.packetsReceived > 100 && x.problem === "no-key") ? ab : null;
      },
      { timeoutMs: 60000, intervalMs: 500 },
    );
    for (const x of seen) {
      assert.equal(x.framesDecoded, 0, `carol decoded nothing of ${x.participant}`);
      assert.match(x.status, /Waiting for .*encryption key/);
    }
    // alice and bob got carol's key (only her receiving is blocked), so they still see her
    await everyoneDecodesEveryone("alice and bob to decode each other and carol", [alice, bob]);
    const stats = await carol.page.evaluate(() => window.weirApp.call.conference.encryptionStats());
    const dropped = Object.values(stats).filter((s) => s.direction === "receive").reduce((n, s) => n + (s.dropped?.["no-key"] ?? 0), 0);
    assert.ok(dropped > 0, `carol's worker dropped frames for want of a key: ${JSON.stringify(stats)}`);
  });
});

test("no key ever reaches the focus: not in its log, its metrics, its admin API or its memory", async (t) => {
  await chain.step(t, async () => {
    const keys = new Set();
    for (const p of h.pages) {
      const all = await p.page.evaluate(() =>
        window.weirApp.call.conference.keys.allKeys().map((k) => Array.from(k.key)),
      );
      for (const bytes of all) {
        const b = Buffer.from(bytes);
        keys.add(b.toString("base64").replace(/=+$/, ""));
        keys.add(b.toString("hex"));
      }
    }
    assert.ok(keys.size >= 6, `keys collected from the pages: ${keys.size}`);
    const logText = readFileSync(h.focus.logPath, "utf8");
    const metrics = await (await fetch(`${h.focus.baseUrl}/metrics`)).text();
    const admin = await (await fetch(`http://127.0.0.1:${h.adminPort}/admin/v1/conferences`, { headers: { Authorization: `Bearer ${ADMIN_TOKEN}` } })).text();
    assert.match(admin, /participants/, "the admin API answered");
    for (const k of keys) {
      for (const [where, text] of [["log", logText], ["metrics", metrics], ["admin API", admin]]) {
        assert.ok(!text.includes(k), `a call key appears in the focus's ${where}`);
      }
    }
    // and not in the focus process's memory: every readable mapping of it, raw bytes and base64
    const raw = [];
    for (const p of h.pages) {
      const all = await p.page.evaluate(() => window.weirApp.call.conference.keys.allKeys().map((k) => Array.from(k.key)));
      for (const bytes of all) raw.push(Buffer.from(bytes));
    }
    const needles = [...raw, ...raw.map((b) => Buffer.from(b.toString("base64").replace(/=+$/, "")))];
    const scanned = scanMemory(h.focus.pid, needles);
    log(`focus memory: ${(scanned.bytes / 1048576).toFixed(1)} MiB in ${scanned.regions} mappings scanned for ${needles.length} key encodings`);
    assert.ok(scanned.bytes > 4 * 1048576, `too little of the focus's memory could be read (${scanned.bytes} bytes)`);
    assert.equal(scanned.found, null, `a call key is in the focus's memory: ${scanned.found}`);
  });
});

test("an unencrypted room gets an unencrypted call, and the app says so", async (t) => {
  await chain.step(t, async () => {
    const [alice, bob] = h.pages;
    for (const p of [alice, bob]) {
      await clickControl(p, "Leave");
      await p.page.getByRole("heading", { name: "Rooms" }).waitFor();
    }
    await alice.page.getByLabel("Name", { exact: true }).fill("Open");
    await alice.page.getByLabel("Invite (Matrix ids, optional)").fill(bob.user.userId);
    await alice.page.getByLabel("End-to-end encrypted calls").uncheck();
    await alice.page.getByRole("button", { name: "Create room" }).click();
    await bob.page.getByRole("button", { name: "Accept the invitation to Open" }).click({ timeout: 30000 });
    for (const p of [alice, bob]) {
      await p.page.getByRole("button", { name: "Join the call in Open" }).click({ timeout: 30000 });
      await p.page.locator('.connection[data-state="connected"]').waitFor({ timeout: 60000 });
    }
    await everyoneDecodesEveryone("alice and bob to decode each other in the unencrypted call", [alice, bob], [alice, bob]);
    for (const p of [alice, bob]) {
      assert.equal(await p.page.locator("#encryption-state").textContent(), "Not encrypted", `${p.name}'s page says the call is not encrypted`);
      const stats = await p.page.evaluate(() => window.weirApp.call.conference.encryptionStats());
      assert.deepEqual(stats, {}, `${p.name} runs no frame transform`);
      const tile = (await p.page.evaluate(tiles)).find((x) => !x.local);
      assert.ok(!tile.label.includes("device not verified"), "no verification is asked of an unencrypted call");
    }
  });
});

