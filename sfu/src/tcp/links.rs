//! A shard's ICE-TCP connections: reading whole frames from them, and writing what the
//! engines send to their addresses. Sockets are non-blocking and polled with the shard's UDP
//! socket; nothing here waits.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use tracing::debug;

use super::{frame, Framer, Handoff};

/// Bytes queued toward one connection before further packets to it are dropped (counted as
/// `tcp_congested`). TCP already retransmits and orders; a queue in weir on top of the
/// kernel's only adds delay, so it is kept to about a quarter of a second of a 2 Mbit/s
/// downlink. The bandwidth estimator sees the drops and lowers the allocation. Larger rides
/// out longer stalls at the cost of delay; smaller drops more under short bursts.
pub const MAX_QUEUED: usize = 64 * 1024;

/// Bytes read from one connection per turn, so one busy connection cannot hold the shard.
const READ_PER_TURN: usize = 64 * 1024;

/// Connections one shard keeps; more are refused (`tcp_refused`). Each costs a socket and a
/// few KiB. Participants that need TCP are the exception, so this is far above their number.
pub const MAX_LINKS: usize = 4096;

/// A connection from which nothing arrives for this long is closed. Browsers send a STUN
/// consent check every few seconds on a live pair; a pair they gave up on goes quiet.
pub const LINK_SILENCE: Duration = Duration::from_secs(30);

struct Link {
    stream: TcpStream,
    remote: SocketAddr,
    framer: Framer,
    out: Vec<u8>,
    /// How much of `out` the kernel has taken.
    written: usize,
    last_rx: Instant,
    closed: bool,
}

/// The connections of one shard.
#[derive(Default)]
pub struct Links {
    links: Vec<Link>,
}

impl Links {
    pub fn len(&self) -> usize {
        self.links.len()
    }

    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    /// Take over a connection the acceptor routed here. Returns false if it was refused.
    pub fn add(&mut self, h: Handoff, now: Instant) -> bool {
        if self.links.len() >= MAX_LINKS {
            return false;
        }
        // A second connection from the same address replaces the first (a reconnect).
        self.links.retain(|l| l.remote != h.remote);
        self.links.push(Link {
            stream: h.stream,
            remote: h.remote,
            framer: h.framer,
            out: Vec::new(),
            written: 0,
            last_rx: now,
            closed: false,
        });
        true
    }

    /// Read what arrived on every connection and hand each whole frame to `deliver` with the
    /// address it came from. Connections that ended, broke their framing or went silent are
    /// closed.
    pub fn read(&mut self, now: Instant, mut deliver: impl FnMut(SocketAddr, &[u8])) {
        for l in &mut self.links {
            let mut budget = READ_PER_TURN;
            loop {
                // Frames already buffered (the first check comes with the handoff).
                while let Some(f) = l.framer.next_frame() {
                    match f {
                        Ok(packet) => {
                            l.last_rx = now;
                            deliver(l.remote, packet);
                        }
                        Err(e) => {
                            debug!(remote = %l.remote, error = %e, "ICE-TCP framing broken: closed");
                            l.closed = true;
                            break;
                        }
                    }
                }
                if l.closed || budget == 0 {
                    break;
                }
                let want = budget.min(16 * 1024);
                let room = l.framer.space(want);
                match l.stream.read(room) {
                    Ok(0) => {
                        l.framer.filled(want, 0);
                        l.closed = true;
                    }
                    Ok(n) => {
                        l.framer.filled(want, n);
                        budget -= n;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        l.framer.filled(want, 0);
                        break;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => l.framer.filled(want, 0),
                    Err(e) => {
                        l.framer.filled(want, 0);
                        debug!(remote = %l.remote, error = %e, "ICE-TCP read failed: closed");
                        l.closed = true;
                    }
                }
            }
            if now.saturating_duration_since(l.last_rx) >= LINK_SILENCE {
                l.closed = true;
            }
        }
        self.links.retain(|l| !l.closed);
    }

    /// Queue `packet` toward `to` as one frame. False if there is no connection to `to` or its
    /// queue is full (the packet is dropped).
    pub fn send(&mut self, to: SocketAddr, packet: &[u8]) -> bool {
        let Some(l) = self.links.iter_mut().find(|l| l.remote == to && !l.closed) else {
            return false;
        };
        if l.out.len() - l.written + packet.len() + 2 > MAX_QUEUED {
            return false;
        }
        frame(&mut l.out, packet).is_ok()
    }

    /// Hand queued bytes to the kernel, as much as it takes now.
    pub fn flush(&mut self) {
        for l in &mut self.links {
            while l.written < l.out.len() {
                match l.stream.write(&l.out[l.written..]) {
                    Ok(0) => {
                        l.closed = true;
                        break;
                    }
                    Ok(n) => l.written += n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => {
                        debug!(remote = %l.remote, error = %e, "ICE-TCP write failed: closed");
                        l.closed = true;
                        break;
                    }
                }
            }
            if l.written == l.out.len() {
                l.out.clear();
                l.written = 0;
            } else if l.written > MAX_QUEUED {
                l.out.drain(..l.written);
                l.written = 0;
            }
        }
        self.links.retain(|l| !l.closed);
    }

    /// Poll entries for every connection: readable, and writable while bytes wait.
    pub fn poll_fds(&self, fds: &mut Vec<libc::pollfd>) {
        for l in &self.links {
            let mut events = libc::POLLIN;
            if l.written < l.out.len() {
                events |= libc::POLLOUT;
            }
            fds.push(libc::pollfd {
                fd: l.stream.as_raw_fd(),
                events,
                revents: 0,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A connected pair on loopback: the shard's side (non-blocking, as a handoff) and the
    /// participant's.
    fn pair(first: &[u8]) -> (Handoff, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, remote) = l.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        let mut framer = Framer::default();
        framer.push(first);
        (
            Handoff {
                stream: server,
                remote,
                framer,
            },
            client,
        )
    }

    fn read_until(links: &mut Links, n: usize) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        let start = Instant::now();
        while got.len() < n {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "frames did not arrive"
            );
            links.read(Instant::now(), |_, p| got.push(p.to_vec()));
            std::thread::yield_now();
        }
        got
    }

    #[test]
    fn frames_both_ways_and_the_handoff_frame_first() {
        let mut first = Vec::new();
        frame(&mut first, b"check").unwrap();
        let (h, mut client) = pair(&first);
        let remote = h.remote;
        let mut links = Links::default();
        assert!(links.add(h, Instant::now()));
        let mut more = Vec::new();
        frame(&mut more, b"dtls").unwrap();
        client.write_all(&more).unwrap();
        assert_eq!(
            read_until(&mut links, 2),
            vec![b"check".to_vec(), b"dtls".to_vec()]
        );

        assert!(links.send(remote, b"answer"));
        links.flush();
        let mut buf = [0u8; 8];
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"\0\x06answer");
        assert!(
            !links.send("127.0.0.1:9".parse().unwrap(), b"x"),
            "no such connection"
        );
    }

    #[test]
    fn a_full_queue_drops_instead_of_growing() {
        let (h, _client) = pair(&[]);
        let remote = h.remote;
        let mut links = Links::default();
        links.add(h, Instant::now());
        let packet = [7u8; 1200];
        let mut queued = 0;
        // The participant never reads: the kernel's buffers fill, then weir's queue.
        for _ in 0..10_000 {
            if links.send(remote, &packet) {
                queued += 1;
            } else {
                break;
            }
            links.flush();
        }
        assert!(queued < 10_000, "sending stopped being accepted");
        assert!(!links.send(remote, &packet));
        assert_eq!(links.len(), 1, "a slow reader is not closed for being slow");
    }

    #[test]
    fn a_broken_frame_or_a_hangup_closes_the_connection() {
        let (h, mut client) = pair(&[]);
        let mut links = Links::default();
        links.add(h, Instant::now());
        client.write_all(&[0xff, 0xff]).unwrap();
        let start = Instant::now();
        while !links.is_empty() {
            assert!(start.elapsed() < Duration::from_secs(10));
            links.read(Instant::now(), |_, _| panic!("no frame"));
        }
        let (h, client) = pair(&[]);
        links.add(h, Instant::now());
        drop(client);
        let start = Instant::now();
        while !links.is_empty() {
            assert!(start.elapsed() < Duration::from_secs(10));
            links.read(Instant::now(), |_, _| {});
        }
    }

    #[test]
    fn a_silent_connection_is_closed() {
        let (h, _client) = pair(&[]);
        let mut links = Links::default();
        let t0 = Instant::now();
        links.add(h, t0);
        links.read(t0 + LINK_SILENCE / 2, |_, _| {});
        assert_eq!(links.len(), 1);
        links.read(t0 + LINK_SILENCE, |_, _| {});
        assert!(links.is_empty());
    }
}
