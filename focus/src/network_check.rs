//! What a participant would see of this focus's network: `weir-focus --check-network`, and the
//! STUN query that finds the public address at startup when none is configured.
//!
//! The check binds the media ports itself, so it runs before the focus starts (or beside a
//! focus using other ports). It reports, for the operator to act on:
//! - whether the UDP (and TCP) ports can be bound;
//! - what each advertised address is (loopback, private, public; on this host or not);
//! - what a STUN server, if configured, says the focus's packets come from, against what is
//!   advertised: the mistake behind most "waiting for media" reports;
//! - whether a datagram (and a TCP connection) sent to each advertised address reaches the
//!   focus's own socket, which a NAT without hairpinning may not allow even when outside
//!   participants get through.

use std::fmt;
use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::time::{Duration, Instant};

use weir_sfu::stun;

use crate::config::Config;

/// How long to wait for a STUN server's answer to one request; it is sent up to
/// [`STUN_TRIES`] times. A server across the internet answers in well under this.
const STUN_WAIT: Duration = Duration::from_millis(700);
const STUN_TRIES: usize = 3;
/// How long a probe datagram or connection to an advertised address may take to arrive.
const PROBE_WAIT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    Warning,
    Problem,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub level: Level,
    pub text: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.level {
            Level::Ok => "ok     ",
            Level::Warning => "warning",
            Level::Problem => "PROBLEM",
        };
        write!(f, "{tag}  {}", self.text)
    }
}

/// Ask the STUN server `server` (`host:port`) what address packets from `bind` come from.
pub fn discover(bind: SocketAddr, server: &str) -> Result<SocketAddr, String> {
    let to = server
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve STUN server {server:?}: {e}"))?
        .find(|a| a.is_ipv4() == bind.is_ipv4())
        .ok_or_else(|| format!("STUN server {server:?} has no address of the bind family"))?;
    let socket = UdpSocket::bind(bind).map_err(|e| format!("binding {bind}: {e}"))?;
    socket
        .set_read_timeout(Some(STUN_WAIT))
        .map_err(|e| e.to_string())?;
    let txid: [u8; 12] = rand_txid();
    let request = stun::binding_request(txid);
    let mut buf = [0u8; 1500];
    for _ in 0..STUN_TRIES {
        socket
            .send_to(&request, to)
            .map_err(|e| format!("sending to {to}: {e}"))?;
        let until = Instant::now() + STUN_WAIT;
        while Instant::now() < until {
            match socket.recv_from(&mut buf) {
                Ok((n, from)) if from == to => {
                    if let Some(mapped) = stun::mapped_address(&buf[..n], txid) {
                        return Ok(mapped);
                    }
                }
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
                Err(e) => return Err(format!("receiving from {to}: {e}")),
            }
        }
    }
    Err(format!(
        "no answer from STUN server {to} after {STUN_TRIES} tries"
    ))
}

fn rand_txid() -> [u8; 12] {
    let mut t = [0u8; 12];
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let seed = nanos ^ u128::from(std::process::id()) << 64;
    t.copy_from_slice(&seed.to_le_bytes()[..12]);
    t
}

/// What kind of address `ip` is, for a participant trying to reach it.
pub fn kind(ip: IpAddr) -> &'static str {
    match ip {
        IpAddr::V4(v4) if v4.is_loopback() => "loopback (this machine only)",
        IpAddr::V4(v4) if v4.is_private() => {
            "private (RFC 1918: reachable only inside its network)"
        }
        IpAddr::V4(v4) if v4.is_link_local() => "link-local (this network segment only)",
        IpAddr::V4(v4) if v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64 => {
            "carrier-grade NAT (RFC 6598: not reachable from the internet)"
        }
        IpAddr::V6(v6) if v6.is_loopback() => "loopback (this machine only)",
        IpAddr::V6(v6) if (v6.segments()[0] & 0xfe00) == 0xfc00 => {
            "unique local (reachable only inside its network)"
        }
        IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80 => {
            "link-local (this network segment only)"
        }
        _ => "public",
    }
}

/// Whether `ip` is an address of this host (a socket can be bound to it).
fn is_local(ip: IpAddr) -> bool {
    UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// Run every check for `config`.
pub fn check(config: &Config) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut say = |level: Level, text: String| out.push(Finding { level, text });
    let m = &config.media;
    let bind = SocketAddr::new(m.bind_ip, m.port_base);
    let media = match UdpSocket::bind(bind) {
        Ok(s) => s,
        Err(e) => {
            say(
                Level::Problem,
                format!("cannot bind UDP {bind}: {e} (a running focus holds its ports: stop it, or check with another port_base)"),
            );
            return out;
        }
    };
    let port = media.local_addr().map(|a| a.port()).unwrap_or(0);
    say(
        Level::Ok,
        format!(
            "UDP media socket bound on {}:{port}{}",
            m.bind_ip,
            if m.port_base == 0 {
                " (port_base = 0: an ephemeral port each start; a firewall cannot be opened for it)"
            } else {
                ""
            }
        ),
    );

    // What participants are told, and what a STUN server sees.
    let mut advertised = m.advertise_ips.clone();
    if !m.stun_server.is_empty() {
        match discover(SocketAddr::new(m.bind_ip, 0), &m.stun_server) {
            Ok(seen) if advertised.is_empty() => {
                say(Level::Ok, format!("STUN server {} sees this focus as {}: with advertise_ips empty, that is what participants are told", m.stun_server, seen.ip()));
                advertised.push(seen.ip());
            }
            Ok(seen) if advertised.contains(&seen.ip()) => say(
                Level::Ok,
                format!("STUN server {} sees this focus as {}, which is advertised", m.stun_server, seen.ip()),
            ),
            Ok(seen) => say(
                Level::Problem,
                format!(
                    "STUN server {} sees this focus's packets come from {}, but advertise_ips lists {}: participants beyond that NAT are told an address they cannot reach, and their media never arrives. Set media.advertise_ips = [\"{}\"] (or leave it empty to ask the STUN server at startup)",
                    m.stun_server,
                    seen.ip(),
                    list(&advertised),
                    seen.ip()
                ),
            ),
            Err(e) => say(Level::Problem, format!("STUN server {}: {e}", m.stun_server)),
        }
    } else {
        say(
            Level::Warning,
            "no media.stun_server: the address participants' packets must reach is not checked against advertise_ips".into(),
        );
    }
    if advertised.is_empty() {
        say(
            Level::Problem,
            "no address to advertise: set media.advertise_ips or media.stun_server".into(),
        );
        return out;
    }
    for ip in &advertised {
        let local = is_local(*ip);
        let level = if ip.is_loopback() && !m.bind_ip.is_loopback() {
            Level::Warning
        } else {
            Level::Ok
        };
        say(
            level,
            format!(
                "advertised {ip}: {}, {}",
                kind(*ip),
                if local {
                    "an address of this host"
                } else {
                    "not an address of this host (a NAT or load balancer in front must forward the media ports to it unchanged)"
                }
            ),
        );
    }

    // Does a datagram sent to each advertised address reach the media socket?
    let _ = media.set_read_timeout(Some(PROBE_WAIT));
    for ip in &advertised {
        let to = SocketAddr::new(*ip, port);
        let reached = probe_udp(&media, m.bind_ip, to);
        say(
            if reached { Level::Ok } else { Level::Warning },
            if reached {
                format!("UDP to {to} reaches the media socket")
            } else {
                format!("UDP to {to} did not reach the media socket within {PROBE_WAIT:?} (from this host: a NAT without hairpinning drops it even when outside participants get through; check from outside)")
            },
        );
    }

    if m.tcp_port != 0 {
        let tcp_bind = SocketAddr::new(m.bind_ip, m.tcp_port);
        match TcpListener::bind(tcp_bind) {
            Err(e) => say(
                Level::Problem,
                format!("cannot bind ICE-TCP {tcp_bind}: {e}"),
            ),
            Ok(listener) => {
                say(Level::Ok, format!("ICE-TCP listener bound on {tcp_bind}"));
                for ip in &advertised {
                    let to = SocketAddr::new(*ip, m.tcp_port);
                    let reached = TcpStream::connect_timeout(&to, PROBE_WAIT).is_ok()
                        && listener.set_nonblocking(true).is_ok()
                        && accept_within(&listener, PROBE_WAIT);
                    say(
                        if reached { Level::Ok } else { Level::Warning },
                        if reached {
                            format!("TCP to {to} reaches the ICE-TCP listener")
                        } else {
                            format!("TCP to {to} did not reach the ICE-TCP listener (from this host; check from outside)")
                        },
                    );
                }
            }
        }
    } else {
        say(
            Level::Warning,
            "media.tcp_port = 0: participants whose networks block UDP cannot connect".into(),
        );
    }
    out
}

/// Send a STUN binding request to `to` from another socket and wait for it on `media`.
fn probe_udp(media: &UdpSocket, bind_ip: IpAddr, to: SocketAddr) -> bool {
    let from_ip = if bind_ip.is_unspecified() || bind_ip.is_ipv4() != to.is_ipv4() {
        if to.is_ipv4() {
            IpAddr::from([0, 0, 0, 0])
        } else {
            IpAddr::from([0u16; 8])
        }
    } else {
        bind_ip
    };
    let Ok(probe) = UdpSocket::bind(SocketAddr::new(from_ip, 0)) else {
        return false;
    };
    let request = stun::binding_request(rand_txid());
    if probe.send_to(&request, to).is_err() {
        return false;
    }
    let until = Instant::now() + PROBE_WAIT;
    let mut buf = [0u8; 1500];
    while Instant::now() < until {
        match media.recv_from(&mut buf) {
            Ok((n, _)) if buf[..n] == request => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
    }
    false
}

fn accept_within(listener: &TcpListener, wait: Duration) -> bool {
    let until = Instant::now() + wait;
    while Instant::now() < until {
        match listener.accept() {
            Ok(_) => return true,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(_) => return false,
        }
    }
    false
}

fn list(ips: &[IpAddr]) -> String {
    let v: Vec<String> = ips.iter().map(|i| i.to_string()).collect();
    format!("[{}]", v.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_named_for_what_reaches_them() {
        let k = |s: &str| kind(s.parse().unwrap());
        assert!(k("127.0.0.1").starts_with("loopback"));
        assert!(k("10.1.2.3").starts_with("private"));
        assert!(k("192.168.1.1").starts_with("private"));
        assert!(k("100.64.0.1").starts_with("carrier-grade"));
        assert!(k("169.254.0.1").starts_with("link-local"));
        assert_eq!(k("203.0.113.5"), "public");
        assert!(k("fd00::1").starts_with("unique local"));
        assert!(k("fe80::1").starts_with("link-local"));
        assert_eq!(k("2001:db8::1"), "public");
    }

    /// A STUN server on loopback that answers the way real ones do (its own socket and
    /// thread), saying `seen` for whoever asks.
    fn stun_server(seen: SocketAddr) -> SocketAddr {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = s.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            if let Ok((n, from)) = s.recv_from(&mut buf) {
                let mut r = buf[..n].to_vec();
                r[..2].copy_from_slice(&0x0101u16.to_be_bytes());
                let ip = match seen.ip() {
                    IpAddr::V4(v4) => v4.octets(),
                    IpAddr::V6(_) => unreachable!(),
                };
                let port = seen.port() ^ 0x2112;
                let x = [0x21, 0x12, 0xa4, 0x42];
                let mut attr = vec![0x00, 0x20, 0x00, 0x08, 0x00, 0x01];
                attr.extend_from_slice(&port.to_be_bytes());
                attr.extend(ip.iter().zip(x).map(|(a, b)| a ^ b));
                r[2..4].copy_from_slice(&(attr.len() as u16).to_be_bytes());
                r.truncate(20);
                r.extend(attr);
                let _ = s.send_to(&r, from);
            }
        });
        addr
    }

    #[test]
    fn a_stun_answer_gives_the_address_packets_come_from() {
        let server = stun_server("203.0.113.5:40000".parse().unwrap());
        let seen = discover("127.0.0.1:0".parse().unwrap(), &server.to_string()).unwrap();
        assert_eq!(seen, "203.0.113.5:40000".parse().unwrap());
    }

    #[test]
    fn a_silent_stun_server_is_an_error_not_a_hang() {
        let quiet = UdpSocket::bind("127.0.0.1:0").unwrap();
        let err = discover(
            "127.0.0.1:0".parse().unwrap(),
            &quiet.local_addr().unwrap().to_string(),
        )
        .unwrap_err();
        assert!(err.contains("no answer"), "{err}");
    }

    fn config_with(stun: &str, advertise: &[&str]) -> Config {
        let mut c = Config::default();
        c.media.bind_ip = "127.0.0.1".parse().unwrap();
        c.media.stun_server = stun.into();
        c.media.advertise_ips = advertise.iter().map(|s| s.parse().unwrap()).collect();
        c
    }

    #[test]
    fn advertising_what_the_stun_server_does_not_see_is_a_problem_named_with_the_fix() {
        let server = stun_server("203.0.113.5:40000".parse().unwrap());
        let found = check(&config_with(&server.to_string(), &["127.0.0.1"]));
        let problem = found
            .iter()
            .find(|f| f.level == Level::Problem)
            .unwrap_or_else(|| panic!("{found:?}"));
        assert!(
            problem.text.contains("203.0.113.5") && problem.text.contains("advertise_ips"),
            "{problem}"
        );
    }

    #[test]
    fn a_loopback_focus_that_advertises_loopback_has_no_problem() {
        let server = stun_server("127.0.0.1:40000".parse().unwrap());
        let found = check(&config_with(&server.to_string(), &["127.0.0.1"]));
        assert!(found.iter().all(|f| f.level != Level::Problem), "{found:?}");
        assert!(
            found
                .iter()
                .any(|f| f.level == Level::Ok && f.text.contains("reaches the media socket")),
            "{found:?}"
        );
    }
}
