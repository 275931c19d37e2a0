//! Two engines connected in memory: a weir-side engine sending one video track, and a client
//! engine receiving it (real ICE, DTLS and SRTP; no sockets; time given by the caller). For
//! benches and tests of what one engine does with what it is written, without a shard.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use str0m::change::{SdpAnswer, SdpOffer};
use str0m::media::{Direction, MediaKind, Mid};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{SeqNo, Ssrc};
use str0m::{Candidate, Event, Input, Output, Rtc};

/// A weir-side engine sending one video track to a client engine, connected in memory.
pub struct EnginePair {
    pub sfu: Rtc,
    pub client: Rtc,
    /// The video m-line the weir side sends on.
    pub mid: Mid,
    sfu_addr: SocketAddr,
    client_addr: SocketAddr,
}

/// What the client engine received while datagrams were moved.
#[derive(Debug, Default)]
pub struct ClientReceived {
    /// The SSRC and sequence number of each RTP packet it took, in order.
    pub rtp: Vec<(Ssrc, SeqNo)>,
}

impl EnginePair {
    /// Connect `sfu` (made by [`crate::engine`]) to a client engine on port `20000 + i`: the
    /// client offers audio (as browsers do), then the weir side offers a video track, and
    /// datagrams move with virtual time from `now` until both are connected. Panics if they
    /// are not within 10 s of virtual time.
    pub fn connect(mut sfu: Rtc, i: u16, now: Instant) -> EnginePair {
        let sfu_addr: SocketAddr = "127.0.0.1:10000".parse().expect("address");
        let client_addr: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 20000 + i));
        sfu.add_local_candidate(Candidate::host(sfu_addr, "udp").expect("candidate"));
        let mut client = Rtc::builder().set_rtp_mode(true).build(now);
        client.add_local_candidate(Candidate::host(client_addr, "udp").expect("candidate"));
        let mut api = client.sdp_api();
        api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None);
        let (offer, pending) = api.apply().expect("client offer");
        let offer = crate::engine::parse_offer(&offer.to_sdp_string(), &HashSet::new())
            .expect("client offer parses");
        let answer = sfu.sdp_api().accept_offer(offer).expect("weir answers");
        client
            .sdp_api()
            .accept_answer(pending, answer)
            .expect("client takes the answer");
        client.add_remote_candidate(Candidate::host(sfu_addr, "udp").expect("candidate"));
        let mut api = sfu.sdp_api();
        let mid = api.add_media(
            MediaKind::Video,
            Direction::SendOnly,
            Some("s".into()),
            Some("t".into()),
            None,
        );
        let (offer, pending) = api.apply().expect("weir offer");
        let answer = client
            .sdp_api()
            .accept_offer(SdpOffer::from_sdp_string(&offer.to_sdp_string()).expect("offer"))
            .expect("client answers");
        sfu.sdp_api()
            .accept_answer(
                pending,
                SdpAnswer::from_sdp_string(&answer.to_sdp_string()).expect("answer"),
            )
            .expect("weir takes the answer");
        let mut p = EnginePair {
            sfu,
            client,
            mid,
            sfu_addr,
            client_addr,
        };
        let mut t = now;
        while !(p.sfu.is_connected() && p.client.is_connected()) {
            assert!(
                t < now + Duration::from_secs(10),
                "in-memory ICE/DTLS did not complete"
            );
            p.pump(t);
            t += Duration::from_millis(1);
        }
        p
    }

    /// Time both engines out at `now` and move datagrams between them until both are idle
    /// (at most 64 rounds). Returns what the client received.
    pub fn pump(&mut self, now: Instant) -> ClientReceived {
        let mut got = ClientReceived::default();
        for _ in 0..64 {
            let mut moved = false;
            for from_sfu in [true, false] {
                let (src, dst, src_addr, dst_addr) = if from_sfu {
                    (
                        &mut self.sfu,
                        &mut self.client,
                        self.sfu_addr,
                        self.client_addr,
                    )
                } else {
                    (
                        &mut self.client,
                        &mut self.sfu,
                        self.client_addr,
                        self.sfu_addr,
                    )
                };
                let _ = src.handle_input(Input::Timeout(now));
                while let Ok(out) = src.poll_output() {
                    match out {
                        Output::Transmit(t) => {
                            let Ok(r) =
                                Receive::new(Protocol::Udp, src_addr, dst_addr, &t.contents)
                            else {
                                continue;
                            };
                            let _ = dst.handle_input(Input::Receive(now, r));
                            while let Ok(o) = dst.poll_output() {
                                match o {
                                    Output::Timeout(_) => break,
                                    Output::Transmit(t2) => {
                                        if let Ok(r) = Receive::new(
                                            Protocol::Udp,
                                            dst_addr,
                                            src_addr,
                                            &t2.contents,
                                        ) {
                                            let _ = src.handle_input(Input::Receive(now, r));
                                        }
                                    }
                                    Output::Event(Event::RtpPacket(p)) if from_sfu => {
                                        got.rtp.push((p.header.ssrc, p.seq_no))
                                    }
                                    Output::Event(_) => {}
                                }
                            }
                            moved = true;
                        }
                        Output::Timeout(_) => break,
                        Output::Event(Event::RtpPacket(p)) if !from_sfu => {
                            got.rtp.push((p.header.ssrc, p.seq_no))
                        }
                        Output::Event(_) => {}
                    }
                }
            }
            if !moved {
                break;
            }
        }
        got
    }
}
