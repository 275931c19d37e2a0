//! The data channel (MSC3898): what participants send on it (pings, track subscriptions),
//! answered or turned into media-plane commands.

use std::collections::{BTreeMap, BTreeSet};

use weir_sfu::{Command, PeerId};

use super::{Conductor, LegSender, MediaPlane};

impl<L: LegSender, M: MediaPlane> Conductor<L, M> {
    /// A JSON message from a participant's data channel: `{"type": ..., "content": {...}}`.
    pub(super) fn data_message(&mut self, peer: PeerId, text: &str) {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(text) else {
            self.metrics
                .data_messages
                .with_label_values(&["malformed"])
                .inc();
            return;
        };
        let ty = msg.get("type").and_then(|t| t.as_str()).unwrap_or("");
        let content = msg.get("content").cloned().unwrap_or_default();
        match ty {
            "m.call.track_subscription" => {
                // A garbled subscription must not change what the participant receives.
                let list_or_absent = |k: &str| content.get(k).is_none_or(|v| v.is_array());
                let any =
                    content.get("subscribe").is_some() || content.get("unsubscribe").is_some();
                if !(any && list_or_absent("subscribe") && list_or_absent("unsubscribe")) {
                    self.metrics
                        .data_messages
                        .with_label_values(&["malformed"])
                        .inc();
                    return;
                }
                self.metrics
                    .data_messages
                    .with_label_values(&["track_subscription"])
                    .inc();
                self.track_subscription(peer, &content);
            }
            "m.call.ping" => {
                self.metrics
                    .data_messages
                    .with_label_values(&["ping"])
                    .inc();
                let pong = r#"{"type":"m.call.pong","content":{}}"#.to_string();
                let _ = self.media.command(Command::SendData { peer, text: pong });
            }
            "m.call.pong" => self
                .metrics
                .data_messages
                .with_label_values(&["pong"])
                .inc(),
            _ => self
                .metrics
                .data_messages
                .with_label_values(&["other"])
                .inc(),
        }
    }

    /// Apply `unsubscribe` then `subscribe` (a repeated subscribe updates the size), then tell
    /// the media plane the whole set.
    pub(super) fn track_subscription(&mut self, peer: PeerId, content: &serde_json::Value) {
        /// More entries than any layout needs; a longer list is cut, not trusted.
        const MAX_SUBSCRIPTIONS: usize = 256;
        /// Sizes of one track a far focus may ask for: one per simulcast layer is all that
        /// can differ, and publishers send at most three.
        const MAX_SIZES_PER_TRACK: usize = 4;
        let Some(p) = self.participants.get_mut(&peer) else {
            return;
        };
        let conference = p.conference.clone();
        let entries = |key: &str| -> Vec<(String, String, Option<u32>, Option<u32>)> {
            content
                .get(key)
                .and_then(|v| v.as_array())
                .map(|a| {
                    a.iter()
                        .take(MAX_SUBSCRIPTIONS)
                        .filter_map(|e| {
                            let s = e.get("stream_id")?.as_str()?.to_string();
                            let t = e.get("track_id")?.as_str()?.to_string();
                            let dim = |k: &str| {
                                e.get(k)
                                    .and_then(|v| v.as_u64())
                                    .map(|v| v.min(16_384) as u32)
                            };
                            Some((s, t, dim("width"), dim("height")))
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        for (s, t, _, _) in entries("unsubscribe") {
            p.subscriptions.remove(&(s, t));
        }
        // The entries of one message for one track are that track's sizes from now on.
        let mut asked: BTreeMap<(String, String), BTreeSet<Option<u32>>> = BTreeMap::new();
        for (s, t, _, h) in entries("subscribe") {
            let sizes = asked.entry((s, t)).or_default();
            if sizes.len() < MAX_SIZES_PER_TRACK {
                sizes.insert(h);
            }
        }
        for (k, sizes) in asked {
            if p.subscriptions.len() < MAX_SUBSCRIPTIONS || p.subscriptions.contains_key(&k) {
                p.subscriptions.insert(k, sizes);
            }
        }
        let wanted: Vec<((String, String), Option<u32>)> = p
            .subscriptions
            .iter()
            .flat_map(|(k, sizes)| sizes.iter().map(move |h| (k.clone(), *h)))
            .collect();
        let subscriptions = wanted
            .into_iter()
            .map(|((stream_id, track_id), max_height)| {
                let source_height = self.source_height(&stream_id, &track_id);
                weir_sfu::Subscription {
                    stream_id,
                    track_id,
                    max_height,
                    source_height,
                }
            })
            .collect();
        self.media_command(
            peer,
            Command::Subscribe {
                peer,
                subscriptions,
            },
        );
        if !self.cascade.is_trunk(peer) {
            self.sync_trunk_subscriptions(&conference);
        }
    }
}
