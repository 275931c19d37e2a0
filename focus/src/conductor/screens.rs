//! Screens: the media plane cannot tell a screen from a camera (MSC3077's purpose is in the
//! stream metadata, which only the control plane reads), so each participant's screen streams
//! are passed down, and bandwidth allocation serves them first (docs/adaptation.md).

use weir_sfu::{Command, PeerId};

use super::{Conductor, LegSender, MediaPlane};

/// MSC3077's purpose of a shared screen.
const SCREENSHARE: &str = "m.screenshare";

impl<L: LegSender, M: MediaPlane> Conductor<L, M> {
    /// Tell the media plane which of `peer`'s streams are screens, as its metadata says now
    /// (a far focus's catalogue for a trunk: the far participants' screens). `joining`: the
    /// peer was just created, and the media plane knows no screens of it yet.
    pub(super) fn tell_screens(&mut self, peer: PeerId, joining: bool) {
        let Some(p) = self.participants.get(&peer) else {
            return;
        };
        let streams: Vec<String> = p
            .metadata
            .iter()
            .filter(|(_, m)| m.purpose == SCREENSHARE)
            .map(|(id, _)| id.as_str().to_string())
            .collect();
        if joining && streams.is_empty() {
            return;
        }
        self.media_command(peer, Command::Screens { peer, streams });
    }
}

#[cfg(test)]
mod tests {
    use weir_signalling::{LegEvent, SdpStreamMetadata, StreamMetadata};

    use super::super::tests::{join, leg, setup};
    use super::*;

    #[test]
    fn a_shared_screen_is_named_to_the_media_plane_at_join_and_when_it_starts() {
        let (mut c, rec) = setup();
        // Bob joins already sharing his screen: named right after his peer is created.
        let mut md = SdpStreamMetadata::new();
        md.insert("bob-camera".into(), StreamMetadata::new("m.usermedia"));
        md.insert("bob-screen".into(), StreamMetadata::new(SCREENSHARE));
        c.on_leg_event(LegEvent::Invite {
            leg: leg("@bob:hs", "B", "c2"),
            sdp: "offer".into(),
            metadata: md,
            lifetime_ms: None,
        });
        let sent = rec.take_media();
        assert!(
            matches!(&sent[..], [Command::CreatePeer { peer: a, .. }, Command::Screens { peer: b, streams }]
                if a == b && streams == &["bob-screen"]),
            "{sent:?}"
        );
        // Alice joins with her camera only: nothing to name (join() expects CreatePeer last).
        let alice = leg("@alice:hs", "A", "c1");
        let peer = join(&mut c, &rec, &alice, "alice-camera");
        rec.take_media();
        // Then she starts sharing.
        let mut md = SdpStreamMetadata::new();
        md.insert("alice-camera".into(), StreamMetadata::new("m.usermedia"));
        md.insert("alice-screen".into(), StreamMetadata::new(SCREENSHARE));
        c.on_leg_event(LegEvent::MetadataChanged {
            leg: alice,
            metadata: md,
        });
        let sent = rec.take_media();
        assert!(
            matches!(&sent[..], [Command::Screens { peer: p, streams }] if *p == peer && streams == &["alice-screen"]),
            "{sent:?}"
        );
    }
}
