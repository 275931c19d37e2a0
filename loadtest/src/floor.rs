//! The floor: what sending one forwarded packet costs this machine at the least, measured at
//! start so the focus's cost can be put beside it. Two references over loopback UDP:
//! - GSO: a burst of same-size datagrams to one destination in one `sendmsg` with a
//!   `UDP_SEGMENT` control message (the cheapest way the kernel offers), plus SRTP's
//!   AES-128-GCM protection of one ~1200-byte packet (aws-lc-rs);
//! - plain `sendto`, one datagram per call.
//!
//! Both loops are bounded in count; only 127.0.0.1 is used.

use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};

/// Datagram size: a typical full video RTP packet after SRTP.
pub const DATAGRAM: usize = 1200;
/// Datagrams per GSO `sendmsg`: one subscriber's packets of one video frame.
pub const GSO_SEGMENTS: usize = 16;
/// Datagrams sent per measurement (bounded; ~20-70 ms of work here).
pub const FLOOR_DATAGRAMS: usize = 20_000;
/// GCM protections per measurement.
pub const GCM_ITERATIONS: usize = 50_000;
/// Repeat each measurement and keep the best, to shrug off scheduling noise.
pub const ROUNDS: usize = 5;

/// The measured floor, µs per packet.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Floor {
    pub gso_us: f64,
    pub sendto_us: f64,
    pub gcm_us: f64,
    /// `gso_us + gcm_us`: the reference `ratio_to_floor` divides by.
    pub floor_us: f64,
    /// Whether the kernel accepted UDP_SEGMENT (if not, `gso_us` is the sendmmsg-free fallback
    /// of one sendto per datagram).
    pub gso_supported: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum FloorError {
    #[error("loopback socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("AES-128-GCM setup failed")]
    Crypto,
}

/// Measure all three references.
pub fn measure() -> Result<Floor, FloorError> {
    let rx = UdpSocket::bind("127.0.0.1:0")?;
    rx.set_nonblocking(true)?;
    let tx = UdpSocket::bind("127.0.0.1:0")?;
    let dest = rx.local_addr()?;
    tx.connect(dest)?;
    let buf = vec![0x5au8; DATAGRAM * GSO_SEGMENTS];

    let sendto_us = best(|| {
        let start = Instant::now();
        for _ in 0..FLOOR_DATAGRAMS {
            let _ = tx.send(&buf[..DATAGRAM]);
        }
        let d = start.elapsed();
        drain(&rx);
        Ok(per(d, FLOOR_DATAGRAMS))
    })?;

    let gso_supported = gso_send(&tx, &buf).is_ok();
    drain(&rx);
    let gso_us = if gso_supported {
        best(|| {
            let calls = FLOOR_DATAGRAMS / GSO_SEGMENTS;
            let start = Instant::now();
            for _ in 0..calls {
                let _ = gso_send(&tx, &buf);
            }
            let d = start.elapsed();
            drain(&rx);
            Ok(per(d, calls * GSO_SEGMENTS))
        })?
    } else {
        sendto_us
    };

    let gcm_us = best(gcm_once)?;
    Ok(Floor {
        gso_us,
        sendto_us,
        gcm_us,
        floor_us: gso_us + gcm_us,
        gso_supported,
    })
}

fn best(mut f: impl FnMut() -> Result<f64, FloorError>) -> Result<f64, FloorError> {
    let mut b = f64::INFINITY;
    for _ in 0..ROUNDS {
        b = b.min(f()?);
    }
    Ok(b)
}

fn per(d: Duration, n: usize) -> f64 {
    d.as_secs_f64() * 1e6 / n.max(1) as f64
}

fn drain(rx: &UdpSocket) {
    let mut b = [0u8; 2048];
    // Bounded: at most what the receive buffer can hold.
    for _ in 0..FLOOR_DATAGRAMS * 2 {
        if rx.recv(&mut b).is_err() {
            break;
        }
    }
}

/// One `sendmsg` of `buf` as `buf.len() / DATAGRAM` datagrams via UDP_SEGMENT.
fn gso_send(sock: &UdpSocket, buf: &[u8]) -> std::io::Result<()> {
    const UDP_SEGMENT: libc::c_int = 103;
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: msghdr is plain data; zeroed is a valid initial state.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = space as _;
    // SAFETY: msg points at a control buffer of CMSG_SPACE(u16) bytes, so the first header and
    // its u16 payload fit; the socket is connected, so no address is needed.
    let rc = unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_UDP;
        (*cmsg).cmsg_type = UDP_SEGMENT;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut u16, DATAGRAM as u16);
        libc::sendmsg(sock.as_raw_fd(), &msg, 0)
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn gcm_once() -> Result<f64, FloorError> {
    let key = UnboundKey::new(&AES_128_GCM, &[7u8; 16]).map_err(|_| FloorError::Crypto)?;
    let key = LessSafeKey::new(key);
    // An RTP packet: 12-byte header as associated data, the rest encrypted in place.
    let header = [0x80u8, 96, 0, 1, 0, 0, 0, 1, 0, 0, 0, 2];
    let mut payload = vec![0x33u8; DATAGRAM - header.len() - 16];
    let start = Instant::now();
    for i in 0..GCM_ITERATIONS {
        let mut iv = [0u8; 12];
        iv[4..12].copy_from_slice(&(i as u64).to_be_bytes());
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(iv),
                Aad::from(&header),
                &mut payload,
            )
            .map_err(|_| FloorError::Crypto)?;
        std::hint::black_box(&tag);
    }
    Ok(per(start.elapsed(), GCM_ITERATIONS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_is_measured_and_positive() {
        let f = measure().expect("loopback UDP and aws-lc work here");
        assert!(
            f.sendto_us > 0.0 && f.gso_us > 0.0 && f.gcm_us > 0.0,
            "{f:?}"
        );
    }
}
