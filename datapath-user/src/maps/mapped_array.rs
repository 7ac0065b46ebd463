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

use std::{
    io,
    marker::PhantomData,
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use aya::maps::{Array, MapData};

pub struct MappedArray<T: aya::Pod> {
    base: NonNull<u64>,
    len: u32,
    mapped_bytes: usize,
    /// Keeps the map (and so the mapping's object) open.
    _map: Array<MapData, T>,
    _values: PhantomData<T>,
}

// SAFETY: the mapping is plain shared memory owned by this value; every
// access goes through atomics.
unsafe impl<T: aya::Pod> Send for MappedArray<T> {}
// SAFETY: as above.
unsafe impl<T: aya::Pod> Sync for MappedArray<T> {}

impl<T: aya::Pod> std::fmt::Debug for MappedArray<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedArray")
            .field("len", &self.len)
            .finish()
    }
}

impl<T: aya::Pod> MappedArray<T> {
    const EIGHT_BYTES: () = assert!(size_of::<T>() == 8 && align_of::<T>() <= 8);

    /// Maps `map` (an array of 8-byte values made with `BPF_F_MMAPABLE`)
    /// read-write.
    pub fn map(map: Array<MapData, T>) -> io::Result<Self> {
        let () = Self::EIGHT_BYTES;
        let len = map.len();
        let page = page_size();
        let bytes = (len as usize * 8).div_ceil(page).max(1) * page;
        let fd = aya::maps::IterableMap::map(&map).fd().as_fd().as_raw_fd();
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
        Ok(Self {
            base: NonNull::new(base.cast()).ok_or_else(|| io::Error::other("mmap gave null"))?,
            len,
            mapped_bytes: bytes,
            _map: map,
            _values: PhantomData,
        })
    }

    pub fn len(&self) -> u32 {
        self.len
    }

    fn cell(&self, index: u32) -> Option<&AtomicU64> {
        (index < self.len).then(|| {
            // SAFETY: in bounds of the mapping, which is page-aligned with
            // an 8-byte stride: an aligned u64 only atomics touch here.
            unsafe { AtomicU64::from_ptr(self.base.as_ptr().add(index as usize)) }
        })
    }

    /// The value at `index` (`None` beyond the array).
    pub fn get(&self, index: u32) -> Option<T> {
        let bits = self.cell(index)?.load(Ordering::Acquire);
        // SAFETY: T is Pod and 8 bytes.
        Some(unsafe { std::mem::transmute_copy(&bits) })
    }

    /// Writes `value` at `index`; false beyond the array.
    pub fn set(&self, index: u32, value: T) -> bool {
        self.write(index, std::iter::once(value))
    }

    /// Writes `values` from `index` on; false (nothing written) when they
    /// would not fit. Release stores: whatever the caller writes after
    /// (an entry naming them) is ordered after them.
    pub fn write(&self, index: u32, values: impl ExactSizeIterator<Item = T>) -> bool {
        let fits = u64::from(index) + values.len() as u64 <= u64::from(self.len);
        if fits {
            for (i, value) in values.enumerate() {
                // SAFETY: T is Pod and 8 bytes.
                let bits: u64 = unsafe { std::mem::transmute_copy(&value) };
                if let Some(cell) = self.cell(index + i as u32) {
                    cell.store(bits, Ordering::Release);
                }
            }
        }
        fits
    }

    /// Every value, in index order.
    pub fn read_all(&self) -> Vec<T> {
        (0..self.len).filter_map(|i| self.get(i)).collect()
    }
}

impl<T: aya::Pod> Drop for MappedArray<T> {
    fn drop(&mut self) {
        // SAFETY: the mapping this value made, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.mapped_bytes) };
    }
}

fn page_size() -> usize {
    // SAFETY: plain libc call.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096)
}
