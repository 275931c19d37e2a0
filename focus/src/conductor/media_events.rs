//! What the media plane reports (`SfuEvent`): answers, offers and candidates for the call
//! legs, published tracks, speakers, and legs the media plane ended.

use tracing::{debug, info, warn};
use weir_sfu::{CloseReason, SfuEvent, TrackKind};
use weir_signalling::{Candidate, LegCommand, SdpType, StreamId, TrackId, TrackMetadata};

use super::{leg_span, owned_stream, to_candidate, Conductor, LegSender, MediaPlane};

impl<L: LegSender, M: MediaPlane> Conductor<L, M> {
    /// An event from the media plane (media → signalling).
    pub fn on_sfu_event(&mut self, event: SfuEvent) {
        let span = event
            .peer()
            .and_then(|peer| Some(leg_span(&self.participants.get(&peer)?.leg, Some(peer))))
            .unwrap_or_else(tracing::Span::none);
        let _in = span.enter();
        match event {
            SfuEvent::PeerCreated {
                peer,
                answer,
                candidates,
            } => {
                let Some(p) = self.participants.get_mut(&peer) else {
                    return;
                };
                p.answered = true;
                let leg = p.leg.clone();
                let elapsed = p.invite_at.elapsed();
                let metadata = self.metadata_for(peer);
                self.legs.send(LegCommand::Answer {
                    leg: leg.clone(),
                    sdp: answer,
                    metadata,
                });
                self.metrics.invite_to_answer.observe(elapsed.as_secs_f64());
                let mut cands: Vec<Candidate> = candidates.into_iter().map(to_candidate).collect();
                cands.push(Candidate::end_of_candidates());
                self.legs.send(LegCommand::Candidates {
                    leg,
                    candidates: cands,
                });
            }
            SfuEvent::PeerFailed { peer, error } => {
                warn!(%peer, %error, "could not set up media for the invite");
                self.metrics
                    .refused_legs
                    .with_label_values(&["bad_offer"])
                    .inc();
                self.end(peer, "bad_offer", true);
            }
            SfuEvent::Answer { peer, sdp } => {
                let Some(p) = self.participants.get(&peer) else {
                    return;
                };
                let leg = p.leg.clone();
                let metadata = self.metadata_for(peer);
                self.legs.send(LegCommand::Negotiate {
                    leg,
                    kind: SdpType::Answer,
                    sdp,
                    metadata,
                });
            }
            SfuEvent::Offer { peer, sdp, tracks } => {
                let Some(p) = self.participants.get(&peer) else {
                    return;
                };
                let leg = p.leg.clone();
                let conf_key = p.conference.clone();
                // Describe every stream in the offer; remember the descriptions so mute
                // changes and leaves can be described later.
                for t in &tracks {
                    let md = self.describe(t);
                    if let Some(conf) = self.conferences.get_mut(&conf_key) {
                        conf.streams.entry(t.stream_id.clone()).or_insert(md);
                    }
                }
                self.forwarded.insert(peer, tracks);
                self.refresh_trunk_gauges();
                let metadata = self.metadata_for(peer);
                self.legs.send(LegCommand::Negotiate {
                    leg,
                    kind: SdpType::Offer,
                    sdp,
                    metadata,
                });
            }
            SfuEvent::NegotiationFailed { peer, error } => {
                warn!(%peer, %error, "negotiation failed");
            }
            SfuEvent::Connected { peer } => debug!(%peer, "media connected"),
            SfuEvent::TrackPublished { peer, track } => {
                let Some(p) = self.participants.get_mut(&peer) else {
                    return;
                };
                let kind = match track.kind {
                    TrackKind::Audio => "audio",
                    TrackKind::Video => "video",
                };
                let sid = StreamId::from(track.stream_id.as_str());
                if p.leg.trunk {
                    // The far focus describes its streams in its catalogue; never claim the
                    // trunk's own identity as their owner.
                    self.cascade.track_arrived(peer);
                    self.refresh_trunk_gauges();
                    return;
                }
                let key = p.conference.clone();
                let entry = p
                    .metadata
                    .entry(sid)
                    .or_insert_with(|| owned_stream(&p.leg));
                entry
                    .tracks
                    .entry(TrackId::from(track.track_id.as_str()))
                    .or_insert(TrackMetadata {
                        kind: kind.into(),
                        width: None,
                        height: None,
                    });
                self.publish_catalogue(&key);
            }
            SfuEvent::TrackUnpublished { peer, mid } => {
                debug!(%peer, %mid, "track unpublished");
                if self.cascade.track_left(peer) {
                    self.refresh_trunk_gauges();
                }
            }
            SfuEvent::TrunkOffer { peer, sdp } => self.trunk_offer(peer, sdp),
            SfuEvent::ChannelOpen { peer } => {
                if let Some(p) = self.participants.get_mut(&peer) {
                    p.channel_open = true;
                }
                self.announce_streams_to(peer);
                self.channel_open(peer)
            }
            SfuEvent::Speakers {
                conference,
                dominant,
                speaking,
            } => self.speakers_changed(conference, dominant, speaking),
            SfuEvent::DataMessage { peer, text } => self.data_message(peer, &text),
            SfuEvent::PeerClosed { peer, reason } => {
                self.media.forget(peer);
                if self.participants.contains_key(&peer) {
                    let hangup_reason = match reason {
                        CloseReason::ConnectTimeout | CloseReason::Disconnected => "ice_failed",
                        CloseReason::Silent => "ice_timeout",
                        CloseReason::EngineError(_) => "unknown_error",
                        CloseReason::Requested => "user_hangup",
                    };
                    info!(%peer, ?reason, "media plane closed the leg");
                    self.forget_participant(peer, Some(hangup_reason), &format!("{reason:?}"));
                }
            }
        }
    }
}
