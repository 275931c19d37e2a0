//! The data channel: opening, what a peer may send on it, and what weir sends.

use std::time::Instant;

use str0m::channel::{ChannelData, ChannelId};

use crate::api::SfuEvent;
use crate::ids::PeerId;
use crate::stats::DropReason;

use super::{EventSink, ShardCore};

/// The label of the channel a participant may open for notices, unordered
/// (docs/data-channel.md). On the ordered channel one lost message holds back every later
/// one until SCTP resends it: in the 25-person load test, pause notices reached the narrow
/// links up to 3.9 s after they were sent, most of them delayed by an earlier loss.
/// Unordered, each notice and each repeat stands on its own, and its `seq` says which is newer.
pub(super) const NOTICES_LABEL: &str = "io.weir.notices";

/// An `io.weir.paused` notice: a video a subscriber receives is paused (its downlink cannot
/// carry even the smallest layer now) or flows again (docs/data-channel.md).
pub(super) struct PauseNotice {
    stream_id: String,
    track_id: String,
    paused: bool,
}

impl PauseNotice {
    pub(super) fn new(stream_id: &str, track_id: &str, paused: bool) -> Self {
        PauseNotice {
            stream_id: stream_id.to_string(),
            track_id: track_id.to_string(),
            paused,
        }
    }

    /// The message, numbered `seq` (each participant's notices count up from 1).
    fn text(&self, seq: u64) -> String {
        serde_json::json!({
            "type": "io.weir.paused",
            "content": {
                "stream_id": self.stream_id,
                "track_id": self.track_id,
                "paused": self.paused,
                "reason": "bandwidth",
                "seq": seq,
            },
        })
        .to_string()
    }
}

/// How many times a notice is sent again after it, one housekeeping round
/// (`HOUSEKEEPING_INTERVAL`, 100 ms) apart.
///
/// Notices (`io.weir.paused`) are state, so a repeat changes nothing for the participant; it
/// is a second chance on a flooded link. On the unordered notices channel
/// ([`NOTICES_LABEL`]) the first copy that arrives is delivered. On the ordered data channel
/// (a participant without a notices channel) a lost notice is resent after SCTP's
/// retransmission timeout, at least 1 s, and 3 s before the association has measured a round
/// trip; the repeats make the participant acknowledge with the gap, and after three such
/// reports SCTP resends the lost message at once (fast retransmit). A pause is decided when
/// the link is already flooded, so repeats get lost too: in the simulated test
/// (`a_lost_pause_notice_is_resent_well_before_sctps_timer`, then on the ordered channel), 2
/// of 5 were, and with 3 the notice waited for the timer (1.2 s instead of 0.8). More cost a
/// link that is already short (each repeat is about 180 bytes on the wire, 5 over 0.5 s are
/// 15 kbit/s for that half second).
pub(super) const NOTICE_ECHOES: u8 = 5;

/// Largest data-channel message passed to the control plane. MSC3898 messages are small JSON
/// (a subscription list, a renegotiation SDP of tens of KiB); more is refused and counted.
const MAX_DATA_MESSAGE: usize = 128 * 1024;

impl<S: EventSink> ShardCore<S> {
    pub(super) fn on_channel_open(&mut self, id: PeerId, cid: ChannelId, label: &str) {
        if label == NOTICES_LABEL {
            if let Some(p) = self.peers.get_mut(&id) {
                p.notices.get_or_insert(cid);
            }
            return;
        }
        // The first other channel the participant opens carries MSC3898 messages.
        let first = self
            .peers
            .get_mut(&id)
            .is_some_and(|p| p.channel.replace(p.channel.unwrap_or(cid)).is_none());
        if first {
            self.emit(SfuEvent::ChannelOpen { peer: id });
            // Pauses decided before the channel opened.
            let paused: Vec<PauseNotice> = self
                .peers
                .get(&id)
                .into_iter()
                .flat_map(|p| p.out.values())
                .filter(|o| o.allocated.is_held())
                .map(|o| PauseNotice::new(&o.stream_id, &o.track_id, true))
                .collect();
            for notice in paused {
                self.send_notice(id, notice);
            }
            self.tell_layers_on_open(id);
        }
    }

    /// A message from the peer: passed to the control plane if within the peer's budget, a
    /// text message and not oversized; otherwise dropped and counted.
    pub(super) fn on_channel_data(&mut self, id: PeerId, d: ChannelData, now: Instant) {
        let within_budget = self
            .peers
            .get_mut(&id)
            .is_some_and(|p| p.data_budget.allow(now));
        let on_notices = self.peers.get(&id).is_some_and(|p| p.notices == Some(d.id));
        if !within_budget {
            self.counters.drop(DropReason::DataChannelFlood);
        } else if on_notices || d.binary || d.data.len() > MAX_DATA_MESSAGE {
            // (The notices channel carries nothing toward the focus.)
            self.counters.drop(DropReason::DataChannel);
        } else {
            match String::from_utf8(d.data) {
                Ok(text) => self.emit(SfuEvent::DataMessage { peer: id, text }),
                Err(_) => self.counters.drop(DropReason::DataChannel),
            }
        }
    }

    /// Send a notice (state the participant keeps, so repeating it is harmless), to be sent
    /// again [`NOTICE_ECHOES`] times in the coming housekeeping rounds. Only the last notice
    /// is repeated: it alone is certain to be the latest state of what it describes. It goes
    /// on the participant's notices channel if one is open, else on its data channel.
    pub(super) fn send_notice(&mut self, id: PeerId, notice: PauseNotice) {
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        p.notice_seq += 1;
        let text = notice.text(p.notice_seq);
        if !self.send_notice_text(id, &text) {
            return; // no channel yet: its opening sends the state anew
        }
        if let Some(p) = self.peers.get_mut(&id) {
            p.notice_echo = Some((text, NOTICE_ECHOES));
        }
    }

    /// Send a notice's text on the peer's notices channel, or its data channel without one
    /// (or once the notices channel refuses it: closed by the participant).
    fn send_notice_text(&mut self, id: PeerId, text: &str) -> bool {
        if let Some(cid) = self.peers.get(&id).and_then(|p| p.notices) {
            if self.send_on(id, cid, text) {
                return true;
            }
            if let Some(p) = self.peers.get_mut(&id) {
                p.notices = None;
            }
        }
        self.send_data(id, text)
    }

    /// Housekeeping: send each peer's last notice again while it has repeats left.
    pub(super) fn echo_notices(&mut self) {
        let mut due: Vec<(PeerId, String)> = Vec::new();
        for (id, p) in &mut self.peers {
            if let Some((text, left)) = p.notice_echo.take() {
                if left > 1 {
                    p.notice_echo = Some((text.clone(), left - 1));
                }
                if left > 0 {
                    due.push((*id, text));
                }
            }
        }
        for (id, text) in due {
            self.send_notice_text(id, &text);
        }
    }

    /// Send a text message on the peer's data channel; false (and counted) if it has none
    /// open or the message was refused.
    pub(super) fn send_data(&mut self, id: PeerId, text: &str) -> bool {
        match self.peers.get(&id).and_then(|p| p.channel) {
            Some(cid) => self.send_on(id, cid, text),
            None => {
                self.counters.drop(DropReason::DataChannel);
                false
            }
        }
    }

    /// Send a text message on one of the peer's channels; false (and counted) if refused.
    fn send_on(&mut self, id: PeerId, cid: ChannelId, text: &str) -> bool {
        let Some(peer) = self.peers.get_mut(&id) else {
            return false;
        };
        let sent = peer
            .rtc
            .channel(cid)
            .is_some_and(|mut ch| ch.write(false, text.as_bytes()).unwrap_or(false));
        if sent {
            self.mark_dirty(id);
        } else {
            self.counters.drop(DropReason::DataChannel);
        }
        sent
    }
}
