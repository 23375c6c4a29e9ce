//! Ground floor: reading and checking safetensors headers, for the checkpoints
//! ([`crate::checkpoint`]), the data sets ([`crate::data`]) and the writers that read their
//! own files back ([`crate::output::tensors`]). Errors name the file
//! ([`LcaError::Checkpoint`]; callers that read other files restate them).

use crate::error::{LcaError, Result};
use std::io::Read;
use std::path::Path;

fn ck_err(path: &Path, msg: impl Into<String>) -> LcaError {
    LcaError::Checkpoint {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Headers larger than this are refused before anything of that size is allocated (the
/// limit of the `safetensors` format library).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// One tensor entry of a header.
#[derive(Debug, Clone, PartialEq)]
pub struct HeaderTensor {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    /// Byte range `[begin, end)` of the tensor in the data section.
    pub data_offsets: [u64; 2],
}

pub(crate) type Header = serde_json::Map<String, serde_json::Value>;

/// Read the 8-byte length and the JSON header from `r`, for a file of `len` bytes.
/// Returns the header's length in bytes, its JSON object and its raw bytes.
fn read_header_from(path: &Path, len: u64, r: &mut dyn Read) -> Result<(u64, Header, Vec<u8>)> {
    let mut n = [0u8; 8];
    r.read_exact(&mut n).map_err(|_| {
        ck_err(
            path,
            format!("truncated: {len} bytes, too short for a safetensors header"),
        )
    })?;
    let hlen = u64::from_le_bytes(n);
    if hlen > MAX_HEADER_BYTES || hlen > len.saturating_sub(8) {
        return Err(ck_err(
            path,
            format!(
                "header length {hlen} is impossible for a file of {len} bytes (truncated or not a safetensors file)"
            ),
        ));
    }
    let mut h = vec![0u8; hlen as usize];
    r.read_exact(&mut h)
        .map_err(|e| ck_err(path, format!("cannot read header: {e}")))?;
    let entries: Entries = serde_json::from_slice(&h)
        .map_err(|e| ck_err(path, format!("header is not valid JSON: {e}")))?;
    let mut m = Header::new();
    for (k, v) in entries.0 {
        if m.contains_key(&k) {
            // serde_json would keep the last one, the safetensors library refuses the file.
            return Err(ck_err(path, format!("header names '{k}' twice")));
        }
        m.insert(k, v);
    }
    Ok((hlen, m, h))
}

/// The entries of a JSON object in file order, duplicates included.
struct Entries(Vec<(String, serde_json::Value)>);

impl<'de> serde::Deserialize<'de> for Entries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut a: A,
            ) -> std::result::Result<Entries, A::Error> {
                let mut v = Vec::new();
                while let Some(e) = a.next_entry::<String, serde_json::Value>()? {
                    v.push(e);
                }
                Ok(Entries(v))
            }
        }
        d.deserialize_map(V)
    }
}

/// Read and parse a safetensors header (without reading tensor data). Returns the file size
/// and the header's JSON object, unchecked; [`describe`] checks it.
pub fn read_header(path: &Path) -> Result<(u64, Header)> {
    let (mut f, meta) = crate::files::open_regular(path)?;
    let len = meta.len();
    let (_, h, _) = read_header_from(path, len, &mut f)?;
    Ok((len, h))
}

/// Size in bytes of `shape` elements of `dtype`, or `None` on overflow or sub-byte sizes.
fn byte_size(dtype: safetensors::Dtype, shape: &[usize]) -> Option<u64> {
    let numel = shape
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d as u64))?;
    let bits = numel.checked_mul(dtype.bitsize() as u64)?;
    bits.is_multiple_of(8).then_some(bits / 8)
}

/// Check a header against the file it came from: `__metadata__` maps names to strings, every
/// tensor has a known dtype, a shape of non-negative integers and a byte range of the right
/// size, and the ranges tile the data section exactly (none overruns the file, none overlaps
/// another, no gap, nothing after the last). These are the rules of the safetensors format.
fn check_header(path: &Path, data_len: u64, header: &Header) -> Result<Vec<HeaderTensor>> {
    let mut tensors = Vec::new();
    for (name, v) in header {
        if name == "__metadata__" {
            let ok = v
                .as_object()
                .is_some_and(|m| m.values().all(|x| x.is_string()));
            if !ok {
                return Err(ck_err(
                    path,
                    format!("header `__metadata__` must map names to strings, found {v}"),
                ));
            }
            continue;
        }
        let bad = |what: &str| ck_err(path, format!("header entry '{name}': {what}, found {v}"));
        let entry = v.as_object().ok_or_else(|| bad("not an object"))?;
        let dtype_str = entry
            .get("dtype")
            .and_then(|d| d.as_str())
            .ok_or_else(|| bad("no `dtype` string"))?;
        let dtype: safetensors::Dtype = serde_json::from_value(serde_json::Value::String(
            dtype_str.to_string(),
        ))
        .map_err(|_| {
            ck_err(
                path,
                format!("tensor '{name}' has unknown dtype {dtype_str:?}"),
            )
        })?;
        let shape: Vec<usize> = entry
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|a| {
                a.iter()
                    .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                    .collect::<Option<Vec<usize>>>()
            })
            .ok_or_else(|| bad("`shape` must be an array of non-negative integers"))?;
        let offsets: [u64; 2] = match entry.get("data_offsets").and_then(|o| o.as_array()) {
            Some(a) if a.len() == 2 => match (a[0].as_u64(), a[1].as_u64()) {
                (Some(b), Some(e)) if b <= e => [b, e],
                _ => return Err(bad("`data_offsets` must be [begin, end] with begin ≤ end")),
            },
            _ => return Err(bad("`data_offsets` must be [begin, end] with begin ≤ end")),
        };
        let need = byte_size(dtype, &shape).ok_or_else(|| {
            ck_err(
                path,
                format!("tensor '{name}' ({dtype_str} {shape:?}) has an impossible size"),
            )
        })?;
        if offsets[1] - offsets[0] != need {
            return Err(ck_err(
                path,
                format!(
                    "tensor '{name}' ({dtype_str} {shape:?}) needs {need} bytes but its data_offsets {offsets:?} span {}",
                    offsets[1] - offsets[0]
                ),
            ));
        }
        tensors.push(HeaderTensor {
            name: name.clone(),
            dtype: dtype_str.to_string(),
            shape,
            data_offsets: offsets,
        });
    }
    // The byte ranges must tile the data section exactly.
    let mut order: Vec<&HeaderTensor> = tensors.iter().collect();
    order.sort_by_key(|t| (t.data_offsets, t.name.clone()));
    if let Some(t) = order.iter().find(|t| t.data_offsets[1] > data_len) {
        return Err(ck_err(
            path,
            format!(
                "tensor '{}' has data_offsets {:?}, beyond the {data_len} bytes of data the file holds (truncated, or a corrupt header)",
                t.name, t.data_offsets
            ),
        ));
    }
    let mut at = 0u64;
    let mut prev: Option<&HeaderTensor> = None;
    for t in &order {
        let [b, e] = t.data_offsets;
        if b < at {
            let p = prev.map_or(String::new(), |p| {
                format!("'{}' {:?} and ", p.name, p.data_offsets)
            });
            return Err(ck_err(
                path,
                format!(
                    "tensors {p}'{}' {:?} overlap (corrupt header)",
                    t.name, t.data_offsets
                ),
            ));
        }
        if b > at {
            return Err(ck_err(
                path,
                format!(
                    "bytes {at}..{b} of the data section belong to no tensor (before '{}'; corrupt header)",
                    t.name
                ),
            ));
        }
        at = e;
        if e > b || prev.is_none() {
            prev = Some(t);
        }
    }
    if at != data_len {
        return Err(ck_err(
            path,
            format!(
                "{} bytes after the last tensor's data (the header accounts for {at} of {data_len}): corrupt file",
                data_len - at
            ),
        ));
    }
    Ok(tensors)
}

/// Read a header from `r` (a file of `len` bytes) and check it completely: first with the
/// checks above, whose messages name what is wrong, then against the safetensors library's
/// own reading of the header, so that a file accepted here is one it loads.
pub(crate) fn read_checked(
    path: &Path,
    len: u64,
    r: &mut dyn Read,
) -> Result<(u64, Header, Vec<HeaderTensor>)> {
    let (hlen, header, raw) = read_header_from(path, len, r)?;
    let tensors = check_header(path, len - 8 - hlen, &header)?;
    serde_json::from_slice::<safetensors::tensor::Metadata>(&raw)
        .map_err(|e| ck_err(path, format!("not a valid safetensors header: {e}")))?;
    Ok((hlen, header, tensors))
}

/// Read and check the header of a safetensors file without reading its data: the byte offset
/// where the data section starts and the tensors it lists.
pub fn read_file_header(path: &Path) -> Result<(u64, Vec<HeaderTensor>)> {
    let (file, meta) = crate::files::open_regular(path)?;
    let mut r = std::io::BufReader::new(file);
    let len = meta.len();
    let (hlen, _, tensors) = read_checked(path, len, &mut r)?;
    Ok((8 + hlen, tensors))
}
