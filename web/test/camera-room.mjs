// The room the video tests share: Alice with a 1280×720 camera (Chromium's fake capture
// device playing a y4m clip in her green), Bob and Carol, through a real Synapse and the weir
// focus binary; and how to watch Alice's video at the others.

import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { before, after } from "node:test";
import { Harness, waitFor, stepChain } from "./harness.mjs";
import { writeY4m, WIDTH, HEIGHT } from "./y4m.mjs";

export class CameraRoom {
  constructor() {
    /** @type {Harness|null} */
    this.h = null;
    this.dir = null;
  }

  /** Write the clip, start Synapse, the focus and three browsers; returns the harness. */
  async start() {
    this.dir = mkdtempSync(join(tmpdir(), "weir-y4m-"));
    const clip = join(this.dir, "camera.y4m");
    writeY4m(clip, [20, 200, 20]);
    this.h = new Harness({
      people: [
        { name: "alice", colour: "green", camera: { device: true, width: WIDTH, height: HEIGHT } },
        { name: "bob", colour: "red" },
        { name: "carol", colour: "blue" },
      ],
      chromiumArgs: [`--use-file-for-fake-video-capture=${clip}`],
    });
    await this.h.start();
    return this.h;
  }

  /** Print diagnostics if a step failed and the measurements under `title`, then tear down. */
  async stop(chain, title, report) {
    try {
      if (chain.failed && this.h) console.log(await this.h.diagnostics());
      console.log(`\n===== ${title} =====\n${JSON.stringify(report, null, 1)}`);
    } finally {
      await this.h?.teardown();
      if (this.dir) rmSync(this.dir, { recursive: true, force: true });
    }
  }

  /** Alice's video as `who` receives it: {frameWidth, framesDecoded, colour, codec}, or null. */
  async aliceAt(who) {
    const h = this.h;
    const alice = h.byName("alice").session.userId;
    const snaps = await h.liveSnapshots();
    const snap = snaps.find((s) => s.name === who);
    const feed = snap.feeds.find((f) => f.owner === alice);
    if (!feed?.video) return null;
    return {
      frameWidth: feed.video.frameWidth,
      framesDecoded: feed.video.framesDecoded,
      colour: feed.colour,
      codec: feed.video.codec,
    };
  }

  /**
   * Wait until `who` decodes Alice's video at a width `fits` accepts, in her green, with frames
   * still coming (two reads, the second with more frames decoded).
   */
  async decodes(who, what, fits, timeoutMs = 30000) {
    let before = null;
    return waitFor(
      `${who} decoding Alice ${what}`,
      async () => {
        const a = await this.aliceAt(who);
        if (!a?.frameWidth || !fits(a.frameWidth) || a.colour !== "green") {
          before = null;
          return null;
        }
        if (before === null || a.framesDecoded <= before) {
          before = before ?? a.framesDecoded;
          return null;
        }
        return a;
      },
      { timeoutMs, intervalMs: 200 },
    );
  }

  /**
   * Alice (with `aliceOptions` for her WeirCall), Bob and Carol join; returns once each has its
   * data channel to the focus and Bob and Carol have Alice's feed.
   */
  async joinAll(aliceOptions) {
    const h = this.h;
    await h.join(h.byName("alice"), 30000, { options: aliceOptions });
    await h.join(h.byName("bob"));
    await h.join(h.byName("carol"));
    for (const who of ["alice", "bob", "carol"]) {
      await waitFor(`${who}'s data channel to the focus`, () => h.byName(who).eval(() => window.Probe.channelOpen()), {
        timeoutMs: 30000,
      });
    }
    await waitFor(
      "Alice's feed with its track ids at Bob and Carol",
      async () => (await this.aliceAt("bob")) && (await this.aliceAt("carol")),
      { timeoutMs: 30000 },
    );
  }

  /** Subscribe `who` to Alice's video in a tile `height` lines tall (MSC3898). */
  async subscribe(who, height) {
    const alice = this.h.byName("alice").session.userId;
    await this.h.byName(who).eval((a) => window.Probe.subscribeTo(a), { owner: alice, height });
  }

  /**
   * The `rtx-time` values in `who`'s current local description: Chromium copies them from the
   * focus's offer into its answer, and waits three times that for a decodable frame before it
   * asks for a keyframe (docs/adaptation.md).
   */
  async rtxTimes(who) {
    const sdp = (await this.h.byName(who).eval(() => window.Probe.descriptions())).local ?? "";
    return [...new Set([...sdp.matchAll(/rtx-time=(\d+)/g)].map((m) => Number(m[1])))];
  }

  /** The UDP port of `who`'s side of its connection to the focus (for shaping). */
  async localPort(who) {
    const local = (await this.h.byName(who).snapshot()).selectedPair?.local ?? "";
    const port = Number(/:(\d+)\/udp/.exec(local)?.[1]);
    if (!(port > 0)) throw new Error(`${who}'s local candidate has no UDP port: ${local}`);
    return port;
  }

  /** The helpers above as plain functions, for tests that read as a story. */
  helpers() {
    return {
      aliceAt: (who) => this.aliceAt(who),
      rtxTimes: (who) => this.rtxTimes(who),
      decodesAt: (who, width, timeoutMs) => this.decodes(who, `at ${width} px wide`, (w) => w === width, timeoutMs),
      decodesBelow: (who, width, timeoutMs) => this.decodes(who, `below ${width} px wide`, (w) => w < width, timeoutMs),
      subscribe: (who, height) => this.subscribe(who, height),
    };
  }
}

/**
 * A test file's room: started before its first test and stopped after its last, printing
 * `report` under `title`. Returns the room, the step runner (a failed step skips the rest),
 * the report to fill and the room's helpers.
 */
export function cameraRoomTest(title) {
  const room = new CameraRoom();
  const chain = stepChain();
  const report = {};
  before(async () => {
    try {
      await room.start();
    } catch (e) {
      chain.fail();
      throw e;
    }
  });
  after(() => room.stop(chain, title, report));
  return { room, step: chain.step, report, ...room.helpers() };
}
