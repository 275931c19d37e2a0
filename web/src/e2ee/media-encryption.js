// The main-thread side of frame encryption: one Worker (transform-worker.js) runs every encoded
// transform of a call; this installs a transform on each sender and receiver of the peer
// connection, tells the worker whose media each receiver carries, and hands it the keys.
//
// RTCRtpScriptTransform where the browser has it (Chromium ≥ 141, Safari, Firefox); otherwise
// Chromium's insertable streams (`createEncodedStreams`, which need the peer connection made with
// `encodedInsertableStreams: true`, see `requestInsertableStreams`).

let nextId = 1;

/** Whether this browser can run encoded transforms at all. */
export function encodedTransformsSupported() {
  return typeof RTCRtpScriptTransform === "function" || typeof RTCRtpSender?.prototype?.createEncodedStreams === "function";
}

const useScriptTransform = () => typeof RTCRtpScriptTransform === "function";

/**
 * Where only insertable streams exist, they must be asked for when the peer connection is made.
 * js-sdk makes it, so wrap the constructor once (harmless when RTCRtpScriptTransform exists).
 */
export function requestInsertableStreams() {
  if (useScriptTransform() || globalThis.RTCPeerConnection?.__weirInsertable) return;
  const Original = globalThis.RTCPeerConnection;
  const Wrapped = function (config = {}, ...rest) {
    return new Original({ ...config, encodedInsertableStreams: true }, ...rest);
  };
  Wrapped.prototype = Original.prototype;
  Object.setPrototypeOf(Wrapped, Original);
  Wrapped.__weirInsertable = true;
  globalThis.RTCPeerConnection = Wrapped;
}

export class MediaEncryption {
  /**
   * @param {object} o
   * @param {string|URL} o.workerUrl the built transform worker (dist/e2ee-worker.js)
   * @param {boolean} o.enabled false: frames pass through untouched (an unencrypted room)
   * @param {string} o.localParticipant "userId|deviceId" of this device
   * @param {(...a) => void} [o.log]
   */
  constructor({ workerUrl, enabled, localParticipant, log }) {
    this.worker = new Worker(workerUrl, { type: "module", name: "weir-e2ee" });
    this.enabled = enabled;
    this.log = log ?? ((...a) => console.log("[weir-e2ee]", ...a));
    this.localParticipant = localParticipant;
    /** receiver → transform id */
    this.receivers = new WeakMap();
    this.senders = new WeakSet();
    /** transform id → participant, as last told to the worker */
    this.owners = new Map();
    /** Callers waiting for a reply, by reply type, oldest first (the worker answers in order). */
    this.replies = new Map();
    this.worker.addEventListener("message", (e) => {
      const waiting = this.replies.get(e.data?.type);
      const next = waiting?.shift();
      if (next) next(e.data);
    });
    this.worker.addEventListener("error", (e) => this.log("transform worker error", e.message ?? e));
    this.worker.postMessage({ type: "setEnabled", enabled });
    this.worker.postMessage({ type: "setSender", participant: localParticipant });
  }

  /** Install a key (ours or another device's). */
  setKey(participant, index, key) {
    const raw = key.slice().buffer;
    this.worker.postMessage({ type: "setKey", participant, index, key: raw }, [raw]);
  }

  /** Encrypt what we send with our key of this index from now on. */
  useKey(index) {
    this.worker.postMessage({ type: "useKey", index });
  }

  install(target, options) {
    if (useScriptTransform()) {
      target.transform = new RTCRtpScriptTransform(this.worker, options);
    } else {
      const { readable, writable } = target.createEncodedStreams();
      this.worker.postMessage({ type: "stream", id: options.id, readable, writable, options }, [readable, writable]);
    }
  }

  /** Encrypt what this sender sends (idempotent). */
  attachSender(sender, kind) {
    if (this.senders.has(sender)) return;
    this.senders.add(sender);
    const id = `s${nextId++}`;
    this.install(sender, { id, direction: "send", kind, participant: this.localParticipant });
  }

  /**
   * Decrypt what this receiver receives. `participant` ("userId|deviceId") when known; frames are
   * dropped until it is (setOwner).
   */
  attachReceiver(receiver, participant) {
    if (this.receivers.has(receiver)) {
      this.setOwner(receiver, participant);
      return;
    }
    const id = `r${nextId++}`;
    this.receivers.set(receiver, id);
    this.owners.set(id, participant ?? null);
    this.install(receiver, { id, direction: "receive", kind: receiver.track.kind, participant: participant ?? null });
  }

  /** The focus may reuse a receiver for another publisher: tell the worker whose frames come now. */
  setOwner(receiver, participant) {
    const id = this.receivers.get(receiver);
    if (!id || !participant || this.owners.get(id) === participant) return;
    this.owners.set(id, participant);
    this.worker.postMessage({ type: "setOwner", id, participant });
  }

  /**
   * Wrap the peer connection's track-adding calls so every sender gets its transform before it
   * sends, and every receiver before it receives. `ownerOf(streamId)` names a received stream's
   * owner ("userId|deviceId") from the focus's metadata, or null.
   */
  attachPeerConnection(pc, ownerOf) {
    const addTrack = pc.addTrack.bind(pc);
    pc.addTrack = (track, ...streams) => {
      const sender = addTrack(track, ...streams);
      this.attachSender(sender, track.kind);
      return sender;
    };
    const addTransceiver = pc.addTransceiver.bind(pc);
    pc.addTransceiver = (trackOrKind, init) => {
      const t = addTransceiver(trackOrKind, init);
      const kind = typeof trackOrKind === "string" ? trackOrKind : trackOrKind.kind;
      this.attachSender(t.sender, kind);
      return t;
    };
    pc.addEventListener("track", (e) => {
      const streamId = e.streams?.[0]?.id;
      this.attachReceiver(e.receiver, streamId ? ownerOf(streamId) : null);
    });
  }

  /** Per-transform counters from the worker: {id: {direction, kind, participant, frames, ...}}. */
  async stats() {
    return this.ask("stats");
  }

  /** Record (IV, SHA-256) of every frame, up to `limit` per transform (byte-identity checks). */
  audit(enabled, limit = 3000) {
    this.worker.postMessage({ type: "audit", enabled, limit });
  }

  async auditDump() {
    return this.ask("auditDump");
  }

  ask(type) {
    if (this.closed) return Promise.resolve({});
    return new Promise((resolve) => {
      if (!this.replies.has(type)) this.replies.set(type, []);
      this.replies.get(type).push((d) => resolve(d.transforms ?? {}));
      this.worker.postMessage({ type });
    });
  }

  close() {
    this.closed = true;
    this.worker.terminate();
    // nobody waits for a worker that is gone
    for (const waiting of this.replies.values()) for (const r of waiting.splice(0)) r({});
  }
}
