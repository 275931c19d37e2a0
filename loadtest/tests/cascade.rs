//! Story: two organisations, each with its own homeserver and its own weir focus, hold one
//! conference. The homeservers federate over loopback; every participant calls only its own
//! organisation's focus and names it in its `m.call.member` entry (MSC3898 `foci.active`). The
//! foci find each other there, one dials the other, and each pulls over the trunk only what
//! its own participants watch. Everyone receives everyone, byte-identical across two foci,
//! and each stream crosses the trunk once however many watch it on the far side.
//!
//! Needs Synapse in `.venv/synapse` (scripts/setup.sh) and the focus binary
//! (`cargo build -p weir-focus`, or `WEIR_FOCUS_BIN`).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{check, scratch_dir, tail, Focus, Synapse};

/// Bound on one load-test run (setup, duration, hangup), past which the test fails.
const RUN_DEADLINE: Duration = Duration::from_secs(180);

struct Site {
    syn: Synapse,
    focus: Focus,
    focus_user: String,
    device: &'static str,
}

fn register_focus(syn: &Synapse, password: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_weir-loadtest"))
        .args(["register", "--homeserver", &syn.url()])
        .arg("--registration-secret-file")
        .arg(syn.secret_file())
        .args(["--user", "focus", "--password", password])
        .output()
        .expect("weir-loadtest register");
    assert!(
        out.status.success(),
        "registering the focus: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn site(dir: &std::path::Path, name: &str, device: &'static str) -> Site {
    let syn = Synapse::start_federating(dir.join(name));
    let password = "focus-password";
    let focus_user = register_focus(&syn, password);
    assert_eq!(focus_user, format!("@focus:{}", syn.server_name()));
    let focus = Focus::start_as(dir, &syn, "focus", device, password);
    Site {
        syn,
        focus,
        focus_user,
        device,
    }
}

/// What a run showed, with the largest values the foci's trunk gauges reached during it.
struct Outcome {
    stdout: String,
    /// Per site: max of `weir_trunk_tracks{direction="out"}` and of `weir_trunks` (both sides).
    max_out: Vec<f64>,
    max_trunks: Vec<f64>,
}

/// Run the load tester over `sites` (participants spread round-robin), sampling each focus's
/// trunk gauges while it runs.
fn run(sites: &[&Site], args: &[&str], json: &std::path::Path) -> Outcome {
    let first = sites[0];
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_weir-loadtest"));
    cmd.args(["run", "--homeserver", &first.syn.url()])
        .arg("--registration-secret-file")
        .arg(first.syn.secret_file())
        .args([
            "--focus-user",
            &first.focus_user,
            "--focus-device",
            first.device,
        ]);
    for s in &sites[1..] {
        cmd.arg("--site").arg(format!(
            "{},{},{},{}",
            s.syn.url(),
            s.syn.secret_file().display(),
            s.focus_user,
            s.device
        ));
    }
    cmd.args(args)
        .arg("--focus-metrics")
        .arg(format!(
            "http://127.0.0.1:{}/metrics",
            first.focus.http_port
        ))
        .args(["--setup-timeout", "90", "--quiet", "--json"])
        .arg(json)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("weir-loadtest run");
    let mut max_out = vec![0.0f64; sites.len()];
    let mut max_trunks = vec![0.0f64; sites.len()];
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for the load test") {
            break status;
        }
        for (i, s) in sites.iter().enumerate() {
            let out = s
                .focus
                .metric(r#"weir_trunk_tracks{direction="out"}"#)
                .unwrap_or(0.0);
            let trunks = s
                .focus
                .metric(r#"weir_trunks{side="dialled"}"#)
                .unwrap_or(0.0)
                + s.focus
                    .metric(r#"weir_trunks{side="answered"}"#)
                    .unwrap_or(0.0);
            max_out[i] = max_out[i].max(out);
            max_trunks[i] = max_trunks[i].max(trunks);
        }
        if start.elapsed() > RUN_DEADLINE {
            let _ = child.kill();
            panic!("the load test did not finish within {RUN_DEADLINE:?}");
        }
        // Sampling period of the gauges, not a synchronisation: the loop ends on the child.
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = child.wait_with_output().expect("load test output");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let mut context = format!(
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for s in sites {
        context.push_str(&format!(
            "\n{} log:\n{}",
            s.focus_user,
            tail(&s.focus.log, 40)
        ));
    }
    assert!(status.success(), "cascade load test failed\n{context}");
    Outcome {
        stdout: context,
        max_out,
        max_trunks,
    }
}

#[test]
fn two_organisations_share_one_conference_through_a_trunk() {
    let dir = scratch_dir();
    let a = site(&dir, "hs-a", "FOCUSA");
    let b = site(&dir, "hs-b", "FOCUSB");

    // Four publishers, two on each organisation: each receives the three others, two of them
    // through the trunk, and every byte arrives as sent.
    let json = dir.join("four.json");
    let o = run(
        &[&a, &b],
        &[
            "--rooms",
            "1",
            "--publishers",
            "4",
            "--duration",
            "10",
            "--join-rate",
            "8",
        ],
        &json,
    );
    println!("{}", o.stdout);
    check(&json, 4, Some(3), &o.stdout);
    // One trunk between the two foci; each sends its two publishers' audio and video once.
    assert_eq!(o.max_trunks, vec![1.0, 1.0], "{}", o.stdout);
    assert_eq!(o.max_out, vec![4.0, 4.0], "{}", o.stdout);

    // One publisher per organisation and ten receivers on each side: still one copy of each
    // track per trunk, not one per far subscriber.
    let json = dir.join("ten.json");
    let o = run(
        &[&a, &b],
        &[
            "--rooms",
            "1",
            "--publishers",
            "2",
            "--subscribers",
            "20",
            "--duration",
            "8",
            "--join-rate",
            "10",
        ],
        &json,
    );
    println!("{}", o.stdout);
    check(&json, 22, None, &o.stdout);
    assert_eq!(o.max_out, vec![2.0, 2.0], "{}", o.stdout);

    drop(a);
    drop(b);
    let _ = std::fs::remove_dir_all(&dir);
}
