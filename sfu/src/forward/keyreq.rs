//! Keyframe-request coalescing for one published video track, across its layers.
//!
//! Many subscribers asking at once must cost the publisher one keyframe, not one each; but a
//! request must never be lost (dropping requests inside a hold-off window leaves a subscriber
//! on a grey picture). So: send at once when the window is open; otherwise remember which
//! layers one is owed for and send those when the window ends, unless their keyframes arrived
//! meanwhile.
//!
//! The window is per track, not per layer, because that is how the browser counts. Chromium's
//! encoder (libwebrtc's `EncoderRtcpFeedback`) acts on at most one keyframe request per 300 ms
//! for a whole sender, ignores the others without a trace, and answers the one it acts on
//! with a keyframe on every simulcast layer. A request for the quarter layer sent 100 ms after
//! one for the half layer was simply lost, and the subscriber moving down waited for weir's
//! own retry a second later (docs/adaptation.md, "Keyframe requests and Chromium's window").

use std::time::{Duration, Instant};

use str0m::media::Rid;

/// Minimum spacing of keyframe requests to one publisher track, whatever layers they name.
/// Chromium ignores any request within 300 ms of the last one it acted on; the 50 ms above
/// that absorb jitter between two requests' paths, so the second is not taken as early.
/// Shorter loses requests to that rule; longer makes a waiting subscriber's picture arrive
/// later and protects the publisher's uplink more (a 720p keyframe is 10-20x a delta frame,
/// and Chromium sends one on every layer).
pub const KEYFRAME_REQUEST_INTERVAL: Duration = Duration::from_millis(350);

/// A layer of a track: its rid, or `None` for a track without simulcast.
pub type Layer = Option<Rid>;

#[derive(Debug, Clone, Default)]
pub struct KeyframeRequests {
    last_sent: Option<Instant>,
    /// Layers a request is owed for, sent together when the window ends.
    owed: Vec<Layer>,
}

impl KeyframeRequests {
    /// A subscriber (or weir itself) needs a keyframe of `layer`. Returns true if a request
    /// should be sent upstream now.
    pub fn request(&mut self, layer: Layer, now: Instant) -> bool {
        match self.last_sent {
            Some(at) if now < at + KEYFRAME_REQUEST_INTERVAL => {
                if !self.owed.contains(&layer) {
                    self.owed.push(layer);
                }
                false
            }
            _ => {
                self.last_sent = Some(now);
                self.owed.retain(|l| *l != layer);
                true
            }
        }
    }

    /// A keyframe of `layer` arrived from the publisher: a request owed for it is satisfied.
    pub fn keyframe_received(&mut self, layer: Layer) {
        self.owed.retain(|l| *l != layer);
    }

    /// When the owed requests are due, if any.
    pub fn deadline(&self) -> Option<Instant> {
        match (self.owed.is_empty(), self.last_sent) {
            (false, Some(at)) => Some(at + KEYFRAME_REQUEST_INTERVAL),
            _ => None,
        }
    }

    /// Call at or after [`Self::deadline`]: the layers whose owed requests go out now.
    pub fn poll(&mut self, now: Instant) -> Vec<Layer> {
        match self.deadline() {
            Some(due) if now >= due => {
                self.last_sent = Some(now);
                std::mem::take(&mut self.owed)
            }
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rid(r: &str) -> Layer {
        Some(Rid::from(r))
    }

    #[test]
    fn requests_inside_the_window_coalesce_into_one_later_request() {
        let t0 = Instant::now();
        let mut k = KeyframeRequests::default();
        assert!(k.request(rid("h"), t0));
        assert!(!k.request(rid("h"), t0 + Duration::from_millis(10)));
        assert!(!k.request(rid("h"), t0 + Duration::from_millis(20)));
        let due = k.deadline().expect("a request is owed");
        assert_eq!(due, t0 + KEYFRAME_REQUEST_INTERVAL);
        assert!(k.poll(due - Duration::from_millis(1)).is_empty());
        assert_eq!(k.poll(due), vec![rid("h")]);
        assert_eq!(k.deadline(), None);
    }

    /// The case that lost a second in Chromium: the half layer asked for, then the quarter
    /// 100 ms later. The quarter's request waits for the window instead of going out early
    /// (where the browser would ignore it), and then goes out.
    #[test]
    fn a_request_for_another_layer_waits_for_the_window_too() {
        let t0 = Instant::now();
        let mut k = KeyframeRequests::default();
        assert!(k.request(rid("h"), t0));
        assert!(!k.request(rid("q"), t0 + Duration::from_millis(100)));
        assert!(!k.request(rid("f"), t0 + Duration::from_millis(150)));
        let due = k.deadline().expect("requests are owed");
        assert_eq!(due, t0 + KEYFRAME_REQUEST_INTERVAL);
        assert_eq!(k.poll(due), vec![rid("q"), rid("f")]);
        // The next request counts its window from the one just sent.
        assert!(!k.request(rid("h"), due + Duration::from_millis(10)));
        assert!(k.request(rid("h"), due + KEYFRAME_REQUEST_INTERVAL));
    }

    #[test]
    fn a_keyframe_satisfies_what_was_owed_for_its_layer_only() {
        let t0 = Instant::now();
        let mut k = KeyframeRequests::default();
        assert!(k.request(rid("h"), t0));
        assert!(!k.request(rid("q"), t0 + Duration::from_millis(50)));
        assert!(!k.request(rid("f"), t0 + Duration::from_millis(60)));
        k.keyframe_received(rid("q"));
        assert_eq!(k.poll(t0 + Duration::from_secs(1)), vec![rid("f")]);
        assert!(!k.request(None, t0 + Duration::from_secs(1)));
        k.keyframe_received(None);
        assert_eq!(k.deadline(), None);
    }

    #[test]
    fn requests_after_the_window_go_out_at_once() {
        let t0 = Instant::now();
        let mut k = KeyframeRequests::default();
        assert!(k.request(rid("q"), t0));
        assert!(k.request(rid("f"), t0 + KEYFRAME_REQUEST_INTERVAL));
    }
}
