//! Hostile datagrams (STUN, DTLS, RTP, RTCP or garbage) at a peer that has accepted a real
//! browser-shaped offer. The engine must reject them, never panic.
#![no_main]
use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Input};
use weir_sfu::engine::{new_rtc, parse_offer};

const OFFER: &str = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\n\
a=msid-semantic: WMS s\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\n\
a=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\n\
a=fingerprint:sha-256 AC:85:B8:D9:93:AF:90:3F:F2:A5:03:CC:C3:2F:D4:F6:71:45:0A:AE:24:D7:3C:01:65:38:43:B8:A7:37:DD:6A\r\n\
a=setup:actpass\r\na=mid:0\r\na=sendrecv\r\na=msid:s a\r\na=rtcp-mux\r\na=rtpmap:111 opus/48000/2\r\n";

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let mut rtc = new_rtc(now, str0m::IceCreds::new());
    let local: SocketAddr = "127.0.0.1:5000".parse().unwrap();
    rtc.add_local_candidate(Candidate::host(local, "udp").unwrap());
    let offer = parse_offer(OFFER, &HashSet::new()).unwrap();
    rtc.sdp_api().accept_offer(offer).unwrap();
    let from: SocketAddr = "127.0.0.1:6000".parse().unwrap();
    for chunk in data.split(|b| *b == 0xff).take(8) {
        if let Ok(r) = Receive::new(Protocol::Udp, from, local, chunk) {
            let input = Input::Receive(now, r);
            if rtc.accepts(&input) {
                let _ = rtc.handle_input(input);
            }
        }
        while let Ok(out) = rtc.poll_output() {
            if matches!(out, str0m::Output::Timeout(_)) {
                break;
            }
        }
    }
    let _ = rtc.handle_input(Input::Timeout(now + Duration::from_secs(1)));
});
