//! The uplink's XDP program (north-south) and the pod's TC egress half of
//! its flows, run with BPF_PROG_TEST_RUN on crafted frames: Katran's
//! fixture shape (input, expected frame, verdict, map state), every
//! output frame's checksums verified from scratch.

mod common;

use std::net::Ipv4Addr;

use common::{VIP, load_private, service_counts, tcp_frontend};
use datapath_common::{
    IPPROTO_TCP, IPPROTO_UDP, ipv4_be, maglev,
    maps::{
        CT_KIND_BACKEND, CT_KIND_SERVICE, CtEntry, CtKey, L2_UPLINK_LOCAL, L2_UPLINK_SNAT,
        NorthSouthConfig, UplinkSnat,
    },
    metrics::Counter,
    port_be,
};
use datapath_user::{
    Datapath,
    maps::LbMaps,
    model::{BackendEntry, Frontend, Protocol},
    object::{TC_EGRESS, XDP_UPLINK, verdict, xdp_verdict},
};
use lab::packet::{self, ACK, FIN, Frame, L4, SYN};

/// The node's address on the uplink, where clients from outside reach
/// its nodePorts.
const NODE: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 101);
const NODE_PORT: u16 = 30080;
/// A client outside the cluster.
const OUTSIDE: (Ipv4Addr, u16) = (Ipv4Addr::new(192, 0, 2, 7), 51000);
/// The uplink's MAC (frames from outside come to it) and the router's.
const NODE_MAC: [u8; 6] = [0x02, 0x77, 0, 0, 0, 0x65];
const ROUTER_MAC: [u8; 6] = [0x02, 0x77, 0, 0, 0, 0xfe];
/// Two underlay pods on this node's uplink and one on another node.
const LOCAL_A: BackendEntry = BackendEntry {
    id: 1,
    address: Ipv4Addr::new(10, 77, 0, 3),
    port: 8080,
};
const LOCAL_A_MAC: [u8; 6] = [0x02, 0x77, 0, 0, 0, 0x03];
const LOCAL_B: BackendEntry = BackendEntry {
    id: 2,
    address: Ipv4Addr::new(10, 77, 0, 5),
    port: 8080,
};
const LOCAL_B_MAC: [u8; 6] = [0x02, 0x77, 0, 0, 0, 0x05];
const REMOTE: BackendEntry = BackendEntry {
    id: 3,
    address: Ipv4Addr::new(10, 77, 0, 4),
    port: 8080,
};
const SEED: u64 = 0x5eed;
/// The SNAT ports: a small range, so that a test can exhaust it.
const SNAT_PORTS: (u16, u16) = (61000, 8);
const TABLE_SIZE: u32 = maglev::MIN_TABLE_SIZE;

fn node_port(protocol: Protocol) -> Frontend {
    Frontend {
        address: NODE,
        port: NODE_PORT,
        protocol,
    }
}

/// The Maglev table of `backends` as the agent writes it: built from
/// the backends' keys, entries mapped to their ids.
fn table_ids(backends: &[BackendEntry], protocol: u8) -> Vec<u32> {
    let keys: Vec<[u8; 7]> = backends
        .iter()
        .map(|b| maglev::backend_key4(b.address.octets(), b.port, protocol))
        .collect();
    maglev::build_table(TABLE_SIZE, SEED, &keys)
        .into_iter()
        .map(|i| backends[i as usize].id)
        .collect()
}

/// A datapath serving `frontend` (reverse-NAT id 1) from outside with
/// `backends` in Maglev table 0, the two local pods on the uplink.
fn serving(frontend: Frontend, backends: &[BackendEntry]) -> Datapath {
    let mut dp = load_private();
    dp.maps.set_service(&frontend, 1, backends).unwrap();
    let protocol = frontend.protocol.number();
    let ns = dp.maps.north_south.as_mut().expect("north-south maps");
    ns.set_config(NorthSouthConfig {
        maglev_seed: SEED,
        maglev_table_size: TABLE_SIZE,
        snat_address_be: ipv4_be(NODE.octets()),
        snat_port_first: SNAT_PORTS.0,
        snat_port_count: SNAT_PORTS.1,
        _pad: 0,
    })
    .unwrap();
    ns.write_table(0, TABLE_SIZE, &table_ids(backends, protocol))
        .unwrap();
    ns.set_table_of(1, Some(0)).unwrap();
    ns.set_local_pod(LOCAL_A.address, LOCAL_A_MAC).unwrap();
    ns.set_local_pod(LOCAL_B.address, LOCAL_B_MAC).unwrap();
    dp
}

fn uplink(dp: &mut Datapath, frame: &[u8]) -> (u32, Vec<u8>) {
    dp.test_run_xdp(XDP_UPLINK, frame)
        .expect("BPF_PROG_TEST_RUN on the uplink program")
}

fn egress(dp: &mut Datapath, frame: &Frame) -> (i32, Vec<u8>) {
    let out = dp
        .test_run_tc(TC_EGRESS, &frame.build(), 1)
        .expect("BPF_PROG_TEST_RUN egress");
    (out.verdict, out.frame)
}

fn from_outside(l4: L4) -> Frame {
    let frame = match l4 {
        L4::Tcp { flags } => Frame::tcp(OUTSIDE, (NODE, NODE_PORT), flags),
        _ => Frame::udp(OUTSIDE, (NODE, NODE_PORT)),
    };
    frame.with_macs(ROUTER_MAC, NODE_MAC)
}

/// `frame` as the pod must receive it: DNATed to `backend`, addressed to
/// the pod's MAC, the client's address kept.
fn to_pod(frame: &Frame, backend: &BackendEntry, mac: [u8; 6]) -> Frame {
    Frame {
        dst: backend.address,
        dport: backend.port,
        dst_mac: mac,
        ..frame.clone()
    }
}

/// Asserts that `output` is `expected` with checksums that verify from
/// scratch (and the same checksum state: a UDP datagram without one
/// keeps none).
fn assert_frame(description: &str, output: &[u8], expected: &Frame) {
    let got = packet::parse(output)
        .unwrap_or_else(|| panic!("{description}: output is not IPv4 TCP/UDP"));
    let want = packet::parse(&expected.build()).unwrap();
    assert!(got.ip_checksum_ok, "{description}: IPv4 checksum");
    assert_eq!(
        got.l4_checksum_ok, want.l4_checksum_ok,
        "{description}: L4 checksum"
    );
    assert_eq!(got, want, "{description}: headers");
    assert_eq!(
        output.len(),
        expected.build().len(),
        "{description}: length"
    );
}

fn ct(dp: &Datapath, key: &CtKey) -> Option<CtEntry> {
    dp.maps.conntrack(key.protocol).get(key, 0).ok()
}

fn key(client: (Ipv4Addr, u16), peer: (Ipv4Addr, u16), protocol: u8, kind: u8) -> CtKey {
    CtKey {
        client_address_be: ipv4_be(client.0.octets()),
        peer_address_be: ipv4_be(peer.0.octets()),
        client_port_be: port_be(client.1),
        peer_port_be: port_be(peer.1),
        protocol,
        kind,
        _pad: [0; 2],
    }
}

#[test]
fn a_flow_from_outside_to_a_local_pod_is_dnated_handed_to_its_macvlan_and_answered_as_the_node_port()
 {
    let mut dp = serving(node_port(Protocol::Tcp), &[LOCAL_A]);
    let syn = from_outside(L4::Tcp { flags: SYN });
    let (v, out) = uplink(&mut dp, &syn.build());
    assert_eq!(v, xdp_verdict::PASS, "up the stack, to the macvlan");
    assert_frame(
        "SYN from outside",
        &out,
        &to_pod(&syn, &LOCAL_A, LOCAL_A_MAC),
    );

    let forward = ct(
        &dp,
        &key(OUTSIDE, (NODE, NODE_PORT), IPPROTO_TCP, CT_KIND_SERVICE),
    )
    .expect("service-tuple entry");
    assert_eq!(
        (
            forward.backend_id,
            forward.rev_nat_id(),
            forward.l2_mode,
            forward.dst_mac
        ),
        (LOCAL_A.id, 1, L2_UPLINK_LOCAL, LOCAL_A_MAC)
    );
    let back = ct(
        &dp,
        &key(
            OUTSIDE,
            (LOCAL_A.address, LOCAL_A.port),
            IPPROTO_TCP,
            CT_KIND_BACKEND,
        ),
    )
    .expect("backend-tuple entry");
    assert_eq!(
        (back.service_address_be, back.service_port_be, back.l2_mode),
        (ipv4_be(NODE.octets()), port_be(NODE_PORT), L2_UPLINK_LOCAL)
    );

    // The pod's SYN-ACK leaves by its own interface: its TC egress gives
    // it the node's address and nodePort back.
    let syn_ack = to_pod(&syn, &LOCAL_A, LOCAL_A_MAC)
        .reply(L4::Tcp { flags: SYN | ACK })
        .with_macs(LOCAL_A_MAC, ROUTER_MAC);
    let (v, out) = egress(&mut dp, &syn_ack);
    assert_eq!(v, verdict::NEXT, "on its way out of the pod");
    let expected = Frame {
        src: NODE,
        sport: NODE_PORT,
        ..syn_ack.clone()
    };
    assert_frame("the pod's SYN-ACK", &out, &expected);

    // Later packets keep the backend (conntrack), counted as packets.
    let ack = from_outside(L4::Tcp { flags: ACK });
    let (v, out) = uplink(&mut dp, &ack.build());
    assert_eq!(v, xdp_verdict::PASS);
    assert_frame(
        "the client's ACK",
        &out,
        &to_pod(&ack, &LOCAL_A, LOCAL_A_MAC),
    );
    assert_eq!(dp.maps.counter(Counter::NorthSouthTranslated).unwrap(), 2);
    assert_eq!(
        dp.maps
            .counter(Counter::NorthSouthReverseTranslated)
            .unwrap(),
        1
    );
    assert_eq!(
        service_counts(&dp).get(&1),
        Some(&(2, 1)),
        "packets, new flows"
    );
}

#[test]
fn udp_from_outside_keeps_its_checksum_state() {
    let mut dp = serving(node_port(Protocol::Udp), &[LOCAL_A]);
    for (description, datagram) in [
        (
            "UDP with a checksum",
            from_outside(L4::Udp { checksum: true }),
        ),
        (
            "UDP without a checksum",
            from_outside(L4::Udp { checksum: true })
                .without_udp_checksum()
                .with_payload(b"other flow"),
        ),
    ] {
        let datagram = Frame {
            sport: if datagram.payload == b"other flow" {
                51001
            } else {
                OUTSIDE.1
            },
            ..datagram
        };
        let (v, out) = uplink(&mut dp, &datagram.build());
        assert_eq!(v, xdp_verdict::PASS, "{description}");
        assert_frame(description, &out, &to_pod(&datagram, &LOCAL_A, LOCAL_A_MAC));
        let answer = to_pod(&datagram, &LOCAL_A, LOCAL_A_MAC)
            .reply(datagram.l4.clone())
            .with_macs(LOCAL_A_MAC, ROUTER_MAC);
        let (v, out) = egress(&mut dp, &answer);
        assert_eq!(v, verdict::NEXT, "{description}: the answer");
        let expected = Frame {
            src: NODE,
            sport: NODE_PORT,
            ..answer.clone()
        };
        assert_frame(&format!("{description}: the answer"), &out, &expected);
    }
}

#[test]
fn maglev_in_the_datapath_picks_what_the_table_and_flow_hash_say() {
    let mut dp = serving(node_port(Protocol::Tcp), &[LOCAL_A, LOCAL_B]);
    let table = table_ids(&[LOCAL_A, LOCAL_B], IPPROTO_TCP);
    let mut seen = [0usize; 2];
    for port in 40000..40064u16 {
        let syn =
            Frame::tcp((OUTSIDE.0, port), (NODE, NODE_PORT), SYN).with_macs(ROUTER_MAC, NODE_MAC);
        let hash = maglev::flow_hash4(
            ipv4_be(OUTSIDE.0.octets()),
            ipv4_be(NODE.octets()),
            port_be(port),
            port_be(NODE_PORT),
            IPPROTO_TCP,
            SEED,
        );
        let want = table[maglev::table_index(hash, TABLE_SIZE) as usize];
        let (backend, mac) = if want == LOCAL_A.id {
            (LOCAL_A, LOCAL_A_MAC)
        } else {
            (LOCAL_B, LOCAL_B_MAC)
        };
        seen[(want - 1) as usize] += 1;
        let (v, out) = uplink(&mut dp, &syn.build());
        assert_eq!(v, xdp_verdict::PASS);
        assert_frame(
            &format!("client port {port}"),
            &out,
            &to_pod(&syn, &backend, mac),
        );
    }
    assert!(
        seen.iter().all(|&n| n > 10),
        "both backends take flows: {seen:?}"
    );
}

#[test]
fn fixtures_that_pass_to_the_stack_untouched() {
    let mut dp = serving(node_port(Protocol::Tcp), &[LOCAL_A]);
    // A ClusterIP frontend (id 2) with no Maglev table: not served from
    // outside.
    dp.maps.set_service(&tcp_frontend(), 2, &[LOCAL_A]).unwrap();
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&ROUTER_MAC);
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0; 28]);
    let syn = from_outside(L4::Tcp { flags: SYN });
    let cases: Vec<(&str, Vec<u8>, u64)> = vec![
        ("ARP", arp, 0),
        (
            "not a service: the node's own port",
            Frame::tcp(OUTSIDE, (NODE, 22), SYN).build(),
            0,
        ),
        (
            "a frontend not served from outside (no Maglev table)",
            Frame::tcp(OUTSIDE, (VIP, 80), SYN).build(),
            1,
        ),
        (
            "a fragment (the stack reassembles it)",
            syn.clone().fragment(0, true).build(),
            0,
        ),
        (
            "another protocol",
            Frame {
                l4: L4::Other { protocol: 47 },
                ..syn.clone()
            }
            .build(),
            0,
        ),
    ];
    for (description, frame, passed) in cases {
        let before = dp.maps.counter(Counter::NorthSouthPassed).unwrap();
        let (v, out) = uplink(&mut dp, &frame);
        assert_eq!(
            (v, out.as_slice()),
            (xdp_verdict::PASS, frame.as_slice()),
            "{description}"
        );
        assert_eq!(
            dp.maps.counter(Counter::NorthSouthPassed).unwrap() - before,
            passed,
            "{description}: counted as passed"
        );
    }
    assert_eq!(dp.maps.conntrack_entries(), 0, "nothing tracked");
    // Truncated frames of a real flow: never rewritten, never tracked.
    let full = syn.build();
    for len in 14..full.len() {
        let cut = &full[..len];
        let (v, out) = uplink(&mut dp, cut);
        assert_eq!((v, out.as_slice()), (xdp_verdict::PASS, cut), "{len} bytes");
    }
    assert_eq!(dp.maps.conntrack_entries(), 0, "nothing tracked");
}

const REMOTE_MAC: [u8; 6] = [0x02, 0x77, 0, 0, 0, 0x04];

/// A namespace of this run's own standing for the node: its uplink
/// `up0` (a veth whose peer `up1` stays beside it) holds the node's
/// address, with the remote backend as a resolved neighbour when
/// `neighbour` says so. Route and neighbour lookups of the program run
/// there start from `up0`. Returns it with `up0`'s index and MAC.
fn node_namespace(neighbour: bool) -> (lab::Namespace, u32, [u8; 6]) {
    use rtnetlink::{
        LinkUnspec, LinkVeth,
        packet_route::{link::LinkAttribute, neighbour::NeighbourState},
    };
    let namespace =
        lab::Namespace::create(&format!("{}-uplink", lab::unique_prefix())).expect("namespace");
    namespace
        .netlink("make the uplink", |h| async move {
            h.link()
                .add(LinkVeth::new("up0", "up1").build())
                .execute()
                .await
                .map_err(|e| e.to_string())?;
            let up0 = lab_index(&h, "up0").await?;
            let up1 = lab_index(&h, "up1").await?;
            for index in [up0, up1] {
                h.link()
                    .set(LinkUnspec::new_with_index(index).up().build())
                    .execute()
                    .await
                    .map_err(|e| e.to_string())?;
            }
            h.address()
                .add(up0, NODE.into(), 24)
                .execute()
                .await
                .map_err(|e| e.to_string())?;
            if neighbour {
                h.neighbours()
                    .add(up0, REMOTE.address.into())
                    .link_layer_address(&REMOTE_MAC)
                    .state(NeighbourState::Permanent)
                    .execute()
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok(())
        })
        .expect("the node's uplink");
    // A node forwards (Kubernetes requires it); the kernel's route
    // lookup for a program answers only on interfaces that do.
    namespace
        .sysctl("net.ipv4.ip_forward", "1")
        .expect("forwarding");
    let (index, mac) = namespace
        .netlink("read the uplink", |h| async move {
            use futures::TryStreamExt;
            let link = h
                .link()
                .get()
                .match_name("up0")
                .execute()
                .try_next()
                .await
                .map_err(|e| e.to_string())?
                .ok_or("no up0")?;
            let mac = link
                .attributes
                .iter()
                .find_map(|a| match a {
                    LinkAttribute::Address(mac) => <[u8; 6]>::try_from(mac.as_slice()).ok(),
                    _ => None,
                })
                .ok_or("up0 has no MAC")?;
            Ok((link.header.index, mac))
        })
        .expect("up0");
    (namespace, index, mac)
}

async fn lab_index(h: &rtnetlink::Handle, name: &str) -> Result<u32, String> {
    use futures::TryStreamExt;
    Ok(h.link()
        .get()
        .match_name(name.to_owned())
        .execute()
        .try_next()
        .await
        .map_err(|e| e.to_string())?
        .ok_or(format!("no {name}"))?
        .header
        .index)
}

/// The uplink program run in `namespace` on a frame received by `ifindex`.
fn uplink_in(
    dp: &mut Datapath,
    namespace: &lab::Namespace,
    ifindex: u32,
    frame: &[u8],
) -> (u32, Vec<u8>) {
    namespace
        .run(|| dp.test_run_xdp_on(XDP_UPLINK, frame, Some(ifindex)))
        .expect("setns")
        .expect("BPF_PROG_TEST_RUN on the uplink program")
}

#[test]
fn a_flow_to_a_backend_elsewhere_is_snated_to_the_node_sent_back_out_and_its_replies_turned_back() {
    let (namespace, up0, up0_mac) = node_namespace(true);
    let mut dp = serving(node_port(Protocol::Tcp), &[REMOTE]);
    let syn = from_outside(L4::Tcp { flags: SYN });
    let (v, out) = uplink_in(&mut dp, &namespace, up0, &syn.build());
    assert_eq!(v, xdp_verdict::TX, "back out of the uplink");
    let sent = packet::parse(&out).expect("IPv4 TCP");
    let port = sent.sport;
    assert!(
        (SNAT_PORTS.0..SNAT_PORTS.0 + SNAT_PORTS.1).contains(&port),
        "SNAT port {port}"
    );
    let expected = Frame {
        src: NODE,
        sport: port,
        dst: REMOTE.address,
        dport: REMOTE.port,
        src_mac: up0_mac,
        dst_mac: REMOTE_MAC,
        ..syn.clone()
    };
    assert_frame("SYN to the backend elsewhere", &out, &expected);

    let forward = ct(
        &dp,
        &key(OUTSIDE, (NODE, NODE_PORT), IPPROTO_TCP, CT_KIND_SERVICE),
    )
    .expect("service-tuple entry");
    assert_eq!(
        (
            forward.backend_id,
            forward.l2_mode,
            forward.nat_port_be,
            forward.dst_mac
        ),
        (REMOTE.id, L2_UPLINK_SNAT, port_be(port), REMOTE_MAC)
    );
    let snat = &dp.maps.north_south.as_ref().unwrap().snat;
    let back = snat
        .get(
            &key(
                (NODE, port),
                (REMOTE.address, REMOTE.port),
                IPPROTO_TCP,
                CT_KIND_BACKEND,
            ),
            0,
        )
        .expect("the replies' entry");
    assert_eq!(
        (
            back.client_address_be,
            back.client_port_be,
            back.frontend_address_be,
            back.frontend_port_be,
            back.client_mac,
            back.uplink_mac
        ),
        (
            ipv4_be(OUTSIDE.0.octets()),
            port_be(OUTSIDE.1),
            ipv4_be(NODE.octets()),
            port_be(NODE_PORT),
            ROUTER_MAC,
            up0_mac
        )
    );

    // The backend answers the node; the client gets the nodePort's answer.
    let syn_ack = expected
        .reply(L4::Tcp { flags: SYN | ACK })
        .with_macs(REMOTE_MAC, up0_mac);
    let (v, out) = uplink_in(&mut dp, &namespace, up0, &syn_ack.build());
    assert_eq!(v, xdp_verdict::TX, "the reply, back out");
    let answer = syn
        .reply(L4::Tcp { flags: SYN | ACK })
        .with_macs(up0_mac, ROUTER_MAC);
    assert_frame("the backend's SYN-ACK", &out, &answer);

    // The client's next packets keep the backend and the port.
    let ack = from_outside(L4::Tcp { flags: ACK });
    let (v, out) = uplink_in(&mut dp, &namespace, up0, &ack.build());
    assert_eq!(v, xdp_verdict::TX);
    assert_frame(
        "the client's ACK",
        &out,
        &Frame {
            l4: L4::Tcp { flags: ACK },
            ..expected.clone()
        },
    );
    assert_eq!(dp.maps.counter(Counter::NorthSouthTranslated).unwrap(), 2);
    assert_eq!(
        dp.maps
            .counter(Counter::NorthSouthReverseTranslated)
            .unwrap(),
        1
    );
    assert_eq!(service_counts(&dp).get(&1), Some(&(2, 1)));

    // A reply to a port no flow holds is the node's own business.
    let stray = Frame {
        dport: if port == SNAT_PORTS.0 {
            port + 1
        } else {
            port - 1
        },
        ..syn_ack.clone()
    }
    .build();
    let (v, out) = uplink_in(&mut dp, &namespace, up0, &stray);
    assert_eq!((v, out), (xdp_verdict::PASS, stray));
}

#[test]
fn without_a_resolved_neighbour_a_flow_waits_and_without_a_free_port_it_passes() {
    let (namespace, up0, _) = node_namespace(false);
    let mut dp = serving(node_port(Protocol::Udp), &[REMOTE]);
    // Not resolved yet: dropped (the client retries; passed, the node's
    // stack would answer with a reset or port unreachable).
    let datagram = from_outside(L4::Udp { checksum: true }).build();
    let (v, _) = uplink_in(&mut dp, &namespace, up0, &datagram);
    assert_eq!(v, xdp_verdict::DROP, "no neighbour");
    assert_eq!(dp.maps.counter(Counter::NorthSouthNoNeighbour).unwrap(), 1);
    assert_eq!(dp.maps.conntrack_entries(), 0, "nothing tracked");
    drop(namespace);

    // Eight SNAT ports for the one backend: the ninth client on finds
    // none free and passes, counted as an error.
    let (namespace, up0, _) = node_namespace(true);
    let mut ports = std::collections::BTreeSet::new();
    let mut passed = 0;
    for client in 1..=40u8 {
        let datagram = Frame::udp((Ipv4Addr::new(192, 0, 2, client), 5353), (NODE, NODE_PORT))
            .with_macs(ROUTER_MAC, NODE_MAC)
            .build();
        let (v, out) = uplink_in(&mut dp, &namespace, up0, &datagram);
        if v == xdp_verdict::TX {
            assert!(
                ports.insert(packet::parse(&out).unwrap().sport),
                "a port given twice"
            );
        } else {
            assert_eq!((v, out), (xdp_verdict::PASS, datagram));
            passed += 1;
        }
    }
    assert!(ports.len() <= usize::from(SNAT_PORTS.1), "{ports:?}");
    assert!(
        ports
            .iter()
            .all(|p| (SNAT_PORTS.0..SNAT_PORTS.0 + SNAT_PORTS.1).contains(p))
    );
    assert!(passed >= 40 - usize::from(SNAT_PORTS.1));
    assert_eq!(
        dp.maps.counter(Counter::NorthSouthNoPort).unwrap(),
        passed as u64
    );

    // Flows that ended free their ports: nothing deletes their entries
    // (the LRU evicts only a full table), an expired one is taken over.
    let stale = common::jiffies_ago(std::time::Duration::from_secs(3600));
    {
        let snat = &mut dp.maps.north_south.as_mut().unwrap().snat;
        let keys: Vec<CtKey> = snat.keys().map(Result::unwrap).collect();
        assert_eq!(keys.len(), usize::from(SNAT_PORTS.1), "every port held");
        for key in keys {
            let mut entry = snat.get(&key, 0).unwrap();
            entry.last_seen = stale;
            snat.insert(key, entry, 0).unwrap();
        }
    }
    let late = Frame::udp((Ipv4Addr::new(192, 0, 2, 250), 5353), (NODE, NODE_PORT))
        .with_macs(ROUTER_MAC, NODE_MAC)
        .build();
    let (v, out) = uplink_in(&mut dp, &namespace, up0, &late);
    assert_eq!(
        v,
        xdp_verdict::TX,
        "a port of an expired flow is free again"
    );
    let port = packet::parse(&out).unwrap().sport;
    assert!(ports.contains(&port), "one of the {ports:?}");
    let entry = dp
        .maps
        .north_south
        .as_ref()
        .unwrap()
        .snat
        .get(
            &key(
                (NODE, port),
                (REMOTE.address, REMOTE.port),
                IPPROTO_UDP,
                CT_KIND_BACKEND,
            ),
            0,
        )
        .unwrap();
    assert_eq!(
        entry.client_address_be,
        ipv4_be([192, 0, 2, 250]),
        "the new flow's"
    );
}

#[test]
fn an_east_west_reply_from_a_backend_pod_is_not_taken_for_a_north_south_one() {
    let mut dp = serving(node_port(Protocol::Tcp), &[LOCAL_A]);
    // A pod on this node opens an east-west flow to a ClusterIP whose
    // backend is LOCAL_A (the client's egress program tracks it).
    dp.maps.set_service(&tcp_frontend(), 2, &[LOCAL_A]).unwrap();
    let client = (Ipv4Addr::new(10, 77, 0, 2), 42000);
    let syn = Frame::tcp(client, (VIP, 80), SYN);
    let (v, _) = egress(&mut dp, &syn);
    assert_ne!(v, verdict::SHOT);
    // LOCAL_A answers from its own interface: its egress must leave the
    // reply alone (the client's ingress turns it back into the VIP).
    let answer = Frame {
        dst: LOCAL_A.address,
        dport: LOCAL_A.port,
        ..syn.clone()
    }
    .reply(L4::Tcp { flags: SYN | ACK });
    let (v, out) = egress(&mut dp, &answer);
    assert_eq!((v, out), (verdict::NEXT, answer.build()));
    assert_eq!(
        dp.maps
            .counter(Counter::NorthSouthReverseTranslated)
            .unwrap(),
        0
    );
}

/// A closed TCP flow's SNAT port goes to a new flow once the flow has
/// expired — at once when the client closed first (the backend's socket
/// went from LAST_ACK to CLOSED), only after the backend's TIME_WAIT
/// when the backend closed first: the FINs, sent through the program,
/// tell which.
#[test]
fn a_snat_port_is_reused_soon_after_the_client_closed_and_late_after_the_backend_did() {
    let (namespace, up0, up0_mac) = node_namespace(true);
    let mut dp = serving(node_port(Protocol::Tcp), &[REMOTE]);
    let client = |n: u8| (Ipv4Addr::new(192, 0, 2, n), 40000 + u16::from(n));
    // (client, its SNAT port, the backend closed first?)
    let mut flows = Vec::new();
    for n in 1..=40u8 {
        if flows.len() == usize::from(SNAT_PORTS.1) {
            break;
        }
        let syn = Frame::tcp(client(n), (NODE, NODE_PORT), SYN).with_macs(ROUTER_MAC, NODE_MAC);
        let (v, out) = uplink_in(&mut dp, &namespace, up0, &syn.build());
        if v != xdp_verdict::TX {
            continue;
        }
        let port = packet::parse(&out).unwrap().sport;
        let backend_first = flows.len() % 2 == 0;
        flows.push((n, port, backend_first));
        let from_client = |flags| {
            Frame::tcp(client(n), (NODE, NODE_PORT), flags)
                .with_macs(ROUTER_MAC, NODE_MAC)
                .build()
        };
        let from_backend = |flags| {
            Frame::tcp((REMOTE.address, REMOTE.port), (NODE, port), flags)
                .with_macs(REMOTE_MAC, up0_mac)
                .build()
        };
        let mut close = vec![
            from_backend(SYN | ACK),
            from_client(ACK),
            from_client(FIN | ACK),
            from_backend(FIN | ACK),
        ];
        if backend_first {
            close.swap(2, 3);
        }
        for frame in close {
            assert_eq!(
                uplink_in(&mut dp, &namespace, up0, &frame).0,
                xdp_verdict::TX,
                "flow {n}"
            );
        }
    }
    assert_eq!(flows.len(), usize::from(SNAT_PORTS.1), "every port held");
    // Five seconds later: every flow is still within its closing
    // lifetime (10 s), the backends the clients closed are CLOSED, those
    // that closed first are in TIME_WAIT.
    let later = common::jiffies_ago(std::time::Duration::from_secs(5));
    {
        let snat = &mut dp.maps.north_south.as_mut().unwrap().snat;
        let keys: Vec<CtKey> = snat.keys().map(Result::unwrap).collect();
        for key in keys {
            let mut entry = snat.get(&key, 0).unwrap();
            entry.last_seen = later;
            snat.insert(key, entry, 0).unwrap();
        }
    }
    let reusable: std::collections::BTreeSet<u16> =
        flows.iter().filter(|f| !f.2).map(|f| f.1).collect();
    let mut reused = std::collections::BTreeSet::new();
    for n in 100..=140u8 {
        let syn = Frame::tcp(client(n), (NODE, NODE_PORT), SYN)
            .with_macs(ROUTER_MAC, NODE_MAC)
            .build();
        let (v, out) = uplink_in(&mut dp, &namespace, up0, &syn);
        if v == xdp_verdict::TX {
            let port = packet::parse(&out).unwrap().sport;
            assert!(
                reusable.contains(&port),
                "port {port} went to a new flow while its backend, which closed first, may \
                 be in TIME_WAIT (reusable: {reusable:?})"
            );
            assert!(reused.insert(port), "port {port} given twice");
        }
    }
    assert!(
        !reused.is_empty(),
        "no port of a flow the client closed was reused"
    );
}

/// Two new flows from outside, released at the same moment on the two
/// CPUs while every SNAT port is free only by takeover (each held by a
/// flow its client closed 5 s ago), many times over: they must never
/// leave with the same port. With check-then-write, two flows that
/// picked one port at once both took it, and the backend's replies for
/// one went to the other's client.
#[test]
fn two_cpus_taking_over_ports_at_once_never_share_one() {
    use datapath_common::conntrack::{STATE_FIN_RX, STATE_FIN_TX, STATE_SEEN_NON_SYN};
    use datapath_user::loader::test_run_xdp_held;

    let (namespace, up0, _) = node_namespace(true);
    let mut dp = serving(node_port(Protocol::Tcp), &[REMOTE]);
    let program = dp.hold_program(XDP_UPLINK).unwrap();
    let closed = UplinkSnat {
        last_seen: common::jiffies_ago(std::time::Duration::from_secs(5)),
        client_address_be: ipv4_be([192, 0, 2, 200]),
        frontend_address_be: ipv4_be(NODE.octets()),
        client_port_be: port_be(9),
        frontend_port_be: port_be(NODE_PORT),
        state: STATE_SEEN_NON_SYN | STATE_FIN_TX | STATE_FIN_RX,
        ..UplinkSnat::default()
    };
    let held: Vec<CtKey> = (0..SNAT_PORTS.1)
        .map(|i| {
            key(
                (NODE, SNAT_PORTS.0 + i),
                (REMOTE.address, REMOTE.port),
                IPPROTO_TCP,
                CT_KIND_BACKEND,
            )
        })
        .collect();
    let client = |host: u8, trial: u32| (Ipv4Addr::new(192, 0, 2, host), 20_000 + trial as u16);
    let syn = |host: u8, trial: u32| {
        Frame::tcp(client(host, trial), (NODE, NODE_PORT), SYN)
            .with_macs(ROUTER_MAC, NODE_MAC)
            .build()
    };
    let snat_port_of = |dp: &Datapath, host: u8, trial: u32| {
        let service = key(
            client(host, trial),
            (NODE, NODE_PORT),
            IPPROTO_TCP,
            CT_KIND_SERVICE,
        );
        ct(dp, &service).map(|flow| u16::from_be(flow.nat_port_be))
    };

    const TRIALS: u32 = 20_000;
    let mut shared = Vec::new();
    let mut other_failures = Vec::new();
    let raced = common::race(
        Some(&namespace),
        TRIALS,
        |trial, round| {
            let snat = &mut dp.maps.north_south.as_mut().unwrap().snat;
            for port in &held {
                snat.insert(port, closed, 0).unwrap();
            }
            round.go();
            let verdict = test_run_xdp_held(&program, &syn(1, trial), up0);
            round.wait_for_the_other();
            assert_eq!(verdict.unwrap(), xdp_verdict::TX, "trial {trial}");
            let (Some(first), Some(second)) =
                (snat_port_of(&dp, 1, trial), snat_port_of(&dp, 2, trial))
            else {
                panic!("trial {trial}: a new flow without its conntrack entry");
            };
            if first == second {
                shared.push((trial, first));
            }
        },
        |trial| match test_run_xdp_held(&program, &syn(2, trial), up0) {
            Ok(verdict) if verdict == xdp_verdict::TX => {}
            other => other_failures.push((trial, other.map_err(|e| e.to_string()))),
        },
    );
    if !raced {
        eprintln!("SKIP: one CPU here, the two programs cannot run at once");
        return;
    }
    assert_eq!(other_failures, [], "the other CPU's flows (trial, verdict)");
    assert!(
        shared.is_empty(),
        "{} of {TRIALS} trials gave one SNAT port to both new flows (trial, port): {:?}",
        shared.len(),
        &shared[..shared.len().min(5)]
    );
}

/// The quoted packet's L4 header and payload, checked from scratch when
/// the quote holds the whole segment or datagram.
fn assert_quoted_l4_checksum(description: &str, frame: &[u8], protocol: u8) {
    let quoted = &frame[14 + 20 + 8..];
    let (src, dst) = (&quoted[12..16], &quoted[16..20]);
    assert!(
        datapath_common::csum::l4_verifies(
            src.try_into().unwrap(),
            dst.try_into().unwrap(),
            protocol,
            &quoted[20..]
        ),
        "{description}: quoted L4 checksum"
    );
}

/// A router's "fragmentation needed" about a reply of a flow from outside
/// (quoting the reply as it left: from the nodePort to the client) goes
/// to the socket that sent the reply: the pod on this node (its address
/// and port in the quote, its MAC, up the stack to its macvlan) or, for
/// a flow SNATed to a backend elsewhere, back out to that backend,
/// quoting what it sent (to this node's SNAT port). Without it, path-MTU
/// discovery through a nodePort black-holes large segments. Every
/// checksum verifies from scratch; errors about no flow pass untouched.
#[test]
fn icmp_errors_about_flows_from_outside_go_to_their_backends() {
    let router = Ipv4Addr::new(198, 51, 100, 1);
    let error_about = |reply: &[u8]| {
        packet::icmp_error(router, NODE, 3, 4, 1280, &reply[14..])
            .with_macs(ROUTER_MAC, NODE_MAC)
            .build()
    };

    // A pod here, TCP: an RFC 792 quote (the IP header and 8 bytes) and
    // a whole segment (Linux quotes up to 576 bytes).
    let mut dp = serving(node_port(Protocol::Tcp), &[LOCAL_A]);
    let (v, _) = uplink(&mut dp, &from_outside(L4::Tcp { flags: SYN }).build());
    assert_eq!(v, xdp_verdict::PASS, "the flow from outside, to the pod");
    let reply = Frame::tcp((NODE, NODE_PORT), OUTSIDE, ACK | lab::packet::PSH)
        .with_payload(&[7; 400])
        .build();
    for (description, quoted) in [
        ("RFC 792 quote", &reply[..14 + 28]),
        ("whole segment", &reply[..]),
    ] {
        let (v, out) = uplink(&mut dp, &error_about(quoted));
        assert_eq!(v, xdp_verdict::PASS, "{description}: up the stack");
        assert_eq!(out[..6], LOCAL_A_MAC, "{description}: to the pod's MAC");
        let (src, dst, quoted_src, quoted_dst) = common::icmp_error_fields(description, &out);
        assert_eq!(
            (src, dst),
            (router, LOCAL_A.address),
            "{description}: from the router, to the pod"
        );
        assert_eq!(quoted_src, (LOCAL_A.address, LOCAL_A.port), "{description}");
        assert_eq!(quoted_dst, OUTSIDE, "{description}: the client kept");
        if quoted.len() == reply.len() {
            assert_quoted_l4_checksum(description, &out, IPPROTO_TCP);
        }
    }
    // A frame with an Ethernet trailer after its IP packet (padding, an
    // FCS kept), right where the quoted TCP checksum would be (the quote
    // ends 16 bytes into the TCP header): the trailer is neither
    // rewritten nor summed.
    let mut trailed = error_about(&reply[..14 + 20 + 16]);
    let ip_end = trailed.len();
    trailed.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
    let (v, out) = uplink(&mut dp, &trailed);
    assert_eq!(v, xdp_verdict::PASS, "with a trailer: up the stack");
    assert_eq!(
        out[ip_end..],
        [0xde, 0xad, 0xbe, 0xef],
        "the trailer untouched"
    );
    let (_, dst, quoted_src, _) = common::icmp_error_fields("with a trailer", &out[..ip_end]);
    assert_eq!(
        (dst, quoted_src),
        (LOCAL_A.address, (LOCAL_A.address, LOCAL_A.port)),
        "with a trailer"
    );
    // About a flow nobody tracks (another client), and not an error.
    let stranger = Frame::tcp((NODE, NODE_PORT), (Ipv4Addr::new(192, 0, 2, 99), 999), ACK).build();
    let untracked = error_about(&stranger);
    assert_eq!(
        uplink(&mut dp, &untracked),
        (xdp_verdict::PASS, untracked.clone()),
        "an error about no flow"
    );
    // (An echo request whose data happens to look like the quote.)
    let echo = packet::icmp_error(OUTSIDE.0, NODE, 8, 0, 0, &reply[14..14 + 28])
        .with_macs(ROUTER_MAC, NODE_MAC)
        .build();
    assert_eq!(
        uplink(&mut dp, &echo),
        (xdp_verdict::PASS, echo.clone()),
        "an echo request"
    );

    // The flow expired (its entry still in the LRU): untouched.
    {
        let key = key(OUTSIDE, (NODE, NODE_PORT), IPPROTO_TCP, CT_KIND_SERVICE);
        let mut flow = ct(&dp, &key).expect("the flow's entry");
        flow.last_seen = common::jiffies_ago(std::time::Duration::from_secs(7 * 3600));
        dp.maps.conntrack_tcp.insert(key, flow, 0).unwrap();
        let late = error_about(&reply[..14 + 28]);
        assert_eq!(
            uplink(&mut dp, &late),
            (xdp_verdict::PASS, late.clone()),
            "an error about an expired flow"
        );
    }

    // A backend elsewhere, UDP (with and without a checksum): the error
    // goes back out to it, from this node.
    let (namespace, up0, up0_mac) = node_namespace(true);
    let mut dp = serving(node_port(Protocol::Udp), &[REMOTE]);
    let (v, out) = uplink_in(
        &mut dp,
        &namespace,
        up0,
        &from_outside(L4::Udp { checksum: true }).build(),
    );
    assert_eq!(v, xdp_verdict::TX, "the flow from outside, SNATed");
    let snat_port = packet::parse(&out).unwrap().sport;
    for (description, reply) in [
        (
            "SNATed",
            Frame::udp((NODE, NODE_PORT), OUTSIDE).with_payload(&[5; 300]),
        ),
        (
            "SNATed, no UDP checksum",
            Frame::udp((NODE, NODE_PORT), OUTSIDE)
                .with_payload(&[5; 300])
                .without_udp_checksum(),
        ),
    ] {
        let (v, out) = uplink_in(&mut dp, &namespace, up0, &error_about(&reply.build()));
        assert_eq!(v, xdp_verdict::TX, "{description}: back out of the uplink");
        assert_eq!(
            (&out[..6], &out[6..12]),
            (&REMOTE_MAC[..], &up0_mac[..]),
            "{description}: to the backend's next hop"
        );
        let (src, dst, quoted_src, quoted_dst) = common::icmp_error_fields(description, &out);
        assert_eq!(
            (src, dst),
            (NODE, REMOTE.address),
            "{description}: from this node, which the backend knows"
        );
        assert_eq!(
            (quoted_src, quoted_dst),
            ((REMOTE.address, REMOTE.port), (NODE, snat_port)),
            "{description}: what the backend sent: to this node's SNAT port"
        );
        let quoted_udp_checksum = &out[14 + 20 + 8 + 20 + 6..][..2];
        if reply.l4 == (L4::Udp { checksum: false }) {
            assert_eq!(quoted_udp_checksum, [0, 0], "{description}: stays without");
        } else {
            assert_quoted_l4_checksum(description, &out, IPPROTO_UDP);
        }
    }
    // The other way: a router towards the backend cannot forward what
    // this node sent it (from its SNAT port); the error goes to the
    // client, from the frontend, quoting what the client sent.
    let sent = Frame::udp((NODE, snat_port), (REMOTE.address, REMOTE.port))
        .with_payload(&[6; 300])
        .build();
    let inside_router = Ipv4Addr::new(10, 77, 0, 254);
    let error = packet::icmp_error(inside_router, NODE, 3, 4, 1280, &sent[14..])
        .with_macs(REMOTE_MAC, up0_mac)
        .build();
    let (v, out) = uplink_in(&mut dp, &namespace, up0, &error);
    assert_eq!(v, xdp_verdict::TX, "towards the client: back out");
    assert_eq!(
        (&out[..6], &out[6..12]),
        (&ROUTER_MAC[..], &up0_mac[..]),
        "to the hop the flow came in from, from the uplink"
    );
    let description = "about what this node sent the backend";
    let (src, dst, quoted_src, quoted_dst) = common::icmp_error_fields(description, &out);
    assert_eq!(
        (src, dst),
        (NODE, OUTSIDE.0),
        "{description}: from the frontend, to the client"
    );
    assert_eq!(
        (quoted_src, quoted_dst),
        (OUTSIDE, (NODE, NODE_PORT)),
        "{description}: what the client sent"
    );
    assert_quoted_l4_checksum(description, &out, IPPROTO_UDP);
    // The client's flow went out by another port since (reopened): an
    // error about the old port is not about it any more, untouched.
    let service = key(OUTSIDE, (NODE, NODE_PORT), IPPROTO_UDP, CT_KIND_SERVICE);
    let flow = ct(&dp, &service).expect("the client's flow");
    dp.maps
        .conntrack_udp
        .insert(
            service,
            CtEntry {
                nat_port_be: port_be(snat_port ^ 1),
                ..flow
            },
            0,
        )
        .unwrap();
    assert_eq!(
        uplink_in(&mut dp, &namespace, up0, &error),
        (xdp_verdict::PASS, error.clone()),
        "an error about a port the client's flow left"
    );
    dp.maps.conntrack_udp.insert(service, flow, 0).unwrap();
    // The flow expired (both its entries still in the LRUs): errors
    // either way pass untouched.
    let expired = common::jiffies_ago(std::time::Duration::from_secs(120));
    let snat_key = key(
        (NODE, snat_port),
        (REMOTE.address, REMOTE.port),
        IPPROTO_UDP,
        CT_KIND_BACKEND,
    );
    let owner = {
        let snat = &mut dp.maps.north_south.as_mut().unwrap().snat;
        let owner = snat.get(&snat_key, 0).expect("the port's entry");
        snat.insert(
            snat_key,
            UplinkSnat {
                last_seen: expired,
                ..owner
            },
            0,
        )
        .unwrap();
        owner
    };
    dp.maps
        .conntrack_udp
        .insert(
            service,
            CtEntry {
                last_seen: expired,
                ..flow
            },
            0,
        )
        .unwrap();
    let about_the_reply = error_about(&Frame::udp((NODE, NODE_PORT), OUTSIDE).build());
    for (description, frame) in [
        ("about the reply of an expired flow", &about_the_reply),
        ("about what this node sent for an expired flow", &error),
    ] {
        assert_eq!(
            uplink_in(&mut dp, &namespace, up0, frame),
            (xdp_verdict::PASS, frame.clone()),
            "{description}"
        );
    }
    dp.maps.conntrack_udp.insert(service, flow, 0).unwrap();
    dp.maps
        .north_south
        .as_mut()
        .unwrap()
        .snat
        .insert(snat_key, owner, 0)
        .unwrap();

    // The port went to another client since: the error is not this
    // flow's any more, untouched.
    let translated = dp.maps.counter(Counter::IcmpErrorTranslated).unwrap();
    {
        let snat = &mut dp.maps.north_south.as_mut().unwrap().snat;
        let port = key(
            (NODE, snat_port),
            (REMOTE.address, REMOTE.port),
            IPPROTO_UDP,
            CT_KIND_BACKEND,
        );
        let mut owner = snat.get(&port, 0).expect("the port's entry");
        owner.client_port_be = port_be(OUTSIDE.1 + 1);
        snat.insert(port, owner, 0).unwrap();
    }
    let reply = Frame::udp((NODE, NODE_PORT), OUTSIDE).build();
    let stale = error_about(&reply);
    assert_eq!(
        uplink_in(&mut dp, &namespace, up0, &stale),
        (xdp_verdict::PASS, stale.clone()),
        "an error about a flow whose port another client holds"
    );
    assert_eq!(
        dp.maps.counter(Counter::IcmpErrorTranslated).unwrap(),
        translated,
        "nothing translated"
    );
}
