// A stand-in focus that runs in a browser page: it speaks the focus's side of the to-device
// protocol (reference/protocol.md §c.10 D2) with plain fetch calls to the homeserver and forwards
// media by re-adding each publisher's received tracks to the other participants' peer connections
// (Chromium decodes and re-encodes them; this is a test double, not an SFU).
//
// It exists so the interop harness can be checked end to end without the Rust focus
// (WEIR_FOCUS_MODE=emulated), and as a reference for what a stock client accepts. It does no
// authorisation, no seq handling and no glare resolution beyond answering when stable.

const state = {
  baseUrl: null,
  token: null,
  userId: null,
  deviceId: null,
  sessionId: "sfu",
  since: null,
  running: false,
  parts: new Map(), // `${userId}|${deviceId}` -> participant
  log: [],
  txn: 0,
  counters: { in: {}, out: {} },
};

function log(...a) {
  const line = a.map((x) => (typeof x === "string" ? x : JSON.stringify(x))).join(" ");
  state.log.push(`${new Date().toISOString().slice(11, 23)} ${line}`);
  if (state.log.length > 2000) state.log.shift();
  console.log("[emulated-focus]", line);
}

async function api(method, path, body) {
  const res = await fetch(`${state.baseUrl}${path}`, {
    method,
    headers: { "Content-Type": "application/json", ...(state.token ? { Authorization: `Bearer ${state.token}` } : {}) },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const json = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(`${method} ${path} -> ${res.status} ${JSON.stringify(json)}`);
  return json;
}

async function sendToDevice(part, type, content) {
  const full = {
    ...content,
    version: "1",
    call_id: part.callId,
    party_id: state.deviceId,
    conf_id: part.confId,
    device_id: state.deviceId,
    sender_session_id: state.sessionId,
    dest_session_id: part.sessionId,
  };
  state.counters.out[type] = (state.counters.out[type] ?? 0) + 1;
  const txn = `ef${Date.now()}.${state.txn++}`;
  await api("PUT", `/_matrix/client/v3/sendToDevice/${encodeURIComponent(type)}/${txn}`, {
    messages: { [part.userId]: { [part.deviceId]: full } },
  });
}

function waitIceComplete(pc, ms = 3000) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    pc.addEventListener("icegatheringstatechange", () => {
      if (pc.iceGatheringState === "complete") {
        clearTimeout(t);
        resolve();
      }
    });
  });
}

/** Metadata of every stream this participant publishes, with the owner named. */
function publishedMetadata(pub) {
  const out = {};
  for (const [streamId, md] of pub.streams) {
    out[streamId] = { ...md.meta, user_id: pub.userId, device_id: pub.deviceId };
  }
  return out;
}

/** Like the real focus, offer only 127.0.0.1 host candidates. */
function loopbackOnly(sdp) {
  return sdp
    .split("\r\n")
    .filter((l) => !l.startsWith("a=candidate:") || / 127\.0\.0\.1 \d+ typ host/.test(l))
    .join("\r\n");
}

async function onInvite(ev) {
  const c = ev.content;
  const key = `${ev.sender}|${c.device_id}`;
  const old = state.parts.get(key);
  if (old) removeParticipant(old, "replaced by a new invite");
  const pc = new RTCPeerConnection({ bundlePolicy: "max-bundle" });
  const part = {
    key,
    userId: ev.sender,
    deviceId: c.device_id,
    callId: c.call_id,
    confId: c.conf_id,
    sessionId: c.sender_session_id,
    pc,
    streams: new Map(), // streamId -> {meta, stream}
    senders: new Map(), // publisher key -> RTCRtpSender[]
    negotiating: false,
    needsNegotiation: false,
    answerWaiter: null,
    ready: false,
  };
  state.parts.set(key, part);
  const md = c.sdp_stream_metadata ?? c["org.matrix.msc3077.sdp_stream_metadata"] ?? {};
  for (const [sid, m] of Object.entries(md)) part.streams.set(sid, { meta: { ...m }, stream: null });
  pc.addEventListener("track", (e) => {
    const s = e.streams[0];
    if (!s) return;
    const entry = part.streams.get(s.id) ?? { meta: { purpose: "m.usermedia", audio_muted: false, video_muted: false }, stream: null };
    entry.stream = s;
    part.streams.set(s.id, entry);
    if (e.track.kind === "audio") pullAudio(s);
    log(`track ${e.track.kind} from ${part.userId} stream ${s.id}`);
    // forward once both tracks of the stream are there (audio+video) or shortly after
    scheduleForward(part);
  });
  pc.addEventListener("iceconnectionstatechange", () => {
    log(`${part.userId} ice ${pc.iceConnectionState}`);
    // liveness: a leg whose ICE stays disconnected/failed for 3 s is gone (tab closed, no hangup)
    if (["disconnected", "failed"].includes(pc.iceConnectionState)) {
      setTimeout(() => {
        if (state.parts.get(key) === part && ["disconnected", "failed"].includes(pc.iceConnectionState)) {
          removeParticipant(part, `ice ${pc.iceConnectionState}`);
        }
      }, 3000);
    }
  });
  await pc.setRemoteDescription(c.offer);
  const answer = await pc.createAnswer();
  await pc.setLocalDescription(answer);
  await waitIceComplete(pc);
  await sendToDevice(part, "m.call.answer", {
    answer: { type: "answer", sdp: loopbackOnly(pc.localDescription.sdp) },
    capabilities: { "m.call.transferee": false, "m.call.dtmf": false },
    sdp_stream_metadata: {},
    "org.matrix.msc3077.sdp_stream_metadata": {},
  });
  await sendToDevice(part, "m.call.candidates", { candidates: [{ candidate: "" }] });
  part.ready = true;
  log(`answered ${part.userId}/${part.deviceId} call ${part.callId}`);
  // give the newcomer everyone else's streams
  for (const other of state.parts.values()) {
    if (other !== part) forwardTo(other, part);
  }
}

// Chromium decodes a remote audio track only while something plays it; a track that is merely
// re-sent on another connection sends nothing. Play every received stream, silently.
const sinks = new Map();
function pullAudio(stream) {
  if (sinks.has(stream.id)) return;
  const el = document.createElement("audio");
  el.srcObject = stream;
  el.volume = 0.0001;
  el.autoplay = true;
  document.body.appendChild(el);
  void el.play().catch((e) => log(`audio sink play failed: ${e}`));
  sinks.set(stream.id, el);
}

const forwardTimers = new WeakMap();
function scheduleForward(pub) {
  clearTimeout(forwardTimers.get(pub));
  forwardTimers.set(
    pub,
    setTimeout(() => {
      for (const sub of state.parts.values()) if (sub !== pub) forwardTo(pub, sub);
    }, 200),
  );
}

/** Add pub's received tracks to sub's connection (once) and renegotiate. */
function forwardTo(pub, sub) {
  if (!sub.ready) return;
  let senders = sub.senders.get(pub.key);
  if (!senders) {
    senders = [];
    sub.senders.set(pub.key, senders);
  }
  let added = false;
  for (const [, entry] of pub.streams) {
    if (!entry.stream) continue;
    for (const track of entry.stream.getTracks()) {
      if (senders.some((s) => s.track === track)) continue;
      senders.push(sub.pc.addTrack(track, entry.stream));
      added = true;
    }
  }
  if (added) negotiate(sub);
}

async function negotiate(sub) {
  if (sub.negotiating) {
    sub.needsNegotiation = true;
    return;
  }
  sub.negotiating = true;
  try {
    do {
      sub.needsNegotiation = false;
      const offer = await sub.pc.createOffer();
      await sub.pc.setLocalDescription(offer);
      const metadata = {};
      for (const pub of state.parts.values()) {
        if (pub !== sub) Object.assign(metadata, publishedMetadata(pub));
      }
      // keep metadata for streams of participants who left (js-sdk never deletes entries anyway)
      Object.assign(metadata, sub.leftMetadata ?? {});
      const answered = new Promise((resolve) => (sub.answerWaiter = resolve));
      await sendToDevice(sub, "m.call.negotiate", {
        lifetime: 60000,
        description: { type: "offer", sdp: loopbackOnly(sub.pc.localDescription.sdp) },
        capabilities: { "m.call.transferee": false, "m.call.dtmf": false },
        sdp_stream_metadata: metadata,
        "org.matrix.msc3077.sdp_stream_metadata": metadata,
      });
      const desc = await Promise.race([answered, new Promise((r) => setTimeout(() => r(null), 15000))]);
      if (!desc) {
        log(`no negotiate answer from ${sub.userId} within 15 s`);
        break;
      }
      await sub.pc.setRemoteDescription(desc);
    } while (sub.needsNegotiation);
  } catch (e) {
    log(`negotiation with ${sub.userId} failed: ${e}`);
  } finally {
    sub.negotiating = false;
  }
}

async function onNegotiate(part, c) {
  const d = c.description;
  if (!d) return;
  if (d.type === "answer") {
    const w = part.answerWaiter;
    part.answerWaiter = null;
    if (w) w(d);
    return;
  }
  // client offer: answer when stable; a real focus would roll back on glare
  if (part.pc.signalingState !== "stable") {
    log(`ignoring offer from ${part.userId} in ${part.pc.signalingState}`);
    return;
  }
  const md = c.sdp_stream_metadata ?? {};
  for (const [sid, m] of Object.entries(md)) {
    const e = part.streams.get(sid) ?? { stream: null };
    e.meta = { ...m };
    part.streams.set(sid, e);
  }
  await part.pc.setRemoteDescription(d);
  await part.pc.setLocalDescription(await part.pc.createAnswer());
  await sendToDevice(part, "m.call.negotiate", {
    lifetime: 60000,
    description: { type: "answer", sdp: loopbackOnly(part.pc.localDescription.sdp) },
    sdp_stream_metadata: {},
  });
}

async function onMetadataChanged(part, c) {
  const md = c.sdp_stream_metadata ?? c["org.matrix.msc3077.sdp_stream_metadata"] ?? {};
  for (const [sid, m] of Object.entries(md)) {
    const e = part.streams.get(sid);
    if (e) e.meta = { ...e.meta, ...m };
  }
  const relay = publishedMetadata(part);
  for (const sub of state.parts.values()) {
    if (sub === part || !sub.ready) continue;
    await sendToDevice(sub, "m.call.sdp_stream_metadata_changed", {
      sdp_stream_metadata: relay,
      "org.matrix.msc3077.sdp_stream_metadata": relay,
    });
  }
}

function removeParticipant(part, why) {
  log(`removing ${part.userId}/${part.deviceId}: ${why}`);
  state.parts.delete(part.key);
  try {
    part.pc.close();
  } catch {
    // closing twice is fine
  }
  const md = publishedMetadata(part);
  for (const sub of state.parts.values()) {
    const senders = sub.senders.get(part.key) ?? [];
    sub.senders.delete(part.key);
    sub.leftMetadata = { ...(sub.leftMetadata ?? {}), ...md };
    for (const s of senders) sub.pc.removeTrack(s);
    if (senders.length) negotiate(sub);
  }
}

async function handleToDevice(ev) {
  const c = ev.content ?? {};
  if (!ev.type.startsWith("m.call.")) return;
  state.counters.in[ev.type] = (state.counters.in[ev.type] ?? 0) + 1;
  if (c.dest_session_id !== state.sessionId) {
    log(`dropping ${ev.type} for session ${c.dest_session_id}`);
    return;
  }
  if (ev.type === "m.call.invite") return onInvite(ev);
  const part = state.parts.get(`${ev.sender}|${c.device_id}`);
  if (!part || part.callId !== c.call_id) {
    log(`${ev.type} for unknown call ${c.call_id} from ${ev.sender}`);
    return;
  }
  switch (ev.type) {
    case "m.call.candidates":
      for (const cand of c.candidates ?? []) {
        if (!cand.candidate) continue;
        await part.pc.addIceCandidate(cand).catch((e) => log(`addIceCandidate: ${e}`));
      }
      return;
    case "m.call.select_answer":
      return;
    case "m.call.negotiate":
      return onNegotiate(part, c);
    case "m.call.sdp_stream_metadata_changed":
      return onMetadataChanged(part, c);
    case "m.call.hangup":
      return removeParticipant(part, `hangup ${c.reason}`);
    default:
      log(`ignoring ${ev.type}`);
  }
}

/** Log in as the focus, then long-poll /sync and serve to-device call events until stop(). */
export async function start({ baseUrl, user, password, deviceId = "WEIRFOCUS", sessionId = "sfu" }) {
  state.baseUrl = baseUrl;
  state.sessionId = sessionId;
  const login = await api("POST", "/_matrix/client/v3/login", {
    type: "m.login.password",
    identifier: { type: "m.id.user", user },
    password,
    device_id: deviceId,
  });
  state.token = login.access_token;
  state.userId = login.user_id;
  state.deviceId = login.device_id;
  // skip whatever to-device backlog exists, then serve new events
  const first = await api("GET", "/_matrix/client/v3/sync?timeout=0");
  state.since = first.next_batch;
  for (const roomId of Object.keys(first.rooms?.invite ?? {})) {
    await api("POST", `/_matrix/client/v3/join/${encodeURIComponent(roomId)}`, {});
    log(`joined ${roomId}`);
  }
  state.running = true;
  (async () => {
    while (state.running) {
      try {
        const r = await api("GET", `/_matrix/client/v3/sync?timeout=5000&since=${encodeURIComponent(state.since)}`);
        state.since = r.next_batch;
        for (const roomId of Object.keys(r.rooms?.invite ?? {})) {
          await api("POST", `/_matrix/client/v3/join/${encodeURIComponent(roomId)}`, {});
          log(`joined ${roomId}`);
        }
        for (const ev of r.to_device?.events ?? []) {
          try {
            await handleToDevice(ev);
          } catch (e) {
            log(`handling ${ev.type} failed: ${e.stack ?? e}`);
          }
        }
      } catch (e) {
        log(`sync failed: ${e}`);
        await new Promise((r) => setTimeout(r, 500));
      }
    }
  })();
  return { userId: state.userId, deviceId: state.deviceId };
}

export function stats() {
  return {
    participants: [...state.parts.values()].map((p) => ({ user: p.userId, device: p.deviceId, call: p.callId, ice: p.pc.iceConnectionState })),
    counters: state.counters,
  };
}

export function logTail(n = 100) {
  return state.log.slice(-n);
}

export function stop() {
  state.running = false;
  for (const p of [...state.parts.values()]) removeParticipant(p, "focus stopping");
}
