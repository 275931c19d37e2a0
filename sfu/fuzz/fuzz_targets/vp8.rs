//! The VP8 payload descriptor is read from untrusted RTP payloads; temporal-layer filtering,
//! sequence-number skipping and picture-id renumbering are driven by what it says. The second
//! half turns the input into a stream of frames (each byte: temporal layer, switch point,
//! keyframe, a new target, one or two packets) with contiguous sequence numbers and picture
//! ids, and checks what goes out is contiguous too.
#![no_main]
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use weir_sfu::forward::{
    PictureId, Vp8Ids, Rewritten, SeqTsRewriter, TemporalFilter, TemporalPacket,
    Vp8Descriptor,
};

fuzz_target!(|data: &[u8]| {
    let _ = Vp8Descriptor::parse(data);

    let now = Instant::now();
    let mut filter = TemporalFilter::default();
    let mut seqs = SeqTsRewriter::new(90_000, 1000, 0);
    let mut ids = Vp8Ids::default();
    let (mut seq, mut last_seq, mut last_id) = (70_000u64, None::<u64>, None::<u16>);
    for (n, b) in data.iter().enumerate() {
        if b & 0x40 != 0 {
            filter.set_target((b >> 4) & 0x03);
        }
        let p = TemporalPacket {
            source: 7,
            timestamp: n as u32 * 3000,
            tid: Some(b & 0x03),
            layer_sync: b & 0x04 != 0,
            keyframe: b & 0x08 != 0,
        };
        let id = PictureId {
            value: (n % (1 << 15)) as u16,
            long: true,
        };
        for _ in 0..1 + (b >> 7) {
            seq += 1;
            if !filter.forward(p) {
                seqs.skip(7, seq);
                ids.skip(7, id);
                continue;
            }
            let Rewritten::Send { seq: out, .. } = seqs.rewrite(7, seq, p.timestamp, now) else {
                panic!("an in-order packet is never stale");
            };
            if let Some(last) = last_seq {
                assert_eq!(out, last + 1, "sequence numbers stay contiguous");
            }
            last_seq = Some(out);
            let out_id = ids.rewrite(7, id, None).picture_id;
            if let Some(last) = last_id {
                assert!(
                    out_id == last || out_id == (last + 1) % (1 << 15),
                    "picture ids stay contiguous: {last} then {out_id}"
                );
            }
            last_id = Some(out_id);
        }
    }
});
