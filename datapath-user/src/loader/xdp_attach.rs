//! The uplink program (XDP) on the node's uplink, as a bpf_link pinned
//! under the pin directory like the TC links: it keeps translating while
//! no agent runs, a restarted agent swaps its program into the pinned
//! link atomically (no moment without north-south translation), and
//! `uninstall` detaches it.

use std::{
    fs,
    path::{Path, PathBuf},
};

use aya::programs::{
    ProgramError,
    links::{FdLink, LinkError},
    xdp::{XdpLink, XdpMode},
};

use super::{
    bpffs::{create_pin_dir, open_pinned, pin, remove_pin},
    load::Datapath,
    programs::xdp_program,
    tc_attach::netns_label,
};
use crate::{error::LoaderError, netns, object, tc_mode::TcMode};

/// Under the pin directory: the uplink link, per namespace label and
/// interface.
pub const XDP_LINKS: &str = "links/xdp";

/// How the uplink program runs (`--xdp-mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum XdpAttachMode {
    /// Native (in the driver) where the driver has it, else generic.
    #[default]
    Auto,
    /// Native only: an error where the driver has no XDP.
    Native,
    /// Generic (after the kernel has built an skb): every driver, slower.
    Generic,
}

/// What attaching the uplink program did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UplinkAttachment {
    /// "native", "generic", or "pinned link kept" (an earlier run's link,
    /// its program replaced: the mode it was made with stands).
    pub how: &'static str,
    pub pin: PathBuf,
}

impl Datapath {
    /// Attaches the uplink program to `iface` in the namespace at `netns`
    /// (`None`: the agent's own), pinned under the pin directory; a link
    /// an earlier run pinned there gets our program instead. Links pinned
    /// for other interfaces (another `--uplink` before) are detached.
    pub fn attach_uplink(
        &mut self,
        netns: Option<&Path>,
        iface: &str,
        mode: XdpAttachMode,
    ) -> Result<UplinkAttachment, LoaderError> {
        let pin_dir = self
            .pin_dir()
            .map(Path::to_path_buf)
            .ok_or(LoaderError::Pin {
                path: PathBuf::from(XDP_LINKS),
                reason: "the uplink program is attached only with a pin directory".into(),
            })?;
        let label = netns_label(netns.map(|p| p.to_string_lossy()).as_deref());
        let base = pin_dir.join(XDP_LINKS);
        let path = base.join(&label).join(iface);
        detach_others(&base, &path)?;
        create_pin_dir(path.parent().unwrap_or(&base))?;
        let program = xdp_program(&mut self.ebpf, object::XDP_UPLINK)?;
        let attach_err = |error: ProgramError| LoaderError::Attach {
            program: object::XDP_UPLINK,
            iface: iface.to_owned(),
            netns: label.clone(),
            mode: TcMode::Auto,
            error: Box::new(error),
        };
        if let Some(existing) = open_pinned(&path)? {
            let link = XdpLink::try_from(existing).map_err(|e| LoaderError::Pin {
                path: path.clone(),
                reason: format!("not an XDP link: {e}"),
            })?;
            match program.attach_to_link(link) {
                Ok(id) => {
                    // The pin keeps the link; our handle can go.
                    drop(program.take_link(id).map_err(attach_err)?);
                    return Ok(UplinkAttachment {
                        how: "pinned link kept",
                        pin: path,
                    });
                }
                // Its interface is gone (re-created under the same name):
                // a fresh link below.
                Err(e) => {
                    tracing::info!("replacing the defunct pinned link {}: {e}", path.display());
                    remove_pin(&path)?;
                }
            }
        }
        let (id, how) = netns::run_in(netns, || {
            let native = match mode {
                XdpAttachMode::Generic => None,
                _ => Some(program.attach(iface, XdpMode::Driver)),
            };
            match native {
                Some(Ok(id)) => Ok((id, "native")),
                Some(Err(error)) if mode == XdpAttachMode::Native => Err(error),
                Some(Err(ProgramError::UnknownInterface { name })) => {
                    Err(ProgramError::UnknownInterface { name })
                }
                Some(Err(error)) => {
                    tracing::warn!(
                        iface,
                        error = %crate::error::with_causes(&error),
                        "no native XDP on the uplink: the uplink program runs in generic mode (after the kernel has built an skb; slower)"
                    );
                    program.attach(iface, XdpMode::Skb).map(|id| (id, "generic"))
                }
                None => program.attach(iface, XdpMode::Skb).map(|id| (id, "generic")),
            }
        })
        .map_err(|error| LoaderError::Netns {
            netns: label.clone(),
            error,
        })?
        .map_err(|error| match error {
            ProgramError::UnknownInterface { .. } => LoaderError::NoInterface {
                netns: label.clone(),
                iface: iface.to_owned(),
            },
            error => attach_err(error),
        })?;
        let link: FdLink = program
            .take_link(id)
            .map_err(attach_err)?
            .try_into()
            .map_err(|e: LinkError| LoaderError::Pin {
                path: path.clone(),
                reason: format!("the XDP attach made no bpf_link (a kernel before 5.9?): {e}"),
            })?;
        pin(link, &path)?;
        Ok(UplinkAttachment { how, pin: path })
    }
}

/// Detaches every uplink link pinned under `base` but `keep`.
fn detach_others(base: &Path, keep: &Path) -> Result<(), LoaderError> {
    for path in pinned_uplinks(base) {
        if path != keep {
            tracing::info!(pin = %path.display(), "detaching the uplink program from an interface no longer the uplink");
            remove_pin(&path)?;
            if let Some(parent) = path.parent() {
                let _ = fs::remove_dir(parent);
            }
        }
    }
    Ok(())
}

/// Every uplink link pinned under `base` (`<label>/<iface>`).
fn pinned_uplinks(base: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for label in fs::read_dir(base).into_iter().flatten().flatten() {
        for link in fs::read_dir(label.path()).into_iter().flatten().flatten() {
            out.push(link.path());
        }
    }
    out
}

/// Detaches the uplink program wherever a link under `pin_dir` holds it
/// (the agent started without `--uplink`, `uninstall`). Returns how many.
pub fn detach_pinned_uplinks(pin_dir: &Path) -> Result<usize, LoaderError> {
    let base = pin_dir.join(XDP_LINKS);
    let links = pinned_uplinks(&base);
    for path in &links {
        remove_pin(path)?;
        if let Some(parent) = path.parent() {
            let _ = fs::remove_dir(parent);
        }
    }
    let _ = fs::remove_dir(&base);
    Ok(links.len())
}
