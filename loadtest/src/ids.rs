//! Small value types shared by the load tester's modules.

use std::sync::OnceLock;
use std::time::Instant;

/// A publisher (participant) number, unique within one run. It travels in every payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct PublisherId(pub u32);

impl std::fmt::Display for PublisherId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "p{}", self.0)
    }
}

/// A room number within one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct RoomIndex(pub usize);

/// A simulcast layer. Rids and rates follow what Element Call / JS-SFU clients publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Layer {
    /// rid "q": 320x180.
    Q,
    /// rid "h": 640x360.
    H,
    /// rid "f": 1280x720.
    F,
}

impl Layer {
    pub const ALL: [Layer; 3] = [Layer::Q, Layer::H, Layer::F];

    pub fn rid(self) -> &'static str {
        match self {
            Layer::Q => "q",
            Layer::H => "h",
            Layer::F => "f",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn from_index(i: u8) -> Option<Layer> {
        Layer::ALL.get(usize::from(i)).copied()
    }

    pub fn from_rid(rid: &str) -> Option<Layer> {
        Layer::ALL.into_iter().find(|l| l.rid() == rid)
    }

    /// Target bitrate of the layer, bit/s.
    pub fn bitrate(self) -> u64 {
        match self {
            Layer::Q => 150_000,
            Layer::H => 450_000,
            Layer::F => 1_700_000,
        }
    }

    pub fn size(self) -> (u32, u32) {
        match self {
            Layer::Q => (320, 180),
            Layer::H => (640, 360),
            Layer::F => (1280, 720),
        }
    }
}

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// The process's one monotonic epoch: send and receive times of every participant are measured
/// from it, so one-way latency needs no clock sync (everything runs in this process).
pub fn epoch() -> Instant {
    *EPOCH.get_or_init(Instant::now)
}

/// µs since [`epoch`].
pub fn micros_since_epoch(t: Instant) -> u64 {
    t.saturating_duration_since(epoch()).as_micros() as u64
}

/// Deterministic stream and track ids of a publisher, so every participant can name any other
/// participant's tracks in a subscription without asking anyone.
pub fn stream_id(p: PublisherId) -> String {
    format!("weirlt-{}-stream", p.0)
}

pub fn audio_track_id(p: PublisherId) -> String {
    format!("weirlt-{}-audio", p.0)
}

pub fn video_track_id(p: PublisherId) -> String {
    format!("weirlt-{}-video", p.0)
}

/// The publisher a stream id of ours names.
pub fn publisher_of_stream(stream_id: &str) -> Option<PublisherId> {
    stream_id
        .strip_prefix("weirlt-")?
        .strip_suffix("-stream")?
        .parse()
        .ok()
        .map(PublisherId)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_name_their_publisher() {
        let p = PublisherId(17);
        assert_eq!(publisher_of_stream(&stream_id(p)), Some(p));
        assert_eq!(publisher_of_stream("browser-stream"), None);
    }

    #[test]
    fn layers_by_rid_and_index() {
        for l in Layer::ALL {
            assert_eq!(Layer::from_rid(l.rid()), Some(l));
            assert_eq!(Layer::from_index(l.index() as u8), Some(l));
        }
        assert_eq!(Layer::from_index(3), None);
    }
}
