//! Story: an operator load-tests the media plane alone. The focus runs with Matrix switched
//! off (no homeserver anywhere; the configured URL has nothing behind it), signalling only
//! through its direct endpoint, and the load tester's participants call it, publish and
//! receive each other, every byte intact.
//!
//! Needs the focus binary (`cargo build -p weir-focus`, or `WEIR_FOCUS_BIN`).

mod common;

use std::process::Command;

use common::{check, scratch_dir, tail, Focus, DIRECT_TOKEN};

#[test]
fn the_media_plane_is_load_tested_without_any_homeserver() {
    let dir = scratch_dir();
    let focus = Focus::start_direct_only(&dir);
    let json = dir.join("direct-only.json");
    let out = Command::new(env!("CARGO_BIN_EXE_weir-loadtest"))
        .args(["run", "--direct"])
        .arg(format!("http://127.0.0.1:{}", focus.http_port))
        .args([
            "--direct-token",
            DIRECT_TOKEN,
            "--focus-user",
            "@weir-focus:direct.invalid",
            "--focus-device",
            "WEIRFOCUS",
            "--rooms",
            "1",
            "--publishers",
            "3",
            "--duration",
            "4",
            "--setup-timeout",
            "60",
            "--quiet",
            "--focus-metrics",
        ])
        .arg(format!("http://127.0.0.1:{}/metrics", focus.http_port))
        .arg("--json")
        .arg(&json)
        .output()
        .expect("weir-loadtest run --direct");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let context = format!(
        "stdout:\n{stdout}\nstderr:\n{}\nfocus log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        tail(&focus.log, 30)
    );
    assert!(
        out.status.success(),
        "direct-only load test failed\n{context}"
    );
    check(&json, 3, Some(2), &context);
    let log = std::fs::read_to_string(&focus.log).expect("focus log");
    assert!(log.contains("direct mode only"), "{log}");
    drop(focus);
    let _ = std::fs::remove_dir_all(&dir);
}
