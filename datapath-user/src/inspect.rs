//! `underpass service|backend|conntrack list` and `underpass status`: read
//! the pinned maps (an agent need not run) and print tables or JSON.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::Path,
};

use anyhow::{Context, Result};
use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use datapath_common::{
    ipv4_octets,
    maps::{BackendId, CT_KIND_BACKEND, CT_KIND_SERVICE, Ipv6Words, RevNatId},
    port_host,
};
use serde::Serialize;

use crate::{
    attach, clock,
    maps::{DatapathMaps, DumpedFrontend, LbMaps},
    model::{BackendAddress, Frontend, Protocol, ipv6_from_words},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

fn open(pin_dir: &Path) -> Result<DatapathMaps> {
    DatapathMaps::open_pinned(pin_dir).with_context(|| {
        format!(
            "no datapath pinned at {} (start `underpass agent`, or pass --pin-dir)",
            pin_dir.display()
        )
    })
}

fn print<T: Serialize>(
    output: Output,
    rows: &[T],
    table: impl FnOnce(&[T]) -> Table,
) -> Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(rows)?),
        Output::Table => println!("{}", table(rows)),
    }
    Ok(())
}

fn new_table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(UTF8_BORDERS_ONLY)
        .set_header(header.to_vec());
    table
}

#[derive(Serialize)]
pub struct ServiceRow {
    pub frontend: String,
    pub rev_nat_id: RevNatId,
    pub backends: Vec<String>,
    /// False when a slot or backend is missing (an interrupted write the
    /// agent repairs on its next sync).
    pub complete: bool,
    /// `sessionAffinity: ClientIP`'s timeout in seconds (None: balanced
    /// connection by connection).
    pub affinity_seconds: Option<u64>,
    /// Packets sent to it that the TC path translated, and datagrams
    /// socket-LB translated at `sendmsg()` (None: the datapath does not
    /// count per frontend).
    pub packets: Option<u64>,
    /// Flows balanced for it: TC new flows, socket-LB `connect()`s.
    pub new_flows: Option<u64>,
    /// Served from outside by the uplink program: its Maglev table and
    /// the backends the table names (None: not served from outside).
    pub outside: Option<OutsideRow>,
}

/// A frontend served from outside.
#[derive(Serialize)]
pub struct OutsideRow {
    pub maglev_table: u32,
    pub backends: Vec<String>,
}

pub fn service_rows(maps: &DatapathMaps) -> Result<Vec<ServiceRow>> {
    let dump = maps.dump().context("reading SERVICES/BACKENDS")?;
    let mut rows = family_service_rows(&dump.frontends, &dump.backends);
    let tables: BTreeMap<RevNatId, u32> = dump.maglev_tables_of.iter().copied().collect();
    let sets: BTreeMap<u32, &Vec<BackendId>> =
        dump.maglev_sets.iter().map(|(t, set)| (*t, set)).collect();
    let addresses: BTreeMap<BackendId, String> = dump
        .backends
        .iter()
        .map(|(id, b)| (*id, SocketAddr::new(b.address.into(), b.port).to_string()))
        .collect();
    for row in &mut rows {
        if let Some(&table) = tables.get(&row.rev_nat_id) {
            row.outside = Some(OutsideRow {
                maglev_table: table,
                backends: sets
                    .get(&table)
                    .into_iter()
                    .flat_map(|set| set.iter())
                    .map(|id| {
                        addresses
                            .get(id)
                            .cloned()
                            .unwrap_or_else(|| format!("id {id}?"))
                    })
                    .collect(),
            });
        }
    }
    rows.extend(family_service_rows(&dump.frontends6, &dump.backends6));
    rows.sort_by(|a, b| a.frontend.cmp(&b.frontend));
    if let Some(affinity) = &maps.affinity {
        let hz = clock::hz().context("reading the kernel's HZ")?;
        for row in &mut rows {
            let jiffies = affinity
                .timeout(row.rev_nat_id)
                .context("reading AFFINITY_TIMEOUT")?;
            row.affinity_seconds = (jiffies != 0).then(|| jiffies.div_ceil(hz));
        }
    }
    if let Some(counters) = maps.service_counters.as_ref().filter(|c| c.is_counting()) {
        let counted: BTreeMap<RevNatId, _> = counters
            .nonzero()
            .context("reading SERVICE_COUNTERS")?
            .into_iter()
            .collect();
        for row in &mut rows {
            let counted = counted.get(&row.rev_nat_id).copied().unwrap_or_default();
            row.packets = Some(counted.packets);
            row.new_flows = Some(counted.new_flows);
        }
    }
    Ok(rows)
}

pub fn service_list(pin_dir: &Path, output: Output) -> Result<()> {
    let rows = service_rows(&open(pin_dir)?)?;
    print(output, &rows, |rows| {
        let mut table = new_table(&[
            "FRONTEND",
            "REV-NAT",
            "AFFINITY",
            "PACKETS",
            "NEW FLOWS",
            "BACKENDS",
            "FROM OUTSIDE (MAGLEV)",
        ]);
        for row in rows {
            let mut backends = row.backends.join("\n");
            if backends.is_empty() {
                backends = "(none: connections are refused)".into();
            }
            if !row.complete {
                backends += "\n(incomplete)";
            }
            let affinity = row
                .affinity_seconds
                .map_or_else(String::new, |seconds| format!("ClientIP {seconds}s"));
            let counted = |n: Option<u64>| n.map_or_else(|| "-".to_owned(), |n| n.to_string());
            table.add_row(vec![
                row.frontend.clone(),
                row.rev_nat_id.to_string(),
                affinity,
                counted(row.packets),
                counted(row.new_flows),
                backends,
                row.outside.as_ref().map_or_else(
                    || "-".to_owned(),
                    |o| format!("table {}\n{}", o.maglev_table, o.backends.join("\n")),
                ),
            ]);
        }
        table
    })
}

/// The rows of one family's frontends, their slots resolved to backends.
fn family_service_rows<A>(
    frontends: &[DumpedFrontend<A>],
    backends: &[(BackendId, BackendAddress<A>)],
) -> Vec<ServiceRow>
where
    A: Copy + Into<IpAddr>,
    Frontend<A>: std::fmt::Display,
{
    let backends: BTreeMap<BackendId, SocketAddr> = backends
        .iter()
        .map(|(id, b)| (*id, SocketAddr::new(b.address.into(), b.port)))
        .collect();
    frontends
        .iter()
        .map(|f| {
            let resolved: Vec<Option<String>> = f
                .slots
                .iter()
                .map(|slot| slot.and_then(|id| backends.get(&id)).map(|b| b.to_string()))
                .collect();
            ServiceRow {
                frontend: f.frontend.to_string(),
                rev_nat_id: f.rev_nat_id,
                complete: resolved.iter().all(Option::is_some),
                backends: resolved.into_iter().flatten().collect(),
                affinity_seconds: None,
                packets: None,
                new_flows: None,
                outside: None,
            }
        })
        .collect()
}

#[derive(Serialize)]
pub struct BackendRow {
    pub id: u32,
    pub address: String,
    pub protocol: Protocol,
    /// Frontends with a slot naming it.
    pub frontends: usize,
}

pub fn backend_list(pin_dir: &Path, output: Output) -> Result<()> {
    let maps = open(pin_dir)?;
    let dump = maps.dump().context("reading SERVICES/BACKENDS")?;
    let mut users: BTreeMap<u32, usize> = BTreeMap::new();
    let slots = dump.frontends.iter().map(|f| &f.slots);
    for frontend_slots in slots.chain(dump.frontends6.iter().map(|f| &f.slots)) {
        let mut ids: Vec<u32> = frontend_slots.iter().flatten().copied().collect();
        ids.dedup();
        for id in ids {
            *users.entry(id).or_default() += 1;
        }
    }
    let row = |id: BackendId, address: IpAddr, port: u16, protocol: Protocol| BackendRow {
        id,
        address: SocketAddr::new(address, port).to_string(),
        protocol,
        frontends: users.get(&id).copied().unwrap_or(0),
    };
    let mut rows: Vec<BackendRow> = dump
        .backends
        .iter()
        .map(|(id, b)| row(*id, b.address.into(), b.port, b.protocol))
        .chain(
            dump.backends6
                .iter()
                .map(|(id, b)| row(*id, b.address.into(), b.port, b.protocol)),
        )
        .collect();
    rows.sort_by_key(|r| r.id);
    print(output, &rows, |rows| {
        let mut table = new_table(&["ID", "BACKEND", "PROTOCOL", "FRONTENDS"]);
        for row in rows {
            table.add_row(vec![
                row.id.to_string(),
                row.address.clone(),
                row.protocol.to_string(),
                row.frontends.to_string(),
            ]);
        }
        table
    })
}

#[derive(Serialize)]
pub struct ConntrackRow {
    /// "service" (client → ClusterIP, egress) or "backend" (the reply
    /// direction's entry).
    pub kind: &'static str,
    pub protocol: String,
    pub client: String,
    pub peer: String,
    pub service: String,
    pub backend_id: u32,
    pub rev_nat_id: RevNatId,
    pub state: u8,
    pub idle_seconds: f64,
}

impl ConntrackRow {
    /// A row of either family: `[client, peer, service]`, `(backend id,
    /// reverse-NAT id, state)`.
    fn new(
        kind: u8,
        protocol: u8,
        [client, peer, service]: [SocketAddr; 3],
        (backend_id, rev_nat_id, state): (u32, RevNatId, u8),
        idle_seconds: f64,
    ) -> Self {
        Self {
            kind: match kind {
                CT_KIND_SERVICE => "service",
                CT_KIND_BACKEND => "backend",
                _ => "?",
            },
            protocol: Protocol::from_number(protocol)
                .map(|p| p.to_string())
                .unwrap_or_else(|| protocol.to_string()),
            client: client.to_string(),
            peer: peer.to_string(),
            service: service.to_string(),
            backend_id,
            rev_nat_id,
            state,
            idle_seconds,
        }
    }
}

pub fn conntrack_list(pin_dir: &Path, output: Output, limit: usize) -> Result<()> {
    let maps = open(pin_dir)?;
    let now = clock::jiffies_now().ok();
    let hz = clock::hz().ok();
    let idle = |last_seen: u64| match (now, hz) {
        (Some(now), Some(hz)) => now.saturating_sub(last_seen) as f64 / hz as f64,
        _ => f64::NAN,
    };
    let mut rows = Vec::new();
    for (name, table) in maps.conntrack_tables() {
        for entry in table.iter() {
            if rows.len() >= limit {
                break;
            }
            let (key, value) = entry.with_context(|| format!("reading {name}"))?;
            let at = |be: u32, port: u16| SocketAddr::from((ipv4_octets(be), port_host(port)));
            rows.push(ConntrackRow::new(
                key.kind,
                key.protocol,
                [
                    at(key.client_address_be, key.client_port_be),
                    at(key.peer_address_be, key.peer_port_be),
                    at(value.service_address_be, value.service_port_be),
                ],
                (value.backend_id, value.rev_nat_id(), value.state),
                idle(value.last_seen),
            ));
        }
    }
    for (name, table) in maps.conntrack6_tables() {
        for entry in table.iter() {
            if rows.len() >= limit {
                break;
            }
            let (key, value) = entry.with_context(|| format!("reading {name}"))?;
            let at = |words: Ipv6Words, port: u16| {
                SocketAddr::from((ipv6_from_words(words), port_host(port)))
            };
            rows.push(ConntrackRow::new(
                key.kind,
                key.protocol,
                [
                    at(key.client_address_be, key.client_port_be),
                    at(key.peer_address_be, key.peer_port_be),
                    at(value.service_address_be, value.service_port_be),
                ],
                (value.backend_id, value.rev_nat_id(), value.state),
                idle(value.last_seen),
            ));
        }
    }
    rows.truncate(limit);
    print(output, &rows, |rows| {
        let mut table = new_table(&[
            "KIND",
            "PROTO",
            "CLIENT",
            "PEER",
            "SERVICE",
            "BACKEND-ID",
            "STATE",
            "IDLE",
        ]);
        for row in rows {
            table.add_row(vec![
                row.kind.to_owned(),
                row.protocol.clone(),
                row.client.clone(),
                row.peer.clone(),
                row.service.clone(),
                row.backend_id.to_string(),
                row.state.to_string(),
                format!("{:.0}s", row.idle_seconds),
            ]);
        }
        table
    })
}

#[derive(Serialize)]
pub struct Status {
    pub pin_dir: String,
    pub frontends: usize,
    pub backends: usize,
    pub conntrack_entries: usize,
    pub attached: Vec<String>,
    pub socket_lb_cgroups: Vec<String>,
    pub counters: BTreeMap<&'static str, u64>,
}

pub fn status(pin_dir: &Path, output: Output) -> Result<()> {
    let maps = open(pin_dir)?;
    let dump = maps.dump().context("reading the service maps")?;
    let conntrack_entries = maps.conntrack_entries();
    let counters = maps
        .counters()
        .context("reading COUNTERS")?
        .into_iter()
        .map(|(c, v)| (c.name(), v))
        .collect();
    let attached = attach::pinned_tc_links(pin_dir)
        .into_iter()
        .map(|(netns, iface)| format!("{netns}/{iface}"))
        .collect();
    let socket_lb_cgroups = std::fs::read_dir(pin_dir.join("links/cgroup"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().replace(':', "/"))
        .collect();
    let status = Status {
        pin_dir: pin_dir.display().to_string(),
        frontends: dump.frontends.len(),
        backends: dump.backends.len(),
        conntrack_entries,
        attached,
        socket_lb_cgroups,
        counters,
    };
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&status)?),
        Output::Table => {
            let mut table = new_table(&["", ""]);
            table.add_row(vec!["pin directory".into(), status.pin_dir.clone()]);
            table.add_row(vec!["frontends".into(), status.frontends.to_string()]);
            table.add_row(vec!["backends".into(), status.backends.to_string()]);
            table.add_row(vec![
                "conntrack entries".into(),
                status.conntrack_entries.to_string(),
            ]);
            table.add_row(vec![
                "TC attached (netns/iface)".into(),
                if status.attached.is_empty() {
                    "none".into()
                } else {
                    status.attached.join("\n")
                },
            ]);
            table.add_row(vec![
                "socket-LB cgroups".into(),
                if status.socket_lb_cgroups.is_empty() {
                    "none".into()
                } else {
                    status.socket_lb_cgroups.join("\n")
                },
            ]);
            for (name, value) in &status.counters {
                table.add_row(vec![format!("counter {name}"), value.to_string()]);
            }
            println!("{table}");
        }
    }
    Ok(())
}
