//! Story: an operator points weir-loadtest at a focus behind a real Synapse. Two rooms of four
//! participants each register, create their rooms, join, publish their call membership and
//! call the focus with ordinary to-device events; each publishes simulcast video and audio for
//! ten seconds and receives the others through the focus. Nothing arrives modified, and every
//! participant receives every publisher it subscribed to. Then the same focus is driven in
//! direct mode (its authenticated HTTP signalling endpoint, no homeserver) with the same checks.
//!
//! Needs Synapse in `.venv/synapse` (scripts/setup.sh) and the focus binary
//! (`cargo build -p weir-focus`, or `WEIR_FOCUS_BIN`).

mod common;

use std::process::Command;

use common::{check, run_direct, scratch_dir, tail, Focus, Synapse};

#[test]
fn two_rooms_of_four_through_synapse_arrive_unmodified_and_complete() {
    let dir = scratch_dir();
    let syn = Synapse::start(dir.join("synapse"));
    let lt = env!("CARGO_BIN_EXE_weir-loadtest");
    let password = "focus-password";
    let reg = Command::new(lt)
        .args([
            "register",
            "--homeserver",
            &syn.url(),
            "--registration-secret-file",
        ])
        .arg(syn.secret_file())
        .args(["--user", "focus", "--password", password])
        .output()
        .expect("weir-loadtest register");
    assert!(
        reg.status.success(),
        "registering the focus: {}",
        String::from_utf8_lossy(&reg.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&reg.stdout).trim(),
        "@focus:localhost"
    );
    let focus = Focus::start(&dir, &syn, password);

    let json = dir.join("result.json");
    let out = Command::new(lt)
        .args([
            "run",
            "--homeserver",
            &syn.url(),
            "--registration-secret-file",
        ])
        .arg(syn.secret_file())
        .args([
            "--focus-user",
            "@focus:localhost",
            "--focus-device",
            "WEIRFOCUS",
            "--rooms",
            "2",
            "--publishers",
            "4",
            "--duration",
            "10",
            "--setup-timeout",
            "90",
            "--join-rate",
            "8",
            "--quiet",
            "--focus-metrics",
        ])
        .arg(format!("http://127.0.0.1:{}/metrics", focus.http_port))
        .arg("--json")
        .arg(&json)
        .arg("--plot")
        .arg(dir.join("plots"))
        .output()
        .expect("weir-loadtest run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let context = format!(
        "stdout:\n{stdout}\nstderr:\n{}\nfocus log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        tail(&focus.log, 30)
    );
    assert!(out.status.success(), "load test failed\n{context}");
    println!("{stdout}");
    check(&json, 8, Some(3), &context);
    for chart in ["bitrate.svg", "latency.svg", "loss.svg"] {
        let svg = std::fs::read_to_string(dir.join("plots").join(chart)).expect("chart written");
        assert!(svg.starts_with("<svg"));
    }

    // The same focus in direct mode: no homeserver between participants and focus.
    let json = dir.join("direct.json");
    let context = run_direct(&focus, "@focus:localhost", 3, &json);
    println!("{context}");
    check(&json, 3, Some(2), &context);

    drop(focus);
    drop(syn);
    let _ = std::fs::remove_dir_all(&dir);
}
