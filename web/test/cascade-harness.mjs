// The cascade harness: two organisations, each with a federating Synapse and its own weir focus,
// and stock matrix-js-sdk clients in Chromium that each call their own organisation's focus.
// Used by web/test/cascade.test.mjs. Built on harness.mjs; same rules: loopback only, every wait
// bounded, teardown always stops everything.

import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

import {
  CHROMIUM,
  CHROMIUM_ARGS,
  Fatal,
  Focus,
  Harness,
  PEOPLE,
  Synapse,
  createCallRoom,
  joinRoom,
  joinedMembers,
  log,
  openParticipant,
  startStaticServer,
  suffix,
  waitFor,
} from "./harness.mjs";

/**
 * Two organisations: alice and bob on site a (focus FOCUSA), carol on site b (focus FOCUSB). Each
 * has a colour and a microphone tone of its own, so both whose video and whose audio a feed
 * carries can be checked.
 */
export const CASCADE_SITES = [
  { name: "a", focusDevice: "FOCUSA", people: [{ ...PEOPLE[0], tone: 440 }, { ...PEOPLE[1], tone: 660 }] },
  { name: "b", focusDevice: "FOCUSB", people: [{ ...PEOPLE[2], tone: 880 }] },
];

/**
 * One conference across organisations. Each site is a Synapse that federates over loopback
 * (`scripts/synapse.sh start-fed`), its focus `@focus:localhost:PORT` with its own device id, and
 * its participants, who log in to their own homeserver and call only their own focus. The room is
 * created on the first site by its first participant, who invites everyone else and every focus
 * (the foci join on invite).
 *
 * The set-up order is the one loadtest/tests/cascade.rs uses: every participant's homeserver must
 * see every focus joined before that participant publishes its `m.call.member` entry, because a
 * server sends an event only to the servers it knows are in the room, and a focus that never sees
 * a member entry naming the far focus refuses that focus's trunk. start() waits for that; join()
 * then publishes and calls.
 */
export class CascadeHarness extends Harness {
  /**
   * @param {object} [o]
   * @param {Array<{name: string, focusDevice: string, people: Array<{name: string, colour: string}>}>} [o.sites]
   */
  constructor({ sites = CASCADE_SITES, keepDir = !!process.env.WEIR_KEEP_TMP } = {}) {
    const copies = sites.map((s) => ({ ...s, people: s.people.map((p) => ({ ...p })) }));
    super({ people: copies.flatMap((s) => s.people), withFocus: true, keepDir });
    this.sites = copies;
  }

  get foci() {
    return this.sites.map((s) => s.focus).filter(Boolean);
  }

  get synapses() {
    return this.sites.map((s) => s.syn).filter(Boolean);
  }

  siteOf(name) {
    return this.sites.find((s) => s.people.some((p) => p.name === name));
  }

  /** Synapses, accounts, foci, the room with everyone and every focus joined, browser and pages. */
  async start() {
    const t0 = Date.now();
    this.dir = mkdtempSync(join(tmpdir(), "weir-cascade-"));
    log(`work dir ${this.dir}`);

    const started = await Promise.allSettled(this.sites.map((s) => Synapse.startFederating(join(this.dir, `hs-${s.name}`))));
    started.forEach((r, i) => {
      if (r.status !== "fulfilled") return;
      const site = this.sites[i];
      site.syn = r.value;
      this.cleanups.push(() => site.syn.stop());
    });
    const failedStart = started.find((r) => r.status === "rejected");
    if (failedStart) throw failedStart.reason;
    this.timings.synapseStartMs = Date.now() - t0;
    for (const s of this.sites) log(`site ${s.name}: synapse ${s.syn.baseUrl}, server name ${s.syn.serverName}, up in ${s.syn.startMs} ms`);

    this.users = {};
    for (const s of this.sites) {
      s.focusUser = await s.syn.register("focus", `pw-${suffix()}`);
      for (const p of s.people) this.users[p.name] = await s.syn.register(p.name, `pw-${suffix()}`);
    }

    const tf = Date.now();
    for (const s of this.sites) {
      s.focus = await Focus.start({ syn: s.syn, user: s.focusUser, dir: this.dir, deviceId: s.focusDevice, name: `focus-${s.name}` });
      this.cleanups.push(() => s.focus.stop());
      log(`site ${s.name}: focus ${s.focusUser.userId}/${s.focusDevice} pid ${s.focus.pid}, http ${s.focus.baseUrl}, log ${s.focus.logPath}`);
    }
    await Promise.all(this.sites.map((s) => s.focus.waitHealthy()));

    const home = this.sites[0];
    const creator = this.users[home.people[0].name];
    this.creator = creator;
    const fociIds = this.sites.map((s) => s.focusUser.userId);
    const invite = [...this.people.map((p) => this.users[p.name].userId).filter((u) => u !== creator.userId), ...fociIds];
    const { roomId, confId } = await createCallRoom(home.syn, creator, { invite });
    this.roomId = roomId;
    this.confId = confId;
    log(`room ${roomId} on ${home.syn.serverName}, conf ${confId}; invited ${invite.join(", ")}`);

    // Everyone else joins through their own homeserver; a remote server joins through the room's
    // and may not have the invite yet, so retry (bounded).
    for (const s of this.sites) {
      for (const p of s.people) {
        const u = this.users[p.name];
        if (u.userId === creator.userId) continue;
        const via = s === home ? [] : [home.syn.serverName];
        await waitFor(`${u.userId} to join ${roomId}${via.length ? ` via ${via}` : ""}`, async () => {
          await joinRoom(s.syn, u, roomId, { via });
          return true;
        }, { timeoutMs: 60000, intervalMs: 500 });
      }
    }

    // Every focus joined, as every site's homeserver sees the room (see the class comment).
    await waitFor(
      "every focus to be joined to the room as seen from every site's homeserver",
      async () => {
        for (const f of this.foci) if (f.exit) throw new Fatal(`focus ${f.name} exited: ${JSON.stringify(f.exit)}\n${f.tailText(40)}`);
        const missing = [];
        for (const s of this.sites) {
          const members = await joinedMembers(s.syn, this.users[s.people[0].name].accessToken, roomId);
          for (const f of fociIds) if (!members.includes(f)) missing.push(`${s.syn.serverName} does not see ${f}`);
        }
        if (missing.length) throw new Error(missing.join("; "));
        return true;
      },
      { timeoutMs: 90000, intervalMs: 500 },
    );
    this.timings.fociJoinedMs = Date.now() - tf;
    log(`both foci healthy and joined (seen from every site) ${this.timings.fociJoinedMs} ms after starting them`);

    this.web = await startStaticServer();
    this.cleanups.push(() => this.web.close());
    const { chromium } = await import("playwright-core");
    this.browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: CHROMIUM_ARGS });
    this.cleanups.push(() => this.browser.close());

    for (const s of this.sites) {
      for (const p of s.people) {
        const part = await openParticipant({
          browser: this.browser,
          webUrl: this.web.url,
          baseUrl: s.syn.baseUrl,
          name: p.name,
          colour: p.colour,
          tone: p.tone,
          user: this.users[p.name],
        });
        part.site = s;
        this.participants.push(part);
      }
    }
    this.timings.setupMs = Date.now() - t0;
    return this;
  }

  /** The focus `part` calls: its own site's. */
  focusOf(part) {
    return part.site.focus.info;
  }

  async join(part, timeoutMs = 30000, { publishMember = true } = {}) {
    const focus = this.focusOf(part);
    const r = await part.page.evaluate((a) => window.Probe.joinCall(a), {
      roomId: this.roomId,
      confId: this.confId,
      focus,
      timeoutMs,
      publishMember,
    });
    log(`${part.name} (${part.userId}) placed call ${r.callId} to ${focus.userId}/${focus.deviceId}`);
    return r;
  }
}

// ------------------------------------------------------------------------------------------------
// Helpers over snapshots

/** The remote feeds in snapshot `snap` owned by `userId`. */
