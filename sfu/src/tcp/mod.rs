//! ICE over TCP (RFC 6544, passive side): for participants whose UDP is blocked.
//!
//! One listener serves every shard on one port. A browser behind a TCP-only firewall connects
//! to the passive candidate weir announces and sends its first STUN check, framed as RFC 4571
//! says ([`framing`]). The check's `USERNAME` starts with weir's ICE ufrag, and each shard
//! gives its peers ufrags that name the shard ([`ufrag_prefix`]), so the acceptor
//! ([`accept`]) hands the connection to that shard without asking anyone. The shard owns it
//! from then on ([`links`]): its frames go to the peer's engine like datagrams, and what the
//! engine sends to that address goes back on it.

pub mod accept;
pub mod framing;
pub mod links;

use std::net::{SocketAddr, TcpStream};

pub use framing::{frame, FrameError, Framer, MAX_FRAME};

/// The start of the ICE ufrag of every peer of shard `index`: its number, then `z`. ICE ufrags
/// are letters, digits, `+` and `/`, and the rest of the ufrag is random, so the prefix is
/// unambiguous up to the first `z`.
pub fn ufrag_prefix(index: usize) -> String {
    format!("{index}z")
}

/// The shard a ufrag made with [`ufrag_prefix`] belongs to.
pub fn shard_of_ufrag(ufrag: &str) -> Option<usize> {
    let (digits, _) = ufrag.split_once('z')?;
    if digits.is_empty() || digits.len() > 4 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// An accepted connection whose first frame named a shard's peer, on its way to that shard.
#[derive(Debug)]
pub struct Handoff {
    pub stream: TcpStream,
    pub remote: SocketAddr,
    /// What was read so far: the first frame, unconsumed, and anything after it.
    pub framer: Framer,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shard_is_found_again_from_the_ufrags_it_makes() {
        for i in [0, 1, 9, 10, 63, 1000] {
            assert_eq!(
                shard_of_ufrag(&format!("{}a9Zz3", ufrag_prefix(i))),
                Some(i)
            );
        }
    }

    #[test]
    fn ufrags_weir_did_not_make_name_no_shard() {
        for u in ["", "z", "abc", "x1z", "12345z", "1+z", "12"] {
            assert_eq!(shard_of_ufrag(u), None, "{u:?}");
        }
    }
}
