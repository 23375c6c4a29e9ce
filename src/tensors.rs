//! Conversions from safetensors' stored dtypes to the numbers `lca` computes with, and a
//! streaming hash of files.

use safetensors::Dtype;
use safetensors::tensor::TensorView;
use sha2::{Digest, Sha256};

/// Convert a stored tensor to f64 values (exact for every supported dtype but 64-bit ints
/// beyond 2^53). Returns `Err(dtype name)` for dtypes that carry no numbers we can use.
pub fn to_f64(t: &TensorView<'_>) -> Result<Vec<f64>, String> {
    let b = t.data();
    macro_rules! conv {
        ($ty:ty, $n:expr, $f:expr) => {
            b.chunks_exact($n)
                .map(|c| {
                    // chunks_exact yields slices of exactly $n bytes.
                    let v = <$ty>::from_le_bytes(c.try_into().expect("chunk of the type's size"));
                    #[allow(clippy::redundant_closure_call)]
                    ($f)(v)
                })
                .collect()
        };
    }
    Ok(match t.dtype() {
        Dtype::F64 => conv!(f64, 8, |v: f64| v),
        Dtype::F32 => conv!(f32, 4, |v: f32| v as f64),
        Dtype::F16 => conv!(u16, 2, |v: u16| half::f16::from_bits(v).to_f64()),
        Dtype::BF16 => conv!(u16, 2, |v: u16| half::bf16::from_bits(v).to_f64()),
        Dtype::U8 => b.iter().map(|&v| v as f64).collect(),
        Dtype::I8 => b.iter().map(|&v| v as i8 as f64).collect(),
        Dtype::BOOL => b.iter().map(|&v| (v != 0) as u8 as f64).collect(),
        Dtype::I16 => conv!(i16, 2, |v: i16| v as f64),
        Dtype::U16 => conv!(u16, 2, |v: u16| v as f64),
        Dtype::I32 => conv!(i32, 4, |v: i32| v as f64),
        Dtype::U32 => conv!(u32, 4, |v: u32| v as f64),
        Dtype::I64 => conv!(i64, 8, |v: i64| v as f64),
        Dtype::U64 => conv!(u64, 8, |v: u64| v as f64),
        other => return Err(format!("{other:?}")),
    })
}

/// Whether a dtype holds floating-point values of a kind parameters are saved in.
pub fn is_param_dtype(d: Dtype) -> bool {
    matches!(d, Dtype::F64 | Dtype::F32 | Dtype::F16 | Dtype::BF16)
}

/// Whether a dtype is an integer type.
pub fn is_int_dtype(d: Dtype) -> bool {
    matches!(
        d,
        Dtype::U8
            | Dtype::I8
            | Dtype::I16
            | Dtype::U16
            | Dtype::I32
            | Dtype::U32
            | Dtype::I64
            | Dtype::U64
    )
}

/// Lower-case hex sha256 of a byte buffer.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&sha256(bytes))
}

/// sha256 of a byte buffer.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Lower-case hex sha256 of a file's content, read in pieces (the file is not held in memory).
pub fn sha256_file(path: &std::path::Path) -> std::io::Result<String> {
    use std::io::Read;
    // Only a regular file, and only the length it has when opened (a device such as
    // /dev/zero would be read forever, a FIFO would block).
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "is not a regular file: inputs must be regular files",
        ));
    }
    let f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let mut f = f.take(len);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        if crate::interrupt::requested() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Interrupted,
                "interrupted while hashing",
            ));
        }
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_types_convert() {
        let vals = [
            half::f16::from_f32(1.5).to_bits(),
            half::f16::from_f32(-2.0).to_bits(),
        ];
        let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let t = TensorView::new(Dtype::F16, vec![2], &bytes).unwrap();
        assert_eq!(to_f64(&t).unwrap(), vec![1.5, -2.0]);
        let vals = [half::bf16::from_f32(0.25).to_bits()];
        let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let t = TensorView::new(Dtype::BF16, vec![1], &bytes).unwrap();
        assert_eq!(to_f64(&t).unwrap(), vec![0.25]);
    }

    #[test]
    fn sha256_of_empty() {
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
