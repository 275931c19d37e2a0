//! Against a real Synapse (started with `scripts/synapse.sh`): login and persistence, auto-join,
//! authorised and refused invites, hangups on shutdown and for unknown calls after a restart.
//!
//! Needs Synapse in `.venv/synapse` (`scripts/setup.sh`) or `SYNAPSE_PYTHON`. Without it the test
//! fails with a message saying so; set `WEIR_SKIP_SYNAPSE_TESTS=1` to skip it explicitly.
//!
//! Waiting is always for an event (a long-poll `/sync` answering, a channel receiving); the
//! deadlines only turn a hang into a failure.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ruma::api::client::room::create_room;
use ruma::serde::Raw;
use ruma::to_device::DeviceIdOrAllDevices;
use ruma::RoomId;
use serde_json::{json, Value};
use tokio::sync::mpsc::Receiver;
use weir_signalling::client::MatrixClient;
use weir_signalling::{
    start, LegCommand, LegEvent, SdpStreamMetadata, SignallingConfig, SignallingHandle,
    StreamMetadata, UserId,
};

const DEADLINE: Duration = Duration::from_secs(60);
const CONF: &str = "1795746014673weirConfTest";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

struct Synapse {
    dir: PathBuf,
    url: String,
    secret: String,
}

impl Synapse {
    fn start() -> Option<Self> {
        if std::env::var("WEIR_SKIP_SYNAPSE_TESTS").is_ok_and(|v| v == "1") {
            eprintln!("WEIR_SKIP_SYNAPSE_TESTS=1: skipping the Synapse integration test");
            return None;
        }
        let py = std::env::var("SYNAPSE_PYTHON")
            .map(PathBuf::from)
            .unwrap_or_else(|_| repo().join(".venv/synapse/bin/python"));
        assert!(
            py.exists(),
            "no Synapse at {} (run scripts/setup.sh, set SYNAPSE_PYTHON, or WEIR_SKIP_SYNAPSE_TESTS=1)",
            py.display()
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!(
            "weir-signalling-synapse-{}-{port}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let status = Command::new("bash")
            .arg(repo().join("scripts/synapse.sh"))
            .args(["start", dir.to_str().unwrap(), &port.to_string()])
            .status()
            .expect("run scripts/synapse.sh");
        assert!(status.success(), "synapse.sh start failed");
        let secret = std::fs::read_to_string(dir.join("shared_secret"))
            .unwrap()
            .trim()
            .to_owned();
        Some(Self {
            dir,
            url: format!("http://127.0.0.1:{port}"),
            secret,
        })
    }
}

impl Drop for Synapse {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(repo().join("scripts/synapse.sh"))
            .args(["stop", self.dir.to_str().unwrap()])
            .status();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A plain test user: weir's client for what a client does, raw requests for the checks
/// weir's client deliberately cannot make (`/keys/*`) and for reading `/sync` as JSON.
struct User {
    client: MatrixClient,
    http: reqwest::Client,
    url: String,
    token: String,
    user_id: String,
    device_id: String,
    since: Option<String>,
}

async fn register(hs: &Synapse, name: &str, password: &str) -> User {
    let client = MatrixClient::new(&hs.url).unwrap();
    let s = client
        .register_with_shared_secret(&hs.secret, name, password)
        .await
        .unwrap_or_else(|e| panic!("register {name}: {e}"));
    User {
        client: client.with_token(s.access_token.clone()),
        http: reqwest::Client::new(),
        url: hs.url.clone(),
        token: s.access_token,
        user_id: s.user_id.to_string(),
        device_id: s.device_id.to_string(),
        since: None,
    }
}

impl User {
    /// A raw `POST` (the key endpoints).
    async fn post(&self, path: &str, body: Value) -> Value {
        let resp = self
            .http
            .post(format!("{}/_matrix/client/v3{path}", self.url))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        assert!(status.is_success(), "{path}: {status} {v}");
        v
    }

    async fn state(&self, room: &RoomId, ty: &str, key: &str, content: Value) {
        self.client
            .put_state(room, ty, key, Raw::new(&content).unwrap().cast_unchecked())
            .await
            .unwrap_or_else(|e| panic!("{ty}: {e}"));
    }

    async fn to_device(&self, ty: &str, to_user: &str, to_device: &str, content: Value) {
        let txn = format!(
            "t{}",
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        );
        let content = Raw::new(&content).unwrap().cast_unchecked();
        let device = DeviceIdOrAllDevices::DeviceId(to_device.into());
        let messages = [(
            UserId::try_from(to_user).unwrap(),
            [(device, content)].into(),
        )]
        .into();
        self.client
            .send_to_device(ty, &txn, messages)
            .await
            .unwrap_or_else(|e| panic!("{ty}: {e}"));
    }

    /// Long-polls `/sync` until `pick` finds something in a response.
    async fn sync_until<T>(&mut self, mut pick: impl FnMut(&Value) -> Option<T>) -> T {
        let fut = async {
            loop {
                let mut q = vec![("timeout", "10000".to_owned())];
                if let Some(s) = &self.since {
                    q.push(("since", s.clone()));
                }
                let v: Value = self
                    .http
                    .get(format!("{}/_matrix/client/v3/sync", self.url))
                    .bearer_auth(&self.token)
                    .query(&q)
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                self.since = v["next_batch"].as_str().map(str::to_owned);
                if let Some(t) = pick(&v) {
                    return t;
                }
            }
        };
        tokio::time::timeout(DEADLINE, fut)
            .await
            .expect("sync_until: nothing matched before the deadline")
    }

    /// Waits for a to-device event of type `ty` whose content matches `f`; returns the content.
    async fn wait_to_device(&mut self, ty: &str, f: impl Fn(&Value) -> bool) -> Value {
        self.sync_until(|v| {
            v["to_device"]["events"].as_array().and_then(|evs| {
                evs.iter()
                    .find(|e| e["type"] == ty && f(&e["content"]))
                    .map(|e| e["content"].clone())
            })
        })
        .await
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn call_event(u: &User, call_id: &str, session: &str, seq: Option<u64>, extra: Value) -> Value {
    let mut c = json!({
        "version": "1", "call_id": call_id, "party_id": u.device_id, "conf_id": CONF,
        "device_id": u.device_id, "sender_session_id": session, "dest_session_id": "sfu",
    });
    if let Some(s) = seq {
        c["seq"] = json!(s);
    }
    c.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    c
}

fn invite(u: &User, call_id: &str, session: &str) -> Value {
    call_event(
        u,
        call_id,
        session,
        Some(0),
        json!({"lifetime": 60000, "offer": {"type": "offer", "sdp": "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\n"},
               "sdp_stream_metadata": {"alice-stream": {"purpose": "m.usermedia", "audio_muted": false, "video_muted": false}}}),
    )
}

async fn next_event(rx: &mut Receiver<LegEvent>) -> LegEvent {
    tokio::time::timeout(DEADLINE, rx.recv())
        .await
        .expect("no LegEvent before the deadline")
        .expect("channel closed")
}

async fn start_focus(
    hs: &Synapse,
    state_dir: &Path,
    focus_id: &str,
) -> (SignallingHandle, Receiver<LegEvent>, prometheus::Registry) {
    let mut cfg = SignallingConfig::new(
        hs.url.clone(),
        UserId::try_from(focus_id).unwrap(),
        state_dir,
    );
    cfg.password = Some("focus-password".into());
    cfg.sync_timeout = Duration::from_secs(5);
    let registry = prometheus::Registry::new();
    let (handle, rx) = start(cfg, &registry).await.expect("signalling starts");
    (handle, rx, registry)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn focus_against_real_synapse() {
    let Some(hs) = Synapse::start() else { return };
    let focus_user = register(&hs, "focus", "focus-password").await;
    let focus_id = focus_user.user_id.clone();
    let mut alice = register(&hs, "alice", "alice-password").await;
    let mut mallory = register(&hs, "mallory", "mallory-password").await;
    let alice_session = "alice-sess";

    // Alice's room with a group call, her member entry, and the focus invited.
    let mut create = create_room::v3::Request::new();
    create.preset = Some(create_room::v3::RoomPreset::PrivateChat);
    create.invite = vec![UserId::try_from(focus_id.as_str()).unwrap()];
    let room = alice.client.create_room(create).await.unwrap();
    alice
        .state(
            &room,
            "org.matrix.msc3401.call",
            CONF,
            json!({"m.intent": "m.room", "m.type": "m.video"}),
        )
        .await;
    alice
        .state(
            &room,
            "org.matrix.msc3401.call.member",
            &alice.user_id,
            json!({"m.calls": [{"m.call_id": CONF, "m.devices": [{
                "device_id": alice.device_id, "session_id": alice_session,
                "expires_ts": now_ms() + 3_600_000, "feeds": [{"purpose": "m.usermedia"}]}]}]}),
        )
        .await;
    alice
        .sync_until(|v| v["next_batch"].as_str().map(|_| ()))
        .await; // establish `since`

    // --- first life ---------------------------------------------------------------------------
    let state_dir =
        std::env::temp_dir().join(format!("weir-signalling-state-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state_dir);
    let (focus, mut events, registry) = start_focus(&hs, &state_dir, &focus_id).await;
    let device = focus.device_id().clone();
    assert_eq!(focus.user_id().as_str(), focus_id);
    // Auto-join: Alice sees the focus join her room.
    alice
        .sync_until(|v| {
            v["rooms"]["join"][room.as_str()]["timeline"]["events"]
                .as_array()
                .and_then(|evs| {
                    evs.iter()
                        .find(|e| {
                            e["type"] == "m.room.member"
                                && e["state_key"] == focus_id
                                && e["content"]["membership"] == "join"
                        })
                        .map(|_| ())
                })
        })
        .await;

    // Key-blind: the focus's device exists but has no device keys and no one-time keys, so no
    // client will ever share a room key (and with it media keys) with it.
    let keys = alice
        .post(
            "/keys/query",
            json!({"device_keys": {focus_id.as_str(): []}}),
        )
        .await;
    let focus_devices = &keys["device_keys"][focus_id.as_str()];
    assert!(
        focus_devices.as_object().is_none_or(|d| d.is_empty()),
        "the focus device must not have uploaded keys: {focus_devices}"
    );
    let claim = alice
        .post(
            "/keys/claim",
            json!({"one_time_keys": {focus_id.as_str(): {device.as_str(): "signed_curve25519"}}}),
        )
        .await;
    assert!(
        claim["one_time_keys"][focus_id.as_str()]
            .as_object()
            .is_none_or(|d| d.is_empty()),
        "the focus must have no one-time keys: {claim}"
    );

    // An invite from a properly joined member is delivered.
    alice
        .to_device(
            "m.call.invite",
            &focus_id,
            device.as_str(),
            invite(&alice, "call-1", alice_session),
        )
        .await;
    let leg = match next_event(&mut events).await {
        LegEvent::Invite {
            leg,
            sdp,
            metadata,
            lifetime_ms,
        } => {
            assert_eq!(leg.room_id.as_str(), room);
            assert_eq!(leg.conf_id.as_str(), CONF);
            assert_eq!(leg.call_id.as_str(), "call-1");
            assert_eq!(leg.user_id.as_str(), alice.user_id);
            assert_eq!(leg.device_id.as_str(), alice.device_id);
            assert_eq!(leg.session_id.as_str(), alice_session);
            assert!(sdp.starts_with("v=0"));
            assert_eq!(lifetime_ms, Some(60000));
            assert_eq!(metadata.len(), 1);
            leg
        }
        other => panic!("expected the invite, got {other:?}"),
    };
    assert!(focus.is_ready());

    // The focus answers; Alice receives exactly the wire shape stock js-sdk needs.
    let mut md = SdpStreamMetadata::new();
    md.insert("bob-stream".into(), StreamMetadata::new("m.usermedia"));
    focus.send(LegCommand::Answer {
        leg: leg.clone(),
        sdp: "v=0\r\nanswer".into(),
        metadata: md,
    });
    let answer = alice
        .wait_to_device("m.call.answer", |c| c["call_id"] == "call-1")
        .await;
    assert_eq!(answer["party_id"], device.as_str());
    assert_eq!(answer["device_id"], device.as_str());
    assert_eq!(answer["dest_session_id"], alice_session);
    assert_eq!(answer["sender_session_id"], "sfu");
    assert_eq!(answer["answer"]["sdp"], "v=0\r\nanswer");
    assert_eq!(
        answer["sdp_stream_metadata"],
        answer["org.matrix.msc3077.sdp_stream_metadata"]
    );
    assert!(answer.get("seq").is_none());

    // A non-member's invite is refused with a hangup, which Mallory sees on her own sync...
    mallory
        .sync_until(|v| v["next_batch"].as_str().map(|_| ()))
        .await;
    mallory
        .to_device(
            "m.call.invite",
            &focus_id,
            device.as_str(),
            invite(&mallory, "call-m", "mallory-sess"),
        )
        .await;
    let hangup = mallory
        .wait_to_device("m.call.reject", |c| c["call_id"] == "call-m")
        .await;
    assert_eq!(hangup["reason"], "not_in_room");
    assert_eq!(hangup["dest_session_id"], "mallory-sess");
    assert!(hangup.get("seq").is_none());
    // ...and nothing reaches the focus for it: the next event is Alice's candidates, sent after.
    alice
        .to_device(
            "m.call.candidates",
            &focus_id,
            device.as_str(),
            call_event(
                &alice,
                "call-1",
                alice_session,
                Some(1),
                json!({"candidates": [{"candidate": ""}]}),
            ),
        )
        .await;
    match next_event(&mut events).await {
        LegEvent::Candidates { leg: l, candidates } => {
            assert_eq!(l, leg);
            assert!(candidates[0].is_end_of_candidates());
        }
        other => panic!("expected Alice's candidates, got {other:?}"),
    }
    let refused = registry
        .gather()
        .into_iter()
        .find(|f| f.name() == "weir_invites_refused_total")
        .expect("refusal counted");
    assert_eq!(refused.get_metric().len(), 1);

    // Shutdown hangs up the open leg.
    focus.shutdown().await;
    let bye = alice
        .wait_to_device("m.call.hangup", |c| c["call_id"] == "call-1")
        .await;
    assert_eq!(bye["reason"], "user_hangup");
    drop(events);

    // --- second life: same device, no replay ----------------------------------------------------
    let stored: Value = serde_json::from_str(
        &std::fs::read_to_string(state_dir.join("signalling-state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(stored["device_id"], device.as_str());
    assert!(stored["next_batch"].is_string());
    let (focus, mut events, _registry) = start_focus(&hs, &state_dir, &focus_id).await;
    assert_eq!(focus.device_id(), &device, "restart keeps the device");
    // A stale event for the old call gets an unknown-call hangup (T14)...
    alice
        .to_device(
            "m.call.negotiate",
            &focus_id,
            device.as_str(),
            call_event(
                &alice,
                "call-1",
                alice_session,
                Some(2),
                json!({"description": {"type": "offer", "sdp": "v=0"}}),
            ),
        )
        .await;
    let stale = alice
        .wait_to_device("m.call.hangup", |c| {
            c["call_id"] == "call-1" && c["reason"] == "unknown_error"
        })
        .await;
    assert_eq!(stale["dest_session_id"], alice_session);
    // ...and the first event the new life delivers is a fresh invite, not the old one replayed.
    alice
        .to_device(
            "m.call.invite",
            &focus_id,
            device.as_str(),
            invite(&alice, "call-2", alice_session),
        )
        .await;
    match next_event(&mut events).await {
        LegEvent::Invite { leg, .. } => {
            assert_eq!(leg.call_id.as_str(), "call-2", "old invite was replayed")
        }
        other => panic!("expected the new invite, got {other:?}"),
    }
    // Alice leaves the call (member entry removed): the focus is told.
    alice
        .state(
            &room,
            "org.matrix.msc3401.call.member",
            &alice.user_id.clone(),
            json!({"m.calls": []}),
        )
        .await;
    match next_event(&mut events).await {
        LegEvent::MemberGone {
            room_id,
            conf_id,
            user_id,
            device_id,
        } => {
            assert_eq!(room_id.as_str(), room);
            assert_eq!(conf_id.as_str(), CONF);
            assert_eq!(user_id.as_str(), alice.user_id);
            assert_eq!(device_id.as_str(), alice.device_id);
        }
        other => panic!("expected MemberGone, got {other:?}"),
    }
    focus.shutdown().await;
    let _ = std::fs::remove_dir_all(&state_dir);
}
