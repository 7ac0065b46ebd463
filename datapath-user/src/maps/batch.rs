//! Whole maps in a few syscalls: an array read with
//! BPF_MAP_LOOKUP_BATCH, many entries written with BPF_MAP_UPDATE_BATCH
//! (the writer, the bulk write, the reply filter and the north-south
//! maps use them).

use aya::maps::{Array, MapData, MapError};

/// Writes `keys[i] → values[i]` into `map` in one BPF_MAP_UPDATE_BATCH;
/// on an error, also how many entries were written before it. `K` and
/// `V` must be the map's key and value types (the callers pass the typed
/// map's own).
pub(super) fn write_batch<K: Copy, V: Copy>(
    map: &MapData,
    keys: &[K],
    values: &[V],
) -> Result<(), (usize, MapError)> {
    use std::os::fd::{AsFd, AsRawFd};
    let fd = map.fd().as_fd().as_raw_fd();
    crate::bpfsys::update_batch(fd, keys, values).map_err(|(written, io_error)| {
        (
            written,
            MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_update_batch",
                io_error,
            }),
        )
    })
}

/// Every entry of an array map, read in batches.
pub(super) fn read_array<V: aya::Pod + Default>(
    array: &Array<MapData, V>,
) -> Result<Vec<V>, MapError> {
    use std::os::fd::{AsFd, AsRawFd};
    let fd = aya::maps::IterableMap::map(array).fd().as_fd().as_raw_fd();
    crate::bpfsys::read_array(fd, array.len()).map_err(|io_error| {
        MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_lookup_batch",
            io_error,
        })
    })
}
