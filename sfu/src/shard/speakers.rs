//! Speakers: each conference's speech activity, reported to the control plane when it
//! changes (the rules are in `forward::speakers`).

use std::time::Instant;

use crate::api::{AudioSource, SfuEvent};
use crate::ids::ConferenceId;

use super::{EventSink, ShardCore, TrackKey};

impl<S: EventSink> ShardCore<S> {
    /// Re-evaluate every conference's speakers (each housekeeping round) and report changes.
    pub(super) fn report_speakers(&mut self, now: Instant) {
        let tracks = &self.tracks;
        let source = |t: &TrackKey| {
            tracks.get(t).map(|p| AudioSource {
                publisher: t.publisher,
                stream_id: p.stream_id.clone(),
            })
        };
        let mut events = Vec::new();
        let spans = &self.spans;
        let index = self.index;
        for (conference, detector) in &mut self.speakers {
            // A spread conference's speakers are reported once, by its lowest shard: each of
            // its shards sees all of its audio and reaches the same view.
            let leads = spans
                .get(conference)
                .is_none_or(|others| others.iter().all(|s| *s > index));
            if let Some(s) = detector.evaluate(now).filter(|_| leads) {
                events.push(SfuEvent::Speakers {
                    conference: *conference,
                    dominant: s.dominant.as_ref().and_then(source),
                    speaking: s.speaking.iter().filter_map(source).collect(),
                });
            }
        }
        for e in events {
            self.emit(e);
        }
    }

    /// An audio track is gone: it no longer speaks.
    pub(super) fn forget_speaker(&mut self, conference: ConferenceId, track: &TrackKey) {
        if let Some(d) = self.speakers.get_mut(&conference) {
            d.remove(*track);
        }
    }
}
