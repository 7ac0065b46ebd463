//! `bench scale`: control-plane cost against the number of services, for
//! kube-proxy's iptables and nftables rules and for underpass: the time to
//! program N services × M endpoints from nothing, and to apply one changed
//! EndpointSlice (kube-proxy's partial sync / nft transaction; the
//! agent's incremental update). Each datapath is programmed inside a
//! namespace (or private maps) this bench creates.
//!
//! Not yet here: TCP_CRR rate and p99 to one service at each N, and plots.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use clap::Parser;
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use datapath_user::{
    Datapath, LoadOptions,
    agent::AgentCore,
    k8s::{NodeContext, Object, store::Change, store::Kind as StoreKind},
    loader::MapSizes,
    metrics::Metrics,
    reconcile::Reconciler,
    topology::{Namespace, unique_prefix},
};
use serde::Serialize;

use crate::{
    agent::{endpoint_address, service, slice},
    kubeproxy::{self, ServicePort, service_ports},
    lab::{kube_proxy_options, run_in},
};

#[derive(Parser, Debug)]
pub struct ScaleOpts {
    /// Service counts (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,1000,10000,50000")]
    pub services: Vec<usize>,
    /// Endpoints per service (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,10")]
    pub endpoints: Vec<usize>,
    /// Small sizes only (1 and 100 services), for CI.
    #[arg(long)]
    pub quick: bool,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct ScalePoint {
    pub services: usize,
    pub endpoints: usize,
    pub datapath: &'static str,
    pub program_ms: f64,
    pub one_change_ms: f64,
}

pub fn run(opts: &ScaleOpts) -> Result<()> {
    crate::require_root("the scale bench (namespaces, iptables, nft, BPF maps)")?;
    datapath_user::topology::cleanup_on_signals();
    let sizes: Vec<usize> = if opts.quick {
        vec![1, 100]
    } else {
        opts.services.clone()
    };
    let mut points = Vec::new();
    for &n in &sizes {
        for &m in &opts.endpoints {
            ensure!(
                n > 0 && m > 0,
                "--services and --endpoints must be positive"
            );
            eprintln!("{n} services × {m} endpoints…");
            let (services, slices) = objects(n, m);
            let ports = service_ports(&services, &slices);
            // One rollout step: service 0's first endpoint replaced.
            let fresh = endpoint_address((n * m + 7) as u64);
            let mut changed_ports = ports.clone();
            let target = changed_ports
                .iter_mut()
                .find(|p| p.name == "svc-0")
                .context("service 0")?;
            let before = target.clone();
            target.endpoints[0] = (fresh, 8080);
            target.endpoints.sort_by_key(|(a, p)| format!("{a}:{p}"));
            let after = target.clone();

            let (full, change) = iptables(&ports, &changed_ports, &before, &after)?;
            points.push(report(point(n, m, "kube-proxy iptables", full, change)));
            let (full, change) = nftables(&ports, &before, &after)?;
            points.push(report(point(n, m, "kube-proxy nftables", full, change)));
            let (full, change) = underpass(n, m, services, slices, fresh)?;
            points.push(report(point(n, m, "underpass", full, change)));
        }
    }
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header(vec![
        "services",
        "endpoints",
        "datapath",
        "program all (ms)",
        "one EndpointSlice change (ms)",
    ]);
    for p in &points {
        table.add_row(vec![
            p.services.to_string(),
            p.endpoints.to_string(),
            p.datapath.to_owned(),
            format!("{:.1}", p.program_ms),
            format!("{:.2}", p.one_change_ms),
        ]);
    }
    println!("{table}");
    if let Some(path) = &opts.json {
        std::fs::write(path, serde_json::to_string_pretty(&points)?)?;
    }
    Ok(())
}

/// Prints a point as soon as it is measured (long sweeps keep what they
/// measured if stopped).
fn report(point: ScalePoint) -> ScalePoint {
    eprintln!(
        "  {:<20} program {:>10.1} ms   one change {:>8.2} ms",
        point.datapath, point.program_ms, point.one_change_ms
    );
    point
}

fn point(
    n: usize,
    m: usize,
    datapath: &'static str,
    full: Duration,
    change: Duration,
) -> ScalePoint {
    ScalePoint {
        services: n,
        endpoints: m,
        datapath,
        program_ms: full.as_secs_f64() * 1e3,
        one_change_ms: change.as_secs_f64() * 1e3,
    }
}

fn objects(
    n: usize,
    m: usize,
) -> (
    Vec<k8s_openapi::api::core::v1::Service>,
    Vec<k8s_openapi::api::discovery::v1::EndpointSlice>,
) {
    let m64 = m as u64;
    let services = (0..n).map(service).collect();
    let slices = (0..n)
        .map(|i| slice(i, (0..m64).map(|j| endpoint_address(i as u64 * m64 + j))))
        .collect();
    (services, slices)
}

fn timed(work: impl FnOnce() -> Result<()>) -> Result<Duration> {
    let started = Instant::now();
    work()?;
    Ok(started.elapsed())
}

fn iptables(
    ports: &[ServicePort],
    changed: &[ServicePort],
    before: &ServicePort,
    after: &ServicePort,
) -> Result<(Duration, Duration)> {
    let namespace = Namespace::create(&format!("{}-scale-ipt", unique_prefix()))?;
    let options = kube_proxy_options();
    let full = kubeproxy::iptables_restore(ports, &options);
    let program = timed(|| {
        run_in(
            &namespace,
            "iptables-restore",
            &["-w", "5", "--noflush"],
            &full,
        )
    })?;
    let removed: Vec<String> = before
        .endpoints
        .iter()
        .filter(|e| !after.endpoints.contains(e))
        .map(|&e| before.sep_chain(e))
        .collect();
    let rewrite: BTreeSet<String> = [after.svc_chain()].into();
    let partial = kubeproxy::iptables_restore_partial(
        changed,
        &options,
        &|p| rewrite.contains(&p.svc_chain()),
        &removed,
    );
    let change = timed(|| {
        run_in(
            &namespace,
            "iptables-restore",
            &["-w", "5", "--noflush"],
            &partial,
        )
    })?;
    Ok((program, change))
}

fn nftables(
    ports: &[ServicePort],
    before: &ServicePort,
    after: &ServicePort,
) -> Result<(Duration, Duration)> {
    let namespace = Namespace::create(&format!("{}-scale-nft", unique_prefix()))?;
    let options = kube_proxy_options();
    let full = kubeproxy::nft_ruleset(ports, &options);
    let program = timed(|| run_in(&namespace, "nft", &["-f", "-"], &full))?;
    let update = kubeproxy::nft_update(before, after, &options);
    let change = timed(|| run_in(&namespace, "nft", &["-f", "-"], &update))?;
    Ok((program, change))
}

fn underpass(
    n: usize,
    m: usize,
    services: Vec<k8s_openapi::api::core::v1::Service>,
    slices: Vec<k8s_openapi::api::discovery::v1::EndpointSlice>,
    fresh: Ipv4Addr,
) -> Result<(Duration, Duration)> {
    let need_slots = (n * (m + 1) + 1024) as u32;
    let need_backends = (n * m + 1024) as u32;
    let options = LoadOptions {
        sizes: MapSizes {
            services: need_slots.max(MapSizes::default().services),
            backends: need_backends.max(MapSizes::default().backends),
            ..MapSizes::default()
        },
        ..LoadOptions::default()
    };
    let mut datapath = Datapath::load(&options).context("loading the datapath")?;
    let reconciler = Reconciler::adopt(&mut datapath.maps)?;
    let mut core = AgentCore::new(reconciler, NodeContext::default(), Metrics::new(None));
    let mut changed_slice = slices[0].clone();
    let program = timed(|| {
        core.store.apply(Change::Replaced(
            StoreKind::Service,
            services.iter().map(Object::from).collect(),
        ));
        core.store.apply(Change::Replaced(
            StoreKind::EndpointSlice,
            slices.iter().map(Object::from).collect(),
        ));
        let stats = core.full_sync();
        ensure!(stats.issues == 0, "{} issues while syncing", stats.issues);
        Ok(())
    })?;
    if let Some(endpoints) = changed_slice.endpoints.as_mut() {
        endpoints[0].addresses = vec![fresh.to_string()];
    }
    let change = timed(|| {
        let stats = core.apply_now(Change::Applied(Object::from(&changed_slice)));
        ensure!(
            stats.written == 1,
            "the change wrote {} frontends",
            stats.written
        );
        Ok(())
    })?;
    Ok((program, change))
}
