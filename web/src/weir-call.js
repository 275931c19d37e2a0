// weir-call: join an MSC3401 group call through a weir focus with a stock matrix-js-sdk 43 client.
//
// The client talks to the focus in "to-device mode" (reference/protocol.md §c.10 D2, §c.11):
//   1. the room holds `org.matrix.msc3401.call` state for the conf id, so js-sdk builds a GroupCall
//      for it (without one, js-sdk drops every event the focus sends);
//   2. we publish our device in `org.matrix.msc3401.call.member` (the focus authorises the invite
//      against it: same device id and session id, unexpired), naming the focus we call in MSC3898
//      `org.matrix.msc3898.foci.active` (foci of several organisations find each other there and
//      trunk: docs/cascading.md);
//   3. one plain MatrixCall to the focus's device and session carries our camera/mic up and every
//      other participant's streams down; the focus adds them with `m.call.negotiate` offers.
// GroupCall.enter() is never called: GroupCall would mesh-call every member instead.
//
// js-sdk attributes every remote CallFeed to the focus. The real owner of a stream is in the
// focus's `sdp_stream_metadata` (`user_id`/`device_id`), which js-sdk keeps in the private
// `MatrixCall.remoteSDPStreamMetadata`; `remoteFeeds()` reads it from there.

import { createClient, createNewMatrixCall, CallEvent, ClientEvent, SyncState } from "matrix-js-sdk";
import { CallFeed, CallFeedEvent } from "matrix-js-sdk/lib/webrtc/callFeed.js";
import { CallErrorCode, CallState } from "matrix-js-sdk/lib/webrtc/call.js";

export { createClient, CallEvent, CallFeedEvent, CallState, CallErrorCode };

export const CALL_STATE_TYPE = "org.matrix.msc3401.call";
export const CALL_MEMBER_TYPE = "org.matrix.msc3401.call.member";
/** Same TTL js-sdk's GroupCall uses for a device entry, and the same 3/4 refresh point. */
export const DEVICE_TTL_MS = 60 * 60 * 1000;
const DEVICE_REFRESH_MS = (DEVICE_TTL_MS * 3) / 4;

/**
 * The simulcast layers weir-call publishes a camera with: a quarter, a half and the full size,
 * under the rids the focus ranks `q` < `h` < `f` (docs/data-channel.md). The bitrates are what
 * Chromium gives a 720p camera's layers. The focus forwards each subscriber the layer that
 * fits its tile and its downlink, and tells us to stop encoding layers nobody needs
 * (`io.weir.layers`, dynacast).
 */
export const SIMULCAST_LAYERS = [
  { rid: "q", scaleResolutionDownBy: 4, maxBitrate: 150_000 },
  { rid: "h", scaleResolutionDownBy: 2, maxBitrate: 500_000 },
  { rid: "f", scaleResolutionDownBy: 1, maxBitrate: 1_500_000 },
];

/** The label of the data channel weir-call opens to the focus (what js-sdk's GroupCall uses). */
export const DATA_CHANNEL_LABEL = "datachannel";
/** The unordered channel the focus sends pause notices on (docs/data-channel.md). */
export const NOTICES_LABEL = "io.weir.notices";

/** Content js-sdk 43 GroupCall writes for a video room call (without the data-channel flag). */
export function callStateContent() {
  return { "m.intent": "m.room", "m.type": "m.video", "io.element.ptt": false };
}

async function pollUntil(what, fn, timeoutMs, intervalMs = 100) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() >= deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}

/** Password login; returns what createCallClient needs. */
export async function loginWithPassword(baseUrl, user, password, deviceId) {
  const res = await fetch(`${baseUrl.replace(/\/$/, "")}/_matrix/client/v3/login`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({
      type: "m.login.password",
      identifier: { type: "m.id.user", user },
      password,
      device_id: deviceId,
      initial_device_display_name: `weir-call ${deviceId ?? ""}`.trim(),
    }),
  });
  const body = await res.json();
  if (!res.ok) throw new Error(`login ${user} failed: HTTP ${res.status} ${JSON.stringify(body)}`);
  return { baseUrl, userId: body.user_id, accessToken: body.access_token, deviceId: body.device_id };
}

/**
 * A MatrixClient set up for calls to a focus. `useE2eForGroupCall: false` is required: js-sdk 43's
 * encrypted group-call signalling path throws (protocol.md §1 item 4).
 */
export function createCallClient({ baseUrl, userId, accessToken, deviceId }) {
  return createClient({
    baseUrl,
    userId,
    accessToken,
    deviceId,
    useE2eForGroupCall: false,
    timelineSupport: false,
  });
}

/** startClient and wait until the first sync has been processed. */
export async function startClient(client, timeoutMs = 30000) {
  const synced = new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`first sync not done within ${timeoutMs} ms`)), timeoutMs);
    const onSync = (state) => {
      if (state === SyncState.Prepared || state === SyncState.Syncing) {
        clearTimeout(timer);
        client.off(ClientEvent.Sync, onSync);
        resolve();
      }
    };
    client.on(ClientEvent.Sync, onSync);
  });
  await client.startClient({ initialSyncLimit: 1 });
  await synced;
}

/** Send the `org.matrix.msc3401.call` state for confId (what GroupCall.create would send). */
export async function sendCallState(client, roomId, confId) {
  await client.sendStateEvent(roomId, CALL_STATE_TYPE, callStateContent(), confId);
}

/** Resolve with js-sdk's GroupCall for confId once the client has built it from room state. */
export async function waitForGroupCall(client, roomId, confId, timeoutMs = 30000) {
  return pollUntil(
    `js-sdk GroupCall ${confId} in ${roomId}`,
    () => {
      const gc = client.groupCallEventHandler?.getGroupCallById(confId);
      return gc && gc.room.roomId === roomId ? gc : null;
    },
    timeoutMs,
  );
}

/** Resolve once the user is a joined member of the room as this client sees it. */
export async function waitForJoinedMember(client, roomId, userId, timeoutMs = 30000) {
  return pollUntil(
    `${userId} joined in ${roomId}`,
    () => client.getRoom(roomId)?.getMember(userId)?.membership === "join",
    timeoutMs,
  );
}

/**
 * The devices in a call now: unexpired device entries for confId in the room's `m.call.member`
 * state. [{userId, deviceId, sessionId}]
 */
export function callMemberDevices(client, roomId, confId) {
  const room = client.getRoom(roomId);
  if (!room) return [];
  const now = Date.now();
  const out = [];
  for (const ev of room.currentState.getStateEvents(CALL_MEMBER_TYPE)) {
    // only a joined member's own entry counts: not one left behind by someone who left or was
    // removed, and not one written for someone else
    if (ev.getSender() !== ev.getStateKey() || room.getMember(ev.getStateKey())?.membership !== "join") continue;
    const calls = ev.getContent()?.["m.calls"];
    if (!Array.isArray(calls)) continue;
    const call = calls.find((c) => c?.["m.call_id"] === confId);
    const devices = Array.isArray(call?.["m.devices"]) ? call["m.devices"] : [];
    for (const d of devices) {
      if (typeof d?.device_id !== "string" || typeof d?.expires_ts !== "number" || d.expires_ts <= now) continue;
      out.push({ userId: ev.getStateKey(), deviceId: d.device_id, sessionId: d.session_id ?? null });
    }
  }
  return out;
}

/**
 * One participant's connection to a weir focus.
 *
 * Events (EventTarget; `detail` carries the payload):
 *   "feeds"    remote feeds changed (detail: remoteFeeds())
 *   "state"    MatrixCall state changed (detail: {state, old})
 *   "hangup"   the call ended (detail: {reason, party})
 *   "error"    the MatrixCall emitted an error (detail: error)
 *   "mute"     a remote feed's mute state changed (detail: the remote feed record)
 *   "channel"  the data channel to the focus opened
 *   "speakers" the focus announced who speaks (detail: the `io.weir.speakers` content)
 *   "streams"  the focus announced every stream of the conference (detail: the `io.weir.streams`
 *              content, `{streams}` in `sdp_stream_metadata` form, ours included)
 *   "paused"   the focus paused or resumed a video toward us for want of bandwidth (detail: the
 *              `io.weir.paused` content)
 *   "layers"   the focus told us which layers of our camera anyone needs, and we applied it
 *              (detail: {mid, active} with simulcast rids, {mid, spatialLayers} with SVC)
 */
/**
 * Put `mimeType` first among the codecs `t` offers (VP9: profile 0, which every browser
 * decodes), keeping the others, RTX included, behind it.
 */
function preferCodec(t, mimeType) {
  const codecs = RTCRtpReceiver.getCapabilities("video")?.codecs ?? [];
  const wanted = (c) =>
    c.mimeType.toLowerCase() === mimeType.toLowerCase() && !/profile-id=[^0]/.test(c.sdpFmtpLine ?? "");
  const first = codecs.filter(wanted);
  if (!first.length) throw new Error(`this browser cannot send ${mimeType}`);
  t.setCodecPreferences([...first, ...codecs.filter((c) => !wanted(c))]);
}

export class WeirCall extends EventTarget {
  /**
   * @param {object} o
   * @param {import("matrix-js-sdk").MatrixClient} o.client started, synced, useE2eForGroupCall:false
   * @param {string} o.roomId
   * @param {string} o.confId the `org.matrix.msc3401.call` state key
   * @param {{userId: string, deviceId: string, sessionId: string}} o.focus
   * @param {MediaStream} o.stream local camera/mic; the call gets a clone, this one stays yours
   * @param {(audio: boolean, video: boolean) => Promise<MediaStream>} [o.getUserMedia] where js-sdk
   *   takes new tracks from when it needs them again (video unmute after it stopped the track);
   *   default: clones of `stream`'s tracks
   * @param {Array<RTCRtpEncodingParameters>|null} [o.simulcast] the camera's simulcast layers
   *   (default SIMULCAST_LAYERS; null sends one layer)
   * @param {RTCDegradationPreference} [o.degradationPreference] for the camera's sender
   * @param {string|null} [o.videoCodec] the camera's codec, by MIME type ("video/VP9",
   *   "video/AV1"), offered first; default: the browser's order (VP8 in Chromium). For
   *   scalable video, pass one encoding with a `scalabilityMode` as `simulcast`, e.g.
   *   `[{ scalabilityMode: "L3T3_KEY" }]`: the focus picks each subscriber's spatial and
   *   temporal layers from the dependency descriptor
   * @param {boolean} [o.dataChannel] open the data channel to the focus (default true): needed
   *   for subscriptions, speaker and pause notices, and dynacast
   * @param {import("./e2ee/media-encryption.js").MediaEncryption|null} [o.encryption] encrypts
   *   every frame we send and decrypts what we receive (end-to-end encryption; the focus only
   *   forwards); null sends media as the encoder made it
   * @param {(...args) => void} [o.log]
   */
  constructor({
    client,
    roomId,
    confId,
    focus,
    stream,
    getUserMedia,
    simulcast = SIMULCAST_LAYERS,
    degradationPreference,
    videoCodec = null,
    dataChannel = true,
    encryption = null,
    log,
  }) {
    super();
    if (!client || !roomId || !confId || !focus?.userId || !focus?.deviceId || !focus?.sessionId || !stream) {
      throw new Error("WeirCall needs client, roomId, confId, focus {userId, deviceId, sessionId} and stream");
    }
    this.client = client;
    this.roomId = roomId;
    this.confId = confId;
    this.focus = focus;
    this.sourceStream = stream;
    this.log = log ?? ((...a) => console.log("[weir-call]", ...a));
    this.call = null;
    this.ended = false;
    this.hangupReason = null;
    this.refreshTimer = null;
    this.watchedFeeds = new WeakSet();
    this.simulcast = simulcast ? simulcast.map((e) => ({ ...e })) : null;
    this.degradationPreference = degradationPreference ?? null;
    this.videoCodec = videoCodec;
    this.wantsDataChannel = dataChannel;
    this.encryption = encryption;
    this.channel = null;
    /** The `seq` of the newest `io.weir.paused` applied, per "stream_id track_id". */
    this.noticeSeq = new Map();
    /** The latest `io.weir.layers` content per mid of ours (what the focus asked us to encode). */
    this.layerRequests = new Map();
    /** setParameters calls run one after another (each is a get/set transaction). */
    this.senderUpdates = Promise.resolve();
    this.getUserMedia = getUserMedia ?? (async (audio, video) => this.cloneSource(audio, video));
    this.patchMediaHandler();
  }

  cloneSource(audio = true, video = true) {
    const tracks = [];
    if (audio) tracks.push(...this.sourceStream.getAudioTracks().map((t) => t.clone()));
    if (video) tracks.push(...this.sourceStream.getVideoTracks().map((t) => t.clone()));
    return new MediaStream(tracks);
  }

  // js-sdk re-acquires media through the client's MediaHandler (e.g. after a video mute it stops
  // the camera track and asks for a new one on unmute). Route that to our source instead of the
  // real getUserMedia, so the call keeps sending the same picture.
  patchMediaHandler() {
    const mh = this.client.getMediaHandler();
    if (mh.__weirPatched) {
      mh.__weirGetUserMedia = this.getUserMedia;
      return;
    }
    mh.__weirPatched = true;
    mh.__weirGetUserMedia = this.getUserMedia;
    mh.getUserMediaStream = async (audio, video) => {
      const s = await mh.__weirGetUserMedia(audio, video);
      mh.userMediaStreams.push(s);
      return s;
    };
  }

  /**
   * Our device entry: what js-sdk 43 GroupCall writes, plus MSC3898 `foci.active` naming the focus
   * this device calls. In a cascade (docs/cascading.md) the foci discover each other from these
   * entries, and a focus accepts a trunk only from a focus some member device names.
   */
  deviceEntry() {
    return {
      device_id: this.client.getDeviceId(),
      session_id: this.client.getSessionId(),
      expires_ts: Date.now() + DEVICE_TTL_MS,
      feeds: [{ purpose: "m.usermedia" }],
      "org.matrix.msc3898.foci.active": [
        { user_id: this.focus.userId, device_id: this.focus.deviceId, session_id: this.focus.sessionId },
      ],
    };
  }

  /**
   * Rewrite our `m.call.member` state: keep other calls and other devices (dropping expired ones),
   * replace or remove this device's entry in the entry for our conf id.
   */
  async updateMemberState(present) {
    const userId = this.client.getUserId();
    const now = Date.now();
    const room = this.client.getRoom(this.roomId);
    const ev = room?.currentState.getStateEvents(CALL_MEMBER_TYPE, userId);
    const content = ev?.getContent() ?? {};
    const calls = Array.isArray(content["m.calls"]) ? content["m.calls"] : [];
    const myDevice = this.client.getDeviceId();

    const others = calls.filter((c) => c?.["m.call_id"] !== this.confId);
    const mine = calls.find((c) => c?.["m.call_id"] === this.confId);
    const devices = (Array.isArray(mine?.["m.devices"]) ? mine["m.devices"] : []).filter(
      (d) => d?.device_id !== myDevice && typeof d?.expires_ts === "number" && d.expires_ts > now,
    );
    if (present) devices.push(this.deviceEntry());

    const newCalls = [...others];
    if (devices.length > 0) {
      newCalls.push({ "m.call_id": this.confId, "m.devices": devices, "m.foci": [this.focus.userId] });
    }
    await this.client.sendStateEvent(this.roomId, CALL_MEMBER_TYPE, { "m.calls": newCalls }, userId);
  }

  /** Wait until our own sync shows our device entry (the focus reads the same room state). */
  async waitForOwnMemberEntry(timeoutMs) {
    const userId = this.client.getUserId();
    const sessionId = this.client.getSessionId();
    const deviceId = this.client.getDeviceId();
    await pollUntil(
      "own m.call.member entry to come back through sync",
      () => {
        const ev = this.client.getRoom(this.roomId)?.currentState.getStateEvents(CALL_MEMBER_TYPE, userId);
        const call = ev?.getContent()?.["m.calls"]?.find?.((c) => c["m.call_id"] === this.confId);
        return call?.["m.devices"]?.some?.((d) => d.device_id === deviceId && d.session_id === sessionId);
      },
      timeoutMs,
    );
  }

  /**
   * Publish membership, wait for the GroupCall, place the call to the focus.
   * `publishMember: false` skips the m.call.member entry (only for testing that the focus refuses
   * such an invite).
   */
  async join({ timeoutMs = 30000, publishMember = true } = {}) {
    if (this.call) throw new Error("join() called twice; make a new WeirCall to call again");
    const { client, roomId, confId, focus } = this;
    const stillJoining = () => {
      if (this.ended) throw new Error("hung up while joining");
    };
    await waitForGroupCall(client, roomId, confId, timeoutMs);
    // The focus must be a room member, or js-sdk crashes on its streams (protocol.md §c.11 item 2).
    await waitForJoinedMember(client, roomId, focus.userId, timeoutMs);
    stillJoining();

    if (publishMember) {
      await this.updateMemberState(true);
      if (this.ended) {
        // hangup() ran meanwhile and withdrew the entry before we wrote it: withdraw it again
        await this.updateMemberState(false);
        stillJoining();
      }
      await this.waitForOwnMemberEntry(timeoutMs);
      stillJoining();
      this.refreshTimer = setInterval(() => {
        this.updateMemberState(true).catch((e) => this.log("refreshing m.call.member failed", e));
      }, DEVICE_REFRESH_MS);
    }

    const call = createNewMatrixCall(client, roomId, {
      invitee: focus.userId,
      opponentDeviceId: focus.deviceId,
      opponentSessionId: focus.sessionId,
      groupCallId: confId,
    });
    if (!call) throw new Error("createNewMatrixCall returned null: this browser does not support WebRTC calls");
    this.call = call;

    // Before js-sdk adds our tracks: the camera goes out as simulcast, and the data channel is
    // part of the first offer.
    call.on(CallEvent.PeerConnectionCreated, (pc) => this.preparePeerConnection(pc));
    call.on(CallEvent.Error, (err) => {
      this.log("call error", err?.code, err?.message ?? err);
      this.dispatchEvent(new CustomEvent("error", { detail: err }));
    });
    call.on(CallEvent.State, (state, old) => {
      this.log(`call ${call.callId} state ${old} -> ${state}`);
      this.dispatchEvent(new CustomEvent("state", { detail: { state, old } }));
    });
    call.on(CallEvent.FeedsChanged, () => {
      this.watchFeeds();
      this.updateReceiverOwners();
      this.dispatchEvent(new CustomEvent("feeds", { detail: this.remoteFeeds() }));
    });
    call.on(CallEvent.Hangup, () => {
      this.ended = true;
      this.hangupReason = call.hangupReason ?? null;
      this.hangupParty = call.hangupParty ?? null;
      this.log(`call ${call.callId} ended: ${call.hangupReason} by ${call.hangupParty}`);
      clearInterval(this.refreshTimer);
      this.dispatchEvent(
        new CustomEvent("hangup", { detail: { reason: call.hangupReason, party: call.hangupParty } }),
      );
    });

    const local = this.cloneSource(true, true);
    const feed = new CallFeed({
      client,
      roomId,
      userId: client.getUserId(),
      deviceId: client.getDeviceId(),
      stream: local,
      purpose: "m.usermedia",
      audioMuted: false,
      videoMuted: false,
    });
    this.log(`placing call ${call.callId} to ${focus.userId}/${focus.deviceId} session ${focus.sessionId}`);
    await call.placeCallWithCallFeeds([feed]);
    return call;
  }

  /**
   * A fresh peer connection of our call: publish video tracks with simulcast layers (js-sdk adds
   * tracks with addTrack, which cannot; an added transceiver with sendEncodings can) and open
   * the data channel.
   */
  preparePeerConnection(pc) {
    // first, so that every sender added below (simulcast included) gets its transform
    if (this.encryption) this.encryption.attachPeerConnection(pc, (streamId) => this.ownerParticipant(streamId));
    if (this.simulcast || this.videoCodec) {
      const addTrack = pc.addTrack.bind(pc);
      pc.addTrack = (track, ...streams) => {
        if (track.kind !== "video") return addTrack(track, ...streams);
        const t = pc.addTransceiver(track, {
          direction: "sendrecv",
          streams,
          sendEncodings: (this.simulcast ?? [{}]).map((e) => ({ ...e })),
        });
        if (this.videoCodec) preferCodec(t, this.videoCodec);
        const layers = (this.simulcast ?? []).map((e) => e.rid ?? e.scalabilityMode ?? "one layer").join("/");
        this.log(`camera ${track.id} published as ${this.videoCodec ?? "default codec"} ${layers}`);
        return t.sender;
      };
    }
    if (this.degradationPreference) {
      const addTrack = pc.addTrack;
      pc.addTrack = (track, ...streams) => {
        const sender = addTrack.call(pc, track, ...streams);
        if (track.kind === "video") this.updateSender(sender, (p) => (p.degradationPreference = this.degradationPreference));
        return sender;
      };
    }
    if (this.wantsDataChannel) this.openChannel();
  }

  openChannel() {
    const ch = this.call.createDataChannel(DATA_CHANNEL_LABEL, { ordered: true });
    this.channel = ch;
    ch.addEventListener("open", () => {
      this.log("data channel to the focus open");
      this.dispatchEvent(new CustomEvent("channel"));
    });
    ch.addEventListener("message", (e) => this.onChannelMessage(e.data));
    // Pause notices come on a channel of their own, unordered: on the ordered one, a notice
    // lost on a congested link holds back every later message until SCTP resends it.
    const notices = this.call.createDataChannel(NOTICES_LABEL, { ordered: false });
    notices.addEventListener("message", (e) => this.onChannelMessage(e.data));
  }

  /** Messages from the focus (docs/data-channel.md); unknown types are ignored. */
  onChannelMessage(data) {
    if (typeof data !== "string") return;
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      this.log("data channel: a message that is not JSON, ignored");
      return;
    }
    const content = msg?.content ?? {};
    switch (msg?.type) {
      case "io.weir.speakers":
        this.dispatchEvent(new CustomEvent("speakers", { detail: content }));
        break;
      case "io.weir.streams":
        this.dispatchEvent(new CustomEvent("streams", { detail: content }));
        break;
      case "io.weir.paused": {
        // Numbered: on the unordered channel an older notice may arrive after a newer one.
        const key = `${content.stream_id} ${content.track_id}`;
        if (Number.isInteger(content.seq)) {
          if (content.seq <= (this.noticeSeq.get(key) ?? 0)) break;
          this.noticeSeq.set(key, content.seq);
        }
        this.dispatchEvent(new CustomEvent("paused", { detail: content }));
        break;
      }
      case "io.weir.layers":
        this.applyLayers(content);
        break;
      default:
        break;
    }
  }

  /** Whether the data channel to the focus is open. */
  get channelOpen() {
    return this.channel?.readyState === "open";
  }

  /** Send one data-channel message to the focus. */
  sendToFocus(type, content) {
    if (!this.channelOpen) throw new Error("the data channel to the focus is not open");
    this.channel.send(JSON.stringify({ type, content }));
  }

  /**
   * What we want to receive (MSC3898 `m.call.track_subscription`, docs/data-channel.md): each
   * entry `{streamId, trackId, width?, height?}`; the size is that of the tile showing it and
   * picks the simulcast layer. `unsubscribe` lists tracks to drop. From the first call on we
   * receive exactly the tracks subscribed.
   */
  subscribe(subscribe, unsubscribe = []) {
    const entry = (t) => {
      const e = { stream_id: t.streamId, track_id: t.trackId };
      if (t.width) e.width = Math.round(t.width);
      if (t.height) e.height = Math.round(t.height);
      return e;
    };
    this.sendToFocus("m.call.track_subscription", {
      subscribe: subscribe.map(entry),
      unsubscribe: unsubscribe.map(entry),
    });
  }

  /** The track ids of a remote stream by kind, from the focus's metadata. */
  remoteTrackIds(streamId) {
    const tracks = this.streamMetadata(streamId)?.tracks ?? {};
    const out = { audio: [], video: [] };
    for (const [id, t] of Object.entries(tracks)) out[t?.kind === "audio" ? "audio" : "video"].push(id);
    return out;
  }

  /**
   * Dynacast: encode only the layers the focus says someone needs. The focus names our
   * transceiver by mid; layers it leaves out are set inactive, so the encoder stops producing
   * them, and a layer set active again starts with a keyframe.
   */
  applyLayers(content) {
    const mid = String(content?.mid ?? "");
    const active = Array.isArray(content?.active) ? content.active.filter((r) => typeof r === "string") : null;
    const spatial = Number.isInteger(content?.spatial_layers) ? content.spatial_layers : null;
    if (!mid || (!active && spatial === null)) return;
    this.layerRequests.set(mid, active ?? { spatial_layers: spatial });
    const t = this.peerConnection?.getTransceivers().find((x) => x.mid === mid);
    if (!t) {
      this.log(`io.weir.layers for mid ${mid}, which is not ours`);
      return;
    }
    if (!active) {
      this.applySpatialLayers(t, mid, spatial);
      return;
    }
    this.updateSender(t.sender, (p) => {
      for (const enc of p.encodings ?? []) {
        if (enc.rid) enc.active = active.includes(enc.rid);
      }
    }).then(() => {
      this.log(`mid ${mid}: encoding ${active.length ? active.join("/") : "nothing"}`);
      this.dispatchEvent(new CustomEvent("layers", { detail: { mid, active } }));
    });
  }

  /**
   * Dynacast for a scalable camera (one encoding whose `scalabilityMode` is `LxTy…`): encode
   * only the `n` smallest spatial layers, each at the size it had, by asking for a mode with
   * `n` spatial layers and scaling the input down so that its top layer is the `n`-th one's
   * size; 0 stops the encoding. Chromium starts each new mode with a keyframe.
   */
  applySpatialLayers(t, mid, n) {
    const published = this.simulcast?.[0];
    const mode = /^L(\d)T(\d)(.*)$/.exec(published?.scalabilityMode ?? "");
    if (!mode) {
      this.log(`io.weir.layers spatial_layers for mid ${mid}, which we do not send as scalable video`);
      return;
    }
    const full = Number(mode[1]);
    const layers = Math.min(Math.max(n, 0), full);
    // `L2T3h`: each spatial layer 1.5 times the one below; otherwise twice.
    const ratio = mode[3].startsWith("h") ? 1.5 : 2;
    this.updateSender(t.sender, (p) => {
      const enc = p.encodings?.[0];
      if (!enc) return;
      enc.active = layers > 0;
      if (layers === 0) return;
      enc.scalabilityMode = layers === 1 ? `L1T${mode[2]}` : `L${layers}T${mode[2]}${mode[3]}`;
      enc.scaleResolutionDownBy = (published.scaleResolutionDownBy ?? 1) * ratio ** (full - layers);
    }).then(() => {
      this.log(`mid ${mid}: encoding ${layers} of ${full} spatial layers`);
      this.dispatchEvent(new CustomEvent("layers", { detail: { mid, spatialLayers: layers } }));
    });
  }

  /** Change a sender's parameters, one change at a time. */
  updateSender(sender, change) {
    this.senderUpdates = this.senderUpdates
      .then(async () => {
        const p = sender.getParameters();
        change(p);
        await sender.setParameters(p);
      })
      .catch((e) => this.log("setParameters failed", e?.message ?? e));
    return this.senderUpdates;
  }

  watchFeeds() {
    for (const feed of this.call?.getRemoteFeeds() ?? []) {
      if (this.watchedFeeds.has(feed)) continue;
      this.watchedFeeds.add(feed);
      feed.on(CallFeedEvent.MuteStateChanged, () => {
        const rec = this.remoteFeeds().find((r) => r.feed === feed);
        if (rec) this.dispatchEvent(new CustomEvent("mute", { detail: rec }));
      });
    }
  }

  /** "userId|deviceId" of a received stream's owner, from the focus's metadata, or null. */
  ownerParticipant(streamId) {
    const md = this.streamMetadata(streamId);
    return md?.user_id && md?.device_id ? `${md.user_id}|${md.device_id}` : null;
  }

  /** Tell the frame decryption whose media each receiver carries now (the focus reuses m-lines). */
  updateReceiverOwners() {
    const pc = this.peerConnection;
    if (!this.encryption || !pc) return;
    for (const feed of this.call.getRemoteFeeds()) {
      const owner = this.ownerParticipant(feed.stream.id);
      if (!owner) continue;
      for (const track of feed.stream.getTracks()) {
        const receiver = pc.getReceivers().find((r) => r.track === track);
        if (receiver) this.encryption.attachReceiver(receiver, owner);
      }
    }
  }

  /**
   * The devices in this call now: every unexpired device entry for our conf id in the room's
   * `m.call.member` state (ours included). [{userId, deviceId, sessionId}]
   */
  memberDevices() {
    return callMemberDevices(this.client, this.roomId, this.confId);
  }

  /**
   * Send from another camera or microphone (device selection): the new stream's tracks replace
   * ours on the existing senders, so simulcast, encryption and the focus's m-lines stay.
   */
  async setInputStream(stream) {
    this.sourceStream = stream;
    if (!this.call) return;
    await this.call.updateLocalUsermediaStream(this.cloneSource(true, true));
  }

  /**
   * Share a screen: an `m.screenshare` feed the focus forwards like a camera (and serves first
   * when bandwidth is short). Returns whether we share now.
   *
   * js-sdk 43's own `setScreensharingEnabled` gives the new feed the *opponent's* device id
   * (the focus's), so the feed does not count as local: it is left out of the stream metadata
   * of the offer that adds it, and the focus sees an undescribed stream. So the feed is made
   * here, with our own device id, and handed to js-sdk, which adds its tracks and renegotiates.
   */
  async setScreensharing(enabled) {
    const call = this.call;
    if (!call) throw new Error("not in a call");
    const mh = this.client.getMediaHandler();
    if (enabled) {
      if (call.isScreensharing()) return true;
      const stream = await mh.getScreensharingStream();
      if (!stream) return false;
      // the browser's own "stop sharing" ends the track
      for (const t of stream.getVideoTracks()) {
        t.addEventListener("ended", () => {
          if (call.localScreensharingStream === stream) this.setScreensharing(false).catch(() => undefined);
        });
      }
      call.pushLocalFeed(
        new CallFeed({
          client: this.client,
          roomId: this.roomId,
          userId: this.client.getUserId(),
          deviceId: this.client.getDeviceId(),
          stream,
          purpose: "m.screenshare",
          audioMuted: false,
          videoMuted: false,
        }),
      );
      return true;
    }
    const stream = call.localScreensharingStream;
    if (!stream) return false;
    for (const kind of ["audio", "video"]) {
      const sender = call.transceivers?.get(`m.screenshare:${kind}`)?.sender;
      if (sender) call.peerConn.removeTrack(sender);
    }
    mh.stopScreensharingStream(stream);
    call.deleteFeedByStream(stream);
    return false;
  }

  isScreensharing() {
    return this.call?.isScreensharing() ?? false;
  }

  /** The focus's metadata for a stream id (private js-sdk field, read at runtime). */
  streamMetadata(streamId) {
    return this.call?.remoteSDPStreamMetadata?.[streamId] ?? null;
  }

  /**
   * Remote feeds with their real owner from the focus's metadata. `ownerUserId` is null when the
   * focus did not name one (then only the focus's own user id is known, as `feed.userId`).
   */
  remoteFeeds() {
    if (!this.call) return [];
    return this.call.getRemoteFeeds().map((feed) => {
      const md = this.streamMetadata(feed.stream.id) ?? {};
      return {
        feed,
        stream: feed.stream,
        streamId: feed.stream.id,
        purpose: feed.purpose,
        ownerUserId: md.user_id ?? null,
        ownerDeviceId: md.device_id ?? null,
        audioMuted: feed.isAudioMuted(),
        videoMuted: feed.isVideoMuted(),
      };
    });
  }

  /** Remote feeds owned by userId (optionally one device). */
  feedsOf(userId, deviceId) {
    return this.remoteFeeds().filter(
      (f) => f.ownerUserId === userId && (deviceId === undefined || f.ownerDeviceId === deviceId),
    );
  }

  get state() {
    return this.call?.state ?? null;
  }

  get peerConnection() {
    return this.call?.peerConn ?? null;
  }

  async setAudioMuted(muted) {
    if (!this.call) throw new Error("not in a call");
    return this.call.setMicrophoneMuted(muted);
  }

  async setVideoMuted(muted) {
    if (!this.call) throw new Error("not in a call");
    return this.call.setLocalVideoMuted(muted);
  }

  isAudioMuted() {
    return this.call?.isMicrophoneMuted() ?? false;
  }

  isVideoMuted() {
    return this.call?.isLocalVideoMuted() ?? false;
  }

  /**
   * End this call to the focus but keep our `m.call.member` entry: the caller is about to call
   * again (a reconnection), and the others should not see us leave.
   */
  abandon(reason = CallErrorCode.IceFailed) {
    clearInterval(this.refreshTimer);
    this.refreshTimer = null;
    this.ended = true;
    try {
      if (this.call && this.call.state !== CallState.Ended) this.call.hangup(reason, false);
    } catch {
      // already ended
    }
  }

  /** Hang up (sends m.call.hangup to the focus) and remove our m.call.member device entry. */
  async hangup(reason = CallErrorCode.UserHangup) {
    clearInterval(this.refreshTimer);
    this.refreshTimer = null;
    if (this.call && this.call.state !== CallState.Ended) {
      this.call.hangup(reason, false);
    }
    this.ended = true;
    try {
      await this.updateMemberState(false);
    } catch (e) {
      this.log("removing m.call.member entry failed", e);
      throw e;
    }
  }
}
