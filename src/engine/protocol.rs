//! The framing of the messages between `lca` and the PyTorch worker (docs/engines.md,
//! "Protocol"; the Python side is `python/lca/engine/protocol.py`).
//!
//! Every message: magic `LCAW`, protocol version (u32 LE), header length H (u32 LE), payload
//! length P (u64 LE), H bytes of a JSON object with a `cmd` key, P bytes of raw
//! little-endian numbers.

use std::io::{self, Read, Write};

pub const MAGIC: &[u8; 4] = b"LCAW";
pub const VERSION: u32 = 1;
/// Largest header accepted.
pub const MAX_HEADER: u32 = 64 << 20;

/// What reading a message can end in, other than a message.
#[derive(Debug)]
pub enum ReadError {
    /// The stream ended (cleanly or inside a message): the worker is gone.
    Eof,
    /// The bytes are not a well-formed message.
    Malformed(String),
    /// Another I/O failure.
    Io(io::Error),
}

/// Write one message (header, then the payload parts back to back) and flush.
pub fn write_message(
    w: &mut impl Write,
    header: &serde_json::Value,
    payload: &[&[u8]],
) -> io::Result<()> {
    let h = serde_json::to_vec(header).map_err(io::Error::other)?;
    let p: usize = payload.iter().map(|b| b.len()).sum();
    let mut prefix = [0u8; 20];
    prefix[..4].copy_from_slice(MAGIC);
    prefix[4..8].copy_from_slice(&VERSION.to_le_bytes());
    prefix[8..12].copy_from_slice(&(h.len() as u32).to_le_bytes());
    prefix[12..20].copy_from_slice(&(p as u64).to_le_bytes());
    w.write_all(&prefix)?;
    w.write_all(&h)?;
    for b in payload {
        w.write_all(b)?;
    }
    w.flush()
}

fn read_exact(r: &mut impl Read, buf: &mut [u8]) -> Result<(), ReadError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => ReadError::Eof,
        _ => ReadError::Io(e),
    })
}

/// Read one message: its header and its payload (into `payload`, resized; reused between
/// calls so that a gradient-sized buffer is allocated once).
pub fn read_message(
    r: &mut impl Read,
    payload: &mut Vec<u8>,
) -> Result<serde_json::Map<String, serde_json::Value>, ReadError> {
    let mut prefix = [0u8; 20];
    read_exact(r, &mut prefix)?;
    if &prefix[..4] != MAGIC {
        return Err(ReadError::Malformed(format!(
            "bad magic {:02x?} (expected \"LCAW\")",
            &prefix[..4]
        )));
    }
    let version = u32::from_le_bytes(prefix[4..8].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(ReadError::Malformed(format!(
            "protocol version {version}, this lca speaks {VERSION}"
        )));
    }
    let hlen = u32::from_le_bytes(prefix[8..12].try_into().expect("4 bytes"));
    let plen = u64::from_le_bytes(prefix[12..20].try_into().expect("8 bytes"));
    if hlen == 0 || hlen > MAX_HEADER {
        return Err(ReadError::Malformed(format!("header length {hlen}")));
    }
    let mut h = vec![0u8; hlen as usize];
    read_exact(r, &mut h)?;
    let plen = usize::try_from(plen)
        .map_err(|_| ReadError::Malformed(format!("payload length {plen}")))?;
    payload.resize(plen, 0);
    read_exact(r, payload)?;
    match serde_json::from_slice::<serde_json::Value>(&h) {
        Ok(serde_json::Value::Object(m)) if m.get("cmd").is_some_and(|c| c.is_string()) => Ok(m),
        Ok(_) => Err(ReadError::Malformed(
            "the header is not a JSON object with a string `cmd`".into(),
        )),
        Err(e) => Err(ReadError::Malformed(format!("the header is not JSON: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_round_trips_byte_for_byte() {
        let mut buf = Vec::new();
        let h = serde_json::json!({"cmd": "loss", "id": 3});
        write_message(&mut buf, &h, &[&[1, 2], &[3]]).unwrap();
        assert_eq!(&buf[..4], b"LCAW");
        assert_eq!(u64::from_le_bytes(buf[12..20].try_into().unwrap()), 3);
        let mut p = Vec::new();
        let m = read_message(&mut buf.as_slice(), &mut p).unwrap();
        assert_eq!(m["cmd"], "loss");
        assert_eq!(m["id"], 3);
        assert_eq!(p, vec![1, 2, 3]);
    }

    #[test]
    fn truncation_is_eof_and_garbage_is_malformed() {
        let mut buf = Vec::new();
        write_message(&mut buf, &serde_json::json!({"cmd": "x"}), &[&[0; 16]]).unwrap();
        let mut p = Vec::new();
        assert!(matches!(
            read_message(&mut &buf[..buf.len() - 1], &mut p),
            Err(ReadError::Eof)
        ));
        assert!(matches!(
            read_message(&mut &b""[..], &mut p),
            Err(ReadError::Eof)
        ));
        let mut bad = buf.clone();
        bad[0] = b'X';
        assert!(matches!(
            read_message(&mut bad.as_slice(), &mut p),
            Err(ReadError::Malformed(_))
        ));
    }
}
