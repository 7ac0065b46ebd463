//! The real eBPF object's IPv6 TC path (`up_tc_egress6`/`up_tc_ingress6`,
//! entered by the TC pair's tail calls), run with BPF_PROG_TEST_RUN on
//! crafted IPv6 frames: fixtures `{description, input, expected frame,
//! verdict}` as in `prog_test_run.rs`, every output's L4 checksum
//! verified from scratch over the IPv6 pseudo header (`lab::packet6`),
//! with the programs' own checksum arithmetic and with the helpers.

mod common;

use std::{net::Ipv6Addr, time::Duration};

use common::{PinDir, load_private, load_private_checksums, service_counts};
use datapath_common::{
    maps::{CT_KIND_BACKEND, CT_KIND_SERVICE, CtEntry6, CtKey6, L2_REWRITE},
    metrics::Counter,
    port_be,
};
use datapath_user::{
    Datapath,
    loader::L4Checksums,
    maps::LbMaps,
    model::{BackendEntry, Frontend, Protocol, ipv6_words},
    object::{TC_EGRESS, TC_INGRESS, verdict},
};
use lab::{
    packet::{ACK, FIN, L4, PSH, SYN},
    packet6::{self, Frame6},
};

const VIP: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 1);
const CLIENT: (Ipv6Addr, u16) = (Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 2), 40000);
const POD_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
const GATEWAY_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0xfe];
const B1: BackendEntry<Ipv6Addr> = BackendEntry {
    id: 1,
    address: Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 3),
    port: 8080,
};
const B2: BackendEntry<Ipv6Addr> = BackendEntry {
    id: 2,
    address: Ipv6Addr::new(0xfd78, 0, 0, 0, 0, 0, 0, 5),
    port: 9090,
};

fn frontend(protocol: Protocol, port: u16) -> Frontend<Ipv6Addr> {
    Frontend {
        address: VIP,
        port,
        protocol,
    }
}

/// A private datapath with TCP VIP:80 (reverse-NAT id 1) and UDP VIP:53
/// (id 2) over `backends`.
fn datapath_with(dp: &mut Datapath, backends: &[BackendEntry<Ipv6Addr>]) {
    dp.maps
        .set_service6(&frontend(Protocol::Tcp, 80), 1, backends)
        .unwrap();
    dp.maps
        .set_service6(&frontend(Protocol::Udp, 53), 2, backends)
        .unwrap();
}

fn run(dp: &mut Datapath, program: &'static str, frame: &[u8]) -> (i32, Vec<u8>) {
    let out = dp
        .test_run_tc(program, frame, 1)
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN {program}: {e}"));
    (out.verdict, out.frame)
}

/// `frame` sent to `backend` instead of its destination.
fn to_backend(frame: &Frame6, backend: &BackendEntry<Ipv6Addr>) -> Frame6 {
    Frame6 {
        dst: backend.address,
        dport: backend.port,
        ..frame.clone()
    }
}

/// Asserts `got` is `expected` byte for byte and that its L4 checksum
/// verifies from scratch.
fn assert_frame(what: &str, got: &[u8], expected: &Frame6) {
    let parsed = packet6::parse6(got).unwrap_or_else(|| panic!("{what}: not IPv6"));
    assert_eq!(parsed.l4_checksum_ok, Some(true), "{what}: L4 checksum");
    assert_eq!(got, expected.build().as_slice(), "{what}: frame");
}

fn service_key(frame: &Frame6) -> CtKey6 {
    CtKey6 {
        client_address_be: ipv6_words(frame.src),
        peer_address_be: ipv6_words(frame.dst),
        client_port_be: port_be(frame.sport),
        peer_port_be: port_be(frame.dport),
        protocol: frame.protocol(),
        kind: CT_KIND_SERVICE,
        _pad: [0; 2],
    }
}

fn ct_entry(dp: &Datapath, key: &CtKey6) -> Option<CtEntry6> {
    let v6 = dp.maps.v6.as_ref().expect("the IPv6 maps");
    let table = if key.protocol == 6 {
        &v6.conntrack6_tcp
    } else {
        &v6.conntrack6_udp
    };
    table.get(key, 0).ok()
}

/// Every packet to an IPv6 frontend is DNATed to the backend with its
/// checksum right (programs' arithmetic and helpers alike, TCP and UDP),
/// past extension headers and in fragments too (a later fragment by the
/// ports its first fragment left in `FRAGMENTS6`); a later fragment of a
/// datagram whose first was not seen, and everything else, passes both
/// programs untouched.
#[test]
fn packets_to_an_ipv6_frontend_are_dnated_and_others_pass_untouched() {
    struct Case {
        description: &'static str,
        input: Frame6,
        /// The backend it is sent to (`None`: passes untouched).
        translated: Option<BackendEntry<Ipv6Addr>>,
    }
    let (hop_by_hop, dest_options, esp) = (0, 60, 50);
    let to_pod = (B1.address, 8080);
    let cases = || {
        [
            Case {
                description: "TCP SYN to the IPv6 ClusterIP",
                input: Frame6::tcp(CLIENT, (VIP, 80), SYN),
                translated: Some(B1),
            },
            Case {
                description: "UDP to the IPv6 ClusterIP",
                input: Frame6::udp((CLIENT.0, 40001), (VIP, 53)).with_payload(b"query"),
                translated: Some(BackendEntry { port: 8080, ..B1 }),
            },
            Case {
                description: "a TCP ACK of a flow not seen before (opens one, as over IPv4)",
                input: Frame6::tcp((CLIENT.0, 40002), (VIP, 80), ACK | PSH).with_payload(b"x"),
                translated: Some(B1),
            },
            Case {
                description: "TCP SYN after a hop-by-hop and a destination options header",
                input: Frame6::tcp((CLIENT.0, 40003), (VIP, 80), SYN)
                    .with_extension(hop_by_hop, 0)
                    .with_extension(dest_options, 1),
                translated: Some(B1),
            },
            Case {
                description: "the first fragment of a UDP datagram",
                input: Frame6::udp((CLIENT.0, 40004), (VIP, 53)).fragment(0, true, 7),
                translated: Some(BackendEntry { port: 8080, ..B1 }),
            },
            Case {
                description: "a later fragment of that datagram (its ports remembered)",
                input: Frame6::udp((CLIENT.0, 40004), (VIP, 53)).fragment(8, false, 7),
                translated: Some(BackendEntry { port: 8080, ..B1 }),
            },
            Case {
                description: "a later fragment of a datagram whose first was not seen",
                input: Frame6::udp((CLIENT.0, 40005), (VIP, 53)).fragment(8, false, 8),
                translated: None,
            },
            Case {
                description: "another port of the ClusterIP",
                input: Frame6::tcp(CLIENT, (VIP, 81), SYN),
                translated: None,
            },
            Case {
                // (From a port no service flow to that pod holds: see
                // `a_direct_ipv6_connection_on_a_service_flows_wire_tuple_…`.)
                description: "TCP straight to a pod",
                input: Frame6::tcp((CLIENT.0, 40100), to_pod, SYN),
                translated: None,
            },
            Case {
                description: "behind ESP (not looked past)",
                input: Frame6::udp(CLIENT, (VIP, 53)).with_extension(esp, 0),
                translated: None,
            },
            Case {
                description: "a neighbour solicitation",
                input: packet6::neighbour_solicitation(CLIENT.0, POD_MAC, B1.address),
                translated: None,
            },
        ]
    };
    for checksums in [L4Checksums::Direct, L4Checksums::Helpers] {
        let mut dp = load_private_checksums(checksums);
        datapath_with(&mut dp, &[B1]);
        for case in cases() {
            let what = format!("{} ({checksums:?})", case.description);
            let input = case.input.with_macs(POD_MAC, GATEWAY_MAC);
            let sent = input.build();
            let back = run(&mut dp, TC_INGRESS, &sent);
            assert_eq!(
                (back.0, back.1.as_slice()),
                (verdict::NEXT, sent.as_slice()),
                "{what}: ingress passes it untouched"
            );
            let (v, out) = run(&mut dp, TC_EGRESS, &sent);
            match case.translated {
                None => assert_eq!(
                    (v, out.as_slice()),
                    (verdict::NEXT, sent.as_slice()),
                    "{what}: egress passes it untouched"
                ),
                Some(backend) => {
                    // First packet: next hop not learned yet.
                    assert_eq!(v, verdict::REDIRECT, "{what}");
                    let expected = to_backend(&input, &backend);
                    if input.fragment.is_some_and(|(offset, ..)| offset != 0) {
                        // No upper-layer header, no checksum to verify.
                        assert_eq!(out, expected.build(), "{what}: frame");
                    } else {
                        assert_frame(&what, &out, &expected);
                    }
                }
            }
        }
        assert_eq!(dp.maps.counter(Counter::ConntrackMiss).unwrap(), 5);
        assert_eq!(dp.maps.counter(Counter::FragmentTranslated).unwrap(), 1);
        assert_eq!(
            dp.maps.counter(Counter::Fragment).unwrap(),
            2,
            "the unknown one, on ingress and on egress"
        );
        assert_eq!(dp.maps.counter(Counter::Ipv6Untranslated).unwrap(), 0);
    }
}

/// A flow's life over IPv6: the SYN is tracked (both entries), the
/// backend's SYN-ACK is reverse-translated to come from the ClusterIP and
/// teaches the flow its next hop, later packets keep their backend and
/// get their MACs written in place; a reply from elsewhere passes.
#[test]
fn an_ipv6_flow_keeps_its_backend_and_its_replies_come_from_the_cluster_ip() {
    for checksums in [L4Checksums::Direct, L4Checksums::Helpers] {
        let mut dp = load_private_checksums(checksums);
        datapath_with(&mut dp, &[B1, B2]);
        let syn = Frame6::tcp(CLIENT, (VIP, 80), SYN).with_macs(POD_MAC, GATEWAY_MAC);
        let (v, out) = run(&mut dp, TC_EGRESS, &syn.build());
        assert_eq!(v, verdict::REDIRECT);
        let chosen = packet6::parse6(&out).unwrap().dst;
        let backend = [B1, B2]
            .into_iter()
            .find(|b| b.address == chosen)
            .expect("a configured backend");
        assert_frame("SYN DNAT", &out, &to_backend(&syn, &backend));

        let forward = ct_entry(&dp, &service_key(&syn)).expect("service-tuple entry");
        assert_eq!((forward.backend_id, forward.rev_nat_id()), (backend.id, 1));
        let reply_key = CtKey6 {
            peer_address_be: ipv6_words(backend.address),
            peer_port_be: port_be(backend.port),
            kind: CT_KIND_BACKEND,
            ..service_key(&syn)
        };
        let reply_entry = ct_entry(&dp, &reply_key).expect("backend-tuple entry");
        assert_eq!(
            (reply_entry.service_address_be, reply_entry.service_port_be),
            (ipv6_words(VIP), port_be(80))
        );

        let backend_mac = [2, 0, 0, 0, 0, 0xbb];
        let synack = Frame6 {
            src_mac: backend_mac,
            dst_mac: POD_MAC,
            ..to_backend(&syn, &backend).reply(L4::Tcp { flags: SYN | ACK })
        };
        let (v, out) = run(&mut dp, TC_INGRESS, &synack.build());
        assert_eq!(v, verdict::OK, "{checksums:?}");
        let expected = Frame6 {
            src: VIP,
            sport: 80,
            ..synack.clone()
        };
        assert_frame("SYN-ACK reverse NAT", &out, &expected);
        assert_eq!(dp.maps.counter(Counter::ReverseTranslated).unwrap(), 1);
        let forward = ct_entry(&dp, &service_key(&syn)).unwrap();
        assert_eq!(forward.l2_mode, L2_REWRITE, "the reply taught the next hop");

        for i in 0..10 {
            let ack = Frame6::tcp(CLIENT, (VIP, 80), ACK | PSH)
                .with_payload(&[i; 20])
                .with_macs(POD_MAC, GATEWAY_MAC);
            let (v, out) = run(&mut dp, TC_EGRESS, &ack.build());
            assert_eq!(v, verdict::OK, "packet {i}: MACs written, no redirect");
            let expected = Frame6 {
                dst_mac: backend_mac,
                src_mac: POD_MAC,
                ..to_backend(&ack, &backend)
            };
            assert_frame("tracked packet", &out, &expected);
        }
        assert_eq!(dp.maps.counter(Counter::ConntrackHit).unwrap(), 10);

        // The same ports from another address: not a reply of this flow.
        let other = BackendEntry {
            address: "fd77::99".parse().unwrap(),
            ..backend
        };
        let stranger = Frame6 {
            src_mac: backend_mac,
            dst_mac: POD_MAC,
            ..to_backend(&syn, &other).reply(L4::Tcp { flags: ACK })
        }
        .build();
        assert_eq!(
            run(&mut dp, TC_INGRESS, &stranger),
            (verdict::NEXT, stranger.clone()),
            "a packet of no flow passes"
        );
    }
}

/// A connection straight to a backend that reuses the source port of an
/// ended IPv6 service flow to that backend gets its replies untouched:
/// its SYN frees the tuple the ended flow still holds (both entries), so
/// the flow's reply entry no longer rewrites them to the ClusterIP (a
/// live flow's tuple moves the direct connection instead:
/// `a_direct_ipv6_connection_on_a_service_flows_wire_tuple_…`).
#[test]
fn a_direct_ipv6_connection_on_an_ended_service_flows_tuple_gets_its_replies_untouched() {
    let mut dp = load_private();
    datapath_with(&mut dp, &[B1]);
    let flow = |flags| Frame6::tcp(CLIENT, (VIP, 80), flags).with_macs(POD_MAC, GATEWAY_MAC);
    let direct_syn = to_backend(&flow(SYN), &B1).build();
    let reply = Frame6 {
        src_mac: GATEWAY_MAC,
        dst_mac: POD_MAC,
        ..to_backend(&flow(SYN), &B1).reply(L4::Tcp { flags: SYN | ACK })
    }
    .build();
    run(&mut dp, TC_EGRESS, &flow(SYN).build());
    assert_eq!(
        run(&mut dp, TC_INGRESS, &reply).0,
        verdict::OK,
        "the service flow's reply is translated"
    );
    // Both ends' FINs close it; the next direct SYN frees the tuple.
    run(&mut dp, TC_EGRESS, &flow(FIN | ACK).build());
    let backend_fin = Frame6 {
        src_mac: GATEWAY_MAC,
        dst_mac: POD_MAC,
        ..to_backend(&flow(SYN), &B1).reply(L4::Tcp { flags: FIN | ACK })
    }
    .build();
    run(&mut dp, TC_INGRESS, &backend_fin);
    assert_eq!(
        run(&mut dp, TC_EGRESS, &direct_syn),
        (verdict::NEXT, direct_syn.clone())
    );
    assert!(ct_entry(&dp, &service_key(&flow(SYN))).is_none(), "freed");
    assert_eq!(
        run(&mut dp, TC_INGRESS, &reply),
        (verdict::NEXT, reply.clone()),
        "the direct connection's reply passes untouched"
    );
}

/// A tracked flow whose backend left the service is balanced afresh on
/// its next packet (as over IPv4: a TCP flow then gets a RST from the new
/// backend and fails fast instead of hanging).
#[test]
fn an_ipv6_flow_whose_backend_left_moves_to_one_that_remains() {
    let mut dp = load_private();
    datapath_with(&mut dp, &[B1]);
    let udp = Frame6::udp(CLIENT, (VIP, 53)).with_macs(POD_MAC, GATEWAY_MAC);
    let (_, out) = run(&mut dp, TC_EGRESS, &udp.build());
    assert_eq!(packet6::parse6(&out).unwrap().dst, B1.address);
    dp.maps
        .set_service6(&frontend(Protocol::Udp, 53), 2, &[B2])
        .unwrap();
    dp.maps.remove_backend(B1.id).unwrap();
    let (v, out) = run(&mut dp, TC_EGRESS, &udp.build());
    assert_eq!(v, verdict::REDIRECT);
    assert_frame(
        "re-balanced",
        &out,
        &to_backend(&udp, &BackendEntry { port: 9090, ..B2 }),
    );
    assert_eq!(dp.maps.counter(Counter::ConntrackMiss).unwrap(), 2);
}

/// A frontend without endpoints refuses every packet into the pod (as
/// over IPv4), from the ClusterIP, checksums valid from scratch: a TCP
/// SYN with a reset acknowledging it (ECONNREFUSED at once even while
/// `connect()` holds the socket), anything else (UDP, a TCP ACK of a flow
/// whose backends all left) with an ICMPv6 port unreachable quoting 48
/// bytes.
#[test]
fn an_ipv6_frontend_without_endpoints_refuses_new_flows() {
    let mut dp = load_private();
    datapath_with(&mut dp, &[]);
    let mut refused = 0;
    for (what, input) in [
        ("SYN, no endpoints", Frame6::tcp(CLIENT, (VIP, 80), SYN)),
        ("UDP, no endpoints", Frame6::udp(CLIENT, (VIP, 53))),
        // A flow whose backends all left: never sent on untranslated.
        ("ACK, no endpoints", Frame6::tcp(CLIENT, (VIP, 80), ACK)),
    ] {
        let input = input.with_macs(POD_MAC, GATEWAY_MAC);
        let sent = input.build();
        let (v, out) = run(&mut dp, TC_EGRESS, &sent);
        refused += 1;
        assert_eq!(v, verdict::REDIRECT, "{what}: into the pod");
        let got = packet6::parse6(&out).unwrap_or_else(|| panic!("{what}: not IPv6"));
        assert_eq!(
            (got.dst_mac, got.src_mac, got.src, got.dst),
            (POD_MAC, GATEWAY_MAC, VIP, CLIENT.0),
            "{what}: from the ClusterIP to the pod"
        );
        assert_eq!(got.l4_checksum_ok, Some(true), "{what}: checksum");
        let l4 = &out[54..];
        if input.protocol() == 6 && sent[14 + 40 + 13] == SYN {
            assert_eq!(out.len(), 74, "{what}: a bare TCP header");
            assert_eq!((got.sport, got.dport), (input.dport, CLIENT.1), "{what}");
            let syn_seq = u32::from_be_bytes(sent[58..62].try_into().unwrap());
            let ack = u32::from_be_bytes(l4[8..12].try_into().unwrap());
            assert_eq!(ack, syn_seq.wrapping_add(1), "{what}: acknowledges the SYN");
            assert_eq!(l4[13], 0x14, "{what}: RST+ACK");
        } else {
            assert_eq!(got.protocol, 58, "{what}: ICMPv6");
            assert_eq!((l4[0], l4[1]), (1, 4), "{what}: port unreachable");
            assert_eq!(&l4[8..], &sent[14..14 + 48], "{what}: quotes the packet");
        }
        assert_eq!(
            dp.maps.counter(Counter::NoBackend).unwrap(),
            refused,
            "{what}"
        );
    }
    // Past an extension header the refusal could name no socket: the
    // packet is dropped (counted), never sent on untranslated.
    let hop_by_hop = Frame6::tcp(CLIENT, (VIP, 80), SYN)
        .with_extension(0, 0)
        .with_macs(POD_MAC, GATEWAY_MAC);
    assert_eq!(
        run(&mut dp, TC_EGRESS, &hop_by_hop.build()).0,
        verdict::SHOT
    );
    assert_eq!(dp.maps.counter(Counter::NoBackend).unwrap(), refused + 1);
}

/// A SYN|FIN past an extension header opens a flow that
/// `up_tc_egress6_ext` does not take (a closing state: `syn_reopens`):
/// dropped once, counted, instead of the two programs opening it again
/// and again up to the kernel's tail-call limit.
#[test]
fn a_new_flow_the_extended_program_does_not_take_is_dropped_once() {
    let mut dp = load_private();
    datapath_with(&mut dp, &[B1]);
    let odd = Frame6::tcp(CLIENT, (VIP, 80), SYN | FIN)
        .with_extension(0, 0)
        .with_macs(POD_MAC, GATEWAY_MAC);
    assert_eq!(run(&mut dp, TC_EGRESS, &odd.build()).0, verdict::SHOT);
    assert_eq!(dp.maps.counter(Counter::ConntrackMiss).unwrap(), 1);
    assert_eq!(dp.maps.counter(Counter::Error).unwrap(), 1);
}

/// The egress program the loader pins (for the CNI plugin, which attaches
/// it without loading the object) keeps its IPv6 half after the process
/// that loaded it is gone: the jump table is pinned beside it (the
/// kernel empties a program array no process holds). Run from its pin,
/// a SYN to the IPv6 frontend is translated (sent on by
/// `bpf_redirect_neigh`), where without the jump it would pass.
#[test]
fn the_pinned_egress_program_still_reaches_its_ipv6_half_after_its_loader_is_gone() {
    let pins = PinDir::new();
    let pin_dir = pins.path();
    {
        let mut dp = Datapath::load(&datapath_user::LoadOptions {
            pin_dir: Some(pin_dir.clone()),
            sizes: datapath_user::loader::MapSizes {
                ipv6: true,
                ..datapath_user::loader::MapSizes::default()
            },
            ..datapath_user::LoadOptions::default()
        })
        .unwrap();
        dp.maps
            .set_service6(&frontend(Protocol::Tcp, 80), 1, &[B1])
            .unwrap();
    }
    let syn = Frame6::tcp(CLIENT, (VIP, 80), SYN).build();
    assert_eq!(
        datapath_user::loader::test_run_pinned(&pin_dir, TC_EGRESS, &syn).unwrap(),
        verdict::REDIRECT,
        "translated through the pinned jump table"
    );
}

/// An agent restart keeps the IPv6 half of the programs still attached
/// to pods (the earlier generation's, until the new agent swaps them, or
/// for good on pods the CNI plugin attached): the jump table is one for
/// every generation, its slots pointed at the newest programs. The
/// earlier egress program, held as a pod's attachment holds it, still
/// translates once its agent is gone and the next one has pinned its own
/// programs and gone too.
#[test]
fn programs_of_an_earlier_generation_keep_their_ipv6_half_after_a_restart() {
    let pins = PinDir::new();
    let pin_dir = pins.path();
    let load = || {
        Datapath::load(&datapath_user::LoadOptions {
            pin_dir: Some(pin_dir.clone()),
            sizes: datapath_user::loader::MapSizes {
                ipv6: true,
                ..datapath_user::loader::MapSizes::default()
            },
            ..datapath_user::LoadOptions::default()
        })
        .unwrap()
    };
    let earlier = {
        let mut dp = load();
        dp.maps
            .set_service6(&frontend(Protocol::Tcp, 80), 1, &[B1])
            .unwrap();
        datapath_user::loader::hold_pinned(&pin_dir, TC_EGRESS).unwrap()
    };
    {
        let mut dp = load();
        dp.pin_tc_programs().unwrap();
    }
    let syn = Frame6::tcp(CLIENT, (VIP, 80), SYN).build();
    assert_eq!(
        datapath_user::loader::test_run_held(&earlier, &syn).unwrap(),
        verdict::REDIRECT,
        "the earlier egress program still reaches its IPv6 half"
    );
    assert_eq!(
        datapath_user::loader::test_run_pinned(&pin_dir, TC_EGRESS, &syn).unwrap(),
        verdict::REDIRECT,
        "and so does the newest"
    );
}

/// ICMPv6 errors about translated IPv6 flows are translated back, outer
/// and quoted headers, the ICMPv6 checksum (over the outer pseudo
/// header) and the quoted L4 checksum (over the quoted one) verified from
/// scratch — each output byte for byte the error the client's (or the
/// backend's) kernel would have got without translation: a router's
/// "packet too big" about a DNATed segment reaches the client quoting
/// the ClusterIP (path-MTU discovery works), the backend's own "port
/// unreachable" comes from the ClusterIP, the client's "port
/// unreachable" about a reply goes to the backend that sent it. Errors
/// about flows nobody tracks, and NDP, pass untouched.
#[test]
fn icmpv6_errors_about_translated_flows_are_translated() {
    const PACKET_TOO_BIG: u8 = 2;
    const DEST_UNREACH: (u8, u8) = (1, 4); // port unreachable
    const TIME_EXCEEDED: u8 = 3;
    let router: Ipv6Addr = "fd77::fe".parse().unwrap();
    for checksums in [L4Checksums::Direct, L4Checksums::Helpers] {
        let mut dp = load_private_checksums(checksums);
        datapath_with(&mut dp, &[B1]);

        // TCP: the client's segment as it left (to B1), quoted by a router
        // that could not forward it: 8 bytes of it, or whole.
        let syn = Frame6::tcp(CLIENT, (VIP, 80), SYN).with_macs(POD_MAC, GATEWAY_MAC);
        let (v, _) = run(&mut dp, TC_EGRESS, &syn.build());
        assert_eq!(v, verdict::REDIRECT, "{checksums:?}: the flow opens");
        let segment = Frame6::tcp(CLIENT, (VIP, 80), ACK | PSH).with_payload(&[9; 1400]);
        let (on_wire, as_sent) = (to_backend(&segment, &B1).build(), segment.build());
        for (description, quoted_len) in [
            ("packet too big quoting 8 bytes of TCP", 48),
            (
                "packet too big quoting the whole segment",
                on_wire.len() - 14,
            ),
        ] {
            let error = packet6::icmp6(
                router,
                CLIENT.0,
                PACKET_TOO_BIG,
                0,
                1280,
                &on_wire[14..14 + quoted_len],
            );
            let (v, out) = run(&mut dp, TC_INGRESS, &error.build());
            let what = format!("{checksums:?}: {description}");
            assert_eq!(v, verdict::OK, "{what}");
            let expected = packet6::icmp6(
                router,
                CLIENT.0,
                PACKET_TOO_BIG,
                0,
                1280,
                &as_sent[14..14 + quoted_len],
            );
            assert_icmp6(&what, &out, &expected);
            if quoted_len > 48 {
                let quoted = &out[14 + 40 + 8..];
                assert!(
                    datapath_common::csum::l4_verifies6(
                        CLIENT.0.octets(),
                        VIP.octets(),
                        6,
                        &quoted[40..]
                    ),
                    "{what}: the quoted TCP checksum follows the ClusterIP"
                );
            }
        }

        // UDP: the backend itself answers "port unreachable".
        let query = Frame6::udp((CLIENT.0, 40002), (VIP, 53)).with_payload(b"query");
        let (v, _) = run(&mut dp, TC_EGRESS, &query.build());
        assert_eq!(v, verdict::REDIRECT);
        let sent = to_backend(&query, &B1).build();
        let (code_type, code) = DEST_UNREACH;
        let error = packet6::icmp6(B1.address, CLIENT.0, code_type, code, 0, &sent[14..]);
        let (v, out) = run(&mut dp, TC_INGRESS, &error.build());
        assert_eq!(v, verdict::OK);
        let expected = packet6::icmp6(VIP, CLIENT.0, code_type, code, 0, &query.build()[14..]);
        assert_icmp6(
            "the backend's own error comes from the ClusterIP",
            &out,
            &expected,
        );
        assert_eq!(dp.maps.counter(Counter::IcmpErrorTranslated).unwrap(), 3);

        // The client's "port unreachable" about a reply it got from
        // VIP:53 goes to the backend that sent it.
        let reply_seen = Frame6::udp((VIP, 53), (CLIENT.0, 40002)).with_payload(b"late answer");
        let error = packet6::icmp6(CLIENT.0, VIP, code_type, code, 0, &reply_seen.build()[14..]);
        let (v, out) = run(&mut dp, TC_EGRESS, &error.build());
        assert_eq!(v, verdict::REDIRECT, "routed to the backend");
        let really_from = Frame6 {
            src: B1.address,
            sport: B1.port,
            ..reply_seen.clone()
        };
        let expected = packet6::icmp6(
            CLIENT.0,
            B1.address,
            code_type,
            code,
            0,
            &really_from.build()[14..],
        );
        assert_icmp6("the client's error goes to the backend", &out, &expected);
        assert_eq!(dp.maps.counter(Counter::IcmpErrorTranslated).unwrap(), 4);

        // A router's packet too big about a UDP datagram sent in
        // fragments quotes its first fragment (fragment header, then the
        // UDP header): translated too.
        let large = Frame6::udp((CLIENT.0, 40003), (VIP, 53))
            .with_payload(&[5; 3000])
            .with_macs(POD_MAC, GATEWAY_MAC);
        let first = packet6::fragments(&large, 1232, 0x77).remove(0);
        let (v, on_wire) = run(&mut dp, TC_EGRESS, &first);
        assert_eq!(v, verdict::REDIRECT);
        let error = packet6::icmp6(
            router,
            CLIENT.0,
            PACKET_TOO_BIG,
            0,
            1280,
            &on_wire[14..14 + 1232],
        );
        let (v, out) = run(&mut dp, TC_INGRESS, &error.build());
        assert_eq!(v, verdict::OK, "packet too big about a first fragment");
        let expected = packet6::icmp6(
            router,
            CLIENT.0,
            PACKET_TOO_BIG,
            0,
            1280,
            &first[14..14 + 1232],
        );
        assert_icmp6("packet too big about a first fragment", &out, &expected);
        assert_eq!(dp.maps.counter(Counter::IcmpErrorTranslated).unwrap(), 5);

        // About a flow nobody tracks, or not an error: untouched.
        let other = Frame6::udp((CLIENT.0, 41000), (B1.address, B1.port)).build();
        let untracked = packet6::icmp6(router, CLIENT.0, TIME_EXCEEDED, 0, 0, &other[14..]).build();
        let solicitation = packet6::neighbour_solicitation(router, GATEWAY_MAC, CLIENT.0).build();
        for (description, program, frame) in [
            ("an error about an untracked flow", TC_INGRESS, &untracked),
            ("a neighbour solicitation", TC_INGRESS, &solicitation),
            ("the client's error about a direct reply", TC_EGRESS, &{
                let direct = Frame6::udp((B1.address, B1.port), (CLIENT.0, 41000)).build();
                packet6::icmp6(CLIENT.0, B1.address, code_type, code, 0, &direct[14..]).build()
            }),
        ] {
            assert_eq!(
                run(&mut dp, program, frame),
                (verdict::NEXT, frame.clone()),
                "{description}"
            );
        }
        assert_eq!(dp.maps.counter(Counter::IcmpErrorTranslated).unwrap(), 5);
    }
}

/// Asserts `got` is the ICMPv6 message `expected` byte for byte and that
/// its checksum verifies from scratch over the pseudo header.
fn assert_icmp6(what: &str, got: &[u8], expected: &Frame6) {
    let parsed = packet6::parse6(got).unwrap_or_else(|| panic!("{what}: not IPv6"));
    assert_eq!(parsed.protocol, packet6::ICMPV6, "{what}");
    assert_eq!(parsed.l4_checksum_ok, Some(true), "{what}: ICMPv6 checksum");
    assert_eq!(got, expected.build().as_slice(), "{what}: frame");
}

/// A UDP datagram larger than the path MTU crosses an IPv6 ClusterIP in
/// fragments, both ways, each fragment byte for byte what the kernel
/// would have sent to (or received from) the backend directly: the first
/// fragment's checksum, the whole datagram's, follows the new address
/// and port (so the reassembled datagram verifies), the later fragments
/// get the address alone; datagrams in flight at once do not disturb
/// each other. A later fragment seen before its first passes untouched
/// and is counted.
#[test]
fn fragmented_ipv6_datagrams_are_translated_both_ways() {
    for checksums in [L4Checksums::Direct, L4Checksums::Helpers] {
        let mut dp = load_private_checksums(checksums);
        datapath_with(&mut dp, &[B1]);
        let query = Frame6::udp((CLIENT.0, 40010), (VIP, 53))
            .with_payload(&(0..3000).map(|i| i as u8).collect::<Vec<_>>())
            .with_macs(POD_MAC, GATEWAY_MAC);
        // Two datagrams in flight at once (two sockets), their fragments
        // interleaved.
        let other = Frame6 {
            sport: 40011,
            ..query.clone()
        };
        let sent = [
            packet6::fragments(&query, 1232, 0x1234_5678),
            packet6::fragments(&other, 1232, 0x1234_5679),
        ];
        let expected = [
            packet6::fragments(&to_backend(&query, &B1), 1232, 0x1234_5678),
            packet6::fragments(&to_backend(&other, &B1), 1232, 0x1234_5679),
        ];
        assert_eq!(sent[0].len(), 3);
        for i in 0..3 {
            for datagram in 0..2 {
                let (v, out) = run(&mut dp, TC_EGRESS, &sent[datagram][i]);
                let what = format!("{checksums:?}: datagram {datagram} fragment {i}");
                assert_eq!(v, verdict::REDIRECT, "{what} to the backend");
                assert_eq!(out, expected[datagram][i], "{what}");
            }
        }

        // The backend's answer, fragmented: from the ClusterIP again.
        let answer = Frame6 {
            src_mac: GATEWAY_MAC,
            dst_mac: POD_MAC,
            ..to_backend(&query, &B1).reply(L4::Udp { checksum: true })
        }
        .with_payload(&[7; 2500]);
        let arrived = packet6::fragments(&answer, 1448, 0x0bad_cafe);
        let seen = packet6::fragments(
            &Frame6 {
                src: VIP,
                sport: 53,
                ..answer.clone()
            },
            1448,
            0x0bad_cafe,
        );
        for (i, (fragment, expected)) in arrived.iter().zip(&seen).enumerate() {
            let (v, out) = run(&mut dp, TC_INGRESS, fragment);
            assert_eq!(v, verdict::OK, "{checksums:?}: answer fragment {i}");
            assert_eq!(&out, expected, "{checksums:?}: answer fragment {i}");
        }
        assert_eq!(
            dp.maps.counter(Counter::FragmentTranslated).unwrap(),
            (2 * (sent[0].len() - 1) + arrived.len() - 1) as u64
        );

        // Out of order: the last fragment of another datagram before its
        // first one passes as it is.
        let early = packet6::fragments(&query, 1232, 0x99).pop().unwrap();
        assert_eq!(
            run(&mut dp, TC_EGRESS, &early),
            (verdict::NEXT, early.clone())
        );
        assert_eq!(dp.maps.counter(Counter::Fragment).unwrap(), 1);
    }
}

/// A pod that reaches its own IPv6 service and is chosen as the backend
/// gets its connection looped back inside it (hairpin): its SYN arrives
/// in the pod from the hairpin source 100::a9fe:2a01 (addressed to the
/// pod's own MAC), its SYN-ACK to that source is turned into one from the
/// ClusterIP and looped back too, and later packets of the flow follow;
/// every checksum verifies from scratch. A packet to the hairpin source
/// of no flow is dropped, never sent to the gateway. With another backend
/// beside it, the pod is chosen too (as over IPv4: no redraw).
#[test]
fn an_ipv6_pod_that_is_its_own_backend_gets_its_connection_looped_back() {
    let hairpin: Ipv6Addr = "100::a9fe:2a01".parse().unwrap();
    let myself = BackendEntry {
        id: 3,
        address: CLIENT.0,
        port: 8080,
    };
    for checksums in [L4Checksums::Direct, L4Checksums::Helpers] {
        let mut dp = load_private_checksums(checksums);
        dp.maps
            .set_service6(&frontend(Protocol::Tcp, 81), 3, &[myself])
            .unwrap();
        dp.maps
            .set_service6(&frontend(Protocol::Udp, 53), 4, &[myself])
            .unwrap();
        let looped = |frame: Frame6| Frame6 {
            dst_mac: POD_MAC,
            src_mac: POD_MAC,
            ..frame
        };
        let flows = [
            (
                "TCP",
                Frame6::tcp(CLIENT, (VIP, 81), SYN),
                L4::Tcp { flags: SYN | ACK },
                Frame6::tcp(CLIENT, (VIP, 81), ACK | PSH).with_payload(b"again"),
            ),
            (
                "UDP",
                Frame6::udp(CLIENT, (VIP, 53)).with_payload(b"query"),
                L4::Udp { checksum: true },
                Frame6::udp(CLIENT, (VIP, 53)).with_payload(b"query 2"),
            ),
        ];
        for (what, first, answer, next) in flows {
            let what = format!("{what} ({checksums:?})");
            let first = first.with_macs(POD_MAC, GATEWAY_MAC);
            let (v, out) = run(&mut dp, TC_EGRESS, &first.build());
            assert_eq!(v, verdict::REDIRECT, "{what}: looped back into the pod");
            let arrives = Frame6 {
                src: hairpin,
                ..to_backend(&first, &myself)
            };
            assert_frame(&what, &out, &looped(arrives.clone()));

            // The pod answers the hairpin source: from the ClusterIP.
            let reply = arrives.reply(answer).with_macs(POD_MAC, GATEWAY_MAC);
            let (v, out) = run(&mut dp, TC_EGRESS, &reply.build());
            assert_eq!(v, verdict::REDIRECT, "{what}: the reply looped back");
            let expected = Frame6 {
                src: VIP,
                sport: first.dport,
                dst: CLIENT.0,
                ..reply.clone()
            };
            assert_frame(&format!("{what} reply"), &out, &looped(expected));

            // The flow's next packet (a conntrack hit) follows.
            let next = next.with_macs(POD_MAC, GATEWAY_MAC);
            let (v, out) = run(&mut dp, TC_EGRESS, &next.build());
            assert_eq!(v, verdict::REDIRECT, "{what}: next packet");
            let expected = Frame6 {
                src: hairpin,
                ..to_backend(&next, &myself)
            };
            assert_frame(&format!("{what} next"), &out, &looped(expected));
        }
        assert_eq!(dp.maps.counter(Counter::ConntrackMiss).unwrap(), 2);
        assert_eq!(dp.maps.counter(Counter::ConntrackHit).unwrap(), 2);
        assert_eq!(dp.maps.counter(Counter::ReverseTranslated).unwrap(), 2);

        // Past an extension header (through `up_tc_egress6_ext` and the
        // new-flow program and back), and the reply likewise.
        let syn = Frame6::tcp((CLIENT.0, 40200), (VIP, 81), SYN)
            .with_extension(0, 0)
            .with_macs(POD_MAC, GATEWAY_MAC);
        let (v, out) = run(&mut dp, TC_EGRESS, &syn.build());
        assert_eq!(v, verdict::REDIRECT, "{checksums:?}: hop-by-hop SYN looped");
        let arrives = Frame6 {
            src: hairpin,
            ..to_backend(&syn, &myself)
        };
        assert_frame("hop-by-hop SYN", &out, &looped(arrives.clone()));
        let reply = arrives
            .reply(L4::Tcp { flags: SYN | ACK })
            .with_macs(POD_MAC, GATEWAY_MAC);
        let (v, out) = run(&mut dp, TC_EGRESS, &reply.build());
        assert_eq!(v, verdict::REDIRECT);
        let expected = Frame6 {
            src: VIP,
            sport: 81,
            dst: CLIENT.0,
            ..reply.clone()
        };
        assert_frame("hop-by-hop SYN-ACK", &out, &looped(expected));

        // The pod's ICMPv6 error about a looped-back packet: dropped (the
        // hairpin source is on no wire).
        let error = packet6::icmp6(CLIENT.0, hairpin, 1, 4, 0, &arrives.build()[14..])
            .with_macs(POD_MAC, GATEWAY_MAC)
            .build();
        assert_eq!(run(&mut dp, TC_EGRESS, &error).0, verdict::SHOT);

        // No flow: dropped.
        let stray = Frame6::tcp((CLIENT.0, 8080), (hairpin, 41000), ACK)
            .with_macs(POD_MAC, GATEWAY_MAC)
            .build();
        assert_eq!(run(&mut dp, TC_EGRESS, &stray).0, verdict::SHOT);

        // Beside another backend the pod is chosen too.
        dp.maps
            .set_service6(&frontend(Protocol::Tcp, 82), 5, &[myself, B2])
            .unwrap();
        let mut chosen = std::collections::BTreeSet::new();
        for port in 40100..40140 {
            let syn = Frame6::tcp((CLIENT.0, port), (VIP, 82), SYN).with_macs(POD_MAC, GATEWAY_MAC);
            let (_, out) = run(&mut dp, TC_EGRESS, &syn.build());
            chosen.insert(packet6::parse6(&out).unwrap().dst);
        }
        assert_eq!(chosen.len(), 2, "{checksums:?}: both backends drawn");
    }
}

/// The source port of `frame`.
fn sport_of(frame: &[u8]) -> u16 {
    packet6::parse6(frame).unwrap().sport
}

/// Two IPv6 services share a backend and the client's kernel reuses its
/// port for both: the second flow's wire tuple ([client]:40000 →
/// [B1]:8080) is taken, so it gets another source port (in
/// `up_tc_clash6`), remembered in conntrack and given back on its replies
/// and on an ICMPv6 error about it; each flow's replies come from its own
/// ClusterIP. Checksums verified from scratch, with the programs'
/// arithmetic and with the helpers.
#[test]
fn a_second_ipv6_flow_on_a_taken_wire_tuple_gets_another_source_port() {
    let other = Frontend {
        address: "fd00:10:96::11".parse().unwrap(),
        port: 81,
        protocol: Protocol::Tcp,
    };
    for checksums in [L4Checksums::Direct, L4Checksums::Helpers] {
        let mut dp = load_private_checksums(checksums);
        datapath_with(&mut dp, &[B1]);
        dp.maps.set_service6(&other, 3, &[B1]).unwrap();
        let egress = |dp: &mut Datapath, frame: &Frame6| {
            run(
                dp,
                TC_EGRESS,
                &frame.clone().with_macs(POD_MAC, GATEWAY_MAC).build(),
            )
        };
        let first = Frame6::tcp(CLIENT, (VIP, 80), SYN);
        let (_, out) = egress(&mut dp, &first);
        assert_eq!(
            sport_of(&out),
            CLIENT.1,
            "{checksums:?}: the first keeps its port"
        );
        let second = Frame6::tcp(CLIENT, (other.address, other.port), SYN).with_payload(b"hi");
        let (v, out) = egress(&mut dp, &second);
        assert_eq!(v, verdict::REDIRECT, "{checksums:?}");
        let moved = sport_of(&out);
        assert_ne!(moved, CLIENT.1, "{checksums:?}: the second flow moved");
        assert!((32768..61000).contains(&moved), "{moved}");
        assert_frame(
            &format!("{checksums:?}: moved SYN"),
            &out,
            &Frame6 {
                sport: moved,
                ..to_backend(&second, &B1).with_macs(POD_MAC, GATEWAY_MAC)
            },
        );
        assert_eq!(dp.maps.counter(Counter::PortClash).unwrap(), 1);

        // Replies: to the moved port → from the other ClusterIP to the
        // client's own port; to the client's port → from the first.
        let reply_to = |port: u16| {
            Frame6::tcp((B1.address, B1.port), (CLIENT.0, port), SYN | ACK)
                .with_payload(b"ok")
                .with_macs(GATEWAY_MAC, POD_MAC)
        };
        let (v, out) = run(&mut dp, TC_INGRESS, &reply_to(moved).build());
        assert_eq!(v, verdict::OK, "{checksums:?}");
        assert_frame(
            &format!("{checksums:?}: reply to the moved port"),
            &out,
            &Frame6 {
                src: other.address,
                sport: other.port,
                dport: CLIENT.1,
                ..reply_to(moved)
            },
        );
        let (_, out) = run(&mut dp, TC_INGRESS, &reply_to(CLIENT.1).build());
        assert_frame(
            &format!("{checksums:?}: reply to the first flow"),
            &out,
            &Frame6 {
                src: VIP,
                sport: 80,
                ..reply_to(CLIENT.1)
            },
        );
        // Later packets of the second flow keep the moved port (the hit
        // path hands them to `up_tc_clash6`).
        let ack = Frame6::tcp(CLIENT, (other.address, other.port), ACK | PSH).with_payload(b"x");
        let (_, out) = egress(&mut dp, &ack);
        assert_frame(
            &format!("{checksums:?}: a later packet"),
            &out,
            &Frame6 {
                sport: moved,
                ..to_backend(&ack, &B1).with_macs(POD_MAC, GATEWAY_MAC)
            },
        );
        // A router's error about the moved segment reaches the client
        // quoting what it sent: the other ClusterIP, its own port.
        let router: Ipv6Addr = "fd77::fe".parse().unwrap();
        let on_wire = Frame6 {
            sport: moved,
            ..to_backend(&ack, &B1)
        }
        .build();
        let error = packet6::icmp6(router, CLIENT.0, 2, 0, 1280, &on_wire[14..]);
        let (v, out) = run(&mut dp, TC_INGRESS, &error.build());
        assert_eq!(v, verdict::OK, "{checksums:?}: the error");
        let expected = packet6::icmp6(router, CLIENT.0, 2, 0, 1280, &ack.build()[14..]);
        assert_icmp6(&format!("{checksums:?}: the error"), &out, &expected);
        // The client's own error about a reply it got from the other
        // ClusterIP goes to the backend, quoting the port on the wire.
        let reply_seen =
            Frame6::tcp((other.address, other.port), CLIENT, ACK | PSH).with_payload(b"late");
        let error = packet6::icmp6(CLIENT.0, other.address, 1, 4, 0, &reply_seen.build()[14..]);
        let (_, out) = run(&mut dp, TC_EGRESS, &error.build());
        let really = Frame6 {
            src: B1.address,
            sport: B1.port,
            dport: moved,
            ..reply_seen
        };
        // (Sent with the flow's learned MACs.)
        let expected = packet6::icmp6(CLIENT.0, B1.address, 1, 4, 0, &really.build()[14..])
            .with_macs(POD_MAC, GATEWAY_MAC);
        assert_icmp6(
            &format!("{checksums:?}: the client's error"),
            &out,
            &expected,
        );
    }
}

/// A connection straight to the backend that the kernel gave the wire
/// tuple of a live IPv6 service flow (the same client port): it moves to
/// another source port (in `up_tc_direct6`) and is tracked from its SYN
/// on, its destination marked so that its later packets find it; its
/// replies get the client's port back and keep their source; the service
/// flow is not disturbed.
#[test]
fn a_direct_ipv6_connection_on_a_service_flows_wire_tuple_gets_another_source_port() {
    for checksums in [L4Checksums::Direct, L4Checksums::Helpers] {
        let mut dp = load_private_checksums(checksums);
        datapath_with(&mut dp, &[B1]);
        let egress = |dp: &mut Datapath, frame: &Frame6| {
            run(
                dp,
                TC_EGRESS,
                &frame.clone().with_macs(POD_MAC, GATEWAY_MAC).build(),
            )
        };
        egress(&mut dp, &Frame6::tcp(CLIENT, (VIP, 80), SYN));
        assert_eq!(dp.maps.counter(Counter::PortClash).unwrap(), 0);

        let direct = Frame6::tcp(CLIENT, (B1.address, B1.port), SYN).with_payload(b"hi");
        let (v, out) = egress(&mut dp, &direct);
        assert_eq!(
            v,
            verdict::NEXT,
            "{checksums:?}: routed by the kernel as it was"
        );
        let moved = sport_of(&out);
        assert_ne!(moved, CLIENT.1, "{checksums:?}");
        assert_frame(
            &format!("{checksums:?}: moved direct SYN"),
            &out,
            &Frame6 {
                sport: moved,
                ..direct.with_macs(POD_MAC, GATEWAY_MAC)
            },
        );
        assert_eq!(dp.maps.counter(Counter::PortClash).unwrap(), 1);
        let data = Frame6::tcp(CLIENT, (B1.address, B1.port), ACK | PSH).with_payload(b"x");
        let (_, out) = egress(&mut dp, &data);
        assert_eq!(sport_of(&out), moved, "later packets keep the moved port");

        // The pod's answer to the moved port: the client's own port again,
        // the pod still its source.
        let answer = Frame6::tcp((B1.address, B1.port), (CLIENT.0, moved), ACK | PSH)
            .with_payload(b"y")
            .with_macs(GATEWAY_MAC, POD_MAC);
        let (_, out) = run(&mut dp, TC_INGRESS, &answer.build());
        assert_frame(
            &format!("{checksums:?}: direct reply"),
            &out,
            &Frame6 {
                dport: CLIENT.1,
                ..answer.clone()
            },
        );
        // The service flow's replies are still its own, and so are its
        // packets' ports.
        let service_reply =
            Frame6::tcp((B1.address, B1.port), CLIENT, SYN | ACK).with_macs(GATEWAY_MAC, POD_MAC);
        let (_, out) = run(&mut dp, TC_INGRESS, &service_reply.build());
        assert_frame(
            &format!("{checksums:?}: service reply"),
            &out,
            &Frame6 {
                src: VIP,
                sport: 80,
                ..service_reply
            },
        );
        let (_, out) = egress(&mut dp, &Frame6::tcp(CLIENT, (VIP, 80), ACK));
        assert_eq!(sport_of(&out), CLIENT.1, "the service flow keeps its port");
    }
}

/// A flow whose service-tuple entry was evicted (its reply entry still
/// live) is balanced again; landing on the same backend, its own reply
/// entry is not a clash: the client's port stays.
#[test]
fn an_ipv6_flow_rebalanced_onto_its_own_backend_keeps_its_port() {
    let mut dp = load_private();
    datapath_with(&mut dp, &[B1]);
    let syn = Frame6::tcp(CLIENT, (VIP, 80), SYN).with_macs(POD_MAC, GATEWAY_MAC);
    run(&mut dp, TC_EGRESS, &syn.build());
    let v6 = dp.maps.v6.as_mut().expect("the IPv6 maps");
    v6.conntrack6_tcp.remove(&service_key(&syn)).unwrap();
    let ack = Frame6::tcp(CLIENT, (VIP, 80), ACK).with_macs(POD_MAC, GATEWAY_MAC);
    let (_, out) = run(&mut dp, TC_EGRESS, &ack.build());
    assert_eq!(sport_of(&out), CLIENT.1, "not moved");
    assert_eq!(dp.maps.counter(Counter::PortClash).unwrap(), 0);
}

/// A UDP flow whose client port moved keeps its entries right when a
/// later fragment (no port: it stays on the per-packet path, its ports
/// from its first fragment) is the packet that refreshes them: the
/// flow's reply entry is looked up and written again under the port on
/// the wire, with the client's own port to restore; the entry the first
/// flow holds under the client's own port is left as it was.
#[test]
fn a_moved_flows_later_fragment_refreshes_its_entries_under_the_wire_port() {
    let mut dp = load_private();
    datapath_with(&mut dp, &[B1]);
    let other = Frontend {
        address: "fd00:10:96::11".parse().unwrap(),
        port: 54,
        protocol: Protocol::Udp,
    };
    dp.maps.set_service6(&other, 3, &[B1]).unwrap();
    let egress = |dp: &mut Datapath, frame: Frame6| {
        run(
            dp,
            TC_EGRESS,
            &frame.with_macs(POD_MAC, GATEWAY_MAC).build(),
        )
    };
    egress(&mut dp, Frame6::udp(CLIENT, (VIP, 53)));
    let datagram = Frame6::udp(CLIENT, (other.address, other.port)).with_payload(&[5; 64]);
    let (_, out) = egress(&mut dp, datagram.clone().fragment(0, true, 9));
    let moved = sport_of(&out);
    assert_ne!(moved, CLIENT.1, "the second flow moved");
    let backend_key = |port: u16| CtKey6 {
        client_address_be: ipv6_words(CLIENT.0),
        peer_address_be: ipv6_words(B1.address),
        client_port_be: port_be(port),
        peer_port_be: port_be(B1.port),
        protocol: 17,
        kind: CT_KIND_BACKEND,
        _pad: [0; 2],
    };
    // The first flow's entry, aged so that a refresh of it would show.
    let mut first_flows = ct_entry(&dp, &backend_key(CLIENT.1)).expect("the first flow's");
    first_flows.last_seen = common::jiffies_ago(Duration::from_secs(5));
    dp.maps
        .v6
        .as_mut()
        .unwrap()
        .conntrack6_udp
        .insert(backend_key(CLIENT.1), first_flows, 0)
        .unwrap();
    // The refresh is due, and the reply entry was evicted.
    let service = service_key(&datagram);
    let mut flow = ct_entry(&dp, &service).unwrap();
    flow.last_seen = common::jiffies_ago(Duration::from_secs(
        datapath_common::conntrack::REFRESH_INTERVAL_SECS + 1,
    ));
    let v6 = dp.maps.v6.as_mut().unwrap();
    v6.conntrack6_udp.insert(service, flow, 0).unwrap();
    v6.conntrack6_udp.remove(&backend_key(moved)).unwrap();

    let (_, out) = egress(&mut dp, datagram.clone().fragment(8, false, 9));
    assert_eq!(
        packet6::parse6(&out).unwrap().dst,
        B1.address,
        "the later fragment is translated"
    );
    let written = ct_entry(&dp, &backend_key(moved)).expect("written again under the wire port");
    assert_eq!(
        (
            written.service_address_be,
            written.service_port_be,
            written.nat_port_be
        ),
        (
            ipv6_words(other.address),
            port_be(other.port),
            port_be(CLIENT.1)
        ),
        "from the other ClusterIP, to the client's own port"
    );
    let still = ct_entry(&dp, &backend_key(CLIENT.1)).unwrap();
    assert_eq!(
        (
            still.service_address_be,
            still.service_port_be,
            still.nat_port_be,
            still.last_seen
        ),
        (
            first_flows.service_address_be,
            first_flows.service_port_be,
            first_flows.nat_port_be,
            first_flows.last_seen
        ),
        "the first flow's entry is its own, not refreshed"
    );
}

/// A pod that is the backend of two of its own IPv6 services, reached
/// from one client port: the second hairpin flow's wire tuple (from the
/// hairpin source) is taken, so it moves to another port, is looped back
/// from it, and the pod's reply to that port comes from the second
/// ClusterIP to the client's own port.
#[test]
fn a_second_hairpin_flow_on_a_taken_tuple_is_looped_back_from_another_port() {
    let hairpin: Ipv6Addr = "100::a9fe:2a01".parse().unwrap();
    let myself = BackendEntry {
        id: 3,
        address: CLIENT.0,
        port: 8080,
    };
    let other = Frontend {
        address: "fd00:10:96::11".parse().unwrap(),
        port: 82,
        protocol: Protocol::Tcp,
    };
    let mut dp = load_private();
    dp.maps
        .set_service6(&frontend(Protocol::Tcp, 81), 3, &[myself])
        .unwrap();
    dp.maps.set_service6(&other, 4, &[myself]).unwrap();
    let looped = |frame: Frame6| Frame6 {
        dst_mac: POD_MAC,
        src_mac: POD_MAC,
        ..frame
    };
    let first = Frame6::tcp(CLIENT, (VIP, 81), SYN).with_macs(POD_MAC, GATEWAY_MAC);
    let (_, out) = run(&mut dp, TC_EGRESS, &first.build());
    assert_eq!(sport_of(&out), CLIENT.1, "the first keeps its port");
    let second =
        Frame6::tcp(CLIENT, (other.address, other.port), SYN).with_macs(POD_MAC, GATEWAY_MAC);
    let (v, out) = run(&mut dp, TC_EGRESS, &second.build());
    assert_eq!(v, verdict::REDIRECT, "looped back into the pod");
    let moved = sport_of(&out);
    assert_ne!(moved, CLIENT.1, "the second moved");
    let arrives = Frame6 {
        src: hairpin,
        sport: moved,
        ..to_backend(&second, &myself)
    };
    assert_frame("moved hairpin SYN", &out, &looped(arrives.clone()));
    assert_eq!(dp.maps.counter(Counter::PortClash).unwrap(), 1);

    let reply = arrives
        .reply(L4::Tcp { flags: SYN | ACK })
        .with_macs(POD_MAC, GATEWAY_MAC);
    let (v, out) = run(&mut dp, TC_EGRESS, &reply.build());
    assert_eq!(v, verdict::REDIRECT, "the reply looped back");
    let expected = Frame6 {
        src: other.address,
        sport: other.port,
        dst: CLIENT.0,
        dport: CLIENT.1,
        ..reply.clone()
    };
    assert_frame("reply to the moved port", &out, &looped(expected));

    // The flow's next packet (a conntrack hit: `up_tc_clash6`, then the
    // hairpin program) keeps the moved port.
    let next = Frame6::tcp(CLIENT, (other.address, other.port), ACK | PSH)
        .with_payload(b"again")
        .with_macs(POD_MAC, GATEWAY_MAC);
    let (v, out) = run(&mut dp, TC_EGRESS, &next.build());
    assert_eq!(v, verdict::REDIRECT, "next packet");
    let expected = Frame6 {
        src: hairpin,
        sport: moved,
        ..to_backend(&next, &myself)
    };
    assert_frame("next packet", &out, &looped(expected));
}

/// UDP as TCP: two IPv6 services on one backend, one client socket port
/// for both (unconnected sockets sending to each): the second flow moves
/// to another port, its later datagrams keep it, and its answers come
/// from the second ClusterIP to the client's own port, checksums right.
#[test]
fn a_second_ipv6_udp_flow_on_a_taken_wire_tuple_gets_another_source_port() {
    let other = Frontend {
        address: "fd00:10:96::11".parse().unwrap(),
        port: 54,
        protocol: Protocol::Udp,
    };
    let mut dp = load_private();
    datapath_with(&mut dp, &[B1]);
    dp.maps.set_service6(&other, 3, &[B1]).unwrap();
    let egress = |dp: &mut Datapath, frame: Frame6| {
        run(
            dp,
            TC_EGRESS,
            &frame.with_macs(POD_MAC, GATEWAY_MAC).build(),
        )
    };
    let (_, out) = egress(&mut dp, Frame6::udp(CLIENT, (VIP, 53)).with_payload(b"a"));
    assert_eq!(sport_of(&out), CLIENT.1);
    let query = Frame6::udp(CLIENT, (other.address, other.port)).with_payload(b"b");
    let (_, out) = egress(&mut dp, query.clone());
    let moved = sport_of(&out);
    assert_ne!(moved, CLIENT.1, "the second flow moved");
    assert_frame(
        "moved datagram",
        &out,
        &Frame6 {
            sport: moved,
            ..to_backend(&query, &B1).with_macs(POD_MAC, GATEWAY_MAC)
        },
    );
    let (_, out) = egress(&mut dp, query.clone().with_payload(b"c"));
    assert_eq!(sport_of(&out), moved, "later datagrams keep the moved port");
    let answer = Frame6::udp((B1.address, B1.port), (CLIENT.0, moved))
        .with_payload(b"answer")
        .with_macs(GATEWAY_MAC, POD_MAC);
    let (v, out) = run(&mut dp, TC_INGRESS, &answer.build());
    assert_eq!(v, verdict::OK);
    assert_frame(
        "answer to the moved port",
        &out,
        &Frame6 {
            src: other.address,
            sport: other.port,
            dport: CLIENT.1,
            ..answer
        },
    );
    assert_eq!(dp.maps.counter(Counter::PortClash).unwrap(), 1);
}

/// `sessionAffinity: ClientIP` over IPv6 on the TC path: a client's new
/// flows keep its backend (keyed by its whole address: a client differing
/// in its last word alone is another client), and re-balance once that
/// backend leaves the frontend's match set.
#[test]
fn new_ipv6_flows_of_a_client_of_a_service_with_affinity_keep_its_backend() {
    let mut dp = load_private();
    datapath_with(&mut dp, &[B1, B2]);
    dp.maps
        .set_affinity(1, Some((60, &[B1.id, B2.id])))
        .unwrap();
    let mut to = |client: Ipv6Addr, port: u16| {
        let syn = Frame6::tcp((client, port), (VIP, 80), SYN).with_macs(POD_MAC, GATEWAY_MAC);
        let (v, out) = run(&mut dp, TC_EGRESS, &syn.build());
        assert_eq!(v, verdict::REDIRECT, "SYN from {client} port {port}");
        packet6::parse6(&out).unwrap().dst
    };
    let first = to(CLIENT.0, 41000);
    for port in 41001..41020 {
        assert_eq!(
            to(CLIENT.0, port),
            first,
            "the client's flow from port {port}"
        );
    }
    let others: std::collections::BTreeSet<Ipv6Addr> = (10..30)
        .map(|n| to(Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, n), 41000))
        .collect();
    assert_eq!(others.len(), 2, "other clients: {others:?}");
    let (left, other) = if first == B1.address {
        (B1, B2)
    } else {
        (B2, B1)
    };
    dp.maps.set_affinity(1, Some((60, &[other.id]))).unwrap();
    let mut to = |port: u16| {
        let syn = Frame6::tcp((CLIENT.0, port), (VIP, 80), SYN).with_macs(POD_MAC, GATEWAY_MAC);
        packet6::parse6(&run(&mut dp, TC_EGRESS, &syn.build()).1)
            .unwrap()
            .dst
    };
    let moved_at = (41100..41140).find(|&port| to(port) == other.address);
    assert!(moved_at.is_some(), "re-balanced off {}", left.address);
    for port in 41200..41210 {
        assert_eq!(to(port), other.address, "kept once moved (port {port})");
    }
}

/// IPv6 frontends count each packet once under their reverse-NAT id, also
/// when its flow's translation continues in another program (a moved
/// client port in `up_tc_clash6`, extension headers in
/// `up_tc_egress6_ext`, both of which pass through the hit path).
#[test]
fn each_ipv6_frontend_counts_its_packets_and_new_flows_once() {
    let other = Frontend {
        address: "fd00:10:96::11".parse().unwrap(),
        port: 81,
        protocol: Protocol::Tcp,
    };
    let mut dp = load_private();
    datapath_with(&mut dp, &[B1]);
    dp.maps.set_service6(&other, 3, &[B1]).unwrap();
    let egress = |dp: &mut Datapath, frame: Frame6| {
        run(
            dp,
            TC_EGRESS,
            &frame.with_macs(POD_MAC, GATEWAY_MAC).build(),
        )
    };
    // A flow of three packets to VIP:80.
    egress(&mut dp, Frame6::tcp(CLIENT, (VIP, 80), SYN));
    egress(&mut dp, Frame6::tcp(CLIENT, (VIP, 80), ACK));
    egress(&mut dp, Frame6::tcp(CLIENT, (VIP, 80), ACK | PSH));
    assert_eq!(service_counts(&dp), [(1, (3, 1))].into());
    // The same client port to the other frontend: its wire tuple is taken,
    // so its packets are translated in `up_tc_clash6`.
    egress(&mut dp, Frame6::tcp(CLIENT, (other.address, 81), SYN));
    egress(&mut dp, Frame6::tcp(CLIENT, (other.address, 81), ACK));
    assert_eq!(dp.maps.counter(Counter::PortClash).unwrap(), 1);
    assert_eq!(service_counts(&dp), [(1, (3, 1)), (3, (2, 1))].into());
    // A flow behind a hop-by-hop header: `up_tc_egress6_ext`.
    let ext = || {
        Frame6::udp((CLIENT.0, 40100), (VIP, 53))
            .with_payload(b"q")
            .with_extension(0, 0)
    };
    let (_, out) = egress(&mut dp, ext());
    assert_eq!(packet6::parse6(&out).unwrap().dst, B1.address);
    egress(&mut dp, ext());
    assert_eq!(
        service_counts(&dp),
        [(1, (3, 1)), (2, (2, 1)), (3, (2, 1))].into()
    );
    // Replies count nothing.
    let reply = Frame6::tcp((B1.address, B1.port), CLIENT, SYN | ACK)
        .with_macs(GATEWAY_MAC, POD_MAC)
        .build();
    run(&mut dp, TC_INGRESS, &reply);
    assert_eq!(service_counts(&dp)[&1], (3, 1));
    // Removed: zeroed.
    dp.maps.remove_service6(&other).unwrap();
    assert!(!service_counts(&dp).contains_key(&3));
}
