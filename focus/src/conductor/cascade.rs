//! Cascading: trunks between the foci of one conference (docs/cascading.md).
//!
//! A trunk is a call leg to another focus, carried by the same to-device call protocol and a
//! data channel. The conductor keeps it as a participant whose leg says `trunk`; this file
//! holds what only trunks have:
//! - **who dials**: for each pair of foci named in a conference's member devices, the one with
//!   the lower (user, device) sends the invite, so glare between foci cannot happen; a lost
//!   trunk is redialled with backoff while both foci still serve the conference;
//! - **the catalogue**: every local participant's streams (real owners, purpose, mute, tracks),
//!   sent to each trunk as a full `m.call.sdp_stream_metadata_changed` map when it changes;
//! - **pulling**: over each trunk's data channel, an `m.call.track_subscription` for exactly the
//!   far tracks that some local participant watches, at the largest size any of them asked
//!   for: one copy per track per trunk, however many local subscribers watch it.
//!
//! The media plane's origin rule (a track that arrived on a trunk is never sent onto another)
//! keeps a full mesh of foci loop-free, so every stream crosses exactly one trunk.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::json;
use tracing::{debug, info};
use weir_sfu::{Command, PeerId};
use weir_signalling::room::FocusRef;
use weir_signalling::{
    CallId, ConfId, DeviceId, Leg, LegCommand, RoomId, SdpStreamMetadata, UserId,
};

use super::{Conductor, LegSender, MediaPlane, Participant};

/// First redial delay after a trunk is lost; doubled per failed attempt up to
/// [`REDIAL_MAX`]. Short, so far participants see the streams again within seconds of a
/// media path coming back; the doubling keeps a dead far focus from being dialled in a loop.
const REDIAL_MIN: Duration = Duration::from_secs(1);
/// Longest redial delay: a far focus that comes back is reached within this long.
const REDIAL_MAX: Duration = Duration::from_secs(30);

/// What the conductor keeps per trunk beyond its participant entry.
#[derive(Debug, Default)]
pub(super) struct Trunk {
    /// We sent the invite (we run full ICE and need the far candidates).
    dialled: bool,
    /// The data channel is open: subscriptions can be sent.
    channel_open: bool,
    /// Far tracks we asked for over this trunk, with each height our subscribers display them
    /// at (`None`: no size given, the best layer).
    pulled: BTreeMap<(String, String), BTreeSet<Option<u32>>>,
    /// The catalogue last sent to the far focus (a full map; only re-sent when it changes).
    sent_catalogue: Option<SdpStreamMetadata>,
    /// Tracks that arrived on this trunk and are live.
    tracks_in: usize,
}

/// A trunk to redial once its time comes.
#[derive(Debug)]
struct Redial {
    at: Instant,
    backoff: Duration,
}

/// Cascade state of the conductor.
#[derive(Debug, Default)]
pub(super) struct Cascade {
    trunks: HashMap<PeerId, Trunk>,
    /// The foci of each conference, from room state.
    foci: HashMap<(RoomId, ConfId), Vec<FocusRef>>,
    /// Trunks we owe a dial, by (conference, far focus user, far focus device).
    redial: HashMap<(RoomId, ConfId, UserId, DeviceId), Redial>,
    next_call: u64,
}

impl Cascade {
    pub(super) fn is_trunk(&self, peer: PeerId) -> bool {
        self.trunks.contains_key(&peer)
    }

    pub(super) fn dialled(&self, peer: PeerId) -> bool {
        self.trunks.get(&peer).is_some_and(|t| t.dialled)
    }

    /// A far focus dialled us and we accepted.
    pub(super) fn answered_trunk(&mut self, peer: PeerId) {
        self.trunks.insert(peer, Trunk::default());
    }

    pub(super) fn track_arrived(&mut self, peer: PeerId) {
        if let Some(t) = self.trunks.get_mut(&peer) {
            t.tracks_in += 1;
        }
    }

    /// Returns true if `peer` is a trunk (a track that arrived on it is gone).
    pub(super) fn track_left(&mut self, peer: PeerId) -> bool {
        match self.trunks.get_mut(&peer) {
            Some(t) => {
                t.tracks_in = t.tracks_in.saturating_sub(1);
                true
            }
            None => false,
        }
    }
}

impl<L: LegSender, M: MediaPlane> Conductor<L, M> {
    fn me_is(&self, f: &FocusRef) -> bool {
        f.user_id == self.own_user && f.device_id.as_str() == self.own_party
    }

    /// Lower (user, device) dials.
    fn we_dial(&self, f: &FocusRef) -> bool {
        (self.own_user.as_str(), self.own_party.as_str())
            < (f.user_id.as_str(), f.device_id.as_str())
    }

    /// Room state says the foci of a conference changed.
    pub(super) fn foci_changed(&mut self, room: RoomId, conf: ConfId, foci: Vec<FocusRef>) {
        let key = (room, conf);
        if foci.is_empty() {
            self.cascade.foci.remove(&key);
        } else {
            self.cascade.foci.insert(key.clone(), foci);
        }
        self.reconcile(&key, Instant::now());
    }

    /// Make the trunks of a conference match its foci: while we and a far focus both serve it,
    /// a trunk exists (dialled by the lower of the two); otherwise none.
    fn reconcile(&mut self, key: &(RoomId, ConfId), now: Instant) {
        let foci = self.cascade.foci.get(key).cloned().unwrap_or_default();
        let serving = foci.iter().any(|f| self.me_is(f));
        let far: Vec<FocusRef> = foci.iter().filter(|f| !self.me_is(f)).cloned().collect();
        // Trunks to foci that no longer serve the conference (or when we no longer do) end.
        let existing: Vec<(PeerId, UserId, DeviceId)> = self
            .conferences
            .get(key)
            .map(|c| {
                c.members
                    .iter()
                    .filter(|(_, p)| self.cascade.is_trunk(**p))
                    .map(|((u, d), p)| (*p, u.clone(), d.clone()))
                    .collect()
            })
            .unwrap_or_default();
        for (peer, user, device) in &existing {
            let wanted = serving
                && far
                    .iter()
                    .any(|f| &f.user_id == user && &f.device_id == device);
            if !wanted {
                info!(%peer, focus = %user, "trunk no longer needed: hanging up");
                self.end(*peer, "member_gone", true);
            }
        }
        self.cascade.redial.retain(|(r, c, u, d), _| {
            !(r == &key.0 && c == &key.1)
                || (serving && far.iter().any(|f| &f.user_id == u && &f.device_id == d))
        });
        if !serving {
            return;
        }
        for f in far {
            if !self.we_dial(&f) {
                continue;
            }
            let have = self.conferences.get(key).is_some_and(|c| {
                c.members
                    .contains_key(&(f.user_id.clone(), f.device_id.clone()))
            });
            let owed = self.cascade.redial.get(&(
                key.0.clone(),
                key.1.clone(),
                f.user_id.clone(),
                f.device_id.clone(),
            ));
            if have || owed.is_some_and(|r| r.at > now) {
                continue;
            }
            let kind = if owed.is_some() { "redial" } else { "first" };
            self.metrics.trunk_dials.with_label_values(&[kind]).inc();
            self.dial(key, &f);
        }
    }

    /// Dial `f` for conference `key`.
    fn dial(&mut self, key: &(RoomId, ConfId), f: &FocusRef) {
        self.cascade.next_call += 1;
        let call_id = CallId::from(format!(
            "weir-trunk-{}-{}-{}",
            self.own_party,
            std::process::id(),
            self.cascade.next_call
        ));
        let leg = Leg {
            room_id: key.0.clone(),
            conf_id: key.1.clone(),
            call_id,
            user_id: f.user_id.clone(),
            device_id: f.device_id.clone(),
            party_id: f.device_id.as_str().into(),
            session_id: f.session_id.clone(),
            trunk: true,
        };
        let next_conference = &mut self.next_conference;
        let conf = self.conferences.entry(key.clone()).or_insert_with(|| {
            let id = weir_sfu::ConferenceId(*next_conference);
            *next_conference += 1;
            super::Conference::new(id)
        });
        let peer = PeerId(self.next_peer);
        self.next_peer += 1;
        conf.members
            .insert((f.user_id.clone(), f.device_id.clone()), peer);
        let conference = conf.id;
        info!(%peer, focus = %f.user_id, device = %f.device_id, conf = %key.1, "dialling a trunk");
        self.participants.insert(
            peer,
            Participant {
                leg,
                conference: key.clone(),
                metadata: SdpStreamMetadata::new(),
                invite_at: Instant::now(),
                answered: false,
                subscriptions: BTreeMap::new(),
                channel_open: false,
            },
        );
        self.cascade.trunks.insert(
            peer,
            Trunk {
                dialled: true,
                ..Trunk::default()
            },
        );
        self.refresh_gauges();
        self.media_command(peer, Command::DialTrunk { peer, conference });
    }

    /// The media plane made our trunk offer: send the invite.
    pub(super) fn trunk_offer(&mut self, peer: PeerId, sdp: String) {
        let Some(p) = self.participants.get(&peer) else {
            return;
        };
        let leg = p.leg.clone();
        let metadata = self.catalogue(&p.conference);
        if let Some(t) = self.cascade.trunks.get_mut(&peer) {
            t.sent_catalogue = Some(metadata.clone());
        }
        self.legs.send(LegCommand::Invite { leg, sdp, metadata });
    }

    /// The far focus answered our trunk invite.
    pub(super) fn trunk_answered(&mut self, leg: Leg, sdp: String, metadata: SdpStreamMetadata) {
        let Some(peer) = self.find_leg(&leg) else {
            debug!(call = %leg.call_id, "answer for a trunk we no longer have");
            return;
        };
        if let Some(p) = self.participants.get_mut(&peer) {
            p.answered = true;
        }
        self.trunk_catalogue(peer, metadata);
        self.media_command(peer, Command::RemoteAnswer { peer, sdp });
    }

    /// The data channel of a peer opened: a trunk can now be told what we pull.
    pub(super) fn channel_open(&mut self, peer: PeerId) {
        let Some(t) = self.cascade.trunks.get_mut(&peer) else {
            return;
        };
        t.channel_open = true;
        t.pulled.clear(); // nothing was asked on this channel yet
        if let Some(key) = self.participants.get(&peer).map(|p| p.conference.clone()) {
            self.sync_trunk_subscriptions(&key);
        }
    }

    /// The far focus's full catalogue of its local streams (owners already checked by
    /// signalling). Replaces the trunk's description; changed streams are relayed to local
    /// subscribers that have them, and what we pull is re-derived.
    pub(super) fn trunk_catalogue(&mut self, peer: PeerId, metadata: SdpStreamMetadata) {
        let Some(p) = self.participants.get_mut(&peer) else {
            return;
        };
        let mut changed = SdpStreamMetadata::new();
        for (id, m) in &metadata {
            if p.metadata.get(id) != Some(m) {
                changed.insert(id.clone(), m.clone());
            }
        }
        p.metadata = metadata;
        let key = p.conference.clone();
        if let Some(conf) = self.conferences.get_mut(&key) {
            for (id, m) in &changed {
                if conf.streams.contains_key(id.as_str()) {
                    conf.streams.insert(id.as_str().to_string(), m.clone());
                }
            }
        }
        if !changed.is_empty() {
            self.relay_metadata(peer, &changed);
            self.tell_screens(peer, false);
        }
        // Far streams added or gone (announce_streams sends only what changed).
        self.announce_streams(&key);
        self.sync_trunk_subscriptions(&key);
    }

    /// Every local participant's streams in a conference, with their real owners: what the far
    /// foci may pull. Streams with no known track yet are left out.
    pub(super) fn catalogue(&self, key: &(RoomId, ConfId)) -> SdpStreamMetadata {
        let mut out = SdpStreamMetadata::new();
        let Some(conf) = self.conferences.get(key) else {
            return out;
        };
        for peer in conf.members.values() {
            let Some(p) = self.participants.get(peer) else {
                continue;
            };
            if p.leg.trunk {
                continue;
            }
            for (id, m) in &p.metadata {
                if !m.tracks.is_empty() {
                    out.insert(id.clone(), m.clone());
                }
            }
        }
        out
    }

    /// What we describe to a peer in answers and offers: a participant gets the streams
    /// forwarded to it; a trunk gets our whole catalogue (which covers everything forwarded to
    /// it, since only local tracks go onto trunks).
    pub(super) fn metadata_for(&self, peer: PeerId) -> SdpStreamMetadata {
        match self.participants.get(&peer) {
            Some(p) if p.leg.trunk => {
                let mut m = self.catalogue(&p.conference);
                for (id, s) in self.subscriber_metadata(peer) {
                    m.entry(id).or_insert(s);
                }
                m
            }
            _ => self.subscriber_metadata(peer),
        }
    }

    /// Send the catalogue to every trunk of the conference whose copy is out of date.
    pub(super) fn publish_catalogue(&mut self, key: &(RoomId, ConfId)) {
        self.announce_streams(key);
        let trunks = self.trunks_of(key);
        if trunks.is_empty() {
            return;
        }
        let catalogue = self.catalogue(key);
        for peer in trunks {
            let Some(t) = self.cascade.trunks.get_mut(&peer) else {
                continue;
            };
            if t.sent_catalogue.as_ref() == Some(&catalogue) {
                continue;
            }
            let Some(p) = self.participants.get(&peer) else {
                continue;
            };
            if !p.answered {
                continue; // the answer or invite carries it
            }
            t.sent_catalogue = Some(catalogue.clone());
            self.metrics.metadata_relayed.inc();
            self.legs.send(LegCommand::MetadataChanged {
                leg: p.leg.clone(),
                metadata: catalogue.clone(),
            });
        }
    }

    fn trunks_of(&self, key: &(RoomId, ConfId)) -> Vec<PeerId> {
        self.conferences
            .get(key)
            .map(|c| {
                c.members
                    .values()
                    .copied()
                    .filter(|p| self.cascade.is_trunk(*p))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Ask each trunk of the conference for exactly the far tracks a local participant
    /// watches: a participant without an explicit subscription watches everything (as it
    /// would on one focus); the height asked is the largest any watcher asked for (none = no
    /// cap). Sent only when it changed, and only once the trunk's data channel is open.
    pub(super) fn sync_trunk_subscriptions(&mut self, key: &(RoomId, ConfId)) {
        let trunks = self.trunks_of(key);
        if trunks.is_empty() {
            return;
        }
        let locals: Vec<PeerId> = self
            .conferences
            .get(key)
            .map(|c| {
                c.members
                    .values()
                    .copied()
                    .filter(|p| !self.cascade.is_trunk(*p))
                    .collect()
            })
            .unwrap_or_default();
        for trunk in trunks {
            let Some(tp) = self.participants.get(&trunk) else {
                continue;
            };
            // Per far track, every size a local subscriber displays it at: the far focus sends
            // one layer per size, so each local subscriber can get the layer that fits.
            let mut want: BTreeMap<(String, String), BTreeSet<Option<u32>>> = BTreeMap::new();
            for (sid, stream) in &tp.metadata {
                for tid in stream.tracks.keys() {
                    let k = (sid.as_str().to_string(), tid.as_str().to_string());
                    for l in &locals {
                        let Some(lp) = self.participants.get(l) else {
                            continue;
                        };
                        if lp.subscriptions.is_empty() {
                            want.entry(k.clone()).or_default().insert(None);
                        } else if let Some(sizes) = lp.subscriptions.get(&k) {
                            // A participant's largest size is the one it receives.
                            let h = sizes.iter().max_by_key(|h| h.unwrap_or(u32::MAX));
                            want.entry(k.clone()).or_default().extend(h.copied());
                        }
                    }
                }
            }
            let Some(t) = self.cascade.trunks.get_mut(&trunk) else {
                continue;
            };
            if !t.channel_open || t.pulled == want {
                continue;
            }
            let unsubscribe: Vec<_> = t
                .pulled
                .keys()
                .filter(|k| !want.contains_key(*k))
                .map(|(s, tr)| json!({"stream_id": s, "track_id": tr}))
                .collect();
            let subscribe: Vec<_> = want
                .iter()
                .flat_map(|((s, tr), sizes)| {
                    sizes.iter().map(move |h| match h {
                        Some(h) => json!({"stream_id": s, "track_id": tr, "height": h}),
                        None => json!({"stream_id": s, "track_id": tr}),
                    })
                })
                .collect();
            debug!(%trunk, pulled = want.len(), "trunk subscription");
            t.pulled = want;
            let text = json!({"type": "m.call.track_subscription",
                "content": {"subscribe": subscribe, "unsubscribe": unsubscribe}})
            .to_string();
            let _ = self.media.command(Command::SendData { peer: trunk, text });
        }
    }

    /// A trunk ended (hangup, media loss, far focus gone): owe a redial if we are the dialling
    /// side and both foci still serve the conference.
    pub(super) fn trunk_gone(&mut self, peer: PeerId, leg: &Leg) {
        self.cascade.trunks.remove(&peer);
        self.refresh_trunk_gauges();
        let key = (leg.room_id.clone(), leg.conf_id.clone());
        let still = self.cascade.foci.get(&key).is_some_and(|foci| {
            foci.iter().any(|f| self.me_is(f))
                && foci
                    .iter()
                    .any(|f| f.user_id == leg.user_id && f.device_id == leg.device_id)
        });
        let f = FocusRef {
            user_id: leg.user_id.clone(),
            device_id: leg.device_id.clone(),
            session_id: leg.session_id.clone(),
        };
        if !still || !self.we_dial(&f) {
            return;
        }
        let rk = (
            key.0.clone(),
            key.1.clone(),
            leg.user_id.clone(),
            leg.device_id.clone(),
        );
        let backoff = self
            .cascade
            .redial
            .get(&rk)
            .map_or(REDIAL_MIN, |r| (r.backoff * 2).min(REDIAL_MAX));
        info!(focus = %leg.user_id, in_s = backoff.as_secs_f64(), "trunk lost: redialling");
        self.cascade.redial.insert(
            rk,
            Redial {
                at: Instant::now() + backoff,
                backoff,
            },
        );
    }

    /// Periodic work: redials that are due. A redial that connects is forgotten once the trunk
    /// has carried media for a while (its backoff then starts over).
    pub fn tick(&mut self, now: Instant) {
        let due: HashSet<(RoomId, ConfId)> = self
            .cascade
            .redial
            .iter()
            .filter(|(_, r)| r.at <= now)
            .map(|((r, c, _, _), _)| (r.clone(), c.clone()))
            .collect();
        for key in due {
            self.reconcile(&key, now);
        }
        // Trunks that connected and carry tracks reset their backoff.
        let healthy: Vec<(RoomId, ConfId, UserId, DeviceId)> = self
            .cascade
            .trunks
            .iter()
            .filter(|(_, t)| t.tracks_in > 0 || t.channel_open)
            .filter_map(|(p, _)| self.participants.get(p))
            .map(|p| {
                (
                    p.leg.room_id.clone(),
                    p.leg.conf_id.clone(),
                    p.leg.user_id.clone(),
                    p.leg.device_id.clone(),
                )
            })
            .collect();
        for k in healthy {
            if self.cascade.redial.get(&k).is_some_and(|r| r.at <= now) {
                self.cascade.redial.remove(&k);
            }
        }
    }

    pub(super) fn refresh_trunk_gauges(&self) {
        let (mut dialled, mut answered, mut tracks_in, mut tracks_out) = (0, 0, 0, 0);
        for (peer, t) in &self.cascade.trunks {
            if t.dialled {
                dialled += 1;
            } else {
                answered += 1;
            }
            tracks_in += t.tracks_in as i64;
            tracks_out += self.forwarded.get(peer).map_or(0, |f| f.len()) as i64;
        }
        let m = &self.metrics;
        m.trunks.with_label_values(&["dialled"]).set(dialled);
        m.trunks.with_label_values(&["answered"]).set(answered);
        m.trunk_tracks.with_label_values(&["in"]).set(tracks_in);
        m.trunk_tracks.with_label_values(&["out"]).set(tracks_out);
    }
}
