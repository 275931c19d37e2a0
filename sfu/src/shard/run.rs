//! The shard's thread: the UDP socket, its ICE-TCP connections, the clock and batching around
//! a [`ShardCore`].

use std::net::UdpSocket;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::Receiver;
use tracing::{info, warn};

use crate::api::{Command, SfuConfig};
use crate::net::{self, RecvBatch, Waker};
use crate::stats::{DropReason, ShardStats};
use crate::tcp::links::Links;
use crate::tcp::Handoff;

use super::{EventSink, ShardCore};

pub(crate) struct Shard<S: EventSink> {
    index: usize,
    socket: UdpSocket,
    commands: Receiver<Command>,
    /// ICE-TCP connections the acceptor routed here, and those taken.
    tcp_handoffs: Receiver<Handoff>,
    /// Operators' report requests, answered between turns.
    reports: Receiver<crossbeam_channel::Sender<Vec<crate::api::PeerReport>>>,
    links: Links,
    /// Poll entries of the connections, rebuilt before each wait (kept to reuse).
    poll_fds: Vec<libc::pollfd>,
    waker: Arc<Waker>,
    stop: Arc<AtomicBool>,
    core: ShardCore<S>,
}

impl<S: EventSink> Shard<S> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        index: usize,
        config: SfuConfig,
        socket: UdpSocket,
        commands: Receiver<Command>,
        tcp_handoffs: Receiver<Handoff>,
        reports: Receiver<crossbeam_channel::Sender<Vec<crate::api::PeerReport>>>,
        waker: Arc<Waker>,
        events: S,
        stop: Arc<AtomicBool>,
        stats: Arc<ShardStats>,
    ) -> std::io::Result<Self> {
        let local_addr = socket.local_addr()?;
        socket.set_nonblocking(true)?;
        let core = ShardCore::new(index, config, local_addr, events, stats, Instant::now());
        Ok(Shard {
            index,
            socket,
            commands,
            tcp_handoffs,
            reports,
            links: Links::default(),
            poll_fds: Vec::new(),
            waker,
            stop,
            core,
        })
    }

    pub(crate) fn run(mut self) {
        info!(shard = self.index, addr = %self.core.local_addr(), "media shard started");
        let mut batch = RecvBatch::default();
        while !self.stop.load(Ordering::Relaxed) {
            let turn = std::panic::catch_unwind(AssertUnwindSafe(|| self.turn(&mut batch)));
            let received = match turn {
                Ok(n) => n,
                Err(panic) => {
                    self.core.recover(panic, Instant::now());
                    continue;
                }
            };
            if received == net::RECV_BATCH {
                continue; // more may be waiting: don't sleep.
            }
            let wait = self
                .core
                .next_deadline()
                .saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                self.poll_fds.clear();
                self.links.poll_fds(&mut self.poll_fds);
                net::wait_readable_with(&self.socket, &self.waker, &mut self.poll_fds, Some(wait));
            }
        }
        self.core.close_all(Instant::now());
        self.flush();
        info!(shard = self.index, "media shard stopped");
    }

    /// One turn of the loop: commands, a batch of datagrams, the core's timeout round, the
    /// batched send. Returns how many datagrams were read.
    fn turn(&mut self, batch: &mut RecvBatch) -> usize {
        self.waker.drain();
        while let Ok(cmd) = self.commands.try_recv() {
            self.core.handle_command(cmd, Instant::now());
        }
        while let Ok(reply) = self.reports.try_recv() {
            let _ = reply.try_send(self.core.peer_reports());
        }
        while let Ok(h) = self.tcp_handoffs.try_recv() {
            if !self.links.add(h, Instant::now()) {
                self.core.count_drop(DropReason::TcpRefused);
            }
        }
        let received = match net::recv_batch(&self.socket, batch) {
            Ok(n) => n,
            Err(e) => {
                warn!(shard = self.index, error = %e, "udp receive failed");
                0
            }
        };
        let now = Instant::now();
        let sent_before = self.core.datagrams_out();
        if let Some(d) = batch.kernel_drops() {
            self.core.set_kernel_drops(d);
        }
        if received > 0 {
            for (from, data) in batch.iter() {
                self.core.handle_datagram(from, data, now);
            }
        }
        if !self.links.is_empty() {
            let core = &mut self.core;
            self.links
                .read(now, |from, data| core.handle_tcp(from, data, now));
        }
        self.core.handle_timeout(Instant::now());
        self.flush();
        if received > 0 && self.core.datagrams_out() > sent_before {
            let took = Instant::now().saturating_duration_since(now);
            self.core.record_forward_delay(took.as_micros() as u64);
        }
        received
    }

    fn flush(&mut self) {
        let socket = &self.socket;
        self.core.flush(|q| q.flush(socket));
        let links = &mut self.links;
        self.core.flush_tcp(|to, data| links.send(to, data));
        links.flush();
        self.core.set_tcp_links(links.len());
    }
}
