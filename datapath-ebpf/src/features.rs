//! Which optional kernel features the loader found
//! (`datapath_common::features`).

/// Feature bits; the loader overwrites this read-only global
/// (`datapath_common::features::FEATURES_GLOBAL`). The verifier sees the
/// value, so code behind a clear bit is never verified or run.
#[unsafe(no_mangle)]
static FEATURES: u32 = 0;

/// True when the kernel has feature `bit`.
#[inline(always)]
pub fn has(bit: u32) -> bool {
    // SAFETY: a read of our own static. Volatile, so that the compiler
    // reads the value the loader set instead of folding in the default.
    unsafe { core::ptr::read_volatile(&FEATURES) & bit != 0 }
}
