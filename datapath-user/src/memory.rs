//! The agent's memory: its allocator's settings and giving freed memory
//! back to the kernel.
//!
//! The `underpass` binary allocates with jemalloc (its global allocator is
//! set in `main.rs`): the initial list of a large cluster leaves the
//! long-lived views interleaved with the parser's freed garbage, which
//! glibc's allocator could not return (126 MiB RSS for 83 MiB in use at
//! 50k services × 10 endpoints; jemalloc 95 MiB) and musl's (the
//! DaemonSet image) returns worse.

/// jemalloc's settings, read at its first allocation (`malloc_conf`):
/// a background thread returns pages freed by a burst of changes (a
/// rollout) within about a second of going idle, instead of on the next
/// allocation; threads cache objects up to 1 KiB only (the default 32 KiB
/// kept ~1.1 MiB in caches at 50,000 services; start to ready stayed
/// within run-to-run noise, 3.04–3.17 s against 3.04–3.05). (No `abort_conf`: the binary is also the CNI plugin, and a
/// misspelt `_RJEM_MALLOC_CONF` in its environment must not stop pods
/// from starting; a unit test reads the options back instead.)
pub const JEMALLOC_CONF: &std::ffi::CStr =
    c"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0,tcache_max:1024";

/// `JEMALLOC_CONF` as jemalloc reads it: a `const char *` named
/// `malloc_conf` (prefixed `_rjem_` by tikv-jemalloc-sys), which the
/// binary exports.
#[repr(transparent)]
pub struct JemallocConf(pub *const std::ffi::c_char);

// SAFETY: it points at a constant string.
unsafe impl Sync for JemallocConf {}

/// Gives the memory freed so far back to the kernel now (after the first
/// full sync, the initial list and parsed manifests): both allocators the
/// agent may run on, so that tests and benches linking the library with
/// the system allocator behave as the binary does.
pub fn release_free_memory() {
    // SAFETY: "arena.<MALLCTL_ARENAS_ALL>.purge" takes no input or
    // output; it only returns unused dirty pages of every arena.
    unsafe {
        tikv_jemalloc_sys::mallctl(
            c"arena.4096.purge".as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        );
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap pages.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A number-valued jemalloc option as the running allocator has it (None
/// when jemalloc has no such option).
pub fn jemalloc_option(name: &str) -> Option<i64> {
    let name = std::ffi::CString::new(format!("opt.{name}")).ok()?;
    let mut value: isize = 0;
    let mut len = std::mem::size_of::<isize>();
    // SAFETY: `value` is an ssize_t-sized buffer and `len` says so; the
    // options read here (decay times) are ssize_t.
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr(),
            (&raw mut value).cast(),
            &raw mut len,
            std::ptr::null_mut(),
            0,
        )
    };
    (rc == 0).then_some(value as i64)
}
