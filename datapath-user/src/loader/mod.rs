//! Loading the datapath once, pinning its maps, and attaching its programs
//! to pod interfaces (TC) and cgroups (socket-LB).
//!
//! Attachments made with a pin directory are pinned bpf_links: they stay
//! in place when the process exits (an agent restart keeps traffic
//! flowing) and are removed by deleting the pin. Without a pin directory
//! (tests) they live as long as the returned handle.
//!
//! One step per file: `options` (what a load is given), `load` (the
//! object into the kernel, maps pinned), `programs` (finding and pinning
//! the loaded programs), `tc_attach` and `sock_attach` (attaching them),
//! `attachment` (what an attach returns), `bpffs` (pins on the bpf
//! filesystem), `event_log` (the programs' rare events, read),
//! `test_run` (BPF_PROG_TEST_RUN for the tests and bench), `xdp_attach`
//! (the uplink program on the node's uplink), `xdp_verdict` (one-verdict
//! XDP programs for the lab's wire and the bench).

mod attachment;
mod bpffs;
mod event_log;
mod load;
mod options;
mod programs;
mod skb_access;
mod sock_attach;
mod tc_attach;
mod tc_pass;
mod test_run;
mod xdp_attach;
mod xdp_verdict;

pub(crate) use self::tc_attach::netns_label;
pub use self::{
    attachment::{SockAttachment, TcAttachment},
    bpffs::ensure_bpffs,
    load::Datapath,
    options::{CtTimeouts, DEFAULT_PIN_DIR, DatapathLog, L4Checksums, LoadOptions, MapSizes},
    programs::{PROGRAM_PINS, PinnedTcPrograms},
    tc_attach::{REPLY_LINKS, TC_LINKS, detach_pinned_reply, detach_pinned_tc},
    test_run::{
        SKB_CB_WORDS, TestRunOutcome, hold_pinned, test_run_held, test_run_pinned,
        test_run_xdp_held,
    },
    xdp_attach::{UplinkAttachment, XDP_LINKS, XdpAttachMode, detach_pinned_uplinks},
    xdp_verdict::{XdpVerdict, XdpVerdictLink, attach_xdp_verdict},
};
pub use crate::{
    error::{LoaderError, with_causes},
    tc_mode::TcMode,
};
