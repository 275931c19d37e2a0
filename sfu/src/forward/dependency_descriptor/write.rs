//! Writing the dependency descriptor, for tests and fuzzing: the inverse of [`super::parse`]
//! for the fields weir reads.

/// One template for [`structure`]: layers, indications per decode target (`"SSRD-"`
/// letters: Switch, Required, Discardable, not present), dependencies, chain offsets.
pub struct TemplateSpec<'a> {
    pub spatial: u8,
    pub temporal: u8,
    pub dtis: &'a str,
    pub fdiffs: &'a [u8],
    pub chains: &'a [u8],
}

/// A [`TemplateSpec`], field by field: spatial and temporal layer, indications, dependencies,
/// chain offsets.
pub const fn t<'a>(
    spatial: u8,
    temporal: u8,
    dtis: &'a str,
    fdiffs: &'a [u8],
    chains: &'a [u8],
) -> TemplateSpec<'a> {
    TemplateSpec {
        spatial,
        temporal,
        dtis,
        fdiffs,
        chains,
    }
}

/// Bits written most significant first.
#[derive(Default)]
pub struct BitWriter {
    pub bytes: Vec<u8>,
    bits: usize,
}

impl BitWriter {
    pub fn put(&mut self, v: u32, n: u32) {
        for i in (0..n).rev() {
            if self.bits.is_multiple_of(8) {
                self.bytes.push(0);
            }
            if v >> i & 1 == 1 {
                let last = self.bytes.len() - 1;
                self.bytes[last] |= 1 << (7 - self.bits % 8);
            }
            self.bits += 1;
        }
    }

    pub fn ns(&mut self, n: u32, v: u32) {
        if n <= 1 {
            return;
        }
        let w = 32 - n.leading_zeros();
        let m = (1u32 << w) - n;
        if v < m {
            self.put(v, w - 1);
        } else {
            let x = v + m;
            self.put(x >> 1, w - 1);
            self.put(x & 1, 1);
        }
    }
}

fn dti(c: char) -> u32 {
    match c {
        'S' => 2,
        'R' => 3,
        'D' => 1,
        _ => 0,
    }
}

/// A descriptor: mandatory fields, and with `structure` (written by [`structure`]) the
/// extended fields with that structure attached.
pub fn descriptor(
    start: bool,
    end: bool,
    template_id: u8,
    frame_number: u16,
    structure: Option<&dyn Fn(&mut BitWriter)>,
) -> Vec<u8> {
    let mut w = BitWriter::default();
    w.put(u32::from(start), 1);
    w.put(u32::from(end), 1);
    w.put(u32::from(template_id), 6);
    w.put(u32::from(frame_number), 16);
    if let Some(write_structure) = structure {
        // structure present, no active targets, no custom fields
        w.put(0b10000, 5);
        write_structure(&mut w);
    }
    w.bytes
}

/// Write a template structure.
pub fn structure(
    w: &mut BitWriter,
    offset: u8,
    decode_targets: u8,
    templates: &[TemplateSpec],
    protected_by: &[u8],
    resolutions: &[(u16, u16)],
) {
    w.put(u32::from(offset), 6);
    w.put(u32::from(decode_targets - 1), 5);
    for (i, t) in templates.iter().enumerate() {
        let next = match templates.get(i + 1) {
            None => 3,
            Some(n) if n.spatial > t.spatial => 2,
            Some(n) if n.temporal > t.temporal => 1,
            Some(_) => 0,
        };
        w.put(next, 2);
    }
    for t in templates {
        for c in t.dtis.chars() {
            w.put(dti(c), 2);
        }
    }
    for t in templates {
        for f in t.fdiffs {
            w.put(1, 1);
            w.put(u32::from(*f - 1), 4);
        }
        w.put(0, 1);
    }
    let chains = protected_by.iter().max().map_or(0, |m| u32::from(*m) + 1);
    w.ns(u32::from(decode_targets) + 1, chains);
    if chains > 0 {
        for p in protected_by {
            w.ns(chains, u32::from(*p));
        }
        for t in templates {
            for c in t.chains {
                w.put(u32::from(*c), 4);
            }
        }
    }
    w.put(u32::from(!resolutions.is_empty()), 1);
    for (width, height) in resolutions {
        w.put(u32::from(width - 1), 16);
        w.put(u32::from(height - 1), 16);
    }
}

/// Key-frame SVC with two spatial layers and one temporal layer each (libwebrtc's `L2T1_KEY`
/// in miniature): decode targets S0 and S1. Templates: 0 S0 key, 1 S0 delta, 2 S1 key (on
/// S0's), 3 S1 delta. Chain 0 is S0's frames, chain 1 the keyframe and S1's frames; after the
/// keyframe, S1's frames refer only to S1's. Pictures 640×360 and 1280×720.
pub fn l2t1_key(w: &mut BitWriter) {
    structure(
        w,
        0,
        2,
        &[
            t(0, 0, "SS", &[], &[0, 0]),
            t(0, 0, "S-", &[2], &[2, 1]),
            t(1, 0, "-S", &[1], &[1, 1]),
            t(1, 0, "-S", &[2], &[1, 2]),
        ],
        &[0, 1],
        &[(640, 360), (1280, 720)],
    );
}

/// Full SVC with two spatial layers and one temporal layer each (libwebrtc's `L2T1` in
/// miniature): decode targets S0 and S1, with the same template ids as [`l2t1_key`]. Every S1
/// frame refers to its picture's S0 frame as well as to the S1 frame before it, so a
/// subscriber of S1 receives S0's frames too and can move down to S0 at any S0 frame, with no
/// keyframe. Chain 0 is S0's frames, chain 1 every frame. Pictures 640×360 and 1280×720.
pub fn l2t1(w: &mut BitWriter) {
    structure(
        w,
        0,
        2,
        &[
            t(0, 0, "SS", &[], &[0, 0]),
            t(0, 0, "SR", &[2], &[2, 1]),
            t(1, 0, "-S", &[1], &[1, 1]),
            t(1, 0, "-S", &[2, 1], &[1, 1]),
        ],
        &[0, 1],
        &[(640, 360), (1280, 720)],
    );
}
