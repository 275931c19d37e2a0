// The room list: rooms this account is in (with whether a call is running), invitations to
// accept, and a form to create a room for calls (encrypted by default).

import type { MatrixClient, Room } from "matrix-js-sdk";
import { ClientEvent, RoomEvent } from "matrix-js-sdk";
import { CALL_STATE_TYPE, CALL_MEMBER_TYPE } from "../src/weir-call.js";
import { currentConfId } from "../src/conference.js";
import { callMemberDevices } from "../src/weir-call.js";
import { h, mount } from "./dom.ts";

export interface RoomsView {
  element: HTMLElement;
  close(): void;
}

/** Power levels that let every member start and join calls (js-sdk writes both state types). */
function callPowerLevels(): Record<string, unknown> {
  return { events: { [CALL_STATE_TYPE]: 0, [CALL_MEMBER_TYPE]: 0 } };
}

function describeRoom(client: MatrixClient, room: Room): { inCall: number; encrypted: boolean } {
  const confId = currentConfId(client, room.roomId);
  const inCall = confId ? callMemberDevices(client, room.roomId, confId).length : 0;
  const encrypted = room.hasEncryptionStateEvent();
  return { inCall, encrypted };
}

export function roomsView(
  client: MatrixClient,
  focusUserId: string,
  onJoin: (roomId: string) => void,
  onLogout: () => void,
): RoomsView {
  const list = h("ul", { class: "rooms", "aria-label": "Your rooms" });
  const invites = h("ul", { class: "rooms invites", "aria-label": "Invitations" });
  const status = h("p", { class: "form-status", role: "status", "aria-live": "polite" });

  const render = () => {
    const rooms = client.getRooms().sort((a, b) => b.getLastActiveTimestamp() - a.getLastActiveTimestamp());
    const joined = rooms.filter((r) => r.getMyMembership() === "join");
    const invited = rooms.filter((r) => r.getMyMembership() === "invite");
    mount(
      list,
      ...joined.map((r) => {
        const d = describeRoom(client, r);
        return h(
          "li",
          { class: "room", "data-room-id": r.roomId },
          h("span", { class: "room-name" }, r.name || r.roomId),
          h("span", { class: "room-meta" }, d.encrypted ? "encrypted" : "not encrypted", d.inCall ? ` · ${d.inCall} in call` : ""),
          h("button", { type: "button", class: "primary", "aria-label": `Join the call in ${r.name || r.roomId}`, onclick: () => onJoin(r.roomId) }, d.inCall ? "Join call" : "Start call"),
        );
      }),
    );
    if (joined.length === 0) mount(list, h("li", { class: "empty" }, "No rooms yet: create one below."));
    mount(
      invites,
      ...invited.map((r) =>
        h(
          "li",
          { class: "room invite", "data-room-id": r.roomId },
          h("span", { class: "room-name" }, r.name || r.roomId),
          h("button", {
            type: "button",
            "aria-label": `Accept the invitation to ${r.name || r.roomId}`,
            onclick: async () => {
              status.textContent = `Joining ${r.name || r.roomId}…`;
              try {
                await client.joinRoom(r.roomId);
                status.textContent = "";
              } catch (e) {
                status.textContent = `Could not join: ${(e as Error).message}`;
              }
            },
          }, "Accept"),
        ),
      ),
    );
    invitesSection.hidden = invited.length === 0;
  };

  const name = h("input", { id: "new-room-name", name: "name", required: true, autocomplete: "off", placeholder: "Weekly meeting" });
  const inviteField = h("input", { id: "new-room-invite", name: "invite", autocomplete: "off", placeholder: "@bob:example.org, @carol:example.org" });
  const encrypted = h("input", { id: "new-room-encrypted", name: "encrypted", type: "checkbox", checked: true });
  const create = h(
    "form",
    {
      class: "card",
      "aria-label": "Create a room",
      onsubmit: async (e: Event) => {
        e.preventDefault();
        const invite = inviteField.value.split(/[\s,]+/).filter((s) => s.startsWith("@"));
        status.textContent = "Creating the room…";
        try {
          const r = await client.createRoom({
            name: name.value.trim(),
            preset: "private_chat" as never,
            invite: [...invite, focusUserId],
            power_level_content_override: callPowerLevels(),
            initial_state: encrypted.checked
              ? [{ type: "m.room.encryption", state_key: "", content: { algorithm: "m.megolm.v1.aes-sha2" } }]
              : [],
          });
          status.textContent = "";
          name.value = "";
          inviteField.value = "";
          await waitForRoom(client, r.room_id);
          render();
        } catch (err) {
          status.textContent = `Could not create the room: ${(err as Error).message}`;
        }
      },
    },
    h("h2", {}, "New room"),
    h("label", { for: "new-room-name" }, "Name"),
    name,
    h("label", { for: "new-room-invite" }, "Invite (Matrix ids, optional)"),
    inviteField,
    h("label", { class: "checkbox", for: "new-room-encrypted" }, encrypted, " End-to-end encrypted calls"),
    h("button", { type: "submit", class: "primary" }, "Create room"),
  );

  const invitesSection = h("section", { class: "card", "aria-labelledby": "invites-title" }, h("h2", { id: "invites-title" }, "Invitations"), invites);
  const element = h(
    "main",
    { class: "rooms-view" },
    h(
      "section",
      { class: "card", "aria-labelledby": "rooms-title" },
      h("div", { class: "row" }, h("h2", { id: "rooms-title" }, "Rooms"), h("span", { class: "who" }, client.getUserId() ?? ""), h("button", { type: "button", onclick: onLogout }, "Sign out")),
      list,
    ),
    invitesSection,
    create,
    status,
  );

  const onChange = () => render();
  client.on(ClientEvent.Room, onChange);
  client.on(RoomEvent.MyMembership, onChange);
  client.on(RoomEvent.Name, onChange);
  const timer = setInterval(render, 5000); // call membership and expiry change without events for us
  render();
  return {
    element,
    close() {
      clearInterval(timer);
      client.off(ClientEvent.Room, onChange);
      client.off(RoomEvent.MyMembership, onChange);
      client.off(RoomEvent.Name, onChange);
    },
  };
}

async function waitForRoom(client: MatrixClient, roomId: string): Promise<void> {
  for (let i = 0; i < 100 && client.getRoom(roomId)?.getMyMembership() !== "join"; i++) {
    await new Promise((r) => setTimeout(r, 100));
  }
}
