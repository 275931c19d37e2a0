//! Story: an operator points weir-loadtest at a focus behind a real Synapse. Two rooms of four
//! participants each register, create their rooms, join, publish their call membership and
//! call the focus with ordinary to-device events; each publishes simulcast video and audio for
//! ten seconds and receives the others through the focus. Nothing arrives modified, and every
//! participant receives every publisher it subscribed to. Then the same focus is driven in
//! direct mode (its authenticated HTTP signalling endpoint, no homeserver) with the same checks.
//!
//! Needs Synapse in `.venv/synapse` (scripts/setup.sh) and the focus binary
//! (`cargo build -p weir-focus`, or `WEIR_FOCUS_BIN`).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The focus's direct-mode bearer token in this test.
const DIRECT_TOKEN: &str = "loadtest-direct-token";

/// Bound on waiting for Synapse or the focus to come up; only matters when something is broken.
const READY_DEADLINE: Duration = Duration::from_secs(90);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("loadtest/ is inside the repository")
        .to_path_buf()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

fn scratch_dir() -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let d = std::env::temp_dir().join(format!("weir-loadtest-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&d).expect("scratch directory");
    d
}

/// HTTP status of `GET path` on 127.0.0.1:port, if anything answers.
fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    let line = String::from_utf8_lossy(&buf[..n]);
    line.split_whitespace().nth(1)?.parse().ok()
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A throw-away Synapse from scripts/synapse.sh, stopped on drop.
struct Synapse {
    dir: PathBuf,
    port: u16,
}

impl Synapse {
    fn start(dir: PathBuf) -> Synapse {
        let port = free_port();
        let out = Command::new("bash")
            .arg(repo().join("scripts/synapse.sh"))
            .arg("start")
            .arg(&dir)
            .arg(port.to_string())
            .output()
            .expect("running scripts/synapse.sh");
        assert!(
            out.status.success(),
            "scripts/synapse.sh start failed (is Synapse installed? run scripts/setup.sh):\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Synapse { dir, port }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn secret_file(&self) -> PathBuf {
        self.dir.join("shared_secret")
    }
}

impl Drop for Synapse {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(repo().join("scripts/synapse.sh"))
            .arg("stop")
            .arg(&self.dir)
            .output();
    }
}

/// The focus process, SIGTERMed (then killed if it lingers) on drop.
struct Focus {
    child: Child,
    http_port: u16,
    log: PathBuf,
}

impl Focus {
    fn start(dir: &Path, syn: &Synapse, password: &str) -> Focus {
        let bin = std::env::var_os("WEIR_FOCUS_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo().join("target/debug/weir-focus"));
        assert!(
            bin.exists(),
            "focus binary not found at {} (build it with cargo build -p weir-focus, or set WEIR_FOCUS_BIN)",
            bin.display()
        );
        let http_port = free_port();
        let state = dir.join("focus-state");
        std::fs::create_dir_all(&state).expect("focus state dir");
        let config = dir.join("focus.toml");
        std::fs::write(
            &config,
            format!(
                "[matrix]\nhomeserver_url = {:?}\nuser_id = \"@focus:localhost\"\npassword = {:?}\n\
                 device_id = \"WEIRFOCUS\"\nsession_id = \"sfu\"\nstate_dir = {:?}\n\n\
                 [media]\nbind_ip = \"127.0.0.1\"\nadvertise_ips = [\"127.0.0.1\"]\n\n\
                 [http]\nlisten = \"127.0.0.1:{http_port}\"\ndirect_token = {DIRECT_TOKEN:?}\n",
                syn.url(),
                password,
                state.display().to_string(),
            ),
        )
        .expect("focus config");
        let log = dir.join("focus.log");
        let file = std::fs::File::create(&log).expect("focus log");
        let child = Command::new(&bin)
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(file.try_clone().expect("log handle")))
            .stderr(Stdio::from(file))
            .spawn()
            .expect("starting the focus");
        let mut f = Focus {
            child,
            http_port,
            log,
        };
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = f.child.try_wait() {
                panic!("focus exited early ({status}):\n{}", tail(&f.log, 40));
            }
            if http_status(http_port, "/healthz") == Some(200) {
                break;
            }
            assert!(
                start.elapsed() < READY_DEADLINE,
                "focus /healthz not 200 within {READY_DEADLINE:?}:\n{}",
                tail(&f.log, 40)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        f
    }
}

impl Drop for Focus {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(15) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The run's JSON: everyone joined, nothing modified, every subscription satisfied.
fn check(json: &Path, participants: usize, others: usize, context: &str) {
    let r: Value = serde_json::from_str(&std::fs::read_to_string(json).expect("--json file"))
        .expect("valid JSON");
    assert_eq!(r["participants"], participants, "{context}");
    assert_eq!(r["joined"], participants, "everyone connected\n{context}");
    assert_eq!(r["integrity_errors"], 0, "nothing modified\n{context}");
    for key in [
        "duration_s",
        "loss_pct",
        "freezes",
        "focus_cpu_us_per_forwarded_packet",
        "floor_us_per_packet",
        "ratio_to_floor",
        "focus_rss_bytes",
    ] {
        assert!(r[key].is_number(), "{key} missing from the JSON\n{context}");
    }
    for p in ["p50", "p95", "p99"] {
        assert!(r["latency_ms"][p].is_number(), "latency_ms.{p}");
    }
    let parts = r["participants_detail"].as_array().expect("participants");
    assert_eq!(parts.len(), participants);
    for p in parts {
        let subscribed = p["subscribed_video"].as_array().expect("list");
        assert_eq!(
            subscribed.len(),
            others,
            "each subscribes to the others in its room: {p}"
        );
        for kind in ["video", "audio"] {
            let sub = p[format!("subscribed_{kind}")].as_array().unwrap();
            let got = p[format!("received_{kind}")].as_array().unwrap();
            for s in sub {
                assert!(
                    got.contains(s),
                    "{} never received {kind} of publisher {s}: {p}\n{context}",
                    p["user_id"]
                );
            }
        }
        assert!(p["missing"].as_array().unwrap().is_empty(), "{p}");
        assert!(p["error"].is_null(), "{p}");
    }
}

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
    check(&json, 8, 3, &context);
    for chart in ["bitrate.svg", "latency.svg", "loss.svg"] {
        let svg = std::fs::read_to_string(dir.join("plots").join(chart)).expect("chart written");
        assert!(svg.starts_with("<svg"));
    }

    // The same focus in direct mode: no homeserver between participants and focus.
    let json = dir.join("direct.json");
    let out = Command::new(lt)
        .args(["run", "--direct"])
        .arg(format!("http://127.0.0.1:{}", focus.http_port))
        .args([
            "--direct-token",
            DIRECT_TOKEN,
            "--focus-user",
            "@focus:localhost",
            "--focus-device",
            "WEIRFOCUS",
            "--rooms",
            "1",
            "--publishers",
            "3",
            "--duration",
            "5",
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
        "direct-mode load test failed\n{context}"
    );
    println!("{stdout}");
    check(&json, 3, 2, &context);

    drop(focus);
    drop(syn);
    let _ = std::fs::remove_dir_all(&dir);
}
