//! Dynacast: each participant publishing simulcast is told which of its layers anyone needs
//! (`io.weir.layers` on its data channel, docs/data-channel.md), so it stops encoding the
//! rest. The rule is `forward::dynacast`; this file gathers what each subscriber needs.

use std::time::Instant;

use str0m::media::Rid;
use tracing::debug;

use crate::ids::PeerId;

use super::single_port::{Outgoing, ShardMessage};
use super::{EventSink, ShardCore, SpreadMessage, TrackKey};

impl<S: EventSink> ShardCore<S> {
    /// Housekeeping: work out, for every dynacast track, the layers its subscribers need, and
    /// tell publishers whose set changed. For a track whose publisher is on another shard of
    /// a spread conference, tell that shard what the subscribers here need.
    pub(super) fn update_dynacast(&mut self, now: Instant) {
        let mut notices: Vec<(TrackKey, Vec<Rid>)> = Vec::new();
        let mut demands: Vec<(usize, TrackKey, Option<u8>)> = Vec::new();
        let mut caps: Vec<u8> = Vec::new();
        for (t, p) in &mut self.tracks {
            if p.dynacast.is_none() && !p.remote_dynacast {
                continue;
            }
            caps.clear();
            for sub in &p.subscribers {
                let Some(speer) = self.peers.get(sub) else {
                    continue;
                };
                let Some(out) = speer.out.get(t) else {
                    continue;
                };
                if out.trunk.is_some() {
                    // A far focus needs a layer for each size its participants watch.
                    caps.extend(
                        speer
                            .explicit
                            .iter()
                            .flatten()
                            .filter(|s| s.stream_id == p.stream_id && s.track_id == p.track_id)
                            .map(|s| s.max_rank()),
                    );
                } else {
                    // The size cap, not what allocation gives now: a subscriber held lower by
                    // its downlink still needs the layer its screen wants, to probe up to.
                    caps.push(out.cap);
                }
            }
            if let Some(home) = p.home {
                let cap = caps.iter().copied().max();
                if p.demand_sent != Some(cap) {
                    p.demand_sent = Some(cap);
                    demands.push((home, *t, cap));
                }
                continue;
            }
            caps.extend(p.demand_from.iter().map(|(_, cap)| *cap));
            let Some(demand) = p.dynacast.as_mut() else {
                continue;
            };
            if let Some(active) = demand.update(caps.iter().copied(), now) {
                notices.push((*t, active.to_vec()));
            }
        }
        for (home, track, cap) in demands {
            self.outgoing.push(Outgoing {
                to: Some(home),
                message: ShardMessage::Spread(SpreadMessage::Demand {
                    track,
                    shard: self.index,
                    cap,
                }),
            });
        }
        for (t, active) in notices {
            debug!(publisher = %t.publisher, mid = %t.mid, ?active, "dynacast");
            self.tell_layers(&t, &active);
        }
        self.counters.layers_off = self
            .tracks
            .values()
            .filter_map(|p| p.dynacast.as_ref())
            .map(|d| d.off() as u64)
            .sum();
    }

    /// The data channel of `id` opened: tell it about every layer switched off before.
    pub(super) fn tell_layers_on_open(&mut self, id: PeerId) {
        let told: Vec<(TrackKey, Vec<Rid>)> = self
            .tracks
            .iter()
            .filter(|(t, _)| t.publisher == id)
            .filter_map(|(t, p)| Some((*t, p.dynacast.as_ref()?)))
            .filter(|(_, d)| !d.all_active())
            .map(|(t, d)| (t, d.active().to_vec()))
            .collect();
        for (t, active) in told {
            self.tell_layers(&t, &active);
        }
    }

    /// Send the publisher of `t` the layers to encode, if its data channel is open (until it
    /// opens, a publisher encodes every layer, and is told when it does).
    fn tell_layers(&mut self, t: &TrackKey, active: &[Rid]) {
        let Some(p) = self.tracks.get(t) else {
            return;
        };
        if self
            .peers
            .get(&t.publisher)
            .is_none_or(|p| p.channel.is_none())
        {
            return;
        }
        let text = layers_notice(&p.stream_id, &p.track_id, &t.mid.to_string(), active);
        self.send_data(t.publisher, &text);
    }
}

/// The `io.weir.layers` message telling a publisher which layers of one track to encode.
fn layers_notice(stream_id: &str, track_id: &str, mid: &str, active: &[Rid]) -> String {
    let active: Vec<String> = active.iter().map(|r| r.to_string()).collect();
    serde_json::json!({
        "type": "io.weir.layers",
        "content": {
            "stream_id": stream_id,
            "track_id": track_id,
            "mid": mid,
            "active": active,
        },
    })
    .to_string()
}
