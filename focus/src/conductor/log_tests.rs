//! Every line logged about a participant carries its conference and who it is (issue 10:
//! structured logs an operator can filter on), whether the event came from signalling or from
//! the media plane.

use std::io::Write;
use std::sync::{Arc, Mutex};

use weir_sfu::{CloseReason, SfuEvent};
use weir_signalling::LegEvent;

use super::tests::{join, leg, setup};

/// Log output, captured.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Log lines written while `f` runs on this thread.
///
/// tracing caches, per log statement, whether anyone listens, process-wide, the first time the
/// statement runs anywhere. A sibling test running conductor code with no subscriber would
/// cache "nobody" and silence it here too. So a silent global subscriber is installed first
/// (nothing then computes "nobody"), and the cache is rebuilt once this thread's capture is in
/// place.
fn capture(f: impl FnOnce()) -> Vec<serde_json::Value> {
    static GLOBAL: std::sync::Once = std::sync::Once::new();
    GLOBAL.call_once(|| {
        let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry());
    });
    let out = Captured::default();
    let writer = out.clone();
    let sub = tracing_subscriber::fmt()
        .json()
        .with_writer(move || writer.clone())
        .with_max_level(tracing::Level::INFO)
        .finish();
    tracing::subscriber::with_default(sub, || {
        tracing::callsite::rebuild_interest_cache();
        f()
    });
    let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

#[test]
fn lines_about_a_participant_carry_its_conference_and_identity() {
    let (mut c, rec) = setup();
    let alice = leg("@alice:hs", "ALICEDEV", "call-a");
    let lines = capture(|| {
        let peer = join(&mut c, &rec, &alice, "sa");
        // From signalling: she hangs up her old call by calling again; from the media plane:
        // her connection is closed.
        c.on_sfu_event(SfuEvent::PeerClosed {
            peer,
            reason: CloseReason::Silent,
        });
        c.on_leg_event(LegEvent::Hangup {
            leg: alice.clone(),
            reason: "user_hangup".into(),
        });
    });
    let about_alice: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| {
            let m = l["fields"]["message"].as_str().unwrap_or("");
            m.contains("invite accepted") || m.contains("media plane closed the leg")
        })
        .collect();
    assert_eq!(about_alice.len(), 2, "{lines:#?}");
    for l in about_alice {
        let span = &l["span"];
        assert_eq!(span["conf"], "conf1", "{l}");
        assert_eq!(span["user"], "@alice:hs", "{l}");
        assert_eq!(span["device"], "ALICEDEV", "{l}");
        assert_eq!(span["call"], "call-a", "{l}");
        assert_eq!(span["room"], "!room:hs", "{l}");
    }
}
