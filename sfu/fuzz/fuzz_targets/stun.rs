//! The STUN `USERNAME` reader routes checks from unknown addresses: untrusted bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(ufrag) = weir_sfu::stun::local_ufrag(data) {
        // What it returns is part of the input, before a ':'.
        assert!(!ufrag.contains(':'));
        assert!(ufrag.len() < data.len());
    }
});
