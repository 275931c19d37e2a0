//! The SDP adjustments weir makes to what its engine writes and reads: participants' offers
//! read as publishing, codec order and codec removal per m-line, transport lines said once,
//! and `rtx-time` on forwarded video.

use std::collections::HashSet;

use str0m::change::{SdpAnswer, SdpOffer};
use str0m::format::Codec;
use str0m::Rtc;

/// Largest SDP weir accepts. Real offers with many m-lines are 10-40 KiB; this leaves headroom
/// while bounding the parser's work on hostile input.
pub const MAX_SDP_BYTES: usize = 128 * 1024;

/// weir receives on the participant's own m-lines and sends every forwarded track on m-lines
/// it creates itself (so each forwarded stream has its own msid and metadata entry). A browser
/// offers its m-lines `sendrecv`; read as `sendonly` so the engine answers `recvonly` and the
/// browser never sees a stream from us it has no metadata for. Sections whose mid weir created
/// (`own_mids`) are left alone: a browser may reuse such a transceiver to send.
pub fn offer_as_publisher(sdp: &str, own_mids: &HashSet<String>) -> String {
    let mut out = String::with_capacity(sdp.len());
    for (i, section) in split_sections(sdp).into_iter().enumerate() {
        let is_media = i > 0 && (section.starts_with("m=audio") || section.starts_with("m=video"));
        let mid = section
            .lines()
            .find_map(|l| l.strip_prefix("a=mid:"))
            .map(|m| m.trim().to_string());
        let ours = mid.as_ref().is_some_and(|m| own_mids.contains(m));
        if is_media && !ours {
            for line in section.split_inclusive('\n') {
                if line.trim_end() == "a=sendrecv" {
                    out.push_str(&line.replacen("a=sendrecv", "a=sendonly", 1));
                } else if line.trim_end() == "a=recvonly" {
                    out.push_str(&line.replacen("a=recvonly", "a=inactive", 1));
                } else {
                    out.push_str(line);
                }
            }
        } else {
            out.push_str(section);
        }
    }
    out
}

/// Parse a participant's offer after [`offer_as_publisher`], refusing oversized input.
pub fn parse_offer(sdp: &str, own_mids: &HashSet<String>) -> Result<SdpOffer, String> {
    if sdp.len() > MAX_SDP_BYTES {
        return Err(format!(
            "offer of {} bytes exceeds {MAX_SDP_BYTES}",
            sdp.len()
        ));
    }
    let sdp = offer_as_publisher(sdp, own_mids);
    SdpOffer::from_sdp_string(&sdp).map_err(|e| format!("unparseable offer: {e}"))
}

/// Parse a participant's answer, refusing oversized input.
pub fn parse_answer(sdp: &str) -> Result<SdpAnswer, String> {
    if sdp.len() > MAX_SDP_BYTES {
        return Err(format!(
            "answer of {} bytes exceeds {MAX_SDP_BYTES}",
            sdp.len()
        ));
    }
    SdpAnswer::from_sdp_string(sdp).map_err(|e| format!("unparseable answer: {e}"))
}

/// Each m-line's `a=mid:` value (if it has one), in order.
pub fn mids(sdp: &str) -> Vec<Option<String>> {
    split_sections(sdp)
        .into_iter()
        .skip(1)
        .filter(|s| s.starts_with("m="))
        .map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("a=mid:"))
                .map(|m| m.trim().to_string())
        })
        .collect()
}

/// Whether `answer` answers `offer`: the same m-lines, and the same mid on every m-line the
/// answer names one for (an answer may leave a rejected m-line without its mid). An answer to
/// an earlier offer differs in its m-lines.
pub fn answers(offer: &[Option<String>], answer: &[Option<String>]) -> bool {
    offer.len() == answer.len() && offer.iter().zip(answer).all(|(o, a)| a.is_none() || a == o)
}

/// `sdp` without the payload types `pts` in the media sections whose mid `drop_in` accepts:
/// their entries in the `m=` line and their `rtpmap`, `fmtp` and `rtcp-fb` lines.
///
/// Every video m-line weir offers lists every codec of its engine, and a 25-person meeting's
/// offer has 24 of them in a to-device event Synapse caps at 64 KiB. AV1 with its RTX costs
/// about 250 bytes per m-line, so it is offered only where the forwarded track is AV1.
pub fn without_codec(sdp: &str, pts: &[String], drop_in: impl Fn(&str) -> bool) -> String {
    if pts.is_empty() {
        return sdp.to_string();
    }
    let mut out = String::with_capacity(sdp.len());
    for (i, section) in split_sections(sdp).into_iter().enumerate() {
        let mid = section_mid(section);
        if i == 0 || !mid.is_some_and(&drop_in) {
            out.push_str(section);
            continue;
        }
        for (n, line) in section.split_inclusive('\n').enumerate() {
            if n == 0 {
                let ending = &line[line.trim_end().len()..];
                let mut tokens = line.trim_end().split(' ');
                let head: Vec<&str> = tokens.by_ref().take(3).collect();
                let kept: Vec<&str> = tokens.filter(|t| !pts.iter().any(|p| p == t)).collect();
                out.push_str(&head.join(" "));
                for t in kept {
                    out.push(' ');
                    out.push_str(t);
                }
                out.push_str(ending);
                continue;
            }
            let names_dropped = ["a=rtpmap:", "a=fmtp:", "a=rtcp-fb:"].iter().any(|a| {
                line.strip_prefix(a)
                    .and_then(|rest| rest.split([' ', '\r', '\n']).next())
                    .is_some_and(|pt| pts.iter().any(|p| p == pt))
            });
            if !names_dropped {
                out.push_str(line);
            }
        }
    }
    out
}

/// The payload types `rtc` has for `codec`, its RTX included, as SDP writes them.
pub fn payload_types(rtc: &Rtc, codec: Codec) -> Vec<String> {
    rtc.codec_config()
        .params()
        .iter()
        .filter(|p| p.spec().codec == codec)
        .flat_map(|p| [Some(p.pt()), p.resend()])
        .flatten()
        .map(|pt| (*pt).to_string())
        .collect()
}

/// One m-line of a description: its payload types in order, and the codec of the first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaFormats {
    pub mid: String,
    pub formats: Vec<String>,
    /// The encoding name (`rtpmap`) of the first payload type, upper case: for a participant,
    /// the codec it sends on that m-line.
    pub first_codec: Option<String>,
}

/// The payload types of each m-line of a description, by mid.
pub type FormatOrder = Vec<MediaFormats>;

/// Each m-line's payload types, by mid, as `sdp` orders them.
pub fn format_order(sdp: &str) -> FormatOrder {
    split_sections(sdp)
        .into_iter()
        .skip(1)
        .filter_map(|section| {
            let mid = section.lines().find_map(|l| l.strip_prefix("a=mid:"))?;
            let formats: Vec<String> = m_line_formats(section)?
                .into_iter()
                .map(str::to_string)
                .collect();
            let first_codec = formats.first().and_then(|pt| {
                section.lines().find_map(|l| {
                    let rest = l.strip_prefix("a=rtpmap:")?.strip_prefix(pt.as_str())?;
                    let name = rest.strip_prefix(' ')?.split('/').next()?;
                    Some(name.trim().to_ascii_uppercase())
                })
            });
            Some(MediaFormats {
                mid: mid.trim().to_string(),
                formats,
                first_codec,
            })
        })
        .collect()
}

/// `sdp` with each m-line's payload types in the order the participant gave them
/// (`order`, from its last offer or answer).
///
/// str0m lists codecs in its own order (VP8 first), and a browser sends the first codec of
/// the other side's list: a publisher that put VP9 or AV1 first (`setCodecPreferences`, to
/// send scalable video) would still send VP8. The publisher knows best what it wants to
/// encode, so its order stands, in weir's answers and in weir's later offers (RFC 3264 lets
/// the answerer keep the offerer's preference). Payload types the participant did not list
/// keep their place after the others; m-lines it has not described are left alone.
pub fn in_format_order(sdp: &str, order: &FormatOrder) -> String {
    let mut out = String::with_capacity(sdp.len());
    for (i, section) in split_sections(sdp).into_iter().enumerate() {
        let mid = section_mid(section);
        let wanted = mid.and_then(|m| order.iter().find(|o| o.mid == m));
        let (
            true,
            Some(MediaFormats {
                formats: wanted, ..
            }),
            Some(formats),
        ) = (i > 0, wanted, m_line_formats(section))
        else {
            out.push_str(section);
            continue;
        };
        let mut sorted = formats.clone();
        sorted.sort_by_key(|f| wanted.iter().position(|o| o == f).unwrap_or(usize::MAX));
        if sorted == formats {
            out.push_str(section);
            continue;
        }
        let (m_line, rest) = section.split_at(section.find('\n').map_or(section.len(), |n| n + 1));
        let ending = &m_line[m_line.trim_end().len()..];
        let head: Vec<&str> = m_line.trim_end().split(' ').take(3).collect();
        out.push_str(&head.join(" "));
        for f in sorted {
            out.push(' ');
            out.push_str(f);
        }
        out.push_str(ending);
        out.push_str(rest);
    }
    out
}

/// The payload types (formats) of a media section's `m=` line.
fn m_line_formats(section: &str) -> Option<Vec<&str>> {
    let line = section.lines().next()?.strip_prefix("m=")?;
    let tokens: Vec<&str> = line.split(' ').collect();
    (tokens.len() > 3).then(|| tokens[3..].to_vec())
}

/// Split SDP text into the session part and one part per `m=` section, keeping line endings.
/// Attributes that describe the one bundled transport (ICE credentials and options, the DTLS
/// fingerprint) rather than a media section.
const TRANSPORT_ATTRIBUTES: [&str; 4] = [
    "a=ice-ufrag:",
    "a=ice-pwd:",
    "a=ice-options:",
    "a=fingerprint:",
];

/// `sdp` with `rtx-time` (RFC 4588) on the retransmission formats (`a=fmtp:<pt> apt=<pt>`) of
/// the media sections whose mid `rtx_time_of` gives a time for, in milliseconds.
///
/// Chromium, receiving, waits for a decodable frame three times as long as the `rtx-time` its
/// own answer carries, and 3 s without one, before it asks for a keyframe itself; it copies
/// the parameter from the offer it answers, not from an answer to its offer. A picture broken
/// by losses that retransmission did not repair stands that long (docs/adaptation.md).
pub fn with_rtx_time(sdp: &str, rtx_time_of: impl Fn(&str) -> Option<u32>) -> String {
    let mut out = String::with_capacity(sdp.len() + 256);
    for (i, section) in split_sections(sdp).into_iter().enumerate() {
        let ms = (i > 0)
            .then(|| section_mid(section))
            .flatten()
            .and_then(&rtx_time_of);
        let Some(ms) = ms else {
            out.push_str(section);
            continue;
        };
        for line in section.split_inclusive('\n') {
            let text = line.trim_end();
            let retransmission = text
                .strip_prefix("a=fmtp:")
                .and_then(|rest| rest.split_once(' '))
                .is_some_and(|(_, params)| {
                    let names = params.split(';').map(|p| p.split('=').next().unwrap_or(""));
                    let has = |n: &str| names.clone().any(|x| x.trim() == n);
                    has("apt") && !has("rtx-time")
                });
            if retransmission {
                out.push_str(text);
                out.push_str(&format!(";rtx-time={ms}"));
                out.push_str(&line[text.len()..]);
            } else {
                out.push_str(line);
            }
        }
    }
    out
}

/// An offer with the transport attributes said once, at session level, instead of in every
/// m-line. All of weir's m-lines share one bundled transport, so the engine repeats the same
/// four lines (about 200 bytes) in each; with 24 forwarded tracks that alone was 10 KiB of a
/// to-device event Synapse caps at 64 KiB. Session-level ICE credentials and fingerprints are
/// standard SDP (RFC 8839, RFC 8122), and browsers and str0m read them as the default of
/// every m-line. If the m-lines' transport lines differ (never, for one engine's offer), the
/// offer is returned unchanged.
pub fn compact_offer(sdp: &str) -> String {
    let sections = split_sections(sdp);
    let transport = |section: &str| -> Vec<String> {
        section
            .split_inclusive('\n')
            .filter(|l| TRANSPORT_ATTRIBUTES.iter().any(|a| l.starts_with(a)))
            .map(str::to_string)
            .collect()
    };
    let Some(first) = sections.get(1) else {
        return sdp.to_string();
    };
    let shared = transport(first);
    if shared.is_empty() || sections[1..].iter().any(|s| transport(s) != shared) {
        return sdp.to_string();
    }
    let mut out = String::with_capacity(sdp.len());
    out.push_str(sections[0]);
    for line in &shared {
        out.push_str(line);
    }
    for section in &sections[1..] {
        for line in section.split_inclusive('\n') {
            if !TRANSPORT_ATTRIBUTES.iter().any(|a| line.starts_with(a)) {
                out.push_str(line);
            }
        }
    }
    out
}

/// A media section's `a=mid:` value.
fn section_mid(section: &str) -> Option<&str> {
    section
        .lines()
        .find_map(|l| l.strip_prefix("a=mid:"))
        .map(str::trim)
}

fn split_sections(sdp: &str) -> Vec<&str> {
    let mut starts = vec![0];
    let mut pos = 0;
    for line in sdp.split_inclusive('\n') {
        if line.starts_with("m=") && pos != 0 {
            starts.push(pos);
        }
        pos += line.len();
    }
    starts.push(sdp.len());
    starts.windows(2).map(|w| &sdp[w[0]..w[1]]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offers_transport_lines_move_to_session_level_once() {
        let sdp = "v=0\r\ns=-\r\n\
m=audio 9 X 111\r\na=ice-ufrag:u\r\na=ice-pwd:p\r\na=fingerprint:sha-256 AA\r\na=mid:0\r\n\
m=video 9 X 96\r\na=ice-ufrag:u\r\na=ice-pwd:p\r\na=fingerprint:sha-256 AA\r\na=mid:1\r\n";
        let compact = compact_offer(sdp);
        assert_eq!(
            compact,
            "v=0\r\ns=-\r\na=ice-ufrag:u\r\na=ice-pwd:p\r\na=fingerprint:sha-256 AA\r\n\
m=audio 9 X 111\r\na=mid:0\r\nm=video 9 X 96\r\na=mid:1\r\n"
        );
        // Differing transports (not one bundle) are left as they are.
        let mixed = sdp.replacen(
            "a=ice-ufrag:u\r\na=ice-pwd:p\r\na=fingerprint:sha-256 AA\r\na=mid:1",
            "a=ice-ufrag:v\r\na=mid:1",
            1,
        );
        assert_eq!(compact_offer(&mixed), mixed);
    }

    const OFFER: &str =
        "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0 1 2\r\n\
m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=sendrecv\r\na=msid:s a\r\n\
m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=sendrecv\r\na=mid:1\r\n\
m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:2\r\na=sendrecv\r\n";

    #[test]
    fn participant_sections_become_send_only_and_ours_are_untouched() {
        let own: HashSet<String> = ["2".to_string()].into();
        let out = offer_as_publisher(OFFER, &own);
        let sections = split_sections(&out);
        assert_eq!(sections.len(), 4);
        assert!(sections[0].contains("a=group:BUNDLE 0 1 2"));
        assert!(sections[1].contains("a=sendonly\r\n") && !sections[1].contains("sendrecv"));
        // Direction before the mid line is still found.
        assert!(sections[2].contains("a=sendonly\r\n"));
        assert!(sections[3].contains("a=sendrecv\r\n"));
        assert_eq!(
            out.len(),
            OFFER.len() + 2 * ("sendonly".len() - "sendrecv".len())
        );
    }

    #[test]
    fn a_participant_section_it_only_receives_on_is_inactive_for_us() {
        let sdp = "v=0\r\nm=audio 9 RTP/SAVPF 111\r\na=mid:0\r\na=recvonly\r\n";
        assert!(offer_as_publisher(sdp, &HashSet::new()).contains("a=inactive"));
    }

    #[test]
    fn an_answer_matches_only_the_offer_it_answers() {
        let some = |v: &[&str]| v.iter().map(|m| Some(m.to_string())).collect::<Vec<_>>();
        assert_eq!(mids(OFFER), some(&["0", "1", "2"]));
        assert!(mids("v=0\r\n").is_empty());
        let offer = some(&["0", "1", "2"]);
        assert!(answers(&offer, &some(&["0", "1", "2"])));
        // A rejected m-line without its mid still answers.
        assert!(answers(&offer, &[Some("0".into()), None, Some("2".into())]));
        // An answer to an earlier offer: fewer m-lines, or another track in a recycled slot.
        assert!(!answers(&offer, &some(&["0", "1"])));
        assert!(!answers(&offer, &some(&["0", "1", "7"])));
    }

    #[test]
    fn a_codec_is_dropped_only_from_the_m_lines_named() {
        let sdp = "v=0\r\nm=video 9 X 96 97 45 46\r\na=mid:0\r\na=rtpmap:96 VP8/90000\r\n\
a=rtpmap:45 AV1/90000\r\na=fmtp:46 apt=45\r\na=rtcp-fb:45 nack\r\na=rtcp-fb:96 nack\r\n\
m=video 9 X 96 97 45 46\r\na=mid:1\r\na=rtpmap:45 AV1/90000\r\n";
        let pts = vec!["45".to_string(), "46".to_string()];
        let out = without_codec(sdp, &pts, |mid| mid == "0");
        assert_eq!(
            out,
            "v=0\r\nm=video 9 X 96 97\r\na=mid:0\r\na=rtpmap:96 VP8/90000\r\n\
a=rtcp-fb:96 nack\r\nm=video 9 X 96 97 45 46\r\na=mid:1\r\na=rtpmap:45 AV1/90000\r\n"
        );
        // A payload type that only starts with a dropped one stays.
        let sdp = "v=0\r\nm=video 9 X 45 450\r\na=mid:0\r\na=rtpmap:450 X/1\r\n";
        assert_eq!(
            without_codec(sdp, &pts, |_| true),
            "v=0\r\nm=video 9 X 450\r\na=mid:0\r\na=rtpmap:450 X/1\r\n"
        );
        assert_eq!(without_codec(sdp, &[], |_| true), sdp);
    }

    #[test]
    fn codecs_are_listed_in_the_participants_order() {
        let offer =
            "v=0\r\nm=audio 9 X 111\r\na=mid:0\r\nm=video 9 X 96 97 98 99 45\r\na=mid:1\r\n\
a=rtpmap:98 VP9/90000\r\na=rtpmap:96 vp8/90000\r\n";
        let ours = "v=0\r\nm=audio 9 X 111\r\na=mid:0\r\nm=video 9 X 96 97 98 99\r\na=mid:1\r\n\
m=video 9 X 96 97 98 99\r\na=mid:2\r\n";
        // VP9 (98) and AV1 (45) offered after VP8 (96) stay there.
        assert_eq!(in_format_order(ours, &format_order(offer)), ours);
        assert_eq!(format_order(offer)[1].first_codec.as_deref(), Some("VP8"));
        assert_eq!(
            format_order(offer)[0].first_codec,
            None,
            "no rtpmap for 111"
        );
        // A publisher preferring VP9 is answered, and offered, VP9 first on its m-line; the
        // m-line it never described (mid 2) is left alone.
        let vp9_first = format_order(&offer.replace("96 97 98 99 45", "98 99 96 97 45"));
        assert_eq!(vp9_first[1].mid, "1");
        assert_eq!(vp9_first[1].formats, ["98", "99", "96", "97", "45"]);
        assert_eq!(vp9_first[1].first_codec.as_deref(), Some("VP9"));
        assert_eq!(
            in_format_order(ours, &vp9_first),
            "v=0\r\nm=audio 9 X 111\r\na=mid:0\r\nm=video 9 X 98 99 96 97\r\na=mid:1\r\n\
m=video 9 X 96 97 98 99\r\na=mid:2\r\n"
        );
        // Unknown formats go last; text that is not SDP passes through.
        let order = vec![MediaFormats {
            mid: "5".into(),
            formats: vec!["98".into()],
            first_codec: None,
        }];
        assert_eq!(
            in_format_order("v=0\r\nm=video 9 X 7 98\r\na=mid:5\r\n", &order),
            "v=0\r\nm=video 9 X 98 7\r\na=mid:5\r\n"
        );
        assert_eq!(in_format_order("garbage", &order), "garbage");
    }

    #[test]
    fn rtx_time_goes_on_the_retransmission_formats_of_the_m_lines_named() {
        let sdp = "v=0\r\na=fmtp:1 apt=2\r\nm=video 9 X 96 97\r\na=mid:0\r\n\
a=fmtp:96 max-fs=12288\r\na=fmtp:97 apt=96\r\nm=video 9 X 96 97\r\na=mid:1\r\n\
a=fmtp:97 apt=96\r\nm=audio 9 X 111\r\na=mid:2\r\na=fmtp:111 minptime=10\r\n";
        let out = with_rtx_time(sdp, |mid| (mid != "1").then_some(300));
        assert_eq!(
            out,
            "v=0\r\na=fmtp:1 apt=2\r\nm=video 9 X 96 97\r\na=mid:0\r\n\
a=fmtp:96 max-fs=12288\r\na=fmtp:97 apt=96;rtx-time=300\r\nm=video 9 X 96 97\r\na=mid:1\r\n\
a=fmtp:97 apt=96\r\nm=audio 9 X 111\r\na=mid:2\r\na=fmtp:111 minptime=10\r\n",
            "only RTX lines of the m-lines named, not the session level"
        );
        // Once only; an offer that names it already keeps its own.
        assert_eq!(
            with_rtx_time(&out, |_| Some(500)),
            out.replace(
                "a=mid:1\r\na=fmtp:97 apt=96\r\n",
                "a=mid:1\r\na=fmtp:97 apt=96;rtx-time=500\r\n"
            )
        );
        assert_eq!(with_rtx_time("garbage", |_| Some(1)), "garbage");
    }

    #[test]
    fn text_without_sections_passes_through() {
        assert_eq!(offer_as_publisher("garbage", &HashSet::new()), "garbage");
        assert_eq!(offer_as_publisher("", &HashSet::new()), "");
    }
}
