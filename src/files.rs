//! Ground floor: writing files so that a reader, or a run killed at any moment, sees the old
//! content or the new one, never a mixture. One set of rules for every writer:
//!
//! 1. write the bytes to a temporary file in the *same directory* (`.NAME.PID.partial`, so
//!    the rename below cannot cross file systems);
//! 2. fsync the temporary file;
//! 3. move it into place — [`Mode::Replace`]: rename over any old file; [`Mode::CreateNew`]:
//!    hard-link it to the final name, which fails if a file of that name exists (so an
//!    existing file is never replaced, even one that appeared meanwhile), falling back to a
//!    rename where links are not supported and the name is still free;
//! 4. fsync the directory, so that the rename survives a power loss;
//! 5. remove the temporary file in every case.

use crate::error::{LcaError, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// What to do when the target file exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Replace it atomically.
    Replace,
    /// Never replace it: fail with "exists; not replaced (use --force)".
    CreateNew,
}

/// The directory a file `path` is written in (`.` for a bare name).
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Write `bytes` to `path` atomically under the rules of this module.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: Mode) -> Result<()> {
    let dir = parent_dir(path);
    if !dir.is_dir() {
        return Err(LcaError::Output {
            path: path.to_path_buf(),
            msg: format!("directory {} does not exist", dir.display()),
        });
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "out".into());
    let tmp = dir.join(format!(".{name}.{}.partial", std::process::id()));
    let result = write_synced(&tmp, bytes).and_then(|()| move_into_place(&tmp, path, mode));
    let _ = std::fs::remove_file(&tmp);
    if result.is_ok() {
        sync_dir(&dir);
    }
    result
}

fn write_synced(tmp: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(tmp).map_err(|e| LcaError::io(tmp, e))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| LcaError::io(tmp, e))
}

fn move_into_place(tmp: &Path, path: &Path, mode: Mode) -> Result<()> {
    match mode {
        Mode::Replace => std::fs::rename(tmp, path).map_err(|e| LcaError::io(path, e)),
        // A hard link fails if the target appeared meanwhile: never replace a file.
        Mode::CreateNew => match std::fs::hard_link(tmp, path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(LcaError::Output {
                path: path.to_path_buf(),
                msg: "exists; not replaced (use --force)".into(),
            }),
            Err(_) if !path.exists() => {
                std::fs::rename(tmp, path).map_err(|e| LcaError::io(path, e))
            }
            Err(e) => Err(LcaError::io(path, e)),
        },
    }
}

/// fsync a directory so that renames in it survive a power loss (best effort: not every
/// file system supports it).
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_or_refuses_and_leaves_no_temporary_file() {
        let dir = std::env::temp_dir().join(format!("lca-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.json");
        write_atomic(&p, b"one", Mode::CreateNew).unwrap();
        let e = write_atomic(&p, b"two", Mode::CreateNew).unwrap_err();
        assert!(
            e.to_string()
                .ends_with("exists; not replaced (use --force)"),
            "{e}"
        );
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
        write_atomic(&p, b"three", Mode::Replace).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"three");
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("a.json")]);
        let missing = dir.join("no/such/dir/x");
        let e = write_atomic(&missing, b"", Mode::Replace).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
