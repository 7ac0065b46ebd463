//! The machine a result was measured on, recorded with it: figures from
//! a 2-core VM and from bare metal are not peers.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Machine {
    /// `uname -r`.
    pub kernel: String,
    /// /proc/cpuinfo's first `model name`.
    pub cpu_model: String,
    pub cpus: usize,
    /// Whether /proc/cpuinfo says a hypervisor runs us (steal can occur).
    pub virtual_machine: bool,
}

impl Machine {
    pub fn describe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let field = |name: &str| {
            cpuinfo
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        };
        Self {
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            cpu_model: field("model name").unwrap_or_else(|| "unknown".into()),
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            virtual_machine: field("flags")
                .is_some_and(|f| f.split(' ').any(|x| x == "hypervisor")),
        }
    }
}

impl std::fmt::Display for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} × {}, Linux {}{}",
            self.cpus,
            self.cpu_model,
            self.kernel,
            if self.virtual_machine { ", a VM" } else { "" }
        )
    }
}
