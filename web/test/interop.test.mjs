// Three stock matrix-js-sdk 43 clients in Chromium (alice red, bob green, carol blue) in one call
// through a real Synapse and the weir focus binary (WEIR_FOCUS_BIN, default target/debug/weir-focus).
//
// Checks (reference/protocol.md §h T01, T02, T04, T06, T15-like rejoin): everyone receives both
// others' audio and video, attributed by the focus's metadata; video keeps decoding and shows the
// owner's colour; media flows over 127.0.0.1; a hangup stops the leaver's media while the others
// keep going; a new call from the same client is received by all; audio/video mute is seen by
// the others. Prints time to first decoded frame per client and the focus's CPU time and RSS.
//
// With WEIR_FOCUS_APPSERVICE=1 the focus runs as an application service (its registration loaded
// by Synapse, events pushed to it), and the same checks must pass; scripts/test.sh runs both.
//
// Run: scripts/in-netns.sh node --test web/test/   (after scripts/setup.sh and cargo build -p weir-focus)
// (plain `node --test web/test/` works too; in-netns.sh makes loopback the only interface)

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { networkInterfaces } from "node:os";
import { Harness, waitFor, log, fmtTable, procStats, stepChain } from "./harness.mjs";
import { everyoneDecodesEveryone, pairReport, trackGrowth } from "./checks.mjs";

let h;
const chain = stepChain();
const step = chain.step;

function onlyLoopback() {
  return Object.values(networkInterfaces())
    .flat()
    .every((i) => i.internal);
}
const report = { firstFrame: {}, focus: {} };

before(async () => {
  h = new Harness();
  try {
    await h.start();
  } catch (e) {
    chain.fail();
    throw e;
  }
});

after(async () => {
  try {
    if (chain.failed && h) console.log(await h.diagnostics());
    printReport();
  } finally {
    await h?.teardown();
  }
});

function printReport() {
  const lines = ["", "===== weir interop measurements ====="];
  if (h?.timings) lines.push(`setup: ${JSON.stringify(h.timings)}`);
  const ff = Object.entries(report.firstFrame);
  if (ff.length) {
    lines.push("time to first decoded video frame (from placing the call):");
    lines.push(
      fmtTable(
        ff.map(([name, r]) => ({ client: name, "first frame ms": r.first, "all remotes ms": r.all, "connected ms": r.connected })),
        ["client", "first frame ms", "all remotes ms", "connected ms"],
      ),
    );
  }
  if (report.focus.window) {
    const f = report.focus;
    lines.push(
      `focus during the 3-client call: ${f.cpuSeconds.toFixed(3)} s CPU over ${f.window.toFixed(1)} s wall ` +
        `(${((100 * f.cpuSeconds) / f.window).toFixed(1)}% of one core), RSS ${f.rssKiB} KiB (peak ${f.hwmKiB} KiB), ` +
        `${f.threads} threads; since start ${f.totalCpu.toFixed(3)} s CPU`,
    );
    if (f.metrics) lines.push(`focus /metrics: ${JSON.stringify(f.metrics)}`);
  }
  if (report.vanishMs) lines.push(`a closed tab's feeds disappeared at the others after ${report.vanishMs} ms`);
  console.log(lines.join("\n"));
}

test("three clients join and each receives both others' audio and video", { timeout: 120000 }, (t) =>
  step(t, async () => {
    for (const p of h.participants) await h.join(p);
    await waitFor(
      "every client to decode video from both others (owners from the focus's metadata)",
      async () => everyoneDecodesEveryone(await h.liveSnapshots()),
      { timeoutMs: 60000, intervalMs: 250 },
    );
    const snaps = await h.snapshots();
    for (const s of snaps) {
      const rec = s.calls[s.calls.length - 1];
      const per = s.feeds.filter((f) => f.firstFrameMs !== null).map((f) => f.firstFrameMs);
      report.firstFrame[s.name] = {
        first: rec.firstFrameMs,
        all: per.length ? Math.max(...per) : null,
        connected: rec.connectedAt ? rec.connectedAt - rec.startedAt : null,
      };
      log(`${s.name}: selected pair ${s.selectedPair?.local} -> ${s.selectedPair?.remote}`);
    }
    if (!onlyLoopback()) {
      log("note: this machine has non-loopback interfaces and Chromium prefers them for its end of the pair; run through scripts/in-netns.sh for loopback-only media");
    }
    for (const s of snaps) {
      // every remote feed carries its real owner and the right purpose
      for (const f of s.feeds) {
        assert.ok(f.owner, `${s.name}: feed ${f.streamId} has no user_id in the focus's metadata`);
        assert.equal(f.purpose, "m.usermedia");
        assert.notEqual(f.owner, s.userId, `${s.name} receives its own stream ${f.streamId}`);
      }
      assert.equal(s.callState, "connected", `${s.name} call state`);
      assert.ok(s.selectedPair, `${s.name}: no selected ICE candidate pair`);
      // The focus is ICE-lite and offers only 127.0.0.1.
      assert.match(s.selectedPair.remote, /^127\.0\.0\.1:/, `${s.name}: media goes to ${s.selectedPair.remote}`);
      // Where loopback is the only interface (scripts/in-netns.sh), our end must be too.
      if (onlyLoopback()) assert.match(s.selectedPair.local, /^127\.0\.0\.1:/, `${s.name}: media from ${s.selectedPair.local}`);
    }
    // As an application service (WEIR_FOCUS_APPSERVICE=1) the room's events (the invite the
    // focus joined by, the call state it authorised these calls against) were pushed to it.
    const m = await h.focus.metricValues([
      "weir_appservice_transactions_total",
      "weir_todevice_seq_gaps_total",
      "weir_sync_requests_total",
      "weir_sync_errors_total",
    ]);
    // Nothing the clients sent the focus went missing (a lost event shows as a seq gap).
    assert.equal(m.weir_todevice_seq_gaps_total, 0, "no to-device event from the clients was lost");
    if (h.appservice) {
      assert.ok(m.weir_appservice_transactions_total > 0, "an appservice focus is pushed transactions");
      // Its to-device-only /sync (the safety net for what the push loses) works.
      assert.ok(m.weir_sync_requests_total > 0 && m.weir_sync_errors_total === 0, `to-device sync: ${JSON.stringify(m)}`);
    }
    else assert.equal(m.weir_appservice_transactions_total, 0, "a syncing focus is pushed nothing");
  }));

test("every to-device event from the focus has the full envelope and no seq", { timeout: 30000 }, (t) =>
  step(t, async () => {
    const focus = h.focusInfo;
    for (const p of h.participants) {
      const evs = (await p.page.evaluate(() => window.Probe.received())).filter((e) => e.sender === focus.userId);
      const types = evs.map((e) => e.type);
      log(`${p.name} received from the focus: ${JSON.stringify(types)}; largest body ${Math.max(...evs.map((e) => e.bodyBytes))} B`);
      assert.ok(types.includes("m.call.answer"), `${p.name}: no m.call.answer`);
      assert.ok(types.includes("m.call.negotiate"), `${p.name}: no m.call.negotiate`);
      for (const e of evs) {
        const where = `${p.name}: ${e.type}`;
        assert.equal(e.version, "1", `${where} version`);
        assert.ok(e.call_id, `${where} call_id`);
        assert.equal(e.party_id, focus.deviceId, `${where} party_id (stable, the focus's device)`);
        assert.equal(e.conf_id, h.confId, `${where} conf_id`);
        assert.equal(e.device_id, focus.deviceId, `${where} device_id`);
        assert.equal(e.sender_session_id, focus.sessionId, `${where} sender_session_id`);
        assert.equal(e.dest_session_id, p.session.sessionId, `${where} dest_session_id`);
        assert.equal(e.hasSeq, false, `${where} carries seq`);
        assert.ok(e.bodyBytes < 60 * 1024, `${where} is ${e.bodyBytes} bytes`);
        if (e.type === "m.call.answer") {
          assert.equal(e.metadata, "stable", `${where}: no sdp_stream_metadata`);
          assert.equal(e.unstableMetadata, true, `${where}: no org.matrix.msc3077.sdp_stream_metadata`);
        }
        if (e.type === "m.call.negotiate" && e.sdpType === "offer") {
          assert.equal(e.metadata, "stable", `${where}: offer without sdp_stream_metadata`);
          assert.equal(e.metadataWithOwner, e.metadataStreams, `${where}: metadata entries without user_id/device_id`);
        }
      }
      const cands = evs.filter((e) => e.type === "m.call.candidates").flatMap((e) => e.candidates);
      if (cands.length) {
        assert.equal(cands[cands.length - 1], "", `${p.name}: the focus's candidates do not end with {candidate:""}`);
        for (const c of cands.filter(Boolean)) assert.match(c, / 127\.0\.0\.1 /, `${p.name}: focus candidate ${c}`);
      }
    }
  }));

test("video keeps decoding, audio keeps arriving, and pixels show the owner's colour", { timeout: 120000 }, (t) =>
  step(t, async () => {
    const colourOf = Object.fromEntries(h.participants.map((p) => [p.userId, p.colour]));
    const t0 = h.focus.pid ? procStats(h.focus.pid) : null;
    const wall0 = Date.now();

    // growth of framesDecoded and audio packets for every (receiver, sender) pair over >= 2 s
    const base = await h.snapshots();
    await waitFor(
      "framesDecoded (+30) and audio packets (+50) to grow for every receiver/sender pair",
      async () => {
        const cur = await h.liveSnapshots();
        if (cur[0].t - base[0].t < 2000) return false;
        const g = trackGrowth(base, cur, h.participants);
        return g.every((x) => x.frames >= 30 && x.audioPackets >= 50) ? g : false;
      },
      { timeoutMs: 30000, intervalMs: 500 },
    );

    let lastLog = 0;
    await waitFor(
      "every received video to show its owner's colour",
      async () => {
        const snaps = await h.liveSnapshots();
        const bad = [];
        for (const s of snaps) {
          for (const f of s.feeds) {
            if (f.colour !== colourOf[f.owner]) bad.push(`${s.name} sees ${f.owner} as ${f.colour} ${JSON.stringify(f.pixel)}`);
          }
          if (s.feeds.length !== 2) bad.push(`${s.name} has ${s.feeds.length} feeds`);
        }
        if (bad.length && Date.now() - lastLog > 3000) {
          lastLog = Date.now();
          log(`colour check pending: ${bad.join("; ")}`);
        }
        return bad.length === 0;
      },
      { timeoutMs: 20000, intervalMs: 500 },
    );

    // measure the focus for a few more seconds of steady 3-party media
    await waitFor("a 5 s measurement window", async () => Date.now() - wall0 >= 5000, { timeoutMs: 10000, intervalMs: 250 });
    const t1 = h.focus.pid ? procStats(h.focus.pid) : null;
    if (h.focus.pid) assert.ok(t0 && t1, "focus /proc stats readable");
    if (t0 && t1) report.focus = {
      window: (t1.t - t0.t) / 1000,
      cpuSeconds: t1.cpuSeconds - t0.cpuSeconds,
      totalCpu: t1.cpuSeconds,
      rssKiB: t1.rssKiB,
      hwmKiB: t1.hwmKiB,
      threads: t1.threads,
      metrics: await h.focus
        .metricValues(["process_cpu_seconds_total", "process_resident_memory_bytes", "weir_participants"])
        .catch(() => null),
    };
    const snaps = await h.snapshots();
    console.log(pairReport(snaps, h.participants, colourOf));
  }));

test("a hangup stops the leaver's media; the other two keep decoding each other", { timeout: 120000 }, (t) =>
  step(t, async () => {
    const bob = h.byName("bob");
    const stay = h.participants.filter((p) => p !== bob);
    await bob.page.evaluate(() => window.Probe.hangup());
    const bobSnap = await bob.snapshot();
    assert.equal(bobSnap.callState, "ended");

    let prev = await h.snapshots();
    let lastLog = 0;
    await waitFor(
      "alice and carol to stop receiving bob (feed removed, or no new frames) while still decoding each other",
      async () => {
        const cur = await h.liveSnapshots(stay.map((p) => p.name));
        if (cur[0].t - prev[0].t < 1500) return false;
        const g = trackGrowth(prev, cur, h.participants);
        prev = cur;
        const stayPairs = g.filter((x) => x.receiver !== "bob" && x.sender !== "bob");
        const fromBob = g.filter((x) => x.receiver !== "bob" && x.sender === "bob");
        const okStay = stayPairs.length === 2 && stayPairs.every((x) => x.frames >= 10);
        const okBob = stay.every((p) => !fromBob.some((x) => x.receiver === p.name && x.frames > 0));
        if (!(okStay && okBob) && Date.now() - lastLog > 3000) {
          lastLog = Date.now();
          log(`hangup check pending: ${JSON.stringify(g)}`);
        }
        return okStay && okBob;
      },
      { timeoutMs: 30000, intervalMs: 500 },
    );
    const snaps = await h.snapshots();
    for (const s of snaps.filter((x) => x.name !== "bob")) {
      const bobFeeds = s.feeds.filter((f) => f.owner === bob.userId);
      log(`${s.name}: after bob's hangup ${bobFeeds.length} bob feed(s) remain; transceivers ${JSON.stringify(s.transceivers)}`);
    }
  }));

test("the leaver calls again (new call) and all three decode each other again", { timeout: 120000 }, (t) =>
  step(t, async () => {
    const bob = h.byName("bob");
    await h.join(bob);
    await waitFor(
      "every client to decode video from both others after bob's new call",
      async () => everyoneDecodesEveryone(await h.liveSnapshots()),
      { timeoutMs: 60000, intervalMs: 250 },
    );
    const base = await h.snapshots();
    await waitFor(
      "framesDecoded to grow for every pair after the rejoin",
      async () => {
        const cur = await h.liveSnapshots();
        if (cur[0].t - base[0].t < 1500) return false;
        const g = trackGrowth(base, cur, h.participants);
        return g.every((x) => x.frames >= 15) ? g : false;
      },
      { timeoutMs: 30000, intervalMs: 500 },
    );
    const s = await bob.snapshot();
    log(`bob's second call ${s.callId}: first frame after ${s.calls[s.calls.length - 1].firstFrameMs} ms`);
    report.firstFrame["bob (rejoin)"] = { first: s.calls[s.calls.length - 1].firstFrameMs, all: null, connected: null };
  }));

test("audio and video mute are seen by the others", { timeout: 120000 }, (t) =>
  step(t, async () => {
    const carol = h.byName("carol");
    const muteSeen = async (what, audio, video) =>
      waitFor(
        what,
        async () => {
          const snaps = (await h.liveSnapshots()).filter((s) => s.name !== "carol");
          return snaps.every((s) => {
            const f = s.feeds.filter((x) => x.owner === carol.userId);
            return f.length > 0 && f.every((x) => x.audioMuted === audio && x.videoMuted === video);
          });
        },
        { timeoutMs: 20000, intervalMs: 250 },
      );

    let r = await carol.page.evaluate(() => window.Probe.setMuted({ audio: true }));
    assert.deepEqual(r, { audioMuted: true, videoMuted: false });
    await muteSeen("alice and bob to see carol audio-muted", true, false);

    r = await carol.page.evaluate(() => window.Probe.setMuted({ video: true }));
    assert.deepEqual(r, { audioMuted: true, videoMuted: true });
    await muteSeen("alice and bob to see carol audio- and video-muted", true, true);

    r = await carol.page.evaluate(() => window.Probe.setMuted({ audio: false, video: false }));
    assert.deepEqual(r, { audioMuted: false, videoMuted: false });
    await muteSeen("alice and bob to see carol unmuted", false, false);

    // after unmuting, carol's (blue) video decodes again at the others
    const base = await h.snapshots();
    await waitFor(
      "carol's video to decode again, blue, at alice and bob",
      async () => {
        const cur = await h.liveSnapshots();
        if (cur[0].t - base[0].t < 1500) return false;
        const g = trackGrowth(base, cur, h.participants).filter((x) => x.sender === "carol");
        const colours = cur
          .filter((s) => s.name !== "carol")
          .flatMap((s) => s.feeds.filter((f) => f.owner === carol.userId).map((f) => f.colour));
        return g.length === 2 && g.every((x) => x.frames >= 10) && colours.includes("blue");
      },
      { timeoutMs: 30000, intervalMs: 500 },
    );
  }));

test("a client that vanishes without hanging up is removed for the others", { timeout: 120000 }, (t) =>
  step(t, async () => {
    const carol = h.byName("carol");
    const stay = h.participants.filter((p) => p !== carol);
    const t0 = Date.now();
    // the tab dies: no m.call.hangup, no m.call.member update; only ICE/DTLS/RTP stop
    await carol.context.close();
    h.participants = stay;
    await waitFor(
      "alice and bob to lose carol's feeds (the focus must notice the dead leg and renegotiate)",
      async () => {
        const snaps = await h.liveSnapshots();
        return snaps.every((s) => !s.feeds.some((f) => f.owner === carol.userId));
      },
      { timeoutMs: 60000, intervalMs: 500 },
    );
    const ms = Date.now() - t0;
    log(`carol's feeds were gone at alice and bob ${ms} ms after her tab closed`);
    report.vanishMs = ms;
    const m = await h.focus.metricValues(["weir_participants"]);
    log(`focus weir_participants after carol vanished: ${m.weir_participants}`);
  }));
