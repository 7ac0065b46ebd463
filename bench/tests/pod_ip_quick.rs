//! `bench pod-ip --quick` (the `pod-ip` preset of `cluster-ip`): every
//! row of the seed's Pod IP table and workload end to end (asserting
//! nothing about speed).

mod common;

#[test]
fn every_row_runs() {
    bench::require_root("bench pod-ip").unwrap();
    let (stdout, results) = common::quick_run(&["pod-ip"]);
    // (row, its client runs our programs: a second line in the table of
    // their live run time)
    for (row, programs) in [
        ("macvlan, Pod IP, no programs (the limit)", false),
        ("the limit again (A/A control)", false),
        ("macvlan, Pod IP, our programs attached", true),
        ("macvlan across subnets, Pod IP", true),
        ("veth routed by the nodes, Pod IP", false),
        ("node to node", false),
    ] {
        assert_eq!(
            stdout.matches(&format!("\n| {row} |")).count(),
            if programs { 18 } else { 9 },
            "{row} in every table:\n{stdout}"
        );
    }
    let rows = results["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 54, "9 workloads × 6 rows");
    assert!(
        rows.iter()
            .all(|r| !["kube-proxy", "kube-proxy-nft", "ebpf", "socket-lb"]
                .contains(&r["mode"].as_str().unwrap())),
        "no service row in the Pod IP table:\n{stdout}"
    );
}
