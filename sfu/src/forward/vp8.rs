//! The VP8 RTP payload descriptor (RFC 7741 §4.2), read for what forwarding decides on: where
//! a frame starts, whether it is a keyframe, its temporal layer and whether it is a layer sync
//! point, and its picture id (which weir renumbers when it drops temporal layers,
//! `forward::temporal`).
//!
//! The descriptor is written by the sender's packetiser after any frame encryption, so it is in
//! clear on end-to-end encrypted media. The keyframe bit is in the first byte of the VP8 frame
//! header, which the frame-encryption schemes real clients use leave unencrypted.

/// What weir reads from one VP8 packet's payload descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Vp8Descriptor {
    /// S set and partition 0: the first packet of a frame.
    pub starts_frame: bool,
    /// The first packet of a keyframe (the frame header's P bit clear).
    pub keyframe: bool,
    /// The picture id, when present, and whether it is the 15-bit form.
    pub picture_id: Option<PictureId>,
    /// TL0PICIDX, when present: counts the frames of temporal layer 0.
    pub tl0_pic_idx: Option<u8>,
    /// The temporal layer (TID), when the descriptor carries one.
    pub tid: Option<u8>,
    /// Y: this frame depends only on temporal layer 0, so a subscriber may start receiving
    /// its layer here.
    pub layer_sync: bool,
}

/// A VP8 picture id as carried: 7 or 15 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PictureId {
    pub value: u16,
    pub long: bool,
}

impl PictureId {
    /// The number of distinct values of this width (128 or 32768).
    pub fn modulus(self) -> u16 {
        if self.long {
            1 << 15
        } else {
            1 << 7
        }
    }
}

/// Why a payload is not a readable VP8 descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Vp8Error {
    #[error("VP8 payload ends inside its descriptor")]
    Truncated,
}

impl Vp8Descriptor {
    /// Read the descriptor at the start of `payload`. Any payload long enough for the fields
    /// its flags announce, plus one byte of frame, is read; nothing panics on hostile input.
    pub fn parse(payload: &[u8]) -> Result<Self, Vp8Error> {
        let byte = |i: usize| payload.get(i).copied().ok_or(Vp8Error::Truncated);
        let b0 = byte(0)?;
        let mut d = Vp8Descriptor {
            starts_frame: b0 & 0x10 != 0 && b0 & 0x0f == 0,
            ..Default::default()
        };
        let mut i = 1;
        if b0 & 0x80 != 0 {
            let x = byte(i)?;
            i += 1;
            if x & 0x80 != 0 {
                let hi = byte(i)?;
                i += 1;
                d.picture_id = Some(if hi & 0x80 != 0 {
                    let lo = byte(i)?;
                    i += 1;
                    PictureId {
                        value: u16::from(hi & 0x7f) << 8 | u16::from(lo),
                        long: true,
                    }
                } else {
                    PictureId {
                        value: u16::from(hi),
                        long: false,
                    }
                });
            }
            if x & 0x40 != 0 {
                d.tl0_pic_idx = Some(byte(i)?);
                i += 1;
            }
            // T (TID present) or K (KEYIDX present) share one byte: TID(2) Y(1) KEYIDX(5).
            if x & 0x30 != 0 {
                let t = byte(i)?;
                i += 1;
                if x & 0x20 != 0 {
                    d.tid = Some(t >> 6);
                    d.layer_sync = t & 0x20 != 0;
                }
            }
        }
        let header = byte(i)?;
        d.keyframe = d.starts_frame && header & 0x01 == 0;
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_descriptor_is_read() {
        // X S PID=0 | I L T K=0 | M + 15-bit id 0x1234 | TL0PICIDX 5 | TID 2, Y | header P=1
        let d = Vp8Descriptor::parse(&[0x90, 0xe0, 0x92, 0x34, 0x05, 0xa0, 0x01]).unwrap();
        assert!(d.starts_frame);
        assert!(!d.keyframe);
        assert_eq!(
            d.picture_id,
            Some(PictureId {
                value: 0x1234,
                long: true
            })
        );
        assert_eq!(d.tl0_pic_idx, Some(5));
        assert_eq!(d.tid, Some(2));
        assert!(d.layer_sync);
    }

    #[test]
    fn a_keyframe_on_layer_zero_with_a_short_picture_id() {
        let d = Vp8Descriptor::parse(&[0x90, 0xa0, 0x11, 0x00, 0x9c]).unwrap();
        assert!(d.keyframe);
        assert_eq!(
            d.picture_id,
            Some(PictureId {
                value: 0x11,
                long: false
            })
        );
        assert_eq!(d.tid, Some(0));
        assert!(!d.layer_sync);
        assert_eq!(d.tl0_pic_idx, None);
    }

    #[test]
    fn keyidx_alone_carries_no_temporal_layer() {
        let d = Vp8Descriptor::parse(&[0x90, 0x10, 0x3f, 0x01]).unwrap();
        assert_eq!(d.tid, None);
        assert!(!d.layer_sync);
    }

    #[test]
    fn a_continuation_packet_starts_nothing() {
        let d = Vp8Descriptor::parse(&[0x80, 0x20, 0x40, 0x00]).unwrap();
        assert!(!d.starts_frame);
        assert!(!d.keyframe, "P=0 in the middle of a frame is payload");
        assert_eq!(d.tid, Some(1));
        let second_partition = Vp8Descriptor::parse(&[0x11, 0x00]).unwrap();
        assert!(!second_partition.starts_frame);
    }

    #[test]
    fn truncated_descriptors_are_errors() {
        for p in [
            &[][..],
            &[0x90],
            &[0x90, 0x80],
            &[0x90, 0x80, 0x81],
            &[0x90, 0xe0, 0x92, 0x34, 0x05],
            &[0x90, 0xe0, 0x92, 0x34, 0x05, 0xa0],
        ] {
            assert_eq!(Vp8Descriptor::parse(p), Err(Vp8Error::Truncated), "{p:?}");
        }
    }
}
