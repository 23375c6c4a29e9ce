//! The `.npz` reader: a zip archive of `.npy` arrays. Every allocation is bounded by bytes
//! that are really there: a member's `.npy` header is parsed first and the size it declares
//! (dtype × shape) is checked against the member's declared uncompressed size, the archive's
//! real size (stored members) or the largest size its compressed bytes can inflate to
//! (compressed members); values are then read in blocks and appended as they arrive, so a
//! header or a zip entry that lies can never make `lca` allocate more than the data it holds.

use crate::error::{LcaError, Result};
use std::io::Read;
use std::path::Path;

/// One array read from the archive, values in logical (C) order as f64.
pub(super) struct NpyArray {
    pub shape: Vec<usize>,
    pub values: Vec<f64>,
    pub integral: bool,
    pub dtype: String,
}

/// Deflate cannot expand its input more than about 1032 times; a member that declares more
/// is corrupt (or a bomb).
const MAX_INFLATE_RATIO: u64 = 1032;
/// `.npy` headers are short text; version 2 allows 4 GiB ones, which no writer produces.
const MAX_NPY_HEADER: u64 = 1 << 20;
/// Values converted per block.
const BLOCK: usize = 1 << 16;

/// Element types of `.npy` arrays that `lca` reads.
#[derive(Clone, Copy)]
enum Kind {
    F,
    I,
    U,
}

struct Descr {
    kind: Kind,
    size: usize,
    big_endian: bool,
    text: String,
}

fn parse_descr(d: &str) -> std::result::Result<Descr, String> {
    let unsupported = || format!("unsupported dtype '{d}' (supported: float32/64, (u)int8-64)");
    let mut chars = d.chars();
    let (order, rest) = match chars.next() {
        Some(c @ ('<' | '>' | '|' | '=')) => (c, chars.as_str()),
        _ => ('|', d),
    };
    let mut rc = rest.chars();
    let kind = match rc.next() {
        Some('f') => Kind::F,
        Some('i') => Kind::I,
        Some('u') => Kind::U,
        _ => return Err(unsupported()),
    };
    let size: usize = rc.as_str().parse().map_err(|_| unsupported())?;
    let ok = match kind {
        Kind::F => matches!(size, 4 | 8),
        Kind::I | Kind::U => matches!(size, 1 | 2 | 4 | 8),
    };
    if !ok {
        return Err(unsupported());
    }
    Ok(Descr {
        kind,
        size,
        big_endian: order == '>',
        text: d.to_string(),
    })
}

/// The `.npy` header dictionary: `{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }`.
struct NpyHeader {
    descr: String,
    fortran: bool,
    shape: Vec<usize>,
}

/// A tiny parser for the Python literal subset of `.npy` headers.
struct Lit<'a> {
    s: &'a [u8],
    i: usize,
}

impl Lit<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }
    fn eat(&mut self, c: u8) -> bool {
        self.ws();
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn string(&mut self) -> Option<String> {
        self.ws();
        let q = *self.s.get(self.i)?;
        if q != b'\'' && q != b'"' {
            return None;
        }
        let start = self.i + 1;
        let end = start + self.s[start..].iter().position(|&b| b == q)?;
        self.i = end + 1;
        String::from_utf8(self.s[start..end].to_vec()).ok()
    }
    fn word(&mut self) -> &[u8] {
        self.ws();
        let start = self.i;
        while self.i < self.s.len() && self.s[self.i].is_ascii_alphanumeric() {
            self.i += 1;
        }
        &self.s[start..self.i]
    }
}

fn parse_header(text: &[u8]) -> std::result::Result<NpyHeader, String> {
    let bad = |what: &str| {
        format!(
            "corrupt .npy header ({what}): {}",
            String::from_utf8_lossy(text).trim()
        )
    };
    let mut p = Lit { s: text, i: 0 };
    if !p.eat(b'{') {
        return Err(bad("not a dictionary"));
    }
    let (mut descr, mut fortran, mut shape) = (None, None, None);
    while !p.eat(b'}') {
        let key = p.string().ok_or_else(|| bad("expected a key"))?;
        if !p.eat(b':') {
            return Err(bad("expected ':'"));
        }
        match key.as_str() {
            "descr" => descr = Some(p.string().ok_or_else(|| bad("`descr` is not a string"))?),
            "fortran_order" => {
                fortran = Some(match p.word() {
                    b"True" => true,
                    b"False" => false,
                    _ => return Err(bad("`fortran_order` is not True or False")),
                })
            }
            "shape" => {
                if !p.eat(b'(') {
                    return Err(bad("`shape` is not a tuple"));
                }
                let mut dims = Vec::new();
                loop {
                    if p.eat(b')') {
                        break;
                    }
                    let w = std::str::from_utf8(p.word()).unwrap_or("").to_string();
                    let d: u64 = w.trim_end_matches('L').parse().map_err(|_| {
                        if !w.is_empty() && w.bytes().all(|b| b.is_ascii_digit()) {
                            format!("shape dimension {w} is too large")
                        } else {
                            bad("`shape` holds something other than non-negative integers")
                        }
                    })?;
                    dims.push(
                        usize::try_from(d)
                            .map_err(|_| format!("shape dimension {d} is too large"))?,
                    );
                    if p.eat(b',') {
                        continue;
                    }
                    if p.eat(b')') {
                        break;
                    }
                    return Err(bad("`shape` is not a tuple of integers"));
                }
                shape = Some(dims);
            }
            _ => return Err(bad(&format!("unknown key '{key}'"))),
        }
        if !p.eat(b',') {
            if p.eat(b'}') {
                break;
            }
            return Err(bad("expected ',' or '}'"));
        }
    }
    Ok(NpyHeader {
        descr: descr.ok_or_else(|| bad("no `descr`"))?,
        fortran: fortran.ok_or_else(|| bad("no `fortran_order`"))?,
        shape: shape.ok_or_else(|| bad("no `shape`"))?,
    })
}

/// Read exactly `buf.len()` bytes, or say how many there were.
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn convert(d: &Descr, b: &[u8]) -> f64 {
    macro_rules! num {
        ($t:ty) => {{
            let a = b.try_into().expect("element size");
            if d.big_endian {
                <$t>::from_be_bytes(a) as f64
            } else {
                <$t>::from_le_bytes(a) as f64
            }
        }};
    }
    match (d.kind, d.size) {
        (Kind::F, 4) => num!(f32),
        (Kind::F, _) => num!(f64),
        (Kind::I, 1) => b[0] as i8 as f64,
        (Kind::I, 2) => num!(i16),
        (Kind::I, 4) => num!(i32),
        (Kind::I, _) => num!(i64),
        (Kind::U, 1) => b[0] as f64,
        (Kind::U, 2) => num!(u16),
        (Kind::U, 4) => num!(u32),
        (Kind::U, _) => num!(u64),
    }
}

/// Read the arrays `names` (each stored as `NAME` or `NAME.npy`) of the archive at `path`.
pub(super) fn read(path: &Path, names: &[&str]) -> Result<Vec<NpyArray>> {
    let err = |msg: String| LcaError::Data {
        path: path.to_path_buf(),
        msg,
    };
    let (file, meta) = crate::files::open_regular(path)?;
    let file_len = meta.len();
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| err(format!("not a valid .npz file: {e}")))?;
    let available: Vec<String> = zip.file_names().map(str::to_string).collect();
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let key = [name.to_string(), format!("{name}.npy")]
            .into_iter()
            .find(|k| available.contains(k))
            .ok_or_else(|| {
                let mut have: Vec<&str> = available
                    .iter()
                    .map(|k| k.strip_suffix(".npy").unwrap_or(k))
                    .collect();
                have.sort();
                err(format!(
                    "has no array '{name}' (it holds: {}); set `data.x`/`data.y` in the spec",
                    have.join(", ")
                ))
            })?;
        let member = zip
            .by_name(&key)
            .map_err(|e| err(format!("array '{name}': not a valid .npz member: {e}")))?;
        out.push(read_member(path, name, member, file_len)?);
    }
    Ok(out)
}

fn read_member(
    path: &Path,
    name: &str,
    mut member: zip::read::ZipFile<'_, std::io::BufReader<std::fs::File>>,
    file_len: u64,
) -> Result<NpyArray> {
    let err = |msg: String| LcaError::Data {
        path: path.to_path_buf(),
        msg: format!("array '{name}': {msg}"),
    };
    let declared = member.size();
    let compressed = member.compressed_size();
    // The most bytes this member can really yield.
    let limit = if member.compression() == zip::CompressionMethod::Stored {
        compressed.min(file_len)
    } else {
        compressed.min(file_len).saturating_mul(MAX_INFLATE_RATIO)
    };
    if declared > limit {
        return Err(err(format!(
            "the archive declares {declared} bytes for it, impossible for {compressed} stored bytes in a file of {file_len} bytes (corrupt archive)"
        )));
    }
    let truncated = |have: u64, want: u64| {
        err(format!(
            "truncated: the member ends after {have} bytes, its header declares {want}"
        ))
    };
    let io = |e: std::io::Error| err(format!("cannot read it: {e} (corrupt or truncated .npz)"));
    let mut pre = [0u8; 8];
    let n = read_full(&mut member, &mut pre).map_err(io)?;
    if n < 8 || &pre[..6] != b"\x93NUMPY" {
        return Err(err(if n < 8 {
            format!("truncated: {n} bytes, too short for a .npy header")
        } else {
            "not a .npy array (no \\x93NUMPY magic)".into()
        }));
    }
    let (hlen, lenbytes) = match pre[6] {
        1 => {
            let mut b = [0u8; 2];
            if read_full(&mut member, &mut b).map_err(io)? < 2 {
                return Err(truncated(8, 10));
            }
            (u16::from_le_bytes(b) as u64, 2)
        }
        2 | 3 => {
            let mut b = [0u8; 4];
            if read_full(&mut member, &mut b).map_err(io)? < 4 {
                return Err(truncated(8, 12));
            }
            (u32::from_le_bytes(b) as u64, 4)
        }
        v => return Err(err(format!("unsupported .npy format version {v}"))),
    };
    let head_end = 8 + lenbytes + hlen;
    if hlen > MAX_NPY_HEADER || head_end > declared {
        return Err(err(format!(
            "its .npy header length {hlen} is impossible for a member of {declared} bytes (truncated or corrupt)"
        )));
    }
    let mut htext = vec![0u8; hlen as usize];
    let got = read_full(&mut member, &mut htext).map_err(io)?;
    if got < htext.len() {
        return Err(truncated(8 + lenbytes + got as u64, head_end));
    }
    let h = parse_header(&htext).map_err(&err)?;
    let d = parse_descr(&h.descr).map_err(&err)?;
    let numel = h
        .shape
        .iter()
        .try_fold(1usize, |a, &x| a.checked_mul(x))
        .ok_or_else(|| err(format!("shape {:?} is too large", h.shape)))?;
    let nbytes = (numel as u64).checked_mul(d.size as u64);
    let room = declared - head_end;
    match nbytes {
        Some(b) if b <= room => {}
        _ => {
            return Err(err(format!(
                "its header declares shape {:?} of {} ({} bytes) but the member holds {room} bytes of data (truncated or corrupt)",
                h.shape,
                d.text,
                nbytes.map_or("more than 2^64".to_string(), |b| b.to_string())
            )));
        }
    }
    let mut values = Vec::with_capacity(numel.min(BLOCK));
    let mut buf = vec![0u8; BLOCK * d.size];
    while values.len() < numel {
        if crate::interrupt::requested() {
            return Err(LcaError::Interrupted(crate::error::Interruption::Requested));
        }
        let k = BLOCK.min(numel - values.len());
        let bytes = &mut buf[..k * d.size];
        let got = read_full(&mut member, bytes).map_err(io)?;
        if got < bytes.len() {
            let have = head_end + (values.len() * d.size + got) as u64;
            return Err(truncated(have, head_end + nbytes.unwrap_or(0)));
        }
        values.extend(bytes.chunks_exact(d.size).map(|b| convert(&d, b)));
    }
    if h.fortran && h.shape.len() > 1 {
        use ndarray::ShapeBuilder;
        let a = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&h.shape).f(), values)
            .map_err(|e| err(format!("cannot arrange a Fortran-order array: {e}")))?;
        values = a.iter().copied().collect();
    }
    Ok(NpyArray {
        shape: h.shape,
        values,
        integral: !matches!(d.kind, Kind::F),
        dtype: d.text,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_parse_and_lies_are_refused() {
        let h = parse_header(b"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }  \n")
            .unwrap();
        assert_eq!(h.shape, vec![2, 3]);
        assert!(!h.fortran);
        let h = parse_header(b"{'descr': '|u1', 'fortran_order': True, 'shape': (5,)}").unwrap();
        assert_eq!(h.shape, vec![5]);
        assert!(h.fortran);
        let h = parse_header(b"{'shape': (), 'descr': '>i8', 'fortran_order': False}").unwrap();
        assert!(h.shape.is_empty());
        let e = parse_header(
            b"{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999999,), }",
        )
        .err()
        .unwrap();
        assert!(e.contains("too large"), "{e}");
        assert!(
            parse_header(b"{'descr': '<f4', 'shape': (2, -1), 'fortran_order': False}").is_err()
        );
        assert!(parse_header(b"garbage").is_err());
        assert!(
            parse_descr("<c8")
                .unwrap_err()
                .contains("unsupported dtype '<c8'")
        );
        assert!(parse_descr("<f2").is_err());
        let d = parse_descr(">i2").unwrap();
        assert_eq!(convert(&d, &[0xff, 0xfe]), -2.0);
    }
}
