//! The one field of the kernel's `struct sk_buff` that `__sk_buff` does
//! not show: `ip_summed`, the checksum state
//! (`datapath_common::skb_checksum`).

use core::arch::asm;

use aya_ebpf::programs::TcContext;
use datapath_common::skb_checksum::{
    CAST_TO_KERN_CTX_PLACEHOLDER, ChecksumState, SkbChecksumField,
};

/// Where `ip_summed` is; the loader overwrites this read-only global
/// (`SKB_CHECKSUM_GLOBAL`) from the kernel's BTF. The verifier sees the
/// value, so with the default (unknown) the kfunc path is never verified
/// or run.
#[unsafe(no_mangle)]
static SKB_CHECKSUM: SkbChecksumField = SkbChecksumField::UNKNOWN;

/// The skb's checksum state, or `None` when the loader did not find the
/// field (then the caller uses the helpers).
#[inline(always)]
pub fn checksum_state(ctx: &TcContext) -> Option<ChecksumState> {
    // SAFETY: a read of our own static. Volatile, so that the compiler
    // reads the value the loader set instead of folding in the default.
    let field = unsafe { core::ptr::read_volatile(&SKB_CHECKSUM) };
    if field.byte == 0 {
        return None;
    }
    // SAFETY: the kfunc returns the context as the kernel's own
    // `struct sk_buff`, which the verifier lets us read at a constant
    // offset (the field's byte, known to it from the read-only global).
    let byte = unsafe {
        let skb = cast_to_kern_ctx(ctx.skb.skb.cast());
        core::ptr::read_volatile(skb.add(field.byte as usize))
    };
    Some(field.state_of(byte))
}

/// `bpf_cast_to_kern_ctx(ctx)`: the program's context as the kernel's
/// `struct sk_buff *`. The verifier replaces the call with a register
/// move. Written as the raw instruction (`BPF_JMP | BPF_CALL`,
/// `src_reg = BPF_PSEUDO_KFUNC_CALL`) because our toolchain cannot yet
/// declare kfuncs; the loader puts the kfunc's BTF id into its immediate.
#[inline(always)]
unsafe fn cast_to_kern_ctx(ctx: *mut u8) -> *const u8 {
    let skb: *const u8;
    // SAFETY: a kfunc call per the BPF calling convention: argument in r1,
    // result in r0, r1–r5 clobbered.
    unsafe {
        asm!(
            ".byte 0x85, 0x20, 0x00, 0x00",
            ".4byte {placeholder}",
            placeholder = const CAST_TO_KERN_CTX_PLACEHOLDER,
            inlateout("r1") ctx => _,
            lateout("r0") skb,
            lateout("r2") _,
            lateout("r3") _,
            lateout("r4") _,
            lateout("r5") _,
            options(nostack, readonly, preserves_flags),
        );
    }
    skb
}
