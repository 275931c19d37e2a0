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
