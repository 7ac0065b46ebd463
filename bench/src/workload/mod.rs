//! The bench's own workloads: a fixed-size echo server, and clients for
//! ping-pong latency (sockperf's one-way = RTT/2), TCP_RR (netperf's
//! `-r100,100`: one connection, one transaction at a time) and TCP_CRR
//! (a new connection per transaction).
//!
//! Clients run in a worker process (`bench worker`), so each can join the
//! client pod's namespace, the socket-LB cgroup and a CPU of its own.
//!
//! One concern per file: `servers` (the echo server as a process, and
//! what every server process shares: namespace, CPU, cgroup), `tools` (sockperf,
//! iperf3 and redis: servers and clients), `parse` (the tools' output),
//! `parameters` (the seed's parameters and how a run differs), `measure`
//! (a client run's figures), `cpu` (the CPU it cost, from cgroups and
//! the kernel's counters), `packet_rate` (small UDP datagrams from one
//! CPU, counted where they end), `worker` (the worker process, and
//! running one).

mod cgroups;
mod cpu;
mod measure;
mod packet_rate;
mod parameters;
pub mod parse;
mod servers;
mod tools;
mod worker;

use clap::ValueEnum;
use serde::{Deserialize, Serialize};

pub use self::{
    cgroups::BenchCgroups,
    cpu::{CpuCost, CpuPlaces},
    measure::{Measurement, measure},
    packet_rate::{Arrivals, measure_packet_rate},
    parameters::Parameters,
    servers::{
        EchoServerOpts, ServerProcess, echo_server, start_echo_server, start_echo_server_and_sink,
    },
    tools::start_tool_servers,
    worker::{ClientPlace, WorkerOpts, enter_client, owned_output, pin_to_cpu, run_worker, worker},
};

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
    /// `sockperf ping-pong --tcp` (the seed's latency tool); µs.
    Sockperf,
    /// `iperf3 -P 1`; Gbit/s.
    Iperf1,
    /// `iperf3 -P 2`; Gbit/s.
    Iperf2,
    /// `iperf3 -P 4`; Gbit/s.
    Iperf4,
    /// `redis-benchmark -d 1000 -t get` after a SET of the key; requests/s.
    RedisGet,
    /// `redis-benchmark -d 1000 -t set`; requests/s.
    RedisSet,
    /// 18-byte UDP datagrams (60-byte frames) sent as fast as one CPU
    /// can (`sendmmsg`); packets/s that arrive (`bench node-port` only).
    PacketRate,
}

/// Ports the servers listen on (the Service maps the same numbers).
/// Client and server on different CPUs (2-core machine: one each).
pub const CLIENT_CPU: usize = 0;
pub const SERVER_CPU: usize = 1;

pub const ECHO_PORT: u16 = 12345;
pub const SOCKPERF_PORT: u16 = 11111;
pub const IPERF_PORT: u16 = 5201;
pub const REDIS_PORT: u16 = 6379;
/// UDP: the packet-rate workload's sink.
pub const PACKET_PORT: u16 = 12346;

impl Kind {
    /// The workloads every preset runs (the packet rate is north-south's
    /// alone: [`Kind::north_south_only`]).
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
            Kind::PacketRate => PACKET_PORT,
        }
    }

    /// Measured by `bench node-port` only: its testbed has the UDP sinks
    /// and the counters the workload is judged by.
    pub fn north_south_only(self) -> bool {
        self == Kind::PacketRate
    }

    /// Whether the workload's tool takes IPv4 addresses only: Debian's
    /// sockperf 3.7 (IPv6 came in 3.8), so `--family 6` leaves it out and
    /// says so; `latency` is the same ping-pong by the bench's own client.
    pub fn ipv4_only(self) -> bool {
        self == Kind::Sockperf
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
            Kind::PacketRate => "packet-rate",
        }
    }
}
