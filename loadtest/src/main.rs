//! `weir-loadtest`: how many participants does this focus machine hold?

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use weir_loadtest::call::Layout;
use weir_loadtest::impair::Impairment;
use weir_loadtest::run::{self, RunConfig, Signalling, Site};
use weir_loadtest::source::VideoShape;

#[derive(Parser, Debug)]
#[command(
    name = "weir-loadtest",
    version,
    about = "Load-test a weir focus with simulated participants (real WebRTC stacks, Matrix signalling)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a load test.
    Run(Box<RunArgs>),
    /// Register one account with the homeserver's shared secret (e.g. the focus's) and print
    /// its user id.
    Register(RegisterArgs),
}

#[derive(Args, Debug)]
struct SecretArgs {
    /// Client-server API of the homeserver.
    #[arg(long, default_value = "http://127.0.0.1:8008")]
    homeserver: String,
    /// Synapse `registration_shared_secret`.
    #[arg(long, env = "WEIR_REGISTRATION_SECRET", hide_env_values = true)]
    registration_secret: Option<String>,
    /// File holding the shared secret (e.g. scripts/synapse.sh's DIR/shared_secret).
    #[arg(long)]
    registration_secret_file: Option<PathBuf>,
}

impl SecretArgs {
    fn secret(&self) -> Result<String, String> {
        if let Some(s) = &self.registration_secret {
            return Ok(s.clone());
        }
        match &self.registration_secret_file {
            Some(p) => std::fs::read_to_string(p)
                .map(|s| s.trim().to_string())
                .map_err(|e| format!("reading {}: {e}", p.display())),
            None => Err("--registration-secret or --registration-secret-file is needed".into()),
        }
    }
}

#[derive(Args, Debug)]
struct RegisterArgs {
    #[command(flatten)]
    hs: SecretArgs,
    /// Localpart of the new account.
    #[arg(long)]
    user: String,
    #[arg(long)]
    password: String,
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    hs: SecretArgs,
    /// The focus's Matrix user id.
    #[arg(long, default_value = "@focus:localhost")]
    focus_user: String,
    /// The focus's device id.
    #[arg(long, default_value = "WEIRFOCUS")]
    focus_device: String,
    /// The focus's to-device session id (dest_session_id).
    #[arg(long, default_value = "sfu")]
    focus_session: String,
    /// A cascade shape: another homeserver and its focus, as
    /// `HOMESERVER_URL,SECRET_FILE,FOCUS_USER,FOCUS_DEVICE[,FOCUS_METRICS_URL]`; repeat for
    /// more. With every focus's metrics, the report gives the trunks' bandwidth. Each room's
    /// participants are spread round-robin over the first site (the flags above) and these;
    /// each calls its own site's focus, and the foci trunk to each other.
    #[arg(long = "site")]
    sites: Vec<String>,
    /// Skip the homeserver: signal through the focus's direct endpoint at this base URL.
    #[arg(long, requires = "direct_token")]
    direct: Option<String>,
    /// Bearer token of the direct endpoint.
    #[arg(long)]
    direct_token: Option<String>,
    /// Address the participants' UDP sockets bind to (their media's source). Loopback by
    /// default; a focus elsewhere (another host, a network namespace) needs an address that
    /// routes there.
    #[arg(long, default_value = "127.0.0.1")]
    local_ip: std::net::IpAddr,
    /// Rooms (one conference each).
    #[arg(long, default_value_t = 1)]
    rooms: usize,
    /// Per room: participants publishing audio and 3-layer simulcast video (they also subscribe).
    #[arg(long, default_value_t = 4)]
    publishers: usize,
    /// Per room: participants publishing audio only (they also subscribe).
    #[arg(long, default_value_t = 0)]
    audio_publishers: usize,
    /// Per room: participants that only receive.
    #[arg(long, default_value_t = 0)]
    subscribers: usize,
    /// What each participant subscribes to.
    #[arg(long, value_enum, default_value_t = Layout::All)]
    layout: Layout,
    /// What video publishers send: 3-layer simulcast, or one flat ~1000 packets/s layer.
    #[arg(long, value_enum, default_value_t = VideoShape::Simulcast)]
    video: VideoShape,
    /// Participants started per second.
    #[arg(long, default_value_t = 5.0)]
    join_rate: f64,
    /// Seconds of measurement after setup.
    #[arg(long, default_value_t = 30.0)]
    duration: f64,
    /// Hard cap on setup (accounts, rooms, joins, connects), seconds.
    #[arg(long, default_value_t = 120.0)]
    setup_timeout: f64,
    /// Publishers talking at once per room (audio level and the speaker layout follow them).
    #[arg(long, default_value_t = 1)]
    speakers: usize,
    /// Seconds each speaker turn lasts.
    #[arg(long, default_value_t = 5.0)]
    speaker_turn: f64,
    /// Impairment: packet loss in percent, per direction.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Impairment: one-way delay, ms.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Impairment: delay varies by up to ± this, ms.
    #[arg(long, default_value_t = 0)]
    jitter_ms: u64,
    /// Impairment: bottleneck rate, kbit/s per direction (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    rate_kbps: u64,
    /// Which directions the impairment applies to.
    #[arg(long, value_enum, default_value_t = Direction::Both)]
    impair: Direction,
    /// Share of each room's participants that are impaired (the first ones), 0..=1.
    #[arg(long, default_value_t = 1.0)]
    impaired_fraction: f64,
    /// The focus's Prometheus endpoint, scraped at start and end for CPU per forwarded packet.
    #[arg(long)]
    focus_metrics: Option<String>,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write SVG charts (bitrate, latency, loss over time) into this directory.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Skip measuring the machine's floor.
    #[arg(long)]
    no_floor: bool,
    /// Seed for media sizes, impairment and speaker turns.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Name part of the accounts this run registers (default: random).
    #[arg(long)]
    run_id: Option<String>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Direction {
    Up,
    Down,
    Both,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("weir-loadtest: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.cmd {
        Cmd::Register(a) => {
            let secret = match a.hs.secret() {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("weir-loadtest: {e}");
                    return ExitCode::from(2);
                }
            };
            match rt.block_on(run::register_one(
                &a.hs.homeserver,
                &secret,
                &a.user,
                &a.password,
            )) {
                Ok(s) => {
                    println!("{}", s.user_id);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("weir-loadtest: register: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Run(a) => rt.block_on(run_cmd(*a)),
    }
}

async fn run_cmd(a: RunArgs) -> ExitCode {
    let signalling = match (&a.direct, &a.direct_token) {
        (Some(url), Some(token)) => Signalling::Direct {
            url: url.clone(),
            token: token.clone(),
        },
        _ => match a.hs.secret() {
            Ok(secret) => {
                let mut sites = vec![Site {
                    homeserver: a.hs.homeserver.clone(),
                    registration_secret: secret,
                    focus_user: a.focus_user.clone(),
                    focus_device: a.focus_device.clone(),
                    metrics: a.focus_metrics.clone(),
                }];
                for spec in &a.sites {
                    match Site::parse(spec) {
                        Ok(site) => sites.push(site),
                        Err(e) => {
                            eprintln!("weir-loadtest: --site {spec}: {e}");
                            return ExitCode::from(2);
                        }
                    }
                }
                Signalling::Matrix { sites }
            }
            Err(e) => {
                eprintln!("weir-loadtest: {e} (or use --direct URL --direct-token T)");
                return ExitCode::from(2);
            }
        },
    };
    let valid = |v: f64, max: f64| v.is_finite() && v > 0.0 && v <= max;
    if !valid(a.duration, 86_400.0) || !valid(a.setup_timeout, 3_600.0) {
        eprintln!(
            "weir-loadtest: --duration must be in (0, 86400] s and --setup-timeout in (0, 3600] s"
        );
        return ExitCode::from(2);
    }
    let imp = Impairment {
        loss: (a.loss / 100.0).clamp(0.0, 1.0),
        delay: Duration::from_millis(a.delay_ms),
        jitter: Duration::from_millis(a.jitter_ms),
        rate_bps: a.rate_kbps * 1000,
    };
    let (uplink, downlink) = match a.impair {
        Direction::Up => (imp, Impairment::default()),
        Direction::Down => (Impairment::default(), imp),
        Direction::Both => (imp, imp),
    };
    let cfg = RunConfig {
        signalling,
        focus_user: a.focus_user,
        focus_device: a.focus_device,
        focus_session: a.focus_session,
        local_ip: a.local_ip,
        rooms: a.rooms,
        publishers: a.publishers,
        audio_publishers: a.audio_publishers,
        subscribers: a.subscribers,
        layout: a.layout,
        video: a.video,
        join_rate: a.join_rate,
        duration: Duration::from_secs_f64(a.duration),
        setup_timeout: Duration::from_secs_f64(a.setup_timeout),
        speakers: a.speakers,
        speaker_turn: Duration::from_secs_f64(a.speaker_turn.max(0.1)),
        uplink,
        downlink,
        impaired_fraction: a.impaired_fraction.clamp(0.0, 1.0),
        focus_metrics: a.focus_metrics,
        measure_floor: !a.no_floor,
        seed: a.seed,
        run_id: a
            .run_id
            .unwrap_or_else(|| weir_loadtest::call::gen_id(0, 6).to_lowercase()),
        progress: !a.quiet,
    };
    let (cancel_tx, cancel_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("\nweir-loadtest: interrupted; stopping participants for a partial report");
            let _ = cancel_tx.send(true);
        }
    });
    let report = match run::run(cfg, cancel_rx).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("weir-loadtest: {e}");
            return ExitCode::FAILURE;
        }
    };
    print!("{}", report.table());
    if let Some(path) = &a.json {
        let text = serde_json::to_string_pretty(&report.json()).unwrap_or_default();
        if let Err(e) = std::fs::write(path, text) {
            eprintln!("weir-loadtest: writing {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    if let Some(dir) = &a.plot {
        match report.plots(dir) {
            Ok(files) => {
                for f in files {
                    println!("chart: {}", f.display());
                }
            }
            Err(e) => {
                eprintln!("weir-loadtest: writing charts to {}: {e}", dir.display());
                return ExitCode::FAILURE;
            }
        }
    }
    if report.interrupted {
        return ExitCode::from(130);
    }
    ExitCode::SUCCESS
}
