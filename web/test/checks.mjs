// Predicates and reports over Probe snapshots (see web/src/probe.js snapshot()), shared by the
// interop test and the demo. A snapshot set is one snapshot per participant, in participant order.

import { fmtTable } from "./harness.mjs";

function byUser(participants) {
  return Object.fromEntries(participants.map((p) => [p.userId, p.name]));
}

/**
 * True when every participant that is in a call decodes video (framesDecoded > 0) and has an
 * audio track from every other participant that is in a call. A feed left over from a sender's
 * earlier call also counts here; use trackGrowth to see that frames keep coming.
 */
export function everyoneDecodesEveryone(snaps) {
  const inCall = snaps.filter((s) => s.callState && !s.ended);
  if (inCall.length < 2) return false;
  for (const s of inCall) {
    for (const o of inCall) {
      if (o === s) continue;
      const feeds = s.feeds.filter((f) => f.owner === o.userId);
      if (!feeds.some((f) => f.video && f.video.framesDecoded > 0 && f.audioTrackId)) return false;
    }
  }
  return true;
}

/**
 * For each (receiver, sender) pair: the largest growth of framesDecoded, of audio
 * packetsReceived and of audio totalAudioEnergy (which Chromium counts only for audio it plays
 * unmuted: Probe.setAudible) between two snapshot sets, over the sender's feeds. A feed already in `prev`
 * (same stream id, same receiving call) counts its difference; a feed new since `prev` counts
 * all it has, since all of it arrived in between. Receivers not in a call in `cur` are left out.
 */
export function trackGrowth(prev, cur, participants) {
  const names = byUser(participants);
  const out = [];
  for (const c of cur) {
    if (!c.callState || c.ended) continue;
    const p = prev.find((x) => x.name === c.name);
    for (const sender of participants) {
      if (sender.userId === c.userId) continue;
      let frames = 0;
      let audioPackets = 0;
      let audioEnergy = 0;
      const feeds = c.feeds.filter((x) => x.owner === sender.userId);
      for (const f of feeds) {
        const old = p?.callId === c.callId ? p.feeds.find((x) => x.streamId === f.streamId) : null;
        frames = Math.max(frames, (f.video?.framesDecoded ?? 0) - (old?.video?.framesDecoded ?? 0));
        audioPackets = Math.max(audioPackets, (f.audio?.packetsReceived ?? 0) - (old?.audio?.packetsReceived ?? 0));
        audioEnergy = Math.max(audioEnergy, (f.audio?.totalAudioEnergy ?? 0) - (old?.audio?.totalAudioEnergy ?? 0));
      }
      out.push({ receiver: c.name, sender: names[sender.userId], feeds: feeds.length, frames, audioPackets, audioEnergy });
    }
  }
  return out;
}

/** A per-receiver table of what arrived from each sender. */
export function pairReport(snaps, participants, colourOf, { windowStart } = {}) {
  const names = byUser(participants);
  const rows = [];
  for (const s of snaps) {
    for (const f of s.feeds) {
      const v = f.video ?? {};
      const a = f.audio ?? {};
      const prev = windowStart?.find((x) => x.name === s.name)?.feeds.find((x) => x.streamId === f.streamId);
      const secs = prev ? (s.t - windowStart.find((x) => x.name === s.name).t) / 1000 : null;
      const fps = prev && secs > 0 ? ((v.framesDecoded ?? 0) - (prev.video?.framesDecoded ?? 0)) / secs : v.framesPerSecond;
      rows.push({
        receiver: s.name,
        sender: names[f.owner] ?? f.owner ?? "?",
        stream: f.streamId.slice(0, 8),
        "frames decoded": v.framesDecoded ?? "-",
        fps: fps === null || fps === undefined ? "-" : Number(fps).toFixed(1),
        size: v.frameWidth ? `${v.frameWidth}x${v.frameHeight}` : "-",
        "video bytes": v.bytesReceived ?? "-",
        "video lost": v.packetsLost ?? "-",
        colour: f.colour ?? "?",
        "colour ok": f.colour && colourOf[f.owner] === f.colour ? "OK" : "NO",
        "audio pkts": a.packetsReceived ?? "-",
        "audio lost": a.packetsLost ?? "-",
        muted: `${f.audioMuted ? "A" : "-"}${f.videoMuted ? "V" : "-"}`,
      });
    }
    if (s.feeds.length === 0) rows.push({ receiver: s.name, sender: "(nothing received)" });
  }
  return fmtTable(rows, [
    "receiver",
    "sender",
    "stream",
    "frames decoded",
    "fps",
    "size",
    "video bytes",
    "video lost",
    "colour",
    "colour ok",
    "audio pkts",
    "audio lost",
    "muted",
  ]);
}
