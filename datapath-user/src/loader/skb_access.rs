//! The programs' direct reads of the kernel's `struct sk_buff`
//! (`datapath_common::skb_checksum`): the kfunc they call and where the
//! field they read is, both from the running kernel's BTF, patched into
//! the object before it loads.

use datapath_common::skb_checksum::{
    CAST_TO_KERN_CTX, CAST_TO_KERN_CTX_PLACEHOLDER, SkbChecksumField,
};

use crate::kernel_btf::KernelBtf;

/// `BPF_JMP | BPF_CALL`.
const CALL: u8 = 0x85;
/// `src_reg = BPF_PSEUDO_KFUNC_CALL` (2), `dst_reg = 0`.
const KFUNC_REGS: u8 = 0x20;
/// `r0 = 0` (`BPF_ALU64 | BPF_MOV | BPF_K`): what a kfunc call becomes
/// when the kernel lacks it; the code behind it is then dead (the global
/// says "unknown") and never verified.
const MOV_R0_ZERO: [u8; 8] = [0xb7, 0, 0, 0, 0, 0, 0, 0];

/// What this kernel allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkbAccess {
    /// BTF id of `bpf_cast_to_kern_ctx` (Linux 6.2).
    pub kfunc_id: Option<u32>,
    /// Where `ip_summed` is, or unknown.
    pub checksum_field: SkbChecksumField,
    /// Why the programs fall back to the checksum helpers, if they do.
    pub fallback_reason: Option<String>,
}

impl SkbAccess {
    /// Reads the running kernel's BTF.
    pub fn probe() -> Self {
        match KernelBtf::running() {
            Ok(btf) => Self::from_btf(&btf),
            Err(e) => Self::helpers_only(format!("no kernel BTF: {e}")),
        }
    }

    pub fn from_btf(btf: &KernelBtf) -> Self {
        let Some(kfunc_id) = btf.func_id(CAST_TO_KERN_CTX) else {
            return Self::helpers_only(format!("the kernel has no {CAST_TO_KERN_CTX} (Linux 6.2)"));
        };
        let Some(place) = btf.struct_field("sk_buff", "ip_summed") else {
            return Self::helpers_only(
                "struct sk_buff has no ip_summed in the kernel's BTF".into(),
            );
        };
        let shift = place.bit_offset % 8;
        if place.bitfield_bits != 2 || shift + 2 > 8 {
            return Self::helpers_only(format!(
                "sk_buff.ip_summed is not a 2-bit field inside one byte ({place:?})"
            ));
        }
        Self {
            kfunc_id: Some(kfunc_id),
            checksum_field: SkbChecksumField {
                byte: place.bit_offset / 8,
                shift,
            },
            fallback_reason: None,
        }
    }

    /// Helper calls only, for `reason`.
    pub fn helpers_only(reason: String) -> Self {
        Self {
            kfunc_id: None,
            checksum_field: SkbChecksumField::UNKNOWN,
            fallback_reason: Some(reason),
        }
    }
}

/// An object whose kfunc calls name this kernel's BTF id (or are removed),
/// 8-byte aligned as the ELF reader wants.
pub struct PatchedObject {
    words: Vec<u64>,
    len: usize,
}

impl PatchedObject {
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: a u64 buffer viewed as its first `len` bytes.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast(), self.len) }
    }
}

/// Puts `kfunc_id` into every placeholder kfunc call in the code sections
/// of `object` (instructions are 8 bytes from each section's start), or
/// turns the calls into `r0 = 0` when there is none. Returns the object
/// and how many calls it patched; an object that is not ELF is returned
/// as it is (the loader then names the parse error).
pub fn patch_kfunc_calls(object: &[u8], kfunc_id: Option<u32>) -> (PatchedObject, usize) {
    let code_ranges = code_sections(object);
    let mut words = vec![0u64; object.len().div_ceil(8)];
    // SAFETY: the buffer holds at least object.len() bytes.
    let bytes =
        unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), object.len()) };
    bytes.copy_from_slice(object);
    let mut patched = 0;
    for range in code_ranges {
        let Some(code) = bytes.get_mut(range) else {
            continue;
        };
        patched += patch_instructions(code, kfunc_id);
    }
    let len = object.len();
    (PatchedObject { words, len }, patched)
}

/// The file ranges of `object`'s executable sections.
fn code_sections(object: &[u8]) -> Vec<std::ops::Range<usize>> {
    use object::{Object, ObjectSection, SectionKind};
    let Ok(file) = object::File::parse(object) else {
        return Vec::new();
    };
    file.sections()
        .filter(|section| section.kind() == SectionKind::Text)
        .filter_map(|section| section.file_range())
        .map(|(start, len)| start as usize..(start + len) as usize)
        .collect()
}

/// Patches the placeholder calls among `code`'s instructions.
fn patch_instructions(code: &mut [u8], kfunc_id: Option<u32>) -> usize {
    let placeholder = CAST_TO_KERN_CTX_PLACEHOLDER.to_le_bytes();
    let mut patched = 0;
    for insn in code.chunks_exact_mut(8) {
        if insn[0] != CALL
            || insn[1] != KFUNC_REGS
            || insn[2..4] != [0, 0]
            || insn[4..] != placeholder
        {
            continue;
        }
        match kfunc_id {
            Some(id) => insn[4..].copy_from_slice(&id.to_le_bytes()),
            None => insn.copy_from_slice(&MOV_R0_ZERO),
        }
        patched += 1;
    }
    patched
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(imm: i32) -> [u8; 8] {
        let mut insn = [CALL, KFUNC_REGS, 0, 0, 0, 0, 0, 0];
        insn[4..].copy_from_slice(&imm.to_le_bytes());
        insn
    }

    #[test]
    fn placeholder_calls_get_the_kernels_id_and_nothing_else_changes() {
        let mut code = Vec::new();
        code.extend(call(CAST_TO_KERN_CTX_PLACEHOLDER));
        code.extend(call(7)); // another kfunc call: not ours
        code.extend([0u8; 3]);
        code.extend(call(CAST_TO_KERN_CTX_PLACEHOLDER)); // unaligned: data
        code.extend([0u8; 5]);
        code.extend(call(CAST_TO_KERN_CTX_PLACEHOLDER));
        let original = code.clone();
        assert_eq!(patch_instructions(&mut code, Some(63462)), 2);
        assert_eq!(code[..8], call(63462));
        assert_eq!(code[8..32], original[8..32]);
        assert_eq!(code[32..], call(63462));

        let mut code = original.clone();
        assert_eq!(patch_instructions(&mut code, None), 2);
        assert_eq!(code[..8], MOV_R0_ZERO);
    }

    #[test]
    fn the_embedded_object_calls_the_kfunc() {
        let Some(object) = crate::object::bytes() else {
            panic!("built without the eBPF object");
        };
        let (patched, count) = patch_kfunc_calls(object, Some(1));
        assert!(count > 0, "no placeholder kfunc call in the object's code");
        assert_eq!((patched.bytes().as_ptr() as usize) % 8, 0);
        assert_eq!(patched.bytes().len(), object.len());
        // Only the calls changed.
        let changed = object
            .iter()
            .zip(patched.bytes())
            .filter(|(a, b)| a != b)
            .count();
        assert!(
            changed <= 4 * count,
            "{changed} bytes changed for {count} calls"
        );
    }
}
