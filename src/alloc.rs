//! Allocator settings for the evaluator's access pattern.
//!
//! Every chunk allocates activations and gradients of a few MB and frees them at its end.
//! With glibc's defaults, blocks of that size are mapped afresh from the kernel and unmapped
//! when freed, so the next chunk page-faults the same amount back in (thousands of faults per
//! evaluation, ~10 % of the run time on MNIST-FC). [`tune`] keeps such blocks in the heap for
//! reuse instead. Peak memory does not grow: only memory that was already in use is kept.
//!
//! The evaluator's worker threads allocate too, and glibc gives each thread its own arena:
//! a secondary arena's heap holding only a freed block of a few MB is unmapped whatever the
//! trim threshold, so each chunk of LeNet's per-step run mapped such a heap afresh and faulted
//! it back in (~520,000 page faults and 0.8 s of system time in a 9 s run). [`tune`] keeps one
//! arena (the main heap) for every thread: a few dozen allocations per chunk do not contend.

/// Serve blocks up to 32 MiB from the heap, keep up to 256 MiB of freed heap memory and use
/// one arena for all threads (glibc on Linux; elsewhere nothing to do).
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before any other
    // thread exists (at the start of main), and an unsupported value is refused, not UB.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}
