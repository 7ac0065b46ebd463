//! What loading and attaching can fail with, named for the operator.

use std::{io, path::PathBuf};

use aya::programs::ProgramError;

use crate::tc_mode::TcMode;

/// Each message carries its cause inline (one line in logs); the cause is
/// deliberately not also exposed as `source()`, which would print it twice
/// through anyhow's `{:#}`.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error(
        "this binary carries no eBPF object: run `cargo xtask build-ebpf` and rebuild (or use `cargo xtask test|demo`, which do both)"
    )]
    ObjectMissing,
    #[error("the datapath's event log (ring buffer AYA_LOGS): {reason}")]
    EventLog { reason: String },
    #[error("bpffs at {path}: {error} (mount it with: mount -t bpf bpf /sys/fs/bpf)")]
    Bpffs { path: PathBuf, error: io::Error },
    #[error("loading the eBPF object: {}", with_causes(.0))]
    Load(aya::EbpfError),
    #[error("program {program}: {}", with_causes(&**.error))]
    Program {
        program: &'static str,
        error: Box<ProgramError>,
    },
    #[error("map {map}: {}", with_causes(&**.error))]
    Map {
        map: &'static str,
        error: Box<aya::maps::MapError>,
    },
    #[error("network namespace {netns}: {error}")]
    Netns { netns: String, error: io::Error },
    #[error("interface {iface} in network namespace {netns}: no such interface")]
    NoInterface { netns: String, iface: String },
    #[error("attaching {program} to {iface} (netns {netns}) with {mode}: {}", with_causes(&**.error))]
    Attach {
        program: &'static str,
        iface: String,
        netns: String,
        mode: TcMode,
        error: Box<ProgramError>,
    },
    #[error("kernel {kernel} lacks {feature}: {hint}")]
    KernelFeature {
        kernel: String,
        feature: &'static str,
        hint: String,
    },
    #[error("pin {path}: {reason}")]
    Pin { path: PathBuf, reason: String },
    #[error("cgroup {path}: {reason}")]
    Cgroup { path: PathBuf, reason: String },
}

/// An error and its causes on one line ("a: b: c"), skipping a cause
/// whose text its parent already shows.
pub fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(next) = cause {
        let next_text = next.to_string();
        if !text.contains(&next_text) {
            text.push_str(": ");
            text.push_str(&next_text);
        }
        cause = next.source();
    }
    text
}

impl From<aya::EbpfError> for LoaderError {
    fn from(error: aya::EbpfError) -> Self {
        LoaderError::Load(error)
    }
}

impl LoaderError {
    pub(crate) fn program(program: &'static str, source: ProgramError) -> Self {
        Self::Program {
            program,
            error: Box::new(source),
        }
    }

    pub(crate) fn map(map: &'static str, source: aya::maps::MapError) -> Self {
        Self::Map {
            map,
            error: Box::new(source),
        }
    }
}
