// Scalable video (SVC) in Chromium, through a real Synapse and the weir focus binary: the story
// web/test/svc-vp9.test.mjs and svc-av1.test.mjs tell, each with its codec and mode.
//
// Alice publishes her 1280×720 camera (Chromium's fake capture device, playing a y4m clip) as
// one stream with three spatial and three temporal layers: 320×180, 640×360 and 1280×720 in
// one SSRC, described by the dependency descriptor header extension (before anyone
// subscribes, their grid tiles need only two layers, and dynacast may stop her third). Bob
// shows her in a
// 180-line tile and Carol in a 720-line one: the focus forwards each only the frames of the
// spatial layer that fits, and each decodes that size (frameWidth in its inbound stats), in
// Alice's colour, in that codec. Carol's tile shrinks to 360 lines and she decodes the middle
// layer (within key-frame SVC, `L3T3_KEY`, after a keyframe the focus asks for; within full
// SVC, `L3T3`, at once). With nobody watching the full layer, the focus tells Alice to encode
// two spatial layers (dynacast) and her encoder stops producing the 1280-pixel one; Carol's
// tile grows again, Alice encodes three, and Carol gets the full one back. Last, Carol's
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
  // The mode with two spatial layers that dynacast asks for when nobody needs the third.
  const FEWER = MODE.replace(/^L3/, "L2");
  const { room, step, report, aliceAt, decodesAt, decodesBelow, subscribe, rtxTimes } = cameraRoomTest(`svc measurements (${CODEC} ${MODE})`);
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
        `Alice sending ${CODEC}`,
        async () => {
          const v = (await h.byName("alice").snapshot()).outbound.video;
          return v?.frameWidth && v?.scalabilityMode ? v : null;
        },
        { timeoutMs: 30000, intervalMs: 250 },
      );
      report.published = { codec: sent.codec, scalabilityMode: sent.scalabilityMode, frameWidth: sent.frameWidth };
      assert.equal(sent.codec, CODEC, "the focus answers with the codec Alice put first");
      // Until someone subscribes, Bob and Carol show her in a grid tile that needs no more
      // than the middle layer, so the focus may already have told her to encode two (dynacast).
      // (Its frameWidth is the top layer Chromium encodes now, which it may lower itself when
      // the CPU or its uplink is short: the mode is what weir-call set.)
      assert.ok([MODE, FEWER].includes(sent.scalabilityMode), `Alice sends ${sent.scalabilityMode}`);
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

  test("Carol's tile shrinks to 360 lines: she moves down to the middle layer; nobody watching the full layer, Alice stops encoding it; Carol's tile grows and she gets it back", async (t) => {
    await step(t, async () => {
      const alice = h.byName("alice");
      const sending = async () => (await alice.snapshot()).outbound.video;
      const shrunk = Date.now();
      await subscribe("carol", 360);
      await decodesAt("carol", 640);
      report.carolDownToS1Ms = Date.now() - shrunk;
      // Dynacast: once nobody has needed the full layer for 3 s (LAYER_OFF_DELAY), the focus
      // tells Alice to encode two spatial layers, and weir-call asks Chromium for them.
      // (Chromium may drop its top layer on its own when short of CPU or uplink: in one CI
      // run her frameWidth was 640 under `L3T3` before the focus had said anything. The mode
      // is what weir-call sets when told.)
      // The stats may say the new mode while the last frame encoded before it still reports
      // its width (a CI run read 1280 px under the new mode): wait for both.
      const fewer = await waitFor(
        `Alice encoding ${FEWER} with a top layer of at most ${WIDTH / 2} px`,
        async () => {
          const v = await sending();
          return v?.scalabilityMode === FEWER && v.frameWidth <= WIDTH / 2 ? v : null;
        },
        { timeoutMs: 20000, intervalMs: 250 },
      );
      report.aliceTwoLayersMs = Date.now() - shrunk;
      report.aliceTopWidth = fewer.frameWidth;
      // Carol and Bob keep their layers in the new structure: its top layer is the middle
      // one of before, not a new full one.
      const carolThen = (await aliceAt("carol"))?.framesDecoded ?? 0;
      await waitFor(
        "Carol decoding 30 more frames",
        async () => ((await aliceAt("carol"))?.framesDecoded ?? 0) >= carolThen + 30,
        { timeoutMs: 20000 },
      );
      // (Once, in the first of six local VP9 runs, Carol was on 320 px at this point: perhaps
      // allocation moved her down on the new structure's keyframe burst; that run had no debug
      // log. So she may climb back; counted from the top she would stay on 320.)
      report.carolAfterFewerLayers = (await aliceAt("carol"))?.frameWidth;
      await decodesAt("carol", 640, CLIMB_TIMEOUT_MS);
      assert.equal((await aliceAt("bob"))?.frameWidth, 320, "Bob on the small layer");
      // What Alice's uplink carries with three layers and with two (printed, not asserted).
      const rate = async () => {
        const a = await sending();
        await new Promise((r) => setTimeout(r, 2000));
        const b = await sending();
        return Math.round(((b.bytesSent - a.bytesSent) * 8) / 2000);
      };
      report.aliceUplinkKbps = { twoLayers: await rate() };
      const grown = Date.now();
      await subscribe("carol", 720);
      await waitFor(
        `Alice encoding ${MODE} again`,
        async () => ((await sending())?.scalabilityMode === MODE ? true : null),
        { timeoutMs: 20000, intervalMs: 250 },
      );
      report.aliceThreeLayersMs = Date.now() - grown;
      // Carol's 1280 px can only come from Alice's full layer, encoded again.
      await decodesAt("carol", 1280, CLIMB_TIMEOUT_MS);
      report.carolBackOnS2Ms = Date.now() - grown;
      report.aliceUplinkKbps.threeLayersAfter = await rate();
      assert.equal((await aliceAt("bob"))?.frameWidth, 320, "Bob kept his layer");
      log(
        `Carol down to S1 after ${report.carolDownToS1Ms} ms; Alice on two layers ${report.aliceTwoLayersMs} ms ` +
          `after the shrink, on three ${report.aliceThreeLayersMs} ms after the growth; Carol back on S2 after ` +
          `${report.carolBackOnS2Ms} ms; uplink ${JSON.stringify(report.aliceUplinkKbps)}`,
      );
    });
  });

  test("Carol's downlink cut to 500 kbit/s: she moves to a lower spatial layer, and back to the full one when lifted", async (t) => {
    if (!inOwnNetns(t)) return;
    await step(t, async () => {
      const carol = h.byName("carol");
      const alice = h.byName("alice").session.userId;
      const port = await room.localPort("carol");
      await carol.eval((o) => window.Probe.watchFrames({ owner: o }), alice);
      const STALE = "weir_stale_queues_dropped_total";
      const staleBefore = (await h.focus.metricValues([STALE]))[STALE];
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
        // How long Chromium waits for a decodable frame: three times this.
        rtxTime: await rtxTimes("carol"),
        // Stale send queues dropped at a move down, before the keyframe asked for then (shard/send_queue.rs).
        staleQueuesDropped: (await h.focus.metricValues([STALE]))[STALE] - staleBefore,
      };
      assert.deepEqual(report.narrowed.rtxTime, [300], "Carol's answer carries the focus's rtx-time");
      log(`narrow link: ${JSON.stringify(report.narrowed)}`);
      liftLimit();
      const lifted = Date.now();
      await decodesAt("carol", 1280, CLIMB_TIMEOUT_MS);
      report.widened = { fullLayerAfterMs: Date.now() - lifted };
      log(`link lifted: full layer again after ${report.widened.fullLayerAfterMs} ms`);
    });
  });
}
