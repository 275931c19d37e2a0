//! RFC 4571 framing: each packet on an ICE-TCP connection is preceded by its length, two
//! bytes in network order. A [`Framer`] collects what a connection delivers and hands back
//! whole packets; [`frame`] writes one.

use thiserror::Error;

/// The largest frame weir takes. RFC 4571 allows 65535 bytes; media and DTLS over ICE-TCP stay
/// near 1200, and a STUN check is under 200. A larger length means the stream is not ICE-TCP
/// (or has lost its place): the connection is closed. Higher tolerates odd peers; lower bounds
/// the memory a connection may hold before it is judged.
pub const MAX_FRAME: usize = 1600;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLong(usize),
    #[error("empty frame")]
    Empty,
}

/// Reassembles frames from the bytes of one connection.
#[derive(Debug, Default)]
pub struct Framer {
    buf: Vec<u8>,
    /// Where the next unread frame starts in `buf`.
    start: usize,
}

impl Framer {
    /// Room to read into: the caller reads from the socket into this slice, then calls
    /// [`Framer::filled`] with how many bytes arrived. Compacts first, so a connection holds at
    /// most one partial frame plus one read.
    pub fn space(&mut self, want: usize) -> &mut [u8] {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let len = self.buf.len();
        self.buf.resize(len + want, 0);
        &mut self.buf[len..]
    }

    /// `n` bytes of the slice [`Framer::space`] gave were filled; the rest is given back.
    pub fn filled(&mut self, want: usize, n: usize) {
        let keep = self.buf.len() - want + n.min(want);
        self.buf.truncate(keep);
    }

    /// Feed bytes that arrived (for callers that already hold them).
    pub fn push(&mut self, data: &[u8]) {
        let room = self.space(data.len());
        room.copy_from_slice(data);
    }

    /// The next whole frame, if one has arrived. An error means the stream cannot be ICE-TCP
    /// and the connection should be closed; the framer is then of no further use.
    pub fn next_frame(&mut self) -> Option<Result<&[u8], FrameError>> {
        match self.locate()? {
            Ok((from, to)) => {
                self.start = to;
                Some(Ok(&self.buf[from..to]))
            }
            Err(e) => Some(Err(e)),
        }
    }

    /// The next whole frame, left in place.
    pub fn peek_frame(&self) -> Option<Result<&[u8], FrameError>> {
        Some(self.locate()?.map(|(from, to)| &self.buf[from..to]))
    }

    fn locate(&self) -> Option<Result<(usize, usize), FrameError>> {
        let rest = &self.buf[self.start..];
        if rest.len() < 2 {
            return None;
        }
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        if len == 0 {
            return Some(Err(FrameError::Empty));
        }
        if len > MAX_FRAME {
            return Some(Err(FrameError::TooLong(len)));
        }
        if rest.len() < 2 + len {
            return None;
        }
        let from = self.start + 2;
        Some(Ok((from, from + len)))
    }

    /// Bytes held that are not yet a whole frame.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }
}

/// Append `packet` to `out` as one frame. Packets over 65535 bytes cannot be framed and are
/// refused (weir never sends one).
pub fn frame(out: &mut Vec<u8>, packet: &[u8]) -> Result<(), FrameError> {
    let len = u16::try_from(packet.len()).map_err(|_| FrameError::TooLong(packet.len()))?;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(packet);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(f: &mut Framer) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        while let Some(r) = f.next_frame() {
            got.push(r.expect("a valid frame").to_vec());
        }
        got
    }

    #[test]
    fn frames_split_anywhere_come_out_whole_and_in_order() {
        let mut wire = Vec::new();
        let packets: Vec<Vec<u8>> = (1..=5u8).map(|i| vec![i; usize::from(i) * 100]).collect();
        for p in &packets {
            frame(&mut wire, p).unwrap();
        }
        for chunk in [1, 2, 3, 7, 150, 4096] {
            let mut f = Framer::default();
            let mut got = Vec::new();
            for piece in wire.chunks(chunk) {
                f.push(piece);
                got.extend(frames(&mut f));
            }
            assert_eq!(got, packets, "read {chunk} bytes at a time");
            assert_eq!(f.pending(), 0);
        }
    }

    #[test]
    fn reading_into_space_keeps_only_what_arrived() {
        let mut wire = Vec::new();
        frame(&mut wire, b"stun").unwrap();
        let mut f = Framer::default();
        let room = f.space(64);
        room[..wire.len()].copy_from_slice(&wire);
        f.filled(64, wire.len());
        assert_eq!(frames(&mut f), vec![b"stun".to_vec()]);
        assert_eq!(f.pending(), 0);
    }

    #[test]
    fn an_oversized_or_empty_length_is_an_error_not_a_wait() {
        let mut f = Framer::default();
        f.push(&[0xff, 0xff, 1, 2, 3]);
        assert_eq!(f.next_frame(), Some(Err(FrameError::TooLong(65535))));
        let mut f = Framer::default();
        f.push(&[0, 0]);
        assert_eq!(f.next_frame(), Some(Err(FrameError::Empty)));
    }

    #[test]
    fn a_peeked_frame_is_still_there() {
        let mut f = Framer::default();
        frame(&mut Vec::new(), b"x").unwrap();
        let mut wire = Vec::new();
        frame(&mut wire, b"first").unwrap();
        frame(&mut wire, b"second").unwrap();
        f.push(&wire);
        assert_eq!(f.peek_frame(), Some(Ok(&b"first"[..])));
        assert_eq!(frames(&mut f), vec![b"first".to_vec(), b"second".to_vec()]);
    }

    #[test]
    fn a_partial_frame_waits() {
        let mut f = Framer::default();
        f.push(&[0, 10, 1, 2, 3]);
        assert_eq!(f.next_frame(), None);
        assert_eq!(f.pending(), 5);
    }
}
