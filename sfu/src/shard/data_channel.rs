//! The data channel: opening, what a peer may send on it, and what weir sends.

use std::time::Instant;

use str0m::channel::{ChannelData, ChannelId};

use crate::api::SfuEvent;
use crate::ids::PeerId;
use crate::stats::DropReason;

use super::allocation::pause_notice;
use super::{EventSink, ShardCore};

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
                self.send_data(id, &text);
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

    pub(super) fn send_data(&mut self, id: PeerId, text: &str) {
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
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
    }
}
