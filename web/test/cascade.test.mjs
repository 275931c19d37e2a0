// A cascade in the browser (docs/cascading.md): two organisations, each a Synapse federating over
// loopback with its own weir focus (@focus:localhost:PORT, devices FOCUSA and FOCUSB). alice (red)
// and bob (green) are on site a, carol (blue) on site b; all three are in one room created on a,
// which invites everyone and both foci (the foci join on invite). Each stock matrix-js-sdk 43 client
// in Chromium calls only its own organisation's focus and names it in MSC3898 `foci.active`; the
// foci find each other there and link with a trunk.
//
// Checks: every client decodes every other client's video (the right colour) and hears its audio
// (each participant's microphone is a tone of its own: the right frequency, a non-zero level),
// attributed to the right owner (user and device) by its own focus's metadata, including streams
// that crossed the trunk; every call event a client receives comes from its own focus;
// one trunk on each focus carrying each track once; a far participant's hangup removes its media
// across the trunk while the others keep going.
//
// Run: WEIR_FOCUS_BIN=target/debug/weir-focus scripts/in-netns.sh node --test web/test/cascade.test.mjs
// (after scripts/setup.sh and cargo build -p weir-focus). WEIR_KEEP_TMP=1 keeps the logs.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { networkInterfaces } from "node:os";
import { CascadeHarness, CASCADE_SITES } from "./cascade-harness.mjs";
import { waitFor, log, stepChain } from "./harness.mjs";
import { everyoneDecodesEveryone, pairReport, trackGrowth } from "./checks.mjs";

let h;
const chain = stepChain();
const step = chain.step;
const timings = {};

function onlyLoopback() {
  return Object.values(networkInterfaces())
    .flat()
    .every((i) => i.internal);
}

const TRUNK_METRICS = ["weir_trunks", "weir_trunk_tracks", "weir_participants", "weir_invites_refused_total", "weir_todevice_dropped_total"];

/** Per focus: the trunk gauges by label, and a few totals. */
async function trunkState() {
  const out = {};
  for (const s of h.sites) {
    const text = await s.focus.metrics().catch(() => "");
    const sample = (re) => {
      let sum = 0;
      for (const line of text.split("\n")) {
        const m = line.match(/^(\S+?)(\{[^}]*\})?\s+(\S+)$/);
        if (m && re.test(`${m[1]}${m[2] ?? ""}`)) sum += Number(m[3]);
      }
      return sum;
    };
    out[s.name] = {
      trunks: sample(/^weir_trunks\{/),
      tracksOut: sample(/^weir_trunk_tracks\{.*direction="out"/),
      tracksIn: sample(/^weir_trunk_tracks\{.*direction="in"/),
      refused: sample(/^weir_invites_refused_total\b/),
      foreignOwner: sample(/^weir_todevice_dropped_total\{.*reason="foreign_owner"/),
      trunkRtpIn: sample(/^weir_trunk_rtp_packets_in_total\b/),
    };
  }
  return out;
}

// WEIR_CASCADE_FAR=2 puts a second participant on site b (dave, yellow, 550 Hz): then each trunk
// copy serves two watchers in both directions, and the hangup step leaves a trunk still in use.
function sites() {
  const far = Number(process.env.WEIR_CASCADE_FAR ?? 1);
  if (far === 1) return CASCADE_SITES;
  if (far !== 2) throw new Error(`WEIR_CASCADE_FAR must be 1 or 2, not ${process.env.WEIR_CASCADE_FAR}`);
  const [a, b] = CASCADE_SITES;
  return [a, { ...b, people: [...b.people, { name: "dave", colour: "yellow", tone: 550 }] }];
}

before(async () => {
  h = new CascadeHarness({ sites: sites() });
  try {
    await h.start();
  } catch (e) {
    chain.fail();
    throw e;
  }
});

after(async () => {
  try {
    if (chain.failed && h) {
      h.keepDir = true; // the full focus and Synapse logs stay for a look (path printed at teardown)
      console.log(await h.diagnostics({ focusLines: 150 }));
      console.log(`trunk metrics: ${JSON.stringify(await trunkState().catch((e) => String(e)))}`);
    }
    console.log(`\n===== weir cascade measurements =====\nsetup: ${JSON.stringify(h?.timings ?? {})}\nsteps: ${JSON.stringify(timings)}`);
  } finally {
    await h?.teardown();
  }
});

test("clients on two homeservers, each calling its own focus, receive everyone across the trunk", { timeout: 180000 }, (t) =>
  step(t, async () => {
    // play what arrives, so Chromium measures its level and the probe its tone
    for (const p of h.participants) await p.page.evaluate(() => window.Probe.setAudible(true));
    const t0 = Date.now();
    for (const p of h.participants) await h.join(p, 60000);
    let lastLog = 0;
    await waitFor(
      "every client to decode video and receive audio from every other client (owners from its focus's metadata)",
      async () => {
        const snaps = await h.liveSnapshots();
        const ok = everyoneDecodesEveryone(snaps);
        if (!ok && Date.now() - lastLog > 5000) {
          lastLog = Date.now();
          const have = snaps.map((s) => `${s.name}[${s.callState}]: ${s.feeds.map((f) => `${f.owner ?? "?"}:${f.video?.framesDecoded ?? "-"}f`).join(", ") || "nothing"}`);
          log(`pending: ${have.join(" | ")}; trunks ${JSON.stringify(await trunkState())}`);
        }
        return ok;
      },
      { timeoutMs: 120000, intervalMs: 500 },
    );
    timings.everyoneDecodesMs = Date.now() - t0;
    log(`everyone decodes everyone ${timings.everyoneDecodesMs} ms after the first call was placed`);

    const snaps = await h.snapshots();
    for (const s of snaps) {
      const me = h.byName(s.name);
      const myFocus = h.focusOf(me);
      assert.equal(s.callState, "connected", `${s.name} call state`);
      for (const other of h.participants.filter((p) => p !== me)) {
        const feeds = s.feeds.filter((f) => f.owner === other.userId);
        assert.equal(feeds.length, 1, `${s.name} has ${feeds.length} feeds of ${other.userId}`);
        const f = feeds[0];
        // the real owner, across the trunk too: user and device from the publisher's own entry
        assert.equal(f.ownerDevice, other.session.deviceId, `${s.name}: device of ${other.name}'s feed`);
        assert.equal(f.purpose, "m.usermedia");
        // js-sdk attributes every remote feed to the peer it called: its own focus
        assert.equal(f.feedUserId, myFocus.userId, `${s.name}: ${other.name}'s feed arrived from ${f.feedUserId}`);
      }
      assert.equal(s.feeds.length, h.participants.length - 1, `${s.name} has ${s.feeds.length} feeds`);
      assert.ok(s.selectedPair, `${s.name}: no selected ICE candidate pair`);
      assert.match(s.selectedPair.remote, /^127\.0\.0\.1:/, `${s.name}: media goes to ${s.selectedPair.remote}`);
      if (onlyLoopback()) assert.match(s.selectedPair.local, /^127\.0\.0\.1:/, `${s.name}: media from ${s.selectedPair.local}`);
      log(`${s.name} (site ${me.site.name}): selected pair ${s.selectedPair.local} -> ${s.selectedPair.remote}`);
    }
  }));

test("every call event a client receives comes from its own focus", { timeout: 30000 }, (t) =>
  step(t, async () => {
    for (const p of h.participants) {
      const focus = h.focusOf(p);
      const evs = await p.page.evaluate(() => window.Probe.received());
      const senders = [...new Set(evs.map((e) => `${e.sender}/${e.device_id}`))];
      log(`${p.name} received ${evs.length} call events from ${senders.join(", ")}`);
      assert.ok(evs.some((e) => e.type === "m.call.answer"), `${p.name}: no m.call.answer`);
      for (const e of evs) {
        assert.equal(e.sender, focus.userId, `${p.name}: ${e.type} from ${e.sender}`);
        assert.equal(e.device_id, focus.deviceId, `${p.name}: ${e.type} device_id`);
        assert.equal(e.party_id, focus.deviceId, `${p.name}: ${e.type} party_id`);
        assert.equal(e.conf_id, h.confId, `${p.name}: ${e.type} conf_id`);
        assert.equal(e.hasSeq, false, `${p.name}: ${e.type} carries seq`);
        if (e.type === "m.call.negotiate" && e.sdpType === "offer") {
          assert.equal(e.metadataWithOwner, e.metadataStreams, `${p.name}: metadata entries without user_id/device_id`);
        }
      }
    }
  }));

test("media keeps flowing both ways across the trunk, colours and tones match, one copy per track", { timeout: 120000 }, (t) =>
  step(t, async () => {
    const colourOf = Object.fromEntries(h.participants.map((p) => [p.userId, p.colour]));
    const toneOf = Object.fromEntries(h.participants.map((p) => [p.userId, p.tone]));
    const base = await h.snapshots();
    let growth;
    await waitFor(
      "framesDecoded (+30), audio packets (+50) and audio energy (> 0.005) to grow for every receiver/sender pair",
      async () => {
        const cur = await h.liveSnapshots();
        if (cur[0].t - base[0].t < 2000) return false;
        growth = trackGrowth(base, cur, h.participants);
        return growth.every((x) => x.frames >= 30 && x.audioPackets >= 50 && x.audioEnergy > 0.005);
      },
      { timeoutMs: 45000, intervalMs: 500 },
    ).catch((e) => {
      throw new Error(`${e.message}\nlast growth: ${JSON.stringify(growth)}`);
    });

    let bad = [];
    await waitFor(
      "every received video to show its owner's colour, and its audio to carry its owner's tone",
      async () => {
        const snaps = await h.liveSnapshots();
        bad = [];
        for (const s of snaps) {
          for (const f of s.feeds) {
            if (f.colour !== colourOf[f.owner]) bad.push(`${s.name} sees ${f.owner} as ${f.colour} ${JSON.stringify(f.pixel)}`);
            if (!f.tone || Math.abs(f.tone.hz - toneOf[f.owner]) > 25) {
              bad.push(`${s.name} hears ${f.owner} at ${JSON.stringify(f.tone)}, not ${toneOf[f.owner]} Hz`);
            }
            if (!(f.audio?.audioLevel > 0.01)) bad.push(`${s.name} hears ${f.owner} at level ${f.audio?.audioLevel}`);
          }
        }
        return bad.length === 0;
      },
      { timeoutMs: 30000, intervalMs: 500 },
    ).catch((e) => {
      throw new Error(`${e.message}\n${bad.join("\n")}`);
    });
    const snaps = await h.snapshots();
    console.log(pairReport(snaps, h.participants, colourOf));
    for (const s of snaps) {
      for (const f of s.feeds) {
        log(`${s.name} <- ${f.owner}: audio level ${f.audio?.audioLevel}, tone ${f.tone?.hz} Hz (${f.tone?.db} dB), colour ${f.colour}`);
      }
    }

    // One trunk on each focus; each focus sends its own participants' tracks onto it once (the far
    // side watches them all) and receives each far track once, however many watch it.
    const local = Object.fromEntries(h.sites.map((s) => [s.name, 2 * s.people.length]));
    const total = h.participants.length * 2;
    let m;
    await waitFor(
      "each focus to have one trunk carrying each track once",
      async () => {
        m = await trunkState();
        return h.sites.every((s) => m[s.name].trunks === 1 && m[s.name].tracksOut === local[s.name] && m[s.name].tracksIn === total - local[s.name]);
      },
      { timeoutMs: 15000, intervalMs: 500 },
    ).catch((e) => {
      throw new Error(`${e.message}\ntrunk metrics: ${JSON.stringify(m)}`);
    });
    log(`trunk metrics: ${JSON.stringify(m)}`);
    for (const s of h.sites) {
      assert.ok(m[s.name].trunkRtpIn > 0, `focus ${s.name} received no RTP on its trunk`);
      assert.equal(m[s.name].foreignOwner, 0, `focus ${s.name} dropped catalogue entries as foreign_owner`);
    }
  }));

test("a far participant's hangup removes its media across the trunk; the others keep going", { timeout: 120000 }, (t) =>
  step(t, async () => {
    // the last participant of the last site: the one whose media crosses the trunk to the others
    const leaver = h.participants[h.participants.length - 1];
    const stay = h.participants.filter((p) => p !== leaver);
    const t0 = Date.now();
    await leaver.page.evaluate(() => window.Probe.hangup());
    let prev = await h.snapshots();
    let g;
    await waitFor(
      `${stay.map((p) => p.name).join(" and ")} to stop receiving ${leaver.name} while still decoding each other`,
      async () => {
        const cur = await h.liveSnapshots(stay.map((p) => p.name));
        if (cur[0].t - prev[0].t < 1500) return false;
        g = trackGrowth(prev, cur, h.participants);
        prev = cur;
        const stayPairs = g.filter((x) => x.receiver !== leaver.name && x.sender !== leaver.name);
        const fromLeaver = g.filter((x) => x.receiver !== leaver.name && x.sender === leaver.name);
        const gone = cur
          .filter((s) => s.name !== leaver.name)
          .every((s) => !s.feeds.some((f) => f.owner === leaver.userId));
        return stayPairs.length === stay.length * (stay.length - 1) && stayPairs.every((x) => x.frames >= 10) && fromLeaver.every((x) => x.frames === 0) && gone;
      },
      { timeoutMs: 60000, intervalMs: 500 },
    ).catch((e) => {
      throw new Error(`${e.message}\nlast growth: ${JSON.stringify(g)}`);
    });
    timings.farHangupGoneMs = Date.now() - t0;
    log(`${leaver.name}'s feeds gone at ${stay.map((p) => p.name).join(", ")} ${timings.farHangupGoneMs} ms after the hangup`);

    // The trunk follows: with nobody left on the leaver's site, its focus serves the conference no
    // more and the trunk is hung up; otherwise the trunk stays and carries only what remains.
    const inCall = Object.fromEntries(h.sites.map((s) => [s.name, s.people.filter((p) => p.name !== leaver.name).length]));
    const trunked = h.sites.every((s) => inCall[s.name] > 0);
    const want = Object.fromEntries(
      h.sites.map((s) => {
        const out = trunked ? 2 * inCall[s.name] : 0;
        const inn = trunked ? 2 * (stay.length - inCall[s.name]) : 0;
        return [s.name, { trunks: trunked ? 1 : 0, tracksOut: out, tracksIn: inn }];
      }),
    );
    let m;
    await waitFor(
      `the trunk gauges to read ${JSON.stringify(want)}`,
      async () => {
        m = await trunkState();
        return h.sites.every((s) => ["trunks", "tracksOut", "tracksIn"].every((k) => m[s.name][k] === want[s.name][k]));
      },
      { timeoutMs: 30000, intervalMs: 500 },
    ).catch((e) => {
      throw new Error(`${e.message}\ntrunk metrics: ${JSON.stringify(m)}`);
    });
    log(`after ${leaver.name}'s hangup: trunk metrics ${JSON.stringify(m)}`);
  }));
