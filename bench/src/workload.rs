//! The bench's own workloads: a fixed-size echo server, and clients for
//! ping-pong latency (sockperf's one-way = RTT/2), TCP_RR (netperf's
//! `-r100,100`: one connection, one transaction at a time) and TCP_CRR
//! (a new connection per transaction).
//!
//! Clients run in a worker process (`bench worker`), so each can join the
//! client pod's namespace, the socket-LB cgroup and a CPU of its own.

use std::{
    io::{self, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use lab::Namespace;
use serde::{Deserialize, Serialize};

/// What a client measures.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum, Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// 64-byte ping-pong on one connection; one-way latency (RTT/2).
    Latency,
    /// 100-byte request/response on one connection; transactions/s.
    Rr,
    /// connect + 100-byte request/response + close; transactions/s.
    Crr,
    /// `sockperf ping-pong --tcp -m 64` (the seed's latency tool); µs.
    Sockperf,
    /// `iperf3 -P 1`; Gbit/s.
    Iperf1,
    /// `iperf3 -P 2`; Gbit/s.
    Iperf2,
    /// `iperf3 -P 4`; Gbit/s.
    Iperf4,
    /// `redis-benchmark -d 1000 -t get`; requests/s.
    RedisGet,
    /// `redis-benchmark -d 1000 -t set`; requests/s.
    RedisSet,
}

/// Ports the servers listen on (the Service maps the same numbers).
/// Client and server on different CPUs (2-core machine: one each).
pub const CLIENT_CPU: usize = 0;
pub const SERVER_CPU: usize = 1;

pub const ECHO_PORT: u16 = 12345;
pub const SOCKPERF_PORT: u16 = 11111;
pub const IPERF_PORT: u16 = 5201;
pub const REDIS_PORT: u16 = 6379;

impl Kind {
    pub const ALL: [Kind; 9] = [
        Kind::Latency,
        Kind::Sockperf,
        Kind::Rr,
        Kind::Crr,
        Kind::Iperf1,
        Kind::Iperf2,
        Kind::Iperf4,
        Kind::RedisGet,
        Kind::RedisSet,
    ];

    pub fn message_size(self) -> usize {
        match self {
            Kind::Latency => 64,
            _ => 100,
        }
    }

    pub fn port(self) -> u16 {
        match self {
            Kind::Latency | Kind::Rr | Kind::Crr => ECHO_PORT,
            Kind::Sockperf => SOCKPERF_PORT,
            Kind::Iperf1 | Kind::Iperf2 | Kind::Iperf4 => IPERF_PORT,
            Kind::RedisGet | Kind::RedisSet => REDIS_PORT,
        }
    }

    pub fn arg(self) -> &'static str {
        match self {
            Kind::Latency => "latency",
            Kind::Rr => "rr",
            Kind::Crr => "crr",
            Kind::Sockperf => "sockperf",
            Kind::Iperf1 => "iperf1",
            Kind::Iperf2 => "iperf2",
            Kind::Iperf4 => "iperf4",
            Kind::RedisGet => "redis-get",
            Kind::RedisSet => "redis-set",
        }
    }
}

/// Starts sockperf, iperf3 and redis servers on `address` inside
/// `namespace`, pinned to `cpu`; they are killed when the returned
/// handles drop.
pub fn start_tool_servers(
    namespace: &Namespace,
    address: Ipv4Addr,
    cpu: usize,
) -> Result<Vec<ServerProcess>> {
    let a = address.to_string();
    let commands: Vec<(&str, Vec<String>)> = vec![
        (
            "sockperf",
            vec![
                "server".into(),
                "--tcp".into(),
                "-i".into(),
                a.clone(),
                "-p".into(),
                SOCKPERF_PORT.to_string(),
            ],
        ),
        (
            "iperf3",
            vec![
                "-s".into(),
                "-B".into(),
                a.clone(),
                "-p".into(),
                IPERF_PORT.to_string(),
            ],
        ),
        (
            "redis-server",
            [
                "--bind",
                &a,
                "--port",
                &REDIS_PORT.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
                "--daemonize",
                "no",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        ),
    ];
    let mut servers = Vec::new();
    for (program, args) in commands {
        let child = namespace
            .run(|| -> io::Result<std::process::Child> {
                let _ = pin_to_cpu(cpu);
                std::process::Command::new(program)
                    .args(&args)
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
            })?
            .with_context(|| format!("starting {program} (installed by `cargo xtask bench`)"))?;
        lab::own_child(child.id());
        servers.push(ServerProcess(child));
    }
    // Until every port accepts connections.
    let deadline = Instant::now() + Duration::from_secs(10);
    for port in [SOCKPERF_PORT, IPERF_PORT, REDIS_PORT] {
        loop {
            let up = namespace
                .run(|| {
                    TcpStream::connect_timeout(
                        &SocketAddrV4::new(address, port).into(),
                        Duration::from_millis(200),
                    )
                    .is_ok()
                })
                .unwrap_or(false);
            if up {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "no server on {address}:{port} after 10 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(servers)
}

/// A server process, killed on drop.
pub struct ServerProcess(std::process::Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        lab::disown_child(self.0.id());
    }
}

/// Runs a Debian tool from the calling thread's namespace and parses its
/// figure.
fn measure_tool(kind: Kind, target: SocketAddr, duration: Duration) -> Result<Measurement> {
    let ip = target.ip().to_string();
    let port = target.port().to_string();
    let seconds = duration.as_secs_f64().ceil().max(1.0) as u64;
    let (program, args): (&str, Vec<String>) = match kind {
        Kind::Sockperf => (
            "sockperf",
            [
                "ping-pong",
                "--tcp",
                "-i",
                &ip,
                "-p",
                &port,
                "-t",
                &seconds.to_string(),
                "-m",
                "64",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        ),
        Kind::Iperf1 | Kind::Iperf2 | Kind::Iperf4 => {
            let streams = match kind {
                Kind::Iperf1 => "1",
                Kind::Iperf2 => "2",
                _ => "4",
            };
            (
                "iperf3",
                [
                    "-c",
                    &ip,
                    "-p",
                    &port,
                    "-t",
                    &seconds.to_string(),
                    "-P",
                    streams,
                    "-J",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            )
        }
        Kind::RedisGet | Kind::RedisSet => {
            let requests = (seconds * 20_000).to_string();
            let test = if kind == Kind::RedisGet { "get" } else { "set" };
            (
                "redis-benchmark",
                [
                    "-h", &ip, "-p", &port, "-d", "1000", "-t", test, "-n", &requests, "--csv",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            )
        }
        _ => unreachable!("own workloads are measured by `measure`"),
    };
    let cpu_start = CpuTimes::now();
    let started = Instant::now();
    let output = std::process::Command::new(program)
        .args(&args)
        .output()
        .with_context(|| format!("running {program} (installed by `cargo xtask bench`)"))?;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_end = CpuTimes::now();
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    anyhow::ensure!(output.status.success(), "{program} failed: {}", text.trim());
    let field = |name: &str| -> Option<f64> {
        let at = text.find(name)? + name.len();
        text[at..]
            .split(|c: char| !(c.is_ascii_digit() || c == '.'))
            .next()?
            .parse()
            .ok()
    };
    let (per_second, transactions, mean_us, p50_us, p99_us) = match kind {
        Kind::Sockperf => {
            let mean = field("avg-latency=").context("sockperf printed no avg-latency")?;
            let messages = field("ReceivedMessages=").unwrap_or(0.0);
            let p50 = field("percentile 50.000 =").unwrap_or(mean);
            let p99 = field("percentile 99.000 =").unwrap_or(mean);
            (messages / elapsed, messages as u64, mean, p50, p99)
        }
        Kind::Iperf1 | Kind::Iperf2 | Kind::Iperf4 => {
            let json: serde_json::Value =
                serde_json::from_str(&String::from_utf8_lossy(&output.stdout))
                    .context("iperf3 -J output")?;
            let received = &json["end"]["sum_received"];
            let bits = received["bits_per_second"]
                .as_f64()
                .context("iperf3 printed no rate")?;
            let megabytes = received["bytes"].as_f64().unwrap_or(0.0) / 1e6;
            (bits / 1e9, megabytes as u64, 0.0, 0.0, 0.0)
        }
        _ => {
            // "GET","61349.69","0.455",… (the header line has no digits).
            let line = text
                .lines()
                .find(|l| l.starts_with("\"GET\"") || l.starts_with("\"SET\""))
                .context("redis-benchmark printed no result line")?;
            let cells: Vec<f64> = line
                .split(',')
                .map(|c| c.trim_matches('"').parse().unwrap_or(0.0))
                .collect();
            let rps = cells.get(1).copied().unwrap_or(0.0);
            let requests = (seconds * 20_000) as f64;
            (
                rps,
                requests as u64,
                cells.get(2).copied().unwrap_or(0.0) * 1e3,
                cells.get(5).copied().unwrap_or(0.0) * 1e3,
                cells.get(7).copied().unwrap_or(0.0) * 1e3,
            )
        }
    };
    let (cpu_user_us, cpu_system_us, cpu_softirq_us) =
        cpu_end.per_transaction(cpu_start, transactions);
    Ok(Measurement {
        kind,
        transactions,
        seconds: elapsed,
        per_second,
        mean_us,
        p50_us,
        p99_us,
        errors: 0,
        cpu_user_us,
        cpu_system_us,
        cpu_softirq_us,
    })
}

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

/// Starts an echo server on `address:port` inside `namespace` (a thread
/// per connection, on `cpu` if given). Runs until the process exits.
pub fn start_echo_server(
    namespace: &Namespace,
    address: Ipv4Addr,
    port: u16,
    cpu: Option<usize>,
) -> Result<()> {
    let listener = namespace
        .run(|| TcpListener::bind(SocketAddrV4::new(address, port)))
        .context("entering the server namespace")?
        .with_context(|| format!("binding {address}:{port} in {}", namespace.name()))?;
    std::thread::spawn(move || {
        if let Some(cpu) = cpu {
            let _ = pin_to_cpu(cpu);
        }
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || echo(stream));
        }
    });
    Ok(())
}

fn echo(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if stream.write_all(&buffer[..n]).is_err() {
                    return;
                }
            }
        }
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

/// `bench worker`: one client run inside a namespace (and cgroup, and on
/// a CPU), printing its [`Measurement`] as JSON.
#[derive(Parser, Debug)]
pub struct WorkerOpts {
    #[arg(long)]
    pub netns: PathBuf,
    /// cgroup v2 directory to join first (socket-LB translates only
    /// processes below the cgroup it is attached to).
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// CPU to pin the client to.
    #[arg(long)]
    pub cpu: Option<usize>,
    #[arg(long, value_enum)]
    pub kind: Kind,
    #[arg(long)]
    pub target: SocketAddr,
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
}

pub fn worker(opts: &WorkerOpts) -> Result<()> {
    enter_client(&opts.netns, opts.cgroup.as_deref(), opts.cpu)?;
    let measurement = measure(
        opts.kind,
        opts.target,
        Duration::from_secs_f64(opts.seconds),
    )?;
    println!("{}", serde_json::to_string(&measurement)?);
    Ok(())
}

/// Runs one `bench worker` (this binary) in `netns` (and `cgroup`), on
/// [`CLIENT_CPU`], and reads its measurement.
pub fn run_worker(
    netns: &Path,
    cgroup: Option<&Path>,
    kind: Kind,
    target: SocketAddr,
    seconds: f64,
) -> Result<Measurement> {
    let mut command = Command::new(std::env::current_exe()?);
    command
        .arg("worker")
        .arg("--netns")
        .arg(netns)
        .args(["--cpu", &CLIENT_CPU.to_string()])
        .args(["--kind", kind.arg()])
        .args(["--target", &target.to_string()])
        .args(["--seconds", &seconds.to_string()])
        .stderr(Stdio::inherit());
    if let Some(cgroup) = cgroup {
        command.arg("--cgroup").arg(cgroup);
    }
    let output = crate::workload::owned_output(&mut command)?;
    if !output.status.success() {
        bail!("worker failed ({})", output.status);
    }
    serde_json::from_slice(&output.stdout).context("reading the worker's result")
}

/// Runs `command` to completion (stdout captured) as a child an
/// interrupted run kills ([`lab::own_child`]): a
/// worker must not outlive the namespaces and cgroup it is in.
pub fn owned_output(command: &mut std::process::Command) -> Result<std::process::Output> {
    let child = command
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting a bench worker")?;
    let pid = child.id();
    lab::own_child(pid);
    let output = child.wait_with_output();
    lab::disown_child(pid);
    Ok(output?)
}

/// Puts this (single-threaded, client) process where a measurement runs:
/// into `cgroup` (socket-LB translates only processes below the cgroup it
/// is attached to), onto `cpu`, then into the namespace `netns`.
pub fn enter_client(
    netns: &std::path::Path,
    cgroup: Option<&std::path::Path>,
    cpu: Option<usize>,
) -> Result<()> {
    if let Some(cgroup) = cgroup {
        std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
            .with_context(|| format!("joining cgroup {}", cgroup.display()))?;
    }
    if let Some(cpu) = cpu {
        pin_to_cpu(cpu)?;
    }
    datapath_user::netns::enter(netns).with_context(|| format!("entering {}", netns.display()))
}

/// Pins the calling thread (and what it spawns) to `cpu`.
pub fn pin_to_cpu(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("pinning to CPU {cpu}"));
        }
    }
    Ok(())
}
