//! Pinned maps against this object's definitions.
//!
//! Pinned maps outlive the process that made them: after an upgrade the
//! pins were made by another version of the object, after a flag change
//! (`--conntrack-max`) with another size. aya adopts any pin by name
//! without comparing it, so the new programs would be verified against the
//! old map (refused when a value grew; worse, reading one field where the
//! old layout had another when it did not) and a new size would be
//! silently ignored.
//!
//! So each existing pin is compared first. The agent owns the maps
//! (`PinPolicy::Own`): a pin that differs in anything, its size included,
//! is removed and made afresh from this object, as Cilium does with maps
//! of incompatible properties. Its contents are lost: services and
//! backends are programmed again by the agent; flows tracked on the TC
//! path are balanced again (a TCP flow whose new backend differs fails
//! fast). Programs still attached keep the old map until they are
//! replaced. Every other user of the pins (the CNI plugin, `underpass
//! attach`) adopts the maps as they are (`PinPolicy::Adopt`): another size
//! is the agent's choice, but another layout is an error naming the map,
//! since attaching programs of this version to it would mistranslate.
//!
//! Each map's layout version is marked beside the pins
//! (`layouts/<MAP>-v<N>`, `datapath_common::maps::MAP_LAYOUT_VERSIONS`):
//! a build that changes one map's layout replaces that map alone, and the
//! others (conntrack among them) keep their contents. Pins of the builds
//! before per-map versions carry one shared marker (`maps-abi-v3`), which
//! stands for every map of their time at that version.

use std::{
    collections::HashMap,
    fmt,
    path::{Path, PathBuf},
};

use aya::maps::MapInfo;
use datapath_common::maps::{
    AFFINITY_MAP, AFFINITY_MATCH_MAP, BACKEND_ADDRS6_MAP, BACKENDS_MAP, Backend, CLASH_FILTER_MAP,
    CONNTRACK_TCP_MAP, CONNTRACK_UDP_MAP, CONNTRACK6_TCP_MAP, CONNTRACK6_UDP_MAP, COUNTERS_MAP,
    FRAGMENTS_MAP, IPV6_MAPS, MAP_LAYOUT_VERSIONS, POD_ROUTES_MAP, REPLY_FILTER_MAP,
    REVERSE_NAT_MAP, SERVICE_FILTER_MAP, SERVICES_MAP, SERVICES6_MAP, SHARED_MAPS_ABI, SLOTS_MAP,
    SOCK_LB_SKIP_MAP, SOCK_REVERSE_NAT_MAP, layout_version,
};

use crate::error::LoaderError;

/// What a caller of `Datapath::load` may do with pins it finds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PinPolicy {
    /// Use them as they are; a different layout is an error.
    #[default]
    Adopt,
    /// Replace any that differs from this object's definition (the agent).
    Own,
}

/// The properties of a map that programs are verified against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapLayout {
    /// `BPF_MAP_TYPE_*`.
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    /// `BPF_F_*` creation flags.
    pub flags: u32,
}

/// How a pinned map differs from the definition (empty: not at all).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Differences {
    /// Differences that change what programs read (type, key, value,
    /// flags): programs of this object cannot use the pinned map.
    pub layout: Vec<String>,
    /// A different capacity only.
    pub size: Option<String>,
}

impl Differences {
    pub fn is_empty(&self) -> bool {
        self.layout.is_empty() && self.size.is_none()
    }
}

impl fmt::Display for Differences {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let all: Vec<&str> = self
            .layout
            .iter()
            .chain(&self.size)
            .map(String::as_str)
            .collect();
        f.write_str(&all.join(", "))
    }
}

/// How `pinned` differs from `expected`.
pub fn differences(expected: &MapLayout, pinned: &MapLayout) -> Differences {
    let mut out = Differences::default();
    for (what, want, have) in [
        ("type", expected.map_type, pinned.map_type),
        ("key size", expected.key_size, pinned.key_size),
        ("value size", expected.value_size, pinned.value_size),
        ("flags", expected.flags, pinned.flags),
    ] {
        if want != have {
            out.layout
                .push(format!("{what} {have} pinned, {want} in this version"));
        }
    }
    if expected.max_entries != pinned.max_entries {
        out.size = Some(format!(
            "max entries {} pinned, {} configured",
            pinned.max_entries, expected.max_entries
        ));
    }
    out
}

/// What to do with one pin, by policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Keep,
    /// Remove the pin; the loader makes the map afresh. The reason says
    /// what differed.
    Replace(String),
    /// Stop: this object cannot use the pinned map.
    Refuse(String),
}

/// The pure decision for a pin that differs by `diff`.
pub fn decide(policy: PinPolicy, diff: &Differences) -> Decision {
    match policy {
        _ if diff.is_empty() => Decision::Keep,
        PinPolicy::Own => Decision::Replace(diff.to_string()),
        PinPolicy::Adopt if diff.layout.is_empty() => Decision::Keep,
        PinPolicy::Adopt => Decision::Refuse(diff.to_string()),
    }
}

/// The layouts the object defines, by map name, with the capacities the
/// loader will set (`max_entries`) in place of the object's own.
pub fn expected_layouts(
    object: &[u8],
    max_entries: &[(&str, u32)],
) -> Result<HashMap<String, MapLayout>, LoaderError> {
    let parsed = aya_obj::Object::parse(object).map_err(|e| LoaderError::Pin {
        path: PathBuf::from("(embedded object)"),
        reason: format!("parsing its map definitions: {e}"),
    })?;
    Ok(parsed
        .maps
        .iter()
        .map(|(name, map)| {
            let max = max_entries
                .iter()
                .find(|(n, _)| n == name)
                .map_or(map.max_entries(), |(_, max)| *max);
            (
                name.clone(),
                MapLayout {
                    map_type: map.map_type(),
                    key_size: map.key_size(),
                    value_size: map.value_size(),
                    max_entries: max,
                    flags: map.map_flags(),
                },
            )
        })
        .collect())
}

/// The layout of the map pinned at `path`; `None` when nothing is pinned
/// there.
fn pinned_layout(path: &Path) -> Result<Option<MapLayout>, LoaderError> {
    if !path.exists() {
        return Ok(None);
    }
    let info = MapInfo::from_pin(path).map_err(|e| LoaderError::Pin {
        path: path.to_owned(),
        reason: format!("reading the pinned map's properties: {e}"),
    })?;
    Ok(Some(MapLayout {
        map_type: raw_map_type(&info),
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        flags: info.map_flags(),
    }))
}

/// `BPF_MAP_TYPE_*` of a loaded map (aya gives its enum only).
fn raw_map_type(info: &MapInfo) -> u32 {
    use aya::maps::MapType;
    // The types this object uses; anything else differs from all of them.
    match info.map_type() {
        Ok(MapType::Hash) => 1,
        Ok(MapType::Array) => 2,
        Ok(MapType::PerCpuHash) => 5,
        Ok(MapType::PerCpuArray) => 6,
        Ok(MapType::LruHash) => 9,
        Ok(MapType::LruPerCpuHash) => 10,
        Ok(MapType::LpmTrie) => 11,
        _ => u32::MAX,
    }
}

/// The marker directory beside the pins that names the one layout version
/// all maps shared before each had its own (bpffs holds directories, maps,
/// programs and links only).
fn shared_marker(pin_dir: &Path, abi: u32) -> PathBuf {
    pin_dir.join(format!("maps-abi-v{abi}"))
}

/// The shared layout version the pins under `pin_dir` were marked with.
pub fn pinned_shared_abi(pin_dir: &Path) -> Option<u32> {
    std::fs::read_dir(pin_dir)
        .ok()?
        .filter_map(|e| e.ok())
        .find_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("maps-abi-v")?
                .parse()
                .ok()
        })
}

/// The maps of the builds that marked one shared version: the shared
/// marker speaks for these only. `ALL_MAPS` today, written out on purpose:
/// a map added later must not be taken for one those builds made.
const SHARED_VERSION_MAPS: [&str; 13] = [
    SERVICE_FILTER_MAP,
    SERVICES_MAP,
    BACKENDS_MAP,
    REVERSE_NAT_MAP,
    CONNTRACK_TCP_MAP,
    CONNTRACK_UDP_MAP,
    SOCK_REVERSE_NAT_MAP,
    COUNTERS_MAP,
    FRAGMENTS_MAP,
    CLASH_FILTER_MAP,
    REPLY_FILTER_MAP,
    POD_ROUTES_MAP,
    SOCK_LB_SKIP_MAP,
];

/// Where each map's layout version is marked: `layouts/<MAP>-v<N>`.
pub const LAYOUTS_DIR: &str = "layouts";

fn layout_marker(pin_dir: &Path, map: &str, version: u32) -> PathBuf {
    pin_dir.join(LAYOUTS_DIR).join(format!("{map}-v{version}"))
}

/// Which layout version the pin of `map` under `pin_dir` has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinnedVersion {
    /// Its own marker says.
    Marked(u32),
    /// Only the shared marker of the builds before per-map versions
    /// (every map was at that version).
    Shared(u32),
    /// No marker: pinned before layouts were versioned at all.
    Unmarked,
}

/// The version `map`'s own marker names, if it has one.
fn marked_version(pin_dir: &Path, map: &str) -> Option<u32> {
    let prefix = format!("{map}-v");
    std::fs::read_dir(pin_dir.join(LAYOUTS_DIR))
        .ok()?
        .filter_map(|e| e.ok())
        .find_map(|e| e.file_name().to_str()?.strip_prefix(&prefix)?.parse().ok())
}

/// The layout version of the pinned `map`, by the markers.
///
/// Without per-map markers, the shared marker of the builds before them
/// speaks for the maps of its time. With both, the per-map ones speak,
/// unless they disagree with the shared one: this build writes the shared
/// marker only while every map of that time is at its version, so an
/// older build, which knows only the shared marker, made the pins since.
pub fn pinned_version(pin_dir: &Path, map: &str) -> PinnedVersion {
    let shared = pinned_shared_abi(pin_dir).filter(|_| SHARED_VERSION_MAPS.contains(&map));
    if !pin_dir.join(LAYOUTS_DIR).is_dir() {
        return shared.map_or(PinnedVersion::Unmarked, PinnedVersion::Shared);
    }
    if let Some(abi) = shared
        && SHARED_VERSION_MAPS
            .iter()
            .any(|m| marked_version(pin_dir, m).is_some_and(|v| v != abi))
    {
        return PinnedVersion::Shared(abi);
    }
    marked_version(pin_dir, map).map_or(PinnedVersion::Unmarked, PinnedVersion::Marked)
}

/// True when every map of the shared marker's time is at that version in
/// this build: the shared marker may then stand beside the per-map ones.
fn shared_marker_holds() -> bool {
    SHARED_VERSION_MAPS
        .iter()
        .all(|map| layout_version(map) == Some(SHARED_MAPS_ABI))
}

/// Creates a marker directory; one another loader made meanwhile is fine.
fn create_marker(path: &Path) -> std::io::Result<()> {
    match std::fs::create_dir(path) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

/// Why a pin's layout version differs from this build's, if it does.
pub fn version_difference(map: &str, pinned: PinnedVersion) -> Option<String> {
    let ours = layout_version(map)?;
    match pinned {
        PinnedVersion::Marked(v) | PinnedVersion::Shared(v) if v == ours => None,
        PinnedVersion::Marked(v) | PinnedVersion::Shared(v) => {
            Some(format!("layout v{v} pinned, v{ours} in this version"))
        }
        PinnedVersion::Unmarked => Some(format!(
            "layout from before versioning pinned, v{ours} in this version"
        )),
    }
}

/// Marks the pins under `pin_dir` as made with this build's layouts
/// (after a load that made, replaced or adopted them), map by map; the
/// shared marker stays while every map is at its version, for builds
/// that read only that one. Safe against another loader marking at once.
pub fn mark_layouts(pin_dir: &Path) -> Result<(), LoaderError> {
    let err = |path: &Path, e: std::io::Error| LoaderError::Pin {
        path: path.to_owned(),
        reason: format!("marking the maps' layout versions: {e}"),
    };
    let dir = pin_dir.join(LAYOUTS_DIR);
    create_marker(&dir).map_err(|e| err(&dir, e))?;
    for (map, version) in MAP_LAYOUT_VERSIONS {
        let marker = layout_marker(pin_dir, map, version);
        match marked_version(pin_dir, map) {
            Some(v) if v == version => continue,
            // One step: the map is never without a marker.
            Some(old) if std::fs::rename(layout_marker(pin_dir, map, old), &marker).is_ok() => {}
            _ => create_marker(&marker).map_err(|e| err(&marker, e))?,
        }
    }
    let pinned_shared = pinned_shared_abi(pin_dir);
    if let Some(abi) = pinned_shared.filter(|&abi| !shared_marker_holds() || abi != SHARED_MAPS_ABI)
    {
        let _ = std::fs::remove_dir(shared_marker(pin_dir, abi));
    }
    if shared_marker_holds() {
        let shared = shared_marker(pin_dir, SHARED_MAPS_ABI);
        create_marker(&shared).map_err(|e| err(&shared, e))?;
    }
    Ok(())
}

/// Maps whose entries name ids of another map: replaced with it when it
/// is made afresh (or not pinned at all), since their ids would name
/// whatever the new map holds under them. A flow in conntrack names its
/// backend by id; a `BACKENDS` made afresh hands its ids out again, so the
/// flow could reach another service's pod (one carried over keeps them).
/// (`REVERSE_NAT` ids are written again under the same numbers when it is
/// made afresh, `Reconciler::adopt`.) The affinity maps name backend ids
/// too: a remembered client or a match entry must not keep anyone on an
/// id the new map hands to another pod.
const DEPENDENTS: [(&str, &[&str]); 1] = [(
    BACKENDS_MAP,
    &[
        CONNTRACK_TCP_MAP,
        CONNTRACK_UDP_MAP,
        CONNTRACK6_TCP_MAP,
        CONNTRACK6_UDP_MAP,
        AFFINITY_MAP,
        AFFINITY_MATCH_MAP,
    ],
)];

/// Maps replaced whenever another is, carried over or not: the programs
/// still attached (until the agent's first sync is done) keep reading the
/// replaced map, so what they read beside it must stay as it was, not be
/// rewritten by the new agent. Frontend entries name blocks of the slot
/// array, whose slots name backend ids: `BACKENDS` made anew takes the
/// slots and so the frontends with it (a kept `SLOTS` would get ids the
/// old `BACKENDS` does not hold, or holds for another pod); either of
/// `SERVICES` (or `SERVICES6`, whose frontends' blocks are in the same
/// array) and `SLOTS` takes the other.
///
/// `BACKEND_ADDRS6` holds the addresses of `BACKENDS`' IPv6 entries and
/// goes with it: a `BACKENDS` replaced (carried or not) takes it, and a
/// carry leaves the IPv6 entries behind (`read_backends`): an IPv6
/// backend's word without its address would be no backend, and the
/// frontends naming them are made anew anyway (`SLOTS` follows). The
/// other way, `BACKEND_ADDRS6` is replaced alone only when the IPv6 maps
/// are sized up or down (`--ipv6`), which takes `SERVICES6` and so every
/// frontend with it; a change of its layout would have to take a carried
/// `BACKENDS` with it.
const FOLLOWERS: [(&str, &[&str]); 4] = [
    (BACKENDS_MAP, &[SLOTS_MAP, BACKEND_ADDRS6_MAP]),
    (SLOTS_MAP, &[SERVICES_MAP, SERVICES6_MAP]),
    (SERVICES_MAP, &[SLOTS_MAP]),
    (SERVICES6_MAP, &[SLOTS_MAP]),
];

/// A map the pinned installation never had: one of the IPv6 maps when
/// none of them is pinned or marked (a build before them made the pins).
/// No program attached now can read it, so making it replaces nothing (the
/// upgrade that adds them keeps the IPv4 maps). Any other map not pinned
/// was removed (an agent stopped while replacing it: a marker goes before
/// its pin), and takes its followers with it.
fn new_to_installation(pin_dir: &Path, map: &str) -> bool {
    IPV6_MAPS.contains(&map)
        && IPV6_MAPS
            .iter()
            .all(|m| !pin_dir.join(m).exists() && marked_version(pin_dir, m).is_none())
}

/// Maps whose entries a replacement carries over when only their size or
/// flags changed, because other maps name their ids.
const CARRIED: [&str; 1] = [BACKENDS_MAP];

/// A pin that was replaced, and why (for the agent's log).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replaced {
    pub map: String,
    pub reason: String,
    /// Its entries are carried into the new map (`Carry`).
    pub carried: bool,
}

/// `BACKENDS` entries to write into the new map under the same ids: the
/// replaced map's (for its size or flags alone), so that the flows
/// conntrack holds, which name backends by id, keep theirs. The old map
/// stays pinned at `pin` until they are written and the layouts marked
/// (`Carry::done`): an agent stopped in between finds it there and
/// carries it again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Carry {
    pub entries: Vec<Backend>,
    pub pin: PathBuf,
}

impl Carry {
    /// The carry is written and the pins marked: the old map goes.
    pub fn done(&self) -> std::io::Result<()> {
        match std::fs::remove_file(&self.pin) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// What `reconcile_pins` did.
#[derive(Debug, Default)]
pub struct Reconciled {
    pub replaced: Vec<Replaced>,
    pub carry: Option<Carry>,
}

/// Where a carried map waits for its entries to be written (bpffs
/// refuses names with a dot).
/// The name says the layout version the entries were written in.
fn carry_pin(pin_dir: &Path, map: &str) -> PathBuf {
    let version = layout_version(map).unwrap_or_default();
    pin_dir.join(format!("{map}-carried-v{version}"))
}

/// Carried pins of `map` under `pin_dir`, of any version.
fn carry_pins(pin_dir: &Path, map: &str) -> Vec<PathBuf> {
    let prefix = format!("{map}-carried-v");
    std::fs::read_dir(pin_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(&prefix))
        })
        .map(|e| e.path())
        .collect()
}

/// The entries of an interrupted carry, if they can be trusted: written
/// in this build's layout, every id inside the new map, and the carry not
/// finished (a marked `BACKENDS` means its entries were written before the
/// pins were marked, and an agent may have written more since). Anything
/// else: the old pin goes, and `BACKENDS` counts as made afresh.
fn recover_carry(
    pin_dir: &Path,
    expected: &HashMap<String, MapLayout>,
) -> Result<Option<Carry>, LoaderError> {
    let ours = carry_pin(pin_dir, BACKENDS_MAP);
    let mut recovered = None;
    for pin in carry_pins(pin_dir, BACKENDS_MAP) {
        let finished = pin_dir.join(BACKENDS_MAP).exists()
            && marked_version(pin_dir, BACKENDS_MAP) == layout_version(BACKENDS_MAP);
        let layout = pinned_layout(&pin)?;
        let want = expected.get(BACKENDS_MAP);
        let same_layout = pin == ours
            && matches!((layout, want), (Some(have), Some(want))
                if have.map_type == want.map_type
                    && have.key_size == want.key_size
                    && have.value_size == want.value_size);
        if !finished
            && same_layout
            && let Some(want) = want
        {
            let entries = read_backends(&pin).map_err(|e| LoaderError::Pin {
                path: pin.clone(),
                reason: format!("reading the entries of an interrupted carry: {e}"),
            })?;
            let fits = entries
                .iter()
                .enumerate()
                .all(|(id, b)| !b.is_present() || (id as u64) < u64::from(want.max_entries));
            if fits {
                recovered = Some(Carry { entries, pin });
                continue;
            }
        }
        if !finished {
            tracing::warn!(
                pin = %pin.display(),
                "an interrupted carry of backends cannot be finished (another layout or size): BACKENDS is made afresh, and conntrack with it"
            );
        }
        std::fs::remove_file(&pin).map_err(|e| LoaderError::Pin {
            path: pin.clone(),
            reason: format!("removing the map of an earlier carry: {e}"),
        })?;
    }
    Ok(recovered)
}

/// Compares every existing pin in `pins` (map name, pin path) with
/// `expected` and applies `policy`: returns the pins it removed and the
/// entries to carry, or the first refusal as an error naming the map.
pub fn reconcile_pins(
    pin_dir: &Path,
    pins: &[(&str, PathBuf)],
    expected: &HashMap<String, MapLayout>,
    policy: PinPolicy,
) -> Result<Reconciled, LoaderError> {
    let read_err = |path: &Path, e: std::io::Error| LoaderError::Pin {
        path: path.to_owned(),
        reason: format!("reading the entries to carry into the new map: {e}"),
    };
    // A carry an agent stopped before finishing: its entries are the
    // truth (nothing has written the new map since but the CNI plugin,
    // which writes no entry).
    let recovered = match policy {
        PinPolicy::Own => recover_carry(pin_dir, expected)?,
        // Not theirs to finish, nor to fill the gap with an empty map.
        PinPolicy::Adopt => match carry_pins(pin_dir, BACKENDS_MAP).first() {
            Some(pin) => {
                return Err(LoaderError::Pin {
                    path: pin.clone(),
                    reason: "the agent is carrying the backends into a new map; \
                             start the agent (it finishes the carry) and try again"
                        .into(),
                });
            }
            None => None,
        },
    };
    // An unfinished carry leaves BACKENDS unmarked or missing: made anew.
    let made_anew_by_carry = recovered.is_some();
    // Every pin's decision first, from the markers as they are.
    let mut decisions = Vec::new();
    for (name, path) in pins {
        let (Some(want), Some(have)) = (expected.get(*name), pinned_layout(path)?) else {
            continue;
        };
        let mut diff = differences(want, &have);
        // Field layouts are not visible in a map's sizes (a field can move
        // at the same size): the pin's layout version says.
        let version = pinned_version(pin_dir, name);
        diff.layout.extend(version_difference(name, version));
        match decide(policy, &diff) {
            Decision::Refuse(reason) => {
                return Err(LoaderError::Pin {
                    path: path.clone(),
                    reason: format!(
                        "map {name} was pinned by another version of underpass ({reason}); \
                         start the agent of this version first (it replaces the map), \
                         or run `underpass uninstall`"
                    ),
                });
            }
            decision => {
                // Read now (nothing is removed yet): carried only when
                // the layout is the same and every id fits the new size
                // (a flow naming a dropped id could meet it again later).
                let carried = match &decision {
                    Decision::Replace(_)
                        if !made_anew_by_carry
                            && CARRIED.contains(name)
                            && have.map_type == want.map_type
                            && have.key_size == want.key_size
                            && have.value_size == want.value_size
                            && version_difference(name, version).is_none() =>
                    {
                        let entries = read_backends(path).map_err(|e| read_err(path, e))?;
                        let fits = entries.iter().enumerate().all(|(id, b)| {
                            !b.is_present() || (id as u64) < u64::from(want.max_entries)
                        });
                        fits.then_some(entries)
                    }
                    _ => None,
                };
                decisions.push((*name, path, version, decision, carried));
            }
        }
    }
    // Maps whose ids stay: carried over now, or by an interrupted carry.
    let carried_over: Vec<&str> = decisions
        .iter()
        .filter(|(.., carried)| carried.is_some())
        .map(|(name, ..)| *name)
        .chain(made_anew_by_carry.then_some(BACKENDS_MAP))
        .collect();
    // Until nothing changes: a map replaced takes its followers with it;
    // one made afresh (not carried), its dependents.
    for _ in 0..=datapath_common::maps::ALL_MAPS.len() {
        let mut changed = false;
        for (map, followers, ids_only) in FOLLOWERS
            .iter()
            .map(|(m, f)| (*m, *f, false))
            .chain(DEPENDENTS.iter().map(|(m, f)| (*m, *f, true)))
        {
            let pinned = decisions.iter().find(|(name, ..)| *name == map);
            let replaced = match pinned {
                Some((_, _, _, decision, _)) => matches!(decision, Decision::Replace(_)),
                // Not pinned: made by this load (the owner's), in place of
                // one that was, unless no build before had it.
                None => policy == PinPolicy::Own && !new_to_installation(pin_dir, map),
            };
            let fires = replaced && !(ids_only && carried_over.contains(&map));
            if !fires {
                continue;
            }
            for (name, _, _, decision, _) in &mut decisions {
                if followers.contains(name) && *decision == Decision::Keep {
                    *decision = Decision::Replace(if ids_only {
                        format!("its entries name ids of {map}, which is made afresh")
                    } else {
                        format!("it goes with {map}, which is made anew")
                    });
                    changed = true;
                }
            }
        }
        if !changed {
            break;
        }
    }
    let mut carry = recovered;
    let any_replaced = decisions
        .iter()
        .any(|(_, _, _, d, _)| matches!(d, Decision::Replace(_)));
    if !any_replaced {
        return Ok(Reconciled {
            replaced: Vec::new(),
            carry,
        });
    }
    // Before any pin goes: the kept maps carry their own markers (the
    // shared one may go next), and no marker names a replaced map, so that
    // a stop halfway leaves a new map unmarked (replaced again), never
    // marked with the old version.
    let marker_err = |path: &Path, e: std::io::Error| LoaderError::Pin {
        path: path.to_owned(),
        reason: format!("marking the kept maps' layout versions: {e}"),
    };
    let dir = pin_dir.join(LAYOUTS_DIR);
    create_marker(&dir).map_err(|e| marker_err(&dir, e))?;
    for (name, _, version, decision, _) in &decisions {
        if let (Decision::Keep, PinnedVersion::Shared(v)) = (decision, version) {
            let marker = layout_marker(pin_dir, name, *v);
            create_marker(&marker).map_err(|e| marker_err(&marker, e))?;
        }
    }
    if !shared_marker_holds()
        && let Some(abi) = pinned_shared_abi(pin_dir)
    {
        let _ = std::fs::remove_dir(shared_marker(pin_dir, abi));
    }
    let mut replaced = Vec::new();
    for (name, path, _, decision, carried) in decisions {
        let Decision::Replace(reason) = decision else {
            continue;
        };
        if let Some(v) = marked_version(pin_dir, name) {
            let _ = std::fs::remove_dir(layout_marker(pin_dir, name, v));
        }
        let pin_err = |e: std::io::Error| LoaderError::Pin {
            path: path.clone(),
            reason: format!("removing the pin of an incompatible map: {e}"),
        };
        let is_carried = carried.is_some();
        match carried {
            // Kept aside (one rename) until its entries are written.
            Some(entries) => {
                let pin = carry_pin(pin_dir, name);
                std::fs::rename(path, &pin).map_err(|e| LoaderError::Pin {
                    path: pin.clone(),
                    reason: format!("keeping the replaced map until its entries are carried: {e}"),
                })?;
                carry = Some(Carry { entries, pin });
            }
            None => std::fs::remove_file(path).map_err(pin_err)?,
        }
        replaced.push(Replaced {
            map: name.to_owned(),
            reason,
            carried: is_carried,
        });
    }
    Ok(Reconciled { replaced, carry })
}

/// Every entry of the `BACKENDS` array pinned at `path`.
/// The entries of a pinned `BACKENDS` to carry: its IPv4 ones (an IPv6
/// entry's address is in `BACKEND_ADDRS6`, made anew beside it).
fn read_backends(path: &Path) -> std::io::Result<Vec<Backend>> {
    use std::os::fd::{AsFd, AsRawFd};
    let map = aya::maps::MapData::from_pin(path).map_err(std::io::Error::other)?;
    let len = map.info().map_err(std::io::Error::other)?.max_entries();
    let entries: Vec<Backend> = crate::bpfsys::read_array(map.fd().as_fd().as_raw_fd(), len)?;
    Ok(entries
        .into_iter()
        .map(|b| if b.is_v6() { Backend::default() } else { b })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CT: MapLayout = MapLayout {
        map_type: 9,
        key_size: 16,
        value_size: 56,
        max_entries: 1 << 19,
        flags: 0,
    };

    #[test]
    fn an_identical_pin_is_kept_by_every_policy() {
        let diff = differences(&CT, &CT);
        assert!(diff.is_empty());
        assert_eq!(decide(PinPolicy::Own, &diff), Decision::Keep);
        assert_eq!(decide(PinPolicy::Adopt, &diff), Decision::Keep);
    }

    #[test]
    fn another_size_is_replaced_by_the_owner_and_adopted_by_others() {
        let pinned = MapLayout {
            max_entries: 1 << 18,
            ..CT
        };
        let diff = differences(&CT, &pinned);
        assert!(diff.layout.is_empty());
        assert_eq!(
            decide(PinPolicy::Own, &diff),
            Decision::Replace("max entries 262144 pinned, 524288 configured".into())
        );
        assert_eq!(decide(PinPolicy::Adopt, &diff), Decision::Keep);
    }

    #[test]
    fn another_layout_is_replaced_by_the_owner_and_refused_by_others() {
        let pinned = MapLayout {
            value_size: 52,
            map_type: 1,
            ..CT
        };
        let diff = differences(&CT, &pinned);
        let reason = "type 1 pinned, 9 in this version, value size 52 pinned, 56 in this version";
        assert_eq!(
            decide(PinPolicy::Own, &diff),
            Decision::Replace(reason.into())
        );
        assert_eq!(
            decide(PinPolicy::Adopt, &diff),
            Decision::Refuse(reason.into())
        );
    }

    #[test]
    fn the_embedded_object_defines_every_map_the_loader_pins() {
        let Some(object) = crate::object::bytes() else {
            panic!("the eBPF object is not embedded (run `cargo xtask build-ebpf`)");
        };
        let layouts =
            expected_layouts(object, &[(datapath_common::maps::SERVICES_MAP, 7)]).unwrap();
        for name in datapath_common::maps::ALL_MAPS {
            assert!(layouts.contains_key(name), "{name} missing");
        }
        assert_eq!(layouts[datapath_common::maps::SERVICES_MAP].max_entries, 7);
        assert_eq!(
            layouts[datapath_common::maps::CONNTRACK_TCP_MAP].value_size as usize,
            size_of::<datapath_common::maps::CtEntry>()
        );
    }

    /// Markers on a plain directory (bpffs holds directories alike).
    #[test]
    fn each_map_carries_its_version_and_the_shared_marker_speaks_for_its_time() {
        let dir = tempfile::tempdir().unwrap();
        let pins = dir.path();
        assert_eq!(pinned_version(pins, SERVICES_MAP), PinnedVersion::Unmarked);
        assert_eq!(
            version_difference(SERVICES_MAP, PinnedVersion::Unmarked).unwrap(),
            "layout from before versioning pinned, v4 in this version"
        );

        // The builds before per-map versions: one marker for all.
        std::fs::create_dir(shared_marker(pins, 2)).unwrap();
        assert_eq!(pinned_version(pins, SERVICES_MAP), PinnedVersion::Shared(2));
        assert_eq!(pinned_version(pins, "A_NEWER_MAP"), PinnedVersion::Unmarked);
        assert_eq!(
            version_difference(CONNTRACK_TCP_MAP, PinnedVersion::Shared(2)).unwrap(),
            "layout v2 pinned, v3 in this version"
        );
        assert_eq!(
            version_difference(CONNTRACK_TCP_MAP, PinnedVersion::Shared(3)),
            None
        );

        mark_layouts(pins).unwrap();
        for (map, version) in MAP_LAYOUT_VERSIONS {
            assert_eq!(pinned_version(pins, map), PinnedVersion::Marked(version));
        }
        assert_eq!(
            pinned_shared_abi(pins),
            None,
            "SERVICES is past v3: a shared marker would tell older builds they can read it"
        );
        assert!(!shared_marker(pins, 2).exists());

        // One map's own marker moves alone (as a build with SERVICES at
        // yet another version leaves it).
        std::fs::rename(
            layout_marker(pins, SERVICES_MAP, 4),
            layout_marker(pins, SERVICES_MAP, 5),
        )
        .unwrap();
        assert_eq!(pinned_version(pins, SERVICES_MAP), PinnedVersion::Marked(5));
        assert_eq!(pinned_version(pins, BACKENDS_MAP), PinnedVersion::Marked(3));

        // Then an older build, which knows only the shared marker, made
        // every map afresh and marked them v3: its marker speaks, not the
        // per-map ones it left behind; SERVICES is not this build's.
        std::fs::create_dir(shared_marker(pins, SHARED_MAPS_ABI)).unwrap();
        assert_eq!(pinned_version(pins, SERVICES_MAP), PinnedVersion::Shared(3));
        assert_eq!(
            version_difference(SERVICES_MAP, PinnedVersion::Shared(3)).unwrap(),
            "layout v3 pinned, v4 in this version"
        );
        assert_eq!(pinned_version(pins, BACKENDS_MAP), PinnedVersion::Shared(3));
        // A map those builds did not have is not theirs.
        assert_eq!(pinned_version(pins, SLOTS_MAP), PinnedVersion::Marked(1));

        mark_layouts(pins).unwrap();
        assert_eq!(pinned_version(pins, SERVICES_MAP), PinnedVersion::Marked(4));
        assert!(!layout_marker(pins, SERVICES_MAP, 5).exists());
        assert_eq!(pinned_shared_abi(pins), None);
        // Marking again (another loader at the same time) is fine.
        mark_layouts(pins).unwrap();
    }
}
