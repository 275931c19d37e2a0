//! Time: engine deadlines from a min-heap, and housekeeping every [`HOUSEKEEPING_INTERVAL`].

use std::cmp::Reverse;
use std::time::{Duration, Instant};

use str0m::Input;

use crate::api::{CloseReason, PeerRole};

use super::{EventSink, ShardCore};

/// How often the shard checks timeouts, owed keyframe requests and publishes its counters.
/// Shorter reacts faster to dead peers and owed requests; longer costs less idle CPU.
pub(super) const HOUSEKEEPING_INTERVAL: Duration = Duration::from_millis(100);
/// Timeout rounds per peer (on average) in one call of [`ShardCore::fire_timers`]. A normal
/// engine needs one or two; more only happens when one keeps asking for "now". Higher lets
/// such an engine send more per turn; lower returns to everyone else's datagrams sooner.
const TIMER_ROUNDS_PER_PEER: usize = 4;

impl<S: EventSink> ShardCore<S> {
    /// Hand each peer whose deadline has come its timeout round. An engine often answers a
    /// round with another deadline that is already due (packets released by the round), and
    /// firing it again here sends them this turn. But an engine that keeps answering "now"
    /// (a pacer holding packets back) would hold the shard in this loop forever: the rounds
    /// of one call are bounded by [`TIMER_ROUNDS_PER_PEER`] per peer, and what is left waits
    /// for the next turn, after everyone else's datagrams.
    pub(super) fn fire_timers(&mut self, now: Instant) {
        let mut budget = TIMER_ROUNDS_PER_PEER * (self.peers.len() + 1);
        while let Some(Reverse((t, id))) = self.timers.peek().copied() {
            if t > now || budget == 0 {
                break;
            }
            budget -= 1;
            self.timers.pop();
            let Some(peer) = self.peers.get_mut(&id) else {
                continue;
            };
            if peer.timeout != Some(t) {
                continue; // superseded by a later poll
            }
            peer.timeout = None;
            self.counters.engine_timeouts += 1;
            self.current = Some(id);
            if let Err(e) = peer.rtc.handle_input(Input::Timeout(now)) {
                self.close_peer(id, CloseReason::EngineError(e.to_string()), now);
                self.current = None;
                continue;
            }
            self.drain_peer(id, now);
            self.current = None;
        }
        self.drain_dirty(now);
    }

    pub(super) fn housekeeping(&mut self, now: Instant) {
        // Superseded deadlines stay in the heap until they fall due; a peer whose deadline
        // keeps moving out would grow it. Rebuild from the live deadlines when it bloats.
        if self.timers.len() > 4 * self.peers.len() + 64 {
            self.timers = self
                .peers
                .iter()
                .filter_map(|(id, p)| p.timeout.map(|t| Reverse((t, *id))))
                .collect();
        }
        let mut dead = Vec::new();
        for p in self.peers.values_mut() {
            p.traffic.roll(now);
        }
        self.prune_foreign(now);
        self.prune_remote_tracks(now);
        for (id, p) in &self.peers {
            if !p.connected
                && now.saturating_duration_since(p.created_at) > self.config.connect_timeout
            {
                dead.push((*id, CloseReason::ConnectTimeout));
            } else if p.connected
                && now.saturating_duration_since(p.last_rx) > self.config.silence_timeout
            {
                dead.push((*id, CloseReason::Silent));
            }
        }
        for (id, reason) in dead {
            self.close_peer(id, reason, now);
        }
        // Before allocation: a notice it sends now is repeated from the next round on.
        self.echo_notices();
        self.allocate_bandwidth(now);
        self.follow_layers(now);
        self.update_dynacast(now);
        self.report_speakers(now);
        self.drain_dirty(now);
        self.counters.trunk.streams_out = self
            .peers
            .values()
            .filter(|p| p.role == PeerRole::Trunk)
            .flat_map(|p| p.out.values())
            .map(|o| o.trunk.as_ref().map_or(1, |t| t.wanted().count() as u64))
            .sum();
        self.counters.videos_paused = self
            .peers
            .values()
            .flat_map(|p| p.out.values())
            .filter(|o| o.allocated.is_held())
            .count() as u64;
        let tracks = self.tracks.len() as u64;
        self.counters.publish(
            &self.stats,
            self.peers.len() as u64,
            self.conferences.len() as u64,
            tracks,
        );
    }
}
