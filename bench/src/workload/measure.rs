//! One client run: the built-in clients (ping-pong latency, TCP_RR,
//! TCP_CRR) timed per transaction, the tools' through `tools`, and the
//! CPU the run cost (`cpu`).

use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use super::{
    Kind,
    cpu::{CpuCost, CpuPlaces},
    parameters::Parameters,
    tools::measure_tool,
};

/// One client run's figures.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Measurement {
    pub kind: Kind,
    pub transactions: u64,
    pub seconds: f64,
    pub per_second: f64,
    /// Per transaction (latency: one-way, i.e. RTT/2), µs; none for
    /// throughput (iperf3).
    pub mean_us: Option<f64>,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub errors: u64,
    /// CPU per transaction, message, request or MB over the same window.
    pub cpu: CpuCost,
}

/// One request/response of `size` bytes on `stream`.
fn transact(stream: &mut TcpStream, message: &[u8], reply: &mut [u8]) -> io::Result<()> {
    stream.write_all(message)?;
    stream.read_exact(reply)
}

/// Runs `kind` against `target` with `run`'s parameters from the calling
/// thread's namespace; CPU read from `places`.
pub fn measure(
    kind: Kind,
    target: SocketAddr,
    run: &Parameters,
    places: &CpuPlaces,
) -> Result<Measurement> {
    anyhow::ensure!(
        kind != Kind::PacketRate,
        "the packet rate needs where its packets are counted: measure_packet_rate"
    );
    if !matches!(kind, Kind::Latency | Kind::Rr | Kind::Crr) {
        return measure_tool(kind, target, run, places);
    }
    let duration = Duration::from_secs_f64(run.seconds);
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
    let mut cpu_start = None;
    loop {
        let now = Instant::now();
        if now >= phase_end {
            if measuring {
                break;
            }
            measuring = true;
            started = now;
            cpu_start = Some(places.snapshot()?);
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
    let cpu_end = places.snapshot()?;
    let transactions = histogram.len();
    let cpu = cpu_end.cost_since(cpu_start.as_ref().expect("measured"), transactions as f64);
    Ok(Measurement {
        cpu,
        kind,
        transactions,
        seconds,
        per_second: transactions as f64 / seconds,
        mean_us: Some(histogram.mean() / 1e3),
        p50_us: Some(histogram.value_at_quantile(0.5) as f64 / 1e3),
        p99_us: Some(histogram.value_at_quantile(0.99) as f64 / 1e3),
        errors,
    })
}
