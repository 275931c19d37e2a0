//! Arbitrary to-device JSON (from any Matrix user) into the router, after a valid call is set
//! up: the router must count and drop, never panic, and keep the valid leg.
#![no_main]
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use weir_signalling::router::{Router, RouterConfig};
use weir_signalling::wire::Identity;

fuzz_target!(|data: &[u8]| {
    let me = Identity {
        user_id: "@focus:hs".try_into().expect("valid user id"),
        device_id: "FOCUS".into(),
        session_id: "sfu".into(),
    };
    let metrics = weir_signalling::Metrics::unregistered().unwrap();
    let t0 = Instant::now();
    let mut r = Router::new(RouterConfig::new(me), metrics, (t0, 1_700_000_000_000));
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for (i, line) in text.split('\n').take(16).enumerate() {
        r.handle_to_device_json(line, t0 + Duration::from_millis(i as u64 * 300));
        while r.poll_output().is_some() {}
    }
    r.handle_timeout(t0 + Duration::from_secs(30));
    while r.poll_output().is_some() {}
});
