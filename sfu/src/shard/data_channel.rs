//! The data channel: opening, what a peer may send on it, and what weir sends.

use std::time::Instant;

use str0m::channel::{ChannelData, ChannelId};

use crate::api::SfuEvent;
use crate::ids::PeerId;
use crate::stats::DropReason;

use super::allocation::pause_notice;
use super::{EventSink, ShardCore};

/// How many times a notice is sent again after it, one housekeeping round
/// (`HOUSEKEEPING_INTERVAL`, 100 ms) apart.
///
/// Notices (`io.weir.paused`) are state, so a repeat changes nothing for the participant;
/// it is there for SCTP. A notice lost on the way is resent after SCTP's retransmission
/// timeout, at least 1 s, and 3 s before the association has measured a round trip; a
/// channel is quiet most of the time, so nothing follows the loss to reveal it sooner. The
/// repeats that follow it do: the participant acknowledges each with the gap in its
/// selective acknowledgement, and after three such reports SCTP resends the lost message
/// at once (fast retransmit). The channel is ordered, so a repeat never overtakes what it
/// repeats. A pause is decided when the link is already flooded, so repeats get lost too:
/// in the simulated test (`a_lost_pause_notice_is_resent_well_before_sctps_timer`), 2 of 5
/// were, and with 3 the notice waited for the timer (1.2 s instead of 0.8). More cost a
/// link that is already short (each repeat is about 180 bytes on the wire, 5 over 0.5 s are
/// 15 kbit/s for that half second).
pub(super) const NOTICE_ECHOES: u8 = 5;

/// Largest data-channel message passed to the control plane. MSC3898 messages are small JSON
/// (a subscription list, a renegotiation SDP of tens of KiB); more is refused and counted.
const MAX_DATA_MESSAGE: usize = 128 * 1024;

impl<S: EventSink> ShardCore<S> {
    pub(super) fn on_channel_open(&mut self, id: PeerId, cid: ChannelId) {
        // The first channel the participant opens carries MSC3898 messages.
        let first = self
            .peers
            .get_mut(&id)
            .is_some_and(|p| p.channel.replace(p.channel.unwrap_or(cid)).is_none());
        if first {
            self.emit(SfuEvent::ChannelOpen { peer: id });
            // Pauses decided before the channel opened.
            let paused: Vec<String> = self
                .peers
                .get(&id)
                .into_iter()
                .flat_map(|p| p.out.values())
                .filter(|o| o.allocated.is_held())
                .map(|o| pause_notice(&o.stream_id, &o.track_id, true))
                .collect();
            for text in paused {
                self.send_notice(id, text);
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
        if !within_budget {
            self.counters.drop(DropReason::DataChannelFlood);
        } else if d.binary || d.data.len() > MAX_DATA_MESSAGE {
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
    /// is repeated: it alone is certain to be the latest state of what it describes.
    pub(super) fn send_notice(&mut self, id: PeerId, text: String) {
        if !self.send_data(id, &text) {
            return; // no channel yet: its opening sends the state anew
        }
        if let Some(p) = self.peers.get_mut(&id) {
            p.notice_echo = Some((text, NOTICE_ECHOES));
        }
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
            self.send_data(id, &text);
        }
    }

    /// Send a text message on the peer's data channel; false (and counted) if it has none
    /// open or the message was refused.
    pub(super) fn send_data(&mut self, id: PeerId, text: &str) -> bool {
        let Some(peer) = self.peers.get_mut(&id) else {
            return false;
        };
        let sent = peer
            .channel
            .and_then(|c| peer.rtc.channel(c))
            .is_some_and(|mut ch| ch.write(false, text.as_bytes()).unwrap_or(false));
        if sent {
            self.mark_dirty(id);
        } else {
            self.counters.drop(DropReason::DataChannel);
        }
        sent
    }
}
