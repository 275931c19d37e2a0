//! Stream metadata (MSC3077 `sdp_stream_metadata`): what each participant says of its own
//! streams, kept under the authenticated owner and relayed to those who receive them, and the
//! description of everything forwarded to a subscriber.

use std::collections::BTreeMap;

use weir_sfu::{ForwardedTrack, PeerId, TrackKind};
use weir_signalling::{
    Leg, LegCommand, SdpStreamMetadata, StreamId, StreamMetadata, TrackId, TrackMetadata,
};

use super::{owned_stream, Conductor, LegSender, MediaPlane};

impl<L: LegSender, M: MediaPlane> Conductor<L, M> {
    /// The participant's description of its own streams, with the owner set to the
    /// authenticated sender whatever the client claimed.
    pub(super) fn owned_metadata(
        &self,
        leg: &Leg,
        metadata: SdpStreamMetadata,
    ) -> SdpStreamMetadata {
        metadata
            .into_iter()
            .map(|(id, mut m)| {
                m.user_id = Some(leg.user_id.clone());
                m.device_id = Some(leg.device_id.clone());
                (id, m)
            })
            .collect()
    }

    pub(super) fn update_metadata(
        &mut self,
        peer: PeerId,
        metadata: SdpStreamMetadata,
        relay: bool,
    ) {
        if self.participants.get(&peer).is_some_and(|p| p.leg.trunk) {
            return self.trunk_catalogue(peer, metadata);
        }
        let Some(p) = self.participants.get_mut(&peer) else {
            return;
        };
        let owned: SdpStreamMetadata = metadata
            .into_iter()
            .map(|(id, mut m)| {
                m.user_id = Some(p.leg.user_id.clone());
                m.device_id = Some(p.leg.device_id.clone());
                (id, m)
            })
            .collect();
        let mut changed = SdpStreamMetadata::new();
        // A client describes all its streams each time (MSC3077): one it no longer describes
        // has ended (a screen share stopped). An empty description is a client that describes
        // nothing, not one that stopped everything.
        let ended = if owned.is_empty() {
            0
        } else {
            let before = p.metadata.len();
            p.metadata.retain(|id, _| owned.contains_key(id));
            before - p.metadata.len()
        };
        for (id, m) in owned {
            // Keep what we learned of the tracks (kind) when a client sends a bare update.
            let merged = match p.metadata.get(&id) {
                Some(old) if m.tracks.is_empty() => StreamMetadata {
                    tracks: old.tracks.clone(),
                    ..m
                },
                _ => m,
            };
            if p.metadata.get(&id) != Some(&merged) {
                changed.insert(id.clone(), merged.clone());
            }
            p.metadata.insert(id, merged);
        }
        if changed.is_empty() && ended == 0 {
            return;
        }
        let key = p.conference.clone();
        let owner = peer;
        if let Some(conf) = self.conferences.get_mut(&key) {
            for (id, m) in &changed {
                if conf.streams.contains_key(id.as_str()) {
                    conf.streams.insert(id.as_str().to_string(), m.clone());
                }
            }
        }
        self.publish_catalogue(&key);
        self.tell_screens(owner, false);
        if !relay {
            return;
        }
        self.relay_metadata(owner, &changed);
    }

    /// Tell every local subscriber that has one of `owner`'s streams forwarded about the
    /// changed descriptions (trunks get the whole catalogue instead: `publish_catalogue`).
    pub(super) fn relay_metadata(&self, owner: PeerId, changed: &SdpStreamMetadata) {
        for (sub, tracks) in &self.forwarded {
            if *sub == owner || self.cascade.is_trunk(*sub) {
                continue;
            }
            let relevant: SdpStreamMetadata = changed
                .iter()
                .filter(|(id, _)| {
                    tracks
                        .iter()
                        .any(|t| t.publisher == owner && t.stream_id == id.as_str())
                })
                .map(|(id, m)| (id.clone(), m.clone()))
                .collect();
            if relevant.is_empty() {
                continue;
            }
            if let Some(sp) = self.participants.get(sub) {
                self.metrics.metadata_relayed.inc();
                self.legs.send(LegCommand::MetadataChanged {
                    leg: sp.leg.clone(),
                    metadata: relevant,
                });
            }
        }
    }

    /// Metadata for a stream forwarded to a subscriber: the publisher's own description if it
    /// is still here, else the last one we knew.
    pub(super) fn describe(&self, t: &ForwardedTrack) -> StreamMetadata {
        if let Some(p) = self.participants.get(&t.publisher) {
            if let Some(m) = p.metadata.get(&StreamId::from(t.stream_id.as_str())) {
                return m.clone();
            }
            if p.leg.trunk {
                return StreamMetadata::new("m.usermedia");
            }
            return owned_stream(&p.leg);
        }
        StreamMetadata::new("m.usermedia")
    }

    /// Everything forwarded to `peer`, described (every stream id in our SDP must be covered).
    pub(super) fn subscriber_metadata(&self, peer: PeerId) -> SdpStreamMetadata {
        let mut out = SdpStreamMetadata::new();
        let Some(tracks) = self.forwarded.get(&peer) else {
            return out;
        };
        let conf = self
            .participants
            .get(&peer)
            .and_then(|p| self.conferences.get(&p.conference));
        for t in tracks {
            let sid = StreamId::from(t.stream_id.as_str());
            let mut md = match self.participants.get(&t.publisher) {
                Some(_) => self.describe(t),
                None => conf
                    .and_then(|c| c.streams.get(&t.stream_id).cloned())
                    .unwrap_or_else(|| self.describe(t)),
            };
            let kind = match t.kind {
                TrackKind::Audio => "audio",
                TrackKind::Video => "video",
            };
            md.tracks
                .entry(TrackId::from(t.track_id.as_str()))
                .or_insert(TrackMetadata {
                    kind: kind.into(),
                    width: None,
                    height: None,
                });
            let entry = out.entry(sid).or_insert_with(|| StreamMetadata {
                tracks: BTreeMap::new(),
                ..md.clone()
            });
            entry.tracks.extend(md.tracks);
        }
        out
    }

    /// The full height a publisher says it sends a track at (its metadata), if any.
    pub(super) fn source_height(&self, stream_id: &str, track_id: &str) -> Option<u32> {
        self.participants.values().find_map(|p| {
            p.metadata
                .get(&StreamId::from(stream_id))
                .and_then(|m| m.tracks.get(&TrackId::from(track_id)))
                .and_then(|t| t.height)
        })
    }
}
