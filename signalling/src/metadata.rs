//! `sdp_stream_metadata` (MSC3077 + MSC3291 + the MSC3898 extensions): stream id → purpose,
//! mute state, owner and tracks.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::{DeviceId, StreamId, TrackId, UserId};

/// Stream id → metadata, exactly as carried in `sdp_stream_metadata`.
pub type SdpStreamMetadata = BTreeMap<StreamId, StreamMetadata>;

/// Most streams one metadata object may describe; more is refused as malformed.
pub const MAX_STREAMS: usize = 64;
/// Most tracks one stream may list; more is refused as malformed.
pub const MAX_TRACKS_PER_STREAM: usize = 16;

/// Metadata of one `MediaStream`. Unknown extra fields are tolerated and not kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamMetadata {
    /// `m.usermedia` or `m.screenshare` (anything else means: ignore the stream).
    pub purpose: String,
    #[serde(default)]
    pub audio_muted: bool,
    #[serde(default)]
    pub video_muted: bool,
    /// The stream's owner. On incoming events weir overwrites it with the leg's authenticated
    /// user. A value that is not a user id reads as absent: for a participant it is replaced
    /// anyway, and a trunk's stream without an owner is dropped and counted (`foreign_owner`).
    #[serde(
        default,
        deserialize_with = "lenient_user_id",
        skip_serializing_if = "Option::is_none"
    )]
    pub user_id: Option<UserId>,
    /// The stream's owner device. On incoming events weir overwrites it with the leg's device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<DeviceId>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tracks: BTreeMap<TrackId, TrackMetadata>,
}

impl StreamMetadata {
    /// A stream with the given purpose, unmuted, no owner, no tracks.
    pub fn new(purpose: impl Into<String>) -> Self {
        Self {
            purpose: purpose.into(),
            audio_muted: false,
            video_muted: false,
            user_id: None,
            device_id: None,
            tracks: BTreeMap::new(),
        }
    }
}

fn lenient_user_id<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<UserId>, D::Error> {
    let v = Option::<serde_json::Value>::deserialize(d)?;
    Ok(v.and_then(|v| v.as_str().and_then(|s| UserId::try_from(s).ok())))
}

/// One track of a stream (`tracks` map value).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackMetadata {
    /// `audio` or `video`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
}

/// Parses a metadata object, enforcing the size limits.
pub(crate) fn parse_metadata(value: serde_json::Value) -> Result<SdpStreamMetadata, String> {
    let map: SdpStreamMetadata =
        serde_json::from_value(value).map_err(|e| format!("sdp_stream_metadata: {e}"))?;
    if map.len() > MAX_STREAMS {
        return Err(format!("sdp_stream_metadata: {} streams", map.len()));
    }
    if map.values().any(|s| s.tracks.len() > MAX_TRACKS_PER_STREAM) {
        return Err("sdp_stream_metadata: too many tracks".into());
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_js_sdk_and_js_sfu_shapes_and_tolerates_extras() {
        let m = parse_metadata(json!({
            "s1": {"purpose": "m.usermedia", "audio_muted": false, "video_muted": true},
            "s2": {"purpose": "m.screenshare", "user_id": "@a:x", "device_id": "D",
                   "tracks": {"t1": {"kind": "video", "width": 1280, "height": 720, "extra": 1}},
                   "something_new": {"x": 1}}
        }))
        .unwrap();
        assert!(m[&StreamId::from("s1")].video_muted);
        let s2 = &m[&StreamId::from("s2")];
        assert_eq!(s2.user_id.as_ref().unwrap().as_str(), "@a:x");
        assert_eq!(s2.tracks[&TrackId::from("t1")].width, Some(1280));
    }

    #[test]
    fn an_owner_that_is_not_a_user_id_reads_as_absent_not_as_a_malformed_event() {
        let m = parse_metadata(json!({
            "s": {"purpose": "m.usermedia", "user_id": "bob", "device_id": "D"},
            "t": {"purpose": "m.usermedia", "user_id": 7},
            "u": {"purpose": "m.usermedia", "user_id": null},
        }))
        .unwrap();
        assert!(m.values().all(|s| s.user_id.is_none()), "{m:?}");
        assert_eq!(
            m[&StreamId::from("s")].device_id.as_ref().unwrap().as_str(),
            "D"
        );
    }

    #[test]
    fn serialises_without_null_or_empty_optionals() {
        let mut m = SdpStreamMetadata::new();
        m.insert("s".into(), StreamMetadata::new("m.usermedia"));
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(
            v,
            json!({"s": {"purpose": "m.usermedia", "audio_muted": false, "video_muted": false}})
        );
        let mut s = StreamMetadata::new("m.usermedia");
        s.tracks.insert(
            "t".into(),
            TrackMetadata {
                kind: "audio".into(),
                width: None,
                height: None,
            },
        );
        assert_eq!(
            serde_json::to_value(&s).unwrap()["tracks"],
            json!({"t": {"kind": "audio"}})
        );
    }

    #[test]
    fn rejects_wrong_types_and_oversized_maps() {
        assert!(parse_metadata(json!({"s": {"purpose": 5}})).is_err());
        assert!(parse_metadata(json!({"s": {}})).is_err());
        assert!(parse_metadata(json!([1, 2])).is_err());
        assert!(
            parse_metadata(json!({"s": {"purpose": "m.usermedia", "audio_muted": "yes"}})).is_err()
        );
        let many: serde_json::Map<String, serde_json::Value> = (0..=MAX_STREAMS)
            .map(|i| (format!("s{i}"), json!({"purpose": "m.usermedia"})))
            .collect();
        assert!(parse_metadata(serde_json::Value::Object(many)).is_err());
        let tracks: serde_json::Map<String, serde_json::Value> = (0..=MAX_TRACKS_PER_STREAM)
            .map(|i| (format!("t{i}"), json!({"kind": "audio"})))
            .collect();
        assert!(
            parse_metadata(json!({"s": {"purpose": "m.usermedia", "tracks": tracks}})).is_err()
        );
    }
}
