//! Arbitrary room state and timeline events (any room member can send state of the call types).
#![no_main]
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use weir_signalling::router::{Router, RouterConfig};
use weir_signalling::wire::Identity;
use weir_signalling::RoomId;

fuzz_target!(|data: &[u8]| {
    let Ok(serde_json::Value::Array(events)) = serde_json::from_slice::<serde_json::Value>(data)
    else {
        return;
    };
    let me = Identity {
        user_id: "@focus:hs".try_into().expect("valid user id"),
        device_id: "FOCUS".into(),
        session_id: "sfu".into(),
    };
    let metrics = weir_signalling::Metrics::unregistered().unwrap();
    let t0 = Instant::now();
    let mut r = Router::new(RouterConfig::new(me), metrics, (t0, 1_700_000_000_000));
    let room = RoomId::try_from("!r:hs").expect("valid room id");
    r.handle_joined_room(&room, &events, &events, false, t0);
    r.handle_joined_room(&room, &events, &[], true, t0);
    while r.poll_output().is_some() {}
});
