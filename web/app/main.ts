// The weir web app: sign in to a homeserver, pick or create a room, join its call through the
// focus. Served by the focus itself (`[web] root`), which also serves /config.json naming the
// homeserver and the focus device to call.

import type { MatrixClient } from "matrix-js-sdk";
import { byId, h, mount } from "./dom.ts";
import { login, logout, openClient, savedSession } from "./session.ts";
import { roomsView, type RoomsView } from "./rooms.ts";
import { CallView } from "./call-view.ts";

interface AppConfig {
  homeserver_url: string;
  focus: { user_id: string; device_id: string; session_id: string };
}

const root = byId("app");
const state: { config: AppConfig | null; client: MatrixClient | null; rooms: RoomsView | null; call: CallView | null } = {
  config: null,
  client: null,
  rooms: null,
  call: null,
};
// for debugging in the console, and for the app's own tests
(window as unknown as { weirApp: typeof state }).weirApp = state;

/** Tests set this before the page loads: drop every key other devices send. */
const blockKeys = Boolean((window as unknown as { __weirBlockKeyExchange?: boolean }).__weirBlockKeyExchange);

const workerUrl = new URL("./e2ee-worker.js", import.meta.url).href;

async function loadConfig(): Promise<AppConfig> {
  const res = await fetch("config.json", { cache: "no-cache" });
  if (!res.ok) throw new Error(`config.json: HTTP ${res.status}`);
  return res.json();
}

function showError(where: string, e: unknown): void {
  console.error(where, e);
  mount(
    root,
    h("main", { class: "card error", role: "alert" }, h("h2", {}, where), h("p", {}, (e as Error)?.message ?? String(e)), h("button", { type: "button", onclick: () => location.reload() }, "Reload")),
  );
}

function showLogin(message = ""): void {
  const hs = h("input", { id: "login-homeserver", name: "homeserver", type: "url", required: true, value: state.config?.homeserver_url ?? "" });
  const user = h("input", { id: "login-user", name: "username", required: true, autocomplete: "username" });
  const password = h("input", { id: "login-password", name: "password", type: "password", required: true, autocomplete: "current-password" });
  const status = h("p", { class: "form-status", role: "status", "aria-live": "polite" }, message);
  const submit = h("button", { type: "submit", class: "primary" }, "Sign in");
  mount(
    root,
    h(
      "main",
      { class: "login-view" },
      h(
        "form",
        {
          class: "card",
          "aria-labelledby": "login-title",
          onsubmit: async (e: Event) => {
            e.preventDefault();
            submit.disabled = true;
            status.textContent = "Signing in…";
            try {
              const creds = await login(hs.value.trim(), user.value.trim(), password.value);
              status.textContent = "Setting up encryption…";
              await start(creds);
            } catch (err) {
              status.textContent = `Sign-in failed: ${(err as Error).message}`;
              submit.disabled = false;
            }
          },
        },
        h("h1", { id: "login-title" }, "weir"),
        h("p", { class: "lead" }, "Video calls through your organisation's weir focus."),
        h("label", { for: "login-homeserver" }, "Homeserver"),
        hs,
        h("label", { for: "login-user" }, "Username"),
        user,
        h("label", { for: "login-password" }, "Password"),
        password,
        submit,
        status,
      ),
    ),
  );
  user.focus();
}

async function start(creds: Parameters<typeof openClient>[0]): Promise<void> {
  state.client = await openClient(creds);
  showRooms();
}

function showRooms(): void {
  const client = state.client!;
  state.call = null;
  state.rooms?.close();
  state.rooms = roomsView(
    client,
    state.config!.focus.user_id,
    (roomId) => void showCall(roomId),
    async () => {
      state.rooms?.close();
      state.rooms = null;
      await logout(client).catch(() => undefined);
      state.client = null;
      showLogin("Signed out.");
    },
  );
  mount(root, state.rooms.element);
  history.replaceState(null, "", location.pathname);
}

async function showCall(roomId: string): Promise<void> {
  state.rooms?.close();
  state.rooms = null;
  const f = state.config!.focus;
  const view = new CallView({
    client: state.client!,
    roomId,
    focus: { userId: f.user_id, deviceId: f.device_id, sessionId: f.session_id },
    workerUrl,
    blockKeys,
    onLeft: () => showRooms(),
  });
  state.call = view;
  mount(root, view.element);
  history.replaceState(null, "", `#room=${encodeURIComponent(roomId)}`);
  try {
    await view.start();
  } catch (e) {
    // stop the camera, the worker and the member entry of the attempt
    await view.conference.leave().catch(() => undefined);
    showError("Could not join the call", e);
  }
}

async function main(): Promise<void> {
  try {
    state.config = await loadConfig();
  } catch (e) {
    return showError("This page is not set up", e);
  }
  const creds = savedSession();
  if (!creds) return showLogin();
  try {
    await start(creds);
  } catch (e) {
    showLogin(`Your session could not be restored (${(e as Error).message}); sign in again.`);
  }
}

void main();
