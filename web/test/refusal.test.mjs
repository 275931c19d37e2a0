// The focus refuses an invite it cannot authorise (reference/protocol.md §b.4, §h T20): here the
// client places the call without publishing its m.call.member device entry. A stock js-sdk 43
// client must then see its call end promptly, and no media may flow. (js-sdk ignores an
// m.call.hangup whose party_id it has not chosen yet, i.e. before an answer; it honours
// m.call.reject in the invite_sent state.)
//
// Run: scripts/in-netns.sh node --test web/test/   (after scripts/setup.sh and cargo build -p weir-focus)

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { Harness, PEOPLE, waitFor, log } from "./harness.mjs";

let h;
let failed = false;

before(async () => {
  h = new Harness({ people: [PEOPLE[0]] });
  try {
    await h.start();
  } catch (e) {
    failed = true;
    throw e;
  }
});

after(async () => {
  try {
    if (failed && h) console.log(await h.diagnostics());
  } finally {
    await h?.teardown();
  }
});

test("an invite without an m.call.member entry is refused and the client's call ends promptly", { timeout: 60000 }, async () => {
  try {
    const alice = h.participants[0];
    const t0 = Date.now();
    await h.join(alice, 30000, { publishMember: false });
    const s = await waitFor(
      "alice's call to end after the focus refuses it (js-sdk's own invite timeout would take 60 s)",
      async () => {
        const snap = await alice.snapshot();
        return snap.ended ? snap : false;
      },
      { timeoutMs: 20000, intervalMs: 250 },
    );
    const rec = s.calls[s.calls.length - 1];
    log(`alice's call ended after ${Date.now() - t0} ms: reason ${rec.hangupReason}, party ${rec.hangupParty}`);
    assert.equal(rec.hangupParty, "remote", "the focus ended the call, not the client");
    assert.equal(rec.connectedAt, null, "no media connection was made");
    assert.equal(s.feeds.length, 0);
  } catch (e) {
    failed = true;
    throw e;
  }
});
