//! Just enough STUN (RFC 8489) for two jobs the engine does not do.
//!
//! Routing a connectivity check from a new address to the one peer it is for: the `USERNAME`
//! attribute of a binding request is `<our ufrag>:<their ufrag>`, and our ufrag names the peer.
//! The engine then checks the message's integrity as before; this only spares asking every peer
//! of the shard about every check from an unknown address.
//!
//! Asking a STUN server what address the focus's packets come from ([`binding_request`],
//! [`mapped_address`]): behind a NAT that is the public address participants must be told.

/// STUN's magic cookie (RFC 8489 §5).
const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];
/// Attribute type of `USERNAME`.
const USERNAME: u16 = 0x0006;
/// Attribute types of `MAPPED-ADDRESS` (RFC 5389's predecessor still sends it) and
/// `XOR-MAPPED-ADDRESS`.
const MAPPED_ADDRESS: u16 = 0x0001;
const XOR_MAPPED_ADDRESS: u16 = 0x0020;
/// Message types: binding request and binding success response.
const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
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

/// A binding request with transaction id `txid` and no attributes: what a STUN server answers
/// with the address it saw the request come from.
pub fn binding_request(txid: [u8; 12]) -> [u8; 20] {
    let mut m = [0u8; 20];
    m[..2].copy_from_slice(&BINDING_REQUEST.to_be_bytes());
    m[4..8].copy_from_slice(&MAGIC_COOKIE);
    m[8..].copy_from_slice(&txid);
    m
}

/// The address a binding success response to `txid` reports (`XOR-MAPPED-ADDRESS`, else
/// `MAPPED-ADDRESS`). `None` for anything else: another transaction, an error response,
/// a malformed message.
pub fn mapped_address(response: &[u8], txid: [u8; 12]) -> Option<std::net::SocketAddr> {
    let header = response.get(..20)?;
    if u16::from_be_bytes([header[0], header[1]]) != BINDING_SUCCESS
        || header[4..8] != MAGIC_COOKIE
        || header[8..20] != txid
    {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    let mut attrs = response.get(20..20 + len)?;
    let mut plain = None;
    while attrs.len() >= 4 {
        let kind = u16::from_be_bytes([attrs[0], attrs[1]]);
        let n = usize::from(u16::from_be_bytes([attrs[2], attrs[3]]));
        let value = attrs.get(4..4 + n)?;
        match kind {
            XOR_MAPPED_ADDRESS => return address(value, Some(header)),
            MAPPED_ADDRESS => plain = address(value, None),
            _ => {}
        }
        attrs = attrs.get(4 + n.div_ceil(4) * 4..).unwrap_or(&[]);
    }
    plain
}

/// An address attribute's value: family, port, address; XORed with the cookie and
/// transaction id (`header`) for `XOR-MAPPED-ADDRESS`.
fn address(value: &[u8], header: Option<&[u8]>) -> Option<std::net::SocketAddr> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
    let family = *value.get(1)?;
    let mut port = u16::from_be_bytes([*value.get(2)?, *value.get(3)?]);
    let key: Vec<u8> = header
        .map(|h| h[4..20].to_vec())
        .unwrap_or_else(|| vec![0; 16]);
    if header.is_some() {
        port ^= u16::from_be_bytes([key[0], key[1]]);
    }
    let ip = match family {
        0x01 => {
            let b = value.get(4..8)?;
            IpAddr::V4(Ipv4Addr::new(
                b[0] ^ key[0],
                b[1] ^ key[1],
                b[2] ^ key[2],
                b[3] ^ key[3],
            ))
        }
        0x02 => {
            let b = value.get(4..20)?;
            let mut o = [0u8; 16];
            for (i, x) in o.iter_mut().enumerate() {
                *x = b[i] ^ key[i];
            }
            IpAddr::V6(Ipv6Addr::from(o))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
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

    /// A binding success response to `txid` carrying `attrs`.
    fn response(txid: [u8; 12], attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut m = stun(attrs);
        m[..2].copy_from_slice(&BINDING_SUCCESS.to_be_bytes());
        m[8..20].copy_from_slice(&txid);
        m
    }

    #[test]
    fn a_response_tells_the_address_the_server_saw() {
        let txid = [9; 12];
        // RFC 5769 §2.2's sample: 192.0.2.1:32853 XORed with the magic cookie.
        let xor4 = [0x00, 0x01, 0xa1, 0x47, 0xe1, 0x12, 0xa6, 0x43];
        let m = response(txid, &[(0x8022, b"test"), (XOR_MAPPED_ADDRESS, &xor4)]);
        assert_eq!(
            mapped_address(&m, txid),
            Some("192.0.2.1:32853".parse().unwrap())
        );
        let plain = [0x00, 0x01, 0x0d, 0x96, 203, 0, 113, 5];
        let m = response(txid, &[(MAPPED_ADDRESS, &plain)]);
        assert_eq!(
            mapped_address(&m, txid),
            Some("203.0.113.5:3478".parse().unwrap())
        );
        // IPv6: XORed with the cookie and the transaction id.
        let ip: std::net::Ipv6Addr = "2001:db8:1234:5678:11:2233:4455:6677".parse().unwrap();
        let mut key = MAGIC_COOKIE.to_vec();
        key.extend_from_slice(&txid);
        let mut v = vec![0x00, 0x02];
        v.extend_from_slice(&(32853u16 ^ 0x2112).to_be_bytes());
        v.extend(ip.octets().iter().zip(&key).map(|(a, b)| a ^ b));
        let m = response(txid, &[(XOR_MAPPED_ADDRESS, &v)]);
        assert_eq!(
            mapped_address(&m, txid),
            Some(std::net::SocketAddr::new(ip.into(), 32853))
        );
    }

    #[test]
    fn only_a_success_response_to_our_request_counts() {
        let txid = [9; 12];
        let xor4 = [0x00, 0x01, 0xa1, 0x47, 0xe1, 0x12, 0xa6, 0x43];
        let m = response([8; 12], &[(XOR_MAPPED_ADDRESS, &xor4)]);
        assert_eq!(mapped_address(&m, txid), None, "another transaction");
        let mut m = response(txid, &[(XOR_MAPPED_ADDRESS, &xor4)]);
        m[1] = 0x11; // an error response
        assert_eq!(mapped_address(&m, txid), None);
        let m = response(txid, &[(XOR_MAPPED_ADDRESS, &[0x00, 0x09, 0, 0])]);
        assert_eq!(mapped_address(&m, txid), None, "an unknown family");
        let req = binding_request(txid);
        assert_eq!(mapped_address(&req, txid), None, "a request");
        let m = response(txid, &[(XOR_MAPPED_ADDRESS, &xor4)]);
        for n in 0..m.len() {
            let _ = mapped_address(&m[..n], txid);
        }
    }

    #[test]
    fn every_prefix_of_a_message_is_safe() {
        let m = stun(&[(0x0024, &[0, 0, 0, 1]), (USERNAME, b"ourUfrag:theirs")]);
        for n in 0..m.len() {
            let _ = local_ufrag(&m[..n]);
        }
    }
}
