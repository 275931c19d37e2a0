//! Per-(sender, device, call) reordering by `seq`, with a timeout, and de-duplication by `seq`
//! and `org.matrix.msgid`.
//!
//! js-sdk numbers the events of each call 0, 1, 2, … and the homeserver may hand them over
//! out of order across sync batches. Events are released in order; an event that jumps ahead
//! waits at most `timeout` for the gap to fill, after which everything buffered is released in
//! order and the gap is skipped (counted). Events without `seq` pass straight through.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::ids::{CallId, DeviceId, UserId};

/// Recent `org.matrix.msgid`s remembered per key.
const MSGID_MEMORY: usize = 32;
/// Most events buffered per key waiting for a gap to fill.
pub const MAX_BUFFERED_PER_KEY: usize = 64;
/// Most keys (calls) tracked per sending user.
pub const MAX_KEYS_PER_USER: usize = 32;
/// Most keys tracked overall.
pub const MAX_KEYS: usize = 10_000;
/// Keys idle this long with nothing buffered are forgotten by [`Reorder::sweep`].
pub const IDLE_FORGET: Duration = Duration::from_secs(2 * 3600);

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct ReorderKey {
    pub user: UserId,
    pub device: DeviceId,
    pub call: CallId,
}

struct KeyState<T> {
    next: u64,
    buffered: BTreeMap<u64, (Instant, T)>,
    msgids: VecDeque<String>,
    last_seen: Instant,
}

impl<T> KeyState<T> {
    fn new(now: Instant) -> Self {
        Self {
            next: 0,
            buffered: BTreeMap::new(),
            msgids: VecDeque::new(),
            last_seen: now,
        }
    }

    fn remember(&mut self, msgid: Option<&str>) {
        if let Some(m) = msgid {
            if self.msgids.len() == MSGID_MEMORY {
                self.msgids.pop_front();
            }
            self.msgids.push_back(m.to_owned());
        }
    }

    fn deadline(&self, timeout: Duration) -> Option<Instant> {
        self.buffered
            .values()
            .map(|(t, _)| *t)
            .min()
            .map(|t| t + timeout)
    }
}

/// Outcome of [`Reorder::push`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Admit<T> {
    /// These events (possibly none) are now in order and may be processed.
    Release(Vec<T>),
    /// Seen before (by `seq` or `msgid`).
    Duplicate,
    /// A cap was hit; the event was dropped.
    Flood,
}

pub(crate) struct Reorder<T> {
    timeout: Duration,
    keys: HashMap<ReorderKey, KeyState<T>>,
    per_user: HashMap<UserId, usize>,
}

impl<T> Reorder<T> {
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            keys: HashMap::new(),
            per_user: HashMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Offers one event.
    pub fn push(
        &mut self,
        key: &ReorderKey,
        seq: Option<u64>,
        msgid: Option<&str>,
        item: T,
        now: Instant,
    ) -> Admit<T> {
        if seq.is_none() && msgid.is_none() {
            return Admit::Release(vec![item]);
        }
        if !self.keys.contains_key(key) && !self.make_room(&key.user, now) {
            return Admit::Flood;
        }
        let state = self.keys.entry(key.clone()).or_insert_with(|| {
            *self.per_user.entry(key.user.clone()).or_default() += 1;
            KeyState::new(now)
        });
        state.last_seen = now;
        if let Some(m) = msgid {
            if state.msgids.iter().any(|x| x == m) {
                return Admit::Duplicate;
            }
        }
        let Some(seq) = seq else {
            state.remember(msgid);
            return Admit::Release(vec![item]);
        };
        if seq < state.next || state.buffered.contains_key(&seq) {
            return Admit::Duplicate;
        }
        if seq > state.next {
            if state.buffered.len() >= MAX_BUFFERED_PER_KEY {
                return Admit::Flood;
            }
            state.remember(msgid);
            state.buffered.insert(seq, (now, item));
            return Admit::Release(Vec::new());
        }
        state.remember(msgid);
        state.next = seq + 1;
        let mut out = vec![item];
        while let Some(entry) = state.buffered.first_entry() {
            if *entry.key() != state.next {
                break;
            }
            let (_, it) = entry.remove();
            out.push(it);
            state.next += 1;
        }
        Admit::Release(out)
    }

    /// The earliest instant at which [`Self::handle_timeout`] has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.keys
            .values()
            .filter_map(|s| s.deadline(self.timeout))
            .min()
    }

    /// Releases, per key in `seq` order, everything whose wait is over. Returns the released
    /// items and how many `seq` numbers were skipped.
    pub fn handle_timeout(&mut self, now: Instant) -> (Vec<T>, u64) {
        let mut out = Vec::new();
        let mut skipped = 0;
        for state in self.keys.values_mut() {
            if state.deadline(self.timeout).is_none_or(|d| d > now) {
                continue;
            }
            for (seq, (_, item)) in std::mem::take(&mut state.buffered) {
                skipped += seq - state.next;
                state.next = seq + 1;
                out.push(item);
            }
        }
        (out, skipped)
    }

    /// Forgets keys idle for [`IDLE_FORGET`] with nothing buffered.
    pub fn sweep(&mut self, now: Instant) {
        let per_user = &mut self.per_user;
        self.keys.retain(|k, s| {
            let keep =
                !s.buffered.is_empty() || now.saturating_duration_since(s.last_seen) < IDLE_FORGET;
            if !keep {
                decrement(per_user, &k.user);
            }
            keep
        });
    }

    /// Makes room for one more key of `user`, evicting that user's (or, at the global cap,
    /// anyone's) least recently seen idle key. False when every candidate is still buffering.
    fn make_room(&mut self, user: &UserId, now: Instant) -> bool {
        let _ = now;
        if self.per_user.get(user).copied().unwrap_or(0) >= MAX_KEYS_PER_USER
            && !self.evict_lru(Some(user))
        {
            return false;
        }
        if self.keys.len() >= MAX_KEYS && !self.evict_lru(None) {
            return false;
        }
        true
    }

    fn evict_lru(&mut self, user: Option<&UserId>) -> bool {
        let victim = self
            .keys
            .iter()
            .filter(|(k, s)| s.buffered.is_empty() && user.is_none_or(|u| &k.user == u))
            .min_by_key(|(_, s)| s.last_seen)
            .map(|(k, _)| k.clone());
        match victim {
            Some(k) => {
                self.keys.remove(&k);
                decrement(&mut self.per_user, &k.user);
                true
            }
            None => false,
        }
    }
}

fn decrement(per_user: &mut HashMap<UserId, usize>, user: &UserId) {
    if let Some(n) = per_user.get_mut(user) {
        *n -= 1;
        if *n == 0 {
            per_user.remove(user);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(call: &str) -> ReorderKey {
        ReorderKey {
            user: "@u:hs".try_into().unwrap(),
            device: "D".into(),
            call: call.into(),
        }
    }

    fn released(a: Admit<u32>) -> Vec<u32> {
        match a {
            Admit::Release(v) => v,
            other => panic!("expected release, got {other:?}"),
        }
    }

    #[test]
    fn in_order_passes_through() {
        let t0 = Instant::now();
        let mut r = Reorder::new(Duration::from_secs(1));
        for s in 0..5u64 {
            assert_eq!(
                released(r.push(&key("c"), Some(s), None, s as u32, t0)),
                vec![s as u32]
            );
        }
        assert_eq!(r.poll_timeout(), None);
    }

    #[test]
    fn out_of_order_is_released_in_order_when_the_gap_fills() {
        let t0 = Instant::now();
        let mut r = Reorder::new(Duration::from_secs(1));
        assert!(released(r.push(&key("c"), Some(2), None, 2, t0)).is_empty());
        assert!(released(r.push(&key("c"), Some(1), None, 1, t0)).is_empty());
        assert_eq!(r.poll_timeout(), Some(t0 + Duration::from_secs(1)));
        assert_eq!(
            released(r.push(&key("c"), Some(0), None, 0, t0)),
            vec![0, 1, 2]
        );
        assert_eq!(r.poll_timeout(), None);
        assert_eq!(released(r.push(&key("c"), Some(3), None, 3, t0)), vec![3]);
    }

    #[test]
    fn timeout_releases_buffered_and_skips_the_gap() {
        let t0 = Instant::now();
        let timeout = Duration::from_secs(1);
        let mut r = Reorder::new(timeout);
        assert!(released(r.push(&key("c"), Some(0), None, 0, t0)) == vec![0]);
        assert!(released(r.push(&key("c"), Some(3), None, 3, t0)).is_empty());
        assert!(
            released(r.push(&key("c"), Some(5), None, 5, t0 + Duration::from_millis(500)))
                .is_empty()
        );
        // Not yet due.
        assert_eq!(
            r.handle_timeout(t0 + Duration::from_millis(999)),
            (vec![], 0)
        );
        let (out, skipped) = r.handle_timeout(t0 + timeout);
        assert_eq!(out, vec![3, 5]);
        assert_eq!(skipped, 3, "1, 2 and 4 were skipped");
        // A late arrival of a skipped seq is a duplicate; the stream continues after 5.
        assert_eq!(
            r.push(&key("c"), Some(1), None, 1, t0 + timeout),
            Admit::Duplicate
        );
        assert_eq!(
            released(r.push(&key("c"), Some(6), None, 6, t0 + timeout)),
            vec![6]
        );
    }

    #[test]
    fn duplicates_by_seq_and_msgid() {
        let t0 = Instant::now();
        let mut r = Reorder::new(Duration::from_secs(1));
        assert_eq!(
            released(r.push(&key("c"), Some(0), Some("m0"), 0, t0)),
            vec![0]
        );
        assert_eq!(
            r.push(&key("c"), Some(0), Some("other"), 0, t0),
            Admit::Duplicate
        );
        assert!(released(r.push(&key("c"), Some(2), Some("m2"), 2, t0)).is_empty());
        assert_eq!(
            r.push(&key("c"), Some(2), Some("m2b"), 2, t0),
            Admit::Duplicate,
            "buffered seq"
        );
        assert_eq!(
            r.push(&key("c"), Some(1), Some("m0"), 1, t0),
            Admit::Duplicate,
            "same msgid, new seq"
        );
        // No seq: msgid alone de-duplicates.
        assert_eq!(released(r.push(&key("c"), None, Some("x"), 9, t0)), vec![9]);
        assert_eq!(r.push(&key("c"), None, Some("x"), 9, t0), Admit::Duplicate);
        // Neither: always passes.
        assert_eq!(released(r.push(&key("c"), None, None, 7, t0)), vec![7]);
        assert_eq!(released(r.push(&key("c"), None, None, 7, t0)), vec![7]);
    }

    #[test]
    fn keys_are_independent() {
        let t0 = Instant::now();
        let mut r = Reorder::new(Duration::from_secs(1));
        assert!(released(r.push(&key("a"), Some(1), None, 1, t0)).is_empty());
        assert_eq!(released(r.push(&key("b"), Some(0), None, 10, t0)), vec![10]);
        let other_device = ReorderKey {
            device: "E".into(),
            ..key("a")
        };
        assert_eq!(
            released(r.push(&other_device, Some(0), None, 20, t0)),
            vec![20]
        );
    }

    #[test]
    fn per_key_buffer_is_capped() {
        let t0 = Instant::now();
        let mut r = Reorder::new(Duration::from_secs(1));
        for s in 1..=MAX_BUFFERED_PER_KEY as u64 {
            assert!(released(r.push(&key("c"), Some(s), None, s as u32, t0)).is_empty());
        }
        assert_eq!(r.push(&key("c"), Some(1000), None, 0, t0), Admit::Flood);
        // Another call of the same user is unaffected.
        assert_eq!(released(r.push(&key("d"), Some(0), None, 5, t0)), vec![5]);
    }

    #[test]
    fn per_user_key_cap_evicts_idle_keys_of_that_user_only() {
        let t0 = Instant::now();
        let mut r = Reorder::new(Duration::from_secs(1));
        let other = ReorderKey {
            user: "@v:hs".try_into().unwrap(),
            device: "D".into(),
            call: "v".into(),
        };
        assert_eq!(released(r.push(&other, Some(0), None, 0, t0)), vec![0]);
        for i in 0..MAX_KEYS_PER_USER + 5 {
            let k = key(&format!("c{i}"));
            assert_eq!(
                released(r.push(&k, Some(0), None, 0, t0 + Duration::from_millis(i as u64))),
                vec![0]
            );
        }
        assert_eq!(r.len(), MAX_KEYS_PER_USER + 1);
        // The other user's key survived: its next seq is still expected to be 1.
        assert_eq!(r.push(&other, Some(0), None, 0, t0), Admit::Duplicate);
        // When every key of the user is buffering, a new key is refused.
        let mut r = Reorder::new(Duration::from_secs(1));
        for i in 0..MAX_KEYS_PER_USER {
            assert!(released(r.push(&key(&format!("c{i}")), Some(3), None, 0, t0)).is_empty());
        }
        assert_eq!(r.push(&key("new"), Some(0), None, 0, t0), Admit::Flood);
        assert_eq!(released(r.push(&other, Some(0), None, 0, t0)), vec![0]);
    }

    #[test]
    fn sweep_forgets_idle_keys() {
        let t0 = Instant::now();
        let mut r = Reorder::new(Duration::from_secs(1));
        released(r.push(&key("c"), Some(0), None, 0, t0));
        r.sweep(t0 + IDLE_FORGET - Duration::from_secs(1));
        assert_eq!(r.len(), 1);
        r.sweep(t0 + IDLE_FORGET);
        assert_eq!(r.len(), 0);
    }
}
