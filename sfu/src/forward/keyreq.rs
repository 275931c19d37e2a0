//! Keyframe-request coalescing for one published video track.
//!
//! Many subscribers asking at once must cost the publisher one keyframe, not one each; but a
//! request must never be lost (dropping requests inside a hold-off window leaves a subscriber
//! on a grey picture). So: send at once when the window is open; otherwise remember that one is
//! owed and send it when the window ends, unless a keyframe arrived meanwhile.

use std::time::{Duration, Instant};

/// Minimum spacing of keyframe requests to one publisher track. Shorter makes a joining
/// subscriber's first picture arrive sooner after a recent request; longer protects the
/// publisher's uplink from keyframe storms (a 720p keyframe is 10-20x a delta frame).
pub const KEYFRAME_REQUEST_INTERVAL: Duration = Duration::from_millis(300);

#[derive(Debug, Clone, Default)]
pub struct KeyframeRequests {
    last_sent: Option<Instant>,
    owed: bool,
}

impl KeyframeRequests {
    /// A subscriber (or weir itself) needs a keyframe. Returns true if a request should be sent
    /// upstream now.
    pub fn request(&mut self, now: Instant) -> bool {
        match self.last_sent {
            Some(at) if now < at + KEYFRAME_REQUEST_INTERVAL => {
                self.owed = true;
                false
            }
            _ => {
                self.last_sent = Some(now);
                self.owed = false;
                true
            }
        }
    }

    /// A keyframe arrived from the publisher: whatever was owed is satisfied.
    pub fn keyframe_received(&mut self) {
        self.owed = false;
    }

    /// When the owed request is due, if any.
    pub fn deadline(&self) -> Option<Instant> {
        match (self.owed, self.last_sent) {
            (true, Some(at)) => Some(at + KEYFRAME_REQUEST_INTERVAL),
            _ => None,
        }
    }

    /// Call at or after [`Self::deadline`]: true if the owed request should be sent now.
    pub fn poll(&mut self, now: Instant) -> bool {
        match self.deadline() {
            Some(due) if now >= due => {
                self.last_sent = Some(now);
                self.owed = false;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_inside_the_window_coalesce_into_one_later_request() {
        let t0 = Instant::now();
        let mut k = KeyframeRequests::default();
        assert!(k.request(t0));
        assert!(!k.request(t0 + Duration::from_millis(10)));
        assert!(!k.request(t0 + Duration::from_millis(20)));
        let due = k.deadline().expect("a request is owed");
        assert_eq!(due, t0 + KEYFRAME_REQUEST_INTERVAL);
        assert!(!k.poll(due - Duration::from_millis(1)));
        assert!(k.poll(due));
        assert_eq!(k.deadline(), None);
    }

    #[test]
    fn a_keyframe_satisfies_what_was_owed() {
        let t0 = Instant::now();
        let mut k = KeyframeRequests::default();
        assert!(k.request(t0));
        assert!(!k.request(t0 + Duration::from_millis(50)));
        k.keyframe_received();
        assert_eq!(k.deadline(), None);
        assert!(!k.poll(t0 + Duration::from_secs(1)));
    }

    #[test]
    fn requests_after_the_window_go_out_at_once() {
        let t0 = Instant::now();
        let mut k = KeyframeRequests::default();
        assert!(k.request(t0));
        assert!(k.request(t0 + KEYFRAME_REQUEST_INTERVAL));
    }
}
