//! The loaded programs by name, and the TC pair pinned for the CNI
//! plugin (which attaches it without loading the object).

use std::{
    fs,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    programs::{CgroupSockAddr, ProgramError, SchedClassifier, Xdp},
};

use super::bpffs::create_pin_dir;
use crate::{error::LoaderError, object};

/// Pins the TC pair under `dir/programs`; an existing pin is kept, or,
/// with `replace`, swapped for ours atomically (pinned beside it, then
/// renamed over it: a CNI ADD meanwhile finds one or the other). Their
/// jump table is pinned there at load, once for every generation
/// (`jump_table_pin`).
pub(super) fn pin_programs(ebpf: &mut Ebpf, dir: &Path, replace: bool) -> Result<(), LoaderError> {
    let programs = dir.join(PROGRAM_PINS);
    create_pin_dir(&programs)?;
    for name in [object::TC_EGRESS, object::TC_INGRESS] {
        let path = programs.join(name);
        if path.exists() && !replace {
            continue;
        }
        // (bpffs refuses names with a dot.)
        let staging = programs.join(format!("{name}_new"));
        let pin_err = |path: &Path, reason: String| LoaderError::Pin {
            path: path.to_owned(),
            reason,
        };
        let _ = fs::remove_file(&staging);
        sched_classifier(ebpf, name)?
            .pin(&staging)
            .map_err(|e| pin_err(&staging, e.to_string()))?;
        fs::rename(&staging, &path).map_err(|e| pin_err(&path, e.to_string()))?;
    }
    Ok(())
}

/// Where the TC programs are pinned, under the pin directory.
pub const PROGRAM_PINS: &str = "programs";

/// Where the TC pair's jump table (`datapath_common::jumps`) is pinned,
/// for the loader to reuse: one table for every generation of programs.
/// A program array no process holds is emptied by the kernel, so a table
/// replaced at an agent restart would leave the programs still attached
/// to pods (until the new agent swaps them, or for good on pods the CNI
/// plugin attached) without their IPv6 half: their IPv6 service packets
/// would leave untranslated. Kept, the table's slots are pointed at each
/// new generation's programs (`fill_jumps`), which every attached
/// generation then runs. Slots are never renumbered and the table has
/// room to spare; a pinned table with fewer slots than this build uses
/// (an early build's) is replaced, said in the log.
pub(super) fn jump_table_pin(dir: &Path) -> Result<std::path::PathBuf, LoaderError> {
    let programs = dir.join(PROGRAM_PINS);
    create_pin_dir(&programs)?;
    let path = programs.join(datapath_common::jumps::TC_JUMPS_MAP);
    if let Ok(info) = aya::maps::MapInfo::from_pin(&path)
        && info.max_entries() < datapath_common::jumps::SLOTS
    {
        tracing::warn!(
            path = %path.display(),
            slots = info.max_entries(),
            expected = datapath_common::jumps::SLOTS,
            "the pinned TC jump table has another build's shape: replaced (pods still running that build's programs pass their IPv6 packets untranslated until they are attached anew)"
        );
        fs::remove_file(&path).map_err(|e| LoaderError::Pin {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    }
    Ok(path)
}

/// Where TC programs to attach come from: the loaded object, or the
/// programs an agent pinned (`PinnedTcPrograms`).
pub(super) trait TcPrograms {
    fn classifier(&mut self, name: &'static str) -> Result<&mut SchedClassifier, LoaderError>;
}

impl TcPrograms for Ebpf {
    fn classifier(&mut self, name: &'static str) -> Result<&mut SchedClassifier, LoaderError> {
        sched_classifier(self, name)
    }
}

/// The TC pair as an agent pinned it, attached without loading the object
/// (what the CNI plugin does on every pod start: no verification, no
/// clock calibration).
pub struct PinnedTcPrograms {
    pub(super) pin_dir: PathBuf,
    egress: SchedClassifier,
    ingress: SchedClassifier,
}

impl TcPrograms for PinnedTcPrograms {
    fn classifier(&mut self, name: &'static str) -> Result<&mut SchedClassifier, LoaderError> {
        match name {
            object::TC_EGRESS => Ok(&mut self.egress),
            object::TC_INGRESS => Ok(&mut self.ingress),
            _ => Err(LoaderError::program(
                name,
                ProgramError::UnexpectedProgramType,
            )),
        }
    }
}

impl PinnedTcPrograms {
    /// The pinned pair under `pin_dir`; `None` when nothing is pinned (no
    /// agent or plugin has loaded the datapath on this node yet).
    pub fn open(pin_dir: &Path) -> Result<Option<Self>, LoaderError> {
        let programs = pin_dir.join(PROGRAM_PINS);
        let open = |name: &str| {
            let path = programs.join(name);
            SchedClassifier::from_pin(&path).map_err(|e| LoaderError::Pin {
                path,
                reason: format!("opening the pinned program: {e}"),
            })
        };
        if !programs.join(object::TC_EGRESS).exists() || !programs.join(object::TC_INGRESS).exists()
        {
            return Ok(None);
        }
        Ok(Some(Self {
            pin_dir: pin_dir.to_owned(),
            egress: open(object::TC_EGRESS)?,
            ingress: open(object::TC_INGRESS)?,
        }))
    }
}

/// The program `name` of the object, as its concrete type.
fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, LoaderError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or(LoaderError::program(
        name,
        ProgramError::UnexpectedProgramType,
    ))?;
    program
        .try_into()
        .map_err(|source| LoaderError::program(name, source))
}

pub(super) fn sched_classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, LoaderError> {
    program(ebpf, name)
}

pub(super) fn sock_program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut CgroupSockAddr, LoaderError> {
    program(ebpf, name)
}

pub(super) fn xdp_program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut Xdp, LoaderError> {
    program(ebpf, name)
}
