// A real 3-participant call (alice red, bob green, carol blue, in headless Chromium with stock
// matrix-js-sdk 43) through a throw-away Synapse and the weir focus, for about 20 seconds, then a
// table of what each participant received from each other one. Exit 0 when everyone received
// everyone (video frames decoded in the window, the owner's colour on screen, audio packets).
//
//   node web/tools/demo.mjs            (scripts/demo.sh runs setup and the cargo build first)
//
// Environment: WEIR_DEMO_SECONDS (default 20), WEIR_FOCUS_BIN (default target/debug/weir-focus),
// WEIR_KEEP_TMP=1 (keep the work dir with the Synapse and focus logs).

import { Harness, waitFor, log, procStats, fmtTable } from "../test/harness.mjs";
import { everyoneDecodesEveryone, pairReport, trackGrowth } from "../test/checks.mjs";

const seconds = Number(process.env.WEIR_DEMO_SECONDS ?? 20);
const h = new Harness();
let ok = false;

const onSignal = async (sig) => {
  log(`${sig}: tearing down`);
  await h.teardown();
  process.exit(130);
};
process.once("SIGINT", onSignal);
process.once("SIGTERM", onSignal);

try {
  await h.start();
  log(`focus: ${h.focus.bin}`);
  for (const p of h.participants) await h.join(p);

  log("waiting for everyone to decode everyone ...");
  await waitFor("every client to decode video from both others", async () => everyoneDecodesEveryone(await h.snapshots()), {
    timeoutMs: 60000,
    intervalMs: 250,
  });

  const start = await h.snapshots();
  const cpu0 = h.focus.pid ? procStats(h.focus.pid) : null;
  log(`everyone connected; recording for ${seconds} s ...`);
  let peakRss = cpu0?.rssKiB ?? null;
  await waitFor(
    `${seconds} s of call`,
    async () => {
      const s = h.focus.pid ? procStats(h.focus.pid) : null;
      if (s?.rssKiB && s.rssKiB > (peakRss ?? 0)) peakRss = s.rssKiB;
      return Date.now() - start[0].t >= seconds * 1000;
    },
    { timeoutMs: seconds * 1000 + 10000, intervalMs: 500 },
  );
  const end = await h.snapshots();
  const cpu1 = h.focus.pid ? procStats(h.focus.pid) : null;

  const colourOf = Object.fromEntries(h.participants.map((p) => [p.userId, p.colour]));
  console.log(`\nWhat each participant received (last ${seconds} s; fps over that window):\n`);
  console.log(pairReport(end, h.participants, colourOf, { windowStart: start }));

  const growth = trackGrowth(start, end, h.participants);
  const colourOk = end.every(
    (s) => s.feeds.length > 0 && h.participants.every((p) => p.userId === s.userId || s.feeds.some((f) => f.owner === p.userId && f.colour === p.colour)),
  );
  const minFrames = Math.max(1, Math.floor(seconds * 5)); // at least 5 fps average
  const flowing = growth.every((g) => g.frames >= minFrames && g.audioPackets > seconds * 10);

  console.log("\nPer pair over the window:\n");
  console.log(
    fmtTable(
      growth.map((g) => ({
        receiver: g.receiver,
        sender: g.sender,
        "new frames": g.frames,
        "new audio pkts": g.audioPackets,
        ok: g.frames >= minFrames && g.audioPackets > seconds * 10 ? "OK" : "NO",
      })),
      ["receiver", "sender", "new frames", "new audio pkts", "ok"],
    ),
  );

  console.log("\nTime to first decoded video frame (from placing the call):");
  for (const s of end) {
    const rec = s.calls[s.calls.length - 1];
    console.log(`  ${s.name.padEnd(6)} ${rec.firstFrameMs} ms (ICE/DTLS connected after ${rec.connectedAt ? rec.connectedAt - rec.startedAt : "?"} ms)`);
  }
  if (cpu0 && cpu1) {
    const wall = (cpu1.t - cpu0.t) / 1000;
    const cpu = cpu1.cpuSeconds - cpu0.cpuSeconds;
    console.log(
      `\nFocus (pid ${h.focus.pid}) over the window: ${cpu.toFixed(2)} s CPU in ${wall.toFixed(1)} s ` +
        `= ${((100 * cpu) / wall).toFixed(1)}% of one core; RSS ${cpu1.rssKiB} KiB (peak seen ${peakRss} KiB, VmHWM ${cpu1.hwmKiB} KiB); ${cpu1.threads} threads`,
    );
    const m = await h.focus.metricValues(["weir_participants", "process_cpu_seconds_total", "process_resident_memory_bytes"]);
    console.log(`Focus /metrics: ${JSON.stringify(m)}`);
  }

  ok = colourOk && flowing;
  console.log(
    ok
      ? "\nRESULT: OK: every participant received every other participant's video (right colour) and audio."
      : `\nRESULT: FAILED: ${!flowing ? "some media stopped or never flowed" : ""}${!flowing && !colourOk ? "; " : ""}${!colourOk ? "some picture has the wrong colour" : ""}.`,
  );
} catch (e) {
  console.error(`\nRESULT: FAILED: ${e.stack ?? e}`);
  console.error(await h.diagnostics().catch((d) => `(diagnostics failed: ${d})`));
} finally {
  await h.teardown();
}
process.exit(ok ? 0 : 1);
