// Shaping a participant's downlink with tc, inside the network namespace scripts/in-netns.sh
// made for the test (never the host's).

import { spawnSync } from "node:child_process";

function tc(...args) {
  const r = spawnSync("tc", args, { encoding: "utf8", timeout: 10000 });
  if (r.status !== 0) throw new Error(`tc ${args.join(" ")} failed (${r.status}): ${r.stderr}`);
}

/**
 * Shape what reaches UDP port `port` on loopback to `kbit` kbit/s with a 200 ms queue, like a
 * home link. HTB only sorts the packets (both its classes are unlimited); the shaping is a TBF
 * under the limited class, because the focus sends with UDP GSO: on loopback a run of
 * datagrams is one buffer in the qdisc, and TBF splits those it cannot pass whole. (This
 * kernel offers htb, tbf and the fifos; prio and netem are missing.)
 */
export function limitDownlink(port, kbit) {
  tc("qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb", "default", "1", "r2q", "100000");
  tc("class", "add", "dev", "lo", "parent", "1:", "classid", "1:1", "htb", "rate", "10gbit");
  tc("class", "add", "dev", "lo", "parent", "1:", "classid", "1:2", "htb", "rate", "10gbit");
  tc("qdisc", "add", "dev", "lo", "parent", "1:2", "handle", "20:", "tbf", "rate", `${kbit}kbit`, "burst", "4kb", "latency", "200ms");
  tc("filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1", "u32",
    "match", "ip", "protocol", "17", "0xff", "match", "ip", "dport", String(port), "0xffff", "flowid", "1:2");
}

export function liftLimit() {
  tc("qdisc", "del", "dev", "lo", "root");
}

/** Whether loopback may be shaped here; skips `t` if not. */
export function inOwnNetns(t) {
  if (process.env.WEIR_IN_NETNS === "1") return true;
  t.skip("shapes loopback, so it runs only in its own network namespace (scripts/in-netns.sh)");
  return false;
}

export function liftIfLimited() {
  try {
    liftLimit();
  } catch {
    // lifted already
  }
}
