//! The two atomic operations the datapath needs on map values, on 8-byte
//! words: the BPF target has no `core::sync::atomic` read-modify-write
//! (its spec says no compare-and-swap, and no width below 64 bits), but
//! the kernel has had `BPF_ATOMIC` OR and `BPF_CMPXCHG` on map values
//! since 5.12, and LLVM emits them for these intrinsics.

use core::intrinsics::{self, AtomicOrdering};

/// `*word |= bits`, in one atomic instruction (`lock ... |=`): a plain
/// read-modify-write racing another CPU's could write back the word
/// without the bits the other just set.
///
/// # Safety
/// `word` points to an 8-byte aligned u64 valid for writes (in a map
/// value) for the duration of the call.
#[inline(always)]
pub unsafe fn or(word: *mut u64, bits: u64) {
    // SAFETY: as the caller promises.
    unsafe { intrinsics::atomic_or::<u64, u64, { AtomicOrdering::Relaxed }>(word, bits) };
}

/// Sets `*word` to `new` if it is still `expected`; true when it was.
///
/// # Safety
/// As for `or`.
#[inline(always)]
pub unsafe fn compare_exchange(word: *mut u64, expected: u64, new: u64) -> bool {
    // SAFETY: as the caller promises.
    unsafe {
        intrinsics::atomic_cxchg::<u64, { AtomicOrdering::Relaxed }, { AtomicOrdering::Relaxed }>(
            word, expected, new,
        )
    }
    .1
}
