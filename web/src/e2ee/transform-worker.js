// Dedicated (module) Worker running every encoded transform of a call: it encrypts what this
// device sends and decrypts what it receives, frame by frame, in livekit-client's E2EE frame
// format (frame-crypto.js). Built to dist/e2ee-worker.js; load it with
// `new Worker(url, {type: "module"})`. The main-thread side is media-encryption.js.
//
// Transforms arrive two ways:
//  (a) RTCRtpScriptTransform: an `rtctransform` event whose `transformer` has `readable`,
//      `writable` and `options`;
//  (b) insertable streams (Chromium's createEncodedStreams): a message
//      {type: "stream", id, readable, writable, options} with the two streams transferred.
// options = {id, direction: "send"|"receive", kind: "audio"|"video", participant?: "userId|deviceId"}.
//
// Messages from the main thread:
//   {type: "setKey", participant, index, key: ArrayBuffer}  raw key (16 bytes), derived here. For
//       the local sender (setSender) it is also installed for sending and, unless the main thread
//       has taken over the choice with useKey, becomes the index we send with.
//   {type: "useKey", index}          send with our key of this index from now on (after setKey)
//   {type: "setSender", participant} which participant id is this device
//   {type: "setOwner", id, participant}  receiver transform `id` now carries that participant's media
//   {type: "setEnabled", enabled}    false: every frame passes through untouched (unencrypted call)
//   {type: "stats"}                  → {type: "stats", transforms: {[id]: {direction, kind,
//                                       participant, frames, encrypted, decrypted, clear,
//                                       dropped: {reason: n}, lastError}}}
//   {type: "audit", enabled, limit}  record [IV hex, SHA-256 hex of the frame as on the wire]
//                                    per frame (sent: after encryption; received: before
//                                    decryption; IV null for a frame not encrypted), the last
//                                    `limit` (default 3000) per transform; enabling starts from
//                                    empty records
//   {type: "auditDump"}              → {type: "auditDump", transforms: {[id]: {direction,
//                                       participant, frames: [[iv, hash], ...]}}} (oldest first)
// Messages to the main thread besides the two replies: {type: "keySet", participant, index} once
// a key is derived and installed; {type: "error", message} if a key could not be.
//
// Frames are handled one at a time in stream order (a TransformStream waits for each async
// transform). A bad frame never throws out of the transform: it is dropped and counted. On the
// receive side only frames that decrypted are written, so the decoder never sees ciphertext; on
// the send side a frame that cannot be encrypted (no key yet) is dropped, never sent in clear.

import { FrameDecryptor, FrameEncryptor, codecFromMimeType, deriveFrameKey, ivOf, toHex } from "./frame-crypto.js";

/** Audit records kept per transform by default: ~60 s of 50 fps audio, ~100 s of 30 fps video. */
export const AUDIT_DEFAULT_LIMIT = 3000;

/** A fixed-size ring of records, oldest overwritten first. */
class Ring {
  constructor(limit) {
    this.limit = Math.max(1, Math.floor(limit) || AUDIT_DEFAULT_LIMIT);
    this.items = [];
    this.start = 0;
  }
  push(item) {
    if (this.items.length < this.limit) {
      this.items.push(item);
    } else {
      this.items[this.start] = item;
      this.start = (this.start + 1) % this.limit;
    }
  }
  toArray() {
    return this.items.slice(this.start).concat(this.items.slice(0, this.start));
  }
}

/**
 * Install the worker's message and rtctransform handlers on `scope` (the worker's global scope,
 * or any EventTarget with postMessage, for tests). Returns the worker's state and handlers.
 */
export function createTransformWorker(scope) {
  let enabled = true;
  let sender = null;
  /** Once the main thread has sent useKey, setKey no longer switches the sending index. */
  let explicitUse = false;
  /** Index set with useKey (explicit mode). */
  let useIndex = null;
  let auditEnabled = false;
  let auditLimit = AUDIT_DEFAULT_LIMIT;
  /** participant → {decryptor, lastSet}: every participant's keys, ours included. */
  const participants = new Map();
  /** transform id → transform state */
  const transforms = new Map();
  /** setOwner messages that arrived before their transform (rtctransform events are async). */
  const pendingOwners = new Map();
  let encryptor = new FrameEncryptor();
  /** Key installs run one after another, so that the last setKey/useKey posted wins. */
  let keyQueue = Promise.resolve();

  const post = (msg) => {
    try {
      scope.postMessage(msg);
    } catch {
      // a closed port; nothing to report to
    }
  };

  function participantRecord(participant) {
    let rec = participants.get(participant);
    if (!rec) {
      rec = { decryptor: new FrameDecryptor(), lastSet: null };
      participants.set(participant, rec);
    }
    return rec;
  }

  /** Rebuild the encryptor from the sender's keys (after setSender). */
  function loadSenderKeys() {
    encryptor = new FrameEncryptor();
    const rec = sender === null ? undefined : participants.get(sender);
    if (!rec) return;
    for (const [index, key] of rec.decryptor.keys) encryptor.addKey(index, key);
    const index = explicitUse ? useIndex : rec.lastSet;
    if (index !== null) encryptor.useKey(index);
  }

  function enqueueKeyOp(op) {
    keyQueue = keyQueue.then(op).catch((e) => post({ type: "error", message: `key: ${e?.message ?? e}` }));
    return keyQueue;
  }

  function setKey({ participant, index, key }) {
    return enqueueKeyOp(async () => {
      if (typeof participant !== "string") throw new TypeError("setKey without participant");
      const cryptoKey = await deriveFrameKey(key);
      const rec = participantRecord(participant);
      rec.decryptor.setKey(index, cryptoKey);
      rec.lastSet = index;
      if (participant === sender) {
        if (explicitUse) encryptor.addKey(index, cryptoKey);
        else encryptor.setKey(index, cryptoKey);
      }
      post({ type: "keySet", participant, index });
    });
  }

  function useKey({ index }) {
    return enqueueKeyOp(() => {
      explicitUse = true;
      useIndex = index;
      encryptor.useKey(index);
    });
  }

  function newTransform(options) {
    const id = String(options.id ?? `t${transforms.size + 1}`);
    const direction = options.direction === "receive" ? "receive" : "send";
    let participant = options.participant ?? null;
    if (direction === "send" && participant === null) participant = sender;
    if (pendingOwners.has(id)) {
      participant = pendingOwners.get(id);
      pendingOwners.delete(id);
    }
    return {
      id,
      direction,
      kind: options.kind ?? null,
      participant,
      frames: 0,
      encrypted: 0,
      decrypted: 0,
      clear: 0,
      dropped: {},
      lastError: null,
      closed: false,
      audit: auditEnabled ? new Ring(auditLimit) : null,
    };
  }

  function drop(t, reason, error) {
    t.dropped[reason] = (t.dropped[reason] ?? 0) + 1;
    if (error !== undefined) t.lastError = `${reason}: ${error?.message ?? error}`;
    else if (reason !== "no-key" && reason !== "no-owner") t.lastError = reason;
  }

  /** Audit a frame's bytes as they go over the wire; the digest copies the bytes right away. */
  function audit(t, bytes, iv) {
    if (!auditEnabled) return;
    if (!t.audit) t.audit = new Ring(auditLimit);
    const entry = [iv, null];
    entry[1] = globalThis.crypto.subtle.digest("SHA-256", bytes).then(
      (h) => (entry[1] = toHex(new Uint8Array(h))),
      () => (entry[1] = null),
    );
    t.audit.push(entry);
  }

  function frameInfo(t, frame) {
    const meta = typeof frame.getMetadata === "function" ? frame.getMetadata() : {};
    const kind = t.kind ?? (frame.type !== undefined ? "video" : "audio");
    const codec = codecFromMimeType(meta?.mimeType) ?? (kind === "video" ? "vp8" : "opus");
    return {
      kind,
      codec,
      keyFrame: frame.type === "key",
      ssrc: meta?.synchronizationSource,
      timestamp: frame.timestamp ?? meta?.rtpTimestamp ?? 0,
    };
  }

  async function sendFrame(t, frame, controller) {
    t.frames++;
    if (!enabled) {
      if (auditEnabled) audit(t, new Uint8Array(frame.data), null);
      return controller.enqueue(frame);
    }
    let out;
    try {
      const data = new Uint8Array(frame.data);
      out = await encryptor.encrypt(data, frameInfo(t, frame));
      if (out.byteLength === data.byteLength) {
        // no longer than its clear prefix: passed through as it is
        t.clear++;
        audit(t, data, null);
        return controller.enqueue(frame);
      }
    } catch (e) {
      return drop(t, e?.reason ?? "error", e?.reason === "no-key" ? undefined : e);
    }
    audit(t, out, ivOf(out));
    frame.data = out.buffer;
    t.encrypted++;
    controller.enqueue(frame);
  }

  async function receiveFrame(t, frame, controller) {
    t.frames++;
    if (!enabled) {
      if (auditEnabled) audit(t, new Uint8Array(frame.data), null);
      return controller.enqueue(frame);
    }
    try {
      const data = new Uint8Array(frame.data);
      audit(t, data, ivOf(data));
      if (t.participant === null) return drop(t, "no-owner");
      const rec = participantRecord(t.participant);
      const result = await rec.decryptor.decrypt(data, frameInfo(t, frame));
      if (!result.ok) return drop(t, result.reason);
      frame.data = result.data.buffer;
      t.decrypted++;
      controller.enqueue(frame);
    } catch (e) {
      drop(t, "error", e);
    }
  }

  /** Run one transform: readable → (en|de)crypt → writable. */
  function attach(readable, writable, options = {}) {
    const t = newTransform(options);
    transforms.set(t.id, t);
    const handle = t.direction === "send" ? sendFrame : receiveFrame;
    const pipeline = readable
      .pipeThrough(new TransformStream({ transform: (frame, controller) => handle(t, frame, controller) }))
      .pipeTo(writable)
      .catch((e) => {
        t.lastError = `pipe: ${e?.message ?? e}`;
      })
      .finally(() => {
        t.closed = true;
      });
    return { transform: t, done: pipeline };
  }

  function stats() {
    const out = {};
    for (const [id, t] of transforms) {
      out[id] = {
        direction: t.direction,
        kind: t.kind,
        participant: t.participant,
        frames: t.frames,
        encrypted: t.encrypted,
        decrypted: t.decrypted,
        clear: t.clear,
        dropped: { ...t.dropped },
        lastError: t.lastError,
        closed: t.closed,
      };
    }
    return out;
  }

  async function auditDump() {
    const out = {};
    for (const [id, t] of transforms) {
      const entries = t.audit ? t.audit.toArray() : [];
      const frames = await Promise.all(entries.map(async ([iv, hash]) => [iv, await hash]));
      out[id] = { direction: t.direction, participant: t.participant, frames };
    }
    return out;
  }

  function handleMessage(msg) {
    if (!msg || typeof msg !== "object") return undefined;
    switch (msg.type) {
      case "stream":
        return attach(msg.readable, msg.writable, { id: msg.id, ...(msg.options ?? {}) });
      case "setKey":
        return setKey(msg);
      case "useKey":
        return useKey(msg);
      case "setSender":
        return enqueueKeyOp(() => {
          sender = msg.participant ?? null;
          loadSenderKeys();
          for (const t of transforms.values()) if (t.direction === "send") t.participant = sender;
        });
      case "setOwner": {
        const t = transforms.get(String(msg.id));
        if (t) t.participant = msg.participant ?? null;
        else pendingOwners.set(String(msg.id), msg.participant ?? null);
        return undefined;
      }
      case "setEnabled":
        enabled = msg.enabled !== false;
        return undefined;
      case "stats":
        return post({ type: "stats", transforms: stats() });
      case "audit":
        auditEnabled = !!msg.enabled;
        if (auditEnabled) {
          auditLimit = msg.limit > 0 ? Math.floor(msg.limit) : AUDIT_DEFAULT_LIMIT;
          for (const t of transforms.values()) t.audit = new Ring(auditLimit);
        }
        return undefined;
      case "auditDump":
        return auditDump().then((transforms) => post({ type: "auditDump", transforms }));
      default:
        return undefined;
    }
  }

  scope.addEventListener("message", (event) => {
    try {
      handleMessage(event.data);
    } catch (e) {
      post({ type: "error", message: String(e?.message ?? e) });
    }
  });
  scope.addEventListener("rtctransform", (event) => {
    const { readable, writable, options } = event.transformer;
    attach(readable, writable, options ?? {});
  });

  return { handleMessage, attach, stats, auditDump, transforms, participants, get encryptor() { return encryptor; } };
}

// Inside a dedicated worker, install on its global scope (not when imported by node tests).
if (typeof WorkerGlobalScope !== "undefined" && globalThis instanceof WorkerGlobalScope) {
  createTransformWorker(globalThis);
}
