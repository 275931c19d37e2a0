//! The conference's streams, announced to every participant on its data channel
//! (`io.weir.streams`, docs/data-channel.md). Once a participant subscribes, it receives only
//! the tracks it asked for, and the metadata of its offers describes only those: a client that
//! shows some tiles and not others must still learn what the others publish, newcomers
//! included, to ask for them later.

use serde_json::json;
use weir_sfu::{Command, PeerId};
use weir_signalling::{ConfId, RoomId, SdpStreamMetadata};

use super::{Conductor, LegSender, MediaPlane};

/// Largest announcement, in bytes. Chromium advertises 256 KiB as the largest data-channel
/// message it takes; this leaves room for the envelope. A stream's entry is 250–350 bytes, so
/// about 650 streams fit. Past it, the streams with the highest ids are left out (an arbitrary
/// cut: a conference that large needs paging, which no client asks for yet). Larger: fewer
/// conferences cut short; smaller: less sent to everyone at each change.
const MAX_ANNOUNCEMENT_BYTES: usize = 200 * 1024;

impl<L: LegSender, M: MediaPlane> Conductor<L, M> {
    /// Every stream published in the conference now, with its owner: the local participants'
    /// (the catalogue the far foci get) and the far participants' from the trunks' catalogues.
    /// A participant's own streams are included: clients skip their own device.
    fn conference_streams(&self, key: &(RoomId, ConfId)) -> SdpStreamMetadata {
        let mut out = self.catalogue(key);
        if let Some(conf) = self.conferences.get(key) {
            for peer in conf.members.values() {
                let Some(p) = self.participants.get(peer) else {
                    continue;
                };
                if !p.leg.trunk {
                    continue;
                }
                for (id, m) in &p.metadata {
                    if !m.tracks.is_empty() && m.user_id.is_some() {
                        out.entry(id.clone()).or_insert_with(|| m.clone());
                    }
                }
            }
        }
        out
    }

    /// The announcement of `streams`, cut to MAX_ANNOUNCEMENT_BYTES (`streams` is cut too, so
    /// that what is remembered as sent is what was sent).
    fn streams_message(streams: &mut SdpStreamMetadata) -> String {
        loop {
            let text =
                json!({"type": "io.weir.streams", "content": {"streams": &*streams}}).to_string();
            if text.len() <= MAX_ANNOUNCEMENT_BYTES || streams.is_empty() {
                return text;
            }
            // drop about as many streams as the excess is worth, at least one
            let excess = text.len() - MAX_ANNOUNCEMENT_BYTES;
            let per_stream = text.len() / streams.len();
            for _ in 0..(excess / per_stream.max(1)).max(1) {
                streams.pop_last();
            }
        }
    }

    /// Tell every local participant with an open channel about the conference's streams, if
    /// they changed since the last announcement.
    pub(super) fn announce_streams(&mut self, key: &(RoomId, ConfId)) {
        let mut streams = self.conference_streams(key);
        let text = Self::streams_message(&mut streams);
        let Some(conf) = self.conferences.get_mut(key) else {
            return;
        };
        if conf.announced_streams.as_ref() == Some(&streams) {
            return;
        }
        conf.announced_streams = Some(streams);
        self.tell_participants(key, &text);
    }

    /// A participant's channel just opened: it gets the streams as they are now.
    pub(super) fn announce_streams_to(&mut self, peer: PeerId) {
        let Some(p) = self.participants.get(&peer) else {
            return;
        };
        if p.leg.trunk {
            return;
        }
        let key = p.conference.clone();
        let mut streams = self.conference_streams(&key);
        let text = Self::streams_message(&mut streams);
        // what everyone else was told last is unchanged: only this one learns it now
        let _ = self.media.command(Command::SendData { peer, text });
    }
}

#[cfg(test)]
mod tests {
    use weir_sfu::{MediaId, PublishedTrack, SfuEvent, TrackKind};

    use super::super::tests::{join, leg, setup};
    use super::*;

    fn streams_sent(cmds: &[Command]) -> Vec<(PeerId, serde_json::Value)> {
        cmds.iter()
            .filter_map(|m| match m {
                Command::SendData { peer, text } => {
                    let v: serde_json::Value = serde_json::from_str(text).unwrap();
                    (v["type"] == "io.weir.streams")
                        .then(|| (*peer, v["content"]["streams"].clone()))
                }
                _ => None,
            })
            .collect()
    }

    fn publish(
        c: &mut Conductor<super::super::tests::Rec, super::super::tests::Rec>,
        peer: PeerId,
        stream: &str,
        track: &str,
    ) {
        c.on_sfu_event(SfuEvent::TrackPublished {
            peer,
            track: PublishedTrack {
                mid: MediaId("0".into()),
                kind: TrackKind::Video,
                stream_id: stream.into(),
                track_id: track.into(),
            },
        });
    }

    #[test]
    fn an_announcement_is_cut_to_what_a_data_channel_message_carries() {
        use weir_signalling::{SdpStreamMetadata, StreamMetadata};
        let mut streams = SdpStreamMetadata::new();
        for i in 0..2000 {
            let mut m = StreamMetadata::new("m.usermedia");
            m.user_id = Some(
                format!("@user{i:04}:example.org")
                    .as_str()
                    .try_into()
                    .unwrap(),
            );
            streams.insert(
                format!("stream-{i:04}-0123456789abcdef0123456789").into(),
                m,
            );
        }
        let text = Conductor::<super::super::tests::Rec, super::super::tests::Rec>::streams_message(
            &mut streams,
        );
        assert!(text.len() <= MAX_ANNOUNCEMENT_BYTES, "{} bytes", text.len());
        assert!(
            streams.len() > 500 && streams.len() < 2000,
            "{} streams kept",
            streams.len()
        );
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            v["content"]["streams"].as_object().unwrap().len(),
            streams.len()
        );
    }

    #[test]
    fn a_screen_share_is_announced_when_it_starts_and_withdrawn_when_it_stops() {
        use weir_signalling::{LegEvent, SdpStreamMetadata, StreamMetadata};
        let (mut c, rec) = setup();
        let pa = join(&mut c, &rec, &leg("@alice:hs", "A", "c1"), "alice-stream");
        let bob = leg("@bob:hs", "B", "c2");
        let pb = join(&mut c, &rec, &bob, "bob-stream");
        publish(&mut c, pb, "bob-stream", "bob-video");
        c.on_sfu_event(SfuEvent::ChannelOpen { peer: pa });
        rec.take_media();
        let describe = |screen: bool| {
            let mut md = SdpStreamMetadata::new();
            md.insert("bob-stream".into(), StreamMetadata::new("m.usermedia"));
            if screen {
                md.insert("bob-screen".into(), StreamMetadata::new("m.screenshare"));
            }
            md
        };
        c.on_leg_event(LegEvent::MetadataChanged {
            leg: bob.clone(),
            metadata: describe(true),
        });
        publish(&mut c, pb, "bob-screen", "bob-screen-video");
        let sent = streams_sent(&rec.take_media());
        let last = &sent.last().expect("the screen announced").1;
        assert_eq!(last["bob-screen"]["purpose"], "m.screenshare");
        assert!(last.get("bob-stream").is_some());

        // Bob stops sharing: his next description leaves the screen out.
        c.on_leg_event(LegEvent::MetadataChanged {
            leg: bob,
            metadata: describe(false),
        });
        let sent = streams_sent(&rec.take_media());
        let last = &sent.last().expect("the screen withdrawn").1;
        assert!(last.get("bob-screen").is_none(), "{last}");
        assert!(last.get("bob-stream").is_some(), "{last}");
    }

    #[test]
    fn participants_learn_every_stream_of_the_conference_with_its_owner_as_it_changes() {
        let (mut c, rec) = setup();
        let pa = join(&mut c, &rec, &leg("@alice:hs", "A", "c1"), "alice-stream");
        publish(&mut c, pa, "alice-stream", "alice-video");
        rec.take_media();

        // Alice's channel opens: she gets what exists now (her own stream; clients skip it).
        c.on_sfu_event(SfuEvent::ChannelOpen { peer: pa });
        let sent = streams_sent(&rec.take_media());
        assert_eq!(sent.len(), 1, "{sent:?}");
        assert_eq!(sent[0].0, pa);
        assert_eq!(sent[0].1["alice-stream"]["user_id"], "@alice:hs");

        // Bob joins and publishes: Alice, whose channel is open, learns of his stream and its
        // track even though nothing of his is forwarded to her; Bob's channel is not open.
        let pb = join(&mut c, &rec, &leg("@bob:hs", "B", "c2"), "bob-stream");
        publish(&mut c, pb, "bob-stream", "bob-video");
        let sent = streams_sent(&rec.take_media());
        let last = &sent.last().expect("an announcement").1;
        assert!(sent.iter().all(|(p, _)| *p == pa), "{sent:?}");
        assert_eq!(last["bob-stream"]["user_id"], "@bob:hs");
        assert_eq!(last["bob-stream"]["device_id"], "B");
        assert_eq!(last["bob-stream"]["tracks"]["bob-video"]["kind"], "video");

        // Nothing changed: nothing is sent again.
        publish(&mut c, pb, "bob-stream", "bob-video");
        assert!(streams_sent(&rec.take_media()).is_empty());

        // Bob leaves: Alice learns his stream is gone.
        c.on_sfu_event(SfuEvent::PeerClosed {
            peer: pb,
            reason: weir_sfu::CloseReason::Disconnected,
        });
        let sent = streams_sent(&rec.take_media());
        let last = &sent.last().expect("an announcement after bob left").1;
        assert!(last.get("bob-stream").is_none(), "{last}");
        assert!(last.get("alice-stream").is_some(), "{last}");
    }
}
