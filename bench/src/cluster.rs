//! What the benches with a kube-proxy baseline share (cluster-ip,
//! latency, scale): the service CIDR, the Service and EndpointSlice
//! objects every datapath is programmed from, and kube-proxy's rules
//! installed in (and removed from) a node namespace.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use k8s_openapi::{
    api::{
        core::v1::{Service, ServicePort as K8sServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use lab::Namespace;

use crate::{
    family::IpFamily,
    kubeproxy::{self, Options, ServicePort},
    leftovers,
};

/// The service CIDR the client routes through its node in kube-proxy mode.
pub const SERVICE_CIDR: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 96, 0, 0), 12);
/// kube-proxy's `--cluster-cidr` (the overlay's pod CIDR): underlay pod
/// addresses lie outside it, so their service traffic is masqueraded, as
/// on a Spiderpool node.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// The IPv6 service CIDR (kind's default for IPv6 clusters).
pub const SERVICE_CIDR6: (Ipv6Addr, u8) = (Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0), 112);
/// kube-proxy's IPv6 `--cluster-cidr` (kind's default pod subnet): the
/// underlay pods' fd77::/64 lies outside it, as their IPv4 addresses lie
/// outside [`CLUSTER_CIDR`].
pub const CLUSTER_CIDR6: &str = "fd00:10:244::/56";

/// The service CIDR of `family` (the client routes it through its node
/// in kube-proxy mode; kube-proxy's nftables rules drop unallocated
/// addresses in it).
pub fn service_cidr(family: IpFamily) -> (IpAddr, u8) {
    match family {
        IpFamily::V4 => (SERVICE_CIDR.0.into(), SERVICE_CIDR.1),
        IpFamily::V6 => (SERVICE_CIDR6.0.into(), SERVICE_CIDR6.1),
    }
}

/// A Service `name` at `vip` with `ports` (service port, target port;
/// each named `p<port>`) → `endpoints`, with its EndpointSlice, as the
/// API server would hold them: single-stack of `vip`'s family.
pub fn service_objects<A>(
    name: &str,
    vip: A,
    ports: &[(u16, u16)],
    endpoints: &[A],
) -> (Service, EndpointSlice)
where
    A: Copy + Into<IpAddr> + std::fmt::Display,
{
    // The family's name in `ipFamilies` and the slice's `addressType`.
    let family = if vip.into().is_ipv6() { "IPv6" } else { "IPv4" };
    let service = Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("bench".into()),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some(vip.to_string()),
            cluster_ips: Some(vec![vip.to_string()]),
            ip_families: Some(vec![family.into()]),
            ports: Some(
                ports
                    .iter()
                    .map(|&(port, target)| K8sServicePort {
                        name: Some(format!("p{port}")),
                        port: i32::from(port),
                        protocol: Some("TCP".into()),
                        target_port: Some(IntOrString::Int(i32::from(target))),
                        ..K8sServicePort::default()
                    })
                    .collect(),
            ),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };
    let slice = EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("{name}-1")),
            namespace: Some("bench".into()),
            labels: Some(
                [(
                    datapath_user::k8s::translate::SERVICE_NAME_LABEL.to_owned(),
                    name.to_owned(),
                )]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        address_type: family.into(),
        ports: Some(
            ports
                .iter()
                .map(|&(port, target)| EndpointPort {
                    name: Some(format!("p{port}")),
                    port: Some(i32::from(target)),
                    protocol: Some("TCP".into()),
                    ..EndpointPort::default()
                })
                .collect(),
        ),
        endpoints: Some(
            endpoints
                .iter()
                .map(|a| Endpoint {
                    addresses: vec![a.to_string()],
                    conditions: Some(EndpointConditions {
                        ready: Some(true),
                        ..EndpointConditions::default()
                    }),
                    ..Endpoint::default()
                })
                .collect(),
        ),
    };
    (service, slice)
}

/// Which kube-proxy backend to install.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KubeProxy {
    Iptables,
    Nftables,
}

/// Runs `program args` with `input` on stdin inside `namespace`.
pub(crate) fn run_in(
    namespace: &Namespace,
    program: &str,
    args: &[&str],
    input: &str,
) -> Result<()> {
    run_in_limited(namespace, program, args, input, None).map(drop)
}

/// A program the bench ran took longer than its time limit and was killed.
#[derive(Debug, thiserror::Error)]
#[error("{program} did not finish within {limit:?} in {namespace} (killed)")]
pub struct TimedOut {
    pub program: String,
    pub namespace: String,
    pub limit: Duration,
}

/// [`run_in`], killing the program after `limit`; returns how long it ran.
/// A timeout is a [`TimedOut`] error (find it with `downcast_ref`).
pub(crate) fn run_in_limited(
    namespace: &Namespace,
    program: &str,
    args: &[&str],
    input: &str,
    limit: Option<Duration>,
) -> Result<Duration> {
    let started = Instant::now();
    let mut child = namespace
        .run(|| {
            Command::new(program)
                .args(args)
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
        })?
        .with_context(|| format!("running {program} in {}", namespace.name()))?;
    let mut stderr = child.stderr.take().expect("piped stderr");
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    // Fed from a thread: a payload of many megabytes would otherwise
    // block this one until the program reads it all, past the limit.
    let mut stdin = child.stdin.take().expect("piped stdin");
    let payload = input.to_owned();
    let feeder = std::thread::spawn(move || stdin.write_all(payload.as_bytes()));
    // Waited for on a thread, so the time is taken when the program
    // exits (not at the next poll) and the limit is a channel timeout.
    let pid = child.id();
    lab::own_child(pid);
    let (done, exited) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let status = child.wait();
        let _ = done.send((status, Instant::now()));
    });
    let waited = match limit {
        Some(limit) => exited.recv_timeout(limit.saturating_sub(started.elapsed())),
        None => exited
            .recv()
            .map_err(|_| std::sync::mpsc::RecvTimeoutError::Disconnected),
    };
    let (status, finished) = match waited {
        Ok((status, finished)) => (status?, finished),
        Err(_) => {
            // SAFETY: kills our own child, not yet reaped (its waiter
            // thread is still blocked in wait()).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            let _ = exited.recv();
            let _ = feeder.join();
            lab::disown_child(pid);
            return Err(TimedOut {
                program: program.to_owned(),
                namespace: namespace.name().to_owned(),
                limit: limit.unwrap_or_default(),
            }
            .into());
        }
    };
    lab::disown_child(pid);
    let elapsed = finished.duration_since(started);
    let fed = feeder.join().expect("stdin feeder");
    let errors = errors.join().unwrap_or_default();
    if !status.success() {
        bail!(
            "{program} {} in {}: {}",
            args.join(" "),
            namespace.name(),
            errors.trim()
        );
    }
    fed.with_context(|| format!("writing {program}'s input"))?;
    Ok(elapsed)
}

/// The kube-proxy options the bench uses, for `family`'s proxier.
pub fn kube_proxy_options(family: IpFamily) -> Options {
    let cluster_cidr = match family {
        IpFamily::V4 => CLUSTER_CIDR,
        IpFamily::V6 => CLUSTER_CIDR6,
    };
    let (service_net, length) = service_cidr(family);
    Options {
        cluster_cidr: Some(cluster_cidr.to_owned()),
        service_cidr: Some(format!("{service_net}/{length}")),
        family,
        ..Options::default()
    }
}

/// Installs what kube-proxy's `family` proxier would for `ports` in
/// `node`: its conntrack sysctls (those that are per-namespace), then the
/// iptables (ip6tables) payload and jump rules, or the nftables ruleset.
///
/// Returns how long the payload (or ruleset) took to load; a load that
/// outlasts `limit` is killed and fails with [`TimedOut`].
pub fn install_kube_proxy(
    node: &Namespace,
    ports: &[ServicePort],
    flavour: KubeProxy,
    family: IpFamily,
    limit: Option<Duration>,
) -> Result<Duration> {
    for (key, value) in [
        (
            "net.netfilter.nf_conntrack_tcp_timeout_established",
            "86400",
        ),
        ("net.netfilter.nf_conntrack_tcp_timeout_close_wait", "3600"),
    ] {
        // The conntrack module loads with the first rule; set afterwards
        // too (below) when the key does not exist yet.
        let _ = node.sysctl(key, value);
    }
    let options = kube_proxy_options(family);
    let took = match flavour {
        KubeProxy::Iptables => {
            leftovers::require_iptables_nft(family)?;
            let restore = family.iptables_restore();
            let payload = kubeproxy::iptables_restore(ports, &options);
            let took = run_in_limited(
                node,
                restore,
                &["-w", "5", "--noflush", "--counters"],
                &payload,
                limit,
            )?;
            for (table, chain) in kubeproxy::iptables_ensured_chains(family) {
                let script = format!("*{table}\n:{chain} - [0:0]\nCOMMIT\n");
                run_in(node, restore, &["-w", "5", "--noflush"], &script)?;
            }
            // Prepended in list order, as kube-proxy's EnsureRule does.
            for (table, chain, rule) in kubeproxy::iptables_jumps(family) {
                let script = format!("*{table}\n-I {chain} 1 {rule}\nCOMMIT\n");
                run_in(node, restore, &["-w", "5", "--noflush"], &script)?;
            }
            took
        }
        KubeProxy::Nftables => {
            let script = kubeproxy::nft_ruleset(ports, &options);
            run_in_limited(node, "nft", &["-f", "-"], &script, limit)?
        }
    };
    for (key, value) in [
        (
            "net.netfilter.nf_conntrack_tcp_timeout_established",
            "86400",
        ),
        ("net.netfilter.nf_conntrack_tcp_timeout_close_wait", "3600"),
    ] {
        node.sysctl(key, value)
            .with_context(|| format!("kube-proxy's conntrack setting {key}"))?;
    }
    Ok(took)
}

/// Removes kube-proxy's rules of `flavour` and `family` from `node`
/// whole: its tables with their base chains (flushing and deleting
/// chains, as `iptables -F -X` does, would leave the base chains hooked
/// in and conntrack tracking every packet of the next mode), then its
/// conntrack entries; checks that no table of it is left.
pub fn remove_kube_proxy(node: &Namespace, flavour: KubeProxy, family: IpFamily) -> Result<()> {
    let nft_table = format!("{} kube-proxy", family.nft());
    let own_tables: Vec<&str> = match flavour {
        KubeProxy::Iptables => family.iptables_tables().to_vec(),
        KubeProxy::Nftables => vec![nft_table.as_str()],
    };
    for table in &own_tables {
        leftovers::delete_table(node, table)
            .with_context(|| format!("removing kube-proxy's {table} table"))?;
    }
    leftovers::flush_conntrack(node)?;
    // iptables-legacy's tables are not in nftables' listing: none may be
    // there either (a legacy ip6tables would have left its hooks in).
    leftovers::ensure_no_legacy_tables(node, "after removing kube-proxy's rules")?;
    let left: Vec<String> = leftovers::tables(node)?
        .into_iter()
        .filter(|t| own_tables.contains(&t.as_str()))
        .collect();
    anyhow::ensure!(
        left.is_empty(),
        "kube-proxy's tables {left:?} are still in {} after removal",
        node.name()
    );
    Ok(())
}
