//! `SERVICE_COUNTERS` as the agent and the CLI use it: read summed over
//! the CPUs (only ids that counted something), zeroed when an id is
//! freed, pruned of ids no frontend holds at the first sync.

use std::os::fd::{AsFd, AsRawFd};

use aya::maps::{IterableMap, MapData, MapError, PerCpuArray, PerCpuValues};
use datapath_common::maps::{RevNatId, ServiceCounters};

/// Indexes read per syscall: 4,096 × 16 bytes × CPUs of buffer.
const READ_CHUNK: u32 = 4096;

/// Handle on `SERVICE_COUNTERS`.
pub struct ServiceCounterMap {
    map: PerCpuArray<MapData, ServiceCounters>,
    /// Possible CPUs: how many values each index holds.
    cpus: usize,
}

impl ServiceCounterMap {
    pub fn new(map: PerCpuArray<MapData, ServiceCounters>) -> Result<Self, MapError> {
        let cpus = aya::util::nr_cpus().map_err(|(call, io_error)| {
            MapError::SyscallError(aya::sys::SyscallError { call, io_error })
        })?;
        Ok(Self { map, cpus })
    }

    /// How many ids it holds (one: the agent runs with
    /// `--service-counters off`).
    pub fn capacity(&self) -> u32 {
        self.map.len()
    }

    /// Whether it counts anything (more than the one entry it takes when
    /// counting is off; id 0 is never a frontend's).
    pub fn is_counting(&self) -> bool {
        self.capacity() > 1
    }

    /// Every id that counted something, with its counters summed over the
    /// CPUs, in id order.
    pub fn nonzero(&self) -> Result<Vec<(RevNatId, ServiceCounters)>, MapError> {
        let mut out = Vec::new();
        if !self.is_counting() {
            return Ok(out);
        }
        let fd = IterableMap::map(&self.map).fd().as_fd().as_raw_fd();
        crate::bpfsys::for_each_per_cpu::<ServiceCounters>(
            fd,
            self.cpus,
            READ_CHUNK,
            |id, per_cpu| {
                let sum = per_cpu
                    .iter()
                    .fold(ServiceCounters::default(), |a, b| a.plus(*b));
                if !sum.is_zero() {
                    out.push((id, sum));
                }
            },
        )
        .map_err(|io_error| {
            MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_lookup_batch",
                io_error,
            })
        })?;
        Ok(out)
    }

    /// Zeroes id `id` on every CPU (its frontend is gone: whoever gets
    /// the id next starts at zero). An id beyond the map has nothing.
    pub fn zero(&mut self, id: RevNatId) -> Result<(), MapError> {
        if id >= self.capacity() {
            return Ok(());
        }
        let zeros = PerCpuValues::try_from(vec![ServiceCounters::default(); self.cpus])?;
        self.map.set(id, zeros, 0)
    }

    /// Zeroes every id `keep` says no to that counted something (counts a
    /// previous agent's frontends left, gone since); returns how many.
    pub fn prune(&mut self, keep: &dyn Fn(RevNatId) -> bool) -> Result<usize, MapError> {
        let stale: Vec<RevNatId> = self
            .nonzero()?
            .into_iter()
            .map(|(id, _)| id)
            .filter(|&id| !keep(id))
            .collect();
        for &id in &stale {
            self.zero(id)?;
        }
        Ok(stale.len())
    }
}
