//! The Debian tools the seed ran: sockperf, iperf3 and redis — their
//! servers in a namespace, their clients, and the figure read from each
//! client's output.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    process::Command,
};

use anyhow::{Context, Result};
use lab::Namespace;

use super::{
    IPERF_PORT, Kind, Measurement, REDIS_PORT, SOCKPERF_PORT,
    cpu::CpuPlaces,
    parameters::Parameters,
    parse,
    servers::{ServerProcess, spawn_server, wait_for_port},
};

/// Starts sockperf, iperf3 and redis servers on `address` inside
/// `namespace`, pinned to `cpu`, in `cgroup`; they are killed when the
/// returned handles drop. Over IPv6 no sockperf: Debian's 3.7 takes
/// IPv4 addresses only ([`Kind::ipv4_only`]).
pub fn start_tool_servers(
    namespace: &Namespace,
    address: IpAddr,
    cpu: usize,
    cgroup: &Path,
) -> Result<Vec<ServerProcess>> {
    let a = address.to_string();
    let (sockperf, iperf, redis) = (
        SOCKPERF_PORT.to_string(),
        IPERF_PORT.to_string(),
        REDIS_PORT.to_string(),
    );
    let commands: [(&str, Vec<&str>, u16); 3] = [
        (
            "sockperf",
            vec!["server", "--tcp", "-i", &a, "-p", &sockperf],
            SOCKPERF_PORT,
        ),
        ("iperf3", vec!["-s", "-B", &a, "-p", &iperf], IPERF_PORT),
        (
            "redis-server",
            vec![
                "--bind",
                &a,
                "--port",
                &redis,
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
                "--daemonize",
                "no",
            ],
            REDIS_PORT,
        ),
    ];
    let mut servers = Vec::new();
    for (program, args, port) in commands {
        if address.is_ipv6() && program == "sockperf" && Kind::Sockperf.ipv4_only() {
            continue;
        }
        let mut command = Command::new(program);
        command.args(args);
        servers.push(spawn_server(namespace, command, cpu, cgroup, program)?);
        wait_for_port(namespace, address, port)?;
    }
    Ok(servers)
}

/// Runs a Debian tool from the calling thread's namespace with `run`'s
/// parameters and reads its figures ([`parse`]).
pub(super) fn measure_tool(
    kind: Kind,
    target: SocketAddr,
    run: &Parameters,
    places: &CpuPlaces,
) -> Result<Measurement> {
    let ip = target.ip().to_string();
    let port = target.port().to_string();
    let seconds = (run.seconds.ceil().max(1.0) as u64).to_string();
    let requests = run.requests.to_string();
    let (program, args): (&str, Vec<&str>) = match kind {
        // The seed's command; sockperf's default message size.
        Kind::Sockperf => (
            "sockperf",
            vec!["ping-pong", "--tcp", "-i", &ip, "-p", &port, "-t", &seconds],
        ),
        Kind::Iperf1 | Kind::Iperf2 | Kind::Iperf4 => {
            let streams = match kind {
                Kind::Iperf1 => "1",
                Kind::Iperf2 => "2",
                _ => "4",
            };
            (
                "iperf3",
                vec!["-c", &ip, "-p", &port, "-t", &seconds, "-P", streams, "-J"],
            )
        }
        Kind::RedisGet | Kind::RedisSet => {
            if kind == Kind::RedisGet {
                // `-t get,set` runs SET first: GETs then return the
                // 1000-byte value, not nil. Without `-r` every request
                // uses one key, so one short SET run loads it.
                run_tool(
                    "redis-benchmark",
                    &[
                        "-h", &ip, "-p", &port, "-d", "1000", "-t", "set", "-n", "100", "-c", "1",
                        "-q",
                    ],
                )?;
            }
            let test = if kind == Kind::RedisGet { "get" } else { "set" };
            (
                "redis-benchmark",
                vec![
                    "-h", &ip, "-p", &port, "-d", "1000", "-t", test, "-n", &requests, "--csv",
                ],
            )
        }
        _ => unreachable!("own workloads are measured by `measure`"),
    };
    let mut args = args;
    let omit = run.omit_seconds.to_string();
    if program == "iperf3" && run.omit_seconds > 0 {
        args.extend(["-O", &omit]);
    }
    // The window is the tool's whole run (its warm-up and omitted
    // seconds too), so CPU is divided by the work of the whole run.
    let cpu_start = places.snapshot()?;
    let (stdout, text) = run_tool(program, &args)?;
    let cpu_end = places.snapshot()?;
    let (per_second, transactions, seconds, latency, work_in_window) = match kind {
        Kind::Sockperf => {
            let f = parse::sockperf(&text)?;
            (
                f.received_messages as f64 / f.valid_seconds,
                f.received_messages,
                f.valid_seconds,
                Some((f.mean_us, f.p50_us, f.p99_us)),
                f.total_received_messages as f64,
            )
        }
        Kind::Iperf1 | Kind::Iperf2 | Kind::Iperf4 => {
            let f = parse::iperf3(&stdout)?;
            // Per MB: the CPU columns are per MB moved.
            (
                f.bits_per_second / 1e9,
                (f.bytes / 1e6) as u64,
                f.seconds,
                None,
                f.bytes_with_omitted / 1e6,
            )
        }
        _ => {
            let test = if kind == Kind::RedisGet { "GET" } else { "SET" };
            let f = parse::redis_csv(&stdout, test)?;
            (
                f.requests_per_second,
                run.requests,
                run.requests as f64 / f.requests_per_second,
                Some((f.mean_us, f.p50_us, f.p99_us)),
                run.requests as f64,
            )
        }
    };
    let cpu = cpu_end.cost_since(&cpu_start, work_in_window);
    Ok(Measurement {
        kind,
        transactions,
        seconds,
        per_second,
        mean_us: latency.map(|l| l.0),
        p50_us: latency.map(|l| l.1),
        p99_us: latency.map(|l| l.2),
        errors: 0,
        cpu,
    })
}

/// Runs `program` to completion; its stdout, and stdout + stderr (for
/// parsers reading both and for the error).
fn run_tool(program: &str, args: &[&str]) -> Result<(String, String)> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program} (installed by `cargo xtask bench`)"))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let both = stdout.clone() + &String::from_utf8_lossy(&output.stderr);
    anyhow::ensure!(
        output.status.success(),
        "{program} {} failed ({}): {}",
        args.join(" "),
        output.status,
        both.trim()
    );
    Ok((stdout, both))
}
