//! The shard's thread: the UDP socket, its ICE-TCP connections, the clock and batching around
//! a [`ShardCore`].

use std::net::UdpSocket;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use tracing::{info, warn};

use crate::api::{Command, SfuConfig};
use crate::net::{self, RecvBatch, Waker};
use crate::stats::{DropReason, ShardStats};
use crate::tcp::links::Links;
use crate::tcp::Handoff;

use super::ShardMessage;

/// Messages from other shards taken per loop turn: datagrams handed over (one port for all
/// shards) and the packets of spread conferences. A bound, so that a flood handed over
/// cannot hold this shard's own socket back; what is left is taken next turn, at once.
const SIBLING_MESSAGES_PER_TURN: usize = 4096;

use super::{EventSink, ShardCore};

/// What reaches a shard from other threads.
pub(crate) struct Inputs {
    pub commands: Receiver<Command>,
    /// ICE-TCP connections the acceptor routed here.
    pub tcp_handoffs: Receiver<Handoff>,
    /// Operators' report requests, answered between turns.
    pub reports: Receiver<crossbeam_channel::Sender<Vec<crate::api::PeerReport>>>,
    /// Datagrams and claims from the shards sharing our port, and where to send ours (every
    /// shard, this one included, by index).
    pub messages: Receiver<ShardMessage>,
    pub siblings: Vec<(Sender<ShardMessage>, Arc<Waker>)>,
}

pub(crate) struct Shard<S: EventSink> {
    index: usize,
    socket: UdpSocket,
    inputs: Inputs,
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
        inputs: Inputs,
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
            inputs,
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
            let more = match turn {
                Ok(more) => more,
                Err(panic) => {
                    self.core.recover(panic, Instant::now());
                    continue;
                }
            };
            if more {
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
    /// batched send. Returns whether more input may be waiting (a full batch of datagrams, or
    /// as many messages from the other shards as a turn takes): then the loop does not sleep,
    /// since the waker was drained at the start of the turn.
    fn turn(&mut self, batch: &mut RecvBatch) -> bool {
        self.waker.drain();
        while let Ok(cmd) = self.inputs.commands.try_recv() {
            self.core.handle_command(cmd, Instant::now());
        }
        while let Ok(reply) = self.inputs.reports.try_recv() {
            let _ = reply.try_send(self.core.peer_reports());
        }
        // What the shards sharing our port received for our peers (bounded per turn, so a
        // flood handed over cannot hold this shard's own socket back).
        let mut messages = 0;
        while messages < SIBLING_MESSAGES_PER_TURN {
            let Ok(m) = self.inputs.messages.try_recv() else {
                break;
            };
            messages += 1;
            self.core.handle_shard_message(m, Instant::now());
        }
        while let Ok(h) = self.inputs.tcp_handoffs.try_recv() {
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
        // From the batch read or, for packets another shard handed over, from their receipt
        // there (`spread`): the queue between the shards is part of their delay.
        let relayed = self.core.take_relayed_since();
        if (received > 0 || relayed.is_some()) && self.core.datagrams_out() > sent_before {
            let from = relayed.map_or(now, |t| t.min(now));
            let took = Instant::now().saturating_duration_since(from);
            self.core.record_forward_delay(took.as_micros() as u64);
        }
        received == net::RECV_BATCH || messages == SIBLING_MESSAGES_PER_TURN
    }

    fn flush(&mut self) {
        let socket = &self.socket;
        self.core.flush(|q| q.flush(socket));
        let links = &mut self.links;
        self.core.flush_tcp(|to, data| links.send(to, data));
        links.flush();
        self.core.set_tcp_links(links.len());
        self.hand_over();
    }

    /// Deliver what the core has for the shards sharing our port.
    fn hand_over(&mut self) {
        if !self.core.has_outgoing() {
            return;
        }
        let n = self.inputs.siblings.len();
        let mut woken = vec![false; n];
        let mut failed = 0;
        let mut send = |i: usize, m: ShardMessage| match self.inputs.siblings.get(i) {
            Some((tx, _)) if tx.try_send(m).is_ok() => woken[i] = true,
            _ => failed += 1,
        };
        for o in self.core.take_outgoing() {
            match o.to {
                Some(i) => send(i, o.message),
                None => {
                    for i in (0..n).filter(|i| *i != self.index) {
                        send(i, o.message.clone());
                    }
                }
            }
        }
        for _ in 0..failed {
            self.core.undelivered();
        }
        for (i, w) in woken.iter().enumerate() {
            if *w {
                self.inputs.siblings[i].1.wake();
            }
        }
    }
}
