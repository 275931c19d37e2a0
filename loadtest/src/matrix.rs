//! What the load tester's participants write into rooms and read from `/sync`. The requests go
//! through weir's one Matrix client (`weir_signalling::client`), which every simulated
//! participant shares a connection pool of.

use std::time::Duration;

use ruma::api::client::room::create_room;
use ruma::events::AnyStateEventContent;
use ruma::serde::Raw;
use ruma::to_device::DeviceIdOrAllDevices;
use ruma::OwnedUserId;
use serde::Deserialize;
use serde_json::{json, Value};
use weir_signalling::client::{ClientError, MatrixClient, SyncFilter, ToDeviceMessages};

/// Room state type of the call.
pub const CALL_STATE: &str = "org.matrix.msc3401.call";
/// Room state type of a member's call devices.
pub const CALL_MEMBER_STATE: &str = "org.matrix.msc3401.call.member";
/// Long-poll timeout of each participant's `/sync`. Longer means fewer requests when idle;
/// the run's end interrupts a poll anyway.
pub const SYNC_TIMEOUT_MS: u64 = 10_000;
/// How long a member device entry stays valid (js-sdk: one hour).
pub const MEMBER_TTL_MS: u64 = 3_600_000;
/// Sync filter: to-device events only (they cannot be filtered out); no room data, presence or
/// account data, so each long-poll answer stays small.
pub const SYNC_FILTER: &str = r#"{"room":{"rooms":[],"account_data":{"types":[]},"state":{"types":[]},"timeline":{"types":[]},"ephemeral":{"types":[]}},"presence":{"types":[]},"account_data":{"types":[]}}"#;

/// The sync filter, as the client sends it.
pub fn sync_filter() -> SyncFilter {
    SyncFilter::FilterDefinition(
        serde_json::from_str(SYNC_FILTER).expect("SYNC_FILTER is a valid filter (tested)"),
    )
}

/// The request that creates a call room: members may send the call state types at power
/// level 0; `invite` lists the users invited at creation.
pub fn call_room_request(name: &str, invite: Vec<OwnedUserId>) -> create_room::v3::Request {
    let mut req = create_room::v3::Request::new();
    req.preset = Some(create_room::v3::RoomPreset::PrivateChat);
    req.name = Some(name.to_owned());
    req.invite = invite;
    req.power_level_content_override = Raw::new(&json!({
        "events": {CALL_STATE: 0, CALL_MEMBER_STATE: 0},
        "events_default": 0,
        "state_default": 50,
        "invite": 0,
        "users_default": 0,
    }))
    .ok()
    .map(Raw::cast_unchecked);
    req
}

/// State event content as the load tester writes it.
pub fn state_content(v: &Value) -> Raw<AnyStateEventContent> {
    Raw::new(v)
        .expect("a JSON value serialises")
        .cast_unchecked()
}

/// `messages` of a to-device request to one device.
pub fn to_one_device(
    user: &str,
    device: &str,
    content: &Value,
) -> Result<ToDeviceMessages, String> {
    let user = OwnedUserId::try_from(user).map_err(|e| format!("{user}: {e}"))?;
    let content = Raw::new(content)
        .map_err(|e| e.to_string())?
        .cast_unchecked();
    let device = DeviceIdOrAllDevices::DeviceId(device.into());
    Ok([(user, [(device, content)].into())].into())
}

/// A to-device event of a `/sync` answer: its type and content, whatever else it carries.
#[derive(Debug, Deserialize)]
pub struct ToDevice {
    #[serde(rename = "type")]
    pub event_type: String,
    #[serde(default)]
    pub content: Value,
}

/// One `/sync` long-poll of a signed-in participant: the next batch token and its to-device
/// events. An event that is not even `{type, content}` is skipped, never the batch.
pub async fn sync_to_device(
    client: &MatrixClient,
    since: Option<&str>,
) -> Result<(String, Vec<ToDevice>), ClientError> {
    let r = client
        .sync(
            since,
            Some(sync_filter()),
            Duration::from_millis(SYNC_TIMEOUT_MS),
            false,
        )
        .await?;
    let events = r
        .to_device
        .events
        .iter()
        .filter_map(|e| e.deserialize_as_unchecked::<ToDevice>().ok())
        .collect();
    Ok((r.next_batch, events))
}

/// The `org.matrix.msc3401.call.member` content for one device in one call.
pub fn member_content(
    conf_id: &str,
    device_id: &str,
    session_id: &str,
    expires_ts: u64,
    focus_user: &str,
    focus_device: &str,
    focus_session: &str,
) -> Value {
    json!({
        "m.calls": [{
            "m.call_id": conf_id,
            "m.devices": [{
                "device_id": device_id,
                "session_id": session_id,
                "expires_ts": expires_ts,
                "feeds": [{"purpose": "m.usermedia"}],
                // MSC3898: the focus this device publishes to (foci read it to trunk).
                "org.matrix.msc3898.foci.active": [{
                    "user_id": focus_user,
                    "device_id": focus_device,
                    "session_id": focus_session,
                }],
            }],
            "m.foci": [focus_user],
        }]
    })
}

/// The `org.matrix.msc3401.call` content js-sdk 43 sends.
pub fn call_content() -> Value {
    json!({"m.intent": "m.room", "m.type": "m.video", "io.element.ptt": false})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sync_filter_parses_and_keeps_rooms_out() {
        let SyncFilter::FilterDefinition(f) = sync_filter() else {
            panic!("not a definition")
        };
        assert_eq!(f.room.rooms, Some(vec![]));
        assert_eq!(f.presence.types, Some(vec![]));
    }

    #[test]
    fn call_rooms_let_members_write_call_state() {
        let req = call_room_request("r", vec![]);
        let pl: Value = req
            .power_level_content_override
            .unwrap()
            .deserialize_as_unchecked()
            .unwrap();
        assert_eq!(pl["events"][CALL_MEMBER_STATE], 0);
        assert_eq!(pl["events"][CALL_STATE], 0);
    }

    #[test]
    fn a_to_device_message_names_one_device_and_refuses_a_bad_user() {
        let m = to_one_device("@f:hs", "DEV", &json!({"a": 1})).unwrap();
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(v, json!({"@f:hs": {"DEV": {"a": 1}}}));
        assert!(to_one_device("f", "DEV", &json!({})).is_err());
    }

    #[test]
    fn member_content_has_the_device_fields_the_focus_checks() {
        let m = member_content("conf", "DEV", "sess", 99, "@focus:hs", "FOCUSDEV", "sfu");
        let d = &m["m.calls"][0]["m.devices"][0];
        let focus = &d["org.matrix.msc3898.foci.active"][0];
        assert_eq!(
            (&focus["user_id"], &focus["device_id"], &focus["session_id"]),
            (&json!("@focus:hs"), &json!("FOCUSDEV"), &json!("sfu"))
        );
        assert_eq!(d["device_id"], "DEV");
        assert_eq!(d["session_id"], "sess");
        assert_eq!(d["expires_ts"], 99);
        assert_eq!(m["m.calls"][0]["m.call_id"], "conf");
    }
}
