//! Story: the focus runs behind a NAT. Its socket has a private address; participants reach it
//! at a public one, which a NAT in front rewrites (`SimNet::behind_nat`). Configured with the
//! public address, the focus announces it and answers the checks that arrive on its private
//! socket: everyone connects and video flows. Left announcing its private address, nobody can
//! reach it: participants send their checks where nothing listens.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use weir_sfu::sim::{Publish, SimNet, FOCUS_ADDR};
use weir_sfu::{SfuConfig, SfuEvent};

/// The address participants reach the focus at (a documentation address: only in memory).
const PUBLIC_IP: [u8; 4] = [203, 0, 113, 5];

fn public() -> SocketAddr {
    SocketAddr::new(IpAddr::from(PUBLIC_IP), FOCUS_ADDR.port())
}

fn focus(advertise: IpAddr) -> SimNet {
    SimNet::behind_nat(
        SfuConfig {
            advertise_ips: vec![advertise],
            estimate_from_bps: None,
            ..SfuConfig::default()
        },
        public(),
    )
}

/// The candidates the focus announced to its participants, as `ip port` pairs.
fn announced(net: &SimNet) -> Vec<String> {
    net.log
        .iter()
        .filter_map(|e| match e {
            SfuEvent::PeerCreated { candidates, .. } => Some(candidates),
            _ => None,
        })
        .flatten()
        .map(|c| {
            let f: Vec<&str> = c.candidate.split_whitespace().collect();
            format!("{} {}", f[4], f[5])
        })
        .collect()
}

#[test]
fn advertising_the_public_address_behind_a_nat_connects_everyone_and_media_flows() {
    let mut net = focus(IpAddr::from(PUBLIC_IP));
    let alice = net.join(1, Publish::CAMERA);
    let bob = net.join(1, Publish::NOTHING);
    assert!(
        net.run_until(Duration::from_secs(10), |n| n.all_connected()),
        "both connect through the NAT within 10 s of virtual time"
    );
    assert_eq!(
        announced(&net),
        vec!["203.0.113.5 40000"; 2],
        "each participant is told the public address, on the socket's port"
    );
    net.run_for(Duration::from_millis(200));
    let mut sent = vec![net.send_video(alice, None, true, 1000)];
    for _ in 0..19 {
        net.run_for(Duration::from_millis(5));
        sent.push(net.send_video(alice, None, false, 1000));
    }
    net.run_for(Duration::from_millis(100));
    let got: Vec<_> = net.clients[bob]
        .received
        .iter()
        .map(|r| r.payload.clone())
        .collect();
    assert_eq!(got, sent, "Bob receives Alice's video through the NAT");
    assert_eq!(net.unreachable, 0, "nothing was sent past the NAT");
}

#[test]
fn advertising_the_private_address_behind_a_nat_connects_nobody() {
    let mut net = focus(FOCUS_ADDR.ip());
    net.join(1, Publish::CAMERA);
    net.join(1, Publish::NOTHING);
    assert!(
        !net.run_until(Duration::from_secs(10), |n| n
            .clients
            .iter()
            .any(|c| c.connected)),
        "nobody connects when the focus announces an address participants cannot reach"
    );
    assert!(
        net.unreachable > 0,
        "the participants' checks went to the private address"
    );
}
