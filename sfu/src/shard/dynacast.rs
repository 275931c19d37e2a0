//! Dynacast: each participant publishing simulcast or scalable video is told which of its
//! layers anyone needs (`io.weir.layers` on its data channel, docs/data-channel.md), so it
//! stops encoding the rest. The rule is `forward::dynacast`; this file gathers what each
//! subscriber needs.

use std::time::Instant;

use str0m::media::Rid;
use tracing::debug;

use crate::forward::svc::spatial_rank;
use crate::forward::LayerDemand;
use crate::ids::PeerId;

use super::single_port::{Outgoing, ShardMessage};
use super::{EventSink, ShardCore, SpreadMessage, TrackKey};

/// The layers of one dynacast track and which of them anyone needs.
#[derive(Debug, Clone)]
pub(super) enum Dynacast {
    /// Simulcast: one encoding per layer, by rid, from the publisher's description.
    Rids(LayerDemand<Rid>),
    /// One scalable stream (VP9 or AV1 SVC): its spatial layers by index, smallest first,
    /// from the dependency descriptor's structure. Every layer below the best one needed
    /// stays on, so what the publisher encodes is always the smallest few.
    Spatial(LayerDemand<u8>),
}

/// What a publisher is told to encode of one track.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Encode {
    Rids(Vec<Rid>),
    /// How many spatial layers, from the smallest.
    Spatial(usize),
}

impl Dynacast {
    /// A scalable stream of `layers` spatial layers, all of them encoded.
    pub(super) fn spatial(layers: u8, now: Instant) -> Self {
        Dynacast::Spatial(LayerDemand::new(
            (0..layers).map(|s| (s, spatial_rank(s, layers))),
            now,
        ))
    }

    fn update(&mut self, caps: impl IntoIterator<Item = u8>, now: Instant) -> Option<Encode> {
        match self {
            Dynacast::Rids(d) => d.update(caps, now).map(|a| Encode::Rids(a.to_vec())),
            Dynacast::Spatial(d) => d.update(caps, now).map(|a| Encode::Spatial(a.len())),
        }
    }

    fn encode(&self) -> Encode {
        match self {
            Dynacast::Rids(d) => Encode::Rids(d.active().to_vec()),
            Dynacast::Spatial(d) => Encode::Spatial(d.active().len()),
        }
    }

    fn all_active(&self) -> bool {
        match self {
            Dynacast::Rids(d) => d.all_active(),
            Dynacast::Spatial(d) => d.all_active(),
        }
    }

    fn off(&self) -> usize {
        match self {
            Dynacast::Rids(d) => d.off(),
            Dynacast::Spatial(d) => d.off(),
        }
    }
}

impl<S: EventSink> ShardCore<S> {
    /// Housekeeping: work out, for every dynacast track, the layers its subscribers need, and
    /// tell publishers whose set changed. For a track whose publisher is on another shard of
    /// a spread conference, tell that shard what the subscribers here need.
    pub(super) fn update_dynacast(&mut self, now: Instant) {
        let mut notices: Vec<(TrackKey, Encode)> = Vec::new();
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
            if let Some(encode) = demand.update(caps.iter().copied(), now) {
                notices.push((*t, encode));
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
        for (t, encode) in notices {
            debug!(publisher = %t.publisher, mid = %t.mid, ?encode, "dynacast");
            self.tell_layers(&t, &encode);
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
        let told: Vec<(TrackKey, Encode)> = self
            .tracks
            .iter()
            .filter(|(t, _)| t.publisher == id)
            .filter_map(|(t, p)| Some((*t, p.dynacast.as_ref()?)))
            .filter(|(_, d)| !d.all_active())
            .map(|(t, d)| (t, d.encode()))
            .collect();
        for (t, encode) in told {
            self.tell_layers(&t, &encode);
        }
    }

    /// Send the publisher of `t` the layers to encode, if its data channel is open (until it
    /// opens, a publisher encodes every layer, and is told when it does).
    fn tell_layers(&mut self, t: &TrackKey, encode: &Encode) {
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
        let text = layers_notice(&p.stream_id, &p.track_id, &t.mid.to_string(), encode);
        self.send_data(t.publisher, &text);
    }
}

/// The `io.weir.layers` message telling a publisher which layers of one track to encode:
/// `active` rids for simulcast, `spatial_layers` for a scalable stream.
fn layers_notice(stream_id: &str, track_id: &str, mid: &str, encode: &Encode) -> String {
    let mut content = serde_json::json!({
        "stream_id": stream_id,
        "track_id": track_id,
        "mid": mid,
    });
    match encode {
        Encode::Rids(active) => {
            let active: Vec<String> = active.iter().map(|r| r.to_string()).collect();
            content["active"] = active.into();
        }
        Encode::Spatial(n) => content["spatial_layers"] = (*n).into(),
    }
    serde_json::json!({ "type": "io.weir.layers", "content": content }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_notice_names_rids_for_simulcast_and_a_layer_count_for_a_scalable_stream() {
        let rids: serde_json::Value = serde_json::from_str(&layers_notice(
            "s",
            "t",
            "1",
            &Encode::Rids(vec!["q".into(), "h".into()]),
        ))
        .unwrap();
        assert_eq!(rids["type"], "io.weir.layers");
        assert_eq!(rids["content"]["active"], serde_json::json!(["q", "h"]));
        assert!(rids["content"].get("spatial_layers").is_none());
        let svc: serde_json::Value =
            serde_json::from_str(&layers_notice("s", "t", "1", &Encode::Spatial(2))).unwrap();
        assert_eq!(svc["content"]["spatial_layers"], 2);
        assert_eq!(svc["content"]["mid"], "1");
        assert!(svc["content"].get("active").is_none());
    }

    #[test]
    fn a_scalable_stream_keeps_its_smallest_layers_on() {
        let t0 = Instant::now();
        let mut d = Dynacast::spatial(3, t0);
        let later = t0 + crate::forward::dynacast::LAYER_OFF_DELAY;
        // A 360-line tile (rank h) and a 180-line one: the top layer goes off.
        assert_eq!(d.update([3, 2], later), Some(Encode::Spatial(2)));
        assert_eq!(d.off(), 1);
        assert_eq!(d.update([3, 2, u8::MAX], later), Some(Encode::Spatial(3)));
        assert!(d.all_active());
        assert_eq!(d.update([], later), None, "each layer waits out its delay");
    }
}
