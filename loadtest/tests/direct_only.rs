//! Story: an operator load-tests the media plane alone. The focus runs with Matrix switched
//! off (no homeserver anywhere; the configured URL has nothing behind it), signalling only
//! through its direct endpoint, and the load tester's participants call it, publish and
//! receive each other, every byte intact.
//!
//! Needs the focus binary (`cargo build -p weir-focus`, or `WEIR_FOCUS_BIN`).

mod common;

use common::{check, run_direct, scratch_dir, Focus};

#[test]
fn the_media_plane_is_load_tested_without_any_homeserver() {
    let dir = scratch_dir();
    let focus = Focus::start_direct_only(&dir);
    let json = dir.join("direct-only.json");
    let context = run_direct(&focus, "@weir-focus:direct.invalid", 3, &json);
    check(&json, 3, Some(2), &context);
    let log = std::fs::read_to_string(&focus.log).expect("focus log");
    assert!(log.contains("direct mode only"), "{log}");
    drop(focus);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The same meeting on a focus with two shards that spreads a conference once it holds two
/// participants on every shard it uses: the meeting spans both shards, each publisher's
/// packets are handed to the other shard, and everyone still receives everyone intact.
#[test]
fn a_meeting_spread_over_two_shards_reaches_everyone_intact() {
    let dir = scratch_dir();
    let focus = Focus::start_direct_only_with(&dir, "shards = 2\nspread_conference_above = 2");
    let json = dir.join("spread.json");
    let context = run_direct(&focus, "@weir-focus:direct.invalid", 5, &json);
    check(&json, 5, Some(4), &context);
    let handed = focus.metric("weir_spread_packets_total").unwrap_or(0.0);
    assert!(
        handed > 0.0,
        "packets were handed between the shards\n{context}"
    );
    let log = std::fs::read_to_string(&focus.log).expect("focus log");
    assert!(log.contains("conference spread"), "{log}");
    drop(focus);
    let _ = std::fs::remove_dir_all(&dir);
}
