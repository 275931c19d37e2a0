//! The STUN `USERNAME` reader routes checks from unknown addresses, and the mapped-address
//! reader takes a STUN server's answer: both read untrusted bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(ufrag) = weir_sfu::stun::local_ufrag(data) {
        // What it returns is part of the input, before a ':'.
        assert!(!ufrag.contains(':'));
        assert!(ufrag.len() < data.len());
    }
    if data.len() >= 20 {
        let mut txid = [0u8; 12];
        txid.copy_from_slice(&data[8..20]);
        let _ = weir_sfu::stun::mapped_address(data, txid);
    }
});
