//! What a measurement cost in CPU, per unit of work (transaction,
//! message, request, MB).
//!
//! The total is the machine's busy time (`/proc/stat`: user, nice,
//! system, irq, softirq) less the agent's (its own cgroup): both ends and
//! all their packet processing run on this host, wherever the kernel
//! runs it (in the sender's context, in the receiver's, in ksoftirqd),
//! and nothing else works while a measurement runs. It cannot be the sum
//! of the client's and the server's cgroups plus softirq: without
//! `CONFIG_IRQ_TIME_ACCOUNTING` a softirq tick that lands in a task is
//! charged to both its cgroup's system time and `/proc/stat`'s softirq.
//! Beside the total, as a breakdown: the client's and the servers'
//! cgroups (`cpu.stat`), machine-wide softirq and irq time, steal,
//! network softirqs raised (`/proc/softirqs`), and the agent's CPU.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// The cgroups a measurement reads.
#[derive(Clone, Debug)]
pub struct CpuPlaces {
    pub client: PathBuf,
    pub server: PathBuf,
    pub agent: Option<PathBuf>,
}

/// `cpu.stat` of one cgroup, µs.
#[derive(Clone, Copy, Debug, Default)]
struct CgroupCpu {
    user: u64,
    system: u64,
}

impl CgroupCpu {
    fn read(cgroup: &Path) -> Result<Self> {
        let path = cgroup.join("cpu.stat");
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let field = |name: &str| -> Result<u64> {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
                .with_context(|| format!("{}: no {name}", path.display()))
        };
        Ok(Self {
            user: field("user_usec")?,
            system: field("system_usec")?,
        })
    }
}

/// Machine-wide counters.
#[derive(Clone, Copy, Debug, Default)]
struct MachineCpu {
    /// /proc/stat, clock ticks: user + nice + system + irq + softirq.
    busy: u64,
    irq: u64,
    softirq: u64,
    steal: u64,
    /// /proc/softirqs NET_RX + NET_TX over every CPU.
    net_softirqs: u64,
}

impl MachineCpu {
    fn read() -> Result<Self> {
        let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        // "cpu  user nice system idle iowait irq softirq steal …"
        let fields: Vec<u64> = stat
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("cpu "))
            .context("/proc/stat: no cpu line")?
            .split_whitespace()
            .map(|f| f.parse().context("/proc/stat: a field is not a number"))
            .collect::<Result<_>>()?;
        let at = |i: usize| fields.get(i).copied().context("/proc/stat: short cpu line");
        let softirqs = fs::read_to_string("/proc/softirqs").context("reading /proc/softirqs")?;
        let mut net_softirqs = 0;
        for line in softirqs.lines() {
            let line = line.trim_start();
            if line.starts_with("NET_RX:") || line.starts_with("NET_TX:") {
                net_softirqs += line
                    .split_whitespace()
                    .skip(1)
                    .map(|v| v.parse::<u64>().unwrap_or(0))
                    .sum::<u64>();
            }
        }
        Ok(Self {
            busy: at(0)? + at(1)? + at(2)? + at(5)? + at(6)?,
            irq: at(5)?,
            softirq: at(6)?,
            steal: at(7)?,
            net_softirqs,
        })
    }
}

/// The counters at one end of a measurement window.
#[derive(Clone, Debug)]
pub struct CpuSnapshot {
    client: CgroupCpu,
    server: CgroupCpu,
    agent: Option<CgroupCpu>,
    machine: MachineCpu,
}

impl CpuPlaces {
    pub fn snapshot(&self) -> Result<CpuSnapshot> {
        Ok(CpuSnapshot {
            client: CgroupCpu::read(&self.client)?,
            server: CgroupCpu::read(&self.server)?,
            agent: self.agent.as_deref().map(CgroupCpu::read).transpose()?,
            machine: MachineCpu::read()?,
        })
    }
}

/// CPU per unit of work, µs (network softirqs: raised per unit).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuCost {
    /// The machine's busy time less the agent's: what the ends and the
    /// datapath cost.
    pub total_us: f64,
    pub client_user_us: f64,
    pub client_system_us: f64,
    pub server_user_us: f64,
    pub server_system_us: f64,
    pub softirq_us: f64,
    pub irq_us: f64,
    /// Time the hypervisor ran someone else on our CPUs (a VM's noise).
    pub steal_us: f64,
    pub net_softirqs: f64,
    /// The underpass agent's own CPU, if one runs (not in `total_us`).
    pub agent_us: Option<f64>,
}

impl CpuSnapshot {
    /// The cost of the work between `earlier` and this snapshot, per one
    /// of `units`.
    pub fn cost_since(&self, earlier: &CpuSnapshot, units: f64) -> CpuCost {
        let units = units.max(1e-9);
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let usec = |now: u64, then: u64| now.saturating_sub(then) as f64 / units;
        let ticks = |now: u64, then: u64| now.saturating_sub(then) as f64 / hz * 1e6 / units;
        let (m, e) = (&self.machine, &earlier.machine);
        let agent_us = match (&self.agent, &earlier.agent) {
            (Some(now), Some(then)) => {
                Some(usec(now.user, then.user) + usec(now.system, then.system))
            }
            _ => None,
        };
        CpuCost {
            total_us: (ticks(m.busy, e.busy) - agent_us.unwrap_or(0.0)).max(0.0),
            client_user_us: usec(self.client.user, earlier.client.user),
            client_system_us: usec(self.client.system, earlier.client.system),
            server_user_us: usec(self.server.user, earlier.server.user),
            server_system_us: usec(self.server.system, earlier.server.system),
            softirq_us: ticks(m.softirq, e.softirq),
            irq_us: ticks(m.irq, e.irq),
            steal_us: ticks(m.steal, e.steal),
            net_softirqs: m.net_softirqs.saturating_sub(e.net_softirqs) as f64 / units,
            agent_us,
        }
    }
}
