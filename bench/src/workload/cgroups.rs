//! The cgroups a bench runs its processes in, one per side, so that the
//! client's, the servers' and the agent's CPU are each read apart from
//! `cpu.stat` (and the bench's own threads are in none of them).

use anyhow::{Context, Result};
use lab::Cgroup;

pub struct BenchCgroups {
    /// Clients of every mode but socket-LB (whose client joins the
    /// cgroup socket-LB is attached to).
    pub clients: Cgroup,
    /// Every server process.
    pub servers: Cgroup,
    /// The underpass agent.
    pub agent: Cgroup,
}

impl BenchCgroups {
    /// `<prefix>-clients`, `<prefix>-servers`, `<prefix>-agent`.
    pub fn create(prefix: &str) -> Result<Self> {
        let create = |side: &str| {
            let name = format!("{prefix}-{side}");
            Cgroup::create(&name).with_context(|| format!("creating cgroup {name}"))
        };
        Ok(Self {
            clients: create("clients")?,
            servers: create("servers")?,
            agent: create("agent")?,
        })
    }

    /// Moves process `pid` (all its threads) into the agent's cgroup.
    pub fn adopt_agent(&self, pid: u32) -> Result<()> {
        std::fs::write(self.agent.path().join("cgroup.procs"), pid.to_string())
            .context("moving the agent into its cgroup")
    }
}
