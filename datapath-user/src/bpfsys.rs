//! The raw bpf(2) commands aya 0.14 does not expose: opening a pinned
//! object as a plain fd, BPF_LINK_DETACH, loading and test-running a
//! program given as instructions (the jiffies clock, `crate::clock`), and
//! waiting for the programs running now to finish (`GracePeriod`).
//!
//! Removing a link's pin only drops a reference; the kernel frees the
//! inode after an RCU grace period, so the program would stay attached
//! for an unbounded moment. An explicit BPF_LINK_DETACH detaches at once,
//! whoever else still holds the link.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_DETACH: libc::c_long = 34;

#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    /// Explicit: the kernel rejects (EINVAL) an attr whose bytes past the
    /// last field it knows are not zero, and implicit padding is not
    /// guaranteed to be.
    _pad: u32,
}

#[repr(C)]
#[derive(Default)]
struct LinkDetachAttr {
    link_fd: u32,
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_ARRAY_OF_MAPS: u32 = 12;

#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
}

#[repr(C)]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn map_create(attr: &mut MapCreateAttr) -> io::Result<OwnedFd> {
    let fd = bpf(BPF_MAP_CREATE, attr)?;
    // SAFETY: a fresh fd the kernel just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Returns once every BPF program that was running when it was called has
/// finished (non-sleepable ones: TC, XDP, cgroup socket hooks): an update
/// of a map-in-map makes the kernel wait for an RCU grace period
/// (`maybe_wait_bpf_programs`, `synchronize_rcu`) before the syscall
/// returns, on any number of CPUs and with preemptible RCU. Two tiny maps
/// of this process's own.
#[derive(Debug)]
pub struct GracePeriod {
    outer: OwnedFd,
    inner: OwnedFd,
}

impl GracePeriod {
    pub fn new() -> io::Result<Self> {
        let inner = map_create(&mut MapCreateAttr {
            map_type: BPF_MAP_TYPE_ARRAY,
            key_size: 4,
            value_size: 4,
            max_entries: 1,
            ..MapCreateAttr::default()
        })?;
        let outer = map_create(&mut MapCreateAttr {
            map_type: BPF_MAP_TYPE_ARRAY_OF_MAPS,
            key_size: 4,
            value_size: 4,
            max_entries: 1,
            inner_map_fd: inner.as_raw_fd() as u32,
            ..MapCreateAttr::default()
        })?;
        Ok(Self { outer, inner })
    }

    /// Waits for the programs running now to finish.
    pub fn wait(&self) -> io::Result<()> {
        let key = 0u32;
        let value = self.inner.as_raw_fd() as u32;
        let mut attr = MapElemAttr {
            map_fd: self.outer.as_raw_fd() as u32,
            key: &key as *const u32 as u64,
            value: &value as *const u32 as u64,
            ..MapElemAttr::default()
        };
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(|_| ())
    }
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: bpf(2) with a pointer to a correctly laid out attr of its size.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Opens the object pinned at `path`.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let cpath = CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let mut attr = ObjGetAttr {
        pathname: cpath.as_ptr() as u64,
        ..ObjGetAttr::default()
    };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new fd that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Detaches the link pinned at `path` now, then removes the pin. A missing
/// pin is not an error (nothing to detach).
pub fn detach_and_unpin(path: &Path) -> io::Result<()> {
    let link = match obj_get(path) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut attr = LinkDetachAttr {
        link_fd: link.as_raw_fd() as u32,
    };
    match bpf(BPF_LINK_DETACH, &mut attr) {
        // EOPNOTSUPP: a link type without detach (kernels < 5.9); the
        // unpin below still releases it, eventually.
        Ok(_) => {}
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
        Err(e) => return Err(e),
    }
    drop(link);
    std::fs::remove_file(path)
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Reads a whole BPF array map (`len` entries of `V`) with
/// BPF_MAP_LOOKUP_BATCH: a handful of syscalls instead of one per entry
/// (the agent scans arrays of 10^5 entries at start-up).
///
/// `V` must be the map's exact value type (a `#[repr(C)]` Pod).
pub fn read_array<V: Copy + Default>(map_fd: i32, len: u32) -> io::Result<Vec<V>> {
    let mut out = Vec::with_capacity(len as usize);
    lookup_batch::<u32, V>(map_fd, 16_384, 1, |_, values| {
        out.extend_from_slice(values);
        out.len() < len as usize
    })?;
    Ok(out)
}

/// Visits every key of a BPF hash map with BPF_MAP_LOOKUP_BATCH, up to
/// `chunk` entries per syscall (instead of two syscalls per key). The
/// walk goes bucket by bucket: an entry present for the whole walk is
/// visited exactly once, however many others come and go meanwhile (a
/// key-by-key walk restarts from the first key when the one it stands on
/// is deleted).
///
/// `K` and `V` must be the map's exact key and value types.
pub fn for_each_key<K: Copy + Default, V: Copy + Default>(
    map_fd: i32,
    chunk: u32,
    mut visit: impl FnMut(&K),
) -> io::Result<()> {
    lookup_batch::<K, V>(map_fd, chunk, 1, |keys, _| {
        keys.iter().for_each(&mut visit);
        true
    })
}

/// Every entry of a BPF hash map, read in BPF_MAP_LOOKUP_BATCH chunks
/// (`for_each_key`'s walk). `K` and `V` must be the map's exact types.
pub fn read_hash<K: Copy + Default, V: Copy + Default>(map_fd: i32) -> io::Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    lookup_batch::<K, V>(map_fd, 16_384, 1, |keys, values| {
        out.extend(keys.iter().copied().zip(values.iter().copied()));
        true
    })?;
    Ok(out)
}

/// Visits every entry of a per-CPU BPF array with BPF_MAP_LOOKUP_BATCH,
/// `chunk` indexes per syscall: `visit` gets each index with its `cpus`
/// values (`cpus`: the possible CPUs, `aya::util::nr_cpus`).
///
/// `V` must be the map's exact value type, its size a multiple of 8 (the
/// kernel lays per-CPU values out 8-byte aligned).
pub fn for_each_per_cpu<V: Copy + Default>(
    map_fd: i32,
    cpus: usize,
    chunk: u32,
    mut visit: impl FnMut(u32, &[V]),
) -> io::Result<()> {
    debug_assert_eq!(std::mem::size_of::<V>() % 8, 0);
    let cpus = cpus.max(1);
    lookup_batch::<u32, V>(map_fd, chunk, cpus, |keys, values| {
        for (key, values) in keys.iter().zip(values.chunks_exact(cpus)) {
            visit(*key, values);
        }
        true
    })
}

/// Reads a map in BPF_MAP_LOOKUP_BATCH chunks of up to `chunk` entries,
/// handing each chunk's keys and values (`values_per_key` each: the CPUs
/// of a per-CPU map, else 1) to `visit` until the map ends or `visit`
/// says stop. The batch token is a u32 for arrays (an index) and hash
/// maps (a bucket).
fn lookup_batch<K: Copy + Default, V: Copy + Default>(
    map_fd: i32,
    chunk: u32,
    values_per_key: usize,
    mut visit: impl FnMut(&[K], &[V]) -> bool,
) -> io::Result<()> {
    let mut chunk = chunk.max(1);
    let mut keys = vec![K::default(); chunk as usize];
    let mut values = vec![V::default(); chunk as usize * values_per_key];
    let mut token = 0u32;
    let mut first = true;
    loop {
        let mut next = 0u32;
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &mut token as *mut u32 as u64
            },
            out_batch: &mut next as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk,
            map_fd: map_fd as u32,
            ..BatchAttr::default()
        };
        let done = match bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) {
            Ok(_) => false,
            // The last chunk: `count` holds what was read.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            // One hash bucket holds more entries than fit: read it again
            // with room for them.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && attr.count == 0 => {
                chunk = chunk.saturating_mul(2);
                keys.resize(chunk as usize, K::default());
                values.resize(chunk as usize * values_per_key, V::default());
                continue;
            }
            Err(e) => return Err(e),
        };
        let read = attr.count as usize;
        if !visit(&keys[..read], &values[..read * values_per_key]) || done {
            return Ok(());
        }
        token = next;
        first = false;
    }
}

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// Writes `keys[i] → values[i]` for every i with BPF_MAP_UPDATE_BATCH:
/// one syscall instead of one per entry (a service's backends, its
/// slots). Entries are written in order; on an error the ones before the
/// failing entry are written, and the error says which entry failed.
///
/// `K` and `V` must be the map's exact key and value types (`#[repr(C)]`
/// Pods).
pub fn update_batch<K: Copy, V: Copy>(
    map_fd: i32,
    keys: &[K],
    values: &[V],
) -> Result<(), (usize, io::Error)> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    let mut written = 0;
    while written < keys.len() {
        let mut attr = BatchAttr {
            keys: keys[written..].as_ptr() as u64,
            values: values[written..].as_ptr() as u64,
            count: (keys.len() - written) as u32,
            map_fd: map_fd as u32,
            ..BatchAttr::default()
        };
        let result = bpf(BPF_MAP_UPDATE_BATCH, &mut attr);
        // `count` now holds how many were written, also on an error.
        written += attr.count as usize;
        match result {
            Err(e) => return Err((written, e)),
            Ok(_) if attr.count == 0 => {
                return Err((written, io::Error::other("the kernel wrote no entry")));
            }
            Ok(_) => {}
        }
    }
    Ok(())
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
/// `BPF_PROG_TYPE_SCHED_CLS`: TC programs.
pub const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
/// `BPF_PROG_TYPE_CGROUP_SOCK_ADDR`: the socket-LB hooks.
pub const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Insn {
    pub code: u8,
    /// Destination register in the low nibble, source in the high one.
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// Loads `insns` as a program of `prog_type` (for `expected_attach_type`
/// where the type needs one) named `name` (at most 15 bytes).
pub fn load_program(
    prog_type: u32,
    expected_attach_type: u32,
    name: &str,
    insns: &[Insn],
) -> io::Result<OwnedFd> {
    let license = c"GPL";
    let mut attr = ProgLoadAttr {
        prog_type,
        expected_attach_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        ..ProgLoadAttr::default()
    };
    let bytes = name.as_bytes();
    let len = bytes.len().min(attr.prog_name.len() - 1);
    attr.prog_name[..len].copy_from_slice(&bytes[..len]);
    let fd = bpf(BPF_PROG_LOAD, &mut attr)?;
    // SAFETY: the kernel returned a new fd that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

const BPF_LINK_CREATE: libc::c_long = 28;

#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
}

/// A bpf_link attaching `prog` to interface `ifindex` (of the calling
/// thread's namespace) as `attach_type`; detached when the returned fd
/// is closed (unless pinned).
pub fn link_create(
    prog: &OwnedFd,
    ifindex: u32,
    attach_type: u32,
    flags: u32,
) -> io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type,
        flags,
    };
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: the kernel returned a new fd that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Runs a TC program once on `frame` (BPF_PROG_TEST_RUN) and returns its
/// verdict: for a program opened from its pin (the CNI plugin's view).
pub fn test_run_verdict(prog: &OwnedFd, frame: &[u8]) -> io::Result<i32> {
    test_run_verdict_with_ctx(prog, frame, &[])
}

/// As `test_run_verdict`, with the program's context (`ctx_in`; none
/// when empty).
pub fn test_run_verdict_with_ctx(prog: &OwnedFd, frame: &[u8], ctx: &[u8]) -> io::Result<i32> {
    // (The output buffer: the kernel refuses a run whose frame grows
    // beyond a buffer it was given none of.)
    let mut out = vec![0u8; frame.len() + 256];
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: frame.len() as u32,
        data_in: frame.as_ptr() as u64,
        data_size_out: out.len() as u32,
        data_out: out.as_mut_ptr() as u64,
        repeat: 1,
        ctx_size_in: ctx.len() as u32,
        ctx_in: if ctx.is_empty() {
            0
        } else {
            ctx.as_ptr() as u64
        },
        ..TestRunAttr::default()
    };
    bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    Ok(attr.retval as i32)
}

/// Runs a TC program once on `frame` (BPF_PROG_TEST_RUN) and returns the
/// `struct __sk_buff` it left (`ctx_out`, whose size the kernel requires
/// to be at least the whole struct).
pub fn test_run_skb_ctx(prog: &OwnedFd, frame: &[u8], ctx_out: &mut [u8]) -> io::Result<()> {
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: frame.len() as u32,
        data_in: frame.as_ptr() as u64,
        repeat: 1,
        ctx_size_out: ctx_out.len() as u32,
        ctx_out: ctx_out.as_mut_ptr() as u64,
        ..TestRunAttr::default()
    };
    bpf(BPF_PROG_TEST_RUN, &mut attr).map(drop)
}
