//! `SLOTS` mapped into the agent's memory (the array is made with
//! `BPF_F_MMAPABLE`): a slot is written by one aligned 4-byte store, which
//! a program reading it sees whole, old or new. A first sync of 100,000
//! services writes a million slots this way in milliseconds, where the
//! same number of hash-map entries took 0.7 s of syscalls.

use std::{
    io,
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::maps::{Array, MapData};
use datapath_common::maps::{BackendId, Slot};

pub struct SlotArray {
    base: NonNull<Slot>,
    len: u32,
    mapped_bytes: usize,
    /// Keeps the map (and so the mapping's object) open.
    _map: Array<MapData, Slot>,
}

// SAFETY: the mapping is plain shared memory owned by this value; every
// access goes through atomics.
unsafe impl Send for SlotArray {}
// SAFETY: as above.
unsafe impl Sync for SlotArray {}

impl std::fmt::Debug for SlotArray {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotArray").field("len", &self.len).finish()
    }
}

impl SlotArray {
    /// Maps `map` (an array made with `BPF_F_MMAPABLE`) read-write.
    pub fn map(map: Array<MapData, Slot>) -> io::Result<Self> {
        let len = map.len();
        let page = page_size();
        let bytes = (len as usize * size_of::<Slot>()).div_ceil(page).max(1) * page;
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
        })
    }

    pub fn len(&self) -> u32 {
        self.len
    }

    fn backend_id_at(&self, index: u32) -> Option<&AtomicU32> {
        (index < self.len).then(|| {
            // SAFETY: in bounds of the mapping (page-aligned, 8-byte
            // stride: `Slot` is align(8) with `backend_id` first), so the
            // cell is an aligned u32 that only atomics touch on this side.
            unsafe { AtomicU32::from_ptr(self.base.as_ptr().add(index as usize).cast()) }
        })
    }

    /// The backend id at `index` (0: none, or beyond the array).
    pub fn get(&self, index: u32) -> BackendId {
        self.backend_id_at(index)
            .map_or(0, |cell| cell.load(Ordering::Acquire))
    }

    /// Writes `ids` from `index` on; false (nothing written) when they
    /// would not fit. Release stores: whatever the caller writes after
    /// (the frontend's entry) is ordered after them.
    pub fn write(&self, index: u32, ids: impl ExactSizeIterator<Item = BackendId>) -> bool {
        let fits = u64::from(index) + ids.len() as u64 <= u64::from(self.len);
        if fits {
            for (i, id) in ids.enumerate() {
                if let Some(cell) = self.backend_id_at(index + i as u32) {
                    cell.store(id, Ordering::Release);
                }
            }
        }
        fits
    }
}

impl Drop for SlotArray {
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
