//! The to-device call protocol a participant speaks to the focus, as a stock matrix-js-sdk 43
//! client does (see the wire fixtures): content builders with the common envelope and a `seq`
//! counting 0, 1, 2, … per call, and a parser for what the focus sends back. Pure.

use serde_json::{json, Map, Value};

use crate::ids::{audio_track_id, stream_id, video_track_id, Layer, PublisherId};

/// js-sdk's invite/negotiate `lifetime`, ms.
pub const LIFETIME_MS: u64 = 60_000;

/// The identity of one call leg from the participant's side.
#[derive(Debug, Clone)]
pub struct CallLeg {
    pub call_id: String,
    pub conf_id: String,
    pub device_id: String,
    pub session_id: String,
    pub dest_session_id: String,
    pub focus_user: String,
    seq: u64,
}

impl CallLeg {
    pub fn new(
        call_id: String,
        conf_id: String,
        device_id: String,
        session_id: String,
        dest_session_id: String,
        focus_user: String,
    ) -> Self {
        CallLeg {
            call_id,
            conf_id,
            device_id,
            session_id,
            dest_session_id,
            focus_user,
            seq: 0,
        }
    }

    /// The next `seq` this leg will use.
    pub fn next_seq(&self) -> u64 {
        self.seq
    }

    fn envelope(&mut self, mut body: Map<String, Value>) -> Value {
        body.insert("version".into(), json!("1"));
        body.insert("call_id".into(), json!(self.call_id));
        body.insert("party_id".into(), json!(self.device_id));
        body.insert("conf_id".into(), json!(self.conf_id));
        body.insert("device_id".into(), json!(self.device_id));
        body.insert("sender_session_id".into(), json!(self.session_id));
        body.insert("dest_session_id".into(), json!(self.dest_session_id));
        body.insert("seq".into(), json!(self.seq));
        body.insert("org.matrix.msgid".into(), json!(random_msgid()));
        self.seq += 1;
        Value::Object(body)
    }

    pub fn invite(&mut self, sdp: &str, metadata: Value) -> Value {
        let body = obj(json!({
            "lifetime": LIFETIME_MS,
            "invitee": self.focus_user,
            "offer": {"type": "offer", "sdp": sdp},
            "capabilities": capabilities(),
            "sdp_stream_metadata": metadata,
        }));
        self.envelope(body)
    }

    /// Candidates; the list should end with [`end_of_candidates`].
    pub fn candidates(&mut self, candidates: Vec<Value>) -> Value {
        self.envelope(obj(json!({ "candidates": candidates })))
    }

    pub fn select_answer(&mut self, focus_party: &str) -> Value {
        self.envelope(obj(json!({ "selected_party_id": focus_party })))
    }

    /// Our answer to the focus's `m.call.negotiate` offer.
    pub fn negotiate_answer(&mut self, sdp: &str, metadata: Value) -> Value {
        self.envelope(obj(json!({
            "lifetime": LIFETIME_MS,
            "description": {"type": "answer", "sdp": sdp},
            "sdp_stream_metadata": metadata,
        })))
    }

    pub fn metadata_changed(&mut self, metadata: Value) -> Value {
        self.envelope(obj(json!({ "sdp_stream_metadata": metadata })))
    }

    pub fn hangup(&mut self, reason: &str) -> Value {
        self.envelope(obj(json!({ "reason": reason })))
    }
}

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

fn capabilities() -> Value {
    json!({"m.call.transferee": false, "m.call.dtmf": false})
}

fn random_msgid() -> String {
    let a: u128 = rand::random();
    let h = format!("{a:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A js-sdk-style call or session id: digits of the time then random alphanumerics.
pub fn gen_id(prefix_ms: u128, random_len: usize) -> String {
    const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut s = if prefix_ms > 0 {
        prefix_ms.to_string()
    } else {
        String::new()
    };
    for _ in 0..random_len {
        s.push(CHARS[rand::random_range(0..CHARS.len())] as char);
    }
    s
}

/// `{"candidate": ""}`: end of candidates, exactly as js-sdk sends it.
pub fn end_of_candidates() -> Value {
    json!({"candidate": ""})
}

/// One of our host candidates in js-sdk's shape.
pub fn candidate(candidate: &str, mid: &str, ufrag: Option<&str>) -> Value {
    let mut c = json!({"candidate": candidate, "sdpMid": mid, "sdpMLineIndex": 0});
    if let Some(u) = ufrag {
        c["usernameFragment"] = json!(u);
    }
    c
}

/// Our own streams' metadata: one user-media stream with an audio and a video track.
pub fn own_metadata(
    p: PublisherId,
    user_id: &str,
    device_id: &str,
    audio: bool,
    video: bool,
) -> Value {
    if !audio && !video {
        return json!({});
    }
    let mut tracks = Map::new();
    if audio {
        tracks.insert(audio_track_id(p), json!({"kind": "audio"}));
    }
    if video {
        let (w, h) = Layer::F.size();
        tracks.insert(
            video_track_id(p),
            json!({"kind": "video", "width": w, "height": h}),
        );
    }
    json!({
        stream_id(p): {
            "purpose": "m.usermedia",
            "audio_muted": false,
            "video_muted": !video,
            "user_id": user_id,
            "device_id": device_id,
            "tracks": tracks,
        }
    })
}

/// What the focus sent us.
#[derive(Debug, Clone, PartialEq)]
pub enum FromFocus {
    Answer {
        sdp: String,
        party_id: String,
    },
    Candidates(Vec<String>),
    /// `m.call.negotiate` with an offer (to be answered) or an answer.
    Negotiate {
        offer: bool,
        sdp: String,
        metadata: Option<Value>,
    },
    MetadataChanged(Value),
    Hangup {
        reason: String,
    },
    /// Anything else (counted, ignored).
    Other(String),
}

/// Why an event from the focus was not for this leg.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Ignored {
    #[error("event for another call ({0})")]
    OtherCall(String),
    #[error("event for another session ({0})")]
    OtherSession(String),
    #[error("malformed {0}: {1}")]
    Malformed(String, &'static str),
}

/// Parse one to-device event from the focus, applying js-sdk's filters (`call_id`,
/// `dest_session_id`).
pub fn parse(leg: &CallLeg, event_type: &str, content: &Value) -> Result<FromFocus, Ignored> {
    let s = |k: &str| content.get(k).and_then(Value::as_str);
    if let Some(c) = s("call_id") {
        if c != leg.call_id {
            return Err(Ignored::OtherCall(c.to_string()));
        }
    }
    if let Some(d) = s("dest_session_id") {
        if d != leg.session_id {
            return Err(Ignored::OtherSession(d.to_string()));
        }
    }
    let malformed = |why| Ignored::Malformed(event_type.to_string(), why);
    let metadata = || {
        content
            .get("sdp_stream_metadata")
            .or_else(|| content.get("org.matrix.msc3077.sdp_stream_metadata"))
            .cloned()
    };
    Ok(match event_type {
        "m.call.answer" => FromFocus::Answer {
            sdp: content
                .pointer("/answer/sdp")
                .and_then(Value::as_str)
                .ok_or_else(|| malformed("no answer.sdp"))?
                .to_string(),
            party_id: s("party_id").unwrap_or_default().to_string(),
        },
        "m.call.candidates" => FromFocus::Candidates(
            content
                .get("candidates")
                .and_then(Value::as_array)
                .ok_or_else(|| malformed("no candidates"))?
                .iter()
                .filter_map(|c| c.get("candidate").and_then(Value::as_str))
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .collect(),
        ),
        "m.call.negotiate" => {
            let d = content
                .get("description")
                .ok_or_else(|| malformed("no description"))?;
            let sdp = d
                .get("sdp")
                .and_then(Value::as_str)
                .ok_or_else(|| malformed("no description.sdp"))?;
            let offer = match d.get("type").and_then(Value::as_str) {
                Some("offer") => true,
                Some("answer") => false,
                _ => return Err(malformed("bad description.type")),
            };
            FromFocus::Negotiate {
                offer,
                sdp: sdp.to_string(),
                metadata: metadata(),
            }
        }
        "m.call.sdp_stream_metadata_changed" | "org.matrix.call.sdp_stream_metadata_changed" => {
            FromFocus::MetadataChanged(metadata().ok_or_else(|| malformed("no metadata"))?)
        }
        "m.call.hangup" | "m.call.reject" => FromFocus::Hangup {
            reason: s("reason").unwrap_or("").to_string(),
        },
        other => FromFocus::Other(other.to_string()),
    })
}

/// Which of a room's publishers one subscriber shows, and how large.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum Layout {
    /// Every publisher at full size.
    All,
    /// The active speaker large, the next five small.
    Speaker,
    /// Nine medium tiles.
    Grid3x3,
    /// Sixteen small tiles.
    Grid4x4,
    /// Every publisher, at full size for participants 0 and 1, a quarter for 2 and 3, full for
    /// 4 and 5, and so on: two sizes of each stream are watched at once, on every site of a
    /// cascade (participants are spread over sites round-robin), so each trunk carries two
    /// layers of each video.
    Mixed,
}

/// One video subscription: whose, and at what size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tile {
    pub publisher: PublisherId,
    pub layer: Layer,
}

impl Layout {
    /// The tiles `me` shows from `others` (the room's video publishers except oneself, in
    /// roster order), given the current active speaker (if any).
    pub fn tiles(
        self,
        me: PublisherId,
        others: &[PublisherId],
        speaker: Option<PublisherId>,
    ) -> Vec<Tile> {
        let ordered: Vec<PublisherId> = match speaker.filter(|s| others.contains(s)) {
            Some(s) => std::iter::once(s)
                .chain(others.iter().copied().filter(|p| *p != s))
                .collect(),
            None => others.to_vec(),
        };
        let tile = |publisher, layer| Tile { publisher, layer };
        match self {
            Layout::All => ordered.into_iter().map(|p| tile(p, Layer::F)).collect(),
            Layout::Mixed => {
                let layer = if (me.0 / 2).is_multiple_of(2) {
                    Layer::F
                } else {
                    Layer::Q
                };
                ordered.into_iter().map(|p| tile(p, layer)).collect()
            }
            Layout::Speaker => ordered
                .into_iter()
                .take(6)
                .enumerate()
                .map(|(i, p)| tile(p, if i == 0 { Layer::F } else { Layer::Q }))
                .collect(),
            Layout::Grid3x3 => ordered
                .into_iter()
                .take(9)
                .map(|p| tile(p, Layer::H))
                .collect(),
            Layout::Grid4x4 => ordered
                .into_iter()
                .take(16)
                .map(|p| tile(p, Layer::Q))
                .collect(),
        }
    }
}

/// MSC3898 `m.call.track_subscription` for the data channel: every audio track of `audio`, the
/// video of each tile at its size, and an unsubscribe for every other video publisher.
pub fn track_subscription(
    audio: &[PublisherId],
    tiles: &[Tile],
    all_video: &[PublisherId],
) -> Value {
    let mut subscribe: Vec<Value> = audio
        .iter()
        .map(|p| json!({"stream_id": stream_id(*p), "track_id": audio_track_id(*p)}))
        .collect();
    subscribe.extend(tiles.iter().map(|t| {
        let (w, h) = t.layer.size();
        json!({"stream_id": stream_id(t.publisher), "track_id": video_track_id(t.publisher), "width": w, "height": h})
    }));
    let unsubscribe: Vec<Value> = all_video
        .iter()
        .filter(|p| !tiles.iter().any(|t| t.publisher == **p))
        .map(|p| json!({"stream_id": stream_id(*p), "track_id": video_track_id(*p)}))
        .collect();
    json!({
        "type": "m.call.track_subscription",
        "content": {"subscribe": subscribe, "unsubscribe": unsubscribe}
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leg() -> CallLeg {
        CallLeg::new(
            "c1".into(),
            "conf".into(),
            "DEV".into(),
            "sess".into(),
            "sfu".into(),
            "@focus:localhost".into(),
        )
    }

    #[test]
    fn the_envelope_matches_js_sdk_and_seq_counts_up() {
        let mut l = leg();
        let inv = l.invite("v=0", json!({}));
        for (k, v) in [
            ("version", json!("1")),
            ("call_id", json!("c1")),
            ("party_id", json!("DEV")),
            ("conf_id", json!("conf")),
            ("device_id", json!("DEV")),
            ("sender_session_id", json!("sess")),
            ("dest_session_id", json!("sfu")),
            ("seq", json!(0)),
            ("invitee", json!("@focus:localhost")),
            ("lifetime", json!(60000)),
        ] {
            assert_eq!(inv[k], v, "{k}");
        }
        assert_eq!(inv["offer"]["type"], "offer");
        assert_eq!(inv["org.matrix.msgid"].as_str().unwrap().len(), 36);
        let c = l.candidates(vec![end_of_candidates()]);
        assert_eq!(c["seq"], 1);
        assert_eq!(c["candidates"][0], json!({"candidate": ""}));
        let s = l.select_answer("FOCUS");
        assert_eq!(
            (s["seq"].clone(), s["selected_party_id"].clone()),
            (json!(2), json!("FOCUS"))
        );
        let n = l.negotiate_answer("v=0", json!({}));
        assert_eq!(n["description"], json!({"type": "answer", "sdp": "v=0"}));
        assert_eq!(l.hangup("user_hangup")["seq"], 4);
    }

    #[test]
    fn focus_events_are_parsed_and_filtered_like_js_sdk_does() {
        let l = leg();
        let answer = json!({"call_id": "c1", "dest_session_id": "sess", "party_id": "F",
            "answer": {"type": "answer", "sdp": "v=0"}, "sdp_stream_metadata": {}});
        assert_eq!(
            parse(&l, "m.call.answer", &answer),
            Ok(FromFocus::Answer {
                sdp: "v=0".into(),
                party_id: "F".into()
            })
        );
        let other = json!({"call_id": "c2", "answer": {"sdp": ""}});
        assert!(matches!(
            parse(&l, "m.call.answer", &other),
            Err(Ignored::OtherCall(_))
        ));
        let wrong_session = json!({"call_id": "c1", "dest_session_id": "x"});
        assert!(matches!(
            parse(&l, "m.call.hangup", &wrong_session),
            Err(Ignored::OtherSession(_))
        ));
        let cands = json!({"call_id": "c1", "candidates": [
            {"candidate": "candidate:1 1 udp 1 127.0.0.1 5000 typ host", "sdpMid": "0", "sdpMLineIndex": 0},
            {"candidate": ""}]});
        assert_eq!(
            parse(&l, "m.call.candidates", &cands),
            Ok(FromFocus::Candidates(vec![
                "candidate:1 1 udp 1 127.0.0.1 5000 typ host".into()
            ]))
        );
        let neg = json!({"call_id": "c1", "description": {"type": "offer", "sdp": "v=0"},
            "org.matrix.msc3077.sdp_stream_metadata": {"s": {"purpose": "m.usermedia"}}});
        match parse(&l, "m.call.negotiate", &neg).unwrap() {
            FromFocus::Negotiate {
                offer, metadata, ..
            } => {
                assert!(offer);
                assert!(metadata.unwrap().get("s").is_some());
            }
            other => panic!("{other:?}"),
        }
        assert!(parse(&l, "m.call.negotiate", &json!({"call_id": "c1"})).is_err());
    }

    const ME: PublisherId = PublisherId(0);

    #[test]
    fn layouts_pick_tiles_and_sizes() {
        let others: Vec<PublisherId> = (1..=20).map(PublisherId).collect();
        let sp = Layout::Speaker.tiles(ME, &others, Some(PublisherId(7)));
        assert_eq!(sp.len(), 6);
        assert_eq!(
            sp[0],
            Tile {
                publisher: PublisherId(7),
                layer: Layer::F
            }
        );
        assert!(sp[1..].iter().all(|t| t.layer == Layer::Q));
        assert_eq!(Layout::Grid3x3.tiles(ME, &others, None).len(), 9);
        assert_eq!(Layout::Grid4x4.tiles(ME, &others, None).len(), 16);
        assert_eq!(Layout::All.tiles(ME, &others, None).len(), 20);
        // Mixed: participants watch everyone full size or small, in pairs.
        for (me, layer) in [
            (0, Layer::F),
            (1, Layer::F),
            (2, Layer::Q),
            (3, Layer::Q),
            (4, Layer::F),
        ] {
            let t = Layout::Mixed.tiles(PublisherId(me), &others, None);
            assert_eq!(t.len(), 20);
            assert!(t.iter().all(|t| t.layer == layer), "{me}");
        }
        // A speaker who is not among the others (oneself) changes nothing.
        assert_eq!(
            Layout::Grid3x3
                .tiles(ME, &others[..3], Some(PublisherId(99)))
                .len(),
            3
        );
    }

    #[test]
    fn subscriptions_name_tracks_by_our_deterministic_ids() {
        let tiles = [Tile {
            publisher: PublisherId(2),
            layer: Layer::H,
        }];
        let m = track_subscription(
            &[PublisherId(2), PublisherId(3)],
            &tiles,
            &[PublisherId(2), PublisherId(3)],
        );
        assert_eq!(m["type"], "m.call.track_subscription");
        let sub = m["content"]["subscribe"].as_array().unwrap();
        assert_eq!(sub.len(), 3);
        assert_eq!(sub[2]["width"], 640);
        assert_eq!(
            m["content"]["unsubscribe"][0]["track_id"],
            video_track_id(PublisherId(3))
        );
    }

    #[test]
    fn own_metadata_describes_both_tracks() {
        let m = own_metadata(PublisherId(4), "@u:hs", "D", true, true);
        let s = &m[stream_id(PublisherId(4))];
        assert_eq!(s["purpose"], "m.usermedia");
        assert_eq!(s["tracks"][video_track_id(PublisherId(4))]["height"], 720);
        assert_eq!(
            own_metadata(PublisherId(4), "u", "d", false, false),
            json!({})
        );
    }
}
