//! A participant's SDP offer: weir's direction rewrite, then the engine's parser and offer
//! handling. Must return an error, never panic.
#![no_main]
use std::collections::HashSet;
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use weir_sfu::engine::{new_rtc, parse_offer};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let own: HashSet<String> = ["1".to_string()].into();
    if let Ok(offer) = parse_offer(text, &own) {
        let mut rtc = new_rtc(Instant::now(), str0m::IceCreds::new());
        let _ = rtc.sdp_api().accept_offer(offer);
    }
});
