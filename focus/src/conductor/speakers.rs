//! Speakers: the media plane's speech activity, announced to each conference's participants
//! on their data channels (`io.weir.speakers`, docs/data-channel.md) and counted in metrics.

use serde_json::{json, Value};
use weir_sfu::{AudioSource, Command, ConferenceId};
use weir_signalling::{ConfId, RoomId, StreamId};

use super::{Conductor, LegSender, MediaPlane};

impl<L: LegSender, M: MediaPlane> Conductor<L, M> {
    /// The media plane reports who speaks in `conference` now.
    pub(super) fn speakers_changed(
        &mut self,
        conference: ConferenceId,
        dominant: Option<AudioSource>,
        speaking: Vec<AudioSource>,
    ) {
        let Some(key) = self
            .conferences
            .iter()
            .find(|(_, c)| c.id == conference)
            .map(|(k, _)| k.clone())
        else {
            return;
        };
        let dominant = dominant.and_then(|s| self.describe_source(&s));
        let speaking: Vec<Value> = speaking
            .iter()
            .filter_map(|s| self.describe_source(s))
            .collect();
        if let Some(c) = self.conferences.get_mut(&key) {
            c.speaking = speaking.len();
            if dominant.is_some() && c.dominant != dominant {
                self.metrics.speaker_changes.inc();
            }
            c.dominant.clone_from(&dominant);
        }
        self.refresh_gauges();
        let text = json!({
            "type": "io.weir.speakers",
            "content": {"dominant": dominant, "speaking": speaking},
        })
        .to_string();
        self.tell_participants(&key, &text);
    }

    /// Send `text` on the data channel of every local participant of the conference whose
    /// channel is open (trunks are told through their own messages).
    pub(super) fn tell_participants(&self, key: &(RoomId, ConfId), text: &str) {
        for (peer, p) in &self.participants {
            if p.conference == *key && !p.leg.trunk && p.channel_open {
                let _ = self.media.command(Command::SendData {
                    peer: *peer,
                    text: text.to_string(),
                });
            }
        }
    }

    /// Who owns an audio source, as participants know them: a local participant's user and
    /// device, or for a far focus's stream the owner its catalogue names.
    fn describe_source(&self, s: &AudioSource) -> Option<Value> {
        let p = self.participants.get(&s.publisher)?;
        let (user, device) = if p.leg.trunk {
            let m = p.metadata.get(&StreamId::from(s.stream_id.as_str()))?;
            (m.user_id.clone()?, m.device_id.clone()?)
        } else {
            (p.leg.user_id.clone(), p.leg.device_id.clone())
        };
        Some(json!({
            "user_id": user.as_str(),
            "device_id": device.as_str(),
            "stream_id": s.stream_id,
        }))
    }
}
