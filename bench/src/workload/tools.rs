//! The Debian tools the seed ran: sockperf, iperf3 and redis — their
//! servers in a namespace, their clients, and the figure read from each
//! client's output.

use std::{
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use lab::Namespace;

use super::{CpuTimes, IPERF_PORT, Kind, Measurement, REDIS_PORT, SOCKPERF_PORT, pin_to_cpu};

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
pub(super) fn measure_tool(
    kind: Kind,
    target: SocketAddr,
    duration: Duration,
) -> Result<Measurement> {
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
