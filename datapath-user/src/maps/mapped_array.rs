//! An array map made with `BPF_F_MMAPABLE`, mapped into the agent's
//! memory: an entry is written by one aligned 8-byte store, which a
//! program reading it sees whole, old or new. A first sync of 100,000
//! services writes a million slots and a million backends this way in
//! milliseconds, where the syscalls' element copies took 0.3 s per
//! million (a hash map's inserts 0.7 s).
//!
//! Only 8-byte values: the kernel lays an array's values out at
//! `round_up(value_size, 8)` from a page-aligned start, so each is an
//! aligned u64.
//!
//! Mapped at the first access, not when opened: the kernel maps the whole
//! array at once, and every mapping counts in the process's resident set
//! (10 MiB at 50,000 services), so handles that never touch the array (the
//! attach loop's, the UDP terminator's) must not map it.

use std::{
    io,
    marker::PhantomData,
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    },
};

use aya::maps::{Array, MapData, MapError};

pub struct MappedArray<T: aya::Pod> {
    len: u32,
    /// Made at the first access.
    mapping: OnceLock<Mapping>,
    /// Keeps the map (and so the mapping's object) open.
    map: Array<MapData, T>,
    _values: PhantomData<T>,
}

/// The array's values, mapped shared into this process.
struct Mapping {
    base: NonNull<u64>,
    bytes: usize,
}

// SAFETY: the mapping is plain shared memory owned by its MappedArray;
// every access goes through atomics.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping `map_values` made, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}

impl<T: aya::Pod> std::fmt::Debug for MappedArray<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedArray")
            .field("len", &self.len)
            .finish()
    }
}

impl<T: aya::Pod> MappedArray<T> {
    const EIGHT_BYTES: () = assert!(size_of::<T>() == 8 && align_of::<T>() <= 8);

    /// Takes `map` (an array of 8-byte values made with `BPF_F_MMAPABLE`);
    /// its values are mapped read-write at the first access.
    pub fn new(map: Array<MapData, T>) -> Self {
        let () = Self::EIGHT_BYTES;
        Self {
            len: map.len(),
            mapping: OnceLock::new(),
            map,
            _values: PhantomData,
        }
    }

    pub fn len(&self) -> u32 {
        self.len
    }

    fn mapping(&self) -> Result<&Mapping, MapError> {
        if let Some(mapping) = self.mapping.get() {
            return Ok(mapping);
        }
        let mapping = self.map_values().map_err(|io_error| {
            MapError::SyscallError(aya::sys::SyscallError {
                call: "mmap",
                io_error,
            })
        })?;
        // Another thread may have mapped it meanwhile: either mapping is
        // the same memory, and the loser is unmapped when dropped here.
        Ok(self.mapping.get_or_init(|| mapping))
    }

    fn map_values(&self) -> io::Result<Mapping> {
        let page = page_size();
        let bytes = (self.len as usize * 8).div_ceil(page).max(1) * page;
        let fd = aya::maps::IterableMap::map(&self.map)
            .fd()
            .as_fd()
            .as_raw_fd();
        // SAFETY: a fresh shared mapping of the map's whole value area;
        // the kernel checks the size and the map's flags.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(base.cast()).ok_or_else(|| io::Error::other("mmap gave null"))?;
        Ok(Mapping { base, bytes })
    }

    /// Maps the values now, if not yet: an error the first access would
    /// meet, met where the caller can report it.
    pub fn ensure_mapped(&self) -> Result<(), MapError> {
        self.mapping().map(|_| ())
    }

    fn cell<'a>(&self, mapping: &'a Mapping, index: u32) -> Option<&'a AtomicU64> {
        (index < self.len).then(|| {
            // SAFETY: in bounds of the mapping, which is page-aligned with
            // an 8-byte stride: an aligned u64 only atomics touch here.
            unsafe { AtomicU64::from_ptr(mapping.base.as_ptr().add(index as usize)) }
        })
    }

    /// The value at `index` (`None` beyond the array).
    pub fn get(&self, index: u32) -> Result<Option<T>, MapError> {
        let mapping = self.mapping()?;
        Ok(self.cell(mapping, index).map(|cell| {
            let bits = cell.load(Ordering::Acquire);
            // SAFETY: T is Pod and 8 bytes.
            unsafe { std::mem::transmute_copy(&bits) }
        }))
    }

    /// Writes `value` at `index`; false beyond the array.
    pub fn set(&self, index: u32, value: T) -> Result<bool, MapError> {
        self.write(index, std::iter::once(value))
    }

    /// Writes `values` from `index` on; false (nothing written) when they
    /// would not fit. Release stores: whatever the caller writes after
    /// (an entry naming them) is ordered after them.
    pub fn write(
        &self,
        index: u32,
        values: impl ExactSizeIterator<Item = T>,
    ) -> Result<bool, MapError> {
        let mapping = self.mapping()?;
        let fits = u64::from(index) + values.len() as u64 <= u64::from(self.len);
        if fits {
            for (i, value) in values.enumerate() {
                // SAFETY: T is Pod and 8 bytes.
                let bits: u64 = unsafe { std::mem::transmute_copy(&value) };
                if let Some(cell) = self.cell(mapping, index + i as u32) {
                    cell.store(bits, Ordering::Release);
                }
            }
        }
        Ok(fits)
    }

    /// Every value, in index order.
    pub fn read_all(&self) -> Result<Vec<T>, MapError> {
        let mapping = self.mapping()?;
        Ok((0..self.len)
            .filter_map(|i| self.cell(mapping, i))
            .map(|cell| {
                let bits = cell.load(Ordering::Acquire);
                // SAFETY: T is Pod and 8 bytes.
                unsafe { std::mem::transmute_copy(&bits) }
            })
            .collect())
    }
}

fn page_size() -> usize {
    // SAFETY: plain libc call.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096)
}
