//! BPF_PROG_TEST_RUN on the loaded TC programs: crafted frames in, the
//! verdict, the frame and the skb's control block out.

use aya::programs::{TestRun, TestRunOptions};

use super::{
    load::Datapath,
    programs::{sched_classifier, xdp_program},
};
use crate::error::LoaderError;

impl Datapath {
    /// Program `name`, held apart from the object (`test_run_held`,
    /// `test_run_xdp_held`): two programs racing on one flow need
    /// running on two CPUs at once, which the `&mut self` of the runs
    /// above rules out.
    pub fn hold_program(
        &mut self,
        name: &'static str,
    ) -> Result<std::os::fd::OwnedFd, LoaderError> {
        use std::os::fd::AsFd;
        let program = self.ebpf.program(name).ok_or(LoaderError::program(
            name,
            aya::programs::ProgramError::UnexpectedProgramType,
        ))?;
        let fd = program
            .fd()
            .map_err(|source| LoaderError::program(name, source))?;
        fd.as_fd()
            .try_clone_to_owned()
            .map_err(|source| LoaderError::program(name, source.into()))
    }

    /// Runs TC program `name` on `frame` with BPF_PROG_TEST_RUN, `repeat`
    /// times (the kernel reports the mean duration per run).
    pub fn test_run_tc(
        &mut self,
        name: &'static str,
        frame: &[u8],
        repeat: u32,
    ) -> Result<TestRunOutcome, LoaderError> {
        self.test_run_tc_with_cb(name, frame, repeat, [0; SKB_CB_WORDS])
    }

    /// As `test_run_tc`, with the skb's control block (`__sk_buff.cb`, the
    /// TC programs' scratch area) set to `cb`; the outcome has it as the
    /// program left it.
    pub fn test_run_tc_with_cb(
        &mut self,
        name: &'static str,
        frame: &[u8],
        repeat: u32,
        cb: [u32; SKB_CB_WORDS],
    ) -> Result<TestRunOutcome, LoaderError> {
        let program = sched_classifier(&mut self.ebpf, name)?;
        if program.fd().is_err() {
            // The do-nothing program is loaded on first use only.
            program
                .load()
                .map_err(|source| LoaderError::program(name, source))?;
        }
        let mut out = vec![0u8; frame.len() + 256];
        let mut ctx_in = [0u8; SKB_CB_END];
        for (word, value) in ctx_in[SKB_CB_OFFSET..].chunks_exact_mut(4).zip(cb) {
            word.copy_from_slice(&value.to_ne_bytes());
        }
        // The whole context comes back (the kernel refuses a shorter
        // buffer): 192 bytes on 6.18, room for growth.
        let mut ctx_out = [0u8; 256];
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx_in),
                ctx_out: Some(&mut ctx_out),
                repeat,
                ..TestRunOptions::default()
            })
            .map_err(|source| LoaderError::program(name, source))?;
        out.truncate(result.data_size_out as usize);
        let mut cb = [0; SKB_CB_WORDS];
        for (value, word) in cb.iter_mut().zip(ctx_out[SKB_CB_OFFSET..].chunks_exact(4)) {
            *value = u32::from_ne_bytes(word.try_into().expect("four bytes"));
        }
        Ok(TestRunOutcome {
            verdict: result.return_value as i32,
            frame: out,
            duration: result.duration,
            cb,
        })
    }
}

impl Datapath {
    /// Runs the XDP program `name` on `frame` once with BPF_PROG_TEST_RUN:
    /// its verdict (`object::xdp_verdict`) and the frame as it left it.
    pub fn test_run_xdp(
        &mut self,
        name: &'static str,
        frame: &[u8],
    ) -> Result<(u32, Vec<u8>), LoaderError> {
        self.test_run_xdp_on(name, frame, None)
    }

    /// Runs the XDP program `name` on `frame` `repeat` times (each run on
    /// what the previous one left): its last verdict, the frame, and the
    /// mean time per run as the kernel measured it.
    pub fn test_run_xdp_timed(
        &mut self,
        name: &'static str,
        frame: &[u8],
        repeat: u32,
    ) -> Result<(u32, Vec<u8>, std::time::Duration), LoaderError> {
        let program = xdp_program(&mut self.ebpf, name)?;
        let mut out = vec![0u8; frame.len() + 256];
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                repeat,
                ..TestRunOptions::default()
            })
            .map_err(|source| LoaderError::program(name, source))?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out, result.duration))
    }

    /// As `test_run_xdp`, the frame received by interface
    /// `ingress_ifindex` of the calling thread's network namespace (what
    /// route and neighbour lookups start from).
    pub fn test_run_xdp_on(
        &mut self,
        name: &'static str,
        frame: &[u8],
        ingress_ifindex: Option<u32>,
    ) -> Result<(u32, Vec<u8>), LoaderError> {
        let program = xdp_program(&mut self.ebpf, name)?;
        let mut out = vec![0u8; frame.len() + 256];
        let ctx = xdp_md(frame, ingress_ifindex.unwrap_or(0));
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: ingress_ifindex.map(|_| ctx.as_slice()),
                repeat: 1,
                ..TestRunOptions::default()
            })
            .map_err(|source| LoaderError::program(name, source))?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out))
    }
}

/// What one BPF_PROG_TEST_RUN call returned.
#[derive(Debug)]
pub struct TestRunOutcome {
    /// The program's return value (a `TC_ACT_*` verdict).
    pub verdict: i32,
    /// The frame as the program left it.
    pub frame: Vec<u8>,
    /// Mean time per run, as the kernel measured it.
    pub duration: std::time::Duration,
    /// The skb's control block (`__sk_buff.cb`) after the run.
    pub cb: [u32; SKB_CB_WORDS],
}

/// Words in `__sk_buff.cb`.
pub const SKB_CB_WORDS: usize = 5;
/// Where `cb` sits in `struct __sk_buff` (after twelve u32 fields, from
/// `len` to `tc_index`); the test-run context passed in ends with it.
const SKB_CB_OFFSET: usize = 48;
const SKB_CB_END: usize = SKB_CB_OFFSET + 4 * SKB_CB_WORDS;

/// Runs the TC program pinned at `pin_dir/programs/name` once on `frame`
/// and returns its verdict: the program as the CNI plugin attaches it,
/// with no object loaded by this process.
pub fn test_run_pinned(
    pin_dir: &std::path::Path,
    name: &'static str,
    frame: &[u8],
) -> std::io::Result<i32> {
    test_run_held(&hold_pinned(pin_dir, name)?, frame)
}

/// The TC program pinned at `pin_dir/programs/name`, held by this
/// process (as a pod's attachment holds it) after its pin is replaced.
pub fn hold_pinned(
    pin_dir: &std::path::Path,
    name: &'static str,
) -> std::io::Result<std::os::fd::OwnedFd> {
    crate::bpfsys::obj_get(&pin_dir.join(super::PROGRAM_PINS).join(name))
}

/// Runs a held program (`hold_pinned`) once on `frame`; its verdict.
pub fn test_run_held(program: &std::os::fd::OwnedFd, frame: &[u8]) -> std::io::Result<i32> {
    crate::bpfsys::test_run_verdict(program, frame)
}

/// Runs a held XDP program (`Datapath::hold_program`) once on `frame`
/// received by interface `ingress_ifindex` of the calling thread's
/// network namespace; its verdict.
pub fn test_run_xdp_held(
    program: &std::os::fd::OwnedFd,
    frame: &[u8],
    ingress_ifindex: u32,
) -> std::io::Result<u32> {
    let ctx = xdp_md(frame, ingress_ifindex);
    crate::bpfsys::test_run_verdict_with_ctx(program, frame, &ctx).map(|verdict| verdict as u32)
}

/// `struct xdp_md` for a test run of `frame` received by
/// `ingress_ifindex`: data, data_end, data_meta, ingress_ifindex,
/// rx_queue_index, egress_ifindex.
fn xdp_md(frame: &[u8], ingress_ifindex: u32) -> Vec<u8> {
    let words = [0, frame.len() as u32, 0, ingress_ifindex, 0, 0];
    words.iter().flat_map(|w| w.to_ne_bytes()).collect()
}
