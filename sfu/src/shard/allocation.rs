//! Bandwidth allocation: each housekeeping round, every subscriber with an estimate of its
//! downlink has that estimate shared among the videos it receives (`forward::allocate`), and
//! its estimator is told what to probe for. The policy is in docs/adaptation.md.

use std::time::{Duration, Instant};

use str0m::bwe::Bitrate;
use tracing::{debug, info};

use crate::api::PeerRole;
use crate::forward::allocate::UP_FRACTION;
use crate::forward::{allocate, camera_steps, Demand, LayerSelector, Now, Priority, SETTLING};
use crate::ids::{PeerId, TrackKind};

use super::data_channel::PauseNotice;
use super::{EventSink, ShardCore, TrackKey};

/// What an audio track is taken to cost before its rate is measured: Opus at the browsers'
/// default 32 kbit/s plus packet overhead at 50 packets/s.
const AUDIO_NOMINAL_BPS: u64 = 56_000;

/// The estimator's target rates are rounded up to this step, so the small changes of the
/// measured layer rates every round do not look like new targets (each rise of the desired
/// rate may start a probe). Coarser probes less often; finer follows the media more closely.
const PROBE_STEP_BPS: u64 = 50_000;

/// How often a subscriber that gets less than it wants asks its estimator for another probe
/// (see `allocate_for`). Each probe sends a short burst of padding at up to twice the
/// estimate; shorter finds a widened link sooner, longer costs a narrow link fewer bursts.
const PROBE_INTERVAL: Duration = Duration::from_secs(3);

impl<S: EventSink> ShardCore<S> {
    /// Allocate for every participant whose downlink is estimated.
    pub(super) fn allocate_bandwidth(&mut self, now: Instant) {
        let ids: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.estimate.is_some() && p.role != PeerRole::Trunk && !p.poisoned)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.allocate_for(id, now);
        }
    }

    /// Without a live estimate nothing is allocated: every video of `id` goes back to what its
    /// size cap allows, and paused ones resume (the subscriber is told).
    pub(super) fn release_allocation(&mut self, id: PeerId) {
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        let mut resumed = 0;
        for out in peer.out.values_mut() {
            if out.allocated.is_held() {
                // Told with its first packet forwarded again (`fanout`).
                out.resume_untold = true;
                resumed += 1;
            }
            out.allocated = Now::New;
            out.flowing_since = None;
        }
        peer.allocator = Default::default();
        peer.probing = (0, 0);
        debug!(%id, resumed, "allocation released: no live estimate");
    }

    /// Allocate for one subscriber (each housekeeping round, and when a video is added).
    pub(super) fn allocate_for(&mut self, id: PeerId, now: Instant) {
        let Some(peer) = self.peers.get(&id) else {
            return;
        };
        let (Some(estimate), loss) = (peer.estimate, peer.loss) else {
            return;
        };
        let working = peer.allocator.working_estimate(estimate, loss, now);
        let dominant = self
            .speakers
            .get(&peer.conference)
            .and_then(|d| d.dominant())
            .map(|t| t.publisher);
        let mut keys: Vec<TrackKey> = Vec::new();
        let mut demands: Vec<Demand> = Vec::new();
        let mut audio: Vec<u64> = Vec::new();
        for (t, out) in &peer.out {
            let Some(p) = self.tracks.get(t) else {
                continue;
            };
            match out.kind {
                TrackKind::Audio => {
                    audio.push(p.activity.measured_bps(now).unwrap_or(AUDIO_NOMINAL_BPS));
                }
                TrackKind::Video if out.trunk.is_none() => {
                    // A scalable stream's choice is between its spatial layers.
                    let layers = match p.spatial.rates(now) {
                        spatial if !spatial.is_empty() => spatial,
                        _ => p.activity.rates(now),
                    };
                    if layers.is_empty() {
                        continue; // nothing flows: nothing to share, the state stays
                    }
                    let screen = self.is_screen(t, p);
                    let priority = if screen {
                        Priority::Screenshare
                    } else if Some(t.publisher) == dominant {
                        Priority::Speaker
                    } else {
                        Priority::Other
                    };
                    let layers = if screen { layers } else { camera_steps(layers) };
                    keys.push(*t);
                    let settling = out.flowing_since.is_some_and(|(since, started_on)| {
                        now.saturating_duration_since(since) < SETTLING
                            && (working as f64) < started_on as f64 * UP_FRACTION
                    });
                    demands.push(Demand {
                        priority,
                        layers,
                        cap: out.cap,
                        now: out.allocated,
                        settling,
                    });
                }
                TrackKind::Video => {}
            }
        }
        // Audio is reserved off the top, but only what is forwarded: where only the loudest
        // `audio_loudest_n` are (a large conference), the n costliest of them.
        let loudest_only = self.config.audio_loudest_n > 0
            && self
                .speakers
                .get(&peer.conference)
                .is_some_and(|d| d.len() > self.config.audio_loudest_above);
        if loudest_only {
            audio.sort_unstable_by(|a, b| b.cmp(a));
            audio.truncate(self.config.audio_loudest_n);
        }
        let reserved: u64 = audio.iter().sum();
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        let choices = peer
            .allocator
            .decide(estimate, loss, reserved, &demands, now);
        let mut notices: Vec<PauseNotice> = Vec::new();
        for ((t, d), choice) in keys.iter().zip(&demands).zip(&choices) {
            let Some(out) = peer.out.get_mut(t) else {
                continue;
            };
            let paused = match *choice {
                Some(step) => {
                    if out.allocated != Now::Layer(step) {
                        debug!(%id, publisher = %t.publisher, mid = %t.mid, estimate, ?loss, reserved,
                            rank = step.rank, tid = step.tid, steps = ?d.layers, "video allocated");
                    }
                    if out.allocated.is_unstarted() {
                        out.flowing_since = Some((now, working));
                    }
                    out.allocated = Now::Layer(step);
                    false
                }
                None if out.allocated.is_unstarted() && out.layers.target().is_none() => {
                    // Never started: it starts when it fits, with nothing to resume.
                    out.allocated = Now::Waiting;
                    out.flowing_since = None;
                    true
                }
                None => {
                    out.flowing_since = None;
                    if out.allocated != Now::Paused {
                        out.allocated = Now::Paused;
                        // Resuming starts afresh on a keyframe, continuing the sequence
                        // numbers where the pause left them.
                        out.layers = LayerSelector::default();
                        out.svc.restart();
                        out.rewriter.resume();
                        out.vp8_ids.resume();
                    }
                    true
                }
            };
            if paused != d.now.is_held() {
                debug!(%id, publisher = %t.publisher, mid = %t.mid, estimate, paused, "video");
                // A pause is told at once; flowing again, with its first packet forwarded
                // (`fanout`): until its keyframe crosses, the picture would stand still.
                out.resume_untold = !paused;
                if paused {
                    notices.push(PauseNotice::new(&out.stream_id, &out.track_id, true));
                }
            }
        }
        // Probe toward what the screens want. (Asking for that over the share of the
        // estimate climbing may use was tried: the estimate swung more, and 50 subscribers
        // on 3 Mbit/s links sometimes never reached the top layer in 8 s.)
        let round = |bps: u64| bps.div_ceil(PROBE_STEP_BPS) * PROBE_STEP_BPS;
        let wanted = reserved + demands.iter().map(Demand::wanted_bps).sum::<u64>();
        let mut desired = round(wanted);
        // The minimum is what is allocated plus the cheapest step up: str0m pads up to it
        // (never above the estimate), so the estimate can grow toward that step even while
        // the media sent is less. Without it, a subscriber whose videos are all paused sends
        // the estimator nothing to measure, and the estimate never rises again.
        let allocated = reserved + allocate::cost(&demands, &choices);
        // Padding into a congested link only loses more of the media: no step then.
        let step = match peer.allocator.congested(loss) {
            true => 0,
            false => allocate::next_step(&demands, &choices).unwrap_or(0),
        };
        let minimum = round(allocated + step).min(desired);
        // The estimator probes when the desired rate rises above the estimate, not again
        // while it stays the same: a subscriber held below what it wants (paused, or on a
        // lower layer) would never find out that its link widened. So every PROBE_INTERVAL
        // the desired rate dips to the estimate for one round and rises back, which asks for
        // another probe.
        let constrained = round(allocated) < round(wanted) && estimate < desired;
        if peer.stall.stalled(constrained, loss, now) {
            // str0m's estimator locked itself (forward::stall): start it again from here.
            info!(shard = self.index, %id, conference = %peer.conference, estimate, "bandwidth estimate stuck while holding the subscriber back: estimator restarted");
            let blamed = self.current.replace(id);
            peer.rtc.bwe().reset(Bitrate::bps(estimate));
            self.current = blamed;
            peer.probing = (0, 0);
            self.counters.estimator_restarts += 1;
        }
        if peer.probe_dip {
            peer.probe_dip = false;
            peer.probed_at = now;
        } else if constrained && now.saturating_duration_since(peer.probed_at) >= PROBE_INTERVAL {
            peer.probe_dip = true;
            desired = round(estimate).min(desired);
        }
        for notice in notices {
            self.send_notice(id, notice);
        }
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        if peer.probing != (minimum, desired) {
            debug!(%id, minimum, desired, estimate, constrained, "estimator asked to probe toward");
            peer.probing = (minimum, desired);
            let blamed = self.current.replace(id);
            peer.rtc
                .bwe()
                .set_bitrate(Bitrate::bps(minimum), Bitrate::bps(desired));
            self.current = blamed;
            self.mark_dirty(id);
        }
    }
}
