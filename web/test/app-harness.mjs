// Pages of the web app for tests and the demo: a person's page with a fake camera (a canvas of
// their colour), microphone (an oscillator) and screen (a yellow canvas), signed in through the
// app's own form; and what a page shows, tile by tile.

import { strict as assert } from "node:assert";

export const PEOPLE = [
  { name: "alice", colour: "red", rgb: [230, 20, 20], tone: 440 },
  { name: "bob", colour: "green", rgb: [20, 200, 20], tone: 660 },
  { name: "carol", colour: "blue", rgb: [20, 20, 230], tone: 880 },
];
export const SCREEN_RGB = [230, 230, 20]; // a shared screen is yellow

// Runs in every page before the app: cameras and microphones are a canvas of the person's colour
// and an oscillator; a shared screen is a yellow canvas.
export function fakeMedia({ rgb, tone, screenRgb }) {
  const canvasStream = (w, h, fill) => {
    const c = document.createElement("canvas");
    c.width = w;
    c.height = h;
    const g = c.getContext("2d");
    let x = 0;
    setInterval(() => {
      g.fillStyle = `rgb(${fill.join(",")})`;
      g.fillRect(0, 0, w, h);
      g.fillStyle = "#fff";
      g.fillRect(x, h - 12, 24, 12); // something moves, so the encoder always has work
      x = (x + 4) % w;
    }, 33);
    return c.captureStream(30);
  };
  const mic = () => {
    const ctx = new AudioContext();
    const osc = ctx.createOscillator();
    osc.frequency.value = tone;
    const dst = ctx.createMediaStreamDestination();
    osc.connect(dst);
    osc.start();
    return dst.stream.getAudioTracks()[0];
  };
  navigator.mediaDevices.getUserMedia = async (c = {}) => {
    const tracks = [];
    if (c.audio) tracks.push(mic());
    if (c.video) tracks.push(canvasStream(640, 360, rgb).getVideoTracks()[0]);
    return new MediaStream(tracks);
  };
  navigator.mediaDevices.getDisplayMedia = async () => canvasStream(1280, 720, screenRgb);
  // an SDP the browser refuses is printed whole, for the test's failure report
  const srd = RTCPeerConnection.prototype.setRemoteDescription;
  RTCPeerConnection.prototype.setRemoteDescription = async function (desc, ...rest) {
    try {
      return await srd.call(this, desc, ...rest);
    } catch (e) {
      console.log(`setRemoteDescription refused (${e?.message}):\n${desc?.sdp}`);
      throw e;
    }
  };
}

// In a page: every tile with what it shows (sampled colour) and what its receiver counted.
export async function tiles() {
  const app = window.weirApp;
  const pc = app.call?.conference.call?.peerConnection;
  const byTrack = new Map();
  if (pc) (await pc.getStats()).forEach((s) => s.type === "inbound-rtp" && s.trackIdentifier && byTrack.set(s.trackIdentifier, s));
  const canvas = document.createElement("canvas");
  canvas.width = 16;
  canvas.height = 16;
  const g = canvas.getContext("2d", { willReadFrequently: true });
  return [...document.querySelectorAll("figure.tile")].map((el) => {
    const v = el.querySelector("video");
    const track = v.srcObject?.getVideoTracks?.()[0];
    const s = track ? byTrack.get(track.id) : null;
    let rgb = null;
    if (v.videoWidth > 0) {
      g.drawImage(v, v.videoWidth / 4, v.videoHeight / 4, v.videoWidth / 2, v.videoHeight / 2, 0, 0, 16, 16);
      const d = g.getImageData(0, 0, 16, 16).data;
      rgb = [0, 1, 2].map((i) => {
        let sum = 0;
        for (let p = i; p < d.length; p += 4) sum += d[p];
        return Math.round(sum / (d.length / 4));
      });
    }
    const r = el.getBoundingClientRect();
    return {
      participant: el.dataset.participant,
      purpose: el.dataset.purpose,
      local: el.classList.contains("local"),
      problem: el.dataset.problem ?? "",
      status: el.querySelector(".status")?.textContent ?? "",
      label: el.getAttribute("aria-label"),
      spotlight: el.classList.contains("spotlight"),
      area: Math.round(r.width * r.height),
      rgb,
      framesDecoded: s?.framesDecoded ?? 0,
      frameWidth: s?.frameWidth ?? 0,
      stats: el.querySelector(".stats")?.hidden === false ? el.querySelector(".stats").textContent : null,
      packetsReceived: s?.packetsReceived ?? 0,
    };
  });
}

export function near(rgb, want) {
  return rgb !== null && rgb.every((c, i) => Math.abs(c - want[i]) < 60);
}

/**
 * A new browser context and page of the app at `appUrl` for `person` ({name, rgb, tone}),
 * its console kept in `console`.
 */
export async function openApp(browser, appUrl, person, { viewport = { width: 960, height: 600 } } = {}) {
  const context = await browser.newContext({ viewport });
  await context.addInitScript(fakeMedia, { rgb: person.rgb, tone: person.tone, screenRgb: SCREEN_RGB });
  const page = await context.newPage();
  const p = { ...person, context, page, console: [] };
  page.on("console", (m) => {
    p.console.push(`${m.type()}: ${m.text()}`);
    if (p.console.length > 2000) p.console.shift();
  });
  page.on("pageerror", (e) => p.console.push(`pageerror: ${e.stack ?? e}`));
  await page.goto(appUrl);
  return p;
}

/**
 * Sign in through the app's form as `p.user` ({localpart, password}); checks the homeserver
 * field came prefilled with `homeserverUrl`. Sets `p.id` ("userId|deviceId").
 */
export async function signIn(p, homeserverUrl) {
  const { page } = p;
  await page.getByLabel("Username").fill(p.user.localpart);
  await page.getByLabel("Password").fill(p.user.password);
  assert.equal(await page.getByLabel("Homeserver").inputValue(), homeserverUrl, "the homeserver comes prefilled from the focus's config.json");
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByRole("heading", { name: "Rooms" }).waitFor({ timeout: 60000 });
  p.id = await page.evaluate(() => `${window.weirApp.client.getUserId()}|${window.weirApp.client.getDeviceId()}`);
}

/**
 * Click a button of the call's toolbar; for a toggle, `pressed` is the state it must show after
 * (its name stays; aria-pressed changes).
 */
export async function clickControl(p, name, pressed) {
  const button = p.page.getByRole("toolbar", { name: "Call controls" }).getByRole("button", { name, exact: true });
  await button.click();
  if (pressed !== undefined) {
    await p.page
      .getByRole("toolbar", { name: "Call controls" })
      .getByRole("button", { name, exact: true, pressed })
      .waitFor({ timeout: 10000 });
  }
}

/**
 * How far apart two screenshots (PNG buffers) are, as the mean difference per colour channel
 * (0–255) of 48×30 thumbnails: small when the same layout shows the same pictures, whatever the
 * names and the moving bars. Computed in `page` (Chromium decodes the PNGs).
 */
export async function screenshotDistance(page, a, b) {
  return page.evaluate(
    async ([a64, b64]) => {
      const W = 48;
      const H = 30;
      const thumb = async (b64) => {
        const img = new Image();
        img.src = `data:image/png;base64,${b64}`;
        await img.decode();
        const c = document.createElement("canvas");
        c.width = W;
        c.height = H;
        const g = c.getContext("2d");
        g.drawImage(img, 0, 0, W, H);
        return g.getImageData(0, 0, W, H).data;
      };
      const [x, y] = await Promise.all([thumb(a64), thumb(b64)]);
      let sum = 0;
      let n = 0;
      for (let i = 0; i < x.length; i += 4) {
        for (let k = 0; k < 3; k++) sum += Math.abs(x[i + k] - y[i + k]);
        n += 3;
      }
      return sum / n;
    },
    [a.toString("base64"), b.toString("base64")],
  );
}
