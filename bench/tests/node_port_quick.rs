//! `bench node-port --quick` (the `node-port` preset of `cluster-ip`):
//! every north-south row and workload end to end — kube-proxy's NodePort
//! rules in both flavours and the agent's XDP program on node1's uplink
//! (native, and generic: the skb path),
//! to a pod on node1 and to one on node2 — and the packet rate with its
//! `XDP_DROP` ceiling, asserting nothing about speed.

mod common;

#[test]
fn every_row_runs() {
    bench::require_root("bench node-port").unwrap();
    let (stdout, results) = common::quick_run(&["node-port"]);
    let rows = [
        "macvlan, Pod IP, no programs (the limit)",
        "the limit again (A/A control)",
        "nodePort, pod here: kube-proxy (iptables)",
        "nodePort, pod here: kube-proxy (nftables)",
        "nodePort, pod here: underpass XDP",
        "nodePort, pod elsewhere: kube-proxy (iptables)",
        "nodePort, pod elsewhere: kube-proxy (nftables)",
        "nodePort, pod elsewhere: underpass XDP",
        "nodePort, pod here: underpass, skb path (generic XDP)",
        "nodePort, pod elsewhere: underpass, skb path (generic XDP)",
    ];
    for row in rows {
        assert_eq!(
            stdout.matches(&format!("\n| {row} |")).count(),
            10,
            "{row} in every workload's table (the packet rate's too):\n{stdout}"
        );
    }
    let ceiling = "XDP_DROP on node1's uplink (the ceiling)";
    assert_eq!(
        stdout.matches(&format!("\n| {ceiling} |")).count(),
        1,
        "the ceiling in the packet rate's table only:\n{stdout}"
    );
    let measured = results["rows"].as_array().unwrap();
    assert_eq!(
        measured.len(),
        10 * rows.len() + 1,
        "10 workloads × 10 rows, and the ceiling"
    );
    assert!(
        measured
            .iter()
            .flat_map(|r| r["runs"].as_array().unwrap())
            .all(|m| m["per_second"].as_f64().is_some_and(|v| v > 0.0)),
        "every row measured something:\n{stdout}"
    );
    // No connection broken (SNAT ports running out reset TCP_CRR's
    // connections once); of the packet rate's datagrams, sent as fast as
    // one CPU can, a queue overflowing under the overload may drop a
    // few (a veth ring under XDP_TX), not more: a datapath that lost
    // packets would lose far more than 1 %.
    for row in measured {
        let run = &row["runs"][0];
        let errors = run["errors"].as_u64().unwrap();
        if row["workload"] == "packet-rate" {
            let arrived = run["transactions"].as_u64().unwrap();
            assert!(errors * 100 <= arrived, "over 1 % lost: {row}");
        } else {
            assert_eq!(errors, 0, "{row}");
        }
    }
    // Complete checksums into node1's uplink (node2's end of the wire
    // computes them); node1's end keeps a NIC's offloads.
    let devices = results["offloads"].as_array().unwrap();
    let wire = |namespace: &str| {
        devices
            .iter()
            .find(|d| {
                d["device"] == "wire" && d["namespace"].as_str().unwrap().ends_with(namespace)
            })
            .unwrap_or_else(|| panic!("no wire in {namespace}: {devices:?}"))
    };
    assert_eq!(wire("node2")["tx_checksumming"], false, "{devices:?}");
    assert_eq!(
        wire("node1")["tcp_segmentation_offload"],
        true,
        "{devices:?}"
    );
}
