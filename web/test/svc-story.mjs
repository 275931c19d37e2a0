// Scalable video (SVC) in Chromium, through a real Synapse and the weir focus binary: the story
// web/test/svc-vp9.test.mjs and svc-av1.test.mjs tell, each with its codec and mode.
//
// Alice publishes her 1280×720 camera (Chromium's fake capture device, playing a y4m clip) as
// one stream with three spatial and three temporal layers: 320×180, 640×360 and 1280×720 in
// one SSRC, described by the dependency descriptor header extension. Bob shows her in a
// 180-line tile and Carol in a 720-line one: the focus forwards each only the frames of the
// spatial layer that fits, and each decodes that size (frameWidth in its inbound stats), in
// Alice's colour, in that codec. Carol's tile shrinks to 360 lines and she decodes the middle
// layer (within key-frame SVC, `L3T3_KEY`, after a keyframe the focus asks for; within full
// SVC, `L3T3`, at once); her tile grows again and she gets the full one back. Last, Carol's
// downlink is cut to 500 kbit/s (tc in the test's own network namespace): bandwidth
// allocation moves her to a lower spatial layer, and back to the full one when the limit is
// lifted.

import { test, before } from "node:test";
import assert from "node:assert/strict";
import { waitFor, log } from "./harness.mjs";
import { cameraRoomTest } from "./camera-room.mjs";
import { WIDTH } from "./y4m.mjs";
import { limitDownlink, liftLimit, liftIfLimited, inOwnNetns } from "./shaping.mjs";

/**
 * How long Carol may take to climb to the full layer: as fast as her estimate grows (1.2-4.3 s
 * in quiet local runs), but with a fuzzer building on the same 2 cores, two runs of five took
 * over 30 s. The bound is for a climb that never comes.
 */
const CLIMB_TIMEOUT_MS = 60000;

/** Register the story's steps for Alice sending `codec` (a MIME type) in `mode`. */
export function svcStory({ codec: CODEC, mode: MODE }) {
  const { room, step, report, aliceAt, decodesAt, decodesBelow, subscribe } = cameraRoomTest(`svc measurements (${CODEC} ${MODE})`);
  let h;
  before(() => {
    h = room.h;
  });

  const skipped = async () =>
    (await h.focus.metricValues(["weir_svc_skipped_packets_total"])).weir_svc_skipped_packets_total ?? 0;

  test(`Alice publishes ${CODEC} ${MODE}; Bob and Carol join with a data channel to the focus`, async (t) => {
    await step(t, async () => {
      await room.joinAll({
        videoCodec: CODEC,
        simulcast: [{ scalabilityMode: MODE }],
        degradationPreference: "maintain-resolution",
      });
      const sent = await waitFor(
        `Alice sending ${CODEC} at ${WIDTH} px`,
        async () => {
          const v = (await h.byName("alice").snapshot()).outbound.video;
          return v?.frameWidth === WIDTH ? v : null;
        },
        { timeoutMs: 30000, intervalMs: 500 },
      );
      report.published = { codec: sent.codec, scalabilityMode: sent.scalabilityMode, frameWidth: sent.frameWidth };
      assert.equal(sent.codec, CODEC, "the focus answers with the codec Alice put first");
      assert.equal(sent.scalabilityMode, MODE);
    });
  });

  test("a 180-line tile decodes the small spatial layer and a 720-line one the full layer", async (t) => {
    await step(t, async () => {
      const t0 = Date.now();
      const skippedBefore = await skipped();
      await subscribe("bob", 180);
      await subscribe("carol", 720);
      const bob = await decodesAt("bob", 320);
      report.bobOnS0Ms = Date.now() - t0;
      const carol = await decodesAt("carol", 1280, CLIMB_TIMEOUT_MS);
      report.carolOnS2Ms = Date.now() - t0;
      assert.equal(bob.codec, CODEC);
      assert.equal(carol.codec, CODEC);
      report.skippedPackets = (await skipped()) - skippedBefore;
      assert.ok(report.skippedPackets > 0, "the focus left out the layers above Bob's");
      log(`Bob on S0 after ${report.bobOnS0Ms} ms, Carol on S2 after ${report.carolOnS2Ms} ms`);
    });
  });

  test("Carol's tile shrinks to 360 lines: she moves down to the middle layer, and back up when it grows", async (t) => {
    await step(t, async () => {
      const shrunk = Date.now();
      await subscribe("carol", 360);
      await decodesAt("carol", 640);
      report.carolDownToS1Ms = Date.now() - shrunk;
      const grown = Date.now();
      await subscribe("carol", 720);
      await decodesAt("carol", 1280, CLIMB_TIMEOUT_MS);
      report.carolBackOnS2Ms = Date.now() - grown;
      assert.equal((await aliceAt("bob"))?.frameWidth, 320, "Bob kept his layer");
      log(`Carol down to S1 after ${report.carolDownToS1Ms} ms, back on S2 after ${report.carolBackOnS2Ms} ms`);
    });
  });

  test("Carol's downlink cut to 500 kbit/s: she moves to a lower spatial layer, and back to the full one when lifted", async (t) => {
    if (!inOwnNetns(t)) return;
    await step(t, async () => {
      const carol = h.byName("carol");
      const alice = h.byName("alice").session.userId;
      const port = await room.localPort("carol");
      await carol.eval((o) => window.Probe.watchFrames({ owner: o }), alice);
      limitDownlink(port, 500);
      t.after(liftIfLimited);
      const cut = Date.now();
      const low = await decodesBelow("carol", 1280, 20000);
      const moved = await carol.eval((o) => window.Probe.frameWatch(o), alice);
      report.narrowed = {
        lowerLayerAfterMs: Date.now() - cut,
        width: low.frameWidth,
        // Printed, not asserted: issue 8's 1 s is not met for simulcast either
        // (docs/adaptation.md).
        transitionFreezeMs: moved.maxGapMs,
      };
      log(`narrow link: ${JSON.stringify(report.narrowed)}`);
      liftLimit();
      const lifted = Date.now();
      await decodesAt("carol", 1280, CLIMB_TIMEOUT_MS);
      report.widened = { fullLayerAfterMs: Date.now() - lifted };
      log(`link lifted: full layer again after ${report.widened.fullLayerAfterMs} ms`);
    });
  });
}
