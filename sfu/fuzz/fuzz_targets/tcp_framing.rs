//! ICE-TCP connections deliver untrusted bytes in arbitrary pieces. The first byte of the input
//! picks the read size; the rest is the stream. Whatever it is, the framer hands back frames
//! that, re-framed, are exactly the bytes consumed, or stops at an error; and the routing of a
//! first frame to a shard (USERNAME → ufrag → shard) never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;
use weir_sfu::tcp::{frame, shard_of_ufrag, Framer};

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let mut f = Framer::default();
    let mut reframed = Vec::new();
    let mut broken = false;
    for piece in stream.chunks(chunk) {
        // Half through `space`/`filled` as the sockets do, half through `push`.
        if piece.len() % 2 == 0 {
            let room = f.space(piece.len() + 7);
            room[..piece.len()].copy_from_slice(piece);
            f.filled(piece.len() + 7, piece.len());
        } else {
            f.push(piece);
        }
        if let Some(Ok(first)) = f.peek_frame() {
            let _ = weir_sfu::stun::local_ufrag(first).and_then(shard_of_ufrag);
        }
        while let Some(r) = f.next_frame() {
            match r {
                Ok(p) => frame(&mut reframed, p).expect("a frame read is a frame written"),
                Err(_) => {
                    broken = true;
                    break;
                }
            }
        }
        if broken {
            break;
        }
    }
    if !broken {
        assert_eq!(reframed.len() + f.pending(), stream.len());
        assert_eq!(&stream[..reframed.len()], &reframed[..]);
    }
});
