//! The conntrack clock as user space sees it: kernel jiffies and HZ.
//!
//! The datapath stamps flows with `bpf_jiffies64()`. Planting or ageing
//! entries (tests, garbage collection, `conntrack list`) needs the same
//! clock. No syscall returns jiffies, and /proc/timer_list, which shows
//! them, is masked by every container runtime (containerd and podman
//! bind-mount /dev/null over it). So the clock is read where the datapath
//! reads it: a seven-instruction TC program stores `bpf_jiffies64()` in
//! the skb's control block, run once per read with BPF_PROG_TEST_RUN
//! (a few microseconds; needs CAP_BPF and CAP_NET_ADMIN, as the agent has).

use std::{
    io,
    os::fd::OwnedFd,
    sync::OnceLock,
    time::{Duration, Instant},
};

use crate::bpfsys::{self, Insn};

/// `offsetof(struct __sk_buff, cb)`: the program writes jiffies into
/// `cb[0]` (low half) and `cb[1]` (high half).
const CB_OFFSET: i16 = 48;
/// `BPF_FUNC_jiffies64`.
const HELPER_JIFFIES64: i32 = 118;

/// r6 = ctx; r0 = bpf_jiffies64(); cb[0] = (u32)r0; cb[1] = r0 >> 32;
/// return TC_ACT_OK.
const PROGRAM: [Insn; 7] = [
    Insn {
        code: 0xbf,
        regs: 0x16,
        off: 0,
        imm: 0,
    }, // mov64 r6, r1
    Insn {
        code: 0x85,
        regs: 0x00,
        off: 0,
        imm: HELPER_JIFFIES64,
    }, // call
    Insn {
        code: 0x63,
        regs: 0x06,
        off: CB_OFFSET,
        imm: 0,
    }, // stxw [r6+48], r0
    Insn {
        code: 0x77,
        regs: 0x00,
        off: 0,
        imm: 32,
    }, // rsh64 r0, 32
    Insn {
        code: 0x63,
        regs: 0x06,
        off: CB_OFFSET + 4,
        imm: 0,
    }, // stxw [r6+52], r0
    Insn {
        code: 0xb7,
        regs: 0x00,
        off: 0,
        imm: 0,
    }, // mov64 r0, 0
    Insn {
        code: 0x95,
        regs: 0x00,
        off: 0,
        imm: 0,
    }, // exit
];

/// The loaded clock program, kept for the process's life.
fn program() -> io::Result<&'static OwnedFd> {
    static LOADED: OnceLock<OwnedFd> = OnceLock::new();
    if let Some(fd) = LOADED.get() {
        return Ok(fd);
    }
    let fd = bpfsys::load_program(
        bpfsys::BPF_PROG_TYPE_SCHED_CLS,
        0,
        "underpass_clock",
        &PROGRAM,
    )
    .map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "loading the jiffies clock program (bpf_jiffies64, kernel 5.5+; \
                 needs CAP_BPF and CAP_NET_ADMIN): {e}"
            ),
        )
    })?;
    Ok(LOADED.get_or_init(|| fd))
}

/// The kernel's jiffies counter now.
pub fn jiffies_now() -> io::Result<u64> {
    // An Ethernet header and a little more: the test run needs a frame.
    let frame = [0u8; 64];
    // The whole `struct __sk_buff` comes back (192 bytes on 6.18).
    let mut ctx = [0u8; 256];
    bpfsys::test_run_skb_ctx(program()?, &frame, &mut ctx)
        .map_err(|e| io::Error::new(e.kind(), format!("running the jiffies clock program: {e}")))?;
    let word = |at: i16| {
        let at = at as usize;
        u32::from_ne_bytes(ctx[at..at + 4].try_into().expect("four bytes"))
    };
    Ok(u64::from(word(CB_OFFSET)) | (u64::from(word(CB_OFFSET + 4)) << 32))
}

/// The tick rates Linux offers (CONFIG_HZ).
const RATES: [u64; 4] = [100, 250, 300, 1000];

/// The kernel's tick rate (CONFIG_HZ), found once: the resolution of the
/// coarse clocks is one tick (`TICK_NSEC`), which costs nothing to ask;
/// should that ever not name a rate Linux offers, jiffies are counted over
/// 200 ms of CLOCK_MONOTONIC (the agent's start would wait that long).
pub fn hz() -> io::Result<u64> {
    static HZ: OnceLock<u64> = OnceLock::new();
    if let Some(hz) = HZ.get() {
        return Ok(*hz);
    }
    if let Some(hz) = hz_from_coarse_resolution() {
        return Ok(*HZ.get_or_init(|| hz));
    }
    let start = (Instant::now(), jiffies_now()?);
    std::thread::sleep(Duration::from_millis(200));
    let end = (Instant::now(), jiffies_now()?);
    let measured = (end.1 - start.1) as f64 / (end.0 - start.0).as_secs_f64();
    let hz = RATES
        .into_iter()
        .min_by(|a, b| {
            (*a as f64 - measured)
                .abs()
                .total_cmp(&(*b as f64 - measured).abs())
        })
        .expect("non-empty");
    Ok(*HZ.get_or_init(|| hz))
}

/// The rate whose tick (`(NSEC_PER_SEC + HZ / 2) / HZ`, as the kernel
/// rounds it) is CLOCK_MONOTONIC_COARSE's resolution.
fn hz_from_coarse_resolution() -> Option<u64> {
    let mut resolution = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_getres writes one timespec we own.
    if unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut resolution) } != 0
        || resolution.tv_sec != 0
    {
        return None;
    }
    let tick_nsec = |hz: u64| (1_000_000_000 + hz / 2) / hz;
    RATES
        .into_iter()
        .find(|&hz| tick_nsec(hz) == resolution.tv_nsec as u64)
}

/// `duration` in ticks at `hz`, rounded up (a lifetime is never shortened).
pub fn ticks(duration: Duration, hz: u64) -> u64 {
    (duration.as_nanos() * u128::from(hz)).div_ceil(1_000_000_000) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_coarse_clocks_tick_is_the_rate_jiffies_advance_at() {
        let from_resolution = hz_from_coarse_resolution().expect("a rate Linux offers");
        // Counted, as the fallback does (needs the BPF clock: root).
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let start = (Instant::now(), jiffies_now().unwrap());
        std::thread::sleep(Duration::from_millis(200));
        let end = (Instant::now(), jiffies_now().unwrap());
        let counted = (end.1 - start.1) as f64 / (end.0 - start.0).as_secs_f64();
        assert!(
            (counted - from_resolution as f64).abs() < from_resolution as f64 * 0.1,
            "resolution says {from_resolution} Hz, jiffies advanced at {counted:.0} Hz"
        );
    }

    #[test]
    fn ticks_round_up() {
        assert_eq!(ticks(Duration::from_secs(60), 250), 15_000);
        assert_eq!(ticks(Duration::from_millis(1), 250), 1);
        assert_eq!(ticks(Duration::ZERO, 250), 0);
    }
}
