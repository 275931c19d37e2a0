// Call encryption keys between participants' devices, over Olm-encrypted to-device messages.
//
// The event and its content are Element Call's (js-sdk's MatrixRTC `ToDeviceKeyTransport`), so a
// weir client and an Element Call client could share keys later (docs/decisions.md):
//
//   type: io.element.call.encryption_keys   (sent Olm-encrypted, as m.room.encrypted)
//   {"keys": {"index": 0, "key": "<unpadded base64 of 16 random bytes>"},
//    "room_id": "!room:example.org",
//    "member": {"claimed_device_id": "ALICEDEV", "id": "@alice:example.org:ALICEDEV"},
//    "session": {"call_id": "", "application": "m.call", "scope": "m.room"},
//    "sent_ts": 1700000000000}
//
// Keys go only to the devices that have an entry in the call's `m.call.member` state, never to
// the focus's device: the focus forwards frames it cannot read. A key that arrives in clear (not
// through Olm) is refused, and so is one whose claimed device is not the Olm sender's device.
//
// Each device has its own key. When a device leaves the call, everyone still in it makes a new
// key (the next index) and sends it, so the leaver cannot read what follows; the new key is used
// for sending only USE_KEY_DELAY_MS later, once the others have had time to receive it.

import { ClientEvent } from "matrix-js-sdk";

export const KEYS_EVENT = "io.element.call.encryption_keys";

/** Raw key size: Element Call's 16 random bytes (HKDF turns them into the AES-128-GCM key). */
export const KEY_BYTES = 16;

/**
 * How long a new key is sent before it is used. Longer: fewer frames lost by a receiver whose
 * to-device delivery is slow; shorter: a leaver can decrypt our media for less time. Element
 * Call waits 5 s; 3 s is enough for Synapse's to-device path on one homeserver and still covers
 * a sync round trip over federation.
 */
export const USE_KEY_DELAY_MS = 3000;

/** A device we could not send our key to is tried again after this long (then each time the member list changes). */
export const RETRY_UNREACHABLE_MS = 5000;

/** Keys are indexed 0..255 (one byte in the frame trailer), wrapping around. */
const INDEX_MODULO = 256;

/** The participant id the media layer uses for a device. */
export function participantId(userId, deviceId) {
  return `${userId}|${deviceId}`;
}

export function toBase64(bytes) {
  let s = "";
  for (const b of bytes) s += String.fromCharCode(b);
  return btoa(s).replace(/=+$/, "");
}

export function fromBase64(text) {
  const padded = text + "=".repeat((4 - (text.length % 4)) % 4);
  const bin = atob(padded.replace(/-/g, "+").replace(/_/g, "/"));
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

function newKey() {
  const k = new Uint8Array(KEY_BYTES);
  crypto.getRandomValues(k);
  return k;
}

/**
 * Our key for the call, sent to every member device, and the keys other devices sent us.
 *
 * Events (EventTarget; `detail`):
 *   "key"          a key to install: {participant, userId, deviceId, index, key: Uint8Array, local}
 *                  (local keys are ours: install them for sending once "use" says so)
 *   "use"          start encrypting with our key of this index: {index}
 *   "reachability" the set of member devices we could not send our key to changed:
 *                  {unreachable: [{userId, deviceId, reason}]}
 */
export class KeyExchange extends EventTarget {
  /**
   * @param {object} o
   * @param {import("matrix-js-sdk").MatrixClient} o.client with Rust crypto initialised
   * @param {string} o.roomId
   * @param {(...a) => void} [o.log]
   */
  constructor({ client, roomId, log }) {
    super();
    if (!client.getCrypto()) throw new Error("KeyExchange needs a client with crypto (initRustCrypto)");
    this.client = client;
    this.roomId = roomId;
    this.userId = client.getUserId();
    this.deviceId = client.getDeviceId();
    this.log = log ?? ((...a) => console.log("[weir-keys]", ...a));
    /** Our keys by index. */
    this.ownKeys = new Map();
    this.index = 0;
    /** Member device sessions ("user|device|session") we have sent the current key to. */
    this.sentTo = new Set();
    /** Member device sessions now in the call ("user|device|session" → {userId, deviceId}). */
    this.members = new Map();
    /** Member devices we failed to reach ("user|device" → {userId, deviceId, reason}). */
    this.unreachable = new Map();
    /** Keys received: "user|device" → Map(index → Uint8Array). */
    this.received = new Map();
    this.sending = Promise.resolve();
    this.useTimer = null;
    this.retryTimer = null;
    this.stopped = false;
    /** Whether to drop every key message (tests: a page whose key exchange is blocked). */
    this.blocked = false;
    this.onToDevice = (payload) => this.receive(payload);
  }

  start() {
    const key = newKey();
    this.ownKeys.set(0, key);
    this.client.on(ClientEvent.ReceivedToDeviceMessage, this.onToDevice);
    this.emitKey(this.userId, this.deviceId, 0, key, true);
    this.dispatchEvent(new CustomEvent("use", { detail: { index: 0 } }));
  }

  stop() {
    this.stopped = true;
    this.client.off(ClientEvent.ReceivedToDeviceMessage, this.onToDevice);
    clearTimeout(this.useTimer);
    clearTimeout(this.retryTimer);
  }

  emitKey(userId, deviceId, index, key, local) {
    this.dispatchEvent(
      new CustomEvent("key", {
        detail: { participant: participantId(userId, deviceId), userId, deviceId, index, key, local },
      }),
    );
  }

  /** Every key received so far, and ours (for a media layer that starts after some arrived). */
  allKeys() {
    const out = [];
    for (const [index, key] of this.ownKeys) out.push({ userId: this.userId, deviceId: this.deviceId, index, key, local: true });
    for (const [p, keys] of this.received) {
      const [userId, deviceId] = p.split("|");
      for (const [index, key] of keys) out.push({ userId, deviceId, index, key, local: false });
    }
    return out;
  }

  /**
   * The call's member devices now (ours included or not; it is left out). New devices get our
   * current key; a device that left makes us rotate. A device is known by its session too: a
   * page reloaded on the same device is a new session, which left and joined (its keys are
   * gone with the page), so it gets a key again.
   * @param {Array<{userId: string, deviceId: string, sessionId?: string|null}>} devices
   */
  setMembers(devices) {
    if (this.stopped) return;
    const next = new Map();
    for (const d of devices) {
      if (d.userId === this.userId && d.deviceId === this.deviceId) continue;
      next.set(`${participantId(d.userId, d.deviceId)}|${d.sessionId ?? ""}`, { userId: d.userId, deviceId: d.deviceId });
    }
    const left = [...this.members.keys()].filter((p) => !next.has(p));
    this.members = next;
    const present = new Set([...next.values()].map((d) => participantId(d.userId, d.deviceId)));
    for (const p of [...this.unreachable.keys()]) if (!present.has(p)) this.unreachable.delete(p);
    if (left.length > 0) {
      this.log(`${left.join(", ")} left the call: rotating our key`);
      this.rotate();
    } else {
      this.sendCurrentToNew();
    }
  }

  /** A new key at the next index, sent to everyone in the call, used after USE_KEY_DELAY_MS. */
  rotate() {
    const index = (this.index + 1) % INDEX_MODULO;
    const key = newKey();
    this.ownKeys.set(index, key);
    // keep a few past keys only: the receivers hold what is in flight, we only ever send the current one
    for (const i of this.ownKeys.keys()) if (i !== index && i !== this.index) this.ownKeys.delete(i);
    this.index = index;
    this.sentTo.clear();
    this.emitKey(this.userId, this.deviceId, index, key, true);
    clearTimeout(this.useTimer);
    this.useTimer = setTimeout(() => {
      if (!this.stopped && this.index === index) this.dispatchEvent(new CustomEvent("use", { detail: { index } }));
    }, USE_KEY_DELAY_MS);
    this.sendCurrentToNew();
  }

  sendCurrentToNew() {
    const entries = [...this.members.entries()].filter(([k]) => !this.sentTo.has(k));
    if (entries.length === 0) return;
    const index = this.index;
    this.sending = this.sending.then(() => this.sendKey(index, entries)).catch((e) => this.log("sending keys failed", e));
  }

  /** @param {Array<[string, {userId: string, deviceId: string}]>} entries member sessions and their devices */
  async sendKey(index, entries) {
    if (this.stopped || index !== this.index) return;
    const targets = entries.map(([, d]) => d);
    const cryptoApi = this.client.getCrypto();
    const users = [...new Set(targets.map((t) => t.userId))];
    // A device that logged in moments ago may not be in our device list yet: ask the homeserver.
    const known = await cryptoApi.getUserDeviceInfo(users, true);
    const reachable = [];
    for (const t of targets) {
      if (known.get(t.userId)?.has(t.deviceId)) reachable.push(t);
      else this.markUnreachable(t, "no encryption keys published for this device");
    }
    if (reachable.length === 0) return this.scheduleRetry();
    const content = {
      keys: { index, key: toBase64(this.ownKeys.get(index)) },
      room_id: this.roomId,
      member: { claimed_device_id: this.deviceId, id: `${this.userId}:${this.deviceId}` },
      session: { call_id: "", application: "m.call", scope: "m.room" },
      sent_ts: Date.now(),
    };
    try {
      await this.client.encryptAndSendToDevice(KEYS_EVENT, reachable, content);
    } catch (e) {
      for (const t of reachable) this.markUnreachable(t, `sending failed: ${e?.message ?? e}`);
      return this.scheduleRetry();
    }
    for (const [k, t] of entries) {
      if (!reachable.includes(t)) continue;
      this.sentTo.add(k);
      if (this.unreachable.delete(participantId(t.userId, t.deviceId))) this.emitReachability();
    }
    this.log(`key ${index} sent to ${reachable.map((t) => `${t.userId}/${t.deviceId}`).join(", ")}`);
    this.scheduleRetry();
  }

  markUnreachable(t, reason) {
    const p = participantId(t.userId, t.deviceId);
    if (![...this.members.values()].some((d) => d.userId === t.userId && d.deviceId === t.deviceId)) return;
    const had = this.unreachable.get(p);
    this.unreachable.set(p, { userId: t.userId, deviceId: t.deviceId, reason });
    if (!had || had.reason !== reason) {
      this.log(`cannot send our key to ${t.userId}/${t.deviceId}: ${reason}`);
      this.emitReachability();
    }
  }

  emitReachability() {
    this.dispatchEvent(new CustomEvent("reachability", { detail: { unreachable: [...this.unreachable.values()] } }));
  }

  scheduleRetry() {
    clearTimeout(this.retryTimer);
    if (this.stopped || this.unreachable.size === 0) return;
    this.retryTimer = setTimeout(() => this.sendCurrentToNew(), RETRY_UNREACHABLE_MS);
  }

  /** A to-device message: keep it if it is a well-formed, Olm-encrypted key for our room. */
  receive({ message, encryptionInfo }) {
    if (message?.type !== KEYS_EVENT || this.stopped) return;
    const sender = message.sender;
    const c = message.content ?? {};
    if (this.blocked) {
      this.log(`key from ${sender} dropped: key exchange blocked`);
      return;
    }
    if (!encryptionInfo) {
      this.log(`key from ${sender} refused: it was not sent encrypted`);
      return;
    }
    if (c.room_id !== this.roomId) return;
    const device = c.member?.claimed_device_id;
    if (typeof device !== "string" || device !== encryptionInfo.senderDevice || encryptionInfo.sender !== sender) {
      this.log(`key from ${sender} refused: claims device ${device}, Olm says ${encryptionInfo.senderDevice}`);
      return;
    }
    const index = c.keys?.index;
    if (!Number.isInteger(index) || index < 0 || index >= INDEX_MODULO || typeof c.keys?.key !== "string") {
      this.log(`key from ${sender}/${device} refused: malformed keys field`);
      return;
    }
    let key;
    try {
      key = fromBase64(c.keys.key);
    } catch {
      this.log(`key from ${sender}/${device} refused: not base64`);
      return;
    }
    if (key.length < KEY_BYTES || key.length > 64) {
      this.log(`key from ${sender}/${device} refused: ${key.length} bytes`);
      return;
    }
    const p = participantId(sender, device);
    if (!this.received.has(p)) this.received.set(p, new Map());
    this.received.get(p).set(index, key);
    this.log(`key ${index} received from ${sender}/${device}`);
    this.emitKey(sender, device, index, key, false);
  }

  /** Whether a key from this device has arrived. */
  hasKeyFrom(userId, deviceId) {
    return this.received.has(participantId(userId, deviceId));
  }
}
