//! Probing the running kernel for what the datapath uses
//! (`crate::features` decides what to do with the answers). A helper is
//! probed by loading a three-instruction program of the type that calls
//! it: the verifier refuses helpers the kernel lacks for that type. Each
//! probe program is freed at once; none is attached or run, except the
//! clock's and the loopback socket the SOCK_DESTROY probe destroys.

use std::{net::UdpSocket, sync::OnceLock};

use aya::util::KernelVersion;

use crate::{
    bpfsys::{self, BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_PROG_TYPE_SCHED_CLS, Insn},
    clock,
    features::KernelFeatures,
    sockdiag,
};

const HELPER_GET_NETNS_COOKIE: i32 = 122;
const HELPER_REDIRECT_NEIGH: i32 = 152;
const HELPER_SET_RETVAL: i32 = 187;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
const BPF_CGROUP_INET4_GETPEERNAME: u32 = 29;

const fn mov_imm(register: u8, imm: i32) -> Insn {
    Insn {
        code: 0xb7,
        regs: register,
        off: 0,
        imm,
    }
}
const fn call(helper: i32) -> Insn {
    Insn {
        code: 0x85,
        regs: 0,
        off: 0,
        imm: helper,
    }
}
const EXIT: Insn = Insn {
    code: 0x95,
    regs: 0,
    off: 0,
    imm: 0,
};

/// `*(u64 *)(r10 - 8) = src`.
const fn store_stack(src: u8) -> Insn {
    Insn {
        code: 0x7b,
        regs: 10 | src << 4,
        off: -8,
        imm: 0,
    }
}
/// A `BPF_ATOMIC` operation `op` on the u64 at `r10 - 8` with `src`.
const fn atomic_on_stack(op: i32, src: u8) -> Insn {
    Insn {
        code: 0xdb,
        regs: 10 | src << 4,
        off: -8,
        imm: op,
    }
}
const BPF_OR: i32 = 0x40;
/// `BPF_CMPXCHG` (with `BPF_FETCH`): compares with r0, old value into r0.
const BPF_CMPXCHG: i32 = 0xf1;

/// Whether a program of this type with these instructions loads.
fn loads(prog_type: u32, attach_type: u32, insns: &[Insn]) -> bool {
    bpfsys::load_program(prog_type, attach_type, "underpass_probe", insns).is_ok()
}

/// TCX links (BPF_LINK_TYPE_TCX) have no helper to probe: the kernel
/// version says. Cheap: attaching asks only this.
pub fn has_tcx() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

/// The running kernel, probed once per process.
pub fn kernel() -> &'static KernelFeatures {
    static FOUND: OnceLock<KernelFeatures> = OnceLock::new();
    FOUND.get_or_init(probe)
}

fn probe() -> KernelFeatures {
    crate::raise_memlock_limit();
    let version = KernelVersion::current().ok();
    KernelFeatures {
        kernel: version.map_or_else(|| "(unknown version)".into(), |v| v.to_string()),
        jiffies64: clock::jiffies_now().is_ok(),
        // bpf_redirect_neigh(ifindex 1, no params).
        redirect_neigh: loads(
            BPF_PROG_TYPE_SCHED_CLS,
            0,
            &[
                mov_imm(1, 1),
                mov_imm(2, 0),
                mov_imm(3, 0),
                mov_imm(4, 0),
                call(HELPER_REDIRECT_NEIGH),
                EXIT,
            ],
        ),
        // The atomic OR and compare-and-swap the programs use on map
        // values (`lock *(u64 *) |=`, `cmpxchg_64`), here on the stack.
        atomics: loads(
            BPF_PROG_TYPE_SCHED_CLS,
            0,
            &[
                mov_imm(1, 0),
                store_stack(1),
                mov_imm(1, 1),
                atomic_on_stack(BPF_OR, 1),
                mov_imm(0, 0),
                atomic_on_stack(BPF_CMPXCHG, 1),
                mov_imm(0, 0),
                EXIT,
            ],
        ),
        tcx: has_tcx(),
        // bpf_get_netns_cookie(ctx): r1 is the context on entry.
        netns_cookie_tc: loads(
            BPF_PROG_TYPE_SCHED_CLS,
            0,
            &[call(HELPER_GET_NETNS_COOKIE), mov_imm(0, 0), EXIT],
        ),
        set_retval: loads(
            BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
            BPF_CGROUP_INET4_CONNECT,
            &[mov_imm(1, 0), call(HELPER_SET_RETVAL), mov_imm(0, 1), EXIT],
        ),
        cgroup_sock_addr_peername: loads(
            BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
            BPF_CGROUP_INET4_GETPEERNAME,
            &[mov_imm(0, 1), EXIT],
        ),
        sock_destroy: sock_destroy_works(),
    }
}

/// Destroys a UDP socket of our own, connected to itself on loopback
/// (connecting a UDP socket sends nothing).
fn sock_destroy_works() -> bool {
    let Ok(socket) = UdpSocket::bind("127.0.0.1:0") else {
        return false;
    };
    let Ok(own) = socket.local_addr() else {
        return false;
    };
    if socket.connect(own).is_err() {
        return false;
    }
    let peer = (own.ip(), own.port());
    sockdiag::destroy_connected_udp(None, |s| s.peer == peer).is_ok_and(|n| n == 1)
}

#[cfg(test)]
mod tests {
    /// The probes find what the running kernel's version has (this
    /// machine's 6.18 has everything; a hosted CI runner's 6.8 lacks
    /// netns cookies in TC). A probe program with a wrong encoding would
    /// be refused and show as a missing feature here.
    #[test]
    fn the_probes_find_what_this_kernel_version_has() {
        use aya::util::KernelVersion;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            panic!("run as root (cargo xtask test): probes load BPF programs");
        }
        let found = super::kernel();
        let version = KernelVersion::current().unwrap();
        let since = |major, minor| version >= KernelVersion::new(major, minor, 0);
        let expected = crate::features::KernelFeatures {
            kernel: found.kernel.clone(),
            jiffies64: since(5, 5),
            redirect_neigh: since(5, 10),
            atomics: since(5, 12),
            tcx: since(6, 6),
            netns_cookie_tc: since(6, 15),
            set_retval: since(5, 18),
            cgroup_sock_addr_peername: since(5, 8),
            // A build option, not a version: whatever the probe says (the
            // connected-UDP e2e test then relies on it).
            sock_destroy: found.sock_destroy,
        };
        assert_eq!(*found, expected);
        // And a helper the type lacks is refused: bpf_set_retval is for
        // cgroup programs, not TC ones.
        assert!(!super::loads(
            super::BPF_PROG_TYPE_SCHED_CLS,
            0,
            &[
                super::mov_imm(1, 0),
                super::call(super::HELPER_SET_RETVAL),
                super::mov_imm(0, 0),
                super::EXIT
            ],
        ));
    }
}
