// The client half of the protocol against a real Synapse, without the focus binary: the test plays
// the focus's Matrix side itself (joins the room as the focus user with device WEIRFOCUS and reads
// its /sync) and checks what a stock matrix-js-sdk 43 client in Chromium sends it, against the
// shapes in reference/protocol.md §b.2, §c.1, §c.2 and the wire fixtures.
//
// Run: node --test web/test/   (needs scripts/setup.sh done; no cargo build needed)

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { Harness, PEOPLE, FOCUS_DEVICE_ID, FOCUS_SESSION_ID, CALL_MEMBER_TYPE, waitFor, log } from "./harness.mjs";

let h;
let focusToken;
let since;
let failed = false;

/** One /sync as the focus; returns its to-device events and advances `since`. */
async function focusSync(timeout = 0) {
  const q = new URLSearchParams({ timeout: String(timeout) });
  if (since) q.set("since", since);
  const r = await h.syn.api(focusToken, "GET", `/_matrix/client/v3/sync?${q}`);
  since = r.next_batch;
  return r.to_device?.events ?? [];
}

/** Collect the focus's to-device events until `done(all)` is true. */
async function collectToDevice(what, done, timeoutMs = 30000) {
  const got = [];
  await waitFor(
    what,
    async () => {
      got.push(...(await focusSync(1000)));
      return done(got);
    },
    { timeoutMs, intervalMs: 0 },
  );
  return got;
}

before(async () => {
  h = new Harness({ people: [PEOPLE[0]], withFocus: false });
  try {
    await h.start();
    // play the focus: invited, logged in with the focus device id, joined
    await h.syn.api(h.creator.accessToken, "POST", `/_matrix/client/v3/rooms/${encodeURIComponent(h.roomId)}/invite`, {
      user_id: h.focusUser.userId,
    });
    const login = await h.syn.api(null, "POST", "/_matrix/client/v3/login", {
      type: "m.login.password",
      identifier: { type: "m.id.user", user: h.focusUser.localpart },
      password: h.focusUser.password,
      device_id: FOCUS_DEVICE_ID,
    });
    focusToken = login.access_token;
    assert.equal(login.device_id, FOCUS_DEVICE_ID);
    await h.syn.api(focusToken, "POST", `/_matrix/client/v3/join/${encodeURIComponent(h.roomId)}`, {});
    await focusSync(0); // the token from here on sees only new to-device events
  } catch (e) {
    failed = true;
    throw e;
  }
});

after(async () => {
  if (failed && h) console.log(await h.diagnostics());
  await h?.teardown();
});

async function step(fn) {
  try {
    await fn();
  } catch (e) {
    failed = true;
    throw e;
  }
}

test("client publishes m.call.member and sends a well-formed m.call.invite to the focus", () =>
  step(async () => {
    const alice = h.participants[0];
    const { callId, sessionId } = await h.join(alice);

    // m.call.member, as js-sdk 43 GroupCall writes it, plus m.foci and MSC3898 foci.active
    const member = await h.syn.api(
      focusToken,
      "GET",
      `/_matrix/client/v3/rooms/${encodeURIComponent(h.roomId)}/state/${CALL_MEMBER_TYPE}/${encodeURIComponent(alice.userId)}`,
    );
    assert.equal(member["m.calls"].length, 1);
    const c = member["m.calls"][0];
    assert.equal(c["m.call_id"], h.confId);
    assert.deepEqual(c["m.foci"], [h.focusUser.userId]);
    assert.equal(c["m.devices"].length, 1);
    const d = c["m.devices"][0];
    assert.equal(d.device_id, "ALICEDEV");
    assert.equal(d.session_id, sessionId);
    assert.ok(d.expires_ts > Date.now() + 50 * 60 * 1000, "expires_ts about an hour ahead");
    assert.deepEqual(d.feeds, [{ purpose: "m.usermedia" }]);
    // MSC3898: the focus this device calls (cascading foci discover each other from it)
    assert.deepEqual(d["org.matrix.msc3898.foci.active"], [
      { user_id: h.focusUser.userId, device_id: h.focusInfo.deviceId, session_id: h.focusInfo.sessionId },
    ]);

    const events = await collectToDevice("m.call.invite and candidates ending in {candidate:''} at the focus", (all) =>
      all.some((e) => e.type === "m.call.invite") &&
      all.some((e) => e.type === "m.call.candidates" && e.content.candidates.some((x) => x.candidate === "")),
    );
    for (const e of events) log(`focus got ${e.type} seq=${e.content.seq} from ${e.sender}`);
    const inv = events.find((e) => e.type === "m.call.invite");
    assert.equal(inv.sender, alice.userId);
    const ic = inv.content;
    assert.equal(ic.call_id, callId);
    assert.equal(ic.conf_id, h.confId);
    assert.equal(ic.device_id, "ALICEDEV");
    assert.equal(ic.party_id, "ALICEDEV");
    assert.equal(ic.sender_session_id, sessionId);
    assert.equal(ic.dest_session_id, FOCUS_SESSION_ID);
    assert.equal(ic.invitee, h.focusUser.userId);
    assert.equal(ic.version, "1");
    assert.equal(ic.seq, 0);
    assert.equal(ic.offer.type, "offer");
    assert.match(ic.offer.sdp, /^v=0\r\n/);
    assert.match(ic.offer.sdp, /m=audio /);
    assert.match(ic.offer.sdp, /m=video /);
    const streams = Object.keys(ic.sdp_stream_metadata);
    assert.equal(streams.length, 1);
    assert.equal(ic.sdp_stream_metadata[streams[0]].purpose, "m.usermedia");
    assert.match(ic.offer.sdp, new RegExp(`a=msid:${streams[0]} `), "offer's msid names the metadata stream");
    // the browser must offer a 127.0.0.1 candidate (the focus advertises only 127.0.0.1), in the
    // offer SDP or in trickled candidates
    const cands = [ic.offer.sdp];
    for (const e of events.filter((x) => x.type === "m.call.candidates")) {
      assert.equal(e.content.dest_session_id, FOCUS_SESSION_ID);
      assert.equal(e.content.call_id, callId);
      for (const cand of e.content.candidates) cands.push(cand.candidate);
    }
    assert.ok(cands.some((c) => / 127\.0\.0\.1 \d+ typ host/.test(c)), "a 127.0.0.1 host candidate was signalled");
  }));

test("hangup sends m.call.hangup and removes the device from m.call.member", () =>
  step(async () => {
    const alice = h.participants[0];
    await alice.page.evaluate(() => window.Probe.hangup());
    const events = await collectToDevice("m.call.hangup at the focus", (all) => all.some((e) => e.type === "m.call.hangup"));
    const hu = events.find((e) => e.type === "m.call.hangup");
    assert.equal(hu.content.conf_id, h.confId);
    assert.equal(hu.content.dest_session_id, FOCUS_SESSION_ID);
    const member = await h.syn.api(
      focusToken,
      "GET",
      `/_matrix/client/v3/rooms/${encodeURIComponent(h.roomId)}/state/${CALL_MEMBER_TYPE}/${encodeURIComponent(alice.userId)}`,
    );
    assert.deepEqual(member["m.calls"], []);
  }));
