//! The dependency descriptor: the RTP header extension with which Chromium describes the
//! layers of VP9 and AV1 (and of any codec, where negotiated), in the AV1 RTP specification's
//! appendix A. weir reads it to choose spatial and temporal layers of a scalable stream
//! (`forward::svc`) without looking into the payload, which frame encryption leaves opaque.
//!
//! Each packet carries the frame's number and a template id; a keyframe's packets also carry
//! the template structure, which says for each template its spatial and temporal layer and, for
//! each decode target (a combination of layers a receiver may decode), whether the frame is
//! needed for it. The structure is kept per stream and resolves the template id of every later
//! packet ([`parse`]). Parsing allocates only when a structure is attached (a keyframe).

use thiserror::Error;

/// The extension's URI in SDP.
pub const URI: &str =
    "https://aomediacodec.github.io/av1-rtp-spec/#dependency-descriptor-rtp-header-extension";

/// Decode targets a structure may declare (`dt_cnt_minus_one` has 5 bits).
pub const MAX_DECODE_TARGETS: usize = 32;
/// Templates a structure may declare: template ids have 6 bits.
const MAX_TEMPLATES: usize = 64;
/// Spatial layers weir accepts. The syntax allows any number; real encoders use up to 3, and
/// the render resolutions are kept per spatial layer.
pub const MAX_SPATIAL_LAYERS: usize = 4;
/// Temporal layers weir accepts (VP9 and AV1 signal up to 8; encoders use up to 3).
const MAX_TEMPORAL_LAYERS: u8 = 8;
/// Frame dependencies weir accepts per frame. The syntax has no bound; a frame of a real
/// encoder refers to at most a few (libwebrtc's structures: up to 3). Bounded so that a
/// hostile descriptor cannot make the parser loop over a long list.
const MAX_FDIFFS: usize = 16;

/// Why a descriptor was refused.
#[derive(Debug, Clone, Copy, Error, PartialEq, Eq)]
pub enum DescriptorError {
    #[error("descriptor of {0} bytes is shorter than its 3 mandatory bytes")]
    Short(usize),
    #[error("descriptor ends inside a field")]
    Truncated,
    #[error("no template structure received for this stream yet")]
    NoStructure,
    #[error("template id {0} is not in the structure in force")]
    UnknownTemplate(u8),
    #[error("structure declares more than {MAX_TEMPLATES} templates")]
    TooManyTemplates,
    #[error("structure declares more than {MAX_SPATIAL_LAYERS} spatial layers")]
    TooManySpatialLayers,
    #[error("structure declares more than {MAX_TEMPORAL_LAYERS} temporal layers")]
    TooManyTemporalLayers,
    #[error("frame declares more than {MAX_FDIFFS} dependencies")]
    TooManyDependencies,
}

/// How much a frame matters to one decode target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Indication {
    /// Not part of the decode target.
    NotPresent,
    /// Part of it, and no later frame of it refers to this one.
    Discardable,
    /// Part of it, and a point where a receiver whose chain for it is intact may start
    /// decoding it: later frames of it refer only to this frame or frames after it.
    Switch,
    /// Part of it, needed by later frames.
    Required,
}

impl Indication {
    fn from_bits(v: u32) -> Self {
        match v & 3 {
            0 => Indication::NotPresent,
            1 => Indication::Discardable,
            2 => Indication::Switch,
            _ => Indication::Required,
        }
    }
}

/// One indication per decode target, two bits each.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Indications(u64);

impl Indications {
    pub fn get(self, target: usize) -> Indication {
        if target >= MAX_DECODE_TARGETS {
            return Indication::NotPresent;
        }
        Indication::from_bits((self.0 >> (2 * target)) as u32)
    }

    fn set(&mut self, target: usize, bits: u32) {
        self.0 |= u64::from(bits & 3) << (2 * target);
    }
}

/// One frame template of a structure.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Template {
    spatial: u8,
    temporal: u8,
    indications: Indications,
    dependencies: u8,
    chain_fdiffs: [u8; MAX_DECODE_TARGETS],
}

/// A stream's template structure, sent with its keyframes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Structure {
    template_id_offset: u8,
    decode_targets: u8,
    chains: u8,
    /// The chain protecting each decode target (meaningful when `chains > 0`).
    protected_by: [u8; MAX_DECODE_TARGETS],
    templates: Vec<Template>,
    /// Per spatial layer, the picture's width and height, if the encoder says.
    resolutions: Option<[(u16, u16); MAX_SPATIAL_LAYERS]>,
    spatial_layers: u8,
}

impl Structure {
    /// Decode targets declared.
    pub fn decode_targets(&self) -> usize {
        usize::from(self.decode_targets)
    }

    /// Spatial layers declared (1 for a stream with temporal layers only).
    pub fn spatial_layers(&self) -> u8 {
        self.spatial_layers
    }

    /// The highest spatial and temporal layer a decode target includes: the highest of the
    /// templates that are part of it. `None` for a target no template is part of.
    pub fn target_layers(&self, target: usize) -> Option<(u8, u8)> {
        self.templates
            .iter()
            .filter(|t| t.indications.get(target) != Indication::NotPresent)
            .map(|t| (t.spatial, t.temporal))
            .reduce(|a, b| (a.0.max(b.0), a.1.max(b.1)))
    }

    /// Chains declared.
    pub fn chains(&self) -> usize {
        usize::from(self.chains)
    }

    /// The chain protecting `target`, if the structure has chains.
    pub fn chain_of(&self, target: usize) -> Option<usize> {
        (self.chains > 0 && target < self.decode_targets())
            .then(|| usize::from(self.protected_by[target]))
    }

    /// The picture size of spatial layer `spatial`, if the encoder said.
    pub fn resolution(&self, spatial: u8) -> Option<(u16, u16)> {
        let r = self.resolutions?;
        r.get(usize::from(spatial))
            .copied()
            .filter(|_| spatial < self.spatial_layers)
    }
}

/// One packet's descriptor, resolved against the structure in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameDescriptor {
    pub start_of_frame: bool,
    pub end_of_frame: bool,
    /// Numbers frames in decode order, wrapping at 2^16.
    pub frame_number: u16,
    pub spatial: u8,
    pub temporal: u8,
    /// The frame's indication for each decode target.
    pub indications: Indications,
    /// How many earlier frames this frame refers to (none: an intra frame).
    pub dependencies: u8,
    /// Per chain, how many frames back the previous frame of the chain is (0: this frame
    /// starts the chain).
    pub chain_fdiffs: [u8; MAX_DECODE_TARGETS],
    /// Which decode targets the encoder still produces, if the packet says.
    pub active_decode_targets: Option<u32>,
}

impl FrameDescriptor {
    /// The frame's offset to the previous frame of `chain` (0: it starts the chain, or the
    /// structure has no such chain).
    pub fn chain_fdiff(&self, chain: usize) -> u8 {
        self.chain_fdiffs.get(chain).copied().unwrap_or(0)
    }
}

/// Parse one packet's descriptor. `known` is the structure in force for the stream; a
/// structure attached to this packet replaces it, is used for this packet, and is returned.
pub fn parse(
    bytes: &[u8],
    known: Option<&Structure>,
) -> Result<(FrameDescriptor, Option<Structure>), DescriptorError> {
    if bytes.len() < 3 {
        return Err(DescriptorError::Short(bytes.len()));
    }
    let mut r = Bits::new(bytes);
    let start_of_frame = r.bit()?;
    let end_of_frame = r.bit()?;
    let template_id = r.bits(6)? as u8;
    let frame_number = r.bits(16)? as u16;
    let (mut custom_dtis, mut custom_fdiffs, mut custom_chains) = (false, false, false);
    let mut attached = None;
    let mut active_decode_targets = None;
    if bytes.len() > 3 {
        let structure_present = r.bit()?;
        let active_present = r.bit()?;
        custom_dtis = r.bit()?;
        custom_fdiffs = r.bit()?;
        custom_chains = r.bit()?;
        if structure_present {
            let s = parse_structure(&mut r)?;
            active_decode_targets = Some(mask(s.decode_targets()));
            attached = Some(s);
        }
        if active_present {
            let s = attached
                .as_ref()
                .or(known)
                .ok_or(DescriptorError::NoStructure)?;
            active_decode_targets = Some(r.bits(u32::from(s.decode_targets))?);
        }
    }
    let structure = attached
        .as_ref()
        .or(known)
        .ok_or(DescriptorError::NoStructure)?;
    let index = (usize::from(template_id) + MAX_TEMPLATES
        - usize::from(structure.template_id_offset))
        % MAX_TEMPLATES;
    let template = structure
        .templates
        .get(index)
        .ok_or(DescriptorError::UnknownTemplate(template_id))?;
    let mut frame = FrameDescriptor {
        start_of_frame,
        end_of_frame,
        frame_number,
        spatial: template.spatial,
        temporal: template.temporal,
        indications: template.indications,
        dependencies: template.dependencies,
        chain_fdiffs: template.chain_fdiffs,
        active_decode_targets,
    };
    if custom_dtis {
        let mut ind = Indications::default();
        for dt in 0..structure.decode_targets() {
            ind.set(dt, r.bits(2)?);
        }
        frame.indications = ind;
    }
    if custom_fdiffs {
        let mut count = 0;
        loop {
            let size = r.bits(2)?;
            if size == 0 {
                break;
            }
            r.bits(4 * size)?;
            count += 1;
            if count > MAX_FDIFFS {
                return Err(DescriptorError::TooManyDependencies);
            }
        }
        frame.dependencies = count as u8;
    }
    if custom_chains {
        for chain in 0..usize::from(structure.chains) {
            frame.chain_fdiffs[chain] = r.bits(8)? as u8;
        }
    }
    // What follows is zero padding to the extension's length.
    Ok((frame, attached))
}

fn mask(targets: usize) -> u32 {
    if targets >= 32 {
        u32::MAX
    } else {
        (1u32 << targets) - 1
    }
}

fn parse_structure(r: &mut Bits) -> Result<Structure, DescriptorError> {
    let template_id_offset = r.bits(6)? as u8;
    let decode_targets = r.bits(5)? as u8 + 1;
    let dts = usize::from(decode_targets);
    // Template layers: each template's layers follow from the previous one's.
    let mut templates: Vec<Template> = Vec::new();
    let (mut spatial, mut temporal) = (0u8, 0u8);
    loop {
        if templates.len() == MAX_TEMPLATES {
            return Err(DescriptorError::TooManyTemplates);
        }
        templates.push(Template {
            spatial,
            temporal,
            indications: Indications::default(),
            dependencies: 0,
            chain_fdiffs: [0; MAX_DECODE_TARGETS],
        });
        match r.bits(2)? {
            0 => {}
            1 => {
                temporal += 1;
                if temporal >= MAX_TEMPORAL_LAYERS {
                    return Err(DescriptorError::TooManyTemporalLayers);
                }
            }
            2 => {
                temporal = 0;
                spatial += 1;
                if usize::from(spatial) >= MAX_SPATIAL_LAYERS {
                    return Err(DescriptorError::TooManySpatialLayers);
                }
            }
            _ => break,
        }
    }
    for t in &mut templates {
        for dt in 0..dts {
            t.indications.set(dt, r.bits(2)?);
        }
    }
    for t in &mut templates {
        let mut count = 0;
        while r.bit()? {
            r.bits(4)?;
            count += 1;
            if count > MAX_FDIFFS {
                return Err(DescriptorError::TooManyDependencies);
            }
        }
        t.dependencies = count as u8;
    }
    let chains = r.ns(u32::from(decode_targets) + 1)? as u8;
    let mut protected_by = [0u8; MAX_DECODE_TARGETS];
    if chains > 0 {
        for p in protected_by.iter_mut().take(dts) {
            *p = r.ns(u32::from(chains))? as u8;
        }
        for t in &mut templates {
            for c in t.chain_fdiffs.iter_mut().take(usize::from(chains)) {
                *c = r.bits(4)? as u8;
            }
        }
    }
    let spatial_layers = spatial + 1;
    let resolutions = if r.bit()? {
        let mut res = [(0u16, 0u16); MAX_SPATIAL_LAYERS];
        for slot in res.iter_mut().take(usize::from(spatial_layers)) {
            let w = r.bits(16)? as u16;
            let h = r.bits(16)? as u16;
            *slot = (w.saturating_add(1), h.saturating_add(1));
        }
        Some(res)
    } else {
        None
    };
    Ok(Structure {
        template_id_offset,
        decode_targets,
        chains,
        protected_by,
        templates,
        resolutions,
        spatial_layers,
    })
}

/// Reads bits most significant first.
struct Bits<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Bits<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Bits { bytes, pos: 0 }
    }

    fn bit(&mut self) -> Result<bool, DescriptorError> {
        let byte = self
            .bytes
            .get(self.pos / 8)
            .ok_or(DescriptorError::Truncated)?;
        let v = byte >> (7 - self.pos % 8) & 1;
        self.pos += 1;
        Ok(v == 1)
    }

    /// `n` bits (at most 32) as an unsigned number.
    fn bits(&mut self, n: u32) -> Result<u32, DescriptorError> {
        debug_assert!(n <= 32);
        let mut v: u32 = 0;
        for _ in 0..n {
            v = v << 1 | u32::from(self.bit()?);
        }
        Ok(v)
    }

    /// The specification's `ns(n)`: a number below `n` in the fewest bits.
    fn ns(&mut self, n: u32) -> Result<u32, DescriptorError> {
        if n <= 1 {
            return Ok(0);
        }
        let w = 32 - n.leading_zeros();
        let m = (1u32 << w) - n;
        let v = self.bits(w - 1)?;
        if v < m {
            return Ok(v);
        }
        let extra = u32::from(self.bit()?);
        Ok((v << 1) - m + extra)
    }
}

pub mod write;

#[cfg(test)]
mod tests {
    use super::write::{descriptor, structure, t, BitWriter};
    use super::*;

    /// Chromium's L2T2 key-frame SVC in miniature: decode targets S0T0, S0T1, S1T0, S1T1;
    /// one chain per spatial layer.
    fn l2t2(w: &mut BitWriter) {
        structure(
            w,
            5,
            4,
            &[
                t(0, 0, "SSSS", &[], &[0, 0]),
                t(0, 0, "SS--", &[4], &[4, 0]),
                t(0, 1, "-D--", &[2], &[2, 0]),
                t(1, 0, "--SS", &[1], &[1, 1]),
                t(1, 0, "--SS", &[4], &[1, 4]),
                t(1, 1, "---D", &[2], &[3, 2]),
            ],
            &[0, 0, 1, 1],
            &[(320, 180), (640, 360)],
        );
    }

    #[test]
    fn a_keyframe_carries_the_structure_and_later_packets_use_it() {
        let key = descriptor(true, false, 5, 1000, Some(&l2t2));
        let (frame, s) = parse(&key, None).unwrap();
        let s = s.expect("structure attached");
        assert_eq!(s.decode_targets(), 4);
        assert_eq!(s.spatial_layers(), 2);
        assert_eq!(
            (frame.spatial, frame.temporal, frame.frame_number),
            (0, 0, 1000)
        );
        assert!(frame.start_of_frame && !frame.end_of_frame);
        assert_eq!(frame.dependencies, 0);
        assert_eq!(frame.active_decode_targets, Some(0b1111));
        assert_eq!(frame.indications.get(3), Indication::Switch);
        assert_eq!(s.resolution(1), Some((640, 360)));
        assert_eq!(s.resolution(2), None);
        assert_eq!(s.target_layers(0), Some((0, 0)));
        assert_eq!(s.target_layers(1), Some((0, 1)));
        assert_eq!(s.target_layers(3), Some((1, 1)));
        assert_eq!(s.chain_of(2), Some(1));

        // Template id 5 + 5 = index 5: S1T1, discardable for S1T1 only.
        let (frame, none) = parse(&descriptor(false, true, 10, 1005, None), Some(&s)).unwrap();
        assert!(none.is_none());
        assert_eq!((frame.spatial, frame.temporal), (1, 1));
        assert!(frame.end_of_frame && !frame.start_of_frame);
        assert_eq!(frame.indications.get(3), Indication::Discardable);
        assert_eq!(frame.indications.get(1), Indication::NotPresent);
        assert_eq!((frame.chain_fdiff(0), frame.chain_fdiff(1)), (3, 2));
        assert_eq!(frame.dependencies, 1);
        // Template ids wrap modulo 64 from the offset.
        let wrapped = descriptor(true, true, 4, 7, None);
        assert_eq!(
            parse(&wrapped, Some(&s)),
            Err(DescriptorError::UnknownTemplate(4))
        );
    }

    #[test]
    fn without_a_structure_a_packet_cannot_be_read() {
        assert_eq!(
            parse(&descriptor(true, true, 0, 1, None), None),
            Err(DescriptorError::NoStructure)
        );
        assert_eq!(parse(&[0x80, 0], None), Err(DescriptorError::Short(2)));
    }

    #[test]
    fn custom_indications_dependencies_and_chains_override_the_template() {
        let (_, s) = parse(&descriptor(true, true, 5, 0, Some(&l2t2)), None).unwrap();
        let s = s.unwrap();
        let mut w = BitWriter::default();
        w.put(0b11_000101, 8); // start, end, template 5 (index 0)
        w.put(42, 16);
        w.put(0b00111, 5); // custom dtis, fdiffs, chains
        for dti in [3, 0, 1, 2] {
            w.put(dti, 2);
        }
        w.put(1, 2); // one fdiff of 4 bits
        w.put(6, 4);
        w.put(2, 2); // one of 8 bits
        w.put(200, 8);
        w.put(0, 2);
        w.put(9, 8); // chain 0
        w.put(0, 8); // chain 1
        let (f, _) = parse(&w.bytes, Some(&s)).unwrap();
        assert_eq!(f.frame_number, 42);
        assert_eq!(f.indications.get(0), Indication::Required);
        assert_eq!(f.indications.get(1), Indication::NotPresent);
        assert_eq!(f.indications.get(3), Indication::Switch);
        assert_eq!(f.dependencies, 2);
        assert_eq!((f.chain_fdiff(0), f.chain_fdiff(1)), (9, 0));
    }

    #[test]
    fn active_decode_targets_follow_the_structure() {
        let mut w = BitWriter::default();
        w.put(0b10_000101, 8);
        w.put(1, 16);
        w.put(0b11000, 5); // structure and active targets
        l2t2(&mut w);
        w.put(0b0011, 4);
        let (f, _) = parse(&w.bytes, None).unwrap();
        assert_eq!(f.active_decode_targets, Some(0b0011));
    }

    #[test]
    fn every_truncation_of_a_structure_is_refused_without_panicking() {
        let key = descriptor(true, false, 5, 1000, Some(&l2t2));
        for len in 0..key.len() {
            let r = parse(&key[..len], None);
            assert!(r.is_err(), "{len} of {} bytes parsed", key.len());
        }
    }

    #[test]
    fn hostile_structures_are_bounded() {
        // 64 templates of the same layer, then a 65th.
        let mut w = BitWriter::default();
        w.put(0b10_000000, 8);
        w.put(0, 16);
        w.put(0b10000, 5);
        w.put(0, 6);
        w.put(0, 5);
        for _ in 0..70 {
            w.put(0, 2);
        }
        assert_eq!(
            parse(&w.bytes, None),
            Err(DescriptorError::TooManyTemplates)
        );
        // Five spatial layers.
        let mut w = BitWriter::default();
        w.put(0b10_000000, 8);
        w.put(0, 16);
        w.put(0b10000, 5);
        w.put(0, 11);
        for _ in 0..5 {
            w.put(2, 2);
        }
        assert_eq!(
            parse(&w.bytes, None),
            Err(DescriptorError::TooManySpatialLayers)
        );
    }

    #[test]
    fn ns_reads_what_the_writer_wrote() {
        for n in 1..40u32 {
            for v in 0..n {
                let mut w = BitWriter::default();
                w.ns(n, v);
                w.put(0, 8);
                let mut r = Bits::new(&w.bytes);
                assert_eq!(r.ns(n).unwrap(), v, "ns({n}) of {v}");
            }
        }
    }
}
