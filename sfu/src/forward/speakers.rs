//! Who is speaking in a conference, from the audio levels publishers put in their packets
//! (RFC 6464: -dBov, 0 loudest, -127 silence). A pure state machine: audio levels and `now`
//! in, the speaking set and the dominant speaker out when they change.
//!
//! Each source has a loudness score in 0..=1 that rises with loud packets and decays with
//! time, so a pause between words does not end speech and a cough does not start it. A source
//! speaks while its score is above [`SPEAKING_ON`] (hysteresis down to [`SPEAKING_OFF`]). The
//! dominant speaker is the loudest speaker, and a challenger takes over only when it has been
//! clearly louder ([`TAKEOVER_MARGIN`]) for [`TAKEOVER_HOLD`], or when the dominant speaker
//! stops: a conversation does not flip the spotlight on every interjection.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Levels at or below this (-dBov) count as silence: background noise and comfort noise sit
/// well under it, speech at a normal distance well above. Lower lets quieter talkers count;
/// higher ignores noisy rooms better.
pub const SILENCE_DBOV: i8 = -55;
/// The score follows loudness with this time constant. Longer bridges longer pauses and
/// reacts later to the start of speech; shorter reacts faster and flickers between words.
pub const SCORE_TIME_CONSTANT: Duration = Duration::from_millis(400);
/// Score above which a source starts speaking.
pub const SPEAKING_ON: f32 = 0.25;
/// Score below which a speaking source stops. The gap to [`SPEAKING_ON`] keeps the speaking
/// set from flickering at the threshold.
pub const SPEAKING_OFF: f32 = 0.12;
/// A challenger's score must exceed the dominant speaker's by this factor...
pub const TAKEOVER_MARGIN: f32 = 1.3;
/// ...for this long, to take over while the dominant speaker still speaks. Longer keeps the
/// spotlight steadier in a lively discussion; shorter follows it more closely.
pub const TAKEOVER_HOLD: Duration = Duration::from_millis(1000);

/// While only the loudest sources are forwarded, a source outside them gets in on a packet
/// this much louder than the quietest forwarded source's score, before its own score has
/// caught up: the start of speech is not clipped. Lower lets fluctuations swap sources more
/// often; higher clips more of a quiet talker's first words.
pub const ONSET_MARGIN: f32 = 1.5;

/// The speaking set and the dominant speaker, as last reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Speakers<K> {
    pub dominant: Option<K>,
    /// Loudest first.
    pub speaking: Vec<K>,
}

impl<K> Default for Speakers<K> {
    fn default() -> Self {
        Speakers {
            dominant: None,
            speaking: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Source {
    score: f32,
    /// Loudness (0..=1) of the last packet.
    last: f32,
    at: Instant,
    speaking: bool,
}

impl Source {
    /// The score decayed to `now` (loudness since `at` is not known yet: silence).
    fn decayed(&self, now: Instant) -> f32 {
        let dt = now.saturating_duration_since(self.at).as_secs_f32();
        self.score * (-dt / SCORE_TIME_CONSTANT.as_secs_f32()).exp()
    }
}

/// Speech activity of the audio sources of one conference.
#[derive(Debug)]
pub struct SpeakerDetector<K> {
    sources: HashMap<K, Source>,
    reported: Speakers<K>,
    /// A challenger to the dominant speaker and since when it has been clearly louder.
    challenger: Option<(K, Instant)>,
    /// The sources forwarded while only the loudest are ([`SpeakerDetector::admit`]).
    audible: Vec<K>,
}

impl<K> Default for SpeakerDetector<K> {
    fn default() -> Self {
        SpeakerDetector {
            sources: HashMap::new(),
            reported: Speakers::default(),
            challenger: None,
            audible: Vec::new(),
        }
    }
}

impl<K: Copy + Eq + Hash + Ord> SpeakerDetector<K> {
    /// One audio packet of `source` with its RFC 6464 level (-dBov), received at `now`.
    pub fn level(&mut self, source: K, dbov: i8, now: Instant) {
        let loudness = if dbov <= SILENCE_DBOV {
            0.0
        } else {
            (f32::from(dbov) - f32::from(SILENCE_DBOV)) / -f32::from(SILENCE_DBOV)
        };
        let s = self.sources.entry(source).or_insert(Source {
            score: 0.0,
            last: 0.0,
            at: now,
            speaking: false,
        });
        let dt = now.saturating_duration_since(s.at).as_secs_f32();
        let keep = (-dt / SCORE_TIME_CONSTANT.as_secs_f32()).exp();
        s.score = s.score * keep + loudness * (1.0 - keep);
        s.last = loudness;
        s.at = now;
    }

    /// A source is gone (its track unpublished).
    pub fn remove(&mut self, source: K) {
        self.sources.remove(&source);
        self.audible.retain(|k| *k != source);
    }

    /// How many sources are known.
    pub fn len(&self) -> usize {
        self.sources.len()
    }

    /// Whether `source`'s packet at `now` is among the `n` loudest sources' and should be
    /// forwarded, when only the loudest are. Call after [`SpeakerDetector::level`] for the
    /// same packet. The set changes as soon as a source's score passes the quietest one in
    /// it, on that source's own packet, so the start of speech is not clipped; a source that
    /// was just replaced stops at its next packet.
    pub fn admit(&mut self, source: K, n: usize, now: Instant) -> bool {
        if self.audible.contains(&source) {
            return true;
        }
        if n == 0 {
            return false;
        }
        if self.audible.len() < n {
            self.audible.push(source);
            return true;
        }
        let score = |k: &K| self.sources.get(k).map_or(0.0, |s| s.decayed(now));
        let (mine, loud_now) = self
            .sources
            .get(&source)
            .map_or((0.0, 0.0), |s| (s.decayed(now), s.last));
        let (quietest, q_score) = self
            .audible
            .iter()
            .enumerate()
            .map(|(i, k)| (i, score(k)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .expect("n > 0 entries");
        // A louder score takes the slot; so does a packet clearly louder than the quietest
        // source's score, which lets the first words of a new talker through.
        if mine > q_score || loud_now > q_score * ONSET_MARGIN {
            self.audible[quietest] = source;
            true
        } else {
            false
        }
    }

    /// The dominant speaker as last evaluated.
    pub fn dominant(&self) -> Option<K> {
        self.reported.dominant
    }

    /// Whether any source is known.
    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }

    /// Re-evaluate at `now`; the new state if it differs from the last one reported.
    pub fn evaluate(&mut self, now: Instant) -> Option<&Speakers<K>> {
        let mut speaking: Vec<(K, f32)> = Vec::new();
        for (k, s) in &mut self.sources {
            let score = s.decayed(now);
            s.speaking = if s.speaking {
                score >= SPEAKING_OFF
            } else {
                score >= SPEAKING_ON
            };
            if s.speaking {
                speaking.push((*k, score));
            }
        }
        // Loudest first; equal scores by key, so the order is deterministic.
        speaking.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let score_of = |k: K| speaking.iter().find(|(s, _)| *s == k).map(|(_, v)| *v);
        let loudest = speaking.first().copied();
        let dominant = match (self.reported.dominant, loudest) {
            (_, None) => {
                self.challenger = None;
                self.reported
                    .dominant
                    .filter(|d| self.sources.contains_key(d))
            }
            (Some(d), Some((top, top_score))) if top != d => match score_of(d) {
                // The dominant speaker stopped: the loudest takes over at once.
                None => {
                    self.challenger = None;
                    Some(top)
                }
                Some(d_score) if top_score >= d_score * TAKEOVER_MARGIN => match self.challenger {
                    Some((c, since)) if c == top => {
                        if now.saturating_duration_since(since) >= TAKEOVER_HOLD {
                            self.challenger = None;
                            Some(top)
                        } else {
                            Some(d)
                        }
                    }
                    _ => {
                        self.challenger = Some((top, now));
                        Some(d)
                    }
                },
                Some(_) => {
                    self.challenger = None;
                    Some(d)
                }
            },
            (Some(d), Some(_)) => {
                self.challenger = None;
                Some(d)
            }
            (None, Some((top, _))) => Some(top),
        };
        let next = Speakers {
            dominant,
            speaking: speaking.into_iter().map(|(k, _)| k).collect(),
        };
        if next == self.reported {
            return None;
        }
        self.reported = next;
        Some(&self.reported)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PACKET: Duration = Duration::from_millis(20);

    /// Feed `levels` (one per source, per 20 ms packet) for `dur`, evaluating every 100 ms as
    /// the shard does; returns every change reported.
    fn run(
        d: &mut SpeakerDetector<u32>,
        now: &mut Instant,
        levels: &[(u32, i8)],
        dur: Duration,
    ) -> Vec<Speakers<u32>> {
        let mut changes = Vec::new();
        let end = *now + dur;
        let mut next_eval = *now;
        while *now < end {
            for (k, l) in levels {
                d.level(*k, *l, *now);
            }
            if *now >= next_eval {
                if let Some(s) = d.evaluate(*now) {
                    changes.push(s.clone());
                }
                next_eval = *now + Duration::from_millis(100);
            }
            *now += PACKET;
        }
        changes
    }

    #[test]
    fn silence_is_nobody_speaking() {
        let mut d = SpeakerDetector::default();
        let mut now = Instant::now();
        let changes = run(
            &mut d,
            &mut now,
            &[(1, -90), (2, -70)],
            Duration::from_secs(5),
        );
        assert!(changes.is_empty(), "{changes:?}");
    }

    #[test]
    fn a_talker_becomes_dominant_within_half_a_second_and_stops_after_the_pause() {
        let mut d = SpeakerDetector::default();
        let mut now = Instant::now();
        let start = now;
        let changes = run(
            &mut d,
            &mut now,
            &[(1, -20), (2, -90)],
            Duration::from_secs(2),
        );
        assert_eq!(
            changes.first(),
            Some(&Speakers {
                dominant: Some(1),
                speaking: vec![1]
            })
        );
        assert_eq!(changes.len(), 1, "no flicker while talking: {changes:?}");
        let took = {
            let mut d = SpeakerDetector::default();
            let mut t = start;
            let mut n = 0;
            loop {
                d.level(1, -20, t);
                if d.evaluate(t).is_some() {
                    break t - start;
                }
                t += PACKET;
                n += 1;
                assert!(n < 100);
            }
        };
        assert!(
            took <= Duration::from_millis(500),
            "speech seen after {took:?}"
        );
        // Silence: speaking ends, the last dominant speaker stays in the spotlight.
        let changes = run(
            &mut d,
            &mut now,
            &[(1, -90), (2, -90)],
            Duration::from_secs(3),
        );
        assert_eq!(
            changes.last(),
            Some(&Speakers {
                dominant: Some(1),
                speaking: vec![]
            })
        );
    }

    #[test]
    fn a_short_pause_between_words_does_not_end_speech() {
        let mut d = SpeakerDetector::default();
        let mut now = Instant::now();
        run(&mut d, &mut now, &[(1, -20)], Duration::from_secs(1));
        let changes = run(&mut d, &mut now, &[(1, -90)], Duration::from_millis(200));
        assert!(
            changes.is_empty(),
            "a 200 ms pause changes nothing: {changes:?}"
        );
    }

    #[test]
    fn an_interjection_does_not_take_the_spotlight_but_a_sustained_louder_voice_does() {
        let mut d = SpeakerDetector::default();
        let mut now = Instant::now();
        run(&mut d, &mut now, &[(1, -30)], Duration::from_secs(2));
        // Bob says something louder for 600 ms: he speaks, Alice keeps the spotlight.
        let changes = run(
            &mut d,
            &mut now,
            &[(1, -30), (2, -10)],
            Duration::from_millis(600),
        );
        assert!(changes.iter().all(|s| s.dominant == Some(1)), "{changes:?}");
        assert!(changes.iter().any(|s| s.speaking.contains(&2)));
        run(
            &mut d,
            &mut now,
            &[(1, -30), (2, -90)],
            Duration::from_secs(2),
        );
        // Bob talks louder for long: he takes over.
        let changes = run(
            &mut d,
            &mut now,
            &[(1, -30), (2, -10)],
            Duration::from_secs(3),
        );
        assert_eq!(changes.last().and_then(|s| s.dominant), Some(2));
    }

    #[test]
    fn when_the_dominant_speaker_stops_the_next_speaker_takes_over_at_once() {
        let mut d = SpeakerDetector::default();
        let mut now = Instant::now();
        run(
            &mut d,
            &mut now,
            &[(1, -20), (2, -40)],
            Duration::from_secs(2),
        );
        let changes = run(
            &mut d,
            &mut now,
            &[(1, -90), (2, -40)],
            Duration::from_secs(2),
        );
        let handover = changes.iter().find(|s| s.dominant == Some(2)).cloned();
        assert_eq!(
            handover,
            Some(Speakers {
                dominant: Some(2),
                speaking: vec![2]
            })
        );
    }

    #[test]
    fn a_source_removed_leaves_the_spotlight() {
        let mut d = SpeakerDetector::default();
        let mut now = Instant::now();
        run(&mut d, &mut now, &[(1, -20)], Duration::from_secs(1));
        d.remove(1);
        assert_eq!(d.evaluate(now).cloned(), Some(Speakers::default()));
        assert!(d.is_empty());
    }

    #[test]
    fn with_thirty_talkers_only_the_three_loudest_are_admitted() {
        let mut d = SpeakerDetector::default();
        let mut now = Instant::now();
        let mut admitted = std::collections::BTreeSet::new();
        for round in 0..150 {
            for k in 0..30u32 {
                // Source k talks at -10 - k dBov: 0, 1, 2 are the loudest.
                d.level(k, -10 - k as i8, now);
                if d.admit(k, 3, now) && round >= 100 {
                    admitted.insert(k);
                }
            }
            now += PACKET;
        }
        assert_eq!(admitted.into_iter().collect::<Vec<_>>(), vec![0, 1, 2]);
    }

    #[test]
    fn a_new_talker_is_admitted_on_its_first_loud_packets() {
        let mut d = SpeakerDetector::default();
        let mut now = Instant::now();
        // Three people chat quietly; a fourth is silent.
        for _ in 0..100 {
            for k in 0..3u32 {
                d.level(k, -45, now);
                assert!(d.admit(k, 3, now));
            }
            d.level(9, -90, now);
            assert!(!d.admit(9, 3, now), "silence is not admitted");
            now += PACKET;
        }
        // The fourth starts talking loudly: admitted on its first loud packet.
        let mut first = None;
        for i in 0..10 {
            d.level(9, -10, now);
            if d.admit(9, 3, now) {
                first = Some(i);
                break;
            }
            for k in 0..3u32 {
                d.level(k, -45, now);
                d.admit(k, 3, now);
            }
            now += PACKET;
        }
        assert_eq!(first, Some(0), "admitted at packet {first:?}");
    }
}
