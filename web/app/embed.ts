// The smallest useful embedding of a weir call: the session the weir app saved, the room from
// the page's #room=..., one <video> per participant, mute and leave. Everything else (layout,
// sizes asked of the focus, encryption) is the library's or the page's choice.

import { WeirConference } from "../src/conference.js";
import { openClient, savedSession } from "./session.ts";

const status = document.getElementById("status")!;
const grid = document.getElementById("call")!;

async function main(): Promise<void> {
  const creds = savedSession();
  const roomId = new URLSearchParams(location.hash.slice(1)).get("room");
  if (!creds || !roomId) {
    status.textContent = "Sign in with the weir app first, and give the room as #room=!id:server.";
    return;
  }
  const config = await (await fetch("config.json")).json();
  const client = await openClient(creds);
  const conf = new WeirConference({
    client,
    roomId,
    focus: { userId: config.focus.user_id, deviceId: config.focus.device_id, sessionId: config.focus.session_id },
    workerUrl: new URL("./e2ee-worker.js", import.meta.url).href,
  });
  const videos = new Map<string, HTMLVideoElement>();
  conf.addEventListener("participants", (e) => {
    const people = (e as CustomEvent).detail as Array<{ id: string; name: string; usermedia: MediaStream | null }>;
    for (const p of people) {
      let v = videos.get(p.id);
      if (!v) {
        v = Object.assign(document.createElement("video"), { autoplay: true, playsInline: true, title: p.name });
        videos.set(p.id, v);
        grid.append(v);
      }
      if (v.srcObject !== p.usermedia) v.srcObject = p.usermedia;
    }
    for (const [id, v] of videos) if (!people.some((p) => p.id === id)) (v.remove(), videos.delete(id));
    // every video at 320×180: the focus sends the small layer
    conf.setVideoViews(people.map((p) => ({ participant: p.id, purpose: "m.usermedia", width: 320, height: 180 })));
  });
  conf.addEventListener("connection", (e) => (status.textContent = `Call: ${(e as CustomEvent).detail.state}`));
  document.getElementById("mute")!.onclick = async (e) => {
    await conf.setAudioMuted(!conf.isAudioMuted());
    (e.target as HTMLButtonElement).textContent = conf.isAudioMuted() ? "Unmute" : "Mute";
  };
  document.getElementById("leave")!.onclick = () => conf.leave();
  await conf.join();
}

main().catch((e) => (status.textContent = `Could not join: ${e.message}`));
