//! One client run: the built-in clients (ping-pong latency, TCP_RR,
//! TCP_CRR) timed per transaction, the tools' through `tools`, and the
//! CPU the run cost.

use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use super::{Kind, tools::measure_tool};

/// One client run's figures.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Measurement {
    pub kind: Kind,
    pub transactions: u64,
    pub seconds: f64,
    pub per_second: f64,
    /// Per transaction (latency: one-way, i.e. RTT/2), µs.
    pub mean_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub errors: u64,
    /// Machine-wide CPU time per transaction while measuring (from
    /// /proc/stat), µs: user, system, softirq. The softirq share is the
    /// datapath's (netfilter, TC, the stack); both ends are on this host.
    #[serde(default)]
    pub cpu_user_us: f64,
    #[serde(default)]
    pub cpu_system_us: f64,
    #[serde(default)]
    pub cpu_softirq_us: f64,
}

/// Aggregate CPU times from /proc/stat, in clock ticks (USER_HZ).
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuTimes {
    pub user: u64,
    pub system: u64,
    pub softirq: u64,
}

impl CpuTimes {
    pub fn now() -> Self {
        let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
            return Self::default();
        };
        // "cpu  user nice system idle iowait irq softirq steal …"
        let fields: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .skip(1)
            .map(|f| f.parse().unwrap_or(0))
            .collect();
        let at = |i: usize| fields.get(i).copied().unwrap_or(0);
        Self {
            user: at(0) + at(1),
            system: at(2),
            softirq: at(6),
        }
    }

    /// (user, system, softirq) µs per transaction since `earlier`.
    pub fn per_transaction(self, earlier: Self, transactions: u64) -> (f64, f64, f64) {
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let per = |now: u64, then: u64| {
            (now.saturating_sub(then)) as f64 / hz * 1e6 / transactions.max(1) as f64
        };
        (
            per(self.user, earlier.user),
            per(self.system, earlier.system),
            per(self.softirq, earlier.softirq),
        )
    }
}

/// One request/response of `size` bytes on `stream`.
fn transact(stream: &mut TcpStream, message: &[u8], reply: &mut [u8]) -> io::Result<()> {
    stream.write_all(message)?;
    stream.read_exact(reply)
}

/// Runs `kind` against `target` for `duration` from the calling thread's
/// namespace.
pub fn measure(kind: Kind, target: SocketAddr, duration: Duration) -> Result<Measurement> {
    if !matches!(kind, Kind::Latency | Kind::Rr | Kind::Crr) {
        return measure_tool(kind, target, duration);
    }
    let size = kind.message_size();
    let message = vec![0x5au8; size];
    let mut reply = vec![0u8; size];
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let timeout = Duration::from_secs(2);
    let mut errors = 0u64;
    let connect = || -> io::Result<TcpStream> {
        let stream = TcpStream::connect_timeout(&target, timeout)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        Ok(stream)
    };
    // Warm-up (excluded, like sockperf's 400 ms): ARP, conntrack, caches.
    let warmup = Duration::from_millis(200).min(duration / 4);
    let mut stream = match kind {
        Kind::Crr => None,
        _ => Some(connect().with_context(|| format!("connecting to {target}"))?),
    };
    let mut phase_end = Instant::now() + warmup;
    let mut measuring = false;
    let mut started = Instant::now();
    let mut cpu_start = CpuTimes::default();
    loop {
        let now = Instant::now();
        if now >= phase_end {
            if measuring {
                break;
            }
            measuring = true;
            started = now;
            cpu_start = CpuTimes::now();
            phase_end = now + duration;
        }
        let begin = Instant::now();
        let result = match (&mut stream, kind) {
            (Some(stream), _) => transact(stream, &message, &mut reply),
            (None, _) => connect().and_then(|mut s| transact(&mut s, &message, &mut reply)),
        };
        let elapsed = begin.elapsed().as_nanos() as u64;
        match result {
            Ok(()) if measuring => {
                let value = if kind == Kind::Latency {
                    elapsed / 2
                } else {
                    elapsed
                };
                histogram.record(value.max(1))?;
            }
            Ok(()) => {}
            Err(_) => {
                errors += 1;
                if kind != Kind::Crr {
                    stream = Some(connect().with_context(|| format!("reconnecting to {target}"))?);
                }
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let transactions = histogram.len();
    let (cpu_user_us, cpu_system_us, cpu_softirq_us) =
        CpuTimes::now().per_transaction(cpu_start, transactions);
    Ok(Measurement {
        cpu_user_us,
        cpu_system_us,
        cpu_softirq_us,
        kind,
        transactions,
        seconds,
        per_second: transactions as f64 / seconds,
        mean_us: histogram.mean() / 1e3,
        p50_us: histogram.value_at_quantile(0.5) as f64 / 1e3,
        p99_us: histogram.value_at_quantile(0.99) as f64 / 1e3,
        errors,
    })
}
