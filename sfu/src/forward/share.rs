//! Sharing a budget among one subscriber's videos: the pure step of allocation that
//! `Allocator::decide` (`forward/allocate.rs`) runs with the shares of the estimate it works
//! out. Every track its lowest step first, then the most important climb.

use super::allocate::{Demand, Now, Priority};
use super::quality::Quality;

/// What a choice of ranks costs, at the measured rates.
pub fn cost(demands: &[Demand], choice: &[Option<Quality>]) -> u64 {
    demands
        .iter()
        .zip(choice)
        .filter_map(|(d, c)| {
            let r = (*c)?;
            d.layers.iter().find(|(lr, _)| *lr == r).map(|(_, b)| *b)
        })
        .sum()
}

/// What the cheapest step up from `choice` costs: resuming a paused track on its lowest
/// layer, or one track's next layer. `None` if every track is at its best.
pub fn next_step(demands: &[Demand], choice: &[Option<Quality>]) -> Option<u64> {
    demands
        .iter()
        .zip(choice)
        .filter_map(|(d, c)| {
            let layers = d.eligible();
            match c {
                None => layers.first().map(|(_, bps)| *bps),
                Some(r) => {
                    let k = layers.iter().position(|(lr, _)| lr == r)?;
                    let next = layers.get(k + 1)?;
                    Some(next.1.saturating_sub(layers[k].1))
                }
            }
        })
        .min()
}

/// Share `budget_bps` among the tracks: every track its lowest layer first, in priority
/// order (within a priority, paused ones last), pausing those that do not fit (a track that
/// has not started yet starts only within `budget_bps`); then the speaker and screens climb
/// as high as fits, in priority order; then the others climb together, one layer each per
/// round, so a grid fills evenly. Returns a rank per track, or `None` for a pause.
///
/// The lowest layers may use up to `floor_bps` (at least `budget_bps`): pausing a video is
/// worse than running a little closer to the estimate, so the first layer of each is held to
/// the larger share; only climbing, starting and a video still settling are held to
/// `budget_bps`.
pub fn allocate(budget_bps: u64, floor_bps: u64, demands: &[Demand]) -> Vec<Option<Quality>> {
    // Most important first; within a priority, paused videos after the others, so that a
    // budget too small for every floor never pauses one picture to resume another. New videos
    // keep their place: after the flowing ones, a new video would wait whenever what flows
    // left less than its floor in the smaller share, where before it started.
    let mut order: Vec<usize> = (0..demands.len()).collect();
    order.sort_by_key(|&i| {
        let paused = demands[i].now == Now::Paused;
        (std::cmp::Reverse(demands[i].priority), paused)
    });
    // Index into each track's eligible layers.
    let mut at: Vec<Option<usize>> = vec![None; demands.len()];
    let mut spent = 0;
    for &i in &order {
        let room = if demands[i].now.is_unstarted() || demands[i].settling {
            budget_bps
        } else {
            floor_bps.max(budget_bps)
        };
        if let Some((_, bps)) = demands[i].eligible().first() {
            if spent + bps <= room {
                spent += bps;
                at[i] = Some(0);
            }
        }
    }
    let mut left = budget_bps.saturating_sub(spent);
    let step = |i: usize, at: &mut [Option<usize>], left: &mut u64| -> bool {
        let Some(k) = at[i] else { return false };
        let layers = demands[i].eligible();
        let Some((_, next)) = layers.get(k + 1) else {
            return false;
        };
        let extra = next.saturating_sub(layers[k].1);
        if extra > *left {
            return false;
        }
        *left -= extra;
        at[i] = Some(k + 1);
        true
    };
    for &i in order
        .iter()
        .filter(|&&i| demands[i].priority > Priority::Other)
    {
        while step(i, &mut at, &mut left) {}
    }
    loop {
        let mut moved = false;
        for &i in order
            .iter()
            .filter(|&&i| demands[i].priority == Priority::Other)
        {
            moved |= step(i, &mut at, &mut left);
        }
        if !moved {
            break;
        }
    }
    at.iter()
        .zip(demands)
        .map(|(k, d)| k.map(|k| d.eligible()[k].0))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forward::allocate::tests::{camera, F, H, Q};

    #[test]
    fn a_wide_link_gets_every_track_at_its_size() {
        let d = [
            camera(Priority::Other, u8::MAX, Now::New),
            camera(Priority::Other, H.rank, Now::New),
            camera(Priority::Other, Q.rank, Now::New),
        ];
        assert_eq!(
            allocate(10_000_000, 10_000_000, &d),
            vec![Some(F), Some(H), Some(Q)]
        );
    }

    #[test]
    fn the_speaker_climbs_first_and_the_rest_share_what_is_left_evenly() {
        let d = [
            camera(Priority::Other, u8::MAX, Now::New),
            camera(Priority::Speaker, u8::MAX, Now::New),
            camera(Priority::Other, u8::MAX, Now::New),
        ];
        // 150 + 1500 + 150 = 1800; 1.2 M more lifts both others to h (2 x 350 k), not one to f.
        assert_eq!(
            allocate(2_600_000, 2_600_000, &d),
            vec![Some(H), Some(F), Some(H)]
        );
        // Only the lowest layers fit, and not all of them: the speaker is kept.
        assert_eq!(allocate(320_000, 320_000, &d), vec![Some(Q), Some(Q), None]);
        // The lowest layers of videos flowing may use the larger share, climbing only the
        // smaller; videos not started yet start only within the smaller.
        let flowing = d.clone().map(|mut c| {
            c.now = Now::Layer(Q);
            c
        });
        assert_eq!(
            allocate(320_000, 450_000, &flowing),
            vec![Some(Q), Some(Q), Some(Q)]
        );
        assert_eq!(allocate(320_000, 450_000, &d), vec![Some(Q), Some(Q), None]);
        assert_eq!(
            allocate(800_000, 450_000, &flowing),
            vec![Some(Q), Some(H), Some(Q)]
        );
        assert_eq!(allocate(100_000, 100_000, &d), vec![None, None, None]);
    }

    /// Room for one lowest layer, two cameras of equal priority: the one flowing keeps it,
    /// whichever comes first in the subscriber's track map. Handing it to the paused one
    /// pauses a picture to resume another, two keyframes and two notices for nothing.
    #[test]
    fn a_flowing_video_keeps_its_floor_over_a_paused_one_of_equal_priority() {
        let paused = camera(Priority::Other, u8::MAX, Now::Paused);
        let flowing = camera(Priority::Other, u8::MAX, Now::Layer(Q));
        assert_eq!(
            allocate(200_000, 200_000, &[paused.clone(), flowing.clone()]),
            vec![None, Some(Q)]
        );
        assert_eq!(
            allocate(200_000, 200_000, &[flowing, paused]),
            vec![Some(Q), None]
        );
    }

    #[test]
    fn a_screen_comes_before_the_speaker() {
        let d = [
            camera(Priority::Speaker, u8::MAX, Now::New),
            camera(Priority::Screenshare, u8::MAX, Now::New),
        ];
        assert_eq!(allocate(1_800_000, 1_800_000, &d), vec![Some(Q), Some(F)]);
    }

    #[test]
    fn a_cap_below_every_layer_still_gets_the_lowest() {
        let d = [Demand {
            priority: Priority::Other,
            layers: vec![(H, 500_000), (F, 1_500_000)],
            cap: Q.rank,
            now: Now::New,
            settling: false,
        }];
        assert_eq!(allocate(10_000_000, 10_000_000, &d), vec![Some(H)]);
        assert_eq!(d[0].wanted_bps(), 500_000);
    }

    #[test]
    fn the_next_step_is_the_cheapest_resume_or_upgrade() {
        let d = [
            camera(Priority::Other, u8::MAX, Now::New),
            camera(Priority::Other, H.rank, Now::New),
        ];
        assert_eq!(next_step(&d, &[Some(Q), Some(Q)]), Some(350_000));
        assert_eq!(
            next_step(&d, &[Some(H), None]),
            Some(150_000),
            "resuming the paused one"
        );
        assert_eq!(
            next_step(&d, &[Some(F), Some(H)]),
            None,
            "both at their best"
        );
    }
}
