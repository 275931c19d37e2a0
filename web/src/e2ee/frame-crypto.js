// End-to-end encryption of encoded media frames, in the frame format of livekit-client's E2EE
// (the one Element Call uses), so that keys and frames can interoperate with Element Call.
// Written from the format's description, not from livekit's code.
//
// Pure module: no DOM, no Worker globals; only globalThis.crypto (WebCrypto). It runs in a
// dedicated Worker (transform-worker.js), in a Chromium page and in node ≥ 20.
//
// One encrypted frame (`data` = the encoded frame's bytes):
//
//   +--------------+----------------------------------+---------------+----------+-----------+
//   | clear prefix | AES-128-GCM(rest of data) ‖ tag  | IV (12 bytes) | IV len=12| key index |
//   +--------------+----------------------------------+---------------+----------+-----------+
//     n bytes        len(data) - n + 16                 12              1 byte     1 byte
//
// - The clear prefix (see clearPrefixLength) is left readable for the SFU and the decoder, and is
//   authenticated: it is the AES-GCM additionalData.
// - IV = SSRC (u32 BE) ‖ RTP timestamp (u32 BE) ‖ (timestamp − sendCount mod 0xffff) (u32 BE),
//   sendCount being a per-SSRC frame counter that starts at a random value.
// - The AES key is derived from the participant's raw key (16 random bytes from the key exchange)
//   with HKDF-SHA-256 (see deriveFrameKey).
//
// H.264 (and H.265) are out of scope: their frames are Annex B NAL units, and livekit keeps each
// NAL unit's header in the clear and escapes the ciphertext against start-code emulation
// (RBSP 0x000003). Handling that needs a NAL parser; until then any video codec other than VP8
// gets a 0-byte prefix, which is only interoperable for codecs where livekit also uses 0 (VP9).

/** WebCrypto: globalThis.crypto in Workers, pages and node ≥ 19. */
const subtle = () => globalThis.crypto.subtle;

/**
 * HKDF salt: the UTF-8 bytes of livekit's default "ratchet salt". Element Call does not override
 * it, so any other value would derive a different key from the same raw key.
 */
export const KEY_DERIVATION_SALT = "LKFrameEncryptionKey";

/** HKDF info: 128 zero bytes, as livekit passes `new ArrayBuffer(128)`. */
export const HKDF_INFO_LENGTH = 128;

/** AES-GCM key length in bits: livekit's default key size (AES-128). */
export const AES_KEY_BITS = 128;

/** AES-GCM IV length: 96 bits, the size GCM is designed for (no GHASH of the IV); in the trailer. */
export const IV_LENGTH = 12;

/** AES-GCM authentication tag: WebCrypto's default 128 bits, appended to the ciphertext. */
export const TAG_LENGTH = 16;

/** Trailer after the IV: [IV length, key index]. */
export const TRAILER_LENGTH = 2;

/** What encryption adds to a frame: tag + IV + trailer (30 bytes). */
export const FRAME_OVERHEAD = TAG_LENGTH + IV_LENGTH + TRAILER_LENGTH;

/**
 * Bytes kept in the clear at the start of a frame.
 * - VP8 key frame: 10 bytes = the 3-byte frame tag and the 7-byte key-frame start code and size
 *   (RFC 6386 §9.1): the SFU can see key frames and sizes, and a decoder fed ciphertext by
 *   mistake fails softly instead of rejecting the stream.
 * - VP8 delta frame: 3 bytes, the frame tag alone.
 * - Audio: 1 byte, the Opus TOC byte (RFC 6716 §3.1: mode, bandwidth, frame size). livekit uses
 *   1 for every audio frame whatever the codec, and so do we.
 * - Other video codecs: 0 (see the note on H.264 at the top).
 */
export const CLEAR_BYTES = Object.freeze({ vp8Key: 10, vp8Delta: 3, audio: 1, otherVideo: 0 });

/** Key indices that fit the trailer's key-index byte. */
export const MAX_KEY_INDEX = 255;

/**
 * A decryptor keeps this many of a participant's keys (the most recently set ones): enough to
 * read frames sent under the previous few indices while a rotation propagates, few enough that a
 * participant who left long ago cannot be read with a stale key. livekit's default keyring is 16
 * too (Element Call sets 256, but only the latest indices are ever in use).
 */
export const DECRYPTOR_KEY_SLOTS = 16;

/**
 * The IV's third word subtracts (sendCount mod 0xffff): livekit's choice (0xffff, not 0x10000).
 * The counter makes two frames with the same SSRC and timestamp (e.g. retransmitted encodes,
 * layers sharing an SSRC) get different IVs; reusing a GCM IV under one key would be fatal.
 */
export const SEND_COUNT_MODULUS = 0xffff;

/** SSRC used when a frame's metadata has none (livekit writes −1 as u32, i.e. 0xffffffff). */
export const UNKNOWN_SSRC = 0xffffffff;

/** Reasons a frame could not be decrypted (counted, never thrown). */
export const DECRYPT_FAILURES = Object.freeze(["no-key", "too-short", "bad-trailer", "auth"]);

const encoder = new TextEncoder();
const SALT_BYTES = encoder.encode(KEY_DERIVATION_SALT);

/** A Uint8Array view of bytes given as Uint8Array, another ArrayBuffer view, or an ArrayBuffer. */
function bytesOf(data) {
  if (data instanceof Uint8Array) return data;
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  if (data instanceof ArrayBuffer || Object.prototype.toString.call(data) === "[object ArrayBuffer]") return new Uint8Array(data);
  throw new TypeError("frame bytes must be a Uint8Array or an ArrayBuffer");
}

export function toHex(bytes) {
  let s = "";
  for (const b of bytesOf(bytes)) s += b.toString(16).padStart(2, "0");
  return s;
}

/**
 * The AES-GCM key for a participant's raw key (16 bytes): HKDF-SHA-256 with the salt
 * "LKFrameEncryptionKey" and 128 zero bytes of info, as livekit-client's E2EE does.
 * @param {Uint8Array|ArrayBuffer} rawKeyBytes
 * @returns {Promise<CryptoKey>} non-extractable, usable for encrypt and decrypt
 */
export async function deriveFrameKey(rawKeyBytes) {
  const raw = bytesOf(rawKeyBytes);
  if (raw.byteLength === 0) throw new TypeError("empty key");
  const material = await subtle().importKey("raw", raw, "HKDF", false, ["deriveKey"]);
  return subtle().deriveKey(
    { name: "HKDF", hash: "SHA-256", salt: SALT_BYTES, info: new ArrayBuffer(HKDF_INFO_LENGTH) },
    material,
    { name: "AES-GCM", length: AES_KEY_BITS },
    false,
    ["encrypt", "decrypt"],
  );
}

/** "video/VP8" → "vp8"; "opus" → "opus"; undefined stays undefined. */
export function codecFromMimeType(mimeType) {
  if (typeof mimeType !== "string" || mimeType === "") return undefined;
  const slash = mimeType.indexOf("/");
  return (slash >= 0 ? mimeType.slice(slash + 1) : mimeType).toLowerCase();
}

/**
 * How many leading bytes of a frame stay in the clear (see CLEAR_BYTES).
 * @param {{kind: "audio"|"video", codec?: string, keyFrame?: boolean}} info codec as "vp8" or
 *   a MIME type ("video/VP8"); video without a codec is taken as VP8.
 */
export function clearPrefixLength({ kind, codec, keyFrame } = {}) {
  if (kind === "audio") return CLEAR_BYTES.audio;
  const c = codecFromMimeType(codec) ?? "vp8";
  if (c === "vp8") return keyFrame ? CLEAR_BYTES.vp8Key : CLEAR_BYTES.vp8Delta;
  return CLEAR_BYTES.otherVideo;
}

/**
 * The 12-byte IV of a frame: SSRC, RTP timestamp, (timestamp − sendCount mod 0xffff), each a
 * big-endian u32 (the subtraction wraps modulo 2^32).
 */
export function makeIv(ssrc, timestamp, sendCount) {
  const iv = new Uint8Array(IV_LENGTH);
  const view = new DataView(iv.buffer);
  const ts = timestamp >>> 0;
  view.setUint32(0, (ssrc ?? UNKNOWN_SSRC) >>> 0);
  view.setUint32(4, ts);
  view.setUint32(8, (ts - (sendCount % SEND_COUNT_MODULUS)) >>> 0);
  return iv;
}

/**
 * Encrypt one frame with an explicit IV (internal; the encryptor builds the IV). Exported for
 * known-answer tests.
 * @param {CryptoKey} key
 * @param {Uint8Array|ArrayBuffer} data the whole frame, longer than `clearPrefix`
 * @param {{iv: Uint8Array, clearPrefix: number, keyIndex: number}} o
 * @returns {Promise<Uint8Array>} prefix ‖ ciphertext+tag ‖ IV ‖ [12, keyIndex]
 */
export async function encryptFrameWithIv(key, data, { iv, clearPrefix, keyIndex }) {
  const bytes = bytesOf(data);
  if (iv.byteLength !== IV_LENGTH) throw new RangeError(`IV must be ${IV_LENGTH} bytes`);
  if (!(keyIndex >= 0 && keyIndex <= MAX_KEY_INDEX)) throw new RangeError(`key index ${keyIndex} out of 0..${MAX_KEY_INDEX}`);
  const prefix = bytes.subarray(0, clearPrefix);
  const ciphertext = new Uint8Array(
    await subtle().encrypt({ name: "AES-GCM", iv, additionalData: prefix }, key, bytes.subarray(clearPrefix)),
  );
  const out = new Uint8Array(clearPrefix + ciphertext.byteLength + IV_LENGTH + TRAILER_LENGTH);
  out.set(prefix, 0);
  out.set(ciphertext, clearPrefix);
  out.set(iv, clearPrefix + ciphertext.byteLength);
  out[out.byteLength - 2] = IV_LENGTH;
  out[out.byteLength - 1] = keyIndex;
  return out;
}

/**
 * The IV of an encrypted frame as hex (the `ivLength` bytes before the trailer), or null when
 * the bytes cannot be an encrypted frame (too short, or a trailer not naming a 12-byte IV).
 */
export function ivOf(bytes) {
  const b = bytesOf(bytes);
  if (b.byteLength < IV_LENGTH + TRAILER_LENGTH) return null;
  if (b[b.byteLength - 2] !== IV_LENGTH) return null;
  return toHex(b.subarray(b.byteLength - TRAILER_LENGTH - IV_LENGTH, b.byteLength - TRAILER_LENGTH));
}

function randomSendCount() {
  const r = new Uint32Array(1);
  globalThis.crypto.getRandomValues(r);
  return r[0] % SEND_COUNT_MODULUS; // [0, 0xffff); the modulo bias is irrelevant here
}

/** An error carrying a counted reason ("no-key", "encrypt"). */
export class FrameCryptoError extends Error {
  constructor(reason, message) {
    super(message ?? reason);
    this.name = "FrameCryptoError";
    this.reason = reason;
  }
}

/**
 * Encrypts one sender's frames (this device's media; one instance may serve several SSRCs).
 *
 * Counters: `frames` (seen), `encrypted`, `clear` (frames no longer than their clear prefix,
 * passed through unencrypted, e.g. empty Opus DTX frames), `dropped` by reason ("no-key": no key
 * at the current index; "encrypt": WebCrypto refused).
 */
export class FrameEncryptor {
  constructor() {
    /** @type {Map<number, CryptoKey>} */
    this.keys = new Map();
    /** @type {number|null} index used for sending */
    this.currentIndex = null;
    /** @type {Map<number, number>} SSRC → frames sent so far (from a random start) */
    this.sendCounts = new Map();
    this.frames = 0;
    this.encrypted = 0;
    this.clear = 0;
    this.dropped = {};
  }

  /** Install a key and send with it from now on. */
  setKey(index, key) {
    checkIndex(index);
    this.keys.delete(index);
    this.keys.set(index, key);
    this.currentIndex = index;
    this.trim();
  }

  /**
   * Install a key without sending with it yet (a new key is handed out before it is used, so
   * that receivers have it when the first frame under it arrives).
   */
  addKey(index, key) {
    checkIndex(index);
    this.keys.delete(index);
    this.keys.set(index, key);
    this.trim();
  }

  /** Send with the key already installed at `index` (or, if none yet, drop frames until it is). */
  useKey(index) {
    checkIndex(index);
    this.currentIndex = index;
  }

  /** Old keys are no use to a sender: keep the newest few, never the current one out. */
  trim() {
    for (const index of this.keys.keys()) {
      if (this.keys.size <= DECRYPTOR_KEY_SLOTS) break;
      if (index !== this.currentIndex) this.keys.delete(index);
    }
  }

  /** Whether `index` has a key installed. */
  hasKey(index) {
    return this.keys.has(index);
  }

  /** The IV for the next frame of `ssrc` (advances that SSRC's counter). */
  nextIv(ssrc, timestamp) {
    const s = (ssrc ?? UNKNOWN_SSRC) >>> 0;
    let count = this.sendCounts.get(s);
    if (count === undefined) count = randomSendCount();
    this.sendCounts.set(s, count + 1);
    return makeIv(s, timestamp, count);
  }

  /**
   * Encrypt a frame with the current key. A frame no longer than its clear prefix is returned
   * unchanged (same bytes, same length) and counted as `clear`.
   * @param {Uint8Array|ArrayBuffer} frameBytes
   * @param {{ssrc: number, timestamp: number, kind: "audio"|"video", codec?: string, keyFrame?: boolean}} info
   * @returns {Promise<Uint8Array>} the encrypted frame (length + 30)
   * @throws {FrameCryptoError} reason "no-key" or "encrypt" (also counted in `dropped`)
   */
  async encrypt(frameBytes, info) {
    const bytes = bytesOf(frameBytes);
    this.frames++;
    const clearPrefix = clearPrefixLength(info);
    if (bytes.byteLength <= clearPrefix) {
      this.clear++;
      return bytes;
    }
    const index = this.currentIndex;
    const key = index === null ? undefined : this.keys.get(index);
    if (!key) {
      this.count("no-key");
      throw new FrameCryptoError("no-key", `no sending key at index ${index}`);
    }
    const iv = this.nextIv(info.ssrc, info.timestamp);
    try {
      const out = await encryptFrameWithIv(key, bytes, { iv, clearPrefix, keyIndex: index });
      this.encrypted++;
      return out;
    } catch (e) {
      this.count("encrypt");
      throw new FrameCryptoError("encrypt", e?.message ?? String(e));
    }
  }

  count(reason) {
    this.dropped[reason] = (this.dropped[reason] ?? 0) + 1;
  }
}

/**
 * Decrypts one remote participant's frames. Keeps the DECRYPTOR_KEY_SLOTS most recently set key
 * indices; a frame names its key by index in its trailer.
 *
 * Counters: `frames`, `decrypted`, `dropped` by reason (DECRYPT_FAILURES).
 */
export class FrameDecryptor {
  constructor() {
    /** @type {Map<number, CryptoKey>} insertion order = age */
    this.keys = new Map();
    this.frames = 0;
    this.decrypted = 0;
    this.dropped = {};
  }

  setKey(index, key) {
    checkIndex(index);
    this.keys.delete(index); // re-setting an index makes it the newest
    this.keys.set(index, key);
    while (this.keys.size > DECRYPTOR_KEY_SLOTS) this.keys.delete(this.keys.keys().next().value);
  }

  hasKey(index) {
    return this.keys.has(index);
  }

  /**
   * @param {Uint8Array|ArrayBuffer} bytes an encrypted frame
   * @param {{kind: "audio"|"video", codec?: string, keyFrame?: boolean}} info as the receiver sees it
   * @returns {Promise<{ok: true, data: Uint8Array} | {ok: false, reason: "no-key"|"too-short"|"bad-trailer"|"auth"}>}
   *   never rejects
   */
  async decrypt(bytes, info) {
    this.frames++;
    let b;
    try {
      b = bytesOf(bytes);
    } catch {
      return this.fail("too-short");
    }
    const clearPrefix = clearPrefixLength(info);
    // The shortest valid frame: prefix, an empty plaintext's tag, IV, trailer. Frames a sender
    // passed through because they were no longer than the prefix end up here too.
    if (b.byteLength < clearPrefix + FRAME_OVERHEAD) return this.fail("too-short");
    const ivLength = b[b.byteLength - 2];
    const keyIndex = b[b.byteLength - 1];
    if (ivLength !== IV_LENGTH) return this.fail("bad-trailer");
    const key = this.keys.get(keyIndex);
    if (!key) return this.fail("no-key");
    const ivStart = b.byteLength - TRAILER_LENGTH - IV_LENGTH;
    const prefix = b.subarray(0, clearPrefix);
    let plain;
    try {
      plain = await subtle().decrypt(
        { name: "AES-GCM", iv: b.subarray(ivStart, ivStart + IV_LENGTH), additionalData: prefix },
        key,
        b.subarray(clearPrefix, ivStart),
      );
    } catch {
      return this.fail("auth");
    }
    const data = new Uint8Array(clearPrefix + plain.byteLength);
    data.set(prefix, 0);
    data.set(new Uint8Array(plain), clearPrefix);
    this.decrypted++;
    return { ok: true, data };
  }

  fail(reason) {
    this.dropped[reason] = (this.dropped[reason] ?? 0) + 1;
    return { ok: false, reason };
  }
}

function checkIndex(index) {
  if (!Number.isInteger(index) || index < 0 || index > MAX_KEY_INDEX) {
    throw new RangeError(`key index must be an integer in 0..${MAX_KEY_INDEX}, got ${index}`);
  }
}
