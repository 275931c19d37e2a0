//! What the scenario tests share: throw-away Synapses (plain or federating) from
//! scripts/synapse.sh, the focus binary with a config written for them, and waiting helpers.
#![allow(dead_code)] // each test binary uses its own part

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The focus's direct-mode bearer token in this test.
pub const DIRECT_TOKEN: &str = "loadtest-direct-token";

/// Bound on waiting for Synapse or the focus to come up; only matters when something is broken.
pub const READY_DEADLINE: Duration = Duration::from_secs(90);

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("loadtest/ is inside the repository")
        .to_path_buf()
}

/// A UDP port nothing on loopback uses right now.
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free loopback UDP port")
        .port()
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

pub fn scratch_dir() -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let d = std::env::temp_dir().join(format!("weir-loadtest-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&d).expect("scratch directory");
    d
}

/// HTTP status of `GET path` on 127.0.0.1:port, if anything answers.
pub fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    let line = String::from_utf8_lossy(&buf[..n]);
    line.split_whitespace().nth(1)?.parse().ok()
}

pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A throw-away Synapse from scripts/synapse.sh, stopped on drop.
pub struct Synapse {
    pub dir: PathBuf,
    pub port: u16,
    /// The federation port of a federating server (its server name is `localhost:PORT`).
    pub fed_port: Option<u16>,
    /// The server's process, read from its pid file at start: stopping does not depend on
    /// the directory still being there.
    pid: Option<i32>,
    stopped: std::cell::Cell<bool>,
}

impl Synapse {
    pub fn start(dir: PathBuf) -> Synapse {
        Self::launch(dir, None)
    }

    /// A server that federates with the other `start_federating` ones over loopback.
    pub fn start_federating(dir: PathBuf) -> Synapse {
        Self::launch(dir, Some(free_port()))
    }

    fn launch(dir: PathBuf, fed_port: Option<u16>) -> Synapse {
        let port = free_port();
        let mut cmd = Command::new("bash");
        cmd.arg(repo().join("scripts/synapse.sh"));
        match fed_port {
            None => cmd.arg("start").arg(&dir).arg(port.to_string()),
            Some(f) => cmd
                .arg("start-fed")
                .arg(&dir)
                .arg(port.to_string())
                .arg(f.to_string()),
        };
        let out = cmd.output().expect("running scripts/synapse.sh");
        assert!(
            out.status.success(),
            "scripts/synapse.sh start failed (is Synapse installed? run scripts/setup.sh):\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let pid = std::fs::read_to_string(dir.join("pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        Synapse {
            dir,
            port,
            fed_port,
            pid,
            stopped: std::cell::Cell::new(false),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn secret_file(&self) -> PathBuf {
        self.dir.join("shared_secret")
    }

    /// The Matrix server name users of this server have.
    pub fn server_name(&self) -> String {
        match self.fed_port {
            Some(p) => format!("localhost:{p}"),
            None => "localhost".into(),
        }
    }
}

impl Synapse {
    /// Stop the server (SIGTERM, waiting for it to exit). Idempotent. If its directory is
    /// already gone (and with it the pid file the script stops it by), the process is killed
    /// by the pid read at start, so a test never leaves a homeserver running.
    pub fn stop(&self) {
        if self.stopped.replace(true) {
            return;
        }
        if !self.dir.join("pid").exists() {
            if let Some(pid) = self.pid {
                // SAFETY: kill(2) on the server this struct started, whose pid file is gone.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
            return;
        }
        let _ = Command::new("bash")
            .arg(repo().join("scripts/synapse.sh"))
            .arg("stop")
            .arg(&self.dir)
            .output();
    }
}

impl Drop for Synapse {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The focus process, SIGTERMed (then killed if it lingers) on drop.
pub struct Focus {
    pub child: Child,
    pub http_port: u16,
    pub log: PathBuf,
}

impl Focus {
    /// The value of one metric sample (`name{labels}` exactly as exposed), if present.
    pub fn metric(&self, sample: &str) -> Option<f64> {
        let mut s = TcpStream::connect(("127.0.0.1", self.http_port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        text.lines().find_map(|l| {
            l.strip_prefix(sample)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
    }

    /// The focus `@focus:<server>` with device `WEIRFOCUS`, as the single-site tests use it.
    pub fn start(dir: &Path, syn: &Synapse, password: &str) -> Focus {
        Self::start_as(dir, syn, "focus", "WEIRFOCUS", password)
    }

    /// A focus logging in as `@LOCALPART:<server>` with `device`; its files go in `dir`.
    pub fn start_as(
        dir: &Path,
        syn: &Synapse,
        localpart: &str,
        device: &str,
        password: &str,
    ) -> Focus {
        Self::start_with_media(dir, syn, localpart, device, password, "")
    }

    /// [`Focus::start_as`] with extra `[media]` settings (TOML lines).
    pub fn start_with_media(
        dir: &Path,
        syn: &Synapse,
        localpart: &str,
        device: &str,
        password: &str,
        media: &str,
    ) -> Focus {
        let state = dir.join(format!("{localpart}-{device}-state"));
        std::fs::create_dir_all(&state).expect("focus state dir");
        let matrix = format!(
            "[matrix]\nhomeserver_url = {:?}\nuser_id = \"@{localpart}:{}\"\npassword = {:?}\n\
             device_id = {device:?}\nsession_id = \"sfu\"\nstate_dir = {:?}\n",
            syn.url(),
            syn.server_name(),
            password,
            state.display().to_string(),
        );
        Self::spawn(dir, &format!("{localpart}-{device}"), &matrix, media)
    }

    /// A focus with Matrix switched off: direct mode only, no homeserver anywhere.
    pub fn start_direct_only(dir: &Path) -> Focus {
        Self::start_direct_only_with(dir, "")
    }

    /// [`Focus::start_direct_only`] with extra `[media]` settings (TOML lines).
    pub fn start_direct_only_with(dir: &Path, media: &str) -> Focus {
        // A homeserver URL nothing listens on: the focus must not need it.
        let matrix = "[matrix]\nenabled = false\nhomeserver_url = \"http://127.0.0.1:9\"\n\
                      device_id = \"WEIRFOCUS\"\n";
        Self::spawn(dir, "direct-only", matrix, media)
    }

    /// Start the focus binary with `matrix` (its `[matrix]` section) and extra `[media]`
    /// lines, direct mode on; returns once `/healthz` answers 200.
    fn spawn(dir: &Path, name: &str, matrix: &str, media: &str) -> Focus {
        let bin = std::env::var_os("WEIR_FOCUS_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo().join("target/debug/weir-focus"));
        assert!(
            bin.exists(),
            "focus binary not found at {} (build it with cargo build -p weir-focus, or set WEIR_FOCUS_BIN)",
            bin.display()
        );
        let http_port = free_port();
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "{matrix}\n[media]\nbind_ip = \"127.0.0.1\"\nadvertise_ips = [\"127.0.0.1\"]\n{media}\n\n\
                 [http]\nlisten = \"127.0.0.1:{http_port}\"\ndirect_token = {DIRECT_TOKEN:?}\n",
            ),
        )
        .expect("focus config");
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("focus log");
        let child = Command::new(&bin)
            .arg("--config")
            .arg(&config)
            .env(
                "RUST_LOG",
                std::env::var("WEIR_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
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
        self.stop();
    }
}

impl Focus {
    /// SIGTERM the focus (it hangs up every call) and wait for it to exit, killing it if it
    /// lingers. Idempotent.
    pub fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
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
pub fn check(json: &Path, participants: usize, others: Option<usize>, context: &str) {
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
        if let Some(others) = others {
            assert_eq!(
                subscribed.len(),
                others,
                "each subscribes to the others in its room: {p}"
            );
        }
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
        check_vp8_numbering(p, context);
    }
}

/// The focus renumbers VP8 picture ids and TL0PICIDX into one sequence per subscriber and
/// track, across layer switches, pauses and the temporal layers it leaves out: with nothing
/// lost on the way, no number may be missing. And a participant on a free downlink gets every
/// temporal layer (the publishers encode L1T3, as Chromium does).
fn check_vp8_numbering(p: &Value, context: &str) {
    let videos = p["rx_video"].as_array().expect("rx_video");
    if p["rtp_lost"] == 0 {
        for v in videos {
            assert_eq!(
                (&v["pictures_missing"], &v["tl0_missing"]),
                (&Value::from(0), &Value::from(0)),
                "{}: picture ids or TL0PICIDX skipped with no packet lost: {v}\n{context}",
                p["user_id"]
            );
        }
    }
    if p["downlink_kbps"].is_null() && videos.iter().any(|v| v["complete_frames"] != 0) {
        let top = videos
            .iter()
            .filter_map(|v| v["frames_per_tid"][2].as_u64())
            .sum::<u64>();
        assert!(
            top > 0,
            "{}: no frame of temporal layer 2: {p}",
            p["user_id"]
        );
    }
}

/// Run the load tester against `focus` in direct mode (one room of `publishers`, calling
/// `focus_user`) until it ends; it must succeed. Returns its output with the focus's log, for
/// the checks' messages.
pub fn run_direct(focus: &Focus, focus_user: &str, publishers: usize, json: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_weir-loadtest"))
        .args(["run", "--direct"])
        .arg(format!("http://127.0.0.1:{}", focus.http_port))
        .args(["--direct-token", DIRECT_TOKEN, "--focus-user", focus_user])
        .args([
            "--focus-device",
            "WEIRFOCUS",
            "--rooms",
            "1",
            "--publishers",
        ])
        .arg(publishers.to_string())
        .args(["--duration", "5", "--setup-timeout", "60", "--quiet"])
        .arg("--focus-metrics")
        .arg(format!("http://127.0.0.1:{}/metrics", focus.http_port))
        .arg("--json")
        .arg(json)
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
    context
}
