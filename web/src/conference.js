// WeirConference: a whole call as an app or an embedding page sees it. It joins a room's
// MSC3401 call through a weir focus (one WeirCall), keeps a list of participants with their
// tracks, mute state, speaking state and key state, asks the focus only for the videos on
// screen and at the size they are shown, encrypts media end to end in encrypted rooms, and
// reconnects by itself after a network change or a focus restart.
//
//   const conf = new WeirConference({ client, roomId, focus, workerUrl });
//   conf.addEventListener("participants", (e) => render(e.detail));
//   await conf.join({ stream });            // or join() to open the camera and microphone
//   conf.setVideoViews([{ participant, purpose: "m.usermedia", width: 640, height: 360 }]);
//   conf.setAudioMuted(true); await conf.setScreensharing(true); await conf.leave();
//
// The API is documented in web/README.md.

import { RoomStateEvent } from "matrix-js-sdk";
import { WeirCall, CALL_STATE_TYPE, callStateContent, callMemberDevices, waitForJoinedMember } from "./weir-call.js";
import { KeyExchange, participantId } from "./e2ee/key-exchange.js";
import { MediaEncryption, encodedTransformsSupported, requestInsertableStreams } from "./e2ee/media-encryption.js";

/**
 * Waits between reconnection attempts after the call to the focus ended without us leaving.
 * Short first (a focus restart takes a second or two), capped so a long outage costs one
 * attempt every 10 s. An attempt that connects resets the sequence.
 */
export const RECONNECT_DELAYS_MS = [500, 1000, 2000, 5000, 10000];

/**
 * ICE reported "disconnected" for this long counts as a lost connection (the network changed
 * under us): we hang up and call again rather than wait for js-sdk's 30 s timeout. Shorter
 * reconnects sooner after a real change but also after a brief wobble of a mobile link.
 */
export const ICE_DISCONNECTED_GRACE_MS = 4000;

/** How long a WeirCall's join may take before we give up on it and try again. */
const JOIN_TIMEOUT_MS = 30000;

/**
 * A call must stay connected this long before the reconnection delays start over: a call that
 * connects and drops again at once keeps backing off instead of retrying every 0.5 s.
 */
export const STABLE_AFTER_MS = 10000;

/** Thrown inside join() when leave() was called meanwhile. */
class Left extends Error {}

/** A js-sdk 43 conf id (`genCallID`): the time and 16 random letters and digits. */
export function newConfId() {
  const chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
  const b = crypto.getRandomValues(new Uint8Array(16));
  return String(Date.now()) + [...b].map((x) => chars[x % chars.length]).join("");
}

/**
 * The conf id of the room's call, or null: the call js-sdk has taken up for the room (js-sdk
 * keeps one per room and routes call events by it), else the newest `org.matrix.msc3401.call`
 * state that has not been terminated (what js-sdk takes up at start).
 */
export function currentConfId(client, roomId) {
  const taken = client.getGroupCallForRoom?.(roomId)?.groupCallId;
  if (taken) return taken;
  const room = client.getRoom(roomId);
  if (!room) return null;
  const calls = room.currentState
    .getStateEvents(CALL_STATE_TYPE)
    .filter((e) => e.getStateKey() && !e.getContent()?.["m.terminated"] && Object.keys(e.getContent() ?? {}).length > 0);
  calls.sort((a, b) => b.getTs() - a.getTs());
  return calls[0]?.getStateKey() ?? null;
}

/**
 * Events (EventTarget; `detail`):
 *   "participants" the participant list changed (detail: participants())
 *   "connection"   {state: "idle"|"connecting"|"connected"|"reconnecting"|"ended", reason?}
 *   "speakers"     {dominant: participant id|null, speaking: [participant id]}
 *   "local"        our own media changed: {stream, audioMuted, videoMuted, screen: MediaStream|null}
 *   "encryption"   {enabled, unreachable: [{userId, deviceId, reason}]}
 */
export class WeirConference extends EventTarget {
  /**
   * @param {object} o
   * @param {import("matrix-js-sdk").MatrixClient} o.client started and synced; Rust crypto
   *   initialised for encrypted rooms
   * @param {string} o.roomId
   * @param {{userId: string, deviceId: string, sessionId: string}} o.focus the focus to call
   * @param {string|URL} [o.workerUrl] the frame-encryption worker (dist/e2ee-worker.js);
   *   needed for encrypted rooms
   * @param {boolean|"auto"} [o.encryption] "auto" (default): encrypt when the room is encrypted
   * @param {string} [o.confId] the call's conf id; default: the room's current call, or a new one
   * @param {Array<RTCRtpEncodingParameters>|null} [o.simulcast] as WeirCall
   * @param {boolean} [o.blockKeyExchange] drop every key other devices send (tests: a
   *   participant without the key)
   * @param {(...a) => void} [o.log]
   */
  constructor({ client, roomId, focus, workerUrl, encryption = "auto", confId, simulcast, blockKeyExchange = false, log }) {
    super();
    this.client = client;
    this.roomId = roomId;
    this.focus = focus;
    this.workerUrl = workerUrl;
    this.encryptionSetting = encryption;
    this.confId = confId ?? null;
    this.simulcast = simulcast;
    this.blockKeyExchange = blockKeyExchange;
    this.stableTimer = null;
    this.log = log ?? ((...a) => console.log("[weir-conf]", ...a));
    this.me = participantId(client.getUserId(), client.getDeviceId());
    this.call = null;
    this.stream = null;
    this.ownsStream = false;
    this.connection = "idle";
    this.attempt = 0;
    this.reconnectTimer = null;
    this.iceTimer = null;
    this.leaving = false;
    this.views = [];
    this.sentSubscription = "";
    /** The conference's streams as the focus announced them (io.weir.streams). */
    this.streams = {};
    /** @type {{dominant: string|null, speaking: string[]}} who speaks, as participant ids */
    this.speakers = { dominant: null, speaking: [] };
    this.paused = new Set();
    this.keys = null;
    this.media = null;
    this.audioMuted = false;
    this.videoMuted = false;
    this.unreachable = [];
    /** "userId|deviceId" → whether that device is verified (filled asynchronously). */
    this.verified = new Map();
    this.onMembers = (ev) => {
      if (ev.getType() === "org.matrix.msc3401.call.member") this.membersChanged();
    };
    this.onOnline = () => {
      // only while waiting to retry: an attempt under way is not started twice
      if (this.reconnectTimer !== null) this.reconnectNow();
    };
  }

  /** Whether this call encrypts media end to end (decided at join from the room's setting). */
  get encrypted() {
    return this.media !== null && this.media.enabled;
  }

  /**
   * Join: open the camera and microphone unless `stream` is given, make sure the room has a
   * call and the focus is in the room, then call the focus.
   * @param {{stream?: MediaStream, audio?: boolean|MediaTrackConstraints, video?: boolean|MediaTrackConstraints}} [o]
   */
  async join({ stream, audio = true, video = true } = {}) {
    if (this.call || this.connection !== "idle") throw new Error("join() called twice");
    this.setConnection("connecting");
    const stillJoining = () => {
      if (this.leaving) throw new Left();
    };
    try {
      const got = stream ?? (await navigator.mediaDevices.getUserMedia({ audio, video }));
      if (this.leaving) {
        if (!stream) for (const t of got.getTracks()) t.stop();
        throw new Left();
      }
      this.stream = got;
      this.ownsStream = !stream;
      await this.client.waitUntilRoomReadyForGroupCalls(this.roomId);
      stillJoining();
      this.confId ??= currentConfId(this.client, this.roomId);
      if (!this.confId) {
        // Two people starting a call in the same second may each create one; js-sdk then sticks
        // to the first it saw. Start a call first and let the others join it.
        const mine = newConfId();
        await this.client.sendStateEvent(this.roomId, CALL_STATE_TYPE, callStateContent(), mine);
        // js-sdk takes up one call per room and routes call events by it: ours, or one it
        // learned of meanwhile (a client that has just started may not have taken up the
        // room's call yet). Its choice is the call.
        this.confId = await this.takenCall(JOIN_TIMEOUT_MS);
        if (this.confId !== mine) this.log(`joining the room's call ${this.confId}, not the one just made`);
        stillJoining();
      }
      await this.ensureFocusInRoom();
      stillJoining();
      await this.setUpEncryption();
      stillJoining();
    } catch (e) {
      if (e instanceof Left) return;
      throw e;
    }
    this.client.on(RoomStateEvent.Events, this.onMembers);
    window.addEventListener("online", this.onOnline);
    this.emitLocal();
    await this.connect();
  }

  /** The conf id of the call js-sdk takes up for the room, once it has one. */
  async takenCall(timeoutMs) {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const id = this.client.getGroupCallForRoom(this.roomId)?.groupCallId;
      if (id) return id;
      if (Date.now() > deadline || this.leaving) throw new Error("js-sdk took up no call for the room");
      await new Promise((r) => setTimeout(r, 100));
    }
  }

  async ensureFocusInRoom() {
    const member = this.client.getRoom(this.roomId)?.getMember(this.focus.userId);
    if (member?.membership === "join") return;
    if (member?.membership !== "invite") {
      this.log(`inviting the focus ${this.focus.userId} to the room`);
      await this.client.invite(this.roomId, this.focus.userId);
    }
    await waitForJoinedMember(this.client, this.roomId, this.focus.userId, JOIN_TIMEOUT_MS);
  }

  async setUpEncryption() {
    const roomEncrypted = await this.client.getCrypto()?.isEncryptionEnabledInRoom(this.roomId);
    const want = this.encryptionSetting === "auto" ? Boolean(roomEncrypted) : Boolean(this.encryptionSetting);
    if (!want) return;
    if (!this.client.getCrypto()) throw new Error("this room is encrypted: the client needs crypto (initRustCrypto)");
    if (!encodedTransformsSupported()) throw new Error("this browser cannot encrypt media (no encoded transforms)");
    if (!this.workerUrl) throw new Error("encrypted calls need workerUrl (the e2ee worker)");
    requestInsertableStreams(); // a no-op where RTCRtpScriptTransform exists
    this.media = new MediaEncryption({ workerUrl: this.workerUrl, enabled: true, localParticipant: this.me, log: this.log });
    this.keys = new KeyExchange({ client: this.client, roomId: this.roomId, log: this.log });
    this.keys.blocked = this.blockKeyExchange;
    this.keys.addEventListener("key", (e) => {
      const k = e.detail;
      this.media.setKey(k.participant, k.index, k.key);
      if (!k.local) {
        this.emitParticipants();
        void this.refreshVerification();
      }
    });
    this.keys.addEventListener("use", (e) => this.media.useKey(e.detail.index));
    this.keys.addEventListener("reachability", (e) => {
      this.unreachable = e.detail.unreachable;
      this.dispatchEvent(new CustomEvent("encryption", { detail: { enabled: true, unreachable: this.unreachable } }));
      this.emitParticipants();
    });
    this.keys.start();
    this.dispatchEvent(new CustomEvent("encryption", { detail: { enabled: true, unreachable: [] } }));
  }

  membersChanged() {
    this.keys?.setMembers(this.memberDevices());
    this.emitParticipants();
    void this.refreshVerification();
  }

  /**
   * Whether each member device is verified (cross-signed by a user we verified, or verified
   * locally). An encrypted call names unverified devices: their key is Olm-encrypted to a
   * device whose owner we have not confirmed.
   */
  async refreshVerification() {
    const crypto = this.client.getCrypto();
    if (!crypto || !this.keys) return;
    let changed = false;
    for (const d of this.memberDevices()) {
      const id = participantId(d.userId, d.deviceId);
      if (id === this.me) continue;
      const status = await crypto.getDeviceVerificationStatus(d.userId, d.deviceId).catch(() => null);
      const verified = status ? status.isVerified() : false;
      if (this.verified.get(id) !== verified) {
        this.verified.set(id, verified);
        changed = true;
      }
    }
    if (changed) this.emitParticipants();
  }

  memberDevices() {
    return this.confId ? callMemberDevices(this.client, this.roomId, this.confId) : [];
  }

  async connect() {
    this.reconnectTimer = null;
    if (this.leaving) return;
    // never two calls from this device: end any earlier one (its member entry stays ours)
    this.call?.abandon();
    // what the focus told the previous call is stale; the new one is told afresh
    this.streams = {};
    this.paused.clear();
    this.speakers = { dominant: null, speaking: [] };
    const call = new WeirCall({
      client: this.client,
      roomId: this.roomId,
      confId: this.confId,
      focus: this.focus,
      stream: this.stream,
      simulcast: this.simulcast,
      encryption: this.media,
      log: this.log,
    });
    this.call = call;
    this.sentSubscription = "";
    call.addEventListener("feeds", () => {
      this.emitParticipants();
      this.sendSubscription();
    });
    call.addEventListener("mute", () => this.emitParticipants());
    call.addEventListener("channel", () => this.sendSubscription());
    call.addEventListener("streams", (e) => {
      this.streams = e.detail?.streams ?? {};
      this.log(`the focus announced ${Object.keys(this.streams).length} streams`);
      this.emitParticipants();
      this.sendSubscription();
    });
    call.addEventListener("speakers", (e) => {
      const id = (s) => (s?.user_id && s?.device_id ? participantId(s.user_id, s.device_id) : null);
      this.speakers = { dominant: id(e.detail?.dominant), speaking: (e.detail?.speaking ?? []).map(id).filter(Boolean) };
      this.dispatchEvent(new CustomEvent("speakers", { detail: this.speakers }));
      this.emitParticipants();
    });
    call.addEventListener("paused", (e) => {
      const key = `${e.detail?.stream_id}|${e.detail?.track_id}`;
      if (e.detail?.paused) this.paused.add(key);
      else this.paused.delete(key);
      this.emitParticipants();
    });
    call.addEventListener("state", (e) => {
      if (call !== this.call) return;
      if (e.detail.state === "connected") {
        this.setConnection("connected");
        this.watchIce(call);
        clearTimeout(this.stableTimer);
        this.stableTimer = setTimeout(() => {
          if (call === this.call && this.connection === "connected") this.attempt = 0;
        }, STABLE_AFTER_MS);
      }
    });
    call.addEventListener("hangup", (e) => {
      if (call !== this.call) return;
      clearTimeout(this.iceTimer);
      if (this.leaving) return;
      this.log(`call to the focus ended (${e.detail?.reason} by ${e.detail?.party}): reconnecting`);
      this.scheduleReconnect(e.detail?.reason);
    });
    try {
      await call.join({ timeoutMs: JOIN_TIMEOUT_MS });
      if (this.leaving || call !== this.call) return; // leave() hangs it up
      // a reconnection keeps what the user had muted
      if (this.audioMuted) await call.setAudioMuted(true);
      if (this.videoMuted) await call.setVideoMuted(true);
      this.keys?.setMembers(this.memberDevices());
    } catch (e) {
      if (call !== this.call || this.leaving) return;
      this.log("joining failed", e?.message ?? e);
      this.scheduleReconnect(e?.message ?? String(e));
    }
  }

  /** Lost ICE (a network change): hang up and call again rather than wait for js-sdk. */
  watchIce(call) {
    const pc = call.peerConnection;
    if (!pc) return;
    const check = () => {
      if (call !== this.call) return;
      const s = pc.iceConnectionState;
      if (s === "failed") return this.dropCall(call, "ice_failed");
      if (s === "disconnected") {
        clearTimeout(this.iceTimer);
        this.iceTimer = setTimeout(() => {
          if (pc.iceConnectionState === "disconnected") this.dropCall(call, "ice_disconnected");
        }, ICE_DISCONNECTED_GRACE_MS);
      } else clearTimeout(this.iceTimer);
    };
    pc.addEventListener("iceconnectionstatechange", check);
  }

  dropCall(call, reason) {
    if (call !== this.call || this.leaving) return;
    this.log(`connection lost (${reason}): calling the focus again`);
    call.abandon();
    this.scheduleReconnect(reason);
  }

  scheduleReconnect(reason) {
    this.call?.abandon();
    this.call = null;
    clearTimeout(this.stableTimer);
    this.setConnection("reconnecting", reason);
    this.emitParticipants();
    clearTimeout(this.reconnectTimer);
    const delay = RECONNECT_DELAYS_MS[Math.min(this.attempt, RECONNECT_DELAYS_MS.length - 1)];
    this.attempt += 1;
    this.reconnectTimer = setTimeout(() => this.connect(), delay);
  }

  reconnectNow() {
    clearTimeout(this.reconnectTimer);
    this.connect();
  }

  setConnection(state, reason) {
    if (this.connection === state) return;
    this.connection = state;
    this.dispatchEvent(new CustomEvent("connection", { detail: { state, reason: reason ?? null } }));
  }

  emitLocal() {
    this.dispatchEvent(
      new CustomEvent("local", {
        detail: {
          stream: this.stream,
          audioMuted: this.isAudioMuted(),
          videoMuted: this.isVideoMuted(),
          screen: this.call?.call?.localScreensharingStream ?? null,
        },
      }),
    );
  }

  /**
   * Everyone else in the call: member devices (from room state) and whoever the focus forwards
   * or announces. Each: {id, userId, deviceId, name, avatarUrl, usermedia: MediaStream|null,
   * screen: MediaStream|null, sharing (a screen is published, received or not), audioMuted, videoMuted, speaking, dominant, paused: boolean,
   * key: "none"|"waiting"|"ok"|"unreachable", verified: boolean|null}
   */
  participants() {
    const byId = new Map();
    const room = this.client.getRoom(this.roomId);
    const get = (userId, deviceId) => {
      const id = participantId(userId, deviceId);
      if (id === this.me) return null;
      if (!byId.has(id)) {
        const member = room?.getMember(userId);
        byId.set(id, {
          id,
          userId,
          deviceId,
          name: member?.name ?? userId,
          avatarUrl: member?.getMxcAvatarUrl() ? this.client.mxcUrlToHttp(member.getMxcAvatarUrl(), 96, 96, "crop") : null,
          usermedia: null,
          screen: null,
          sharing: false,
          audioMuted: false,
          videoMuted: false,
          speaking: false,
          dominant: false,
          paused: false,
          key: this.keys ? "waiting" : "none",
          verified: null,
        });
      }
      return byId.get(id);
    };
    for (const d of this.memberDevices()) get(d.userId, d.deviceId);
    for (const [, md] of Object.entries(this.streams)) {
      if (!md?.user_id || !md?.device_id) continue;
      const p = get(md.user_id, md.device_id);
      // a screen we do not receive yet still gets its tile, so that it can be asked for
      if (p && md.purpose === "m.screenshare") p.sharing = true;
    }
    for (const f of this.call?.remoteFeeds() ?? []) {
      if (!f.ownerUserId || !f.ownerDeviceId) continue;
      const p = get(f.ownerUserId, f.ownerDeviceId);
      if (!p) continue;
      if (f.purpose === "m.screenshare") {
        p.screen = f.stream;
        p.sharing = true;
      }
      else {
        p.usermedia = f.stream;
        p.audioMuted = f.audioMuted;
        p.videoMuted = f.videoMuted;
        for (const t of f.stream.getVideoTracks()) if (this.paused.has(`${f.streamId}|${t.id}`)) p.paused = true;
      }
    }
    for (const p of byId.values()) {
      p.speaking = this.speakers.speaking.includes(p.id);
      p.dominant = this.speakers.dominant === p.id;
      if (this.keys) {
        p.verified = this.verified.get(p.id) ?? null;
        if (this.unreachable.some((u) => participantId(u.userId, u.deviceId) === p.id)) p.key = "unreachable";
        else if (this.keys.hasKeyFrom(p.userId, p.deviceId)) p.key = "ok";
      }
    }
    return [...byId.values()];
  }

  emitParticipants() {
    this.dispatchEvent(new CustomEvent("participants", { detail: this.participants() }));
  }

  /**
   * The videos on screen and the size they are shown at: [{participant, purpose, width,
   * height}] (`purpose` "m.usermedia" or "m.screenshare"). Only these videos are asked of the
   * focus, each at its size; audio is always asked for. Call it whenever the layout changes.
   */
  setVideoViews(views) {
    this.views = views;
    this.sendSubscription();
  }

  /** Every published stream we know of: the focus's announcement, else what it forwards. */
  knownStreams() {
    const out = new Map();
    for (const [streamId, md] of Object.entries(this.streams)) out.set(streamId, md);
    for (const f of this.call?.remoteFeeds() ?? []) {
      if (!out.has(f.streamId)) out.set(f.streamId, this.call.streamMetadata(f.streamId) ?? {});
    }
    return out;
  }

  sendSubscription() {
    const call = this.call;
    if (!call?.channelOpen) return;
    const subscribe = [];
    const unsubscribe = [];
    for (const [streamId, md] of this.knownStreams()) {
      if (!md?.user_id || !md?.device_id) continue;
      const owner = participantId(md.user_id, md.device_id);
      if (owner === this.me) continue;
      const view = this.views.find((v) => v.participant === owner && (v.purpose ?? "m.usermedia") === (md.purpose ?? "m.usermedia"));
      for (const [trackId, t] of Object.entries(md.tracks ?? {})) {
        if (t?.kind === "audio") subscribe.push({ streamId, trackId });
        else if (view) subscribe.push({ streamId, trackId, width: view.width, height: view.height });
        else unsubscribe.push({ streamId, trackId });
      }
    }
    const text = JSON.stringify([subscribe, unsubscribe]);
    if (text === this.sentSubscription) return;
    this.sentSubscription = text;
    try {
      call.subscribe(subscribe, unsubscribe);
    } catch (e) {
      this.log("subscription not sent", e?.message ?? e);
      this.sentSubscription = "";
    }
  }

  isAudioMuted() {
    return this.audioMuted;
  }

  isVideoMuted() {
    return this.videoMuted;
  }

  /** Mute the microphone (the focus and the others are told; nothing is sent). */
  async setAudioMuted(muted) {
    this.audioMuted = muted;
    if (this.call?.call) await this.call.setAudioMuted(muted);
    this.emitLocal();
  }

  /** Turn the camera off or on (js-sdk stops the track while off and takes a new one after). */
  async setVideoMuted(muted) {
    this.videoMuted = muted;
    if (this.call?.call) await this.call.setVideoMuted(muted);
    this.emitLocal();
  }

  async setScreensharing(enabled) {
    if (!this.call?.call) throw new Error("not connected");
    const on = await this.call.setScreensharing(enabled);
    this.emitLocal();
    return on;
  }

  isScreensharing() {
    return this.call?.isScreensharing() ?? false;
  }

  /** Send from other devices: {audioInput?, videoInput?} device ids (navigator.mediaDevices). */
  async setDevices({ audioInput, videoInput }) {
    const audio = audioInput ? { deviceId: { exact: audioInput } } : this.stream.getAudioTracks().length > 0;
    const video = videoInput ? { deviceId: { exact: videoInput } } : this.stream.getVideoTracks().length > 0;
    const next = await navigator.mediaDevices.getUserMedia({ audio, video });
    const old = this.stream;
    this.stream = next;
    if (this.call) await this.call.setInputStream(next);
    if (this.ownsStream) for (const t of old.getTracks()) t.stop();
    this.ownsStream = true;
    this.emitLocal();
  }

  /** Leave the call: hang up, withdraw our member entry, stop our camera (if we opened it). */
  async leave() {
    this.leaving = true;
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = null;
    clearTimeout(this.iceTimer);
    clearTimeout(this.stableTimer);
    this.client.off(RoomStateEvent.Events, this.onMembers);
    window.removeEventListener("online", this.onOnline);
    const call = this.call;
    this.call = null;
    try {
      if (call) await call.hangup();
      else if (this.confId && this.stream) {
        // between two attempts there is no call, but our member entry is still up: withdraw it
        const gone = new WeirCall({ client: this.client, roomId: this.roomId, confId: this.confId, focus: this.focus, stream: this.stream, log: this.log });
        await gone.updateMemberState(false);
      }
    } finally {
      this.keys?.stop();
      this.media?.close();
      if (this.ownsStream) for (const t of this.stream?.getTracks() ?? []) t.stop();
      this.setConnection("ended");
    }
  }

  /** Per-transform frame counters of the encryption worker (empty when not encrypted). */
  async encryptionStats() {
    return this.media ? this.media.stats() : {};
  }
}
