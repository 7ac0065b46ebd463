//! XDP programs that return one verdict, two instructions loaded without
//! the object: `Pass` on the far end of a veth standing for a wire (a veth
//! hands the frames an XDP program sends back out, `XDP_TX`, only to a
//! peer that runs XDP itself: the lab's uplink needs one there), `Drop`
//! for the bench's ceiling of what XDP can do on a device.

use std::{io, os::fd::OwnedFd, path::Path};

use crate::{
    bpfsys::{self, Insn},
    netns,
};

/// `BPF_PROG_TYPE_XDP` and `BPF_XDP` (the attach type).
const PROG_TYPE_XDP: u32 = 6;
const ATTACH_XDP: u32 = 37;

/// Which verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpVerdict {
    /// `XDP_PASS`: up the stack, as without XDP.
    Pass,
    /// `XDP_DROP`.
    Drop,
}

/// The program attached: detached when dropped.
#[derive(Debug)]
pub struct XdpVerdictLink {
    _link: OwnedFd,
}

/// Attaches a program returning `verdict` to `iface` in the namespace at
/// `netns` (None: ours).
pub fn attach_xdp_verdict(
    netns: Option<&Path>,
    iface: &str,
    verdict: XdpVerdict,
) -> io::Result<XdpVerdictLink> {
    let code = match verdict {
        XdpVerdict::Drop => 1,
        XdpVerdict::Pass => 2,
    };
    let program = [
        Insn {
            code: 0xb7,
            regs: 0x00,
            off: 0,
            imm: code,
        }, // mov64 r0, verdict
        Insn {
            code: 0x95,
            regs: 0x00,
            off: 0,
            imm: 0,
        }, // exit
    ];
    let name = match verdict {
        XdpVerdict::Pass => "up_xdp_pass",
        XdpVerdict::Drop => "up_xdp_drop",
    };
    let prog = bpfsys::load_program(PROG_TYPE_XDP, ATTACH_XDP, name, &program)?;
    let iface = iface.to_owned();
    let link = netns::run_in(netns, move || {
        let name = std::ffi::CString::new(iface.clone()).map_err(io::Error::other)?;
        // SAFETY: if_nametoindex on a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no interface {iface}"),
            ));
        }
        bpfsys::link_create(&prog, ifindex, ATTACH_XDP, 0)
    })??;
    Ok(XdpVerdictLink { _link: link })
}
