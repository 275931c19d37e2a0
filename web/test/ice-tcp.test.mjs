// A network that lets no UDP through, like a corporate firewall that only opens TCP: the
// test's own network namespace drops every UDP datagram (an nftables rule, removed at the end).
// The focus runs with `media.tcp_port` set, so it announces a passive ICE-TCP candidate beside
// its UDP one. Three stock matrix-js-sdk clients in Chromium (alice red, bob green, carol blue)
// call it through Synapse: their UDP checks are dropped, their TCP connections get through, and
// everyone decodes everyone in the sender's colour, with video and audio that keep coming. The
// pair each browser selected is TCP to the focus's TCP port, the focus holds three ICE-TCP
// connections (`weir_ice_tcp_connections`), and the rule's counter shows UDP was tried and
// dropped.
//
// Run: scripts/in-netns.sh node --test web/test/ice-tcp.test.mjs (after scripts/setup.sh and
// cargo build -p weir-focus). Outside a network namespace of its own it skips: it would block
// the machine's UDP.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { Harness, waitFor, log, freePort, stepChain } from "./harness.mjs";
import { everyoneDecodesEveryone, pairReport, trackGrowth } from "./checks.mjs";

const TABLE = "weir_no_udp";
const inNetns = process.env.WEIR_IN_NETNS === "1";

let h;
let tcpPort;
const chain = stepChain();
const step = chain.step;

function nft(...args) {
  const r = spawnSync("nft", args, { encoding: "utf8", timeout: 10000 });
  if (r.status !== 0) throw new Error(`nft ${args.join(" ")} failed (${r.status}): ${r.stderr}`);
  return r.stdout;
}

/** Drop every UDP datagram sent in this namespace (loopback included), counting them. */
function blockUdp() {
  nft("add", "table", "inet", TABLE);
  nft("add", "chain", "inet", TABLE, "out", "{ type filter hook output priority 0; policy accept; }");
  nft("add", "rule", "inet", TABLE, "out", "meta", "l4proto", "udp", "counter", "drop");
}

function unblockUdp() {
  try {
    nft("delete", "table", "inet", TABLE);
  } catch {
    // never made
  }
}

/** UDP datagrams the rule dropped so far. */
function udpDropped() {
  const m = nft("list", "table", "inet", TABLE).match(/counter packets (\d+)/);
  return m ? Number(m[1]) : null;
}

before(async () => {
  if (!inNetns) return;
  tcpPort = await freePort();
  blockUdp();
  h = new Harness({ focusMedia: [`tcp_port = ${tcpPort}`] });
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
  } finally {
    await h?.teardown();
    if (inNetns) unblockUdp();
  }
});

test("with UDP blocked, three clients call the focus over ICE-TCP and decode each other", { timeout: 120000 }, (t) => {
  if (!inNetns) return t.skip("blocks UDP, so it runs only in its own network namespace (scripts/in-netns.sh)");
  return step(t, async () => {
    for (const p of h.participants) await h.join(p);
    await waitFor(
      "every client to decode video from both others",
      async () => everyoneDecodesEveryone(await h.liveSnapshots()),
      { timeoutMs: 60000, intervalMs: 250 },
    );
    const snaps = await h.snapshots();
    for (const s of snaps) {
      log(`${s.name}: selected pair ${s.selectedPair?.local} -> ${s.selectedPair?.remote}`);
      assert.ok(s.selectedPair, `${s.name}: no selected ICE candidate pair`);
      assert.match(s.selectedPair.remote, new RegExp(`^127\\.0\\.0\\.1:${tcpPort}/tcp host$`), `${s.name}: media goes to ${s.selectedPair.remote}`);
      assert.match(s.selectedPair.local, /\/tcp /, `${s.name}: media from ${s.selectedPair.local}`);
    }
    const m = await h.focus.metricValues(["weir_ice_tcp_connections", "weir_participants"]);
    assert.equal(m.weir_ice_tcp_connections, 3, `the focus holds one ICE-TCP connection per participant: ${JSON.stringify(m)}`);
    const dropped = udpDropped();
    log(`UDP datagrams dropped by the namespace's rule: ${dropped}`);
    assert.ok(dropped > 0, "the browsers tried UDP first, and it was dropped");
  });
});

test("over TCP, video keeps decoding in each sender's colour and audio keeps arriving", { timeout: 120000 }, (t) => {
  if (!inNetns) return t.skip("blocks UDP, so it runs only in its own network namespace (scripts/in-netns.sh)");
  return step(t, async () => {
    const colourOf = Object.fromEntries(h.participants.map((p) => [p.userId, p.colour]));
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
    await waitFor(
      "every received video to show its owner's colour",
      async () => {
        const snaps = await h.liveSnapshots();
        return snaps.every((s) => s.feeds.length === 2 && s.feeds.every((f) => f.colour === colourOf[f.owner]));
      },
      { timeoutMs: 20000, intervalMs: 500 },
    );
    console.log(pairReport(await h.snapshots(), h.participants, colourOf));
  });
});
