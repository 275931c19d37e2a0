// Frame encryption (src/e2ee/frame-crypto.js) in livekit-client's E2EE frame format, and the
// transform worker's pipeline (src/e2ee/transform-worker.js) driven with fake encoded frames.
// Runs in node alone: `node --test test/frame-crypto.test.mjs`.

import { test } from "node:test";
import assert from "node:assert/strict";
import { createCipheriv, hkdfSync } from "node:crypto";

import {
  FrameDecryptor,
  FrameEncryptor,
  clearPrefixLength,
  deriveFrameKey,
  encryptFrameWithIv,
  ivOf,
  toHex,
} from "../src/e2ee/frame-crypto.js";
import { createTransformWorker } from "../src/e2ee/transform-worker.js";

const { subtle } = globalThis.crypto;

const SSRC = 0x11223344;
const TS = 0xaabbccdd;

function randomKey() {
  return globalThis.crypto.getRandomValues(new Uint8Array(16));
}

function frameOf(length, seed = 1) {
  const f = new Uint8Array(length);
  for (let i = 0; i < length; i++) f[i] = (i * 31 + seed * 17) & 0xff;
  return f;
}

async function pair(index = 0) {
  const key = await deriveFrameKey(randomKey());
  const enc = new FrameEncryptor();
  enc.setKey(index, key);
  const dec = new FrameDecryptor();
  dec.setKey(index, key);
  return { key, enc, dec };
}

const be32 = (b, at) => new DataView(b.buffer, b.byteOffset, b.byteLength).getUint32(at);

const cases = [
  { name: "audio (Opus)", info: { kind: "audio", codec: "opus" }, prefix: 1, length: 120 },
  { name: "VP8 key frame", info: { kind: "video", codec: "vp8", keyFrame: true }, prefix: 10, length: 3000 },
  { name: "VP8 delta frame", info: { kind: "video", codec: "vp8", keyFrame: false }, prefix: 3, length: 700 },
];

for (const c of cases) {
  test(`round trip: ${c.name}`, async () => {
    assert.equal(clearPrefixLength(c.info), c.prefix);
    const { enc, dec } = await pair(3);
    const input = frameOf(c.length);
    const out = await enc.encrypt(input, { ...c.info, ssrc: SSRC, timestamp: TS });
    assert.equal(out.byteLength, input.byteLength + 16 + 12 + 2);
    assert.deepEqual(out.subarray(0, c.prefix), input.subarray(0, c.prefix), "clear prefix unchanged");
    assert.notDeepEqual(out.subarray(c.prefix, c.prefix + 16), input.subarray(c.prefix, c.prefix + 16), "rest encrypted");
    assert.deepEqual([...out.subarray(-2)], [12, 3], "trailer: IV length, key index");
    const iv = out.subarray(out.byteLength - 14, out.byteLength - 2);
    assert.equal(be32(iv, 0), SSRC);
    assert.equal(be32(iv, 4), TS);
    assert.equal(ivOf(out), toHex(iv));
    const r = await dec.decrypt(out, c.info);
    assert.equal(r.ok, true, r.reason);
    assert.deepEqual(r.data, input);
    assert.equal(dec.decrypted, 1);
    assert.equal(enc.encrypted, 1);
  });
}

test("ArrayBuffer input and a MIME type as codec", async () => {
  const { enc, dec } = await pair();
  const input = frameOf(50);
  const out = await enc.encrypt(input.slice().buffer, { kind: "video", codec: "video/VP8", keyFrame: true, ssrc: 1, timestamp: 2 });
  assert.deepEqual(out.subarray(0, 10), input.subarray(0, 10));
  const r = await dec.decrypt(out.slice().buffer, { kind: "video", codec: "video/VP8", keyFrame: true });
  assert.deepEqual(r.data, input);
  assert.equal(clearPrefixLength({ kind: "video", codec: "video/H264", keyFrame: true }), 0);
  assert.equal(clearPrefixLength({ kind: "video", keyFrame: false }), 3, "video without codec is VP8");
});

test("a decryptor with another key: auth", async () => {
  const { enc } = await pair(0);
  const other = new FrameDecryptor();
  other.setKey(0, await deriveFrameKey(randomKey()));
  const out = await enc.encrypt(frameOf(100), { kind: "audio", ssrc: SSRC, timestamp: TS });
  assert.deepEqual(await other.decrypt(out, { kind: "audio" }), { ok: false, reason: "auth" });
  assert.deepEqual(other.dropped, { auth: 1 });
});

test("unknown key index: no-key", async () => {
  const { enc } = await pair(1);
  const dec = new FrameDecryptor();
  dec.setKey(0, await deriveFrameKey(randomKey()));
  const out = await enc.encrypt(frameOf(100), { kind: "audio", ssrc: SSRC, timestamp: TS });
  assert.deepEqual(await dec.decrypt(out, { kind: "audio" }), { ok: false, reason: "no-key" });
});

test("the clear prefix is authenticated: flipping one of its bytes fails", async () => {
  const { enc, dec } = await pair();
  for (const info of [{ kind: "audio" }, { kind: "video", codec: "vp8", keyFrame: true }]) {
    const out = await enc.encrypt(frameOf(200), { ...info, ssrc: SSRC, timestamp: TS });
    for (const at of [0, clearPrefixLength(info) - 1]) {
      const bad = out.slice();
      bad[at] ^= 0x01;
      assert.deepEqual(await dec.decrypt(bad, info), { ok: false, reason: "auth" }, `byte ${at}`);
    }
    const badIv = out.slice();
    badIv[badIv.byteLength - 5] ^= 0x80;
    assert.deepEqual(await dec.decrypt(badIv, info), { ok: false, reason: "auth" }, "IV byte");
    const badCt = out.slice();
    badCt[clearPrefixLength(info) + 2] ^= 0x04;
    assert.deepEqual(await dec.decrypt(badCt, info), { ok: false, reason: "auth" }, "ciphertext byte");
  }
});

test("truncated or malformed frames are rejected, not thrown", async () => {
  const { enc, dec } = await pair();
  const info = { kind: "video", codec: "vp8", keyFrame: false };
  const out = await enc.encrypt(frameOf(300), { ...info, ssrc: SSRC, timestamp: TS });
  for (const cut of [1, 2, 5, 13, 14, 100, out.byteLength - 31, out.byteLength - 3, out.byteLength]) {
    const r = await dec.decrypt(out.subarray(0, out.byteLength - cut), info);
    assert.equal(r.ok, false);
    assert.ok(["too-short", "bad-trailer", "auth", "no-key"].includes(r.reason), `cut ${cut}: ${r.reason}`);
  }
  assert.equal((await dec.decrypt(new Uint8Array(0), info)).reason, "too-short");
  assert.equal((await dec.decrypt(out.subarray(0, 3 + 16 + 12 + 1), info)).reason, "too-short");
  const badTrailer = out.slice();
  badTrailer[badTrailer.byteLength - 2] = 16;
  assert.equal((await dec.decrypt(badTrailer, info)).reason, "bad-trailer");
  // Cutting the tail off leaves ciphertext bytes where the trailer was: bad-trailer or worse.
  const tail = await dec.decrypt(out.subarray(0, out.byteLength - 2), info);
  assert.ok(["bad-trailer", "no-key", "auth"].includes(tail.reason), tail.reason);
});

test("frames no longer than the clear prefix pass through on send, are undecryptable on receive", async () => {
  const { enc, dec } = await pair();
  const one = new Uint8Array([0xfc]);
  const out = await enc.encrypt(one, { kind: "audio", ssrc: SSRC, timestamp: TS });
  assert.deepEqual(out, one);
  assert.equal(enc.clear, 1);
  assert.equal(enc.encrypted, 0);
  const three = frameOf(3);
  assert.deepEqual(await enc.encrypt(three, { kind: "video", codec: "vp8", ssrc: SSRC, timestamp: TS }), three);
  assert.deepEqual(await dec.decrypt(one, { kind: "audio" }), { ok: false, reason: "too-short" });
  assert.deepEqual(await dec.decrypt(three, { kind: "video", codec: "vp8" }), { ok: false, reason: "too-short" });
  // One byte more than the prefix is encrypted.
  const two = await enc.encrypt(new Uint8Array([0xfc, 0x01]), { kind: "audio", ssrc: SSRC, timestamp: TS });
  assert.equal(two.byteLength, 2 + 30);
  assert.deepEqual((await dec.decrypt(two, { kind: "audio" })).data, new Uint8Array([0xfc, 0x01]));
});

test("an encryptor without a key refuses (counted), never sends in clear", async () => {
  const enc = new FrameEncryptor();
  await assert.rejects(enc.encrypt(frameOf(100), { kind: "audio", ssrc: 1, timestamp: 1 }), (e) => e.reason === "no-key");
  assert.deepEqual(enc.dropped, { "no-key": 1 });
});

test("key rotation: old and new frames both decrypt", async () => {
  const k0 = await deriveFrameKey(randomKey());
  const k1 = await deriveFrameKey(randomKey());
  const enc = new FrameEncryptor();
  enc.setKey(0, k0);
  const info = { kind: "video", codec: "vp8", keyFrame: false, ssrc: SSRC };
  const old = await enc.encrypt(frameOf(400, 1), { ...info, timestamp: 1000 });
  enc.setKey(1, k1);
  const fresh = await enc.encrypt(frameOf(400, 2), { ...info, timestamp: 4000 });
  assert.equal(old.at(-1), 0);
  assert.equal(fresh.at(-1), 1);
  const dec = new FrameDecryptor();
  dec.setKey(0, k0);
  dec.setKey(1, k1);
  assert.deepEqual((await dec.decrypt(fresh, info)).data, frameOf(400, 2));
  assert.deepEqual((await dec.decrypt(old, info)).data, frameOf(400, 1));
  // A decryptor that only has the new key cannot read the old frame.
  const onlyNew = new FrameDecryptor();
  onlyNew.setKey(1, k1);
  assert.equal((await onlyNew.decrypt(old, info)).reason, "no-key");
  // addKey + useKey: a key installed ahead is not used until asked.
  const k2 = await deriveFrameKey(randomKey());
  enc.addKey(2, k2);
  assert.equal((await enc.encrypt(frameOf(50), { ...info, timestamp: 5 })).at(-1), 1);
  enc.useKey(2);
  assert.equal((await enc.encrypt(frameOf(50), { ...info, timestamp: 6 })).at(-1), 2);
});

test("a decryptor keeps the 16 most recently set indices", async () => {
  const keys = await Promise.all(Array.from({ length: 18 }, () => deriveFrameKey(randomKey())));
  const dec = new FrameDecryptor();
  for (let i = 0; i < 18; i++) dec.setKey(i, keys[i]);
  assert.equal(dec.keys.size, 16);
  assert.equal(dec.hasKey(0), false);
  assert.equal(dec.hasKey(1), false);
  assert.equal(dec.hasKey(2), true);
  assert.equal(dec.hasKey(17), true);
  assert.throws(() => dec.setKey(256, keys[0]), RangeError);
});

test("same SSRC and timestamp: different IVs; the counter is per SSRC", async () => {
  const { enc } = await pair();
  const info = { kind: "audio", ssrc: SSRC, timestamp: TS };
  const a = await enc.encrypt(frameOf(60), info);
  const b = await enc.encrypt(frameOf(60), info);
  assert.notEqual(ivOf(a), ivOf(b));
  const ivA = Buffer.from(ivOf(a), "hex");
  const ivB = Buffer.from(ivOf(b), "hex");
  assert.deepEqual(ivA.subarray(0, 8), ivB.subarray(0, 8));
  // word 2 = (timestamp − sendCount mod 0xffff) >>> 0, the count going up by one per frame
  const countA = (TS - ivA.readUInt32BE(8)) >>> 0;
  const countB = (TS - ivB.readUInt32BE(8)) >>> 0;
  assert.ok(countA < 0xffff);
  assert.equal(countB, (countA + 1) % 0xffff);
  // timestamp 0: the subtraction wraps modulo 2^32
  const z = Buffer.from(ivOf(await enc.encrypt(frameOf(60), { kind: "audio", ssrc: 7, timestamp: 0 })), "hex");
  const countZ = (0 - z.readUInt32BE(8)) >>> 0;
  assert.ok(countZ < 0xffff);
  assert.equal(z.readUInt32BE(0), 7);
});

test("known answer: HKDF key from 00..0f, fixed IV, against WebCrypto and node:crypto directly", async () => {
  const raw = Uint8Array.from({ length: 16 }, (_, i) => i);
  const frame = Uint8Array.from({ length: 24 }, (_, i) => (i * 7 + 1) & 0xff);
  const iv = Buffer.from("a1b2c3d4e5f60718293a4b5c", "hex");
  const prefix = 3; // a VP8 delta frame
  const keyIndex = 5;

  const key = await deriveFrameKey(raw);
  const got = await encryptFrameWithIv(key, frame, { iv: new Uint8Array(iv), clearPrefix: prefix, keyIndex });

  // The specification, step by step, with WebCrypto.
  const material = await subtle.importKey("raw", raw, "HKDF", false, ["deriveKey"]);
  const aes = await subtle.deriveKey(
    { name: "HKDF", hash: "SHA-256", salt: new TextEncoder().encode("LKFrameEncryptionKey"), info: new ArrayBuffer(128) },
    material,
    { name: "AES-GCM", length: 128 },
    false,
    ["encrypt", "decrypt"],
  );
  const ct = new Uint8Array(
    await subtle.encrypt({ name: "AES-GCM", iv, additionalData: frame.subarray(0, prefix) }, aes, frame.subarray(prefix)),
  );
  const expected = Buffer.concat([frame.subarray(0, prefix), ct, iv, Buffer.from([12, keyIndex])]);
  assert.equal(toHex(got), expected.toString("hex"));

  // The same with node's own HKDF and AES-GCM (OpenSSL), not WebCrypto.
  const aesKey = Buffer.from(hkdfSync("sha256", raw, Buffer.from("LKFrameEncryptionKey"), Buffer.alloc(128), 16));
  const cipher = createCipheriv("aes-128-gcm", aesKey, iv);
  cipher.setAAD(frame.subarray(0, prefix));
  const ct2 = Buffer.concat([cipher.update(frame.subarray(prefix)), cipher.final(), cipher.getAuthTag()]);
  assert.equal(toHex(got), Buffer.concat([frame.subarray(0, prefix), ct2, iv, Buffer.from([12, keyIndex])]).toString("hex"));

  // Pinned, so a change in any of the above shows.
  assert.equal(
    toHex(got),
    "01080f4b42da5a7427dc70285062c55f9507935613ac89bd539073abaa725b3f26debc98782bb286" + "a1b2c3d4e5f60718293a4b5c" + "0c05",
  );

  // And it decrypts.
  const dec = new FrameDecryptor();
  dec.setKey(keyIndex, key);
  assert.deepEqual((await dec.decrypt(got, { kind: "video", codec: "vp8", keyFrame: false })).data, frame);
});

// ---- the worker's pipeline, with fake encoded frames -------------------------------------------

class FakeScope extends EventTarget {
  constructor() {
    super();
    this.sent = [];
    this.waiters = [];
  }
  postMessage(msg) {
    this.sent.push(msg);
    for (const w of this.waiters.splice(0)) w();
  }
  send(data) {
    this.dispatchEvent(Object.assign(new Event("message"), { data }));
  }
  async reply(type) {
    for (;;) {
      const i = this.sent.findIndex((m) => m.type === type);
      if (i >= 0) return this.sent.splice(i, 1)[0];
      await new Promise((r) => this.waiters.push(r));
    }
  }
}

function fakeFrame(bytes, { kind, type, ssrc, timestamp, mimeType }) {
  const f = { data: bytes.slice().buffer, timestamp, getMetadata: () => ({ synchronizationSource: ssrc, mimeType }) };
  if (kind === "video") f.type = type;
  return f;
}

/** Pipe `frames` through a transform installed the given way; resolve with the frames written. */
async function run(scope, worker, options, frames, via = "rtctransform") {
  const readable = new ReadableStream({
    start(c) {
      for (const f of frames) c.enqueue(f);
      c.close();
    },
  });
  const written = [];
  let closed;
  const done = new Promise((r) => (closed = r));
  const writable = new WritableStream({ write: (f) => void written.push(f), close: () => closed() });
  if (via === "rtctransform") {
    scope.dispatchEvent(Object.assign(new Event("rtctransform"), { transformer: { readable, writable, options } }));
  } else {
    scope.send({ type: "stream", id: options.id, readable, writable, options });
  }
  await done;
  return written;
}

test("worker: send and receive pipelines, keys, owners, stats, audit, pass-through", async () => {
  const scope = new FakeScope();
  const worker = createTransformWorker(scope);
  const alice = "@alice:example.org|ALICEDEV";
  const rawA = randomKey();

  scope.send({ type: "setEnabled", enabled: true });
  scope.send({ type: "setSender", participant: alice });
  scope.send({ type: "audit", enabled: true, limit: 100 });
  scope.send({ type: "setKey", participant: alice, index: 4, key: rawA.slice().buffer });
  assert.deepEqual(await scope.reply("keySet"), { type: "keySet", participant: alice, index: 4 });

  const plain = [];
  for (let i = 0; i < 10; i++) {
    plain.push({ bytes: frameOf(i === 5 ? 3 : 200 + i, i), kind: "video", type: i % 4 === 0 ? "key" : "delta", ssrc: 99, timestamp: 3000 * i, mimeType: "video/VP8" });
  }
  const sent = await run(scope, worker, { id: "s1", direction: "send", kind: "video", participant: alice }, plain.map((p) => fakeFrame(p.bytes, p)));
  assert.equal(sent.length, 10, "every frame written, in order");
  for (let i = 0; i < 10; i++) {
    const d = new Uint8Array(sent[i].data);
    if (i === 5) {
      assert.deepEqual(d, plain[i].bytes, "3-byte delta frame passed through");
    } else {
      assert.equal(d.byteLength, plain[i].bytes.byteLength + 30);
      assert.equal(d.at(-1), 4);
      assert.equal(be32(d, d.byteLength - 10), 3000 * i, "IV timestamp: frames kept their order");
    }
  }

  // Receive through the insertable-streams path; the owner comes with setOwner, before the stream.
  scope.send({ type: "setOwner", id: "r1", participant: alice });
  const got = await run(
    scope,
    worker,
    { id: "r1", direction: "receive", kind: "video", participant: null },
    sent.map((f, i) => fakeFrame(new Uint8Array(f.data), { ...plain[i], ssrc: undefined })),
    "stream",
  );
  assert.equal(got.length, 9, "the pass-through frame is not handed to the decoder");
  const expected = plain.filter((_, i) => i !== 5).map((p) => p.bytes);
  assert.deepEqual(got.map((f) => new Uint8Array(f.data)), expected);

  // A receiver without an owner drops everything; one with a garbage frame counts it.
  const junk = frameOf(100, 7);
  junk[98] = 12;
  junk[99] = 4;
  const none = await run(scope, worker, { id: "r2", direction: "receive", kind: "video" }, [fakeFrame(new Uint8Array(sent[1].data), plain[1])]);
  assert.equal(none.length, 0);
  const bad = await run(scope, worker, { id: "r3", direction: "receive", kind: "video", participant: alice }, [
    fakeFrame(junk, { kind: "video", type: "delta" }),
    fakeFrame(new Uint8Array(sent[2].data), plain[2]),
  ]);
  assert.deepEqual(bad.map((f) => new Uint8Array(f.data)), [plain[2].bytes]);

  scope.send({ type: "stats" });
  const { transforms: stats } = await scope.reply("stats");
  assert.equal(stats.s1.direction, "send");
  assert.equal(stats.s1.participant, alice);
  assert.equal(stats.s1.frames, 10);
  assert.equal(stats.s1.encrypted, 9);
  assert.equal(stats.s1.clear, 1);
  assert.deepEqual(stats.r1.dropped, { "too-short": 1 });
  assert.equal(stats.r1.decrypted, 9);
  assert.equal(stats.r1.participant, alice);
  assert.deepEqual(stats.r2.dropped, { "no-owner": 1 });
  assert.deepEqual(stats.r3.dropped, { auth: 1 });
  assert.equal(stats.r3.decrypted, 1);

  // The audit: what the sender sent is byte for byte what the receiver got.
  scope.send({ type: "auditDump" });
  const { transforms: dump } = await scope.reply("auditDump");
  assert.equal(dump.s1.frames.length, 10);
  assert.deepEqual(dump.r1.frames, dump.s1.frames);
  assert.equal(dump.s1.frames[5][0], null, "no IV for a frame sent in clear");
  assert.equal(dump.s1.frames[0][0], ivOf(new Uint8Array(sent[0].data)));
  const h = toHex(new Uint8Array(await subtle.digest("SHA-256", sent[0].data)));
  assert.equal(dump.s1.frames[0][1], h);

  // Key rotation driven with useKey: a new key is installed, used only when asked.
  scope.send({ type: "setKey", participant: alice, index: 5, key: randomKey().buffer });
  await scope.reply("keySet");
  scope.send({ type: "useKey", index: 4 });
  const audio = [{ bytes: frameOf(80), kind: "audio", ssrc: 5, timestamp: 960 }];
  let [a] = await run(scope, worker, { id: "s2", direction: "send", kind: "audio" }, audio.map((p) => fakeFrame(p.bytes, p)));
  assert.equal(new Uint8Array(a.data).at(-1), 4);
  scope.send({ type: "setKey", participant: alice, index: 6, key: randomKey().buffer });
  await scope.reply("keySet");
  [a] = await run(scope, worker, { id: "s3", direction: "send", kind: "audio" }, audio.map((p) => fakeFrame(p.bytes, p)));
  assert.equal(new Uint8Array(a.data).at(-1), 4, "setKey after useKey does not switch");
  scope.send({ type: "useKey", index: 6 });
  [a] = await run(scope, worker, { id: "s4", direction: "send", kind: "audio" }, audio.map((p) => fakeFrame(p.bytes, p)));
  assert.equal(new Uint8Array(a.data).at(-1), 6);

  // Disabled: untouched both ways.
  scope.send({ type: "setEnabled", enabled: false });
  const clearOut = await run(scope, worker, { id: "s5", direction: "send", kind: "audio" }, audio.map((p) => fakeFrame(p.bytes, p)));
  assert.deepEqual(new Uint8Array(clearOut[0].data), audio[0].bytes);
  const clearIn = await run(scope, worker, { id: "r4", direction: "receive", kind: "audio" }, audio.map((p) => fakeFrame(p.bytes, p)));
  assert.deepEqual(new Uint8Array(clearIn[0].data), audio[0].bytes);
});

test("worker: no sending key yet → frames dropped, not sent in clear", async () => {
  const scope = new FakeScope();
  const worker = createTransformWorker(scope);
  scope.send({ type: "setSender", participant: "@bob:x|BOB" });
  const out = await run(scope, worker, { id: "s", direction: "send", kind: "audio" }, [
    fakeFrame(frameOf(90), { kind: "audio", ssrc: 1, timestamp: 1 }),
  ]);
  assert.equal(out.length, 0);
  scope.send({ type: "stats" });
  const { transforms } = await scope.reply("stats");
  assert.deepEqual(transforms.s.dropped, { "no-key": 1 });
});
