//! Which testbed a preset runs on: the ClusterIP and Pod IP presets on
//! the east-west one (`testbed`), the node-port preset on the
//! north-south one (`node_port_testbed`). The run loop sees one.

use std::path::Path;

use anyhow::Result;

use super::{
    modes::{Mode, Preset},
    node_port_testbed::NodePortTestbed,
    testbed::{Endpoint, Testbed},
};
use crate::{
    family::IpFamily,
    program_stats::LiveCost,
    workload::{Kind, Parameters},
};

pub(super) enum Bed {
    EastWest(Box<Testbed>),
    NorthSouth(Box<NodePortTestbed>),
}

impl Bed {
    pub(super) fn build(
        preset: Preset,
        modes: &[Mode],
        kinds: &[Kind],
        underpass: Option<&Path>,
        family: IpFamily,
    ) -> Result<Self> {
        Ok(match preset {
            Preset::NodePort => {
                Bed::NorthSouth(Box::new(NodePortTestbed::build(kinds, underpass)?))
            }
            Preset::ClusterIp | Preset::PodIp => {
                Bed::EastWest(Box::new(Testbed::build(modes, kinds, underpass, family)?))
            }
        })
    }

    pub(super) fn offloads(&self) -> Result<Vec<lab::DeviceOffloads>> {
        match self {
            Bed::EastWest(bed) => bed.offloads(),
            Bed::NorthSouth(bed) => bed.offloads(),
        }
    }

    pub(super) fn prepare(&mut self, mode: Mode) -> Result<()> {
        match self {
            Bed::EastWest(bed) => bed.prepare(mode),
            Bed::NorthSouth(bed) => bed.prepare(mode),
        }
    }

    pub(super) fn endpoint(&self, mode: Mode, kind: Kind) -> Endpoint<'_> {
        match self {
            Bed::EastWest(bed) => bed.endpoint(mode, kind),
            Bed::NorthSouth(bed) => bed.endpoint(mode, kind),
        }
    }

    /// A statistics pass (`live`): the east-west testbed's TC programs
    /// only (the XDP program's statistics are `bench datapath`'s).
    pub(super) fn live_pass(
        &mut self,
        mode: Mode,
        kind: Kind,
        parameters: &Parameters,
    ) -> Result<Option<LiveCost>> {
        match self {
            Bed::EastWest(bed) => bed.live_pass(mode, kind, parameters),
            Bed::NorthSouth(_) => Ok(None),
        }
    }

    pub(super) fn finish(self) -> Result<()> {
        match self {
            Bed::EastWest(bed) => bed.finish(),
            Bed::NorthSouth(bed) => bed.finish(),
        }
    }
}
