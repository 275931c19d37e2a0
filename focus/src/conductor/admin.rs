//! The conductor's side of the admin API (`crate::admin`): what it knows of conferences and
//! participants, and ending them. Requests come through the conductor's event loop, so they
//! see and change the one copy of that state.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::oneshot;
use weir_sfu::PeerId;

use super::{Conductor, DrainStatus, LegSender, MediaPlane};

/// A request from the admin API, answered on its `reply`.
#[derive(Debug)]
pub enum AdminRequest {
    /// Conferences with their participants (the media plane's view is added by the caller).
    List { reply: oneshot::Sender<AdminReply> },
    /// Hang up one participant (or trunk).
    EndParticipant {
        peer: PeerId,
        reply: oneshot::Sender<AdminReply>,
    },
    /// Hang up everyone in a conference.
    EndConference {
        id: u64,
        reply: oneshot::Sender<AdminReply>,
    },
    /// Start draining (or move its deadline), ending at most `within` from now.
    Drain {
        within: Duration,
        reply: oneshot::Sender<AdminReply>,
    },
}

/// A JSON body, and whether what was named existed.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminReply {
    pub found: bool,
    pub body: Value,
}

impl<L: LegSender, M: MediaPlane> Conductor<L, M> {
    pub fn admin(&mut self, req: AdminRequest, now: Instant) {
        match req {
            AdminRequest::List { reply } => {
                let _ = reply.send(AdminReply {
                    found: true,
                    body: self.admin_list(now),
                });
            }
            AdminRequest::EndParticipant { peer, reply } => {
                let found = self.participants.contains_key(&peer);
                if found {
                    self.end(peer, "ended_by_operator", true);
                }
                let _ = reply.send(AdminReply {
                    found,
                    body: json!({"ended": if found { 1 } else { 0 }}),
                });
            }
            AdminRequest::EndConference { id, reply } => {
                let peers: Vec<PeerId> = self
                    .conferences
                    .values()
                    .filter(|c| c.id.0 == id)
                    .flat_map(|c| c.members.values().copied())
                    .collect();
                let found = self.conferences.values().any(|c| c.id.0 == id);
                for p in &peers {
                    self.end(*p, "ended_by_operator", true);
                }
                let _ = reply.send(AdminReply {
                    found,
                    body: json!({"ended": peers.len()}),
                });
            }
            AdminRequest::Drain { within, reply } => {
                self.start_drain(now, now + within);
                let _ = reply.send(AdminReply {
                    found: true,
                    body: drain_json(self.drain_status(now)),
                });
            }
        }
    }

    fn admin_list(&self, now: Instant) -> Value {
        let mut conferences: Vec<Value> = self
            .conferences
            .iter()
            .map(|((room, conf), c)| {
                let mut members: Vec<(&PeerId, &super::Participant)> = c
                    .members
                    .values()
                    .filter_map(|p| self.participants.get(p).map(|x| (p, x)))
                    .collect();
                members.sort_by_key(|(p, _)| **p);
                json!({
                    "id": c.id.0,
                    "room_id": room.as_str(),
                    "conf_id": conf.as_str(),
                    "speaking": c.speaking,
                    "participants": members.iter().map(|(peer, p)| json!({
                        "peer": peer.0,
                        "user_id": p.leg.user_id.as_str(),
                        "device_id": p.leg.device_id.as_str(),
                        "call_id": p.leg.call_id.as_str(),
                        "trunk": p.leg.trunk,
                        "answered": p.answered,
                        "data_channel": p.channel_open,
                        "seconds": now.saturating_duration_since(p.invite_at).as_secs(),
                        "streams": p.metadata.len(),
                        "subscriptions": p.subscriptions.len(),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        conferences.sort_by_key(|c| c["id"].as_u64());
        json!({
            "draining": drain_json(self.drain_status(now)),
            "conferences": conferences,
        })
    }
}

fn drain_json(s: Option<DrainStatus>) -> Value {
    match s {
        None => Value::Null,
        Some(s) => json!({
            "conferences": s.conferences,
            "participants": s.participants,
            "seconds_left": s.left.as_secs(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{join, leg, setup};
    use super::*;
    use weir_signalling::LegCommand;

    fn ask(
        c: &mut Conductor<super::super::tests::Rec, super::super::tests::Rec>,
        make: impl FnOnce(oneshot::Sender<AdminReply>) -> AdminRequest,
    ) -> AdminReply {
        let (tx, mut rx) = oneshot::channel();
        c.admin(make(tx), Instant::now());
        rx.try_recv().expect("answered at once")
    }

    #[test]
    fn the_list_shows_each_conference_with_its_participants() {
        let (mut c, rec) = setup();
        join(&mut c, &rec, &leg("@alice:hs", "A", "c1"), "sa");
        join(&mut c, &rec, &leg("@bob:hs", "B", "c2"), "sb");
        let r = ask(&mut c, |reply| AdminRequest::List { reply });
        let confs = r.body["conferences"].as_array().unwrap();
        assert_eq!(confs.len(), 1);
        let people: Vec<&str> = confs[0]["participants"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["user_id"].as_str().unwrap())
            .collect();
        assert_eq!(people, ["@alice:hs", "@bob:hs"]);
        assert_eq!(confs[0]["participants"][0]["answered"], true);
        assert_eq!(r.body["draining"], Value::Null);
    }

    #[test]
    fn ending_a_participant_hangs_up_that_one_only() {
        let (mut c, rec) = setup();
        let alice = join(&mut c, &rec, &leg("@alice:hs", "A", "c1"), "sa");
        join(&mut c, &rec, &leg("@bob:hs", "B", "c2"), "sb");
        rec.take_legs();
        let r = ask(&mut c, |reply| AdminRequest::EndParticipant {
            peer: alice,
            reply,
        });
        assert!(r.found);
        let hung: Vec<String> = rec
            .take_legs()
            .into_iter()
            .filter_map(|l| match l {
                LegCommand::Hangup { leg, .. } => Some(leg.user_id.to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(hung, ["@alice:hs"]);
        assert_eq!(c.participant_count(), 1);
        let r = ask(&mut c, |reply| AdminRequest::EndParticipant {
            peer: alice,
            reply,
        });
        assert!(!r.found, "already gone");
    }

    #[test]
    fn ending_a_conference_hangs_up_everyone_in_it() {
        let (mut c, rec) = setup();
        join(&mut c, &rec, &leg("@alice:hs", "A", "c1"), "sa");
        join(&mut c, &rec, &leg("@bob:hs", "B", "c2"), "sb");
        let list = ask(&mut c, |reply| AdminRequest::List { reply });
        let id = list.body["conferences"][0]["id"].as_u64().unwrap();
        let r = ask(&mut c, |reply| AdminRequest::EndConference { id, reply });
        assert!(r.found);
        assert_eq!(r.body["ended"], 2);
        assert_eq!(c.participant_count(), 0);
        let r = ask(&mut c, |reply| AdminRequest::EndConference {
            id: 999,
            reply,
        });
        assert!(!r.found);
    }
}
