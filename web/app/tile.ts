// One tile: a participant's camera (or screen), their name and avatar, what is wrong when
// there is no picture (camera off, no key yet, paused for bandwidth), who speaks, and on
// request the receiver's numbers (resolution, frame rate, bitrate, loss).

import { h, initials, hueOf } from "./dom.ts";

export interface TileState {
  id: string;
  /** "m.usermedia" or "m.screenshare" */
  purpose: string;
  name: string;
  avatarUrl: string | null;
  stream: MediaStream | null;
  local: boolean;
  audioMuted: boolean;
  videoMuted: boolean;
  speaking: boolean;
  dominant: boolean;
  paused: boolean;
  /** "none" (not encrypted), "waiting", "ok", "unreachable" */
  key: string;
  verified: boolean | null;
  connecting: boolean;
}

export class Tile {
  readonly element: HTMLElement;
  readonly video: HTMLVideoElement;
  private readonly caption: HTMLElement;
  private readonly nameEl: HTMLElement;
  private readonly micEl: HTMLElement;
  private readonly badges: HTMLElement;
  private readonly status: HTMLElement;
  private readonly avatar: HTMLElement;
  readonly stats: HTMLElement;
  state: TileState;

  constructor(state: TileState) {
    this.state = state;
    this.video = h("video", { autoplay: true, playsinline: true, "aria-hidden": "true" });
    // our own picture plays silently (no echo); the others' sound comes through their tile
    this.video.muted = state.local;
    this.nameEl = h("span", { class: "name" });
    this.micEl = h("span", { class: "mic", role: "img" });
    this.badges = h("span", { class: "badges" });
    this.caption = h("figcaption", {}, this.micEl, this.nameEl, this.badges);
    // not a live region: a reconnect would make every tile speak at once (the tile's label says it)
    this.status = h("div", { class: "status" });
    this.avatar = h("div", { class: "avatar", "aria-hidden": "true" });
    this.stats = h("pre", { class: "stats", hidden: true, "aria-label": "Connection numbers" });
    this.element = h(
      "figure",
      { class: "tile", "data-participant": state.id, "data-purpose": state.purpose, tabindex: "0" },
      this.avatar,
      this.video,
      this.status,
      this.stats,
      this.caption,
    );
    this.update(state);
  }

  update(state: TileState): void {
    const prev = this.state;
    this.state = state;
    if (this.video.srcObject !== state.stream) this.video.srcObject = state.stream;
    const label = state.purpose === "m.screenshare" ? `${state.name} (screen)` : state.local ? `${state.name} (you)` : state.name;
    this.nameEl.textContent = label;
    this.element.setAttribute("aria-label", this.describe(label));
    this.micEl.textContent = state.audioMuted ? "muted" : "";
    this.micEl.setAttribute("aria-label", state.audioMuted ? "microphone off" : "microphone on");
    this.micEl.hidden = !state.audioMuted;
    this.badges.replaceChildren(
      ...(state.verified === false ? [h("span", { class: "badge warn", title: "This device is not verified" }, "unverified")] : []),
    );
    this.element.classList.toggle("speaking", state.speaking);
    this.element.classList.toggle("dominant", state.dominant);
    this.element.classList.toggle("local", state.local);
    const problem = this.problem(state);
    this.status.textContent = problem ?? "";
    this.status.hidden = problem === null;
    const noPicture = !state.stream || state.videoMuted || state.stream.getVideoTracks().length === 0;
    this.element.classList.toggle("no-video", noPicture);
    this.element.dataset.problem = problem === null ? "" : this.problemCode(state);
    if (prev.name !== state.name || prev.avatarUrl !== state.avatarUrl || !this.avatar.hasChildNodes()) {
      this.avatar.style.setProperty("--hue", String(hueOf(state.name)));
      this.avatar.replaceChildren(
        state.avatarUrl ? h("img", { src: state.avatarUrl, alt: "" }) : h("span", {}, initials(state.name)),
      );
    }
  }

  private problemCode(s: TileState): string {
    if (s.connecting) return "connecting";
    if (s.key === "unreachable") return "unreachable";
    if (s.key === "waiting") return "no-key";
    if (s.videoMuted) return "camera-off";
    if (s.paused) return "paused";
    return "";
  }

  /** What keeps the picture from showing, in words, or null. */
  private problem(s: TileState): string | null {
    if (s.local) return s.videoMuted ? "Your camera is off" : null;
    if (s.connecting) return "Connecting…";
    if (s.key === "unreachable") return `Cannot send ${s.name} our key: their device is unreachable for encryption`;
    if (s.key === "waiting") return `Waiting for ${s.name}'s encryption key`;
    if (s.videoMuted && s.purpose === "m.usermedia") return "Camera off";
    if (s.paused) return "Paused: your connection cannot carry this video now";
    if (!s.stream) return "No video yet";
    return null;
  }

  private describe(label: string): string {
    const parts = [label];
    const problem = this.problem(this.state);
    if (problem) parts.push(problem);
    if (this.state.dominant) parts.push("speaking now");
    if (this.state.audioMuted) parts.push("muted");
    if (this.state.verified === false) parts.push("device not verified");
    return parts.join(", ");
  }

  /** The size the video is shown at, in device pixels (what the focus should send). */
  displaySize(): { width: number; height: number } {
    const r = this.video.getBoundingClientRect();
    const dpr = window.devicePixelRatio || 1;
    return { width: Math.round(r.width * dpr), height: Math.round(r.height * dpr) };
  }

  showStats(text: string | null): void {
    this.stats.hidden = text === null;
    if (text !== null) this.stats.textContent = text;
  }
}
