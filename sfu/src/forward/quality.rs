//! A step of video quality the allocator chooses between: a simulcast layer (by rank), and how
//! many of its temporal layers (`forward::temporal`).

use super::temporal::ALL_TEMPORAL;

/// One step: the layer of `rank`, its temporal layers `0..=tid` ([`ALL_TEMPORAL`]: all of
/// them, or a layer without temporal layers). Ordered by rank, then frame rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Quality {
    pub rank: u8,
    pub tid: u8,
}

impl Quality {
    /// The layer of `rank` at its full frame rate.
    pub const fn full(rank: u8) -> Self {
        Quality {
            rank,
            tid: ALL_TEMPORAL,
        }
    }

    /// The highest temporal layer a subscriber receiving `rank` now gets, when this is what
    /// allocation gave it: this step's on its own layer; only layer 0 on a layer above it
    /// (it moves down at the next keyframe, and meanwhile should send as little as it can);
    /// everything on a layer below it (it moves up, and had room for more).
    pub fn temporal_cap(self, rank: u8) -> u8 {
        match rank.cmp(&self.rank) {
            std::cmp::Ordering::Equal => self.tid,
            std::cmp::Ordering::Greater => 0,
            std::cmp::Ordering::Less => ALL_TEMPORAL,
        }
    }
}

/// The steps worth offering for a camera: a camera's lowest layer at a lower frame rate still
/// shows a face, where pausing shows nothing; above it, a larger picture at a quarter of the
/// frame rate looks worse than the smaller one at full rate, so each higher layer is offered
/// only whole. Screens keep every step: text reads at any frame rate. `steps` ascend.
pub fn camera_steps(mut steps: Vec<(Quality, u64)>) -> Vec<(Quality, u64)> {
    let lowest = steps.first().map(|(q, _)| q.rank);
    steps.retain(|(q, _)| Some(q.rank) == lowest || q.tid == ALL_TEMPORAL);
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_order_by_layer_then_frame_rate() {
        let q0 = Quality { rank: 2, tid: 0 };
        assert!(q0 < Quality { rank: 2, tid: 1 });
        assert!(Quality { rank: 2, tid: 1 } < Quality::full(2));
        assert!(Quality::full(2) < Quality { rank: 3, tid: 0 });
    }

    #[test]
    fn the_temporal_cap_follows_the_layer_received() {
        let h1 = Quality { rank: 3, tid: 1 };
        assert_eq!(h1.temporal_cap(3), 1);
        assert_eq!(h1.temporal_cap(4), 0, "still on f, moving down");
        assert_eq!(h1.temporal_cap(2), ALL_TEMPORAL, "still on q, moving up");
    }

    #[test]
    fn a_camera_offers_lower_frame_rates_only_on_its_lowest_layer() {
        let step = |rank, tid| (Quality { rank, tid }, 1);
        let all = vec![
            step(2, 0),
            step(2, 1),
            step(2, ALL_TEMPORAL),
            step(3, 0),
            step(3, 1),
            step(3, ALL_TEMPORAL),
        ];
        assert_eq!(
            camera_steps(all),
            vec![
                step(2, 0),
                step(2, 1),
                step(2, ALL_TEMPORAL),
                step(3, ALL_TEMPORAL)
            ]
        );
    }
}
