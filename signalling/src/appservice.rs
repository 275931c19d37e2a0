//! The focus as a Matrix application service (issue 10): the homeserver pushes what the focus
//! needs in transactions (`PUT /_matrix/app/v1/transactions/{txnId}`) instead of the focus
//! long-polling `/sync`. Room events of the rooms it is in come as `events`; to-device
//! messages for its device as `de.sorunome.msc2409.to_device` (MSC2409/MSC4203; Synapse:
//! `experimental_features: {msc2409_to_device_messages_enabled: true}` and
//! `receive_ephemeral: true` in the registration). One focus can then serve many rooms
//! without a sync loop's round trips.
//!
//! Each transaction becomes the batch a `/sync` response would have been, and goes through
//! the same core: the router cannot tell the difference. The transaction is acknowledged
//! once the core has taken its events, so a focus that falls behind makes the homeserver
//! hold (and retry) the rest.
//!
//! The focus's user is a user of the service's namespace, not the service's own sender user:
//! Synapse lets no sender user `/sync`. The service registers it and logs its device in
//! (`m.login.application_service`); the device's token then serves every request the focus
//! makes, as for a logged-in client. To-device messages also come by a to-device-only `/sync`
//! of that device (no room in it: light). Synapse 1.163's push of to-device messages to appservices is experimental
//! and lost 3 of 20 in one test run (three clients sending at once; the messages stayed in
//! the device's inbox but were never pushed). Whichever copy comes first is taken; the router
//! drops the other as a duplicate (same call, same `seq`).

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::client::MatrixClient;
use crate::ids::{DeviceId, RoomId, UserId};
use crate::room::ROOM_MEMBER;
use crate::runtime::{JoinedBatch, SyncBatch};

/// The unstable field Synapse sends to-device messages in; the stable name MSC4203 gives it
/// is read too.
const TO_DEVICE_UNSTABLE: &str = "de.sorunome.msc2409.to_device";
const TO_DEVICE: &str = "to_device";

/// Transaction ids remembered: the homeserver resends a transaction it did not see
/// acknowledged, and a resend already handled is only acknowledged again.
const SEEN_TRANSACTIONS: usize = 256;

/// Attempts at joining a room the focus is invited to, a second apart.
const JOIN_ATTEMPTS: u32 = 5;

/// The tokens of the registration (`as_token`: ours toward the homeserver; `hs_token`: the
/// homeserver's toward us).
#[derive(Clone)]
pub struct AppserviceTokens {
    pub as_token: String,
    pub hs_token: String,
}

impl std::fmt::Debug for AppserviceTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AppserviceTokens(<secret>)")
    }
}

/// One transaction from the homeserver, with where to say it was taken.
#[derive(Debug)]
pub struct Transaction {
    pub id: String,
    pub body: Value,
    pub done: oneshot::Sender<()>,
}

/// What a transaction holds for the focus, sorted: timelines of rooms, invites to rooms,
/// rooms left, to-device messages for our device.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Sorted {
    pub timelines: BTreeMap<RoomId, Vec<Value>>,
    /// (room, who invited us)
    pub invites: Vec<(RoomId, String)>,
    pub left: Vec<RoomId>,
    pub to_device: Vec<Value>,
}

/// Sort a transaction's contents (pure: what the task does with them is separate).
pub(crate) fn sort_transaction(body: &Value, me: &UserId, my_device: &DeviceId) -> Sorted {
    let mut out = Sorted::default();
    for ev in body
        .get("events")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(room) = ev
            .get("room_id")
            .and_then(Value::as_str)
            .and_then(|r| RoomId::try_from(r).ok())
        else {
            continue;
        };
        let ours = ev.get("type").and_then(Value::as_str) == Some(ROOM_MEMBER)
            && ev.get("state_key").and_then(Value::as_str) == Some(me.as_str());
        if ours {
            match ev.pointer("/content/membership").and_then(Value::as_str) {
                Some("invite") => {
                    let sender = ev.get("sender").and_then(Value::as_str).unwrap_or("");
                    out.invites.push((room, sender.to_owned()));
                    continue;
                }
                Some("leave") | Some("ban") => {
                    out.left.push(room);
                    continue;
                }
                _ => {}
            }
        }
        out.timelines.entry(room).or_default().push(ev.clone());
    }
    for key in [TO_DEVICE_UNSTABLE, TO_DEVICE] {
        for ev in body
            .get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let to_user = ev.get("to_user_id").and_then(Value::as_str);
            let to_device = ev.get("to_device_id").and_then(Value::as_str);
            if to_user == Some(me.as_str()) && to_device == Some(my_device.as_str()) {
                out.to_device.push(ev.clone());
            }
        }
    }
    out
}

pub(crate) struct AppserviceTask {
    pub client: MatrixClient,
    pub user_id: UserId,
    pub device_id: DeviceId,
    pub allowed_servers: Vec<String>,
    pub auto_join: bool,
    pub batch_tx: mpsc::Sender<(SyncBatch, oneshot::Sender<()>)>,
    pub stop: watch::Receiver<bool>,
    pub transactions: mpsc::Receiver<Transaction>,
    pub seen: VecDeque<String>,
    pub joined: HashSet<RoomId>,
    pub metrics: crate::metrics::Metrics,
}

impl AppserviceTask {
    pub async fn run(mut self) {
        // First, the full state of every room we are already in: what the first `/sync`
        // would have brought.
        let rooms = loop {
            match self.client.joined_rooms().await {
                Ok(r) => break r,
                Err(e) => {
                    warn!(error = %e, "listing joined rooms failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = self.stop.changed() => return,
                    }
                }
            }
        };
        let mut first = SyncBatch {
            full_state: true,
            ..Default::default()
        };
        for room in rooms {
            if let Some(state) = self.room_state(&room).await {
                first.joined.push(JoinedBatch {
                    room: room.clone(),
                    state,
                    timeline: Vec::new(),
                });
            }
            self.joined.insert(room);
        }
        info!(rooms = self.joined.len(), "appservice: room state loaded");
        if !self.hand_to_core(first).await {
            return;
        }
        loop {
            let t = tokio::select! {
                t = self.transactions.recv() => match t { Some(t) => t, None => break },
                _ = self.stop.changed() => break,
            };
            self.metrics.appservice_transactions.inc();
            if self.seen.contains(&t.id) {
                let _ = t.done.send(());
                continue;
            }
            let sorted = sort_transaction(&t.body, &self.user_id, &self.device_id);
            let mut batch = SyncBatch::default();
            for (room, inviter) in sorted.invites {
                if self.auto_join && self.allowed(&inviter) && self.join(&room).await {
                    let state = self.room_state(&room).await.unwrap_or_default();
                    batch.joined.push(JoinedBatch {
                        room: room.clone(),
                        state,
                        timeline: Vec::new(),
                    });
                    self.joined.insert(room);
                }
            }
            for (room, timeline) in sorted.timelines {
                if self.joined.contains(&room) {
                    batch.joined.push(JoinedBatch {
                        room,
                        state: Vec::new(),
                        timeline,
                    });
                }
            }
            for room in sorted.left {
                self.joined.remove(&room);
                batch.left.push(room);
            }
            batch.to_device = sorted.to_device;
            debug!(txn = %t.id, rooms = batch.joined.len(), to_device = batch.to_device.len(), "appservice transaction");
            if !self.hand_to_core(batch).await {
                break;
            }
            self.seen.push_back(t.id);
            if self.seen.len() > SEEN_TRANSACTIONS {
                self.seen.pop_front();
            }
            let _ = t.done.send(());
        }
        debug!("appservice task stopped");
    }

    /// Give the core a batch and wait until it has taken it. False when the core is gone.
    async fn hand_to_core(&mut self, batch: SyncBatch) -> bool {
        let (done_tx, done_rx) = oneshot::channel();
        if self.batch_tx.send((batch, done_tx)).await.is_err() {
            return false;
        }
        tokio::select! {
            r = done_rx => r.is_ok(),
            _ = self.stop.changed() => false,
        }
    }

    fn allowed(&self, inviter: &str) -> bool {
        self.allowed_servers.is_empty()
            || inviter
                .split_once(':')
                .is_some_and(|(_, server)| self.allowed_servers.iter().any(|a| a == server))
    }

    async fn join(&self, room: &RoomId) -> bool {
        for attempt in 1..=JOIN_ATTEMPTS {
            match self.client.join(room).await {
                Ok(()) => {
                    info!(%room, "joined room");
                    return true;
                }
                Err(e) => {
                    warn!(%room, error = %e, attempt, "join failed");
                    if !(e.is_transient() || e.is_forbidden()) {
                        return false;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        false
    }

    async fn room_state(&self, room: &RoomId) -> Option<Vec<Value>> {
        match self.client.room_state(room).await {
            Ok(events) => Some(
                events
                    .into_iter()
                    .filter_map(|e| serde_json::from_str(e.json().get()).ok())
                    .collect(),
            ),
            Err(e) => {
                warn!(%room, error = %e, "could not fetch a room's state");
                None
            }
        }
    }
}

/// The registration file a homeserver needs for this focus as an appservice
/// (`app_service_config_files` in Synapse's configuration).
pub fn registration_yaml(id: &str, url: &str, tokens: &AppserviceTokens, user: &UserId) -> String {
    let localpart = user
        .as_str()
        .trim_start_matches('@')
        .split(':')
        .next()
        .unwrap_or("");
    let exact = regex_escape(user.as_str());
    format!(
        "# The focus as an application service (weir-focus --appservice-registration).\n\
         id: {id}\n\
         url: {url}\n\
         as_token: {as_token}\n\
         hs_token: {hs_token}\n\
         # The service's own user, which the focus never acts as: Synapse lets no\n\
         # appservice sender user /sync, and the focus syncs its device's to-device messages.\n\
         sender_localpart: {localpart}-appservice\n\
         rate_limited: false\n\
         # Ephemeral events and to-device messages (MSC2409; Synapse also needs\n\
         # experimental_features: {{msc2409_to_device_messages_enabled: true}}).\n\
         receive_ephemeral: true\n\
         de.sorunome.msc2409.push_ephemeral: true\n\
         namespaces:\n  users:\n    - exclusive: true\n      regex: '^{exact}$'\n  aliases: []\n  rooms: []\n",
        as_token = tokens.as_token,
        hs_token = tokens.hs_token,
    )
}

fn regex_escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if ".+*?()|[]{}^$\\".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn me() -> UserId {
        UserId::try_from("@focus:hs").unwrap()
    }

    #[test]
    fn a_transaction_is_sorted_into_timelines_invites_leaves_and_our_to_device() {
        let body = json!({
            "events": [
                {"type": "org.matrix.msc3401.call.member", "room_id": "!a:hs", "state_key": "@alice:hs", "sender": "@alice:hs", "content": {}},
                {"type": "m.room.member", "room_id": "!b:hs", "state_key": "@focus:hs", "sender": "@bob:other", "content": {"membership": "invite"}},
                {"type": "m.room.member", "room_id": "!c:hs", "state_key": "@focus:hs", "sender": "@carol:hs", "content": {"membership": "leave"}},
                {"type": "m.room.member", "room_id": "!a:hs", "state_key": "@focus:hs", "sender": "@focus:hs", "content": {"membership": "join"}},
                {"type": "m.room.message", "sender": "@nobody:hs", "content": {}}
            ],
            "de.sorunome.msc2409.to_device": [
                {"type": "m.call.invite", "sender": "@alice:hs", "to_user_id": "@focus:hs", "to_device_id": "WEIRFOCUS", "content": {}},
                {"type": "m.call.invite", "sender": "@alice:hs", "to_user_id": "@focus:hs", "to_device_id": "OTHER", "content": {}},
                {"type": "m.call.invite", "sender": "@alice:hs", "to_user_id": "@someone:hs", "to_device_id": "WEIRFOCUS", "content": {}}
            ]
        });
        let s = sort_transaction(&body, &me(), &DeviceId::from("WEIRFOCUS"));
        let a = RoomId::try_from("!a:hs").unwrap();
        assert_eq!(s.timelines.len(), 1, "events without a room are left out");
        assert_eq!(
            s.timelines[&a].len(),
            2,
            "our own join stays in the room's timeline"
        );
        assert_eq!(
            s.invites,
            vec![(RoomId::try_from("!b:hs").unwrap(), "@bob:other".into())]
        );
        assert_eq!(s.left, vec![RoomId::try_from("!c:hs").unwrap()]);
        assert_eq!(s.to_device.len(), 1, "only what is for our device");
        assert_eq!(s.to_device[0]["to_device_id"], "WEIRFOCUS");
    }

    #[test]
    fn the_stable_to_device_field_is_read_too_and_garbage_is_ignored() {
        let body = json!({
            "events": "not a list",
            "to_device": [{"type": "m.call.hangup", "to_user_id": "@focus:hs", "to_device_id": "D", "content": {}}]
        });
        let s = sort_transaction(&body, &me(), &DeviceId::from("D"));
        assert_eq!(s.to_device.len(), 1);
        assert!(s.timelines.is_empty());
        assert_eq!(
            sort_transaction(&json!(null), &me(), &DeviceId::from("D")),
            Sorted::default()
        );
    }

    #[test]
    fn the_registration_claims_exactly_the_focus_user() {
        let t = AppserviceTokens {
            as_token: "AS".into(),
            hs_token: "HS".into(),
        };
        let y = registration_yaml(
            "weir",
            "http://127.0.0.1:9090",
            &t,
            &UserId::try_from("@focus.x:hs.example").unwrap(),
        );
        assert!(y.contains("sender_localpart: focus.x-appservice\n"));
        assert!(y.contains("regex: '^@focus\\.x:hs\\.example$'"));
        assert!(y.contains("as_token: AS\n") && y.contains("hs_token: HS\n"));
    }
}
