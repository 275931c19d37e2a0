//! Batched UDP I/O for a shard: `recvmmsg` / `sendmmsg`, and an eventfd the control plane uses
//! to wake a shard that is waiting for packets. Linux only, like the deployments weir targets.

use std::io;
use std::mem::MaybeUninit;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// Datagrams read per `recvmmsg` call. Larger batches amortise the syscall under load at the
/// cost of 2 KiB of buffer each; 32 covers a burst of a 720p keyframe from one publisher.
pub const RECV_BATCH: usize = 32;
/// Largest datagram accepted. WebRTC keeps packets under the path MTU (~1200-1500 bytes);
/// anything larger is truncated by the kernel and then rejected by the engine as malformed.
pub const MAX_DATAGRAM: usize = 2048;

/// Room for one `SO_RXQ_OVFL` control message (a u32 after the cmsg header), 8-aligned.
type Control = [u64; 4];

/// Receive buffers for one batch, allocated once per shard.
pub struct RecvBatch {
    bufs: Vec<[u8; MAX_DATAGRAM]>,
    addrs: Vec<libc::sockaddr_storage>,
    lens: Vec<usize>,
    controls: Vec<Control>,
    count: usize,
    kernel_drops: Option<u32>,
}

impl Default for RecvBatch {
    fn default() -> Self {
        RecvBatch {
            bufs: vec![[0u8; MAX_DATAGRAM]; RECV_BATCH],
            // SAFETY: sockaddr_storage is plain old data; all-zero is a valid (empty) value.
            addrs: vec![unsafe { MaybeUninit::zeroed().assume_init() }; RECV_BATCH],
            lens: vec![0; RECV_BATCH],
            controls: vec![[0; 4]; RECV_BATCH],
            count: 0,
            kernel_drops: None,
        }
    }
}

impl RecvBatch {
    /// The datagrams of the last successful [`recv_batch`].
    pub fn iter(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> + '_ {
        (0..self.count).filter_map(move |i| {
            let addr = sockaddr_to_std(&self.addrs[i])?;
            Some((addr, &self.bufs[i][..self.lens[i]]))
        })
    }

    /// Datagrams the kernel has dropped on this socket since it was created because its
    /// receive buffer was full, as of the last datagram read (needs [`count_drops`]). The
    /// kernel's counter is 32 bits and wraps.
    pub fn kernel_drops(&self) -> Option<u32> {
        self.kernel_drops
    }
}

/// A UDP socket bound to `addr` with `SO_REUSEPORT`, so several shards can share one port.
pub fn bind_reuseport(addr: SocketAddr) -> io::Result<UdpSocket> {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain syscall; the descriptor is owned by the UdpSocket below or closed on error.
    let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor we own from here on.
    let socket = unsafe { UdpSocket::from_raw_fd(fd) };
    set_int(&socket, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
    let (ss, len) = std_to_sockaddr(&addr);
    // SAFETY: `ss` holds a sockaddr of `len` bytes for this family.
    let r = unsafe { libc::bind(fd, (&ss as *const libc::sockaddr_storage).cast(), len) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(socket)
}

/// Ask the kernel to report, with each datagram, how many it dropped on this socket for want
/// of receive buffer (`SO_RXQ_OVFL`).
pub fn count_drops(socket: &UdpSocket) -> io::Result<()> {
    set_int(socket, libc::SOL_SOCKET, libc::SO_RXQ_OVFL, 1)
}

/// Size the socket's receive and send buffers to `bytes`, beyond `net.core.rmem_max` /
/// `wmem_max` where the process may (`SO_RCVBUFFORCE` needs `CAP_NET_ADMIN`). Returns the
/// sizes the kernel granted (it reports twice what it accounts as payload room).
pub fn size_buffers(socket: &UdpSocket, bytes: usize) -> io::Result<(usize, usize)> {
    let want = bytes.min(i32::MAX as usize / 2) as libc::c_int;
    for (opt, force) in [
        (libc::SO_RCVBUF, libc::SO_RCVBUFFORCE),
        (libc::SO_SNDBUF, libc::SO_SNDBUFFORCE),
    ] {
        if set_int(socket, libc::SOL_SOCKET, force, want).is_err() {
            set_int(socket, libc::SOL_SOCKET, opt, want)?;
        }
    }
    Ok((
        get_int(socket, libc::SOL_SOCKET, libc::SO_RCVBUF)? as usize,
        get_int(socket, libc::SOL_SOCKET, libc::SO_SNDBUF)? as usize,
    ))
}

fn set_int(
    socket: &UdpSocket,
    level: libc::c_int,
    opt: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: passes a live c_int and its size.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn get_int(socket: &UdpSocket, level: libc::c_int, opt: libc::c_int) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: passes a live c_int and its size for the kernel to fill.
    let r = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            level,
            opt,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r == 0 {
        Ok(v)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Read up to [`RECV_BATCH`] datagrams without blocking. Returns how many were read (0 when
/// none are waiting).
pub fn recv_batch(socket: &UdpSocket, batch: &mut RecvBatch) -> io::Result<usize> {
    let mut iovecs: [libc::iovec; RECV_BATCH] = unsafe { MaybeUninit::zeroed().assume_init() };
    let mut hdrs: [libc::mmsghdr; RECV_BATCH] = unsafe { MaybeUninit::zeroed().assume_init() };
    for i in 0..RECV_BATCH {
        iovecs[i].iov_base = batch.bufs[i].as_mut_ptr().cast();
        iovecs[i].iov_len = MAX_DATAGRAM;
        hdrs[i].msg_hdr.msg_iov = &mut iovecs[i];
        hdrs[i].msg_hdr.msg_iovlen = 1;
        hdrs[i].msg_hdr.msg_name = (&mut batch.addrs[i] as *mut libc::sockaddr_storage).cast();
        hdrs[i].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
        hdrs[i].msg_hdr.msg_control = batch.controls[i].as_mut_ptr().cast();
        hdrs[i].msg_hdr.msg_controllen = std::mem::size_of::<Control>();
    }
    // SAFETY: every header points at a live buffer of the stated length owned by `batch`.
    let n = unsafe {
        libc::recvmmsg(
            socket.as_raw_fd(),
            hdrs.as_mut_ptr(),
            RECV_BATCH as u32,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        batch.count = 0;
        return match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
            _ => Err(e),
        };
    }
    let n = n as usize;
    for (i, hdr) in hdrs.iter().enumerate().take(n) {
        batch.lens[i] = (hdr.msg_len as usize).min(MAX_DATAGRAM);
        if let Some(d) = rxq_ovfl(&hdr.msg_hdr) {
            batch.kernel_drops = Some(d);
        }
    }
    batch.count = n;
    Ok(n)
}

/// The `SO_RXQ_OVFL` drop counter in a received message's control data, if present.
fn rxq_ovfl(msg: &libc::msghdr) -> Option<u32> {
    // SAFETY: `msg` was filled by recvmmsg with msg_control pointing at a live, aligned
    // buffer of msg_controllen bytes; the CMSG_* helpers stay inside it.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SO_RXQ_OVFL {
                return Some(std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<u32>()));
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    None
}

/// Linux `UDP_SEGMENT` (uapi/linux/udp.h): the socket-level option and cmsg type for GSO.
const UDP_SEGMENT: libc::c_int = 103;
/// Most segments the kernel accepts in one GSO send (`UDP_MAX_SEGMENTS`).
const GSO_MAX_SEGMENTS: usize = 64;
/// Largest payload of one GSO send (one IP datagram's worth before segmentation).
const GSO_MAX_BYTES: usize = 65_000;
/// `sendmmsg` messages per call: bounded so one flush cannot hold the shard for long.
const SEND_CHUNK: usize = 64;

/// Outgoing datagrams collected during one loop iteration.
///
/// Flushing groups them by destination and sends each run of same-sized datagrams to one
/// destination as a single GSO send (`UDP_SEGMENT`): the kernel then walks the stack once for
/// the whole run, which on loopback costs about a quarter of one `sendmmsg` entry per
/// datagram. Runs form naturally: the packets of one video frame are the same size, and
/// one loop iteration forwards all packets of a burst. All buffers are reused across flushes.
pub struct SendQueue {
    /// Payload bytes of all queued datagrams, back to back.
    data: Vec<u8>,
    items: Vec<(SocketAddr, usize, usize)>,
    order: Vec<usize>,
    gso: bool,
    stats: SendStats,
}

/// What a flush did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SendStats {
    pub datagrams: u64,
    pub bytes: u64,
    pub dropped: u64,
    /// Send calls' messages: one per GSO run or lone datagram.
    pub messages: u64,
}

impl Default for SendQueue {
    fn default() -> Self {
        SendQueue {
            data: Vec::new(),
            items: Vec::new(),
            order: Vec::new(),
            gso: true,
            stats: SendStats::default(),
        }
    }
}

impl SendQueue {
    /// A queue that never uses GSO (for kernels or sockets without it, and for comparison).
    pub fn without_gso() -> Self {
        SendQueue {
            gso: false,
            ..Default::default()
        }
    }

    pub fn push(&mut self, to: SocketAddr, contents: &[u8]) {
        let start = self.data.len();
        self.data.extend_from_slice(contents);
        self.items.push((to, start, contents.len()));
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Hand every queued datagram to `deliver` in order and empty the queue (for a core run
    /// without a socket: simulations, fuzzing and benchmarks; and packets for ICE-TCP
    /// connections, which are written one frame at a time).
    pub fn drain_each(&mut self, mut deliver: impl FnMut(SocketAddr, &[u8])) -> SendStats {
        let mut st = SendStats::default();
        for &(to, start, len) in &self.items {
            deliver(to, &self.data[start..start + len]);
            st.datagrams += 1;
            st.messages += 1;
            st.bytes += len as u64;
        }
        self.data.clear();
        self.items.clear();
        st
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Whether GSO is still in use (it is switched off for good if the kernel refuses it).
    pub fn gso_enabled(&self) -> bool {
        self.gso
    }

    /// Send everything queued. Datagrams the kernel refuses (buffer full, unreachable) are
    /// counted as dropped, never retried: media is real-time and the engine's NACK/RTX handles
    /// loss.
    pub fn flush(&mut self, socket: &UdpSocket) -> SendStats {
        self.stats = SendStats::default();
        if self.items.is_empty() {
            return self.stats;
        }
        // Group by destination, keeping each destination's order.
        self.order.clear();
        self.order.extend(0..self.items.len());
        let items = &self.items;
        // Unstable sort on (destination, index): the same order as a stable sort by
        // destination, without the stable sort's scratch allocation.
        self.order.sort_unstable_by_key(|i| (items[*i].0, *i));
        // Runs: (first index into order, count, segment size).
        let mut runs: Vec<(usize, usize, usize)> = Vec::with_capacity(self.items.len());
        let mut i = 0;
        while i < self.order.len() {
            let (dest, _, size) = self.items[self.order[i]];
            let mut n = 1;
            let mut bytes = size;
            if self.gso {
                while i + n < self.order.len() && n < GSO_MAX_SEGMENTS {
                    let (d, _, l) = self.items[self.order[i + n]];
                    // Same destination; every segment but the last must be exactly `size`.
                    if d != dest || l > size || bytes + l > GSO_MAX_BYTES {
                        break;
                    }
                    n += 1;
                    bytes += l;
                    if l < size {
                        break;
                    }
                }
            }
            runs.push((i, n, size));
            i += n;
        }
        let mut done = 0;
        while done < runs.len() {
            let end = (done + SEND_CHUNK).min(runs.len());
            self.send_runs(socket, &runs[done..end]);
            done = end;
        }
        self.data.clear();
        self.items.clear();
        self.stats
    }

    fn send_runs(&mut self, socket: &UdpSocket, runs: &[(usize, usize, usize)]) {
        let segments: usize = runs.iter().map(|r| r.1).sum();
        let mut iovecs: Vec<libc::iovec> = Vec::with_capacity(segments);
        let mut addrs: Vec<(libc::sockaddr_storage, u32)> = Vec::with_capacity(runs.len());
        // One aligned cmsg buffer per run (u64 keeps cmsghdr alignment).
        let cmsg_space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) } as usize;
        let words = cmsg_space.div_ceil(8);
        let mut cmsgs: Vec<u64> = vec![0; words * runs.len()];
        for &(first, n, _) in runs {
            for k in 0..n {
                let (_, start, len) = self.items[self.order[first + k]];
                iovecs.push(libc::iovec {
                    iov_base: self.data[start..].as_ptr() as *mut libc::c_void,
                    iov_len: len,
                });
            }
            addrs.push(std_to_sockaddr(&self.items[self.order[first]].0));
        }
        let mut hdrs: Vec<libc::mmsghdr> = Vec::with_capacity(runs.len());
        let mut iov_at = 0;
        for (r, &(_, n, size)) in runs.iter().enumerate() {
            // SAFETY: zeroed mmsghdr is valid; fields are filled below.
            let mut h: libc::mmsghdr = unsafe { MaybeUninit::zeroed().assume_init() };
            h.msg_hdr.msg_name = (&mut addrs[r].0 as *mut libc::sockaddr_storage).cast();
            h.msg_hdr.msg_namelen = addrs[r].1;
            h.msg_hdr.msg_iov = &mut iovecs[iov_at];
            h.msg_hdr.msg_iovlen = n;
            iov_at += n;
            if n > 1 {
                let buf = &mut cmsgs[r * words..(r + 1) * words];
                h.msg_hdr.msg_control = buf.as_mut_ptr().cast();
                h.msg_hdr.msg_controllen = cmsg_space;
                // SAFETY: the control buffer is large enough for one cmsg carrying a u16.
                unsafe {
                    let c = libc::CMSG_FIRSTHDR(&h.msg_hdr);
                    (*c).cmsg_level = libc::SOL_UDP;
                    (*c).cmsg_type = UDP_SEGMENT;
                    (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as usize;
                    std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), size as u16);
                }
            }
            hdrs.push(h);
        }
        let mut done = 0;
        while done < hdrs.len() {
            // SAFETY: headers point into `addrs`, `iovecs`, `cmsgs` and `self.data`, all alive.
            let sent = unsafe {
                libc::sendmmsg(
                    socket.as_raw_fd(),
                    hdrs[done..].as_mut_ptr(),
                    (hdrs.len() - done) as u32,
                    0,
                )
            };
            if sent <= 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // The kernel refused the message at `done`: count its datagrams and go on. A
                // GSO message refused with EIO/EINVAL means no GSO here: stop using it.
                let n = runs[done].1 as u64;
                if n > 1 && matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::EINVAL)) {
                    self.gso = false;
                }
                self.stats.dropped += n;
                done += 1;
                continue;
            }
            for (k, h) in hdrs[done..done + sent as usize].iter().enumerate() {
                self.stats.bytes += u64::from(h.msg_len);
                self.stats.datagrams += runs[done + k].1 as u64;
                self.stats.messages += 1;
            }
            done += sent as usize;
        }
    }
}

/// Wakes a shard blocked in [`wait_readable`] from another thread.
pub struct Waker {
    fd: OwnedFd,
}

impl Waker {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; the returned fd is owned below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh, valid descriptor we own.
        Ok(Waker {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    pub fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd. A full counter (EAGAIN) means
        // a wake-up is already pending, which is all we need.
        unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Reset after waking up; returns whether a wake-up was pending.
    pub fn drain(&self) -> bool {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64; EAGAIN when nothing is pending is fine.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        n == 8 && v > 0
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Block until the socket is readable, the waker fires, or the timeout passes.
pub fn wait_readable(socket: &UdpSocket, waker: &Waker, timeout: Option<Duration>) {
    wait_readable_with(socket, waker, &mut Vec::new(), timeout);
}

/// [`wait_readable`], also waking for the descriptors in `extra` (left as they were given).
pub fn wait_readable_with(
    socket: &UdpSocket,
    waker: &Waker,
    extra: &mut Vec<libc::pollfd>,
    timeout: Option<Duration>,
) {
    let given = extra.len();
    for fd in [socket.as_raw_fd(), waker.raw_fd()] {
        extra.push(libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
    }
    let ms = match timeout {
        None => -1,
        // Round up so a deadline 0.3 ms away does not spin.
        Some(t) => t.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32,
    };
    // SAFETY: `extra` holds valid pollfd entries for live descriptors.
    unsafe { libc::poll(extra.as_mut_ptr(), extra.len() as libc::nfds_t, ms) };
    extra.truncate(given);
}

fn sockaddr_to_std(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: family says this storage holds a sockaddr_in.
            let a: &libc::sockaddr_in = unsafe { &*(ss as *const _ as *const libc::sockaddr_in) };
            let ip = u32::from_be(a.sin_addr.s_addr);
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip.into(),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: family says this storage holds a sockaddr_in6.
            let a: &libc::sockaddr_in6 = unsafe { &*(ss as *const _ as *const libc::sockaddr_in6) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                a.sin6_addr.s6_addr.into(),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

fn std_to_sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, u32) {
    // SAFETY: zeroed sockaddr_storage is valid; we fill the variant that matches.
    let mut ss: libc::sockaddr_storage = unsafe { MaybeUninit::zeroed().assume_init() };
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in, sin) };
            (ss, std::mem::size_of::<libc::sockaddr_in>() as u32)
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in6, sin6) };
            (ss, std::mem::size_of::<libc::sockaddr_in6>() as u32)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batched_send_and_receive_over_loopback() {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        b.set_nonblocking(true).unwrap();
        let to = b.local_addr().unwrap();
        let mut q = SendQueue::default();
        for i in 0..10u8 {
            q.push(to, &[i; 100]);
        }
        let st = q.flush(&a);
        assert_eq!((st.datagrams, st.dropped, st.bytes), (10, 0, 1000));
        // Ten same-sized datagrams to one destination go out as one GSO message.
        assert_eq!(st.messages, 1);
        assert!(q.is_empty());
        let waker = Waker::new().unwrap();
        let mut batch = RecvBatch::default();
        let mut got = Vec::new();
        while got.len() < 10 {
            wait_readable(&b, &waker, Some(Duration::from_secs(5)));
            let n = recv_batch(&b, &mut batch).unwrap();
            assert!(n > 0, "datagrams sent over loopback must arrive");
            for (from, data) in batch.iter() {
                assert_eq!(from, a.local_addr().unwrap());
                got.push(data.to_vec());
            }
        }
        for (i, d) in got.iter().enumerate() {
            assert_eq!(d, &vec![i as u8; 100]);
        }
    }

    #[test]
    fn mixed_destinations_and_sizes_keep_per_destination_order() {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let rx: Vec<UdpSocket> = (0..3)
            .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        for s in &rx {
            s.set_nonblocking(true).unwrap();
        }
        for gso in [true, false] {
            let mut q = if gso {
                SendQueue::default()
            } else {
                SendQueue::without_gso()
            };
            // Interleaved like a fan-out: packet k to every receiver, varying sizes.
            let sizes = [300usize, 300, 300, 120, 300, 500, 500, 40];
            for (k, size) in sizes.iter().enumerate() {
                for s in &rx {
                    q.push(s.local_addr().unwrap(), &vec![k as u8; *size]);
                }
            }
            let st = q.flush(&a);
            assert_eq!(st.datagrams, (sizes.len() * rx.len()) as u64);
            assert_eq!(st.dropped, 0);
            if gso {
                // Per receiver: [300 x3, 120] [300] [500 x2] [40]... fewer messages than datagrams.
                assert!(st.messages < st.datagrams, "{st:?}");
            } else {
                assert_eq!(st.messages, st.datagrams);
            }
            let waker = Waker::new().unwrap();
            let mut batch = RecvBatch::default();
            for s in &rx {
                let mut got: Vec<Vec<u8>> = Vec::new();
                while got.len() < sizes.len() {
                    wait_readable(s, &waker, Some(Duration::from_secs(5)));
                    assert!(
                        recv_batch(s, &mut batch).unwrap() > 0,
                        "datagrams must arrive"
                    );
                    got.extend(batch.iter().map(|(_, d)| d.to_vec()));
                }
                for (k, d) in got.iter().enumerate() {
                    assert_eq!(
                        d,
                        &vec![k as u8; sizes[k]],
                        "gso={gso}: datagram {k} out of order or resized"
                    );
                }
            }
        }
    }

    #[test]
    fn datagrams_the_kernel_drops_for_a_full_buffer_are_counted() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        count_drops(&rx).unwrap();
        // The smallest buffer the kernel allows: a few datagrams fill it.
        set_int(&rx, libc::SOL_SOCKET, libc::SO_RCVBUF, 1).unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        for _ in 0..200 {
            tx.send_to(&[7u8; 1000], rx.local_addr().unwrap()).unwrap();
        }
        let mut batch = RecvBatch::default();
        let mut queued = 0;
        loop {
            let n = recv_batch(&rx, &mut batch).unwrap();
            if n == 0 {
                break;
            }
            queued += n;
        }
        assert!(
            queued > 0 && queued < 200,
            "some were queued, not all: {queued}"
        );
        // The kernel stamps each datagram with the count when it queues it: the next one
        // carries every drop of the flood.
        tx.send_to(&[7u8; 10], rx.local_addr().unwrap()).unwrap();
        assert_eq!(recv_batch(&rx, &mut batch).unwrap(), 1);
        let drops = batch.kernel_drops().expect("SO_RXQ_OVFL reported");
        assert_eq!(
            drops as usize,
            200 - queued,
            "every datagram not queued was counted"
        );
    }

    #[test]
    fn buffers_are_sized_as_asked_where_allowed() {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        let (rcv, snd) = size_buffers(&s, 4 * 1024 * 1024).unwrap();
        // The kernel reports twice the size; without CAP_NET_ADMIN it caps at rmem_max.
        let cap = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        assert!(rcv >= (4 * 1024 * 1024).min(cap), "{rcv} (rmem_max {cap})");
        assert!(snd > 0);
    }

    #[test]
    fn waker_interrupts_a_wait() {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        let waker = std::sync::Arc::new(Waker::new().unwrap());
        let w2 = waker.clone();
        assert!(!waker.drain(), "nothing pending before the wake");
        let t = std::thread::spawn(move || w2.wake());
        // Bounded: a broken waker fails the test after the timeout instead of hanging it.
        wait_readable(&s, &waker, Some(Duration::from_secs(20)));
        assert!(waker.drain(), "the wait ended by the wake, not the timeout");
        t.join().unwrap();
    }

    #[test]
    fn ipv6_addresses_round_trip() {
        let addr: SocketAddr = "[::1]:4242".parse().unwrap();
        let (ss, _) = std_to_sockaddr(&addr);
        assert_eq!(sockaddr_to_std(&ss), Some(addr));
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let (ss, _) = std_to_sockaddr(&addr);
        assert_eq!(sockaddr_to_std(&ss), Some(addr));
    }
}
