//! Per-packet cost of the TC programs through BPF_PROG_TEST_RUN.
//!
//! A test run with `repeat` runs the program again and again on the same
//! skb, which the first run has already rewritten. To measure the real
//! translation path on every repeat, two services are each other's
//! backend (A:80 → B:8080 → A:80): each run does the full work on real
//! differences (conntrack and backend lookups, a new address and port with
//! both checksums updated, the MAC write), and an even number of runs
//! leaves the packet as it found it. The same over IPv6 (each program's
//! tail call to its IPv6 half included), and on the uplink program (XDP):
//! two nodePorts served from outside, each the other's local pod.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use datapath_user::{
    Datapath, LoadOptions,
    loader::{L4Checksums, MapSizes},
    maps::LbMaps,
    model::{BackendEntry, Frontend, Protocol},
    object::{TC_EGRESS, TC_INGRESS, TC_PASS, XDP_UPLINK, verdict, xdp_verdict},
};
use lab::{
    packet::{ACK, Frame, L4, PSH, SYN},
    packet6::Frame6,
};

#[derive(Parser, Debug)]
pub struct DatapathOpts {
    /// Program runs per measurement (the kernel reports their mean).
    #[arg(long, default_value_t = 1_000_000)]
    pub repeat: u32,
    /// Measurements per case; min, median and max are reported.
    #[arg(long, default_value_t = 7)]
    pub trials: usize,
    /// How the programs update translated packets' L4 checksums: their
    /// own arithmetic (`direct`, what the agent loads) or the helper calls
    /// (`helpers`: a kernel without BTF, and the figures before direct
    /// updates).
    #[arg(long, value_enum, default_value_t = L4Checksums::Direct)]
    pub l4_checksums: L4Checksums,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, serde::Serialize)]
pub struct CaseResult {
    pub case: &'static str,
    pub program: &'static str,
    pub verdict: i32,
    pub ns_min: f64,
    pub ns_median: f64,
    pub ns_max: f64,
}

const CLIENT: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 77, 0, 2), 40000);
const VIP_A: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 96, 0, 10), 80);
const VIP_B: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 96, 0, 11), 8080);
const CLIENT6: (Ipv6Addr, u16) = (Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 2), 40000);
const VIP6_A: (Ipv6Addr, u16) = (Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x10), 80);
const VIP6_B: (Ipv6Addr, u16) = (Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x11), 8080);

pub fn run(opts: &DatapathOpts) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("BPF_PROG_TEST_RUN needs root");
    }
    ensure!(
        opts.trials > 0 && opts.repeat > 0,
        "--trials and --repeat must be positive"
    );
    let results = measure(opts)?;
    if opts.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
        return Ok(());
    }
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header([
        "case",
        "program",
        "verdict",
        "ns/packet min",
        "median",
        "max",
    ]);
    for r in &results {
        table.add_row([
            r.case.to_owned(),
            r.program.to_owned(),
            r.verdict.to_string(),
            format!("{:.1}", r.ns_min),
            format!("{:.1}", r.ns_median),
            format!("{:.1}", r.ns_max),
        ]);
    }
    println!("{table}");
    println!(
        "({} trials × {} runs each, BPF_PROG_TEST_RUN on the embedded object; L4 checksums: {:?})",
        opts.trials, opts.repeat, opts.l4_checksums
    );
    Ok(())
}

pub fn measure(opts: &DatapathOpts) -> Result<Vec<CaseResult>> {
    ensure!(
        opts.repeat.is_multiple_of(2),
        "--repeat must be even: each run moves the packet to the other service, and an even count brings it back"
    );
    let options = LoadOptions {
        l4_checksums: opts.l4_checksums,
        // The IPv6 maps sized too, for the IPv6 cases (the IPv4 path
        // reads none of them).
        sizes: MapSizes {
            ipv6: true,
            // Two Maglev tables of the smallest size, for the uplink cases.
            maglev_tables: 2,
            maglev_table_size: datapath_common::maglev::MIN_TABLE_SIZE,
            ..MapSizes::default()
        },
        ..LoadOptions::default()
    };
    let mut dp = Datapath::load(&options).context("loading the datapath")?;
    // Two services, each the other's backend: a packet to A leaves for B's
    // address and port, the next run takes it back to A's. Every run does
    // the full work on real differences (a new address and port, both
    // checksums updated, MACs written), and an even number of runs leaves
    // the packet as it was, so the test run can repeat it.
    for (id, (frontend, backend)) in [(VIP_A, VIP_B), (VIP_B, VIP_A)].into_iter().enumerate() {
        let id = id as u32 + 1;
        dp.maps.set_service(
            &Frontend {
                address: frontend.0,
                port: frontend.1,
                protocol: Protocol::Tcp,
            },
            id,
            &[BackendEntry {
                id,
                address: backend.0,
                port: backend.1,
            }],
        )?;
    }

    // The same pair over IPv6 (reverse-NAT and backend ids 3 and 4).
    for (id, (frontend, backend)) in [(VIP6_A, VIP6_B), (VIP6_B, VIP6_A)].into_iter().enumerate() {
        let id = id as u32 + 3;
        dp.maps.set_service6(
            &Frontend {
                address: frontend.0,
                port: frontend.1,
                protocol: Protocol::Tcp,
            },
            id,
            &[BackendEntry {
                id,
                address: backend.0,
                port: backend.1,
            }],
        )?;
    }

    // Open both flows and let a reply teach each its next hop, so that the
    // measured packets take the steady-state path (MACs written, no
    // redirect).
    let client_mac = [2, 0, 0, 0, 0, 2];
    let gateway_mac = [2, 0, 0, 0, 0, 0xfe];
    let mut refresh = Vec::new();
    for (service, backend) in [(VIP_A, VIP_B), (VIP_B, VIP_A)] {
        let syn = Frame::tcp(CLIENT, service, SYN).with_macs(client_mac, gateway_mac);
        let synack = Frame::tcp(backend, CLIENT, SYN | ACK).with_macs(gateway_mac, client_mac);
        prime_flow(&mut dp, &syn.build(), &synack.build(), service.0)?;
        refresh.push(
            Frame::tcp(backend, CLIENT, ACK | PSH)
                .with_macs(gateway_mac, client_mac)
                .with_payload(&[0u8; 100])
                .build(),
        );
    }
    for (service, backend) in [(VIP6_A, VIP6_B), (VIP6_B, VIP6_A)] {
        let syn = Frame6::tcp(CLIENT6, service, SYN).with_macs(client_mac, gateway_mac);
        let synack = Frame6::tcp(backend, CLIENT6, SYN | ACK).with_macs(gateway_mac, client_mac);
        prime_flow(&mut dp, &syn.build(), &synack.build(), service.0)?;
        refresh.push(
            Frame6::tcp(backend, CLIENT6, ACK | PSH)
                .with_macs(gateway_mac, client_mac)
                .with_payload(&[0u8; 100])
                .build(),
        );
    }

    // The agent's steady state: its programs run everywhere, and the
    // ingress program trusts the reply filter.
    dp.maps
        .complete_reply_filter()
        .context("completing the reply filter")?;

    let data = Frame::tcp(CLIENT, VIP_A, ACK | PSH)
        .with_macs(client_mac, gateway_mac)
        .with_payload(&[0u8; 100]);
    let data_reply = Frame::tcp(VIP_B, CLIENT, ACK | PSH)
        .with_macs(gateway_mac, client_mac)
        .with_payload(&[0u8; 100]);
    let other = Frame::tcp(CLIENT, (Ipv4Addr::new(10, 77, 0, 3), 8080), ACK | PSH)
        .with_payload(&[0u8; 100]);
    let other_reply = other.reply(L4::Tcp { flags: ACK | PSH });
    let arp = arp_frame(&other);
    let data6 = Frame6::tcp(CLIENT6, VIP6_A, ACK | PSH)
        .with_macs(client_mac, gateway_mac)
        .with_payload(&[0u8; 100]);
    let data6_reply = Frame6::tcp(VIP6_B, CLIENT6, ACK | PSH)
        .with_macs(gateway_mac, client_mac)
        .with_payload(&[0u8; 100]);
    let other6 = Frame6::tcp(
        CLIENT6,
        (Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 3), 8080),
        ACK | PSH,
    )
    .with_payload(&[0u8; 100]);
    let other6_reply = other6.reply(L4::Tcp { flags: ACK | PSH });
    let cases = [
        (
            "floor: the do-nothing program (test-run harness)",
            TC_PASS,
            arp.clone(),
            verdict::NEXT,
        ),
        ("egress, not IPv4 (ARP)", TC_EGRESS, arp, verdict::NEXT),
        (
            "egress DNAT, conntrack hit",
            TC_EGRESS,
            data.build(),
            verdict::OK,
        ),
        (
            "egress, not service traffic",
            TC_EGRESS,
            other.build(),
            verdict::NEXT,
        ),
        (
            "ingress reverse NAT, tracked reply",
            TC_INGRESS,
            data_reply.build(),
            verdict::OK,
        ),
        (
            "ingress, untracked traffic",
            TC_INGRESS,
            other_reply.build(),
            verdict::NEXT,
        ),
        // IPv6: each program's tail call to its IPv6 half included.
        (
            "IPv6 egress DNAT, conntrack hit",
            TC_EGRESS,
            data6.build(),
            verdict::OK,
        ),
        (
            "IPv6 egress, not service traffic",
            TC_EGRESS,
            other6.build(),
            verdict::NEXT,
        ),
        (
            "IPv6 ingress reverse NAT, tracked reply",
            TC_INGRESS,
            data6_reply.build(),
            verdict::OK,
        ),
        (
            "IPv6 ingress, untracked traffic",
            TC_INGRESS,
            other6_reply.build(),
            verdict::NEXT,
        ),
    ];
    let mut results = Vec::new();
    for (case, program, frame, expected) in cases {
        results.push(measure_case(
            &mut dp, opts, case, program, &frame, expected, &refresh,
        )?);
    }
    results.extend(measure_uplink(&mut dp, opts, &other)?);
    // What an agent's first seconds cost, before it trusts the filter
    // (and what every untracked packet cost before the filter).
    dp.maps
        .distrust_reply_filter()
        .context("distrusting the reply filter")?;
    results.push(measure_case(
        &mut dp,
        opts,
        "ingress, untracked (reply filter not trusted yet)",
        TC_INGRESS,
        &other_reply.build(),
        verdict::NEXT,
        &refresh,
    )?);
    dp.maps
        .complete_reply_filter()
        .context("completing the reply filter")?;

    // New flows: a run that repeated its packet would find the flow its
    // first run opened, so each SYN, from a client port of its own, runs
    // once; the floor is measured the same way (one run per call pays the
    // test-run timer's own reads, which the floor's runs pay as well).
    let mut clients = (0u32..).map(|i| {
        let address = Ipv4Addr::from(u32::from(CLIENT.0) + 1 + i / 50_000);
        (address, 10_000 + (i % 50_000) as u16)
    });
    let pass_frame = arp_frame(&other);
    results.push(measure_single_runs(
        &mut dp,
        opts,
        "floor, one run per call (test-run harness)",
        TC_PASS,
        |_| pass_frame.clone(),
        verdict::NEXT,
    )?);
    results.push(measure_single_runs(
        &mut dp,
        opts,
        "egress DNAT, new flow (SYN: service lookup, conntrack inserts), one run per call",
        TC_EGRESS,
        |_| {
            let client = clients.next().unwrap_or(CLIENT);
            Frame::tcp(client, VIP_A, SYN)
                .with_macs(client_mac, gateway_mac)
                .build()
        },
        verdict::REDIRECT,
    )?);
    // The same with `sessionAffinity: ClientIP` on the frontend: a new
    // client (an `AFFINITY` lookup that misses, then an insert), and a
    // client it remembers (a lookup and a match lookup, no write).
    dp.maps
        .set_affinity(1, Some((10_800, &[1])))
        .context("giving the frontend affinity")?;
    results.push(measure_single_runs(
        &mut dp,
        opts,
        "egress DNAT, new flow of a new client, ClientIP affinity, one run per call",
        TC_EGRESS,
        |_| {
            let client = clients.next().unwrap_or(CLIENT);
            Frame::tcp(client, VIP_A, SYN)
                .with_macs(client_mac, gateway_mac)
                .build()
        },
        verdict::REDIRECT,
    )?);
    let remembered = Ipv4Addr::from(u32::from(CLIENT.0) - 1);
    let mut ports = (0u32..).map(|i| 10_000 + (i % 50_000) as u16);
    results.push(measure_single_runs(
        &mut dp,
        opts,
        "egress DNAT, new flow of a remembered client, ClientIP affinity, one run per call",
        TC_EGRESS,
        |_| {
            let port = ports.next().unwrap_or(CLIENT.1);
            Frame::tcp((remembered, port), VIP_A, SYN)
                .with_macs(client_mac, gateway_mac)
                .build()
        },
        verdict::REDIRECT,
    )?);
    dp.maps
        .set_affinity(1, None)
        .context("taking the affinity away")?;
    let mut clients6 = (0u32..).map(|i| {
        let mut address = CLIENT6.0.octets();
        address[12..16].copy_from_slice(&(3 + i / 50_000).to_be_bytes());
        (Ipv6Addr::from(address), 10_000 + (i % 50_000) as u16)
    });
    results.push(measure_single_runs(
        &mut dp,
        opts,
        "IPv6 egress DNAT, new flow (its own program by a tail call), one run per call",
        TC_EGRESS,
        |_| {
            let client = clients6.next().unwrap_or(CLIENT6);
            Frame6::tcp(client, VIP6_A, SYN)
                .with_macs(client_mac, gateway_mac)
                .build()
        },
        verdict::REDIRECT,
    )?);
    Ok(results)
}

/// Two nodePorts served from outside, each the other's local pod
/// (reverse-NAT and backend ids 5 and 6): a packet from outside to A is
/// DNATed to B and handed to B's MAC, the next run takes it back.
const NODE_PORT_A: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 77, 0, 101), 30080);
const NODE_PORT_B: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 77, 0, 102), 30081);
const POD_MAC_A: [u8; 6] = [2, 0x77, 0, 0, 0, 0xa];
const POD_MAC_B: [u8; 6] = [2, 0x77, 0, 0, 0, 0xb];
const OUTSIDE: (Ipv4Addr, u16) = (Ipv4Addr::new(192, 0, 2, 7), 51000);

/// The uplink program's cases: what leaves at once, and a tracked flow
/// from outside to a local pod.
fn measure_uplink(
    dp: &mut Datapath,
    opts: &DatapathOpts,
    other: &Frame,
) -> Result<Vec<CaseResult>> {
    let size = datapath_common::maglev::MIN_TABLE_SIZE;
    for (i, (frontend, backend, mac)) in [
        (NODE_PORT_A, NODE_PORT_B, POD_MAC_B),
        (NODE_PORT_B, NODE_PORT_A, POD_MAC_A),
    ]
    .into_iter()
    .enumerate()
    {
        let id = i as u32 + 5;
        dp.maps.set_service(
            &Frontend {
                address: frontend.0,
                port: frontend.1,
                protocol: Protocol::Tcp,
            },
            id,
            &[BackendEntry {
                id,
                address: backend.0,
                port: backend.1,
            }],
        )?;
        let ns = dp.maps.north_south.as_mut().context("north-south maps")?;
        ns.write_table(i as u32, size, &vec![id; size as usize])?;
        ns.set_table_of(id, Some(i as u32))?;
        ns.set_local_pod(backend.0, mac)?;
    }
    dp.maps
        .north_south
        .as_mut()
        .context("north-south maps")?
        .set_config(datapath_common::maps::NorthSouthConfig {
            maglev_seed: 1,
            maglev_table_size: size,
            ..Default::default()
        })?;
    // Open both flows (a SYN to A, then to B).
    let syn = Frame::tcp(OUTSIDE, NODE_PORT_A, SYN).with_macs([2, 0, 0, 0, 0, 9], POD_MAC_A);
    let (verdict, to_b) = dp.test_run_xdp(XDP_UPLINK, &syn.build())?;
    ensure!(
        verdict == xdp_verdict::PASS,
        "priming the flow to A: verdict {verdict}"
    );
    let (verdict, _) = dp.test_run_xdp(XDP_UPLINK, &to_b)?;
    ensure!(
        verdict == xdp_verdict::PASS,
        "priming the flow to B: verdict {verdict}"
    );
    let tracked = Frame::tcp(OUTSIDE, NODE_PORT_A, ACK | PSH)
        .with_macs([2, 0, 0, 0, 0, 9], POD_MAC_A)
        .with_payload(&[0u8; 100]);
    let not_service = Frame::tcp(OUTSIDE, (NODE_PORT_A.0, 22), ACK | PSH).with_payload(&[0u8; 100]);
    let cases = [
        ("uplink (XDP), not IPv4 (ARP)", arp_frame(other)),
        ("uplink (XDP), not service traffic", not_service.build()),
        (
            "uplink (XDP) DNAT to a local pod, conntrack hit",
            tracked.build(),
        ),
    ];
    let mut results = Vec::new();
    for (case, frame) in cases {
        let mut samples = Vec::with_capacity(opts.trials);
        for _ in 0..opts.trials {
            let (verdict, out, duration) =
                dp.test_run_xdp_timed(XDP_UPLINK, &frame, opts.repeat)?;
            ensure!(verdict == xdp_verdict::PASS, "{case}: verdict {verdict}");
            ensure!(
                out == frame,
                "{case}: the measured packet changed, the measurement would be wrong"
            );
            samples.push(duration.as_nanos() as f64);
        }
        samples.sort_by(f64::total_cmp);
        results.push(CaseResult {
            case,
            program: XDP_UPLINK,
            verdict: xdp_verdict::PASS as i32,
            ns_min: samples[0],
            ns_median: samples[samples.len() / 2],
            ns_max: samples[samples.len() - 1],
        });
    }
    Ok(results)
}

/// Opens a flow to `service` with its `syn` and lets the backend's
/// `synack` teach it its next hop.
fn prime_flow(
    dp: &mut Datapath,
    syn: &[u8],
    synack: &[u8],
    service: impl std::fmt::Display,
) -> Result<()> {
    let first = dp.test_run_tc(TC_EGRESS, syn, 1)?;
    ensure!(
        first.verdict == verdict::REDIRECT,
        "priming SYN to {service}: verdict {}",
        first.verdict
    );
    let reply = dp.test_run_tc(TC_INGRESS, synack, 1)?;
    ensure!(
        reply.verdict == verdict::OK,
        "priming SYN-ACK for {service}: verdict {}",
        reply.verdict
    );
    Ok(())
}

/// Packets measured one run per call, per trial.
const SINGLE_RUNS: usize = 2_000;

/// `opts.trials` measurements, each the mean of `SINGLE_RUNS` calls that
/// run `program` once on a frame of their own (`frame(i)`).
fn measure_single_runs(
    dp: &mut Datapath,
    opts: &DatapathOpts,
    case: &'static str,
    program: &'static str,
    mut frame: impl FnMut(usize) -> Vec<u8>,
    expected: i32,
) -> Result<CaseResult> {
    let mut samples = Vec::with_capacity(opts.trials);
    for _ in 0..opts.trials {
        let mut total = Duration::ZERO;
        for i in 0..SINGLE_RUNS {
            let out = dp.test_run_tc(program, &frame(i), 1)?;
            ensure!(
                out.verdict == expected,
                "{case}: verdict {}, expected {expected}",
                out.verdict
            );
            total += out.duration;
        }
        samples.push(total.as_nanos() as f64 / SINGLE_RUNS as f64);
    }
    samples.sort_by(f64::total_cmp);
    Ok(CaseResult {
        case,
        program,
        verdict: expected,
        ns_min: samples[0],
        ns_median: samples[samples.len() / 2],
        ns_max: samples[samples.len() - 1],
    })
}

/// `frame` as an ARP frame (its ethertype changed): what no program
/// translates.
fn arp_frame(frame: &Frame) -> Vec<u8> {
    let mut arp = frame.build();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    arp
}

/// `opts.trials` measurements of `program` on `frame`.
fn measure_case(
    dp: &mut Datapath,
    opts: &DatapathOpts,
    case: &'static str,
    program: &'static str,
    frame: &[u8],
    expected: i32,
    refresh: &[Vec<u8>],
) -> Result<CaseResult> {
    let mut samples = Vec::with_capacity(opts.trials);
    let mut seen = expected;
    for _ in 0..opts.trials {
        if expected == verdict::OK && program == TC_EGRESS {
            // A live flow's replies keep its learned next hop fresh (once
            // a refresh interval); without one for a few seconds the
            // egress would hand the packet back to the kernel's
            // neighbour resolution.
            for reply in refresh {
                dp.test_run_tc(TC_INGRESS, reply, 1)?;
            }
        }
        let out = dp.test_run_tc(program, frame, opts.repeat)?;
        seen = out.verdict;
        ensure!(
            out.frame == frame,
            "{case}: the measured packet changed, the measurement would be wrong"
        );
        samples.push(out.duration);
    }
    ensure!(
        seen == expected,
        "{case}: verdict {seen}, expected {expected}"
    );
    samples.sort();
    let ns = |d: Duration| d.as_nanos() as f64;
    Ok(CaseResult {
        case,
        program,
        verdict: seen,
        ns_min: ns(samples[0]),
        ns_median: ns(samples[samples.len() / 2]),
        ns_max: ns(samples[samples.len() - 1]),
    })
}
