// In-page test participant for the interop harness and the demo. Not part of the embeddable client:
// it drives weir-call.js (loaded as window.Weir by the page) with a synthetic camera and microphone
// and measures what arrives.
//
// Audio: remote feeds play through muted <video> elements unless setAudible(true). Chromium computes
// a received track's audioLevel only while it is played unmuted, so the level (and the tone) of
// what arrives is measured only in audible mode: each feed then also gets an AnalyserNode, and
// snapshot() reports the dominant frequency of its audio, so a test that gives every participant
// its own microphone tone (setup's toneHz) can tell whose audio a feed carries.
//
// Camera: a canvas filled with the participant's colour, repainted ~30 times a second with a small
// moving bar in the bottom-left corner so the encoder always has changing pixels. Microphone: a
// WebAudio oscillator. Measurements: per remote feed, inbound-rtp stats by track, and the average
// colour of the middle of the decoded picture.

const W = () => {
  if (!window.Weir) throw new Error("window.Weir (weir-call.js) is not loaded");
  return window.Weir;
};

const COLOURS = {
  red: [230, 20, 20],
  green: [20, 200, 20],
  blue: [20, 20, 230],
  yellow: [230, 230, 20],
  magenta: [230, 20, 230],
  cyan: [20, 230, 230],
};

const state = {
  name: null,
  colourName: null,
  client: null,
  weirCall: null,
  camera: null,
  callSeq: 0,
  calls: [], // one record per WeirCall this page made: {seq, callId, placedAt, firstFrameAt, ...}
  monitor: null,
  videos: new Map(), // streamId -> <video>
  trackFirstFrame: new Map(), // remote video track id -> ms since placing the call
  sampler: null,
  errors: [],
  received: [], // summaries of m.call.* to-device events this client received
  audible: false, // play remote audio (setAudible)
  analysis: null, // AudioContext for the analysers
  analysers: new Map(), // streamId -> {stream, source, analyser}
  layers: [], // io.weir.layers the focus sent us, as applied: {t, mid, active}
  paused: [], // io.weir.paused notices: {t, stream_id, track_id, paused}
};

/** A summary of a received call event: the envelope fields and sizes, without the SDP itself. */
function summarise(ev) {
  const c = ev.getContent() ?? {};
  const sdp = c.offer?.sdp ?? c.answer?.sdp ?? c.description?.sdp ?? null;
  const stable = c.sdp_stream_metadata;
  const unstable = c["org.matrix.msc3077.sdp_stream_metadata"];
  return {
    t: Date.now(),
    type: ev.getType(),
    sender: ev.getSender(),
    version: c.version ?? null,
    call_id: c.call_id ?? null,
    party_id: c.party_id ?? null,
    conf_id: c.conf_id ?? null,
    device_id: c.device_id ?? null,
    sender_session_id: c.sender_session_id ?? null,
    dest_session_id: c.dest_session_id ?? null,
    hasSeq: "seq" in c,
    sdpType: c.offer?.type ?? c.answer?.type ?? c.description?.type ?? null,
    sdpBytes: sdp ? sdp.length : null,
    bodyBytes: JSON.stringify(c).length,
    mlines: sdp ? (sdp.match(/^m=/gm) ?? []).length : null,
    metadata: stable !== undefined ? "stable" : null,
    unstableMetadata: unstable !== undefined,
    metadataStreams: stable ? Object.keys(stable).length : null,
    metadataWithOwner: stable ? Object.values(stable).filter((m) => m?.user_id && m?.device_id).length : null,
    candidates: Array.isArray(c.candidates) ? c.candidates.map((x) => x.candidate) : null,
    reason: c.reason ?? null,
  };
}

function log(...a) {
  console.log(`[probe ${state.name}]`, ...a);
}

/** A canvas camera plus an oscillator microphone. */
export function makeCamera(colourName, { width = 320, height = 240, fps = 30, toneHz = 440 } = {}) {
  const rgb = COLOURS[colourName];
  if (!rgb) throw new Error(`unknown colour ${colourName}`);
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  canvas.dataset.role = "camera";
  canvas.style.cssText = "width:160px;height:120px;border:1px solid #000;margin:2px";
  document.body.appendChild(canvas);
  const ctx = canvas.getContext("2d");
  let frame = 0;
  const paint = () => {
    ctx.fillStyle = `rgb(${rgb[0]},${rgb[1]},${rgb[2]})`;
    ctx.fillRect(0, 0, width, height);
    // moving bar in the bottom-left corner, bottom 10% of the frame, left half only
    const barW = Math.round(width / 10);
    const x = (frame * 4) % (width / 2 - barW);
    ctx.fillStyle = "rgb(250,250,250)";
    ctx.fillRect(x, Math.round(height * 0.9), barW, Math.round(height * 0.1));
    frame++;
  };
  paint();
  const timer = setInterval(paint, Math.round(1000 / fps));
  const video = canvas.captureStream(fps);

  let audioTracks = [];
  let audioCtx = null;
  try {
    audioCtx = new AudioContext();
    const osc = audioCtx.createOscillator();
    osc.frequency.value = toneHz;
    const gain = audioCtx.createGain();
    gain.gain.value = 0.2;
    const dest = audioCtx.createMediaStreamDestination();
    osc.connect(gain).connect(dest);
    osc.start();
    void audioCtx.resume();
    audioTracks = dest.stream.getAudioTracks();
  } catch (e) {
    log("WebAudio oscillator unavailable, audio will come from the fake device", e);
  }
  const stream = new MediaStream([...audioTracks, ...video.getVideoTracks()]);
  return {
    stream,
    canvas,
    audioCtx,
    stop() {
      clearInterval(timer);
      stream.getTracks().forEach((t) => t.stop());
      void audioCtx?.close();
    },
  };
}

/**
 * Log in, start syncing, build the camera. Must run before joinCall. `camera`: the canvas size
 * (default 320×240), or `{device: true}` for the browser's camera (Chromium's fake one, from a
 * file when started with --use-file-for-fake-video-capture) with the canvas camera's tone.
 */
export async function setup({ name, colour, baseUrl, user, password, deviceId, toneHz = 440, camera = {} }) {
  state.name = name;
  state.colourName = colour;
  document.title = `weir probe ${name}`;
  const creds = await W().loginWithPassword(baseUrl, user, password, deviceId);
  state.client = W().createCallClient(creds);
  state.client.on("toDeviceEvent", (ev) => {
    if (!ev.getType().startsWith("m.call.")) return;
    state.received.push(summarise(ev));
    if (state.received.length > 1000) state.received.shift();
  });
  await W().startClient(state.client);
  state.camera = makeCamera(colour, { toneHz, width: camera.width, height: camera.height });
  if (camera.device) {
    const cam = await navigator.mediaDevices.getUserMedia({
      audio: false,
      video: { width: camera.width ?? 1280, height: camera.height ?? 720, frameRate: 30 },
    });
    for (const t of state.camera.stream.getVideoTracks()) {
      state.camera.stream.removeTrack(t);
      t.stop();
    }
    cam.getVideoTracks().forEach((t) => state.camera.stream.addTrack(t));
    const s = cam.getVideoTracks()[0]?.getSettings() ?? {};
    log(`camera from the device: ${s.width}x${s.height} at ${s.frameRate} fps`);
  }
  if (state.camera.stream.getAudioTracks().length === 0) {
    const mic = await navigator.mediaDevices.getUserMedia({ audio: true, video: false });
    mic.getAudioTracks().forEach((t) => state.camera.stream.addTrack(t));
  }
  log(`logged in as ${creds.userId}/${creds.deviceId}, session ${state.client.getSessionId()}`);
  return { userId: creds.userId, deviceId: creds.deviceId, sessionId: state.client.getSessionId() };
}

/**
 * Join (or re-join, with a fresh MatrixCall) the call via the focus. `options` go to WeirCall
 * (simulcast, degradationPreference, dataChannel).
 */
export async function joinCall({ roomId, confId, focus, timeoutMs = 30000, publishMember = true, options = {} }) {
  if (!state.client) throw new Error("setup() first");
  if (state.weirCall && !state.weirCall.ended) throw new Error("already in a call");
  const seq = ++state.callSeq;
  const wc = new (W().WeirCall)({
    client: state.client,
    roomId,
    confId,
    focus,
    stream: state.camera.stream,
    log: (...a) => log(`call#${seq}`, ...a),
    ...options,
  });
  wc.addEventListener("layers", (e) => state.layers.push({ t: Date.now(), ...e.detail }));
  wc.addEventListener("paused", (e) => state.paused.push({ t: Date.now(), ...e.detail }));
  state.weirCall = wc;
  state.trackFirstFrame = new Map();
  const rec = { seq, callId: null, startedAt: Date.now(), placedAt: null, connectedAt: null, firstFrameMs: null, endedAt: null, hangupReason: null, hangupParty: null };
  state.calls.push(rec);
  wc.addEventListener("state", (e) => {
    if (e.detail.state === "connected" && !rec.connectedAt) rec.connectedAt = Date.now();
  });
  wc.addEventListener("hangup", (e) => {
    rec.endedAt = Date.now();
    rec.hangupReason = e.detail.reason ?? null;
    rec.hangupParty = e.detail.party ?? null;
  });
  wc.addEventListener("error", (e) => state.errors.push(String(e.detail?.message ?? e.detail)));
  wc.addEventListener("feeds", () => attachVideos());
  const call = await wc.join({ timeoutMs, publishMember });
  rec.callId = call.callId;
  rec.placedAt = Date.now();
  startMonitor();
  return { callId: call.callId, sessionId: state.client.getSessionId() };
}

function attachVideos() {
  const feeds = state.weirCall?.remoteFeeds() ?? [];
  const live = new Set(feeds.map((f) => f.streamId));
  for (const f of feeds) {
    if (state.videos.has(f.streamId)) continue;
    const v = document.createElement("video");
    v.muted = !state.audible;
    v.autoplay = true;
    v.playsInline = true;
    v.dataset.streamId = f.streamId;
    v.style.cssText = "width:160px;height:120px;border:1px solid #888;margin:2px";
    v.srcObject = f.stream;
    document.body.appendChild(v);
    void v.play().catch((e) => log("video.play failed", e));
    state.videos.set(f.streamId, v);
  }
  for (const [id, v] of state.videos) {
    if (!live.has(id)) {
      v.srcObject = null;
      v.remove();
      state.videos.delete(id);
    }
  }
  if (state.audible) attachAnalysers(feeds);
}

/** An AnalyserNode on each feed's audio (re-made when the feed's stream or track changes). */
function attachAnalysers(feeds) {
  if (!state.analysis) state.analysis = new AudioContext();
  void state.analysis.resume();
  const live = new Set();
  for (const f of feeds) {
    const at = f.stream.getAudioTracks()[0];
    if (!at) continue;
    live.add(f.streamId);
    const cur = state.analysers.get(f.streamId);
    if (cur && cur.trackId === at.id) continue;
    cur?.source.disconnect();
    const source = state.analysis.createMediaStreamSource(new MediaStream([at]));
    const analyser = state.analysis.createAnalyser();
    analyser.fftSize = 4096;
    analyser.smoothingTimeConstant = 0.5;
    source.connect(analyser);
    state.analysers.set(f.streamId, { trackId: at.id, source, analyser });
  }
  for (const [id, a] of state.analysers) {
    if (!live.has(id)) {
      a.source.disconnect();
      state.analysers.delete(id);
    }
  }
}

/** The dominant frequency of a feed's audio right now ({hz, db}), or null without an analyser. */
function dominantTone(streamId) {
  const a = state.analysers.get(streamId);
  if (!a) return null;
  const bins = new Float32Array(a.analyser.frequencyBinCount);
  a.analyser.getFloatFrequencyData(bins);
  let best = 0;
  for (let i = 1; i < bins.length; i++) if (bins[i] > bins[best]) best = i;
  if (!Number.isFinite(bins[best])) return null;
  return { hz: Math.round((best * state.analysis.sampleRate) / a.analyser.fftSize), db: Math.round(bins[best]) };
}

/**
 * Play remote audio (unmute the feeds' elements) and analyse each feed's tone; snapshot() then
 * reports each feed's audioLevel and dominant frequency.
 */
export function setAudible(on = true) {
  state.audible = !!on;
  for (const v of state.videos.values()) v.muted = !state.audible;
  if (state.audible) attachAnalysers(state.weirCall?.remoteFeeds() ?? []);
  return state.audible;
}

/** The ICE candidate pair the browser selected: addresses on both ends. */
async function selectedPair() {
  const pc = state.weirCall?.peerConnection;
  if (!pc) return null;
  const report = await pc.getStats();
  let pairId = null;
  report.forEach((s) => {
    if (s.type === "transport" && s.selectedCandidatePairId) pairId = s.selectedCandidatePairId;
  });
  const pair = pairId ? report.get(pairId) : null;
  if (!pair) return null;
  const l = report.get(pair.localCandidateId);
  const r = report.get(pair.remoteCandidateId);
  return {
    state: pair.state,
    local: l ? `${l.address ?? l.ip}:${l.port}/${l.protocol} ${l.candidateType}` : null,
    remote: r ? `${r.address ?? r.ip}:${r.port}/${r.protocol} ${r.candidateType}` : null,
    bytesSent: pair.bytesSent ?? null,
    bytesReceived: pair.bytesReceived ?? null,
    currentRoundTripTime: pair.currentRoundTripTime ?? null,
  };
}

/**
 * Outbound RTP of our own media (what we send to the focus), by kind; a simulcast video sums its
 * layers (frameWidth: the widest), and `layers` has each layer by rid.
 */
async function outbound() {
  const pc = state.weirCall?.peerConnection;
  const out = {};
  if (!pc) return out;
  const report = await pc.getStats();
  report.forEach((s) => {
    if (s.type !== "outbound-rtp") return;
    const k = s.kind ?? s.mediaType;
    const rec = {
      packetsSent: s.packetsSent ?? 0,
      bytesSent: s.bytesSent ?? 0,
      framesEncoded: s.framesEncoded ?? null,
      framesPerSecond: s.framesPerSecond ?? null,
      frameWidth: s.frameWidth ?? null,
      pliCount: s.pliCount ?? null,
      nackCount: s.nackCount ?? null,
      qualityLimitationReason: s.qualityLimitationReason ?? null,
      scalabilityMode: s.scalabilityMode ?? null,
      active: s.active ?? null,
      codec: report.get(s.codecId)?.mimeType ?? null,
    };
    if (s.rid) {
      out.layers ??= {};
      out.layers[s.rid] = rec;
    }
    const agg = out[k];
    if (!agg) {
      out[k] = { ...rec };
      return;
    }
    agg.packetsSent += rec.packetsSent;
    agg.bytesSent += rec.bytesSent;
    agg.framesEncoded = (agg.framesEncoded ?? 0) + (rec.framesEncoded ?? 0);
    agg.framesPerSecond = Math.max(agg.framesPerSecond ?? 0, rec.framesPerSecond ?? 0);
    agg.frameWidth = Math.max(agg.frameWidth ?? 0, rec.frameWidth ?? 0) || null;
    agg.pliCount = (agg.pliCount ?? 0) + (rec.pliCount ?? 0);
    agg.nackCount = (agg.nackCount ?? 0) + (rec.nackCount ?? 0);
  });
  return out;
}

/** Inbound RTP stats of the current call's peer connection, by receiving track id. */
async function inboundByTrack() {
  const pc = state.weirCall?.peerConnection;
  const out = new Map();
  if (!pc) return out;
  const report = await pc.getStats();
  const tracks = new Map(); // legacy "track" stats: id -> trackIdentifier
  report.forEach((s) => {
    if (s.type === "track" && s.trackIdentifier) tracks.set(s.id, s.trackIdentifier);
  });
  report.forEach((s) => {
    if (s.type !== "inbound-rtp") return;
    const trackId = s.trackIdentifier ?? tracks.get(s.trackId);
    if (!trackId) return;
    out.set(trackId, {
      kind: s.kind ?? s.mediaType,
      mid: s.mid ?? null,
      ssrc: s.ssrc,
      packetsReceived: s.packetsReceived ?? 0,
      packetsLost: s.packetsLost ?? 0,
      bytesReceived: s.bytesReceived ?? 0,
      framesDecoded: s.framesDecoded ?? 0,
      framesReceived: s.framesReceived ?? null,
      framesDropped: s.framesDropped ?? null,
      framesPerSecond: s.framesPerSecond ?? null,
      frameWidth: s.frameWidth ?? null,
      frameHeight: s.frameHeight ?? null,
      keyFramesDecoded: s.keyFramesDecoded ?? null,
      pliCount: s.pliCount ?? null,
      nackCount: s.nackCount ?? null,
      totalSamplesReceived: s.totalSamplesReceived ?? null,
      audioLevel: s.audioLevel ?? null,
      totalAudioEnergy: s.totalAudioEnergy ?? null,
      jitter: s.jitter ?? null,
      codec: report.get(s.codecId)?.mimeType ?? null,
    });
  });
  return out;
}

function startMonitor() {
  if (state.monitor) return;
  state.monitor = setInterval(async () => {
    const rec = state.calls[state.calls.length - 1];
    if (!rec || !state.weirCall || state.weirCall.ended) return;
    try {
      const stats = await inboundByTrack();
      for (const [trackId, s] of stats) {
        if (s.kind === "video" && s.framesDecoded > 0 && !state.trackFirstFrame.has(trackId)) {
          const ms = Date.now() - rec.startedAt;
          state.trackFirstFrame.set(trackId, ms);
          if (rec.firstFrameMs === null) rec.firstFrameMs = ms;
        }
      }
    } catch (e) {
      // the peer connection may be closing
    }
  }, 100);
}

const sampleCanvas = document.createElement("canvas");
sampleCanvas.width = 64;
sampleCanvas.height = 48;
const sampleCtx = sampleCanvas.getContext("2d", { willReadFrequently: true });

/** Average colour of the middle of the video's current frame (avoids the moving bar). */
function sampleVideo(v) {
  if (!v || v.readyState < 2 || !v.videoWidth) return null;
  sampleCtx.drawImage(v, 0, 0, sampleCanvas.width, sampleCanvas.height);
  // centre 50% x 50%: rows 12..36, cols 16..48
  const d = sampleCtx.getImageData(16, 12, 32, 24).data;
  let r = 0, g = 0, b = 0;
  const n = d.length / 4;
  for (let i = 0; i < d.length; i += 4) {
    r += d[i];
    g += d[i + 1];
    b += d[i + 2];
  }
  return { r: Math.round(r / n), g: Math.round(g / n), b: Math.round(b / n), width: v.videoWidth, height: v.videoHeight };
}

/** Name of the reference colour nearest to rgb, with its distance. */
export function classify(rgb) {
  if (!rgb) return { name: null, distance: null };
  let best = null;
  let bestD = Infinity;
  for (const [name, ref] of Object.entries(COLOURS)) {
    const d = Math.hypot(rgb.r - ref[0], rgb.g - ref[1], rgb.b - ref[2]);
    if (d < bestD) {
      bestD = d;
      best = name;
    }
  }
  return { name: bestD < 90 ? best : null, distance: Math.round(bestD) };
}

/** Everything the harness asserts on, as plain data. */
export async function snapshot() {
  const wc = state.weirCall;
  const stats = await inboundByTrack().catch(() => new Map());
  const feeds = (wc?.remoteFeeds() ?? []).map((f) => {
    const vt = f.stream.getVideoTracks()[0];
    const at = f.stream.getAudioTracks()[0];
    const px = sampleVideo(state.videos.get(f.streamId));
    return {
      streamId: f.streamId,
      purpose: f.purpose,
      owner: f.ownerUserId,
      ownerDevice: f.ownerDeviceId,
      feedUserId: f.feed.userId,
      audioMuted: f.audioMuted,
      videoMuted: f.videoMuted,
      videoTrackId: vt?.id ?? null,
      audioTrackId: at?.id ?? null,
      video: vt ? stats.get(vt.id) ?? null : null,
      audio: at ? stats.get(at.id) ?? null : null,
      firstFrameMs: vt ? state.trackFirstFrame.get(vt.id) ?? null : null,
      pixel: px,
      colour: classify(px).name,
      colourDistance: classify(px).distance,
      tone: dominantTone(f.streamId),
    };
  });
  const pc = wc?.peerConnection;
  return {
    t: Date.now(),
    name: state.name,
    colour: state.colourName,
    userId: state.client?.getUserId() ?? null,
    deviceId: state.client?.getDeviceId() ?? null,
    sessionId: state.client?.getSessionId() ?? null,
    callState: wc?.state ?? null,
    callId: wc?.call?.callId ?? null,
    ended: wc?.ended ?? null,
    iceState: pc?.iceConnectionState ?? null,
    signalingState: pc?.signalingState ?? null,
    audioMuted: wc?.isAudioMuted() ?? null,
    videoMuted: wc?.isVideoMuted() ?? null,
    selectedPair: await selectedPair().catch(() => null),
    outbound: await outbound().catch(() => ({})),
    transceivers: pc ? pc.getTransceivers().map((t) => ({ mid: t.mid, dir: t.direction, cur: t.currentDirection, kind: t.receiver.track?.kind })) : [],
    calls: state.calls.map((c) => ({ ...c })),
    errors: [...state.errors],
    feeds,
  };
}

/**
 * Subscribe to the video of `owner` (a user id) at a tile of `height` lines (16:9), and to its
 * audio. Returns the subscription sent.
 */
export function subscribeTo({ owner, height }) {
  const wc = state.weirCall;
  if (!wc) throw new Error("not in a call");
  const feed = wc.remoteFeeds().find((f) => f.ownerUserId === owner);
  if (!feed) throw new Error(`no feed of ${owner}`);
  const ids = wc.remoteTrackIds(feed.streamId);
  if (ids.video.length === 0) throw new Error(`the focus's metadata names no video track of ${owner}`);
  const subs = [
    ...ids.audio.map((trackId) => ({ streamId: feed.streamId, trackId })),
    ...ids.video.map((trackId) => ({ streamId: feed.streamId, trackId, width: Math.round((height * 16) / 9), height })),
  ];
  wc.subscribe(subs);
  return subs;
}

/**
 * Watch the video of `owner` (a user id): every `intervalMs` its inbound stats are read, and
 * the longest time without a newly decoded frame (a freeze, as a viewer sees it) is kept, with
 * how many samples saw each decoded width, and each stop over `gapOverMs` (when it began, since
 * the watch started, how long it was, and the decoded width before and after; the first 20).
 * Read it with frameWatch(owner).
 */
export function watchFrames({ owner, intervalMs = 50, gapOverMs = 200 }) {
  stopWatch(owner);
  const w = { startedAt: Date.now(), lastFrames: null, lastChange: null, lastWidth: null, maxGapMs: 0, gapEndedAt: null, gaps: [], widths: {}, busy: false };
  w.timer = setInterval(async () => {
    if (w.busy) return;
    w.busy = true;
    try {
      const feed = state.weirCall?.remoteFeeds().find((f) => f.ownerUserId === owner);
      const vt = feed?.stream.getVideoTracks()[0];
      const s = vt ? (await inboundByTrack()).get(vt.id) : null;
      if (!s) return;
      const now = Date.now();
      w.first ??= s;
      w.last = s;
      if (w.lastFrames === null || s.framesDecoded > w.lastFrames) {
        if (w.lastChange !== null && now - w.lastChange > w.maxGapMs) {
          w.maxGapMs = now - w.lastChange;
          w.gapEndedAt = now;
        }
        if (w.lastChange !== null && now - w.lastChange > gapOverMs && w.gaps.length < 20) {
          w.gaps.push({ atMs: w.lastChange - w.startedAt, ms: now - w.lastChange, from: w.lastWidth, to: s.frameWidth });
        }
        w.lastFrames = s.framesDecoded;
        w.lastChange = now;
        w.lastWidth = s.frameWidth;
      }
      w.widths[s.frameWidth] = (w.widths[s.frameWidth] ?? 0) + 1;
    } catch {
      // the peer connection may be closing
    } finally {
      w.busy = false;
    }
  }, intervalMs);
  watches.set(owner, w);
}

/** What watchFrames saw so far; a freeze still going on counts up to now. */
export function frameWatch(owner) {
  const w = watches.get(owner);
  if (!w) throw new Error(`not watching ${owner}`);
  const now = Date.now();
  const ongoing = w.lastChange === null ? now - w.startedAt : now - w.lastChange;
  return {
    ms: now - w.startedAt,
    maxGapMs: Math.max(w.maxGapMs, ongoing),
    gapEndedAt: ongoing > w.maxGapMs ? null : w.gapEndedAt,
    framesDecoded: w.lastFrames,
    widths: { ...w.widths },
    gaps: [...w.gaps],
    // What the receiver counted meanwhile: why the picture stopped, when it did.
    counts: Object.fromEntries(
      ["packetsReceived", "packetsLost", "nackCount", "pliCount", "framesReceived", "framesDecoded", "framesDropped", "keyFramesDecoded"].map(
        (k) => [k, w.first && w.last ? (w.last[k] ?? 0) - (w.first[k] ?? 0) : null],
      ),
    ),
  };
}

export function stopWatch(owner) {
  const w = watches.get(owner);
  if (w) clearInterval(w.timer);
  watches.delete(owner);
}

const watches = new Map(); // owner user id -> frame watch

/** Whether the data channel to the focus is open. */
/** The call's current local and remote session descriptions (SDP text), for diagnostics. */
export function descriptions() {
  const pc = state.weirCall?.peerConnection;
  return { local: pc?.localDescription?.sdp ?? null, remote: pc?.remoteDescription?.sdp ?? null };
}

export function channelOpen() {
  return state.weirCall?.channelOpen ?? false;
}

/** The io.weir.layers and io.weir.paused messages the focus sent this page, as applied. */
export function notices() {
  return { layers: state.layers.slice(), paused: state.paused.slice() };
}

/** Raw getStats() entries of the current call (debugging aid), optionally of one type. */
export async function rawStats(type) {
  const pc = state.weirCall?.peerConnection;
  if (!pc) return [];
  const out = [];
  (await pc.getStats()).forEach((s) => {
    if (!type || s.type === type) out.push(s);
  });
  return out;
}

/** Summaries of the m.call.* to-device events received so far. */
export function received() {
  return state.received.slice();
}

export async function hangup() {
  if (!state.weirCall) throw new Error("not in a call");
  await state.weirCall.hangup();
  return true;
}

export async function setMuted({ audio, video }) {
  const wc = state.weirCall;
  if (!wc) throw new Error("not in a call");
  if (audio !== undefined) await wc.setAudioMuted(audio);
  if (video !== undefined) await wc.setVideoMuted(video);
  return { audioMuted: wc.isAudioMuted(), videoMuted: wc.isVideoMuted() };
}

export async function shutdown() {
  try {
    if (state.weirCall && !state.weirCall.ended) await state.weirCall.hangup();
  } catch (e) {
    log("hangup during shutdown failed", e);
  }
  clearInterval(state.monitor);
  state.monitor = null;
  for (const owner of [...watches.keys()]) stopWatch(owner);
  for (const a of state.analysers.values()) a.source.disconnect();
  state.analysers.clear();
  void state.analysis?.close();
  state.camera?.stop();
  state.client?.stopClient();
}
