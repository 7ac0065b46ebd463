//! The two facts the loader needs from the running kernel's BTF
//! (`/sys/kernel/btf/vmlinux`): a kfunc's type id, and where a field of a
//! kernel struct is. A small reader of the format
//! (Documentation/bpf/btf.rst) instead of aya's, whose type walk is not
//! public.

use std::collections::HashMap;

/// Where the kernel publishes its BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// A parsed BTF blob: every type's header and where its trailing data is.
pub struct KernelBtf {
    data: Vec<u8>,
    /// Start of the string section in `data`.
    strings: usize,
    /// By type id (id 0 is `void`, not stored): offset of the type's
    /// header in `data`.
    types: Vec<usize>,
    /// Named types, by name and kind.
    by_name: HashMap<(String, u32), u32>,
}

/// A field inside a struct: its bit offset from the struct's start and,
/// for a bitfield, its width in bits (0 for a whole member).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FieldPlace {
    pub bit_offset: u32,
    pub bitfield_bits: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("not a little-endian BTF blob (magic {0:#06x})")]
    Magic(u16),
    #[error("BTF truncated at byte {0}")]
    Truncated(usize),
    #[error("unknown BTF kind {kind} (type {id})")]
    UnknownKind { kind: u32, id: u32 },
}

impl KernelBtf {
    /// The running kernel's BTF.
    pub fn running() -> Result<Self, BtfError> {
        let data = std::fs::read(VMLINUX_BTF).map_err(|source| BtfError::Read {
            path: VMLINUX_BTF.into(),
            source,
        })?;
        Self::parse(data)
    }

    pub fn parse(data: Vec<u8>) -> Result<Self, BtfError> {
        let magic = u16::from_le_bytes(bytes_at(&data, 0)?);
        if magic != MAGIC {
            return Err(BtfError::Magic(magic));
        }
        let header_len = u32_at(&data, 4)? as usize;
        let type_off = header_len + u32_at(&data, 8)? as usize;
        let type_len = u32_at(&data, 12)? as usize;
        let strings = header_len + u32_at(&data, 16)? as usize;
        let mut btf = KernelBtf {
            data,
            strings,
            types: Vec::new(),
            by_name: HashMap::new(),
        };
        let end = type_off + type_len;
        let mut at = type_off;
        while at < end {
            let id = btf.types.len() as u32 + 1;
            let info = u32_at(&btf.data, at + 4)?;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let trailing = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
                KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
                2 | 7 | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_FUNC
                | 16 | KIND_TYPE_TAG => 0,
                _ => return Err(BtfError::UnknownKind { kind, id }),
            };
            let name = btf.string(u32_at(&btf.data, at)?);
            if !name.is_empty() {
                let name = name.to_owned();
                btf.by_name.entry((name, kind)).or_insert(id);
            }
            btf.types.push(at);
            at += 12 + trailing;
        }
        if at > btf.data.len() {
            return Err(BtfError::Truncated(at));
        }
        Ok(btf)
    }

    /// The type id of a function (a kfunc's is what a call instruction
    /// names).
    pub fn func_id(&self, name: &str) -> Option<u32> {
        self.by_name.get(&(name.to_owned(), KIND_FUNC)).copied()
    }

    /// Where `member` is in `struct name`, looking through anonymous
    /// structs and unions as C does.
    pub fn struct_field(&self, name: &str, member: &str) -> Option<FieldPlace> {
        let id = *self.by_name.get(&(name.to_owned(), KIND_STRUCT))?;
        self.find_member(id, member, 0, 0)
    }

    /// Anonymous members nest a few levels in real kernels; a malformed
    /// blob could loop.
    const MAX_NESTING: u32 = 16;

    fn find_member(&self, id: u32, member: &str, base_bits: u32, depth: u32) -> Option<FieldPlace> {
        if depth > Self::MAX_NESTING {
            return None;
        }
        let at = *self.types.get(id.checked_sub(1)? as usize)?;
        let info = u32_at(&self.data, at + 4).ok()?;
        let kind = (info >> 24) & 0x1f;
        if kind != KIND_STRUCT && kind != KIND_UNION {
            return None;
        }
        let bitfields = info >> 31 == 1;
        let vlen = (info & 0xffff) as usize;
        for i in 0..vlen {
            let m = at + 12 + 12 * i;
            let name = self.string(u32_at(&self.data, m).ok()?);
            let member_type = u32_at(&self.data, m + 4).ok()?;
            let offset = u32_at(&self.data, m + 8).ok()?;
            let (bit_offset, bitfield_bits) = if bitfields {
                (offset & 0x00ff_ffff, offset >> 24)
            } else {
                (offset, 0)
            };
            if name == member {
                return Some(FieldPlace {
                    bit_offset: base_bits + bit_offset,
                    bitfield_bits,
                });
            }
            if name.is_empty() {
                let inner = self.strip_modifiers(member_type);
                if let Some(found) =
                    self.find_member(inner, member, base_bits + bit_offset, depth + 1)
                {
                    return Some(found);
                }
            }
        }
        None
    }

    /// The type under typedefs and qualifiers.
    fn strip_modifiers(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            let Some(&at) = id.checked_sub(1).and_then(|i| self.types.get(i as usize)) else {
                return id;
            };
            let Ok(info) = u32_at(&self.data, at + 4) else {
                return id;
            };
            match (info >> 24) & 0x1f {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    match u32_at(&self.data, at + 8) {
                        Ok(next) => id = next,
                        Err(_) => return id,
                    }
                }
                _ => return id,
            }
        }
        id
    }

    fn string(&self, offset: u32) -> &str {
        let start = self.strings + offset as usize;
        let Some(rest) = self.data.get(start..) else {
            return "";
        };
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }
}

fn bytes_at<const N: usize>(data: &[u8], at: usize) -> Result<[u8; N], BtfError> {
    data.get(at..at + N)
        .and_then(|b| b.try_into().ok())
        .ok_or(BtfError::Truncated(at))
}

fn u32_at(data: &[u8], at: usize) -> Result<u32, BtfError> {
    bytes_at(data, at).map(u32::from_le_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-made blob: `struct outer { int a; union { struct { char :3;
    /// char b:2; }; int c; }; }` and `void f(void)`.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0outer\0a\0c\0b\0f\0".to_vec();
        let s = |name: &str| -> u32 {
            let needle = format!("\0{name}\0");
            strings
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .unwrap() as u32
                + 1
        };
        let mut types: Vec<u32> = Vec::new();
        // [1] int, 32 bits.
        types.extend([s("int"), KIND_INT << 24, 4, 32]);
        // [2] anonymous struct, bitfields, one member b at bit 3, 2 bits.
        types.extend([
            0,
            (1 << 31) | (KIND_STRUCT << 24) | 1,
            1,
            s("b"),
            1,
            (2 << 24) | 3,
        ]);
        // [3] anonymous union { [2]; int c; }.
        types.extend([0, (KIND_UNION << 24) | 2, 4, 0, 2, 0, s("c"), 1, 0]);
        // [4] struct outer { int a; [3] at bit 32 }.
        types.extend([
            s("outer"),
            (KIND_STRUCT << 24) | 2,
            8,
            s("a"),
            1,
            0,
            0,
            3,
            32,
        ]);
        // [5] func proto, [6] func f.
        types.extend([0, KIND_FUNC_PROTO << 24, 0]);
        types.extend([s("f"), KIND_FUNC << 24, 5]);
        let types: Vec<u8> = types.iter().flat_map(|w| w.to_le_bytes()).collect();
        let mut blob = Vec::new();
        blob.extend(MAGIC.to_le_bytes());
        blob.extend([1u8, 0]);
        for word in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            blob.extend(word.to_le_bytes());
        }
        blob.extend(types);
        blob.extend(strings);
        blob
    }

    #[test]
    fn fields_are_found_through_anonymous_members() {
        let btf = KernelBtf::parse(blob()).unwrap();
        assert_eq!(
            btf.struct_field("outer", "a"),
            Some(FieldPlace {
                bit_offset: 0,
                bitfield_bits: 0
            })
        );
        assert_eq!(
            btf.struct_field("outer", "b"),
            Some(FieldPlace {
                bit_offset: 35,
                bitfield_bits: 2
            })
        );
        assert_eq!(btf.struct_field("outer", "c").unwrap().bit_offset, 32);
        assert_eq!(btf.struct_field("outer", "missing"), None);
        assert_eq!(btf.func_id("f"), Some(6));
        assert_eq!(btf.func_id("outer"), None);
    }

    #[test]
    fn the_running_kernels_skb_checksum_state_is_found() {
        let Ok(btf) = KernelBtf::running() else {
            eprintln!("skipped: this kernel publishes no BTF ({VMLINUX_BTF})");
            return;
        };
        let field = btf.struct_field("sk_buff", "ip_summed").unwrap();
        assert_eq!(field.bitfield_bits, 2, "{field:?}");
        assert!(btf.func_id("bpf_cast_to_kern_ctx").is_some());
    }
}
