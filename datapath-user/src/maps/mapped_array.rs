//! An array map made with `BPF_F_MMAPABLE`, mapped into the agent's
//! memory: an 8-byte entry is written by one aligned store, which a
//! program reading it sees whole, old or new. A first sync of 100,000
//! services writes a million slots and a million backends this way in
//! milliseconds, where the syscalls' element copies took 0.3 s per
//! million (a hash map's inserts 0.7 s).
//!
//! Values of 8 bytes, or of 16 or 32 (an IPv6 address): the kernel lays
//! an array's values out at `round_up(value_size, 8)` from a page-aligned
//! start, so each is one or more aligned u64 words, and a power-of-two
//! size keeps every window's start on a page. A value of several words is
//! stored word by word, which a program could see half written: such
//! arrays hold only values no program reads while they change (an IPv6
//! backend's address is written before the one-word `BACKENDS` entry that
//! publishes it, and rewritten only after a grace period).
//!
//! Mapped in windows of 64 KiB, each at its first access, and unmapped
//! together (`unmap`) when a pass of the reconciler is over: the kernel
//! maps a window whole, and every mapped page counts in the process's
//! resident set though the memory is the map's, which exists whether
//! mapped or not (10 MiB at 50,000 services, held for nothing between
//! changes). A change maps the one or two windows it touches; handles that
//! never touch the array (the attach loop's, the UDP terminator's) map
//! nothing.

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

/// Most words a value may take (32 bytes).
const MAX_WORDS: usize = 4;

/// Bytes of one window (or a page, if larger): a change maps 16 pages of
/// each array; a first sync of 100,000 services maps ~200 windows.
const WINDOW_BYTES: usize = 64 * 1024;

pub struct MappedArray<T: aya::Pod> {
    len: u32,
    /// Entries per window (a whole number of pages).
    window_entries: u32,
    /// Window `w` holds entries `w * window_entries ..`; each is mapped at
    /// its first access.
    windows: Box<[OnceLock<Mapping>]>,
    /// Keeps the map (and so the mappings' object) open.
    map: Array<MapData, T>,
    _values: PhantomData<T>,
}

/// Some of the array's values, mapped shared into this process.
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
        // SAFETY: the mapping `map_window` made, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}

impl<T: aya::Pod> std::fmt::Debug for MappedArray<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedArray")
            .field("len", &self.len)
            .field("windows_mapped", &self.windows_mapped())
            .finish()
    }
}

impl<T: aya::Pod> MappedArray<T> {
    const WHOLE_WORDS: () = assert!(
        size_of::<T>().is_power_of_two()
            && size_of::<T>() >= 8
            && size_of::<T>() <= 8 * MAX_WORDS
            && align_of::<T>() <= 8
    );
    /// Words per value.
    const WORDS: usize = size_of::<T>() / 8;

    /// Takes `map` (an array of 8-byte values made with `BPF_F_MMAPABLE`);
    /// its values are mapped read-write, a window at a time, when used.
    pub fn new(map: Array<MapData, T>) -> Self {
        let () = Self::WHOLE_WORDS;
        let window_bytes = WINDOW_BYTES.max(page_size());
        let window_entries = u32::try_from(window_bytes / size_of::<T>()).unwrap_or(u32::MAX);
        let len = map.len();
        let windows = (0..len.div_ceil(window_entries))
            .map(|_| OnceLock::new())
            .collect();
        Self {
            len,
            window_entries,
            windows,
            map,
            _values: PhantomData,
        }
    }

    pub fn len(&self) -> u32 {
        self.len
    }

    /// How many windows are mapped now.
    pub fn windows_mapped(&self) -> usize {
        self.windows.iter().filter(|w| w.get().is_some()).count()
    }

    /// Unmaps every window (the next access maps its window again): the
    /// map keeps its values.
    pub fn unmap(&mut self) {
        for window in &mut self.windows {
            window.take();
        }
    }

    fn window(&self, window: usize) -> Result<&Mapping, MapError> {
        let cell = &self.windows[window];
        if let Some(mapping) = cell.get() {
            return Ok(mapping);
        }
        let mapping = self.map_window(window).map_err(|io_error| {
            MapError::SyscallError(aya::sys::SyscallError {
                call: "mmap",
                io_error,
            })
        })?;
        // Another thread may have mapped it meanwhile: either mapping is
        // the same memory, and the loser is unmapped when dropped here.
        Ok(cell.get_or_init(|| mapping))
    }

    fn map_window(&self, window: usize) -> io::Result<Mapping> {
        let page = page_size();
        let first = window as u64 * u64::from(self.window_entries);
        let entries = (u64::from(self.len) - first).min(u64::from(self.window_entries));
        let bytes = (entries as usize * size_of::<T>()).div_ceil(page).max(1) * page;
        let offset =
            libc::off_t::try_from(first * size_of::<T>() as u64).map_err(io::Error::other)?;
        let fd = aya::maps::IterableMap::map(&self.map)
            .fd()
            .as_fd()
            .as_raw_fd();
        // SAFETY: a fresh shared mapping of whole pages of the map's value
        // area at a page-aligned offset; the kernel checks the range and
        // the map's flags.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                offset,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(base.cast()).ok_or_else(|| io::Error::other("mmap gave null"))?;
        Ok(Mapping { base, bytes })
    }

    /// Maps every window of entries `first..first + count` (clamped to
    /// the array) now: a write maps before it stores, so that a mapping
    /// failure writes nothing; a batch of writes maps all its windows
    /// first for the same reason.
    pub fn map_range(&self, first: u32, count: u64) -> Result<(), MapError> {
        let end = (u64::from(first) + count).min(u64::from(self.len));
        if end <= u64::from(first) {
            return Ok(());
        }
        let first_window = first / self.window_entries;
        let last_window = ((end - 1) / u64::from(self.window_entries)) as u32;
        for window in first_window..=last_window {
            self.window(window as usize)?;
        }
        Ok(())
    }

    /// Entry `index`'s words, mapping its window if need be (`None`
    /// beyond the array).
    fn words(&self, index: u32) -> Result<Option<&[AtomicU64]>, MapError> {
        if index >= self.len {
            return Ok(None);
        }
        let mapping = self.window((index / self.window_entries) as usize)?;
        let within = (index % self.window_entries) as usize * Self::WORDS;
        // SAFETY: in bounds of the window's mapping, which is page-aligned
        // with a stride of whole words: aligned u64s only atomics touch
        // here. AtomicU64 has u64's layout.
        Ok(Some(unsafe {
            std::slice::from_raw_parts(
                AtomicU64::from_ptr(mapping.base.as_ptr().add(within)),
                Self::WORDS,
            )
        }))
    }

    /// The value `words` hold.
    fn load(words: &[AtomicU64]) -> T {
        let mut bits = [0u64; MAX_WORDS];
        for (bits, word) in bits.iter_mut().zip(words) {
            *bits = word.load(Ordering::Acquire);
        }
        // SAFETY: T is Pod, at most MAX_WORDS words, aligned to at most 8
        // (as `bits` is).
        unsafe { std::ptr::read(bits.as_ptr().cast::<T>()) }
    }

    /// Stores `value` into `words`, first word first.
    fn store(words: &[AtomicU64], value: &T) {
        let mut bits = [0u64; MAX_WORDS];
        // SAFETY: T is Pod (every byte initialised) and fits `bits`.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (value as *const T).cast::<u8>(),
                bits.as_mut_ptr().cast::<u8>(),
                size_of::<T>(),
            );
        }
        for (word, bits) in words.iter().zip(bits) {
            word.store(bits, Ordering::Release);
        }
    }

    /// The value at `index` (`None` beyond the array).
    pub fn get(&self, index: u32) -> Result<Option<T>, MapError> {
        Ok(self.words(index)?.map(Self::load))
    }

    /// Writes `value` at `index`; false beyond the array.
    pub fn set(&self, index: u32, value: T) -> Result<bool, MapError> {
        self.write(index, std::iter::once(value))
    }

    /// Writes `values` from `index` on; false (nothing written) when they
    /// would not fit, an error (nothing written) when a window they fall
    /// in cannot be mapped. Release stores: whatever the caller writes
    /// after (an entry naming them) is ordered after them.
    pub fn write(
        &self,
        index: u32,
        values: impl ExactSizeIterator<Item = T>,
    ) -> Result<bool, MapError> {
        let count = values.len() as u64;
        if u64::from(index) + count > u64::from(self.len) {
            return Ok(false);
        }
        self.map_range(index, count)?;
        for (i, value) in values.enumerate() {
            if let Some(words) = self.words(index + i as u32)? {
                Self::store(words, &value);
            }
        }
        Ok(true)
    }

    /// Every value, in index order.
    pub fn read_all(&self) -> Result<Vec<T>, MapError> {
        self.map_range(0, u64::from(self.len))?;
        let mut values = Vec::with_capacity(self.len as usize);
        for index in 0..self.len {
            if let Some(words) = self.words(index)? {
                values.push(Self::load(words));
            }
        }
        Ok(values)
    }
}

fn page_size() -> usize {
    // SAFETY: plain libc call.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use std::os::fd::{FromRawFd, OwnedFd};

    use aya::maps::{Map, MapData};

    use super::*;

    /// A fresh `BPF_F_MMAPABLE` array of `len` values of `value_size`.
    fn mmapable_array(value_size: u32, len: u32) -> OwnedFd {
        #[repr(C)]
        struct Attr {
            map_type: u32,
            key_size: u32,
            value_size: u32,
            max_entries: u32,
            map_flags: u32,
        }
        let mut attr = Attr {
            map_type: 2, // BPF_MAP_TYPE_ARRAY
            key_size: 4,
            value_size,
            max_entries: len,
            map_flags: datapath_common::maps::BPF_F_MMAPABLE,
        };
        // SAFETY: bpf(BPF_MAP_CREATE) with an attr of its size.
        let fd =
            unsafe { libc::syscall(libc::SYS_bpf, 0, &raw mut attr, std::mem::size_of::<Attr>()) };
        assert!(fd >= 0, "BPF_MAP_CREATE: {}", io::Error::last_os_error());
        // SAFETY: a fresh fd owned by nobody else.
        unsafe { OwnedFd::from_raw_fd(fd as i32) }
    }

    fn array<T: aya::Pod>(fd: OwnedFd) -> Array<MapData, T> {
        let map = MapData::from_fd(fd).expect("the map's info");
        Array::try_from(Map::Array(map)).expect("an array")
    }

    /// Entries written through windows are where the kernel (the bpf
    /// syscall) has them, across window boundaries and at the array's
    /// end; unmapping keeps them, and the next access maps its window.
    #[test]
    fn windows_map_the_entries_the_kernel_has_at_those_indexes() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: creating a BPF map needs root");
            return;
        }
        let window_entries = (WINDOW_BYTES.max(page_size()) / 8) as u32;
        let len = 2 * window_entries + 5;
        let fd = mmapable_array(8, len);
        let by_syscall: Array<MapData, u64> = array(fd.try_clone().expect("dup"));
        let mut mapped = MappedArray::new(array(fd));
        assert_eq!(mapped.windows_mapped(), 0, "nothing mapped before use");

        let across = window_entries - 2;
        let values = [11u64, 12, 13, 14];
        assert!(mapped.write(across, values.into_iter()).unwrap());
        assert_eq!(mapped.windows_mapped(), 2);
        for (i, value) in values.iter().enumerate() {
            assert_eq!(by_syscall.get(&(across + i as u32), 0).unwrap(), *value);
        }
        assert!(mapped.set(len - 1, 99).unwrap());
        assert_eq!(by_syscall.get(&(len - 1), 0).unwrap(), 99);
        assert!(!mapped.set(len, 1).unwrap(), "beyond the array");
        assert!(
            !mapped.write(len - 1, [1u64, 2].into_iter()).unwrap(),
            "a write that would not fit"
        );
        assert_eq!(by_syscall.get(&(len - 1), 0).unwrap(), 99, "left whole");
        assert_eq!(mapped.get(len).unwrap(), None);

        mapped.unmap();
        assert_eq!(mapped.windows_mapped(), 0);
        assert_eq!(mapped.get(across + 3).unwrap(), Some(14));
        assert_eq!(mapped.windows_mapped(), 1, "only the window read");

        let all = mapped.read_all().unwrap();
        assert_eq!(all.len(), len as usize);
        assert_eq!(&all[across as usize..across as usize + 4], &values);
        assert_eq!(all[len as usize - 1], 99);
        assert_eq!(all.iter().filter(|&&v| v != 0).count(), 5);
    }

    /// Two-word values (an IPv6 address) land where the kernel has them,
    /// whole, across a window boundary.
    #[test]
    fn two_word_values_are_stored_whole_at_their_index() {
        use datapath_common::maps::BackendAddress6;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: creating a BPF map needs root");
            return;
        }
        let window_entries = (WINDOW_BYTES.max(page_size()) / 16) as u32;
        let len = window_entries + 3;
        let fd = mmapable_array(16, len);
        let by_syscall: Array<MapData, BackendAddress6> = array(fd.try_clone().expect("dup"));
        let mapped: MappedArray<BackendAddress6> = MappedArray::new(array(fd));
        let value = |i: u32| BackendAddress6 {
            address_be: [0x2001_0db8 ^ i, i, !i, i.rotate_left(7)],
        };
        let first = window_entries - 1;
        assert!(mapped.write(first, (first..first + 3).map(value)).unwrap());
        assert_eq!(mapped.windows_mapped(), 2);
        for i in first..first + 3 {
            assert_eq!(by_syscall.get(&i, 0).unwrap(), value(i), "entry {i}");
            assert_eq!(mapped.get(i).unwrap(), Some(value(i)));
        }
        assert_eq!(
            by_syscall.get(&(first - 1), 0).unwrap(),
            BackendAddress6::default()
        );
        assert_eq!(
            by_syscall.get(&(first + 3), 0).unwrap(),
            BackendAddress6::default()
        );
        assert!(!mapped.set(len, value(0)).unwrap(), "beyond the array");
    }
}
