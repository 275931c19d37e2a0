//! Just enough STUN (RFC 8489) to route a connectivity check from a new address to the one peer
//! it is for: the `USERNAME` attribute of a binding request is `<our ufrag>:<their ufrag>`, and
//! our ufrag names the peer. The engine then checks the message's integrity as before; this
//! only spares asking every peer of the shard about every check from an unknown address.

/// STUN's magic cookie (RFC 8489 §5).
const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];
/// Attribute type of `USERNAME`.
const USERNAME: u16 = 0x0006;
/// Longest `USERNAME` value (RFC 8489 §14.3: under 509 bytes).
const MAX_USERNAME: usize = 513;

/// The local part of a STUN message's `USERNAME` (before the `:`), if the datagram is a
/// well-formed STUN message that carries one. Responses carry none.
pub fn local_ufrag(datagram: &[u8]) -> Option<&str> {
    let header = datagram.get(..20)?;
    if header[0] & 0xc0 != 0 || header[4..8] != MAGIC_COOKIE {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    if len % 4 != 0 {
        return None;
    }
    let mut attrs = datagram.get(20..20 + len)?;
    while attrs.len() >= 4 {
        let kind = u16::from_be_bytes([attrs[0], attrs[1]]);
        let n = usize::from(u16::from_be_bytes([attrs[2], attrs[3]]));
        let value = attrs.get(4..4 + n)?;
        if kind == USERNAME {
            if n > MAX_USERNAME {
                return None;
            }
            let name = std::str::from_utf8(value).ok()?;
            return name.split_once(':').map(|(ours, _)| ours);
        }
        let padded = 4 + n.div_ceil(4) * 4;
        attrs = attrs.get(padded..)?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A binding request with the given attributes (type, value).
    fn stun(attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut body = Vec::new();
        for (t, v) in attrs {
            body.extend_from_slice(&t.to_be_bytes());
            body.extend_from_slice(&(v.len() as u16).to_be_bytes());
            body.extend_from_slice(v);
            body.resize(body.len().div_ceil(4) * 4, 0);
        }
        let mut m = vec![0x00, 0x01];
        m.extend_from_slice(&(body.len() as u16).to_be_bytes());
        m.extend_from_slice(&MAGIC_COOKIE);
        m.extend_from_slice(&[7; 12]);
        m.extend(body);
        m
    }

    #[test]
    fn the_username_names_our_ufrag() {
        let m = stun(&[(0x0024, &[0, 0, 0, 1]), (USERNAME, b"ourUfrag:theirs")]);
        assert_eq!(local_ufrag(&m), Some("ourUfrag"));
        // Padding after an odd-length attribute is skipped.
        let m = stun(&[(0x8022, b"abc"), (USERNAME, b"u1:u2")]);
        assert_eq!(local_ufrag(&m), Some("u1"));
    }

    #[test]
    fn anything_else_names_nobody() {
        assert_eq!(local_ufrag(&stun(&[(0x0020, &[0; 8])])), None, "a response");
        assert_eq!(local_ufrag(&stun(&[(USERNAME, b"nocolon")])), None);
        let mut m = stun(&[(USERNAME, b"a:b")]);
        m[4] = 0; // not the magic cookie
        assert_eq!(local_ufrag(&m), None);
        let mut m = stun(&[(USERNAME, b"a:b")]);
        m[0] = 0x80; // an RTP-looking first byte
        assert_eq!(local_ufrag(&m), None);
        let m = stun(&[(USERNAME, b"a:b")]);
        assert_eq!(local_ufrag(&m[..m.len() - 4]), None, "truncated");
        let mut m = stun(&[(USERNAME, b"a:b")]);
        m[22..24].copy_from_slice(&2000u16.to_be_bytes()); // attribute longer than the message
        assert_eq!(local_ufrag(&m), None);
        assert_eq!(local_ufrag(&[]), None);
        assert_eq!(local_ufrag(&[0; 19]), None);
    }

    #[test]
    fn every_prefix_of_a_message_is_safe() {
        let m = stun(&[(0x0024, &[0, 0, 0, 1]), (USERNAME, b"ourUfrag:theirs")]);
        for n in 0..m.len() {
            let _ = local_ufrag(&m[..n]);
        }
    }
}
