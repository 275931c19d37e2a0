// The key exchange's rules, without a homeserver: which keys are taken (Olm-encrypted, for our
// room, from the device that claims them, well-formed), who our key goes to (member devices
// only, a reloaded page again), and when we rotate (a device left).

import { test } from "node:test";
import assert from "node:assert/strict";
import { EventEmitter } from "node:events";
import { KeyExchange, KEYS_EVENT, toBase64, USE_KEY_DELAY_MS } from "../src/e2ee/key-exchange.js";

const ROOM = "!room:hs";

/** Enough of a MatrixClient: who we are, a crypto API that knows every device, to-device sending recorded. */
function fakeClient({ knownDevices = null } = {}) {
  const c = new EventEmitter();
  c.sent = [];
  c.getUserId = () => "@me:hs";
  c.getDeviceId = () => "MEDEV";
  c.getCrypto = () => ({
    getUserDeviceInfo: async (users) =>
      new Map(users.map((u) => [u, { has: (d) => knownDevices === null || knownDevices.includes(`${u}|${d}`) }])),
  });
  c.encryptAndSendToDevice = async (type, targets, content) => c.sent.push({ type, targets, content });
  return c;
}

function keyMessage({ sender = "@bob:hs", device = "BOBDEV", room = ROOM, index = 0, key = toBase64(new Uint8Array(16).fill(7)) } = {}) {
  return {
    type: KEYS_EVENT,
    sender,
    content: {
      keys: { index, key },
      room_id: room,
      member: { claimed_device_id: device, id: `${sender}:${device}` },
      session: { call_id: "", application: "m.call", scope: "m.room" },
      sent_ts: 1,
    },
  };
}

function received(kx) {
  const got = [];
  kx.addEventListener("key", (e) => !e.detail.local && got.push(e.detail));
  return got;
}

test("a key is taken only Olm-encrypted, for our room, from the device that claims it, well-formed", () => {
  const kx = new KeyExchange({ client: fakeClient(), roomId: ROOM, log: () => {} });
  const got = received(kx);
  const olm = (sender = "@bob:hs", device = "BOBDEV") => ({ sender, senderDevice: device });
  kx.receive({ message: keyMessage(), encryptionInfo: null }); // in clear
  kx.receive({ message: keyMessage({ device: "OTHERDEV" }), encryptionInfo: olm() }); // claims another device
  kx.receive({ message: keyMessage(), encryptionInfo: olm("@mallory:hs", "BOBDEV") }); // another sender
  kx.receive({ message: keyMessage({ room: "!other:hs" }), encryptionInfo: olm() }); // another room
  kx.receive({ message: keyMessage({ index: 256 }), encryptionInfo: olm() }); // no such index
  kx.receive({ message: keyMessage({ key: toBase64(new Uint8Array(4)) }), encryptionInfo: olm() }); // too short
  kx.receive({ message: keyMessage({ key: "!!not base64!!" }), encryptionInfo: olm() });
  assert.equal(got.length, 0, `nothing taken: ${JSON.stringify(got)}`);
  kx.receive({ message: keyMessage({ index: 3 }), encryptionInfo: olm() });
  assert.equal(got.length, 1);
  assert.equal(got[0].participant, "@bob:hs|BOBDEV");
  assert.equal(got[0].index, 3);
  assert.deepEqual([...got[0].key], new Array(16).fill(7));
  assert.ok(kx.hasKeyFrom("@bob:hs", "BOBDEV"));
  kx.blocked = true;
  kx.receive({ message: keyMessage({ index: 4 }), encryptionInfo: olm() });
  assert.equal(got.length, 1, "a blocked exchange takes nothing");
});

test("our key goes to member devices only, in Element Call's content, and again to a reloaded page", async () => {
  const client = fakeClient();
  const kx = new KeyExchange({ client, roomId: ROOM, log: () => {} });
  kx.start();
  kx.setMembers([
    { userId: "@me:hs", deviceId: "MEDEV", sessionId: "s0" },
    { userId: "@bob:hs", deviceId: "BOBDEV", sessionId: "s1" },
  ]);
  await kx.sending;
  assert.equal(client.sent.length, 1);
  const { type, targets, content } = client.sent[0];
  assert.equal(type, KEYS_EVENT);
  assert.deepEqual(targets, [{ userId: "@bob:hs", deviceId: "BOBDEV" }], "not to ourselves, nor to anyone else");
  assert.equal(content.room_id, ROOM);
  assert.equal(content.keys.index, 0);
  assert.equal(content.member.claimed_device_id, "MEDEV");
  assert.deepEqual(content.session, { call_id: "", application: "m.call", scope: "m.room" });

  // the same members again: nothing new to send
  kx.setMembers([{ userId: "@bob:hs", deviceId: "BOBDEV", sessionId: "s1" }]);
  await kx.sending;
  assert.equal(client.sent.length, 1);

  // bob reloads his page: same device, new session; his keys are gone with the page
  kx.setMembers([{ userId: "@bob:hs", deviceId: "BOBDEV", sessionId: "s2" }]);
  await kx.sending;
  assert.equal(client.sent.length, 2, "the reloaded page gets a key again");
  kx.stop();
});

test("a device leaving makes a new key, sent at once and used only after the delay", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  const client = fakeClient();
  const kx = new KeyExchange({ client, roomId: ROOM, log: () => {} });
  const used = [];
  kx.addEventListener("use", (e) => used.push(e.detail.index));
  kx.start();
  kx.setMembers([
    { userId: "@bob:hs", deviceId: "BOBDEV", sessionId: "s1" },
    { userId: "@carol:hs", deviceId: "CAROLDEV", sessionId: "s2" },
  ]);
  await kx.sending;
  kx.setMembers([{ userId: "@bob:hs", deviceId: "BOBDEV", sessionId: "s1" }]); // carol left
  await kx.sending;
  const last = client.sent.at(-1);
  assert.equal(last.content.keys.index, 1);
  assert.deepEqual(last.targets, [{ userId: "@bob:hs", deviceId: "BOBDEV" }], "not to carol, who left");
  assert.notEqual(last.content.keys.key, client.sent[0].content.keys.key);
  assert.deepEqual(used, [0], "the new key is not used yet");
  t.mock.timers.tick(USE_KEY_DELAY_MS);
  assert.deepEqual(used, [0, 1]);
  kx.stop();
});

test("a device without published keys is named unreachable, and reached once it has them", async () => {
  const known = [];
  const client = fakeClient({ knownDevices: known });
  const kx = new KeyExchange({ client, roomId: ROOM, log: () => {} });
  const reports = [];
  kx.addEventListener("reachability", (e) => reports.push(e.detail.unreachable.map((u) => u.deviceId)));
  kx.start();
  kx.setMembers([{ userId: "@bob:hs", deviceId: "BOBDEV", sessionId: "s1" }]);
  await kx.sending;
  assert.deepEqual(reports.at(-1), ["BOBDEV"]);
  assert.equal(client.sent.length, 0);
  known.push("@bob:hs|BOBDEV");
  kx.sendCurrentToNew(); // what the retry timer does
  await kx.sending;
  assert.equal(client.sent.length, 1);
  assert.deepEqual(reports.at(-1), []);
  kx.stop();
});
