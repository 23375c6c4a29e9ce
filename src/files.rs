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
//!
//! Every file-system operation of a write, of the output commit and of the journal goes
//! through [`op`], which counts them: the test hook `LCA_TEST_CRASH_AT=N` kills the process
//! (SIGKILL) right before the N-th, so that the tests can stop a run at each of them and check
//! that the next run recovers (`docs/reliability.md`).

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

/// Count one file-system operation (`what` on `path`) and, under the test hook
/// `LCA_TEST_CRASH_AT=N`, kill the process right before the N-th: as `kill -9` or a power
/// loss would, with no destructor run and nothing flushed.
pub fn op(what: &str, path: &Path) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let Some(at) = crash_at() else {
        return;
    };
    let n = COUNT.fetch_add(1, Ordering::SeqCst) + 1;
    if n == at {
        eprintln!(
            "LCA_TEST_CRASH_AT: killed before file-system operation {n}: {what} {}",
            path.display()
        );
        #[cfg(unix)]
        // SAFETY: kill(2) on our own pid; no memory is touched.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
        std::process::abort();
    }
}

/// The test hook `LCA_TEST_CRASH_AT=N`, if set. Under it the journal is saved after every
/// step (not on a timer), so that operation N is the same one from run to run.
pub fn crash_at() -> Option<u64> {
    static CRASH_AT: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *CRASH_AT.get_or_init(|| {
        std::env::var("LCA_TEST_CRASH_AT")
            .ok()
            .and_then(|v| v.parse().ok())
    })
}

/// Remove a file (counted by [`op`]); a missing file is not an error.
pub fn remove_file(path: &Path) -> Result<()> {
    op("remove", path);
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(LcaError::io(path, e)),
        _ => Ok(()),
    }
}

/// Rename `from` to `to` (counted by [`op`]).
pub fn rename(from: &Path, to: &Path) -> Result<()> {
    op("rename", to);
    std::fs::rename(from, to).map_err(|e| LcaError::io(to, e))
}

/// Create a directory and its parents (counted by [`op`]).
pub fn create_dir_all(dir: &Path) -> Result<()> {
    op("mkdir", dir);
    std::fs::create_dir_all(dir).map_err(|e| LcaError::io(dir, e))
}

/// fsync a file that is already written (counted by [`op`]).
pub fn sync_file(path: &Path) -> Result<()> {
    op("fsync", path);
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| LcaError::io(path, e))
}

/// fsync files that are already written, each counted by [`op`] in the order given, the
/// fsyncs running at once (one thread each): a journaling file system then commits them
/// together, where one after the other each waited for its own commit (six sequential fsyncs
/// were most of a small model's output commit). Returns when all are done; the first
/// failure, in the order given, is the error.
pub fn sync_files<'a>(paths: impl IntoIterator<Item = &'a Path>) -> Result<()> {
    let paths: Vec<&Path> = paths.into_iter().collect();
    if let [p] = paths[..] {
        return sync_file(p);
    }
    std::thread::scope(|s| {
        let running: Vec<_> = paths
            .iter()
            .map(|&p| {
                op("fsync", p);
                let job = s.spawn(move || std::fs::File::open(p).and_then(|f| f.sync_all()));
                (p, job)
            })
            .collect();
        let mut result = Ok(());
        for (p, job) in running {
            let r = job
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("the fsync thread panicked")));
            if let (Ok(()), Err(e)) = (&result, r) {
                result = Err(LcaError::io(p, e));
            }
        }
        result
    })
}

/// Remove a directory and what it holds, one counted operation per entry, in the order
/// `first(name)` sorts them (`false` before `true`), then the directory itself, with an fsync
/// of the directory before the entries that sort last, so that they are removed only after
/// the others even across a power loss. A missing directory is not an error.
pub fn remove_dir_ordered(dir: &Path, last: &dyn Fn(&str) -> bool) -> Result<()> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(LcaError::io(dir, e)),
    };
    let mut entries = Vec::new();
    for e in rd {
        let e = e.map_err(|e| LcaError::io(dir, e))?;
        entries.push(e.file_name().to_string_lossy().to_string());
    }
    entries.sort_by_key(|n| (last(n), n.clone()));
    let mut synced = false;
    for name in entries {
        let p = dir.join(&name);
        if last(&name) && !synced {
            sync_dir(dir);
            synced = true;
        }
        if p.is_dir() && !p.is_symlink() {
            remove_dir_ordered(&p, &|_| false)?;
        } else {
            remove_file(&p)?;
        }
    }
    op("rmdir", dir);
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(LcaError::io(dir, e)),
        _ => {
            sync_dir(&parent_dir(dir));
            Ok(())
        }
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
    let tmp = dir.join(temp_name(&name));
    let result = write_synced(&tmp, bytes).and_then(|()| move_into_place(&tmp, path, mode));
    op("remove", &tmp);
    let _ = std::fs::remove_file(&tmp);
    if result.is_ok() {
        sync_dir(&dir);
    }
    result
}

/// The temporary name for a file named `name`: `.NAME.PID.partial`, with a long `NAME`
/// shortened to a prefix and a hash of the whole so that the temporary name stays within the
/// 255 bytes a file name may have (a legal final name must never fail on its temporary one).
pub fn temp_name(name: &str) -> String {
    const KEEP: usize = 120;
    let short = if name.len() > KEEP {
        use sha2::Digest;
        let h = sha2::Sha256::digest(name.as_bytes());
        let hex: String = h[..8].iter().map(|b| format!("{b:02x}")).collect();
        let mut cut = KEEP;
        while !name.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{}~{hex}", &name[..cut])
    } else {
        name.to_string()
    };
    format!(".{short}.{}.partial", std::process::id())
}

fn write_synced(tmp: &Path, bytes: &[u8]) -> Result<()> {
    op("write", tmp);
    let mut f = std::fs::File::create(tmp).map_err(|e| LcaError::io(tmp, e))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| LcaError::io(tmp, e))
}

fn move_into_place(tmp: &Path, path: &Path, mode: Mode) -> Result<()> {
    op("rename", path);
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

/// Open an input file for reading, refusing anything but a regular file (after following
/// symbolic links): a FIFO blocks, a device such as `/dev/zero` reads forever, a directory or
/// socket cannot be read as a file. Every input reader (spec, data sets, checkpoints, part
/// files) opens its file here, so that reads can then be bounded by the returned metadata's
/// real length.
pub fn open_regular(path: &Path) -> Result<(std::fs::File, std::fs::Metadata)> {
    // Look before opening: opening a FIFO for reading blocks until a writer appears.
    let meta = std::fs::metadata(path).map_err(|e| LcaError::io(path, e))?;
    if !meta.is_file() {
        return Err(not_regular(path, &meta));
    }
    let f = std::fs::File::open(path).map_err(|e| LcaError::io(path, e))?;
    let meta = f.metadata().map_err(|e| LcaError::io(path, e))?;
    if !meta.is_file() {
        return Err(not_regular(path, &meta));
    }
    Ok((f, meta))
}

/// Which file a path named when it was opened: a file replaced (renamed over) or rewritten in
/// place since has another identity, even at the same size (the change time cannot be set back
/// by a user).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity {
    pub len: u64,
    pub dev: u64,
    pub ino: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl FileIdentity {
    pub fn of(meta: &std::fs::Metadata) -> FileIdentity {
        use std::os::unix::fs::MetadataExt;
        FileIdentity {
            len: meta.len(),
            dev: meta.dev(),
            ino: meta.ino(),
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
            ctime_ns: meta.ctime() as i128 * 1_000_000_000 + meta.ctime_nsec() as i128,
        }
    }
}

/// The error for an input that is not a regular file, saying what it is.
fn not_regular(path: &Path, meta: &std::fs::Metadata) -> LcaError {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    let kind = if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    };
    LcaError::Io {
        path: path.to_path_buf(),
        error: std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("is {kind}, not a regular file: inputs must be regular files"),
        ),
    }
}

/// Read a whole input file, refusing non-regular files and files larger than `max` bytes
/// before anything is allocated; the read stops at the length the file had when opened (a
/// file that grows meanwhile is not followed), and stops early with an interruption when a
/// stop is requested.
pub fn read_regular(path: &Path, max: u64, what: &str) -> Result<Vec<u8>> {
    use std::io::Read;
    let (f, meta) = open_regular(path)?;
    let len = meta.len();
    if len > max {
        return Err(LcaError::Io {
            path: path.to_path_buf(),
            error: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("is {len} bytes, more than the {max} bytes allowed for {what}"),
            ),
        });
    }
    let mut out = Vec::with_capacity(len as usize);
    let mut r = f.take(len);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        if crate::interrupt::requested() {
            return Err(LcaError::Interrupted(crate::error::Interruption::Requested));
        }
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(LcaError::io(path, e)),
        };
        out.extend_from_slice(&buf[..n]);
    }
    Ok(out)
}

/// fsync a directory so that renames in it survive a power loss (best effort: not every
/// file system supports it).
pub fn sync_dir(dir: &Path) {
    op("fsync", dir);
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Concurrent fsyncs of written files succeed; a missing file is the error, by name.
    #[test]
    fn syncs_files_together_and_names_a_missing_one() {
        let dir = std::env::temp_dir().join(format!("lca-sync-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let files: Vec<PathBuf> = (0..4).map(|i| dir.join(format!("f{i}"))).collect();
        for f in &files {
            std::fs::write(f, b"data").unwrap();
        }
        sync_files(files.iter().map(PathBuf::as_path)).unwrap();
        sync_files(files[..1].iter().map(PathBuf::as_path)).unwrap();
        sync_files(std::iter::empty()).unwrap();
        let missing = dir.join("missing");
        let with_missing = [files[0].as_path(), missing.as_path(), files[1].as_path()];
        let e = sync_files(with_missing).unwrap_err().to_string();
        assert!(e.contains("missing"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

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
