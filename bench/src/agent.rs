//! Control-plane figures of the agent: syncing N services × M endpoints
//! into empty maps, applying one changed EndpointSlice, and the agent's
//! memory at that scale.
//!
//! The first two drive the agent's own core (store → translate →
//! reconcile → real maps) in this process, so they time exactly the
//! agent's work from a change's arrival to the maps being updated (the
//! watch transport and the `--debounce` wait, 2 ms by default, come on
//! top). The memory figure runs the real `underpass agent` binary in
//! `--from-dir` mode on the same objects and reads its RSS.

use std::{
    io::Write,
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use datapath_user::{
    Datapath, LoadOptions,
    agent::AgentCore,
    k8s::{
        NodeContext, Object,
        store::{Change, Kind},
    },
    loader::MapSizes,
    metrics::Metrics,
    reconcile::Reconciler,
};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use rand::Rng;

use crate::{
    agent_edit_latency::{time_edits, write_edited},
    agent_process::{AgentProcess, underpass_binary},
    sweep_objects::{endpoint_address, service, slice},
};

#[derive(Parser, Debug)]
pub struct AgentOpts {
    /// Services to sync.
    #[arg(long, default_value_t = 10_000)]
    pub services: usize,
    /// Endpoints per service (each a distinct pod address).
    #[arg(long, default_value_t = 10)]
    pub endpoints: usize,
    /// EndpointSlice changes to time, one at a time.
    #[arg(long, default_value_t = 2_000)]
    pub changes: u32,
    /// EndpointSlice edits timed end to end through the real agent: a
    /// manifest renamed into its --from-dir until the pinned maps hold the
    /// new endpoint (change event, parse, debounce, maps). 0: none.
    #[arg(long, default_value_t = 200)]
    pub edits: u32,
    /// The `underpass` binary for the memory and edit measurements
    /// (default: next to this one).
    #[arg(long)]
    pub underpass: Option<PathBuf>,
    /// Skip running the agent binary (no memory or edit figures).
    #[arg(long)]
    pub no_process: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct AgentFigures {
    pub services: usize,
    pub endpoints_per_service: usize,
    /// Objects handed to the store (the watch's initial list).
    pub store_ms: f64,
    /// Translate + reconcile + prune into empty maps.
    pub sync_ms: f64,
    pub change_p50_us: f64,
    pub change_p99_us: f64,
    pub change_max_us: f64,
    pub changes: u64,
    /// A `/metrics` scrape's label request for every frontend (all
    /// counted something): the core's scan of its frontends, made
    /// between syncs.
    pub scrape_labels_ms: f64,
    /// The real agent: start to /readyz (load, read YAML, sync).
    pub process_ready_ms: Option<f64>,
    pub process_rss_mib: Option<f64>,
    pub process_peak_rss_mib: Option<f64>,
    /// Of the RSS: the process's own memory (`RssAnon`: heap, stacks),
    /// everything it maps (`RssFile` + `RssShmem`: the binary, libc and
    /// the BPF maps), and of that the BPF maps (`SLOTS`, `BACKENDS`:
    /// kernel map memory, which exists whether mapped or not; the kernel
    /// maps an array whole).
    pub process_rss_anon_mib: Option<f64>,
    pub process_rss_mapped_mib: Option<f64>,
    pub process_rss_bpf_maps_mib: Option<f64>,
    /// One edit, file renamed → maps, through the real agent.
    pub edit_p50_ms: Option<f64>,
    pub edit_p99_ms: Option<f64>,
    pub edit_max_ms: Option<f64>,
    pub edits: u64,
}

fn objects(opts: &AgentOpts) -> (Vec<Service>, Vec<EndpointSlice>) {
    let m = opts.endpoints as u64;
    let services = (0..opts.services).map(service).collect();
    let slices = (0..opts.services)
        .map(|i| slice(i, (0..m).map(|j| endpoint_address(i as u64 * m + j))))
        .collect();
    (services, slices)
}

pub fn run(opts: &AgentOpts) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the agent bench writes real BPF maps: run it as root");
    }
    ensure!(
        opts.services > 0 && opts.endpoints > 0,
        "--services and --endpoints must be positive"
    );
    let mut figures = in_process(opts)?;
    if !opts.no_process {
        process(opts, &mut figures)?;
    }
    if opts.json {
        println!("{}", serde_json::to_string_pretty(&figures)?);
        return Ok(());
    }
    let mut table = Table::new();
    table
        .load_preset(UTF8_FULL_CONDENSED)
        .set_header(vec!["figure", "value", "goal"]);
    let scale = format!(
        "{} services × {} endpoints",
        figures.services, figures.endpoints_per_service
    );
    table.add_row(vec![
        format!("sync {scale} into empty maps"),
        format!(
            "{:.0} ms (+{:.0} ms store)",
            figures.sync_ms, figures.store_ms
        ),
        "≤ 1 s".into(),
    ]);
    table.add_row(vec![
        format!(
            "one EndpointSlice change → maps ({} changes)",
            figures.changes
        ),
        format!(
            "p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs",
            figures.change_p50_us, figures.change_p99_us, figures.change_max_us
        ),
        "p99 ≤ 5 ms".into(),
    ]);
    table.add_row(vec![
        format!("labels for a /metrics scrape of every frontend ({scale}; between syncs)"),
        format!("{:.1} ms", figures.scrape_labels_ms),
        String::new(),
    ]);
    if let (Some(ready), Some(rss), Some(peak)) = (
        figures.process_ready_ms,
        figures.process_rss_mib,
        figures.process_peak_rss_mib,
    ) {
        table.add_row(vec![
            format!("underpass agent --from-dir, {scale}: start → ready"),
            format!("{ready:.0} ms"),
            String::new(),
        ]);
        table.add_row(vec![
            "agent RSS once settled after ready (peak)".into(),
            format!("{rss:.1} MiB ({peak:.1} MiB)"),
            "≤ 64 MiB".into(),
        ]);
        if let (Some(anon), Some(mapped)) =
            (figures.process_rss_anon_mib, figures.process_rss_mapped_mib)
        {
            // Unreadable smaps: all the mapped pages shown as files.
            let bpf_maps = figures.process_rss_bpf_maps_mib.unwrap_or(0.0);
            table.add_row(vec![
                "  of it: the agent's own (anonymous) / binary and libraries / BPF maps mapped (SLOTS, BACKENDS: kernel memory)".into(),
                format!(
                    "{anon:.1} / {:.1} / {bpf_maps:.1} MiB",
                    mapped - bpf_maps
                ),
                String::new(),
            ]);
        }
    }
    if let (Some(p50), Some(p99), Some(max)) = (
        figures.edit_p50_ms,
        figures.edit_p99_ms,
        figures.edit_max_ms,
    ) {
        table.add_row(vec![
            format!(
                "one EndpointSlice edit end to end: file renamed into --from-dir → maps ({} edits; debounce included)",
                figures.edits
            ),
            format!("p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms"),
            "p99 ≤ 5 ms".into(),
        ]);
    }
    println!("{table}");
    Ok(())
}

fn in_process(opts: &AgentOpts) -> Result<AgentFigures> {
    let sizes = map_sizes(opts);
    let mut datapath = Datapath::load(&LoadOptions {
        sizes,
        ..LoadOptions::default()
    })
    .context("loading the datapath")?;
    // As the agent's first start: maps it made need no reading.
    let reconciler = if datapath.made_the_service_maps() {
        Reconciler::new_on_empty(&mut datapath.maps)
    } else {
        Reconciler::adopt(&mut datapath.maps).context("reading the maps")?
    };
    let mut core = AgentCore::new(reconciler, NodeContext::default(), Metrics::new(None));
    let (services, slices) = objects(opts);
    eprintln!(
        "syncing {} services × {} endpoints into empty maps…",
        opts.services, opts.endpoints
    );
    let started = Instant::now();
    core.store.apply(Change::Replaced(
        Kind::Service,
        services.iter().map(Object::from).collect(),
    ));
    core.store.apply(Change::Replaced(
        Kind::EndpointSlice,
        slices.iter().map(Object::from).collect(),
    ));
    let store_ms = started.elapsed().as_secs_f64() * 1e3;
    let started = Instant::now();
    let stats = core.full_sync();
    let sync_ms = started.elapsed().as_secs_f64() * 1e3;
    ensure!(
        stats.issues == 0,
        "the sync reported {} issues",
        stats.issues
    );
    ensure!(
        core.reconciler().frontend_count() == opts.services
            && core.reconciler().backend_count() == opts.services * opts.endpoints,
        "the maps do not hold what was synced"
    );

    eprintln!("timing {} EndpointSlice changes…", opts.changes);
    let mut histogram = hdrhistogram::Histogram::<u64>::new(3)?;
    let mut rng = rand::rng();
    let m = opts.endpoints as u64;
    let mut next_address = opts.services as u64 * m;
    for _ in 0..opts.changes {
        // A rollout step: one endpoint of one service replaced by a new pod.
        let i = rng.random_range(0..opts.services);
        let replaced = rng.random_range(0..m);
        let addresses: Vec<Ipv4Addr> = (0..m)
            .map(|j| {
                if j == replaced {
                    next_address += 1;
                    endpoint_address(next_address)
                } else {
                    endpoint_address(i as u64 * m + j)
                }
            })
            .collect();
        let change = Change::Applied(Object::from(&slice(i, addresses)));
        let started = Instant::now();
        let stats = core.apply_now(change);
        histogram.record(started.elapsed().as_nanos() as u64)?;
        ensure!(
            stats.written == 1,
            "a change wrote {} frontends",
            stats.written
        );
    }
    eprintln!("timing a scrape's labels for every frontend…");
    let (request, mut answer) =
        datapath_user::service_metrics::LabelRequest::new((1..=opts.services as u32).collect());
    let started = Instant::now();
    core.answer_labels(request);
    let scrape_labels_ms = started.elapsed().as_secs_f64() * 1e3;
    let labelled = answer.try_recv().map_or(0, |labels| labels.len());
    ensure!(
        labelled == opts.services,
        "{labelled} of {} frontends labelled",
        opts.services
    );
    Ok(AgentFigures {
        services: opts.services,
        endpoints_per_service: opts.endpoints,
        store_ms,
        sync_ms,
        scrape_labels_ms,
        change_p50_us: histogram.value_at_quantile(0.5) as f64 / 1e3,
        change_p99_us: histogram.value_at_quantile(0.99) as f64 / 1e3,
        change_max_us: histogram.max() as f64 / 1e3,
        changes: histogram.len(),
        ..AgentFigures::default()
    })
}

fn process(opts: &AgentOpts, figures: &mut AgentFigures) -> Result<()> {
    let binary = underpass_binary(opts.underpass.as_deref())?;
    let dir = tempfile::Builder::new()
        .prefix("underpass-bench-")
        .tempdir()?;
    let (services, slices) = objects(opts);
    eprintln!("writing {} services as manifests…", opts.services);
    // Service 0 has a file of its own, the one the timed edits rewrite.
    let m = opts.endpoints as u64;
    let service_0: Vec<Ipv4Addr> = (0..m).map(endpoint_address).collect();
    write_edited(dir.path(), &service_0)?;
    let mut file =
        std::io::BufWriter::new(std::fs::File::create(dir.path().join("services.yaml"))?);
    for (service, slice) in services.iter().zip(&slices).skip(1) {
        // k8s-openapi writes apiVersion and kind itself.
        writeln!(file, "---")?;
        file.write_all(serde_yaml::to_string(service)?.as_bytes())?;
        writeln!(file, "---")?;
        file.write_all(serde_yaml::to_string(slice)?.as_bytes())?;
    }
    file.flush()?;
    drop(file);

    let pin_dir = PathBuf::from(format!(
        "/sys/fs/bpf/underpass-bench-{}",
        std::process::id()
    ));
    eprintln!("starting {} agent --from-dir…", binary.display());
    let started = Instant::now();
    let mut agent = AgentProcess::spawn(
        &binary,
        pin_dir,
        dir.path(),
        [
            "--no-pod-attach".to_owned(),
            "--no-socket-lb".to_owned(),
            format!("--backend-slots-max={}", map_sizes(opts).slots),
            format!("--backends-max={}", map_sizes(opts).backends),
            format!("--frontends-max={}", map_sizes(opts).reverse_nat - 1),
        ],
    )?;
    agent.wait_until(Duration::from_secs(120), "ready", AgentProcess::is_ready)?;
    figures.process_ready_ms = Some(started.elapsed().as_secs_f64() * 1e3);
    let exported = agent.get("/metrics");
    ensure!(
        exported.contains(&format!("underpass_frontends {}\n", opts.services)),
        "the agent did not program all {} services",
        opts.services
    );
    // The resident set once it holds still (the allocator returns what
    // the start-up freed within about a second), at most 5 s after ready.
    let status_path = format!("/proc/{}/status", agent.pid());
    let settle_until = Instant::now() + Duration::from_secs(5);
    let mut previous = f64::NAN;
    let status = loop {
        std::thread::sleep(Duration::from_millis(250));
        let status = std::fs::read_to_string(&status_path)?;
        let rss = status_kib(&status, "VmRSS:").unwrap_or(f64::NAN);
        if (rss - previous).abs() <= previous * 0.005 || Instant::now() >= settle_until {
            break status;
        }
        previous = rss;
    };
    figures.process_rss_mib = status_kib(&status, "VmRSS:").map(|k| k / 1024.0);
    figures.process_peak_rss_mib = status_kib(&status, "VmHWM:").map(|k| k / 1024.0);
    figures.process_rss_anon_mib = status_kib(&status, "RssAnon:").map(|k| k / 1024.0);
    figures.process_rss_mapped_mib = status_kib(&status, "RssFile:")
        .zip(status_kib(&status, "RssShmem:"))
        .map(|(file, shmem)| (file + shmem) / 1024.0);
    figures.process_rss_bpf_maps_mib = bpf_map_rss_kib(agent.pid()).map(|k| k / 1024.0);
    if opts.edits > 0 {
        eprintln!("timing {} edits of a manifest, file → maps…", opts.edits);
        let edits = time_edits(
            dir.path(),
            agent.pin_dir(),
            opts.endpoints,
            opts.edits,
            opts.services as u64 * m,
        )?;
        let ms = |q: f64| edits.histogram.value_at_quantile(q) as f64 / 1e6;
        figures.edit_p50_ms = Some(ms(0.5));
        figures.edit_p99_ms = Some(ms(0.99));
        figures.edit_max_ms = Some(edits.histogram.max() as f64 / 1e6);
        figures.edits = edits.histogram.len();
    }
    agent.stop();
    Ok(())
}

/// The services and backends maps sized to the sweep (at least the
/// agent's defaults), as an operator would with `--backend-slots-max`
/// `--backends-max` and `--frontends-max`; room for the changes' new pods besides.
fn map_sizes(opts: &AgentOpts) -> MapSizes {
    let defaults = MapSizes::default();
    MapSizes {
        // The changes' services may grow by one endpoint: room for it.
        services: ((opts.services + 1024) as u32).max(defaults.services),
        slots: MapSizes::slots_for(opts.services + 1024, opts.endpoints + 1).max(defaults.slots),
        backends: ((opts.services * opts.endpoints + opts.changes as usize + 1024) as u32)
            .max(defaults.backends),
        reverse_nat: ((opts.services + 1024) as u32).max(defaults.reverse_nat),
        ..defaults
    }
}

/// The resident pages of the BPF maps `pid` has mapped, from its smaps.
fn bpf_map_rss_kib(pid: u32) -> Option<f64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mut in_bpf_map = false;
    let mut total = 0.0;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        match fields.next() {
            // A mapping's first line: "start-end perms offset dev inode [name]".
            Some(first) if first.contains('-') && !first.ends_with(':') => {
                in_bpf_map = fields.nth(4) == Some("anon_inode:bpf-map");
            }
            Some("Rss:") if in_bpf_map => total += fields.next()?.parse::<f64>().ok()?,
            _ => {}
        }
    }
    Some(total)
}

fn status_kib(status: &str, field: &str) -> Option<f64> {
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}
