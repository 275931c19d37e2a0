// Signing in: password login against the homeserver, a client with Rust crypto (its store in
// IndexedDB, one per account and device), the session kept in localStorage so a reload keeps
// the same device and its keys.

import { createCallClient, loginWithPassword, startClient } from "../src/weir-call.js";
import type { MatrixClient } from "matrix-js-sdk";

export interface Credentials {
  baseUrl: string;
  userId: string;
  accessToken: string;
  deviceId: string;
}

const STORAGE_KEY = "weir.session";

export function savedSession(): Credentials | null {
  try {
    const c = JSON.parse(localStorage.getItem(STORAGE_KEY) ?? "null");
    return c?.baseUrl && c?.userId && c?.accessToken && c?.deviceId ? c : null;
  } catch {
    return null;
  }
}

export async function login(baseUrl: string, user: string, password: string): Promise<Credentials> {
  const creds: Credentials = await loginWithPassword(baseUrl, user, password);
  localStorage.setItem(STORAGE_KEY, JSON.stringify(creds));
  return creds;
}

/** A started, synced client with end-to-end encryption ready. */
export async function openClient(creds: Credentials): Promise<MatrixClient> {
  const client = createCallClient(creds) as MatrixClient;
  // One crypto store per account and device: another account in this browser has its own.
  await client.initRustCrypto({ cryptoDatabasePrefix: `weir:${creds.userId}:${creds.deviceId}` });
  await startClient(client);
  return client;
}

/** Sign out: the device is deleted on the homeserver and its local keys are dropped. */
export async function logout(client: MatrixClient | null): Promise<void> {
  localStorage.removeItem(STORAGE_KEY);
  if (!client) return;
  client.stopClient();
  try {
    await client.logout(true);
  } finally {
    await client.clearStores().catch(() => undefined);
  }
}
