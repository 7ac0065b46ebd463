//! One EndpointSlice edit end to end through the real agent: a manifest
//! renamed into its `--from-dir` (as an atomic writer or a ConfigMap
//! volume does) until the pinned maps hold the new endpoint. Everything
//! the agent does is inside: the directory's change event, reading and
//! parsing the file, the `--debounce` wait, translate and reconcile, the
//! map writes. The maps are read from their pins, as any tool would.

use std::{
    io::Write,
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use datapath_common::{
    IPPROTO_TCP,
    maps::{Backend, ServiceKey},
};
use datapath_user::maps::DatapathMaps;
use rand::Rng;

use crate::sweep_objects::{endpoint_address, service, service_address, slice};

/// The file the timed edits rewrite; it holds service 0 and its slice.
pub const EDITED_FILE: &str = "edited.yaml";
/// The longest one edit may take before the bench gives up on the agent.
const GIVE_UP: Duration = Duration::from_secs(10);
/// Between two reads of the maps: short against the target (5 ms), long
/// enough not to take the agent's CPU on a 2-core machine.
const READ_EVERY: Duration = Duration::from_micros(100);
/// Before each edit: longer than the agent's `--debounce-ms` (2 ms), so
/// that each edit is a lone change, as one EndpointSlice update is. (Edits
/// in a burst wait out the debounce after the update before them.)
const QUIET: Duration = Duration::from_millis(10);

/// Latencies of the timed edits, in nanoseconds.
pub struct EditLatencies {
    pub histogram: hdrhistogram::Histogram<u64>,
}

/// Writes service 0 with `addresses` as `EDITED_FILE` in `dir`, atomically
/// (a hidden temporary file renamed into place); returns the moment of
/// the rename.
pub fn write_edited(dir: &Path, addresses: &[Ipv4Addr]) -> Result<Instant> {
    let temp = dir.join(format!(".{EDITED_FILE}.tmp"));
    let mut file = std::io::BufWriter::new(std::fs::File::create(&temp)?);
    writeln!(file, "---")?;
    file.write_all(serde_yaml::to_string(&service(0))?.as_bytes())?;
    writeln!(file, "---")?;
    file.write_all(serde_yaml::to_string(&slice(0, addresses.iter().copied()))?.as_bytes())?;
    file.into_inner()?.sync_data()?;
    let renamed = Instant::now();
    std::fs::rename(&temp, dir.join(EDITED_FILE))?;
    Ok(renamed)
}

/// Times `edits` edits of service 0 (`endpoints` endpoints, one replaced by
/// a new address each time) against the agent pinned under `pin_dir`.
pub fn time_edits(
    dir: &Path,
    pin_dir: &Path,
    endpoints: usize,
    edits: u32,
    first_new_address: u64,
) -> Result<EditLatencies> {
    let maps = DatapathMaps::open_pinned(pin_dir).context("opening the agent's pinned maps")?;
    let frontend = (u32::from(service_address(0)).to_be(), 80u16.to_be());
    let mut addresses: Vec<Ipv4Addr> = (0..endpoints as u64).map(endpoint_address).collect();
    let mut histogram = hdrhistogram::Histogram::<u64>::new(3)?;
    let mut rng = rand::rng();
    for n in 0..u64::from(edits) {
        let new = endpoint_address(first_new_address + n);
        let replaced = rng.random_range(0..endpoints);
        addresses[replaced] = new;
        std::thread::sleep(QUIET);
        let renamed = write_edited(dir, &addresses)?;
        loop {
            if backends_of(&maps, frontend)?.contains(&new) {
                break;
            }
            if renamed.elapsed() > GIVE_UP {
                bail!(
                    "edit {n}: the agent did not program endpoint {new} of {} within {GIVE_UP:?}",
                    service_address(0)
                );
            }
            std::thread::sleep(READ_EVERY);
        }
        histogram.record(renamed.elapsed().as_nanos() as u64)?;
    }
    Ok(EditLatencies { histogram })
}

/// The addresses the maps send `frontend` (TCP) to now.
fn backends_of(maps: &DatapathMaps, (address_be, port_be): (u32, u16)) -> Result<Vec<Ipv4Addr>> {
    let ids = maps
        .backend_ids_of(&ServiceKey::new(address_be, port_be, IPPROTO_TCP))?
        .unwrap_or_default();
    let mut addresses = Vec::with_capacity(ids.len());
    for id in ids {
        let backend: Backend = maps.backends.get(id)?.context("a slot beyond BACKENDS")?;
        addresses.push(Ipv4Addr::from(u32::from_be(backend.address_be)));
    }
    Ok(addresses)
}
