//! Configuration: a TOML file whose every key can be overridden by an environment variable
//! `WEIR_<SECTION>_<KEY>` (for example `WEIR_MATRIX_PASSWORD`, `WEIR_HTTP_LISTEN`). Every key
//! is documented in `focus/weir-focus.example.toml`; a test keeps that file and this struct in
//! step.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub matrix: MatrixConfig,
    #[serde(default)]
    pub media: MediaConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub web: WebConfig,
}

/// The operator's API (`focus/src/admin.rs`): off unless `listen` is set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// `ip:port` of a private listener; empty: no admin API.
    pub listen: String,
    /// Bearer token every request must carry.
    pub token: String,
    /// How long a drain started without a deadline may take, in seconds.
    pub drain_deadline_s: u64,
}

impl AdminConfig {
    /// The listener's address, when the admin API is on.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.listen.parse().ok()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MatrixConfig {
    /// Sign in to a homeserver (the normal case). `false` runs the focus in direct mode only
    /// (`http.direct_token` required): the media plane load-tested alone, no homeserver.
    pub enabled: bool,
    pub homeserver_url: String,
    pub user_id: String,
    pub password: String,
    pub access_token: String,
    pub device_id: String,
    pub session_id: String,
    pub state_dir: PathBuf,
    pub allowed_servers: Vec<String>,
    pub reorder_timeout_ms: u64,
    /// Run as an application service with these tokens (both set, or neither).
    pub appservice_as_token: String,
    pub appservice_hs_token: String,
}

impl Default for MatrixConfig {
    fn default() -> Self {
        MatrixConfig {
            enabled: true,
            homeserver_url: "http://127.0.0.1:8008".into(),
            user_id: String::new(),
            password: String::new(),
            access_token: String::new(),
            device_id: "WEIRFOCUS".into(),
            session_id: "sfu".into(),
            state_dir: PathBuf::from("var/focus-state"),
            allowed_servers: Vec::new(),
            reorder_timeout_ms: 1000,
            appservice_as_token: String::new(),
            appservice_hs_token: String::new(),
        }
    }
}

impl MatrixConfig {
    /// The appservice tokens, when the focus runs as one.
    pub fn appservice(&self) -> Option<weir_signalling::AppserviceTokens> {
        (!self.appservice_as_token.is_empty()).then(|| weir_signalling::AppserviceTokens {
            as_token: self.appservice_as_token.clone(),
            hs_token: self.appservice_hs_token.clone(),
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MediaConfig {
    pub shards: usize,
    /// Peers of one conference per shard before it spreads onto another (0: never).
    pub spread_conference_above: usize,
    pub bind_ip: IpAddr,
    pub port_base: u16,
    pub advertise_ips: Vec<IpAddr>,
    /// ICE over TCP on this port (0: off).
    pub tcp_port: u16,
    /// Every shard's UDP socket on `port_base` alone.
    pub single_port: bool,
    /// A STUN server (`host:port`) asked for the focus's public address: at startup when
    /// `advertise_ips` is empty, and by `--check-network`. Empty: none.
    pub stun_server: String,
    pub connect_timeout_s: u64,
    pub silence_timeout_s: u64,
    pub socket_buffer_bytes: usize,
    pub rtx_history_packets: usize,
    pub audio_loudest_n: usize,
    pub audio_loudest_above: usize,
    pub estimate_from_kbps: u64,
}

impl Default for MediaConfig {
    fn default() -> Self {
        MediaConfig {
            shards: 0,
            spread_conference_above: weir_sfu::DEFAULT_SPREAD_CONFERENCE_ABOVE,
            bind_ip: IpAddr::from([127, 0, 0, 1]),
            port_base: 0,
            advertise_ips: vec![IpAddr::from([127, 0, 0, 1])],
            tcp_port: 0,
            single_port: false,
            stun_server: String::new(),
            connect_timeout_s: 30,
            silence_timeout_s: 15,
            socket_buffer_bytes: weir_sfu::DEFAULT_SOCKET_BUFFER_BYTES,
            rtx_history_packets: weir_sfu::DEFAULT_RTX_HISTORY_PACKETS,
            audio_loudest_n: 0,
            audio_loudest_above: 20,
            estimate_from_kbps: weir_sfu::DEFAULT_ESTIMATE_FROM_BPS / 1000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    pub direct_token: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            direct_token: String::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub level: String,
    pub json: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            json: false,
        }
    }
}

/// The web app served on the HTTP listener (`focus/src/web.rs`): off unless `root` is set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct WebConfig {
    /// Directory of the built app (`web/dist/app`), served at `/`; empty: no web app.
    pub root: PathBuf,
    /// The homeserver URL browsers are told to use in `/config.json`; empty:
    /// `matrix.homeserver_url`.
    pub homeserver_url: String,
}

impl WebConfig {
    /// Whether the web app is served.
    pub fn enabled(&self) -> bool {
        !self.root.as_os_str().is_empty()
    }
}

impl Config {
    /// Read the file (if any), apply `WEIR_*` environment overrides, validate.
    pub fn load(
        path: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.to_path_buf(),
                source,
            })?,
            None => String::new(),
        };
        let shown = path
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("<defaults>"));
        let mut table: toml::Table =
            toml::from_str(&text).map_err(|source| ConfigError::Parse {
                path: shown.clone(),
                source,
            })?;
        let defaults = toml::Table::try_from(Config::default())
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        for (section, keys) in &defaults {
            let Some(keys) = keys.as_table() else {
                continue;
            };
            for key in keys.keys() {
                let var = format!("WEIR_{}_{}", section.to_uppercase(), key.to_uppercase());
                if let Some(raw) = env(&var) {
                    let value = parse_env_value(&raw, &keys[key]);
                    let entry = table
                        .entry(section.clone())
                        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                    if let Some(t) = entry.as_table_mut() {
                        t.insert(key.clone(), value);
                    }
                }
            }
        }
        let config: Config =
            toml::Value::Table(table)
                .try_into()
                .map_err(|source| ConfigError::Parse {
                    path: shown,
                    source,
                })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let a = &self.admin;
        if !a.listen.is_empty() {
            if a.listen_addr().is_none() {
                return Err(ConfigError::Invalid(format!(
                    "admin.listen {:?} is not ip:port",
                    a.listen
                )));
            }
            if a.token.len() < 16 {
                return Err(ConfigError::Invalid(
                    "admin.listen needs admin.token, at least 16 characters: the admin API ends calls"
                        .into(),
                ));
            }
        }
        let m = &self.matrix;
        if m.enabled {
            if m.user_id.is_empty() {
                return Err(ConfigError::Invalid("matrix.user_id is required".into()));
            }
            if m.appservice_as_token.is_empty() != m.appservice_hs_token.is_empty() {
                return Err(ConfigError::Invalid(
                    "matrix.appservice_as_token and matrix.appservice_hs_token go together".into(),
                ));
            }
            if m.password.is_empty()
                && m.access_token.is_empty()
                && m.appservice_as_token.is_empty()
            {
                return Err(ConfigError::Invalid(
                    "one of matrix.password, matrix.access_token or the appservice tokens is required".into(),
                ));
            }
        } else if self.http.direct_token.is_empty() {
            return Err(ConfigError::Invalid(
                "matrix.enabled = false needs http.direct_token: without a homeserver, direct \
                 mode is the only way to call the focus"
                    .into(),
            ));
        }
        if !m.user_id.is_empty() {
            if let Err(e) = weir_signalling::UserId::try_from(m.user_id.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "matrix.user_id {:?} is not a Matrix user id (@local:server): {e}",
                    m.user_id
                )));
            }
        }
        if m.session_id.is_empty() {
            return Err(ConfigError::Invalid(
                "matrix.session_id must not be empty".into(),
            ));
        }
        if self.media.advertise_ips.is_empty() && self.media.stun_server.is_empty() {
            return Err(ConfigError::Invalid(
                "media.advertise_ips must list at least one address, or media.stun_server \
                 must name a STUN server to ask for it"
                    .into(),
            ));
        }
        if let Some(ip) = self
            .media
            .advertise_ips
            .iter()
            .find(|ip| ip.is_unspecified())
        {
            return Err(ConfigError::Invalid(format!(
                "media.advertise_ips lists {ip}: participants cannot send to the unspecified \
                 address; list the address they reach this host at"
            )));
        }
        if self.web.enabled() {
            let root = &self.web.root;
            match std::fs::metadata(root) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(ConfigError::Invalid(format!(
                        "web.root {} is not a directory: set it to the built web app \
                         (web/dist/app), or leave it empty to serve no app",
                        root.display()
                    )))
                }
                Err(e) => {
                    return Err(ConfigError::Invalid(format!(
                        "web.root {}: {e}: set it to the built web app's directory \
                         (web/dist/app), or leave it empty to serve no app",
                        root.display()
                    )))
                }
            }
        }
        Ok(())
    }

    pub fn shards(&self) -> usize {
        if self.media.shards == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            self.media.shards
        }
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.media.connect_timeout_s)
    }

    pub fn silence_timeout(&self) -> Duration {
        Duration::from_secs(self.media.silence_timeout_s)
    }
}

/// An environment value takes the type of the default it overrides: lists are comma-separated,
/// numbers and booleans are parsed, everything else is a string.
fn parse_env_value(raw: &str, like: &toml::Value) -> toml::Value {
    match like {
        toml::Value::Integer(_) => raw
            .trim()
            .parse()
            .map(toml::Value::Integer)
            .unwrap_or_else(|_| raw.into()),
        toml::Value::Boolean(_) => raw
            .trim()
            .parse()
            .map(toml::Value::Boolean)
            .unwrap_or_else(|_| raw.into()),
        toml::Value::Array(_) => toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_string()))
                .collect(),
        ),
        _ => toml::Value::String(raw.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn the_example_file_documents_every_key_and_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("weir-focus.example.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let defaults = toml::Table::try_from(Config::default()).unwrap();
        for (section, keys) in &defaults {
            assert!(
                text.contains(&format!("[{section}]")),
                "section [{section}] missing from example"
            );
            for key in keys.as_table().unwrap().keys() {
                let documented = text.lines().any(|l| {
                    let l = l.trim_start_matches('#').trim_start();
                    l.starts_with(&format!("{key} =")) || l.starts_with(&format!("{key}="))
                });
                assert!(
                    documented,
                    "{section}.{key} is not documented in the example file"
                );
            }
        }
        let c = Config::load(Some(&path), no_env).unwrap();
        assert_eq!(c.matrix.session_id, "sfu");
    }

    #[test]
    fn environment_overrides_file_values_with_the_right_types() {
        let dir = std::env::temp_dir().join(format!("weir-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(
            &file,
            "[matrix]\nuser_id = \"@f:hs\"\npassword = \"x\"\n[media]\nshards = 1\n",
        )
        .unwrap();
        let env: HashMap<&str, &str> = [
            ("WEIR_MEDIA_SHARDS", "3"),
            ("WEIR_MEDIA_ADVERTISE_IPS", "127.0.0.1, ::1"),
            ("WEIR_HTTP_LISTEN", "127.0.0.1:9999"),
            ("WEIR_LOG_JSON", "true"),
        ]
        .into();
        let c = Config::load(Some(&file), |k| env.get(k).map(|v| v.to_string())).unwrap();
        assert_eq!(c.media.shards, 3);
        assert_eq!(c.media.advertise_ips.len(), 2);
        assert_eq!(c.http.listen.port(), 9999);
        assert!(c.log.json);
        assert_eq!(c.matrix.user_id, "@f:hs");
    }

    #[test]
    fn missing_credentials_and_unknown_keys_are_clear_errors() {
        let err = Config::load(None, no_env).unwrap_err().to_string();
        assert!(err.contains("user_id"), "{err}");
        let dir = std::env::temp_dir().join(format!("weir-config-u-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(
            &file,
            "[matrix]\nuser_id = \"@f:hs\"\npassword = \"x\"\nhomeserver = \"typo\"\n",
        )
        .unwrap();
        let err = Config::load(Some(&file), no_env).unwrap_err().to_string();
        assert!(err.contains("homeserver"), "{err}");
        std::fs::write(&file, "[matrix]\nuser_id = \"focus\"\npassword = \"x\"\n").unwrap();
        let err = Config::load(Some(&file), no_env).unwrap_err().to_string();
        assert!(err.contains("not a Matrix user id"), "{err}");
        // Without Matrix, no credentials are needed, but direct mode is.
        std::fs::write(&file, "[matrix]\nenabled = false\n").unwrap();
        let err = Config::load(Some(&file), no_env).unwrap_err().to_string();
        assert!(err.contains("direct_token"), "{err}");
        std::fs::write(
            &file,
            "[matrix]\nenabled = false\n[http]\ndirect_token = \"t\"\n",
        )
        .unwrap();
        let c = Config::load(Some(&file), no_env).unwrap();
        assert!(!c.matrix.enabled);
    }

    #[test]
    fn web_root_must_be_an_existing_directory() {
        let dir = std::env::temp_dir().join(format!("weir-config-web-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        let with_root = |root: &Path| {
            std::fs::write(
                &file,
                format!(
                    "[matrix]\nuser_id = \"@f:hs\"\npassword = \"x\"\n[web]\nroot = {:?}\n",
                    root.display().to_string()
                ),
            )
            .unwrap();
            Config::load(Some(&file), no_env)
        };
        let c = with_root(&dir).unwrap();
        assert!(c.web.enabled());
        assert_eq!(c.web.root, dir);
        let missing = dir.join("no-such-app");
        let err = with_root(&missing).unwrap_err().to_string();
        assert!(
            err.contains("web.root") && err.contains("no-such-app"),
            "{err}"
        );
        let err = with_root(&file).unwrap_err().to_string();
        assert!(err.contains("not a directory"), "{err}");
        // Off by default, and settable from the environment.
        let c = Config::load(None, |k| match k {
            "WEIR_MATRIX_USER_ID" => Some("@f:hs".into()),
            "WEIR_MATRIX_PASSWORD" => Some("x".into()),
            "WEIR_WEB_ROOT" => Some(dir.display().to_string()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.web.root, dir);
        assert!(!Config::default().web.enabled());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
