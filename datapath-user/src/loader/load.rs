//! The embedded object into the kernel: maps pinned (or adopted, or
//! replaced when their layout changed), globals set, programs verified.

use std::path::{Path, PathBuf};

use aya::{Ebpf, EbpfLoader, programs::SchedClassifier, util::KernelVersion};
use datapath_common::{
    conntrack::LIFETIMES_GLOBAL,
    maps,
    skb_checksum::{SKB_CHECKSUM_GLOBAL, SkbChecksumField},
    sock_lb::{SOCK_LB_IPV6_GLOBAL, SOCK_LB_SCOPE_GLOBAL},
};

use super::{
    bpffs::ensure_bpffs,
    options::{DatapathLog, L4Checksums, LoadOptions},
    programs::{jump_table_pin, pin_programs, sched_classifier, sock_program, xdp_program},
    skb_access::{SkbAccess, patch_kfunc_calls},
};
use crate::{
    clock, error::LoaderError, features, map_pins, maps::DatapathMaps, object, probe,
    tc_mode::TcMode,
};

/// The loaded datapath: its programs (loaded, not yet attached) and maps.
pub struct Datapath {
    pub(super) ebpf: Ebpf,
    pub(super) pin_dir: Option<PathBuf>,
    /// The level the programs log rare events at (`event_log`).
    pub(super) datapath_log: DatapathLog,
    pub maps: DatapathMaps,
    /// The maps this load made (none pinned before, or the pin was
    /// replaced): empty until something writes them.
    created_maps: Vec<&'static str>,
    /// How the loaded programs update L4 checksums.
    l4_checksums: L4Checksums,
}

/// True when a program load failed on what the direct checksum path
/// needs (the kfunc call, the `struct sk_buff` read), by the verifier's
/// words: another failure is not retried without them.
fn refused_skb_access(error: &LoaderError) -> bool {
    let text = error.to_string();
    ["kernel function", "kfunc", "sk_buff"]
        .iter()
        .any(|needle| text.contains(needle))
}

fn warn_helpers_only(reason: &str) {
    tracing::warn!(
        feature = "direct L4 checksum updates",
        "kernel feature missing: translated packets get their L4 checksums \
         from helper calls (~40 ns more per packet): {reason}"
    );
}

impl Datapath {
    /// Loads the embedded object. With a pin directory, existing pinned
    /// maps are reused (their contents survive) and missing ones are
    /// created and pinned.
    pub fn load(options: &LoadOptions) -> Result<Self, LoaderError> {
        crate::raise_memlock_limit();
        let skb_access = match options.l4_checksums {
            L4Checksums::Direct => SkbAccess::probe(),
            L4Checksums::Helpers => SkbAccess::helpers_only("chosen (--l4-checksums)".into()),
        };
        if let (L4Checksums::Direct, Some(reason)) =
            (options.l4_checksums, &skb_access.fallback_reason)
        {
            warn_helpers_only(reason);
        }
        // Maps the first attempt made stay made by this load.
        let mut created = Vec::new();
        match Self::load_with(options, &skb_access, &mut created) {
            // The kernel's BTF named the kfunc and the field, yet the
            // verifier refused them (no JIT, no CAP_PERFMON, an odd
            // backport): the programs work without them.
            Err(error @ LoaderError::Program { .. })
                if skb_access.kfunc_id.is_some() && refused_skb_access(&error) =>
            {
                let reason = format!("the kernel refused the programs that read it: {error}");
                warn_helpers_only(&reason);
                Self::load_with(options, &SkbAccess::helpers_only(reason), &mut created)
            }
            loaded => loaded,
        }
    }

    /// How this load's programs update L4 checksums.
    pub fn l4_checksums(&self) -> L4Checksums {
        self.l4_checksums
    }

    fn load_with(
        options: &LoadOptions,
        skb_access: &SkbAccess,
        created: &mut Vec<&'static str>,
    ) -> Result<Self, LoaderError> {
        let embedded = object::bytes().ok_or(LoaderError::ObjectMissing)?;
        let (patched, calls) = patch_kfunc_calls(embedded, skb_access.kfunc_id);
        let bytes = patched.bytes();
        // No call found (an object built without them): nothing may read
        // the field.
        let direct = skb_access.kfunc_id.is_some() && calls > 0;
        let checksum_field = if direct {
            skb_access.checksum_field
        } else {
            SkbChecksumField::UNKNOWN
        };
        let pin_dir = options.pin_dir.clone();
        let map_pins: Vec<(&str, PathBuf)> = match &pin_dir {
            Some(dir) => {
                ensure_bpffs(dir)?;
                maps::ALL_MAPS
                    .iter()
                    .map(|name| (*name, dir.join(name)))
                    .collect()
            }
            None => Vec::new(),
        };
        let max_entries = options.sizes.max_entries();
        let expected = map_pins::expected_layouts(bytes, &max_entries)?;
        let reconciled = match &pin_dir {
            Some(dir) => map_pins::reconcile_pins(dir, &map_pins, &expected, options.pin_policy)?,
            None => map_pins::Reconciled::default(),
        };
        // After the replaced pins are gone: what is not pinned now, this
        // load makes.
        let created_maps: Vec<&'static str> = maps::ALL_MAPS
            .into_iter()
            .filter(|name| {
                map_pins
                    .iter()
                    .all(|(pinned, path)| pinned != name || !path.exists())
            })
            .collect();
        for name in created_maps {
            if !created.contains(&name) {
                created.push(name);
            }
        }
        for replaced in &reconciled.replaced {
            if replaced.carried {
                tracing::warn!(
                    map = %replaced.map,
                    "pinned map replaced ({}); its entries are carried into the new one under the same ids",
                    replaced.reason
                );
            } else {
                tracing::warn!(
                    map = %replaced.map,
                    "pinned map replaced ({}); its contents are made afresh",
                    replaced.reason
                );
            }
        }
        if reconciled.carry.is_some() {
            // Not empty, then: the agent adopts what it holds.
            created.retain(|name| *name != maps::BACKENDS_MAP);
        }
        let created_maps = created.clone();
        let mut loader = EbpfLoader::new();
        for (name, max) in max_entries {
            loader.map_max_entries(name, max);
        }
        let hz = clock::hz().map_err(|e| LoaderError::KernelFeature {
            kernel: KernelVersion::current()
                .map(|v| v.to_string())
                .unwrap_or_else(|_| "?".into()),
            feature: "the jiffies clock (bpf_jiffies64 run with BPF_PROG_TEST_RUN)",
            hint: e.to_string(),
        })?;
        let lifetimes = options.ct_timeouts.in_ticks(hz);
        loader.override_global(LIFETIMES_GLOBAL, &lifetimes, true);
        let feature_bits = match options.feature_bits {
            Some(bits) => bits,
            None => {
                let wants = features::Wants {
                    tc_mode: TcMode::Auto,
                    socket_lb: false,
                };
                features::plan(probe::kernel(), wants)
                    .map_err(|missing| LoaderError::KernelFeature {
                        kernel: missing.kernel.clone(),
                        feature: missing.feature.name,
                        hint: missing.to_string(),
                    })?
                    .feature_bits
            }
        };
        loader.override_global(
            datapath_common::features::FEATURES_GLOBAL,
            &feature_bits,
            true,
        );
        loader.override_global(SOCK_LB_SCOPE_GLOBAL, &options.sock_lb_scope, true);
        let serves_ipv6 = u32::from(options.sizes.ipv6);
        loader.override_global(SOCK_LB_IPV6_GLOBAL, &serves_ipv6, true);
        loader.override_global(SKB_CHECKSUM_GLOBAL, &checksum_field, true);
        let log_level = options.datapath_log.aya_level();
        loader.override_global(aya_log::LEVEL, &log_level, true);
        for (name, path) in &map_pins {
            loader.map_pin_path(name, path.as_path());
        }
        let jumps_pin = match &pin_dir {
            Some(dir) => Some(jump_table_pin(dir)?),
            None => None,
        };
        if let Some(path) = &jumps_pin {
            loader.map_pin_path(datapath_common::jumps::TC_JUMPS_MAP, path.as_path());
        }
        let mut ebpf = loader.load(bytes)?;
        if let Some(carry) = &reconciled.carry {
            // At once, before any program could read the new map (and
            // before a program load that may fail: a retry finds the new
            // map pinned, and nothing else to carry).
            carry_backends(&ebpf, &carry.entries)?;
        }
        if let Some(dir) = &pin_dir {
            // The pins now hold this version's layouts (made, replaced or
            // adopted as matching).
            map_pins::mark_layouts(dir)?;
        }
        if let Some(carry) = &reconciled.carry {
            carry.done().map_err(|e| LoaderError::Pin {
                path: carry.pin.clone(),
                reason: format!("removing the map whose entries were carried: {e}"),
            })?;
        }
        for name in object::TC_JUMP_TARGETS
            .map(|(_, name)| name)
            .into_iter()
            .chain([object::TC_EGRESS, object::TC_INGRESS])
        {
            sched_classifier(&mut ebpf, name)?
                .load()
                .map_err(|source| LoaderError::program(name, source))?;
        }
        fill_jumps(&mut ebpf)?;
        for name in object::SOCK_PROGRAMS {
            sock_program(&mut ebpf, name)?
                .load()
                .map_err(|source| LoaderError::program(name, source))?;
        }
        xdp_program(&mut ebpf, object::XDP_UPLINK)?
            .load()
            .map_err(|source| LoaderError::program(object::XDP_UPLINK, source))?;
        if let Some(dir) = &pin_dir {
            // The TC pair, for the CNI plugin to attach without loading
            // and verifying the object on every pod start: pinned here
            // where none are; the agent replaces an earlier agent's once
            // its maps are filled (`pin_tc_programs`).
            pin_programs(&mut ebpf, dir, false)?;
        }
        let maps = DatapathMaps::take_from(&mut ebpf)?;
        Ok(Self {
            ebpf,
            pin_dir,
            datapath_log: options.datapath_log,
            maps,
            created_maps,
            l4_checksums: if direct {
                L4Checksums::Direct
            } else {
                L4Checksums::Helpers
            },
        })
    }

    /// True when this load made the service maps (`SERVICES`, `BACKENDS`,
    /// `REVERSE_NAT`) rather than adopting pinned ones: there is nothing
    /// in them to adopt (`Reconciler::new_on_empty`), and reading the
    /// arrays to find that out costs ~0.3 s at a million backends.
    pub fn made_the_service_maps(&self) -> bool {
        [
            maps::SERVICES_MAP,
            maps::BACKENDS_MAP,
            maps::REVERSE_NAT_MAP,
        ]
        .iter()
        .all(|name| self.created_maps.contains(name))
    }

    /// The kernel's ids of our TC programs (egress, ingress): what an
    /// interface carrying our pair has attached.
    pub fn tc_program_ids(&mut self) -> Result<(u32, u32), LoaderError> {
        let mut id = |name: &'static str| {
            sched_classifier(&mut self.ebpf, name)?
                .info()
                .map(|info| info.id())
                .map_err(|source| LoaderError::program(name, source))
        };
        Ok((id(object::TC_EGRESS)?, id(object::TC_INGRESS)?))
    }

    /// Pins this datapath's TC pair for the CNI plugin, replacing an
    /// earlier one (each pin atomically). The agent calls it after its
    /// first full sync, so that pods started meanwhile get programs whose
    /// maps are filled: the earlier agent's, until then.
    pub fn pin_tc_programs(&mut self) -> Result<(), LoaderError> {
        match self.pin_dir.clone() {
            Some(dir) => pin_programs(&mut self.ebpf, &dir, true),
            None => Ok(()),
        }
    }

    pub fn pin_dir(&self) -> Option<&Path> {
        self.pin_dir.as_deref()
    }

    /// The loaded program `name`, for BPF_PROG_TEST_RUN.
    pub fn classifier(&mut self, name: &'static str) -> Result<&mut SchedClassifier, LoaderError> {
        sched_classifier(&mut self.ebpf, name)
    }
}

/// Writes `entries` (a replaced `BACKENDS` map's, by id) into the
/// `BACKENDS` of `ebpf`. Every id fits (`map_pins` carries only then); one
/// that would not (a map another loader made smaller meanwhile) is
/// refused by the kernel and stops the load.
fn carry_backends(
    ebpf: &aya::Ebpf,
    entries: &[datapath_common::maps::Backend],
) -> Result<(), LoaderError> {
    use std::os::fd::{AsFd, AsRawFd};
    let map_err = |source| LoaderError::map(maps::BACKENDS_MAP, source);
    let invalid = || {
        map_err(aya::maps::MapError::InvalidName {
            name: maps::BACKENDS_MAP.into(),
        })
    };
    let Some(aya::maps::Map::Array(data)) = ebpf.map(maps::BACKENDS_MAP) else {
        return Err(invalid());
    };
    let (ids, values): (Vec<u32>, Vec<_>) = entries
        .iter()
        .enumerate()
        .filter(|(_, backend)| backend.is_present())
        .map(|(id, backend)| (id as u32, *backend))
        .unzip();
    crate::bpfsys::update_batch(data.fd().as_fd().as_raw_fd(), &ids, &values).map_err(
        |(_, io_error)| {
            map_err(aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_update_batch",
                io_error,
            }))
        },
    )
}

/// Puts the IPv6 programs in the TC pair's jump table
/// (`datapath_common::jumps`).
fn fill_jumps(ebpf: &mut aya::Ebpf) -> Result<(), LoaderError> {
    use datapath_common::jumps::TC_JUMPS_MAP;
    let mut targets = Vec::new();
    for (slot, name) in object::TC_JUMP_TARGETS {
        let fd = sched_classifier(ebpf, name)?
            .fd()
            .and_then(|fd| fd.try_clone().map_err(Into::into))
            .map_err(|source| LoaderError::program(name, source))?;
        targets.push((slot, fd));
    }
    let map = ebpf.map_mut(TC_JUMPS_MAP).ok_or_else(|| {
        LoaderError::map(
            TC_JUMPS_MAP,
            aya::maps::MapError::InvalidName {
                name: TC_JUMPS_MAP.into(),
            },
        )
    })?;
    let mut jumps = aya::maps::ProgramArray::try_from(map)
        .map_err(|source| LoaderError::map(TC_JUMPS_MAP, source))?;
    for (slot, fd) in &targets {
        jumps
            .set(*slot, fd, 0)
            .map_err(|source| LoaderError::map(TC_JUMPS_MAP, source))?;
    }
    Ok(())
}
