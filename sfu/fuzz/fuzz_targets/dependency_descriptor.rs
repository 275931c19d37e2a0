//! The dependency descriptor is read from untrusted RTP header extensions, and the choice of
//! spatial and temporal layers for every subscriber of a scalable stream follows what it says.
//! The input is cut into descriptors (each: a length byte, then that many bytes), fed to one
//! stream in turn; every few a subscriber's target changes. Checked: nothing panics, the
//! packets of a frame that follow each other get the same decision, the marker only goes on
//! forwarded packets, and a structure never declares layers beyond the limits.
#![no_main]
use libfuzzer_sys::fuzz_target;
use weir_sfu::forward::dependency_descriptor::{parse, MAX_DECODE_TARGETS, MAX_SPATIAL_LAYERS};
use weir_sfu::forward::svc::{SvcFilter, SvcStream};

fuzz_target!(|data: &[u8]| {
    let _ = parse(data, None);

    let mut stream = SvcStream::default();
    let mut filter = SvcFilter::default();
    let mut last: Option<(u16, bool)> = None;
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len % 64).min(tail.len());
        let (bytes, tail) = tail.split_at(len);
        rest = tail;
        if len > 0 && bytes[0] & 0x01 == 1 {
            filter.set_target(bytes[0] >> 1 & 0x03, bytes[0] >> 3 & 0x07);
            last = None;
        }
        let Ok(frame) = stream.read(bytes) else { continue };
        let s = stream.structure().expect("a read descriptor has a structure in force");
        assert!(usize::from(s.spatial_layers()) <= MAX_SPATIAL_LAYERS);
        assert!(s.decode_targets() <= MAX_DECODE_TARGETS);
        for dt in 0..s.decode_targets() {
            if let Some((spatial, _)) = s.target_layers(dt) {
                assert!(spatial < s.spatial_layers());
            }
        }
        let v = filter.forward(&frame, &stream);
        assert!(!v.ends_picture || v.forward, "the marker goes only on forwarded packets");
        if let Some((n, out)) = last.filter(|(n, _)| *n == frame.frame_number) {
            assert_eq!(out, v.forward, "frame {n}: a packet of it decided otherwise than the one before");
        }
        last = Some((frame.frame_number, v.forward));
    }
});
