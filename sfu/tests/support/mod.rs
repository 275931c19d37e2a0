//! Test participants for scenarios over a real media plane: str0m engines on loopback, over
//! UDP or, for a participant whose UDP is blocked, over ICE-TCP (RFC 4571 framing).
#![allow(dead_code)] // each scenario file uses its own part of this

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::channel::ChannelId;
use str0m::format::Codec;
use str0m::media::{Direction, MediaKind, Mid, Rid, Simulcast, SimulcastLayer};
use str0m::net::{Protocol, Receive, TcpType};
use str0m::rtp::RtpWrite;
use str0m::{Candidate, Event, Input, Output, Rtc};
use weir_sfu::tcp::{frame, Framer};
use weir_sfu::{Command, ConferenceId, EventSink, PeerId, PeerRole, Sfu, SfuConfig, SfuEvent};

/// Bound on every wait in this test: generous, because it only matters when something is broken.
pub const DEADLINE: Duration = Duration::from_secs(20);

pub struct Client {
    pub name: &'static str,
    pub rtc: Rtc,
    pub socket: UdpSocket,
    pub addr: SocketAddr,
    pub pending: Option<SdpPendingOffer>,
    pub mids: HashMap<&'static str, Mid>,
    pub connected: bool,
    pub received: Vec<(Mid, u64, Vec<u8>)>,
    pub keyframe_requests: usize,
    pub inactive_mids: usize,
    /// The engine reported the connection closed by the other side.
    pub closed: bool,
    /// Our data channel, once open (only when the offer asked for one).
    pub channel: Option<ChannelId>,
    /// Text messages the focus sent on it.
    pub messages: Vec<String>,
    /// Whether the next offer adds a data channel.
    pub wants_channel: bool,
    /// For a participant whose UDP is blocked: its one ICE-TCP connection, once its engine
    /// first sends (an active candidate connects to the focus's passive one).
    pub tcp: Option<(TcpStream, Framer)>,
    /// It only has an ICE-TCP candidate (its UDP is blocked).
    pub tcp_only: bool,
    /// Packets its engine sent over UDP (a participant with UDP blocked must send none).
    pub udp_sent: usize,
}

impl Client {
    pub fn new(name: &'static str) -> Client {
        Self::with_transport(name, false)
    }

    /// A participant whose network lets no UDP through: its only candidate is an active
    /// ICE-TCP one (port 9, as RFC 6544 writes active candidates).
    pub fn tcp_only(name: &'static str) -> Client {
        Self::with_transport(name, true)
    }

    fn with_transport(name: &'static str, tcp_only: bool) -> Client {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_nonblocking(true).unwrap();
        let mut addr = socket.local_addr().unwrap();
        let mut rtc = Rtc::builder().set_rtp_mode(true).build(Instant::now());
        if tcp_only {
            addr.set_port(9);
            let c = Candidate::builder()
                .tcp()
                .host(addr)
                .tcptype(TcpType::Active)
                .build()
                .unwrap();
            rtc.add_local_candidate(c);
        } else {
            rtc.add_local_candidate(Candidate::host(addr, "udp").unwrap());
        }
        Client {
            name,
            rtc,
            socket,
            addr,
            pending: None,
            mids: HashMap::new(),
            connected: false,
            received: Vec::new(),
            keyframe_requests: 0,
            inactive_mids: 0,
            closed: false,
            channel: None,
            messages: Vec::new(),
            wants_channel: false,
            tcp: None,
            tcp_only,
            udp_sent: 0,
        }
    }

    pub fn offer(&mut self, tracks: &[(&'static str, MediaKind)]) -> String {
        self.offer_with(tracks, None)
    }

    pub fn offer_with(
        &mut self,
        tracks: &[(&'static str, MediaKind)],
        rids: Option<&[&str]>,
    ) -> String {
        let mut api = self.rtc.sdp_api();
        if std::mem::take(&mut self.wants_channel) {
            api.add_channel("weir".into());
        }
        for (label, kind) in tracks {
            let simulcast = rids.filter(|_| *kind == MediaKind::Video).map(|rids| {
                let mut s = Simulcast::new();
                for r in rids {
                    s.add_send_layer(SimulcastLayer::new(r));
                }
                s
            });
            let mid = api.add_media(
                *kind,
                Direction::SendOnly,
                Some(format!("{}-stream", self.name)),
                Some(format!("{}-{label}", self.name)),
                simulcast,
            );
            self.mids.insert(label, mid);
        }
        let (offer, pending) = api.apply().unwrap();
        self.pending = Some(pending);
        offer.to_sdp_string()
    }

    pub fn accept_answer(&mut self, sdp: &str, candidates: &[weir_sfu::LocalCandidate]) {
        let answer = SdpAnswer::from_sdp_string(sdp).unwrap();
        self.rtc
            .sdp_api()
            .accept_answer(self.pending.take().unwrap(), answer)
            .unwrap();
        for c in candidates {
            self.rtc
                .add_remote_candidate(Candidate::from_sdp_string(&c.candidate).unwrap());
        }
    }

    pub fn answer(&mut self, offer: &str) -> String {
        let offer = SdpOffer::from_sdp_string(offer).unwrap();
        self.rtc
            .sdp_api()
            .accept_offer(offer)
            .unwrap()
            .to_sdp_string()
    }

    /// Feed the socket and timers, collect events. Returns when nothing more is pending now.
    pub fn pump(&mut self) {
        let mut buf = [0u8; 2048];
        // In RTP mode the engine keeps one received packet until the next poll: poll after
        // every datagram.
        while let Ok((n, from)) = self.socket.recv_from(&mut buf) {
            let r = Receive::new(Protocol::Udp, from, self.addr, &buf[..n]).unwrap();
            self.rtc
                .handle_input(Input::Receive(Instant::now(), r))
                .unwrap();
            self.poll();
        }
        self.pump_tcp();
        self.rtc
            .handle_input(Input::Timeout(Instant::now()))
            .unwrap();
        self.poll();
    }

    pub fn poll(&mut self) {
        loop {
            match self.rtc.poll_output().unwrap() {
                Output::Timeout(_) => break,
                Output::Transmit(t) if t.proto == Protocol::Tcp => {
                    let stream = &mut self
                        .tcp
                        .get_or_insert_with(|| {
                            let s = TcpStream::connect(t.destination).unwrap();
                            s.set_nonblocking(true).unwrap();
                            (s, Framer::default())
                        })
                        .0;
                    let mut framed = Vec::new();
                    frame(&mut framed, &t.contents).unwrap();
                    write_all_nonblocking(stream, &framed);
                }
                Output::Transmit(t) => {
                    self.udp_sent += 1;
                    let _ = self.socket.send_to(&t.contents, t.destination);
                }
                Output::Event(Event::Connected) => self.connected = true,
                Output::Event(Event::ChannelOpen(id, _)) => self.channel = Some(id),
                Output::Event(Event::ChannelData(d)) if !d.binary => {
                    self.messages.extend(String::from_utf8(d.data).ok());
                }
                Output::Event(Event::RtpPacket(p)) => {
                    let mid = self
                        .rtc
                        .direct_api()
                        .stream_rx(&p.header.ssrc)
                        .unwrap()
                        .mid();
                    self.received.push((mid, *p.seq_no, p.payload.to_vec()));
                }
                Output::Event(Event::KeyframeRequest(_)) => self.keyframe_requests += 1,
                Output::Event(Event::Closed) => self.closed = true,
                Output::Event(Event::MediaChanged(m)) if m.direction == Direction::Inactive => {
                    self.inactive_mids += 1
                }
                Output::Event(_) => {}
            }
        }
    }

    /// Frames that arrived on the ICE-TCP connection, each fed to the engine.
    fn pump_tcp(&mut self) {
        loop {
            let Some((stream, framer)) = self.tcp.as_mut() else {
                return;
            };
            let from = stream.peer_addr().unwrap();
            let room = framer.space(4096);
            let n = match stream.read(room) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => 0,
                Err(e) => panic!("{}: ICE-TCP read failed: {e}", self.name),
            };
            framer.filled(4096, n);
            let mut got = Vec::new();
            while let Some(f) = framer.next_frame() {
                got.push(f.expect("the focus frames as RFC 4571 says").to_vec());
            }
            for f in &got {
                let r = Receive::new(Protocol::Tcp, from, self.addr, f).unwrap();
                self.rtc
                    .handle_input(Input::Receive(Instant::now(), r))
                    .unwrap();
                self.poll();
            }
            if n == 0 {
                return;
            }
        }
    }

    pub fn send(&mut self, label: &str, seq: u64, ts: u32, payload: &[u8]) {
        self.send_layer(label, None, seq, ts, payload)
    }

    pub fn send_layer(
        &mut self,
        label: &str,
        rid: Option<&str>,
        seq: u64,
        ts: u32,
        payload: &[u8],
    ) {
        let codec = if label == "video" {
            Codec::Vp8
        } else {
            Codec::Opus
        };
        self.send_codec(label, codec, rid, seq, ts, payload)
    }

    /// One Opus packet on `label`'s m-line saying how loud it is (RFC 6464 level, -dBov).
    pub fn send_audio_level(&mut self, label: &str, seq: u64, ts: u32, level: i8) {
        let mid = self.mids[label];
        let pt = self
            .rtc
            .codec_config()
            .params()
            .iter()
            .find(|p| p.spec().codec == Codec::Opus)
            .unwrap()
            .pt();
        let ext = str0m::rtp::ExtensionValues {
            audio_level: Some(-level.abs()),
            voice_activity: Some(level.abs() < 50),
            ..Default::default()
        };
        let mut api = self.rtc.direct_api();
        let tx = api.stream_tx_by_mid(mid, None).unwrap();
        tx.write_rtp(
            RtpWrite::new(pt, seq.into(), ts, Instant::now(), vec![0xfc; 40]).ext_vals(ext),
        );
    }

    /// One RTP packet on `label`'s m-line with `codec`'s payload type.
    pub fn send_codec(
        &mut self,
        label: &str,
        codec: Codec,
        rid: Option<&str>,
        seq: u64,
        ts: u32,
        payload: &[u8],
    ) {
        let mid = self.mids[label];
        // A payload type of this codec that the answer kept for this m-line.
        let negotiated = self.rtc.media(mid).unwrap().remote_pts().to_vec();
        let pt = self
            .rtc
            .codec_config()
            .params()
            .iter()
            .find(|p| p.spec().codec == codec && negotiated.contains(&p.pt()))
            .unwrap()
            .pt();
        let mut api = self.rtc.direct_api();
        let tx = api.stream_tx_by_mid(mid, rid.map(Rid::from)).unwrap();
        tx.write_rtp(
            RtpWrite::new(pt, seq.into(), ts, Instant::now(), payload.to_vec()).marker(true),
        );
    }
}

pub struct World {
    pub sfu: Sfu,
    pub events: crossbeam_channel::Receiver<SfuEvent>,
    pub clients: Vec<Client>,
    pub log: Vec<SfuEvent>,
    /// Offers to these peers are logged but not answered (the test answers them itself).
    pub hold_offers_to: Vec<PeerId>,
}

impl World {
    /// A one-shard media plane and one client per name (client i is peer i).
    pub fn new(names: &[&'static str]) -> World {
        Self::with_sink(names, |tx| tx)
    }

    /// [`World::new`] with the media plane's events going through `sink` (made from the
    /// test's own event channel).
    pub fn with_sink<S: EventSink + Clone>(
        names: &[&'static str],
        sink: impl FnOnce(crossbeam_channel::Sender<SfuEvent>) -> S,
    ) -> World {
        let clients = names.iter().map(|n| Client::new(n)).collect();
        let config = SfuConfig {
            shards: 1,
            ..SfuConfig::default()
        };
        Self::with_clients(clients, config, sink)
    }

    /// A media plane configured by `config` (one shard, no bandwidth allocation) and these
    /// participants (client i is peer i).
    pub fn with_clients<S: EventSink + Clone>(
        clients: Vec<Client>,
        config: SfuConfig,
        sink: impl FnOnce(crossbeam_channel::Sender<SfuEvent>) -> S,
    ) -> World {
        let (tx, rx) = crossbeam_channel::unbounded();
        // The forwarding mechanics over real sockets, without bandwidth allocation: these
        // scenarios send at whatever rate suits them (allocation is in tests/adaptation.rs,
        // and the load tests and browser tests run with it on).
        let sfu = Sfu::start(
            SfuConfig {
                estimate_from_bps: None,
                ..config
            },
            sink(tx),
        )
        .unwrap();
        World {
            sfu,
            events: rx,
            clients,
            log: vec![],
            hold_offers_to: vec![],
        }
    }

    /// Client `i` calls into conference 1 with `offer`.
    pub fn call(&self, i: u64, offer: String) {
        self.call_in(i, ConferenceId(1), offer)
    }

    /// Client `i` calls into `conference` with `offer`.
    pub fn call_in(&self, i: u64, conference: ConferenceId, offer: String) {
        self.sfu
            .send(Command::CreatePeer {
                peer: PeerId(i),
                conference,
                offer,
                role: PeerRole::Participant,
            })
            .unwrap();
    }

    /// Pump clients and collect media-plane events until `done` holds or the deadline passes.
    pub fn run_until(&mut self, what: &str, mut done: impl FnMut(&mut World) -> bool) {
        let start = Instant::now();
        loop {
            for c in &mut self.clients {
                c.pump();
            }
            while let Ok(ev) = self.events.try_recv() {
                self.handle(ev);
            }
            if done(self) {
                return;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "timed out waiting for: {what}; events: {:?}",
                self.log
            );
            // Wait for the next datagram to any client rather than spinning.
            let _ = self
                .events
                .recv_timeout(Duration::from_millis(5))
                .map(|ev| self.handle(ev));
        }
    }

    pub fn handle(&mut self, ev: SfuEvent) {
        match &ev {
            SfuEvent::PeerCreated {
                peer,
                answer,
                candidates,
            } => {
                self.clients[peer.0 as usize].accept_answer(answer, candidates);
            }
            SfuEvent::Offer { peer, .. } if self.hold_offers_to.contains(peer) => {}
            SfuEvent::Offer { peer, sdp, .. } => {
                let answer = self.clients[peer.0 as usize].answer(sdp);
                self.sfu
                    .send(Command::RemoteAnswer {
                        peer: *peer,
                        sdp: answer,
                    })
                    .unwrap();
            }
            _ => {}
        }
        self.log.push(ev);
    }
}

pub fn vp8_frame(key: bool, n: u8) -> Vec<u8> {
    // Descriptor: S=1, partition 0; frame header byte P bit = !key; then opaque "encrypted" bytes.
    let mut p = vec![0x10, if key { 0x00 } else { 0x01 }];
    p.extend((0..200u8).map(|i| i.wrapping_mul(31).wrapping_add(n)));
    p
}

/// Write all of `data` to a non-blocking stream (the focus reads its side on every turn).
fn write_all_nonblocking(stream: &mut TcpStream, mut data: &[u8]) {
    let start = Instant::now();
    while !data.is_empty() {
        match stream.write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                assert!(start.elapsed() < DEADLINE, "the focus stopped reading");
                std::thread::yield_now();
            }
            Err(e) => panic!("ICE-TCP write failed: {e}"),
        }
    }
}

/// A STUN binding request with this USERNAME and no integrity: enough for routing, which reads
/// only the USERNAME (the engine would refuse it).
pub fn stun_check(username: &str) -> Vec<u8> {
    let name = username.as_bytes();
    let padded = name.len().div_ceil(4) * 4;
    let mut m = vec![0x00, 0x01];
    m.extend_from_slice(&((4 + padded) as u16).to_be_bytes());
    m.extend_from_slice(&[0x21, 0x12, 0xa4, 0x42]);
    m.extend_from_slice(&[7; 12]);
    m.extend_from_slice(&[0x00, 0x06]);
    m.extend_from_slice(&(name.len() as u16).to_be_bytes());
    m.extend_from_slice(name);
    m.resize(20 + 4 + padded, 0);
    m
}
