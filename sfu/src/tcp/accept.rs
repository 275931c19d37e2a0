//! The ICE-TCP acceptor: one listener for every shard. It reads each new connection's first
//! frame (a STUN check), finds the shard from the ufrag it names, and hands the connection
//! over. Nothing else happens on this thread.

use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use tracing::{debug, info};

use super::{shard_of_ufrag, Framer, Handoff};
use crate::net::Waker;
use crate::stats::{DropReason, ShardStats};
use crate::stun;

/// Connections waiting for their first frame. Past this the oldest is closed, so a flood of
/// idle connections costs a bounded number of sockets. Real participants send their check at
/// once; this many covers a burst of a few hundred joining together.
pub const MAX_PENDING: usize = 256;

/// How long a new connection may take to send its first frame.
pub const FIRST_FRAME_WAIT: Duration = Duration::from_secs(5);

/// How often the acceptor looks at the stop flag while nothing happens.
const IDLE_POLL: Duration = Duration::from_millis(200);

/// Where a shard takes connections: its channel and the waker of its loop.
pub struct ShardInbox {
    pub connections: Sender<Handoff>,
    pub waker: Arc<Waker>,
}

struct Pending {
    stream: TcpStream,
    remote: SocketAddr,
    framer: Framer,
    since: Instant,
}

/// The acceptor's loop: runs until `stop` is set.
pub fn run(
    listener: TcpListener,
    shards: Vec<ShardInbox>,
    stats: Arc<ShardStats>,
    stop: Arc<AtomicBool>,
) {
    let local = listener.local_addr().ok();
    info!(addr = ?local, "ICE-TCP listener started");
    let mut pending: Vec<Pending> = Vec::new();
    let mut fds: Vec<libc::pollfd> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        fds.clear();
        fds.push(libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        for p in &pending {
            fds.push(libc::pollfd {
                fd: p.stream.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let now = Instant::now();
        let wait = pending
            .iter()
            .map(|p| (p.since + FIRST_FRAME_WAIT).saturating_duration_since(now))
            .min()
            .unwrap_or(IDLE_POLL)
            .min(IDLE_POLL);
        // SAFETY: `fds` holds valid pollfd entries for live descriptors.
        unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                wait.as_millis() as i32 + 1,
            )
        };
        accept_all(&listener, &mut pending, &stats);
        let now = Instant::now();
        let mut i = 0;
        while i < pending.len() {
            match step(&mut pending[i], now) {
                Step::Wait => i += 1,
                Step::Drop(why) => {
                    let p = pending.swap_remove(i);
                    debug!(remote = %p.remote, why, "ICE-TCP connection refused");
                    stats.count_drop(DropReason::TcpRefused);
                }
                Step::Route(shard) => {
                    let p = pending.swap_remove(i);
                    let Some(inbox) = shards.get(shard) else {
                        stats.count_drop(DropReason::TcpRefused);
                        continue;
                    };
                    let h = Handoff {
                        stream: p.stream,
                        remote: p.remote,
                        framer: p.framer,
                    };
                    if inbox.connections.try_send(h).is_ok() {
                        inbox.waker.wake();
                    } else {
                        stats.count_drop(DropReason::TcpRefused);
                    }
                }
            }
        }
    }
    info!("ICE-TCP listener stopped");
}

fn accept_all(listener: &TcpListener, pending: &mut Vec<Pending>, stats: &ShardStats) {
    loop {
        match listener.accept() {
            Ok((stream, remote)) => {
                if stream.set_nonblocking(true).is_err() {
                    stats.count_drop(DropReason::TcpRefused);
                    continue;
                }
                let _ = stream.set_nodelay(true);
                if pending.len() >= MAX_PENDING {
                    // The oldest is the likeliest to be idle.
                    let oldest = pending
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, p)| p.since)
                        .map(|(i, _)| i);
                    if let Some(i) = oldest {
                        pending.swap_remove(i);
                        stats.count_drop(DropReason::TcpRefused);
                    }
                }
                pending.push(Pending {
                    stream,
                    remote,
                    framer: Framer::default(),
                    since: Instant::now(),
                });
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                // Out of descriptors, say: the connection waits in the backlog.
                debug!(error = %e, "ICE-TCP accept failed");
                return;
            }
        }
    }
}

enum Step {
    Wait,
    Drop(&'static str),
    Route(usize),
}

/// Read what a pending connection sent; route it once its first frame is whole.
fn step(p: &mut Pending, now: Instant) -> Step {
    loop {
        if let Some(first) = p.framer.peek_frame() {
            return match first {
                Err(_) => Step::Drop("not RFC 4571 framing"),
                Ok(f) => match stun::local_ufrag(f).and_then(shard_of_ufrag) {
                    Some(shard) => Step::Route(shard),
                    None => Step::Drop("first frame is not a check for one of our peers"),
                },
            };
        }
        if p.framer.pending() > super::MAX_FRAME + 2 {
            return Step::Drop("first frame too long");
        }
        let want = 2048;
        let room = p.framer.space(want);
        match p.stream.read(room) {
            Ok(0) => {
                p.framer.filled(want, 0);
                return Step::Drop("closed before its first frame");
            }
            Ok(n) => p.framer.filled(want, n),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                p.framer.filled(want, 0);
                if now.saturating_duration_since(p.since) >= FIRST_FRAME_WAIT {
                    return Step::Drop("no first frame in time");
                }
                return Step::Wait;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => p.framer.filled(want, 0),
            Err(_) => {
                p.framer.filled(want, 0);
                return Step::Drop("read failed");
            }
        }
    }
}
