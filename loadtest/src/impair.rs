//! Per-client network impairment applied inside the load tester, between a participant's
//! WebRTC engine and its UDP socket: random loss, a rate-limited bottleneck with a bounded
//! queue, fixed delay and jitter. Pure: time is passed in, randomness is seeded.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How a link misbehaves. The default is a perfect link.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Impairment {
    /// Probability of dropping each datagram, 0..=1.
    pub loss: f64,
    /// Fixed one-way delay added to every datagram.
    pub delay: Duration,
    /// Each datagram's delay varies uniformly by up to ± this (never below zero; order is kept,
    /// as on a real path without reordering).
    pub jitter: Duration,
    /// Bottleneck rate in bit/s; 0 = unlimited.
    pub rate_bps: u64,
}

impl Impairment {
    pub fn is_perfect(&self) -> bool {
        self.loss <= 0.0 && self.delay.is_zero() && self.jitter.is_zero() && self.rate_bps == 0
    }
}

/// Bottleneck queue depth before tail drop, as time at the bottleneck rate: like a home router's
/// buffer (larger adds delay under load, smaller drops earlier).
pub const QUEUE_LIMIT: Duration = Duration::from_millis(200);

/// Counters of one link direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkCounters {
    pub passed: u64,
    pub lost: u64,
    pub queue_drops: u64,
}

/// One direction of an impaired link, carrying items of type `T` (datagrams).
pub struct Link<T> {
    cfg: Impairment,
    rng: StdRng,
    queue: VecDeque<(Instant, T)>,
    /// When the bottleneck finishes sending what is queued.
    busy_until: Option<Instant>,
    last_release: Option<Instant>,
    pub counters: LinkCounters,
}

impl<T> Link<T> {
    pub fn new(cfg: Impairment, seed: u64) -> Self {
        Link {
            cfg,
            rng: StdRng::seed_from_u64(seed),
            queue: VecDeque::new(),
            busy_until: None,
            last_release: None,
            counters: LinkCounters::default(),
        }
    }

    /// A perfect link passes everything at once; callers skip the queue (and the copy).
    pub fn is_perfect(&self) -> bool {
        self.cfg.is_perfect()
    }

    /// Offer a datagram of `size` bytes at `now`. Returns it straight back if the link is
    /// perfect (the caller sends it at once).
    pub fn push(&mut self, now: Instant, size: usize, item: T) -> Option<T> {
        if self.cfg.is_perfect() {
            self.counters.passed += 1;
            return Some(item);
        }
        if self.cfg.loss > 0.0 && self.rng.random::<f64>() < self.cfg.loss {
            self.counters.lost += 1;
            return None;
        }
        let mut depart = now;
        if let Some(tx_ns) = (size as u64 * 8 * 1_000_000_000).checked_div(self.cfg.rate_bps) {
            let start = self.busy_until.map_or(now, |b| b.max(now));
            if start.saturating_duration_since(now) > QUEUE_LIMIT {
                self.counters.queue_drops += 1;
                return None;
            }
            depart = start + Duration::from_nanos(tx_ns);
            self.busy_until = Some(depart);
        }
        let mut release = depart + self.cfg.delay;
        if !self.cfg.jitter.is_zero() {
            let j = self.cfg.jitter.as_secs_f64();
            let off = self.rng.random_range(-j..=j);
            release = if off >= 0.0 {
                release + Duration::from_secs_f64(off)
            } else {
                release
                    .checked_sub(Duration::from_secs_f64(-off))
                    .unwrap_or(release)
                    .max(depart)
            };
        }
        if let Some(last) = self.last_release {
            release = release.max(last);
        }
        self.last_release = Some(release);
        self.queue.push_back((release, item));
        None
    }

    /// The next datagram whose time has come.
    pub fn pop_ready(&mut self, now: Instant) -> Option<T> {
        if self.queue.front().is_some_and(|(t, _)| *t <= now) {
            self.counters.passed += 1;
            return self.queue.pop_front().map(|(_, d)| d);
        }
        None
    }

    /// When the next queued datagram is due.
    pub fn next_release(&self) -> Option<Instant> {
        self.queue.front().map(|(t, _)| *t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(l: &mut Link<u32>, now: Instant) -> Vec<u32> {
        std::iter::from_fn(|| l.pop_ready(now)).collect()
    }

    #[test]
    fn a_perfect_link_hands_everything_straight_back() {
        let mut l = Link::new(Impairment::default(), 1);
        let t = Instant::now();
        assert_eq!(l.push(t, 100, 7), Some(7));
        assert_eq!(l.next_release(), None);
    }

    #[test]
    fn delay_holds_datagrams_until_due_in_order() {
        let cfg = Impairment {
            delay: Duration::from_millis(50),
            ..Default::default()
        };
        let mut l = Link::new(cfg, 1);
        let t0 = Instant::now();
        assert_eq!(l.push(t0, 100, 1), None);
        assert_eq!(l.push(t0 + Duration::from_millis(1), 100, 2), None);
        assert!(drain(&mut l, t0 + Duration::from_millis(49)).is_empty());
        assert_eq!(l.next_release(), Some(t0 + Duration::from_millis(50)));
        assert_eq!(drain(&mut l, t0 + Duration::from_millis(51)), vec![1, 2]);
    }

    #[test]
    fn loss_drops_about_the_configured_share() {
        let cfg = Impairment {
            loss: 0.1,
            delay: Duration::from_millis(1),
            ..Default::default()
        };
        let mut l = Link::new(cfg, 42);
        let t0 = Instant::now();
        for i in 0..10_000 {
            l.push(t0, 100, i);
        }
        let lost = l.counters.lost;
        assert!((800..1200).contains(&lost), "{lost}");
        assert_eq!(
            drain(&mut l, t0 + Duration::from_secs(1)).len() as u64,
            10_000 - lost
        );
    }

    #[test]
    fn the_bottleneck_paces_and_tail_drops_beyond_its_queue() {
        // 1 Mbit/s: a 1250-byte datagram takes 10 ms.
        let cfg = Impairment {
            rate_bps: 1_000_000,
            ..Default::default()
        };
        let mut l = Link::new(cfg, 1);
        let t0 = Instant::now();
        for i in 0..30 {
            l.push(t0, 1250, i);
        }
        // 200 ms of queue holds ~21 datagrams; the rest are dropped.
        assert_eq!(l.counters.queue_drops, 9);
        assert_eq!(drain(&mut l, t0 + Duration::from_millis(10)), vec![0]);
        assert_eq!(drain(&mut l, t0 + Duration::from_millis(35)), vec![1, 2]);
    }

    #[test]
    fn jitter_varies_delay_but_keeps_order() {
        let cfg = Impairment {
            delay: Duration::from_millis(20),
            jitter: Duration::from_millis(10),
            ..Default::default()
        };
        let mut l = Link::new(cfg, 3);
        let t0 = Instant::now();
        for i in 0..100u32 {
            l.push(t0 + Duration::from_millis(u64::from(i)), 100, i);
        }
        let mut out = Vec::new();
        let mut t = t0;
        while out.len() < 100 {
            t += Duration::from_millis(1);
            out.extend(drain(&mut l, t));
            assert!(t < t0 + Duration::from_secs(1));
        }
        assert_eq!(out, (0..100).collect::<Vec<_>>());
    }
}
