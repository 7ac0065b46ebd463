//! Which pod interfaces get the TC pair.
//!
//! Socket-LB translates a pod's connections at `connect()`/`sendmsg()`:
//! its packets carry backend addresses from the first one, and the TC
//! pair would only look at each packet and let it pass — a few hundred
//! nanoseconds a packet in live traffic, where the programs' code and
//! maps are cold. So, as Cilium compiles per-packet load balancing out of
//! its pod programs when socket-LB covers every pod, the agent leaves a
//! pod that socket-LB translates without the pair, and gives it to the
//! pods socket-LB leaves to TC. The CNI plugin reads the same policy from
//! the pin directory, so both decide alike: as a marker directory's name
//! (`pod-tc=every`, `pod-tc=skipped`, `pod-tc=skipped:<glob>`), since
//! bpffs holds no regular files (as `map_pins`' layout marker).
//!
//! A pod keeps the pair it has: attached pods are never detached by a
//! change of policy (their tracked flows would lose their translation).

use std::{fs, io, path::Path};

/// Marker directory names start so.
const MARKER: &str = "pod-tc=";
const EVERY: &str = "every";
const SKIPPED: &str = "skipped";
/// The longest `--socket-lb-skip-netns` a marker can hold (a name is at
/// most 255 bytes).
pub const MAX_SKIP_PATTERN: usize = 255 - MARKER.len() - SKIPPED.len() - 1;

/// Which pod interfaces get the TC pair.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum PodTcPolicy {
    /// Every pod interface (no socket-LB, or socket-LB for host processes
    /// only, or not known to cover the pods).
    #[default]
    Every,
    /// Only pods socket-LB leaves to TC: those whose namespace name
    /// matches `skip` (`--socket-lb-skip-netns`); socket-LB translates
    /// every other pod.
    SocketLbSkipped { skip: Option<glob::Pattern> },
}

impl PodTcPolicy {
    /// Whether the pod in namespace `netns_name` (the netns directory's
    /// entry, as pins are labelled) gets the TC pair.
    pub fn wants_tc(&self, netns_name: &str) -> bool {
        match self {
            PodTcPolicy::Every => true,
            PodTcPolicy::SocketLbSkipped { skip } => {
                skip.as_ref().is_some_and(|p| p.matches(netns_name))
            }
        }
    }

    /// Checks that the policy can be stored: a skip pattern fits a
    /// directory name. The error names the flag.
    pub fn check(&self) -> Result<(), String> {
        if let PodTcPolicy::SocketLbSkipped {
            skip: Some(pattern),
        } = self
        {
            let text = pattern.as_str();
            if text.len() > MAX_SKIP_PATTERN || text.contains('/') {
                return Err(format!(
                    "--socket-lb-skip-netns {text:?}: with --pod-tc auto or unless-socket-lb the pattern is kept as a directory name in the pin directory (for the CNI plugin), so at most {MAX_SKIP_PATTERN} bytes and no '/' (a namespace name has none); or use --pod-tc always"
                ));
            }
        }
        Ok(())
    }

    fn marker(&self) -> String {
        match self {
            PodTcPolicy::Every => format!("{MARKER}{EVERY}"),
            PodTcPolicy::SocketLbSkipped { skip: None } => format!("{MARKER}{SKIPPED}"),
            PodTcPolicy::SocketLbSkipped { skip: Some(p) } => {
                format!("{MARKER}{SKIPPED}:{}", p.as_str())
            }
        }
    }

    /// Marks `pin_dir` with this policy: the new marker first, then the
    /// others go (a reader in between sees both, and `load` then takes
    /// `Every`, the safe side).
    pub fn store(&self, pin_dir: &Path) -> io::Result<()> {
        self.check().map_err(io::Error::other)?;
        let marker = self.marker();
        match fs::create_dir(pin_dir.join(&marker)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        for name in markers(pin_dir)? {
            if name != marker {
                fs::remove_dir(pin_dir.join(name))?;
            }
        }
        Ok(())
    }

    /// The policy `pin_dir` is marked with; `None` when it has none (no
    /// agent has run: every pod gets the pair).
    pub fn load(pin_dir: &Path) -> io::Result<Option<Self>> {
        let mut found = None;
        for name in markers(pin_dir)? {
            let policy = parse(&name[MARKER.len()..]).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", pin_dir.join(&name).display()),
                )
            })?;
            // Two markers only while one replaces the other.
            found = Some(match found {
                Some(PodTcPolicy::Every) => PodTcPolicy::Every,
                _ if policy == PodTcPolicy::Every => PodTcPolicy::Every,
                _ => policy,
            });
        }
        Ok(found)
    }
}

fn parse(text: &str) -> Result<PodTcPolicy, String> {
    if text == EVERY {
        return Ok(PodTcPolicy::Every);
    }
    match text.strip_prefix(SKIPPED) {
        Some("") => Ok(PodTcPolicy::SocketLbSkipped { skip: None }),
        Some(rest) => {
            let pattern = rest
                .strip_prefix(':')
                .ok_or_else(|| format!("unknown policy {text:?}"))?;
            let skip = glob::Pattern::new(pattern).map_err(|e| format!("{pattern:?}: {e}"))?;
            Ok(PodTcPolicy::SocketLbSkipped { skip: Some(skip) })
        }
        None => Err(format!("unknown policy {text:?}")),
    }
}

/// The marker directories' names under `pin_dir` (none when it is missing).
fn markers(pin_dir: &Path) -> io::Result<Vec<String>> {
    let entries = match fs::read_dir(pin_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut names = Vec::new();
    for entry in entries {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.starts_with(MARKER) {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_skipped_pods_get_the_pair_when_socket_lb_covers_the_others() {
        let every = PodTcPolicy::Every;
        assert!(every.wants_tc("cni-1"));
        let none_skipped = PodTcPolicy::SocketLbSkipped { skip: None };
        assert!(!none_skipped.wants_tc("cni-1"));
        let some = PodTcPolicy::SocketLbSkipped {
            skip: Some(glob::Pattern::new("mesh-*").unwrap()),
        };
        assert!(some.wants_tc("mesh-a"));
        assert!(!some.wants_tc("cni-1"));
    }

    #[test]
    fn a_stored_policy_reads_back_the_same_and_a_missing_one_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(PodTcPolicy::load(dir.path()).unwrap(), None);
        for policy in [
            PodTcPolicy::Every,
            PodTcPolicy::SocketLbSkipped { skip: None },
            PodTcPolicy::SocketLbSkipped {
                skip: Some(glob::Pattern::new("mesh-*").unwrap()),
            },
        ] {
            policy.store(dir.path()).unwrap();
            assert_eq!(PodTcPolicy::load(dir.path()).unwrap(), Some(policy));
        }
        let names: Vec<String> = markers(dir.path()).unwrap();
        assert_eq!(names.len(), 1, "one marker at a time: {names:?}");
        fs::create_dir(dir.path().join("pod-tc=every")).unwrap();
        assert_eq!(
            PodTcPolicy::load(dir.path()).unwrap(),
            Some(PodTcPolicy::Every),
            "between two markers, every pod"
        );
        fs::create_dir(dir.path().join("pod-tc=sometimes")).unwrap();
        let error = PodTcPolicy::load(dir.path()).unwrap_err().to_string();
        assert!(error.contains("sometimes"), "{error}");
        let long = PodTcPolicy::SocketLbSkipped {
            skip: Some(glob::Pattern::new(&"a".repeat(MAX_SKIP_PATTERN + 1)).unwrap()),
        };
        assert!(long.check().unwrap_err().contains("--socket-lb-skip-netns"));
    }
}
