//! Graceful drain: the focus stops taking new conferences, lets the ones it has finish, and
//! stops when the last local participant has left or at a deadline, whichever comes first.
//! Participants joining a conference already here are still taken: a meeting in progress is
//! not split because its host is being replaced.

use std::time::{Duration, Instant};

use tracing::info;
use weir_signalling::{Leg, LegCommand};

use super::{Conductor, LegSender, MediaPlane};

/// A drain in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drain {
    pub since: Instant,
    pub deadline: Instant,
}

/// Where a drain stands, for the admin API and `/healthz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainStatus {
    pub conferences: usize,
    /// Local participants (trunks to other foci are not counted: they end with the last).
    pub participants: usize,
    pub left: Duration,
}

impl<L: LegSender, M: MediaPlane> Conductor<L, M> {
    /// Start draining, to end by `deadline` at the latest. A second call moves the deadline.
    pub fn start_drain(&mut self, now: Instant, deadline: Instant) {
        let since = self.draining.map_or(now, |d| d.since);
        self.draining = Some(Drain { since, deadline });
        self.metrics.draining.set(1);
        info!(
            conferences = self.conferences.len(),
            participants = self.local_participants(),
            deadline_s = deadline.saturating_duration_since(now).as_secs(),
            "draining: no new conferences"
        );
    }

    pub fn drain_status(&self, now: Instant) -> Option<DrainStatus> {
        let d = self.draining?;
        Some(DrainStatus {
            conferences: self.conferences.len(),
            participants: self.local_participants(),
            left: d.deadline.saturating_duration_since(now),
        })
    }

    /// Whether a drain has nothing left to wait for: the focus should stop.
    pub fn drained(&self) -> bool {
        self.draining.is_some() && self.local_participants() == 0
    }

    /// At the deadline, hang up whoever is left.
    pub fn drain_tick(&mut self, now: Instant) {
        let Some(d) = self.draining else {
            return;
        };
        if now >= d.deadline && !self.participants.is_empty() {
            info!(
                participants = self.local_participants(),
                "drain deadline reached: hanging up the rest"
            );
            let peers: Vec<_> = self.participants.keys().copied().collect();
            for peer in peers {
                self.end(peer, "drained", true);
            }
        }
    }

    /// While draining, an invite for a conference this focus does not have is refused (the
    /// caller is told the focus is busy). Returns whether it was.
    pub(super) fn refuse_while_draining(&mut self, leg: &Leg) -> bool {
        if self.draining.is_none()
            || self
                .conferences
                .contains_key(&(leg.room_id.clone(), leg.conf_id.clone()))
        {
            return false;
        }
        info!(user = %leg.user_id, device = %leg.device_id, conf = %leg.conf_id, "draining: invite for a new conference refused");
        self.metrics
            .refused_legs
            .with_label_values(&["draining"])
            .inc();
        self.legs.send(LegCommand::Hangup {
            leg: leg.clone(),
            reason: "user_busy".into(),
        });
        true
    }

    fn local_participants(&self) -> usize {
        self.participants.values().filter(|p| !p.leg.trunk).count()
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{join, leg, setup};
    use super::*;

    fn hangups(rec: &super::super::tests::Rec) -> Vec<(String, String)> {
        rec.take_legs()
            .into_iter()
            .filter_map(|c| match c {
                LegCommand::Hangup { leg, reason } => Some((leg.user_id.to_string(), reason)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn draining_refuses_a_new_conference_but_not_a_newcomer_to_a_running_one() {
        let (mut c, rec) = setup();
        let alice = leg("@alice:hs", "A", "c1");
        join(&mut c, &rec, &alice, "sa");
        let now = Instant::now();
        c.start_drain(now, now + Duration::from_secs(60));
        assert_eq!(c.metrics.draining.get(), 1);

        // Bob joins Alice's conference: taken.
        let bob = leg("@bob:hs", "B", "c2");
        join(&mut c, &rec, &bob, "sb");
        assert_eq!(c.participant_count(), 2);

        // Carol starts another conference: refused, told the focus is busy.
        let mut carol = leg("@carol:hs", "C", "c3");
        carol.conf_id = "another".into();
        rec.take_legs();
        c.on_leg_event(weir_signalling::LegEvent::Invite {
            leg: carol,
            sdp: "v=0".into(),
            metadata: Default::default(),
            lifetime_ms: None,
        });
        assert_eq!(
            hangups(&rec),
            vec![("@carol:hs".into(), "user_busy".into())]
        );
        assert_eq!(c.participant_count(), 2);
        assert_eq!(
            c.drain_status(now).map(|s| (s.conferences, s.participants)),
            Some((1, 2))
        );
        assert!(!c.drained());
    }

    #[test]
    fn the_drain_ends_when_the_last_leaves_and_nobody_is_cut_before_the_deadline() {
        let (mut c, rec) = setup();
        let alice = leg("@alice:hs", "A", "c1");
        let peer = join(&mut c, &rec, &alice, "sa");
        let now = Instant::now();
        c.start_drain(now, now + Duration::from_secs(60));
        rec.take_legs();
        c.drain_tick(now + Duration::from_secs(59));
        assert!(
            hangups(&rec).is_empty(),
            "nobody is cut before the deadline"
        );
        assert!(!c.drained());
        c.end(peer, "participant_hangup", false);
        assert!(c.drained(), "the last one left");
    }

    #[test]
    fn at_the_deadline_whoever_is_left_is_hung_up() {
        let (mut c, rec) = setup();
        let alice = leg("@alice:hs", "A", "c1");
        join(&mut c, &rec, &alice, "sa");
        let now = Instant::now();
        c.start_drain(now, now + Duration::from_secs(60));
        rec.take_legs();
        c.drain_tick(now + Duration::from_secs(60));
        assert_eq!(
            hangups(&rec),
            vec![("@alice:hs".into(), "user_hangup".into())]
        );
        assert!(c.drained());
    }
}
