//! `weir-focus`: a Matrix focus (MSC3401 SFU). Wires Matrix signalling to the media plane.

mod admin;
mod appservice;
mod conductor;
mod config;
mod direct;
mod http;
mod metrics;
mod network_check;
mod web;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

use crate::conductor::Conductor;
use crate::config::Config;
use crate::metrics::Metrics;

/// A selective forwarding unit for Matrix native group calls: participants call this focus
/// (a Matrix user + device) with ordinary to-device m.call.* events, and it forwards their
/// media to each other without ever holding media keys.
#[derive(Parser, Debug)]
#[command(name = "weir-focus", version, about, long_about = None)]
struct Cli {
    /// Path to the TOML configuration (see focus/weir-focus.example.toml). Every key can be
    /// overridden by an environment variable WEIR_<SECTION>_<KEY>.
    #[arg(short, long, env = "WEIR_CONFIG")]
    config: Option<PathBuf>,
    /// Validate the configuration, print it (without secrets) and exit.
    #[arg(long)]
    check_config: bool,
    /// Check what participants would see of the focus's network (ports, advertised
    /// addresses, the STUN server's view, reachability), print it and exit: 0 if nothing is
    /// wrong, 1 if something is. Run it before starting the focus: it binds the media ports.
    #[arg(long)]
    check_network: bool,
    /// Ask the running focus's /healthz (on http.listen) and exit 0 if it is healthy, 1 if
    /// not: a container health check that needs no HTTP client in the image.
    #[arg(long)]
    healthcheck: bool,
    /// Print the application-service registration for this focus (matrix.user_id, the
    /// appservice tokens, http.listen as its URL) and exit; the homeserver loads it from
    /// `app_service_config_files`.
    #[arg(long)]
    appservice_registration: bool,
}

/// Events queued from the media shards to the conductor. Events are per signalling action (not
/// per packet), so this only fills if the conductor is stuck; shards count what they drop.
const SFU_EVENT_QUEUE: usize = 16_384;
/// How often the conductor's timers (trunk redials) are checked: the granularity of the
/// shortest redial delay; cheap, since it only looks at owed redials.
const CONDUCTOR_TICK: Duration = Duration::from_millis(250);
/// How long shutdown waits for the hangups to reach the homeserver.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(5);

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref(), |k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("weir-focus: configuration error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    init_tracing(&config);
    if cli.check_config {
        let mut shown = config.clone();
        for s in [
            &mut shown.matrix.password,
            &mut shown.matrix.access_token,
            &mut shown.http.direct_token,
        ] {
            if !s.is_empty() {
                *s = "<set>".into();
            }
        }
        println!("{}", toml::to_string_pretty(&shown).unwrap_or_default());
        return std::process::ExitCode::SUCCESS;
    }
    if cli.appservice_registration {
        let Some(tokens) = config.matrix.appservice() else {
            eprintln!(
                "weir-focus: set matrix.appservice_as_token and matrix.appservice_hs_token first"
            );
            return std::process::ExitCode::from(2);
        };
        let Ok(user) = weir_signalling::UserId::try_from(config.matrix.user_id.as_str()) else {
            eprintln!("weir-focus: matrix.user_id is not a user id");
            return std::process::ExitCode::from(2);
        };
        let mut listen = config.http.listen;
        if listen.ip().is_unspecified() {
            listen.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        print!(
            "{}",
            weir_signalling::registration_yaml(
                "weir-focus",
                &format!("http://{listen}"),
                &tokens,
                &user
            )
        );
        return std::process::ExitCode::SUCCESS;
    }
    if cli.healthcheck {
        return match http::probe_health(config.http.listen, Duration::from_secs(3)) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("weir-focus: unhealthy: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    if cli.check_network {
        let found = network_check::check(&config);
        for f in &found {
            println!("{f}");
        }
        let bad = found
            .iter()
            .any(|f| f.level == network_check::Level::Problem);
        return std::process::ExitCode::from(u8::from(bad));
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("weir-control")
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            error!(error = %e, "cannot start the control-plane runtime");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_tracing(config: &Config) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if config.log.json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn run(config: Config) -> Result<(), String> {
    let mut advertise_ips = config.media.advertise_ips.clone();
    if advertise_ips.is_empty() {
        // Config validation guarantees a STUN server then.
        let bind = std::net::SocketAddr::new(config.media.bind_ip, 0);
        let server = config.media.stun_server.clone();
        let seen = tokio::task::spawn_blocking(move || network_check::discover(bind, &server))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("media.advertise_ips is empty and the STUN server failed: {e}"))?;
        info!(address = %seen.ip(), stun_server = %config.media.stun_server, "public address from the STUN server: advertised");
        advertise_ips.push(seen.ip());
    }
    let metrics = Arc::new(Metrics::new());
    let (sfu_tx, mut sfu_rx) = tokio::sync::mpsc::channel(SFU_EVENT_QUEUE);
    let sfu_config = weir_sfu::SfuConfig {
        shards: config.shards(),
        bind_ip: config.media.bind_ip,
        port_base: config.media.port_base,
        advertise_ips,
        tcp_port: (config.media.tcp_port != 0).then_some(config.media.tcp_port),
        single_port: config.media.single_port,
        connect_timeout: config.connect_timeout(),
        silence_timeout: config.silence_timeout(),
        socket_buffer_bytes: config.media.socket_buffer_bytes,
        rtx_history_packets: config.media.rtx_history_packets,
        audio_loudest_n: config.media.audio_loudest_n,
        audio_loudest_above: config.media.audio_loudest_above,
        spread_conference_above: config.media.spread_conference_above,
        estimate_from_bps: (config.media.estimate_from_kbps > 0)
            .then_some(config.media.estimate_from_kbps * 1000),
    };
    let sfu = Arc::new(weir_sfu::Sfu::start(sfu_config, sfu_tx).map_err(|e| e.to_string())?);
    info!(addrs = ?sfu.local_addrs(), "media plane started");
    metrics.register_sfu(sfu.clone());

    // Matrix signalling, unless the focus runs in direct mode only (then `legs` never
    // delivers: its sender is kept, unused, until the focus stops).
    let (_no_matrix, no_legs) = tokio::sync::mpsc::channel(1);
    let (signalling, mut legs) = if config.matrix.enabled {
        let sig_config = signalling_config(&config);
        let (signalling, legs) = weir_signalling::start(sig_config, &metrics.registry)
            .await
            .map_err(|e| format!("matrix login/sync failed: {e}"))?;
        info!(user = %signalling.user_id(), device = %signalling.device_id(), "signed in to matrix");
        (Some(Arc::new(signalling)), legs)
    } else {
        info!("matrix disabled: direct mode only");
        (None, no_legs)
    };
    // Who the focus is on the wire: its Matrix identity, or the configured one without Matrix.
    let (own_user, own_device) = match &signalling {
        Some(s) => (s.user_id().clone(), s.device_id().clone()),
        None => (
            direct_only_user(&config.matrix.user_id),
            config.matrix.device_id.as_str().into(),
        ),
    };

    // Direct mode (load testing without a homeserver): off unless a token is configured.
    let (direct_tx, mut direct_rx) = tokio::sync::mpsc::channel(1024);
    let direct = if config.http.direct_token.is_empty() {
        None
    } else {
        let me = weir_signalling::wire::Identity {
            user_id: own_user.clone(),
            device_id: own_device.clone(),
            session_id: config.matrix.session_id.as_str().into(),
        };
        let hub = direct::DirectHub::new(&config.http.direct_token, me, direct_tx)
            .map_err(|e| e.to_string())?;
        let ticker = hub.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(100));
            loop {
                every.tick().await;
                ticker.tick();
            }
        });
        info!("direct mode enabled at /direct/v1/events");
        Some(hub)
    };

    let ready_handle = signalling.clone();
    let media = sfu.clone();
    let drain_gauge = metrics.draining.clone();
    let http = http::serve(
        config.http.listen,
        http::HttpState {
            metrics: metrics.clone(),
            health: Arc::new(move || {
                health(ready_handle.as_deref(), &media)?;
                // Draining: alive, but not to be sent new calls (a readiness probe fails).
                if drain_gauge.get() > 0 {
                    return Err("draining: no new conferences".into());
                }
                Ok(())
            }),
        },
        {
            // Extra routes: direct mode, the homeserver's transactions as an appservice, and
            // the web app (its files a fallback, so every other route keeps precedence).
            let direct_routes = direct.clone().map(direct::routes);
            let as_routes = signalling.as_ref().and_then(|s| {
                let inbox = s.appservice_inbox()?;
                Some(appservice::routes(
                    &config.matrix.appservice_hs_token,
                    s.user_id().as_str(),
                    inbox,
                ))
            });
            let web_routes = if config.web.enabled() {
                let app = web::AppConfig {
                    homeserver_url: if config.web.homeserver_url.is_empty() {
                        config.matrix.homeserver_url.clone()
                    } else {
                        config.web.homeserver_url.clone()
                    },
                    focus: web::FocusIdentity {
                        user_id: own_user.to_string(),
                        device_id: own_device.to_string(),
                        session_id: config.matrix.session_id.clone(),
                    },
                };
                let routes = web::routes(&config.web.root, &app)
                    .map_err(|e| format!("web.root {}: {e}", config.web.root.display()))?;
                info!(root = %config.web.root.display(), homeserver = %app.homeserver_url, "serving the web app");
                Some(routes)
            } else {
                None
            };
            [direct_routes, as_routes, web_routes]
                .into_iter()
                .flatten()
                .reduce(axum::Router::merge)
        },
    )
    .await
    .map_err(|e| format!("binding http listener {}: {e}", config.http.listen))?;

    // The operator's API, on its own private listener, when configured.
    let (admin_tx, mut admin_rx) = tokio::sync::mpsc::channel(64);
    let admin = match config.admin.listen_addr() {
        Some(addr) => Some(
            admin::serve(
                addr,
                admin::AdminState::new(
                    &config.admin.token,
                    admin_tx,
                    sfu.clone(),
                    config.admin.drain_deadline_s,
                ),
            )
            .await
            .map_err(|e| format!("binding admin listener {addr}: {e}"))?,
        ),
        None => {
            drop(admin_tx);
            None
        }
    };

    let mut conductor = Conductor::new(
        SharedLegs {
            matrix: signalling.clone(),
            direct,
        },
        sfu.clone(),
        metrics.clone(),
        own_user,
        own_device.to_string(),
    );
    let mut ticker = tokio::time::interval(CONDUCTOR_TICK);
    let mut sigterm = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    loop {
        tokio::select! {
            Some(ev) = legs.recv() => conductor.on_leg_event(ev),
            Some(ev) = sfu_rx.recv() => conductor.on_sfu_event(ev),
            Some(ev) = direct_rx.recv() => conductor.on_leg_event(ev),
            Some(req) = admin_rx.recv() => conductor.admin(req, std::time::Instant::now()),
            _ = ticker.tick() => {
                let now = std::time::Instant::now();
                conductor.tick(now);
                conductor.drain_tick(now);
            }
            _ = sigterm.recv() => { info!("SIGTERM: hanging up every call"); break; }
            _ = sigint.recv() => { info!("SIGINT: hanging up every call"); break; }
            else => { warn!("signalling and media plane both stopped"); break; }
        }
        if conductor.drained() {
            info!("drained: the last participant has left");
            break;
        }
    }
    info!(legs = conductor.participant_count(), "hanging up");
    conductor.hang_up_all();
    http.abort();
    let _ = http.await; // the server's state holds a handle on signalling
    if let Some(a) = admin {
        a.abort();
        let _ = a.await;
    }
    let sfu_stop = sfu.clone();
    let _ = tokio::task::spawn_blocking(move || sfu_stop.shutdown()).await;
    drop(conductor);
    match signalling.map(Arc::try_unwrap) {
        None => {}
        Some(Ok(s)) => {
            let flushed = tokio::time::timeout(SHUTDOWN_FLUSH, s.shutdown()).await;
            if flushed.is_err() {
                warn!("hangups were not all delivered within {:?}", SHUTDOWN_FLUSH);
            }
        }
        Some(Err(_)) => warn!("signalling still shared at shutdown; hangups may not be flushed"),
    }
    info!("stopped");
    Ok(())
}

/// `/healthz`: signed in and synced (when Matrix is on), and every media shard running.
fn health(
    signalling: Option<&weir_signalling::SignallingHandle>,
    media: &weir_sfu::Sfu,
) -> Result<(), String> {
    if signalling.is_some_and(|s| !s.is_ready()) {
        return Err("starting: not logged in or first sync not done".into());
    }
    let dead: Vec<usize> = media
        .shards_alive()
        .iter()
        .enumerate()
        .filter(|(_, alive)| !**alive)
        .map(|(i, _)| i)
        .collect();
    if dead.is_empty() {
        Ok(())
    } else {
        Err(format!("media shards stopped: {dead:?}"))
    }
}

/// The focus's user id without Matrix: the configured one, else a fixed placeholder (it only
/// appears in the events direct-mode clients receive).
fn direct_only_user(configured: &str) -> weir_signalling::UserId {
    weir_signalling::UserId::try_from(configured)
        .or_else(|_| weir_signalling::UserId::try_from("@weir-focus:direct.invalid"))
        .expect("the placeholder is a valid user id")
}

/// Where the conductor's call signalling goes: the Matrix side, or direct mode for its legs.
struct SharedLegs {
    matrix: Option<Arc<weir_signalling::SignallingHandle>>,
    direct: Option<direct::DirectHub>,
}

impl conductor::LegSender for SharedLegs {
    fn send(&self, cmd: weir_signalling::LegCommand) {
        match (&self.direct, &self.matrix) {
            (Some(d), _) if direct::is_direct(&cmd.leg().room_id) => d.command(cmd),
            (_, Some(m)) => m.send(cmd),
            (_, None) => {
                warn!(leg = %cmd.leg().call_id, "no Matrix signalling for this leg; dropped")
            }
        }
    }
}

fn signalling_config(config: &Config) -> weir_signalling::SignallingConfig {
    let m = &config.matrix;
    let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_string());
    let mut c = weir_signalling::SignallingConfig::new(
        m.homeserver_url.clone(),
        weir_signalling::UserId::try_from(m.user_id.as_str())
            .expect("matrix.user_id is checked when the configuration is loaded"),
        m.state_dir.clone(),
    );
    c.password = non_empty(&m.password);
    c.access_token = non_empty(&m.access_token);
    c.device_id = non_empty(&m.device_id).map(|d| d.as_str().into());
    c.session_id = m.session_id.as_str().into();
    c.allowed_servers = m.allowed_servers.clone();
    c.reorder_timeout = Duration::from_millis(m.reorder_timeout_ms);
    c.appservice = m.appservice();
    c
}
