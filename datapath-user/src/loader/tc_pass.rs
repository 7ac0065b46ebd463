//! The do-nothing TC program (`object::TC_PASS`) for measurements: first
//! in both TCX chains of an interface, so that every packet runs it just
//! before whatever else is attached there. Its run time under the
//! kernel's statistics, on the same packets as the programs after it, is
//! the statistics' own floor (the benches subtract it). Never attached by
//! the agent.

use std::path::PathBuf;

use aya::programs::{
    LinkOrder, TcAttachType,
    links::{FdLink, LinkError},
    tc::TcAttachOptions,
};

use super::{
    attachment::{AttachedLink, TcAttachment},
    load::Datapath,
    programs::sched_classifier,
    tc_attach::netns_label,
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
            let attach_err = |error| LoaderError::Attach {
                program: object::TC_PASS,
                iface: iface.to_owned(),
                netns: label.clone(),
                mode: TcMode::Tcx,
                error: Box::new(error),
            };
            let attached = netns::run_in(netns_path.as_deref(), || {
                let id = pass
                    .attach_with_options(
                        iface,
                        attach_type,
                        TcAttachOptions::TcxOrder(LinkOrder::first()),
                    )
                    .map_err(attach_err)?;
                pass.take_link(id)
                    .map_err(attach_err)?
                    .try_into()
                    .map_err(|e: LinkError| LoaderError::Pin {
                        path: PathBuf::from(iface),
                        reason: format!("TCX attach returned no bpf_link: {e}"),
                    })
            })
            .map_err(|source| LoaderError::Netns {
                netns: label.clone(),
                error: source,
            })??;
            let link: FdLink = attached;
            attachment.links.push(AttachedLink::Fd(link));
        }
        Ok(attachment)
    }
}
