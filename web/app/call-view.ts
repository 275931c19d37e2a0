// The call page: tiles in a grid or a speaker view, the controls (microphone, camera, screen,
// devices, layout, numbers, leave), and the connection and encryption state. The focus is asked
// only for the videos on screen, at the size each tile shows them.

import type { MatrixClient } from "matrix-js-sdk";
import { WeirConference } from "../src/conference.js";
import { h, mount } from "./dom.ts";
import { Tile, type TileState } from "./tile.ts";

export interface CallViewOptions {
  client: MatrixClient;
  roomId: string;
  focus: { userId: string; deviceId: string; sessionId: string };
  workerUrl: string;
  onLeft: () => void;
  /** Tests: drop every key other devices send (a participant without the key). */
  blockKeys?: boolean;
}

/** How long layout changes settle before the focus is told the new sizes. */
const SUBSCRIBE_DEBOUNCE_MS = 150;
/** How often the numbers overlay refreshes. */
const STATS_INTERVAL_MS = 1000;

type Participant = ReturnType<WeirConference["participants"]>[number];

export class CallView {
  readonly element: HTMLElement;
  readonly conference: WeirConference;
  private readonly tiles = new Map<string, Tile>();
  private readonly grid: HTMLElement;
  private readonly stage: HTMLElement;
  private readonly connectionEl: HTMLElement;
  private readonly alertEl: HTMLElement;
  private alertTimer: number | undefined;
  private readonly controls: Record<string, HTMLButtonElement> = {};
  private readonly deviceDialog: HTMLDialogElement;
  private layout: "grid" | "speaker" = "grid";
  private statsOn = false;
  private statsTimer: number | undefined;
  private subscribeTimer: number | undefined;
  private visible = new Set<Element>();
  private readonly resize: ResizeObserver;
  private readonly intersect: IntersectionObserver;
  private participants: Participant[] = [];
  private pinned: string | null = null;
  private lastBytes = new Map<string, { t: number; bytes: number }>();

  constructor(private readonly o: CallViewOptions) {
    const room = o.client.getRoom(o.roomId);
    this.conference = new WeirConference({
      client: o.client,
      roomId: o.roomId,
      focus: o.focus,
      workerUrl: o.workerUrl,
      blockKeyExchange: Boolean(o.blockKeys),
      log: (...a: unknown[]) => console.log("[weir]", ...a),
    });
    this.connectionEl = h("span", { class: "connection", role: "status", "aria-live": "polite" }, "Connecting…");
    this.alertEl = h("p", { class: "call-alert", role: "alert", hidden: true });
    const encryptionEl = h("span", { class: "encryption", id: "encryption-state" }, "");
    this.grid = h("div", { class: "tiles", role: "region", "aria-label": "Participants" });
    this.stage = h("div", { class: "stage layout-grid" }, this.grid);

    const button = (key: string, label: string, onclick: () => void | Promise<void>, pressed?: boolean) => {
      // a control that fails says so instead of doing nothing
      const run = () => void Promise.resolve(onclick()).catch((e) => this.alert(`${label}: ${(e as Error)?.message ?? e}`));
      const b = h("button", { type: "button", class: `control control-${key}`, onclick: run }, label);
      if (pressed !== undefined) b.setAttribute("aria-pressed", String(pressed));
      this.controls[key] = b;
      return b;
    };
    this.deviceDialog = this.buildDeviceDialog();
    const toolbar = h(
      "div",
      { class: "controls", role: "toolbar", "aria-label": "Call controls" },
      button("mic", "Mute", () => this.toggleMic(), false),
      button("camera", "Camera off", () => this.toggleCamera(), false),
      button("screen", "Share screen", () => this.toggleScreen(), false),
      button("devices", "Devices", () => this.openDevices()),
      button("layout", "Speaker view", () => this.toggleLayout(), false),
      button("stats", "Show numbers", () => this.toggleStats(), false),
      button("leave", "Leave", () => this.leave()),
    );
    this.controls.leave.classList.add("danger");
    this.element = h(
      "main",
      { class: "call-view" },
      h("header", { class: "call-header" }, h("h1", {}, room?.name ?? o.roomId), encryptionEl, this.connectionEl),
      this.alertEl,
      this.stage,
      toolbar,
      this.deviceDialog,
    );

    this.resize = new ResizeObserver(() => this.scheduleSubscription());
    this.intersect = new IntersectionObserver(
      (entries) => {
        for (const e of entries) {
          if (e.isIntersecting) this.visible.add(e.target);
          else this.visible.delete(e.target);
        }
        this.scheduleSubscription();
      },
      { threshold: 0.01 },
    );

    const c = this.conference;
    c.addEventListener("participants", (e) => {
      this.participants = (e as CustomEvent).detail;
      this.render();
    });
    c.addEventListener("speakers", () => this.render());
    c.addEventListener("local", () => this.render());
    c.addEventListener("connection", (e) => {
      const { state } = (e as CustomEvent).detail;
      const text: Record<string, string> = {
        connecting: "Connecting…",
        connected: "Connected",
        reconnecting: "Connection lost: reconnecting…",
        ended: "Left the call",
      };
      this.connectionEl.textContent = text[state] ?? state;
      this.connectionEl.dataset.state = state;
      this.render();
    });
    c.addEventListener("encryption", (e) => {
      const { enabled, unreachable } = (e as CustomEvent).detail;
      encryptionEl.textContent = enabled ? "End-to-end encrypted" : "Not encrypted";
      encryptionEl.dataset.encrypted = String(enabled);
      encryptionEl.title = unreachable.length
        ? `Our key could not be sent to: ${unreachable.map((u: { userId: string; deviceId: string }) => `${u.userId} (${u.deviceId})`).join(", ")}`
        : "";
    });
  }

  /** Show a problem for a few seconds (announced to screen readers). */
  alert(text: string): void {
    this.alertEl.textContent = text;
    this.alertEl.hidden = false;
    clearTimeout(this.alertTimer);
    this.alertTimer = window.setTimeout(() => (this.alertEl.hidden = true), 8000);
  }

  async start(): Promise<void> {
    this.render();
    await this.conference.join();
    const enc = this.element.querySelector<HTMLElement>("#encryption-state");
    if (enc && !this.conference.encrypted) {
      enc.textContent = "Not encrypted";
      enc.dataset.encrypted = "false";
    }
  }

  private tileStates(): TileState[] {
    const c = this.conference;
    const connecting = c.connection !== "connected";
    const me = this.o.client.getRoom(this.o.roomId)?.getMember(this.o.client.getUserId() ?? "");
    const out: TileState[] = [
      {
        id: c.me,
        purpose: "m.usermedia",
        name: me?.name ?? this.o.client.getUserId() ?? "you",
        avatarUrl: null,
        stream: c.stream,
        local: true,
        audioMuted: c.isAudioMuted(),
        videoMuted: c.isVideoMuted(),
        speaking: c.speakers.speaking.includes(c.me),
        dominant: c.speakers.dominant === c.me,
        paused: false,
        key: "ok",
        verified: true,
        connecting: false,
      },
    ];
    for (const p of this.participants) {
      const base = {
        name: p.name,
        avatarUrl: p.avatarUrl,
        local: false,
        speaking: p.speaking,
        dominant: p.dominant,
        key: p.key,
        verified: p.verified,
        connecting: connecting || !p.usermedia,
      };
      out.push({ ...base, id: p.id, purpose: "m.usermedia", stream: p.usermedia, audioMuted: p.audioMuted, videoMuted: p.videoMuted, paused: p.paused });
      if (p.sharing) out.push({ ...base, id: p.id, purpose: "m.screenshare", stream: p.screen, audioMuted: false, videoMuted: false, paused: false, connecting: connecting || !p.screen, speaking: false });
    }
    return out;
  }

  private render(): void {
    const states = this.tileStates();
    const keyOf = (s: TileState) => `${s.id}#${s.purpose}`;
    const wanted = new Set(states.map(keyOf));
    for (const [k, t] of this.tiles) {
      if (!wanted.has(k)) {
        this.resize.unobserve(t.video);
        this.intersect.unobserve(t.element);
        this.visible.delete(t.element);
        t.element.remove();
        this.tiles.delete(k);
      }
    }
    for (const s of states) {
      const k = keyOf(s);
      let t = this.tiles.get(k);
      if (!t) {
        t = new Tile(s);
        const tile = t;
        t.element.addEventListener("dblclick", () => this.pin(k));
        t.element.addEventListener("keydown", (e) => {
          if ((e as KeyboardEvent).key === "Enter") this.pin(k);
        });
        this.tiles.set(k, t);
        this.resize.observe(t.video);
        this.intersect.observe(t.element);
        void tile.video.play().catch(() => undefined);
      } else t.update(s);
    }
    // order: screens first, then the dominant speaker, then everyone as they came
    const spotlight = this.spotlightKey(states);
    // ties by name, so the grid keeps its order from one update to the next
    const ordered = [...states].sort((a, b) => rank(a, spotlight) - rank(b, spotlight) || a.name.localeCompare(b.name));
    const nodes = ordered.map((s) => this.tiles.get(keyOf(s))!.element);
    for (const [k, t] of this.tiles) t.element.classList.toggle("spotlight", this.layout === "speaker" && k === spotlight);
    const same = nodes.length === this.grid.children.length && nodes.every((n, i) => this.grid.children[i] === n);
    if (!same) mount(this.grid, ...nodes);
    this.grid.style.setProperty("--count", String(nodes.length));
    this.grid.style.setProperty("--cols", String(Math.ceil(Math.sqrt(nodes.length))));
    this.syncControls();
    this.scheduleSubscription();

    function rank(s: TileState, spot: string | null): number {
      const k = `${s.id}#${s.purpose}`;
      if (k === spot) return 0;
      if (s.purpose === "m.screenshare") return 1;
      if (s.local) return 3;
      return 2;
    }
  }

  /** The tile the speaker view puts large: a pinned one, a shared screen, the dominant speaker. */
  private spotlightKey(states: TileState[]): string | null {
    if (this.pinned && states.some((s) => `${s.id}#${s.purpose}` === this.pinned)) return this.pinned;
    const screen = states.find((s) => s.purpose === "m.screenshare" && !s.local);
    if (screen) return `${screen.id}#${screen.purpose}`;
    const dominant = states.find((s) => s.dominant && !s.local) ?? states.find((s) => !s.local);
    return dominant ? `${dominant.id}#${dominant.purpose}` : null;
  }

  private pin(key: string): void {
    this.pinned = this.pinned === key ? null : key;
    if (this.layout !== "speaker") this.toggleLayout();
    else this.render();
  }

  private scheduleSubscription(): void {
    clearTimeout(this.subscribeTimer);
    this.subscribeTimer = window.setTimeout(() => this.sendSubscription(), SUBSCRIBE_DEBOUNCE_MS);
  }

  /** Tell the focus which videos are on screen and how large. */
  private sendSubscription(): void {
    const views = [];
    for (const t of this.tiles.values()) {
      if (t.state.local || !this.visible.has(t.element)) continue;
      const { width, height } = t.displaySize();
      if (width === 0 || height === 0) continue;
      views.push({ participant: t.state.id, purpose: t.state.purpose, width, height });
    }
    this.conference.setVideoViews(views);
  }

  private syncControls(): void {
    const c = this.conference;
    const set = (key: string, pressed: boolean, label: string) => {
      const b = this.controls[key];
      b.setAttribute("aria-pressed", String(pressed));
      b.textContent = label;
    };
    // toggle buttons keep their name; aria-pressed (and the look) says whether they are on
    set("mic", c.isAudioMuted(), "Mute");
    set("camera", c.isVideoMuted(), "Camera off");
    set("screen", c.isScreensharing(), "Share screen");
    set("layout", this.layout === "speaker", "Speaker view");
    set("stats", this.statsOn, "Show numbers");
    const connected = c.connection === "connected";
    this.controls.screen.disabled = !connected;
  }

  private async toggleMic(): Promise<void> {
    await this.conference.setAudioMuted(!this.conference.isAudioMuted());
    this.render();
  }

  private async toggleCamera(): Promise<void> {
    await this.conference.setVideoMuted(!this.conference.isVideoMuted());
    this.render();
  }

  private async toggleScreen(): Promise<void> {
    await this.conference.setScreensharing(!this.conference.isScreensharing());
    this.render();
  }

  private toggleLayout(): void {
    this.layout = this.layout === "grid" ? "speaker" : "grid";
    this.stage.classList.toggle("layout-grid", this.layout === "grid");
    this.stage.classList.toggle("layout-speaker", this.layout === "speaker");
    this.render();
  }

  private toggleStats(): void {
    this.statsOn = !this.statsOn;
    clearInterval(this.statsTimer);
    if (this.statsOn) {
      void this.refreshStats();
      this.statsTimer = window.setInterval(() => void this.refreshStats(), STATS_INTERVAL_MS);
    } else for (const t of this.tiles.values()) t.showStats(null);
    this.syncControls();
  }

  /** Per tile: resolution, frame rate, bitrate and loss of what its video receiver gets. */
  private async refreshStats(): Promise<void> {
    const pc = this.conference.call?.peerConnection;
    if (!pc) return;
    const report = await pc.getStats();
    const byTrack = new Map<string, RTCInboundRtpStreamStats & { trackIdentifier?: string }>();
    report.forEach((s) => {
      if (s.type === "inbound-rtp" && s.kind === "video" && s.trackIdentifier) byTrack.set(s.trackIdentifier, s);
    });
    const now = performance.now();
    for (const t of this.tiles.values()) {
      if (t.state.local) {
        t.showStats(null);
        continue;
      }
      const track = t.state.stream?.getVideoTracks()[0];
      const s = track ? byTrack.get(track.id) : undefined;
      if (!s) {
        t.showStats("no video received");
        continue;
      }
      const prev = this.lastBytes.get(track!.id);
      const bytes = s.bytesReceived ?? 0;
      const kbps = prev ? ((bytes - prev.bytes) * 8) / (now - prev.t) : 0;
      this.lastBytes.set(track!.id, { t: now, bytes });
      const lost = s.packetsLost ?? 0;
      const got = s.packetsReceived ?? 0;
      const loss = got + lost > 0 ? (100 * lost) / (got + lost) : 0;
      t.showStats(
        [
          `${s.frameWidth ?? 0}×${s.frameHeight ?? 0} @ ${Math.round(s.framesPerSecond ?? 0)} fps`,
          `${Math.round(kbps)} kbit/s`,
          `loss ${loss.toFixed(1)} %`,
          `decoded ${s.framesDecoded ?? 0}`,
        ].join("\n"),
      );
    }
  }

  private buildDeviceDialog(): HTMLDialogElement {
    const mic = h("select", { id: "device-mic", name: "mic" });
    const cam = h("select", { id: "device-camera", name: "camera" });
    const dialog = h(
      "dialog",
      { class: "devices", "aria-labelledby": "devices-title" },
      h(
        "form",
        {
          method: "dialog",
          onsubmit: async () => {
            try {
              await this.conference.setDevices({ audioInput: mic.value || undefined, videoInput: cam.value || undefined });
            } catch (e) {
              this.alert(`Could not use these devices: ${(e as Error)?.message ?? e}`);
            }
            this.render();
          },
        },
        h("h2", { id: "devices-title" }, "Devices"),
        h("label", { for: "device-mic" }, "Microphone"),
        mic,
        h("label", { for: "device-camera" }, "Camera"),
        cam,
        h("div", { class: "row" }, h("button", { type: "submit", class: "primary" }, "Use these"), h("button", { type: "button", onclick: () => dialog.close() }, "Cancel")),
      ),
    );
    return dialog;
  }

  private async openDevices(): Promise<void> {
    const devices = await navigator.mediaDevices.enumerateDevices();
    const fill = (select: HTMLSelectElement, kind: MediaDeviceKind, current?: string) => {
      mount(
        select,
        ...devices
          .filter((d) => d.kind === kind)
          .map((d, i) => h("option", { value: d.deviceId, selected: d.deviceId === current }, d.label || `${kind} ${i + 1}`)),
      );
    };
    const stream = this.conference.stream as MediaStream | null;
    fill(this.deviceDialog.querySelector("#device-mic")!, "audioinput", stream?.getAudioTracks()[0]?.getSettings().deviceId);
    fill(this.deviceDialog.querySelector("#device-camera")!, "videoinput", stream?.getVideoTracks()[0]?.getSettings().deviceId);
    this.deviceDialog.showModal();
  }

  async leave(): Promise<void> {
    clearInterval(this.statsTimer);
    clearTimeout(this.subscribeTimer);
    this.resize.disconnect();
    this.intersect.disconnect();
    try {
      await this.conference.leave();
    } finally {
      this.o.onLeft();
    }
  }
}
