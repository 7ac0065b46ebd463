//! `underpass cni`: a chained CNI plugin (spec 1.0.0) that attaches the TC
//! pair when the runtime creates a pod and removes it when the pod goes.
//! It never changes the network: `prevResult` is passed through as is.
//!
//! The runtime runs it with CNI_COMMAND, CNI_NETNS, CNI_IFNAME… in the
//! environment and the network configuration on stdin.

use std::{
    collections::HashMap,
    io::Read,
    path::{Path, PathBuf},
};

use serde_json::{Value, json};

use crate::{Datapath, LoadOptions, TcMode, loader, pod_tc::PodTcPolicy};

pub const SUPPORTED_VERSIONS: [&str; 3] = ["0.4.0", "1.0.0", "1.1.0"];

/// A CNI error result (spec §Error): printed on stdout, exit status 1.
#[derive(Debug)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    pub fn to_json(&self, version: &str) -> Value {
        json!({"cniVersion": version, "code": self.code, "msg": self.msg, "details": self.details})
    }
}

// Well-known error codes from the spec.
const INCOMPATIBLE_VERSION: u32 = 1;
const INVALID_ENVIRONMENT: u32 = 4;
const IO_FAILURE: u32 = 5;
const DECODE_FAILURE: u32 = 6;
const INVALID_NETWORK_CONFIG: u32 = 7;
const TRY_AGAIN_LATER: u32 = 11;
/// Plugin-specific codes start at 100.
const ATTACH_FAILED: u32 = 100;
const NOT_ATTACHED: u32 = 101;

/// Runs one CNI command. Returns what to print on stdout; Err is printed
/// as a CNI error and makes the process exit 1.
pub fn run(
    env: &HashMap<String, String>,
    stdin: &str,
    pin_dir: &Path,
) -> Result<Option<Value>, (String, CniError)> {
    let command = env.get("CNI_COMMAND").map(String::as_str).unwrap_or("");
    if command == "VERSION" {
        return Ok(Some(json!({
            "cniVersion": "1.0.0",
            "supportedVersions": SUPPORTED_VERSIONS,
        })));
    }
    let config: Value = serde_json::from_str(stdin).map_err(|e| {
        (
            "1.0.0".to_owned(),
            CniError::new(
                DECODE_FAILURE,
                "network configuration is not JSON",
                e.to_string(),
            ),
        )
    })?;
    let version = config
        .get("cniVersion")
        .and_then(Value::as_str)
        .unwrap_or("1.0.0")
        .to_owned();
    let fail = |e: CniError| (version.clone(), e);
    if !SUPPORTED_VERSIONS.contains(&version.as_str()) {
        return Err(fail(CniError::new(
            INCOMPATIBLE_VERSION,
            format!("cniVersion {version} is not supported"),
            format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
        )));
    }
    let var = |name: &str| {
        env.get(name)
            .filter(|v| !v.is_empty())
            .cloned()
            .ok_or_else(|| {
                fail(CniError::new(
                    INVALID_ENVIRONMENT,
                    format!("{name} is not set"),
                    "the container runtime sets it; see the CNI spec",
                ))
            })
    };
    let pin_dir = config
        .get("pinDir")
        .and_then(Value::as_str)
        .map(PathBuf::from)
        .unwrap_or_else(|| pin_dir.to_owned());
    match command {
        "ADD" => {
            let netns = var("CNI_NETNS")?;
            let ifname = var("CNI_IFNAME")?;
            // A chained plugin only adds to what the interface plugin made;
            // without its result there is nothing to hand on (the
            // reference chained plugins refuse the same way).
            let Some(previous) = config.get("prevResult").filter(|p| p.is_object()).cloned() else {
                return Err(fail(CniError::new(
                    INVALID_NETWORK_CONFIG,
                    "prevResult is missing (or not an object): underpass is a chained plugin",
                    "list it after the interface plugin (macvlan, ipvlan, sriov) in the conflist",
                )));
            };
            if wants_tc(&pin_dir, &netns) {
                let attached = attach(&pin_dir, &netns, &ifname).map_err(fail)?;
                attached.keep();
            }
            // Chained plugin: hand the previous result on unchanged.
            let mut result = previous;
            if let Some(object) = result.as_object_mut() {
                object.insert("cniVersion".into(), Value::String(version.clone()));
            }
            Ok(Some(result))
        }
        "DEL" => {
            // DEL must succeed when things are already gone (the netns may
            // be deleted before us).
            let ifname = var("CNI_IFNAME")?;
            if let Some(netns) = env.get("CNI_NETNS").filter(|v| !v.is_empty()) {
                loader::detach_pinned_tc(&pin_dir, Some(netns), &ifname).map_err(|e| {
                    fail(CniError::new(
                        IO_FAILURE,
                        "removing the TC pins",
                        e.to_string(),
                    ))
                })?;
            }
            Ok(None)
        }
        "CHECK" => {
            let netns = var("CNI_NETNS")?;
            let ifname = var("CNI_IFNAME")?;
            if !wants_tc(&pin_dir, &netns) {
                // Socket-LB translates this pod: no pair to check.
                return Ok(None);
            }
            let label = loader::netns_label(Some(&netns));
            let base = pin_dir.join("links/tc").join(&label).join(&ifname);
            for direction in ["egress", "ingress"] {
                if !base.join(direction).exists() {
                    return Err(fail(CniError::new(
                        NOT_ATTACHED,
                        format!("{direction} program not attached to {ifname} in {netns}"),
                        format!("no pin at {}", base.join(direction).display()),
                    )));
                }
            }
            Ok(None)
        }
        other => Err(fail(CniError::new(
            INVALID_ENVIRONMENT,
            format!("unknown CNI_COMMAND {other:?}"),
            "expected ADD, DEL, CHECK or VERSION",
        ))),
    }
}

/// Whether the pod in `netns` gets the TC pair, by the agent's policy
/// in `pin_dir` (`crate::pod_tc`): not when socket-LB translates it. No
/// policy yet (no agent has run): it does.
/// A policy it cannot read (another version's marker) gives the pair: the
/// safe side, and no pod is blocked for it.
fn wants_tc(pin_dir: &Path, netns: &str) -> bool {
    match PodTcPolicy::load(pin_dir) {
        Ok(policy) => policy.is_none_or(|p| p.wants_tc(&loader::netns_label(Some(netns)))),
        Err(e) => {
            tracing::warn!("reading the agent's pod TC policy: {e}; attaching the TC pair");
            true
        }
    }
}

/// Attaches the TC pair to `ifname` in `netns`: the programs an agent
/// pinned when there are some (no object load, no verification: the
/// common case, and cheap), else the object loaded here (the first pod on
/// a node whose agent has not started yet), which pins them for the next.
fn attach(pin_dir: &Path, netns: &str, ifname: &str) -> Result<loader::TcAttachment, CniError> {
    let attach_failed = |e: loader::LoaderError| {
        CniError::new(
            ATTACH_FAILED,
            format!("attaching to {ifname} in {netns}"),
            e.to_string(),
        )
    };
    let pinned = loader::PinnedTcPrograms::open(pin_dir).map_err(|e| {
        CniError::new(
            TRY_AGAIN_LATER,
            "opening the pinned TC programs",
            e.to_string(),
        )
    })?;
    // TCX where the kernel has it (pinned, so the pod keeps its programs
    // across agent restarts), else clsact.
    if let Some(mut programs) = pinned {
        return programs
            .attach_tc(Some(netns), ifname, TcMode::Auto)
            .map_err(attach_failed);
    }
    let options = LoadOptions {
        pin_dir: Some(pin_dir.to_owned()),
        ..LoadOptions::default()
    };
    let mut datapath = Datapath::load(&options).map_err(|e| {
        CniError::new(
            TRY_AGAIN_LATER,
            "loading the underpass datapath",
            e.to_string(),
        )
    })?;
    datapath
        .attach_tc(Some(netns), ifname, TcMode::Auto)
        .map_err(attach_failed)
}

/// The `underpass cni` entry point: environment and stdin in, JSON out.
pub fn main(pin_dir: &Path) -> i32 {
    let env: HashMap<String, String> = std::env::vars().collect();
    let mut stdin = String::new();
    if env.get("CNI_COMMAND").map(String::as_str) != Some("VERSION") {
        let _ = std::io::stdin().read_to_string(&mut stdin);
    }
    match run(&env, &stdin, pin_dir) {
        Ok(Some(result)) => {
            println!("{result}");
            0
        }
        Ok(None) => 0,
        Err((version, error)) => {
            println!("{}", error.to_json(&version));
            1
        }
    }
}
