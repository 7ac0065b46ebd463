//! The do-nothing TC program (`object::TC_PASS`) for measurements: first
//! in both TCX chains of an interface, so that every packet runs it just
//! before whatever else is attached there. Its run time under the
//! kernel's statistics, on the same packets as the programs after it, is
//! the statistics' own floor (the benches subtract it). Never attached by
//! the agent.

use aya::programs::{LinkOrder, TcAttachType};

use super::{
    attachment::TcAttachment,
    load::Datapath,
    programs::sched_classifier,
    tc_attach::{attach_one, netns_label},
};
use crate::{error::LoaderError, netns, object, tc_mode::TcMode};

impl Datapath {
    /// Attaches the do-nothing program (`object::TC_PASS`) to both
    /// directions of `iface`, first in each TCX chain: every packet runs
    /// it just before whatever else is attached there (it returns "next").
    /// Not pinned: detached with the returned attachment, or when this
    /// process exits. For measurements only: its run time under the
    /// kernel's statistics, on the same packets as the programs after it,
    /// is the statistics' own floor.
    pub fn attach_tc_pass(
        &mut self,
        netns: Option<&str>,
        iface: &str,
    ) -> Result<TcAttachment, LoaderError> {
        let pass = sched_classifier(&mut self.ebpf, object::TC_PASS)?;
        if pass.fd().is_err() {
            pass.load()
                .map_err(|source| LoaderError::program(object::TC_PASS, source))?;
        }
        let netns_path = netns.map(netns::path_of);
        let label = netns_label(netns);
        let mut attachment = TcAttachment {
            netns: netns_path.clone(),
            iface: iface.to_owned(),
            links: Vec::new(),
        };
        for attach_type in [TcAttachType::Egress, TcAttachType::Ingress] {
            let link = netns::run_in(netns_path.as_deref(), || {
                attach_one(
                    pass,
                    object::TC_PASS,
                    iface,
                    &label,
                    attach_type,
                    TcMode::Tcx,
                    None,
                    LinkOrder::first(),
                )
            })
            .map_err(|source| LoaderError::Netns {
                netns: label.clone(),
                error: source,
            })??;
            attachment.links.push(link);
        }
        Ok(attachment)
    }
}
