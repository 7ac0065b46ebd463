//! Shared by the privileged suites.
#![allow(dead_code, reason = "each suite uses a different subset")]

pub mod agent_lab;

use datapath_user::{
    Datapath, LoadOptions,
    loader::{CtTimeouts, DatapathLog, L4Checksums, MapSizes},
    model::{Frontend, Protocol},
};

/// The privileged suites run in CI as root; elsewhere they fail loudly
/// rather than pass without having run.
pub fn require_root(suite: &str) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!(
            "the {suite} suite needs root (BPF, network namespaces): run `cargo xtask test` as root"
        );
    }
}

/// A bpffs directory of this run's own for pins (`/sys/fs/bpf/<prefix>`),
/// removed with everything in it when dropped, also when a test fails.
pub struct PinDir(pub std::path::PathBuf);

impl PinDir {
    pub fn new() -> Self {
        Self(std::path::PathBuf::from(format!(
            "/sys/fs/bpf/{}",
            lab::unique_prefix()
        )))
    }

    pub fn path(&self) -> std::path::PathBuf {
        self.0.clone()
    }

    /// A load that pins here, with every other option at its default.
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            pin_dir: Some(self.path()),
            ..LoadOptions::default()
        }
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// UDP flows the private datapath's conntrack holds.
pub const CONNTRACK_UDP_FLOWS: u32 = 256;

/// A private (unpinned) datapath with small maps.
pub fn load_private() -> Datapath {
    load_private_with(CtTimeouts::default())
}

/// The same with chosen conntrack lifetimes.
pub fn load_private_with(ct_timeouts: CtTimeouts) -> Datapath {
    load_private_options(ct_timeouts, DatapathLog::default(), L4Checksums::default())
}

/// The same updating L4 checksums as `l4_checksums` says.
pub fn load_private_checksums(l4_checksums: L4Checksums) -> Datapath {
    load_private_options(CtTimeouts::default(), DatapathLog::default(), l4_checksums)
}

/// The same logging rare events at `datapath_log`.
pub fn load_private_logging(datapath_log: DatapathLog) -> Datapath {
    load_private_options(CtTimeouts::default(), datapath_log, L4Checksums::default())
}

fn load_private_options(
    ct_timeouts: CtTimeouts,
    datapath_log: DatapathLog,
    l4_checksums: L4Checksums,
) -> Datapath {
    require_root("BPF_PROG_TEST_RUN");
    let options = LoadOptions {
        ct_timeouts,
        datapath_log,
        l4_checksums,
        pin_dir: None,
        sizes: MapSizes {
            services: 4096,
            slots: 4096,
            backends: 4096,
            // Ids beyond 16 bits are tested (up to 131,073).
            reverse_nat: 140_000,
            conntrack_tcp_flows: 2048,
            conntrack_udp_flows: CONNTRACK_UDP_FLOWS,
            sock_reverse_nat: 1024,
            affinity_clients: 1024,
            service_counters: true,
            // The IPv6 maps at their sizes too.
            ipv6: true,
            // North-south served: a few Maglev tables of the smallest size.
            maglev_tables: 4,
            maglev_table_size: datapath_common::maglev::MIN_TABLE_SIZE,
        },
        ..LoadOptions::default()
    };
    let mut datapath =
        Datapath::load(&options).unwrap_or_else(|e| panic!("loading the datapath: {e}"));
    // As the agent runs once its programs are everywhere: the ingress
    // program skips conntrack for packets from unflagged peers.
    datapath
        .maps
        .complete_reply_filter()
        .expect("trusting the reply filter");
    datapath
}

/// Packets and new flows per frontend of a loaded datapath, by
/// reverse-NAT id (summed over CPUs; ids that counted nothing left out).
pub fn service_counts(dp: &Datapath) -> std::collections::BTreeMap<u32, (u64, u64)> {
    let counters = dp.maps.service_counters.as_ref().expect("SERVICE_COUNTERS");
    counters
        .nonzero()
        .unwrap()
        .into_iter()
        .map(|(id, c)| (id, (c.packets, c.new_flows)))
        .collect()
}

/// `age` ago on the conntrack clock (jiffies).
pub fn jiffies_ago(age: std::time::Duration) -> u64 {
    let hz = datapath_user::clock::hz().expect("kernel HZ");
    let now = datapath_user::clock::jiffies_now().expect("jiffies");
    now - datapath_user::clock::ticks(age, hz)
}

/// The ClusterIP both suites program.
pub const VIP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 96, 0, 10);

pub fn tcp_frontend() -> Frontend {
    Frontend {
        address: VIP,
        port: 80,
        protocol: Protocol::Tcp,
    }
}

pub fn udp_frontend() -> Frontend {
    Frontend {
        address: VIP,
        port: 53,
        protocol: Protocol::Udp,
    }
}

/// Whether the running kernel has `feature` (`present`, from the agent's
/// own probes); says so when it does not, for the test to skip.
pub fn kernel_has(feature: datapath_user::features::Feature, present: bool) -> bool {
    if !present {
        eprintln!(
            "SKIPPED: kernel {} lacks {} (Linux {}+)",
            datapath_user::probe::kernel().kernel,
            feature.name,
            feature.since
        );
    }
    present
}

/// The ids of the TCX programs on `iface` inside `namespace`: (egress,
/// ingress), each in attach order.
pub fn tcx_program_ids(namespace: &lab::Namespace, iface: &str) -> [Vec<u32>; 2] {
    use aya::programs::{SchedClassifier, TcAttachType};
    namespace
        .run(|| {
            [TcAttachType::Egress, TcAttachType::Ingress].map(|t| {
                SchedClassifier::query_tcx(iface, t)
                    .unwrap()
                    .1
                    .iter()
                    .map(|p| p.id())
                    .collect::<Vec<_>>()
            })
        })
        .unwrap()
}

/// Set in `released` or `ran` by a side of `race` that failed: the other
/// stops instead of waiting for it forever.
const STOPPED: u32 = u32::MAX;

/// One round of `race`, as the thread that prepares it sees it.
pub struct Round<'a> {
    trial: u32,
    released: &'a std::sync::atomic::AtomicU32,
    ran: &'a std::sync::atomic::AtomicU32,
}

impl Round<'_> {
    /// Lets the other thread run its step of this round.
    pub fn go(&self) {
        self.released
            .store(self.trial, std::sync::atomic::Ordering::Release);
    }

    /// Waits until the other thread has run its step of this round.
    pub fn wait_for_the_other(&self) {
        loop {
            match self.ran.load(std::sync::atomic::Ordering::Acquire) {
                STOPPED => panic!("the other thread of the race failed (its panic follows)"),
                ran if ran >= self.trial => return,
                _ => std::hint::spin_loop(),
            }
        }
    }
}

/// Tells the other side of `race` to stop when this side panics.
struct StopOnPanic<'a>(&'a std::sync::atomic::AtomicU32);

impl Drop for StopOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(STOPPED, std::sync::atomic::Ordering::Release);
        }
    }
}

/// Pins the calling thread to the `nth` CPU this process may use.
fn pin_to_allowed_cpu(nth: usize) {
    // SAFETY: a zeroed cpu_set_t is the empty set; the calls read and
    // write only the set given, for the calling thread (pid 0).
    unsafe {
        let mut allowed: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut allowed) != 0 {
            return;
        }
        let Some(cpu) = (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &allowed))
            .nth(nth)
        else {
            return;
        };
        let mut one: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut one);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &one);
    }
}

/// Races two steps on two CPUs, `trials` times, both threads in
/// `namespace` if given (route lookups start there), each pinned to a
/// CPU of its own. Round `trial`: `here(trial, round)` prepares, calls
/// `round.go()`, runs its step, `round.wait_for_the_other()`, and
/// checks; `there(trial)` runs its step the moment `go` is called. Both
/// threads spin rather than sleep, so the two steps start within a
/// cache-line transfer of each other (a sleeping thread's wake-up would
/// take microseconds, longer than either step). A panic on either side
/// stops both. False, with nothing run, when this machine has one CPU.
pub fn race(
    namespace: Option<&lab::Namespace>,
    trials: u32,
    here: impl FnMut(u32, &Round) + Send,
    there: impl FnMut(u32) + Send,
) -> bool {
    use std::sync::atomic::{AtomicU32, Ordering};
    fn in_namespace(namespace: Option<&lab::Namespace>, work: impl FnOnce() + Send) {
        match namespace {
            Some(namespace) => namespace.run(work).expect("setns"),
            None => work(),
        }
    }
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        return false;
    }
    let released = AtomicU32::new(0);
    let ran = AtomicU32::new(0);
    std::thread::scope(|scope| {
        let (mut here, mut there) = (here, there);
        let (released, ran) = (&released, &ran);
        scope.spawn(move || {
            let _stop = StopOnPanic(ran);
            in_namespace(namespace, move || {
                pin_to_allowed_cpu(1);
                for trial in 1..=trials {
                    loop {
                        match released.load(Ordering::Acquire) {
                            STOPPED => return,
                            go if go >= trial => break,
                            _ => std::hint::spin_loop(),
                        }
                    }
                    there(trial);
                    ran.store(trial, Ordering::Release);
                }
            })
        });
        let _stop = StopOnPanic(released);
        in_namespace(namespace, move || {
            pin_to_allowed_cpu(0);
            for trial in 1..=trials {
                here(
                    trial,
                    &Round {
                        trial,
                        released,
                        ran,
                    },
                );
            }
        });
    });
    true
}

/// Checks an ICMP error frame from scratch: outer IP checksum, ICMP
/// checksum over the whole message, the quoted IP header's checksum;
/// returns (outer src, outer dst, quoted src:port, quoted dst:port).
pub fn icmp_error_fields(
    description: &str,
    frame: &[u8],
) -> (
    std::net::Ipv4Addr,
    std::net::Ipv4Addr,
    (std::net::Ipv4Addr, u16),
    (std::net::Ipv4Addr, u16),
) {
    use datapath_common::csum;
    let ip = &frame[14..34];
    assert!(csum::verifies(ip), "{description}: outer IP checksum");
    let icmp = &frame[34..];
    assert!(csum::verifies(icmp), "{description}: ICMP checksum");
    let quoted = &icmp[8..];
    let ihl = usize::from(quoted[0] & 0x0f) * 4;
    assert!(
        csum::verifies(&quoted[..ihl]),
        "{description}: quoted IP checksum"
    );
    let addr = |b: &[u8]| std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]);
    let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    (
        addr(&ip[12..16]),
        addr(&ip[16..20]),
        (addr(&quoted[12..16]), port(&quoted[ihl..])),
        (addr(&quoted[16..20]), port(&quoted[ihl + 2..])),
    )
}
