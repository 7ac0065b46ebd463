//! `underpass agent` run by a bench: the binary next to the bench's, a
//! free metrics port, and its pins (maps, links) removed when it goes.

use std::{
    ffi::OsStr,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use datapath_user::attach::pinned_tc_links;

/// The `underpass` binary: `explicit`, or the one next to this binary.
pub fn underpass_binary(explicit: Option<&Path>) -> Result<PathBuf> {
    let binary = match explicit {
        Some(path) => path.to_owned(),
        None => std::env::current_exe()?
            .parent()
            .context("locating the bench binary")?
            .join("underpass"),
    };
    ensure!(
        binary.exists(),
        "{} not found: `cargo xtask bench` builds it, or pass --underpass",
        binary.display()
    );
    Ok(binary)
}

pub struct AgentProcess {
    child: Child,
    pin_dir: PathBuf,
    pub metrics: SocketAddrV4,
}

impl AgentProcess {
    /// Starts `binary agent --pin-dir PIN --from-dir DIR ARGS…`.
    pub fn spawn<I, S>(binary: &Path, pin_dir: PathBuf, from_dir: &Path, args: I) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let metrics = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
        let child = Command::new(binary)
            .arg("agent")
            .arg("--pin-dir")
            .arg(&pin_dir)
            .arg("--from-dir")
            .arg(from_dir)
            .args(args)
            .args(["--metrics-address", &metrics.to_string()])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        lab::own_child(child.id());
        lab::own_pin_dir(&pin_dir);
        Ok(Self {
            child,
            pin_dir,
            metrics,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// One GET on the metrics address; "" when nothing answers.
    pub fn get(&self, path: &str) -> String {
        let mut response = String::new();
        if let Ok(mut stream) =
            TcpStream::connect_timeout(&self.metrics.into(), Duration::from_secs(1))
            && write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").is_ok()
        {
            let _ = stream.read_to_string(&mut response);
        }
        response
    }

    pub fn is_ready(&self) -> bool {
        self.get("/readyz").starts_with("HTTP/1.1 200")
    }

    /// Polls `condition` until it holds; fails if the agent exits first or
    /// `timeout` passes.
    pub fn wait_until(
        &mut self,
        timeout: Duration,
        what: &str,
        mut condition: impl FnMut(&Self) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if condition(self) {
                return Ok(());
            }
            ensure!(
                self.child.try_wait()?.is_none(),
                "underpass agent exited before {what}"
            );
            ensure!(
                Instant::now() < deadline,
                "underpass agent: not {what} within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, as a DaemonSet rollout sends; the pins stay until drop.
    pub fn stop(&mut self) {
        // SAFETY: kill on our child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        lab::disown_child(self.child.id());
        for (netns, iface) in pinned_tc_links(&self.pin_dir) {
            let _ = datapath_user::loader::detach_pinned_tc(&self.pin_dir, Some(&netns), &iface);
        }
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        lab::disown_pin_dir(&self.pin_dir);
    }
}

/// `underpass agent --from-dir` serving `services` to the pods named in
/// `tc_clients` (their `eth0`, whatever its kind, on the TC path) and to
/// `cgroup` (socket-LB), returned once ready and attached, with the
/// manifest folder it reads. Every TC client's role must start with
/// "client" (the agent's namespace filter is `<prefix>-client*`), so that
/// the other pods carry nothing of ours. With `ipv6`, the agent serves
/// IPv6 frontends too (`--ipv6 on`).
pub fn start_bench_agent(
    underpass: Option<&Path>,
    topo: &lab::Topology,
    cgroup: &lab::Cgroup,
    services: &[(
        k8s_openapi::api::core::v1::Service,
        k8s_openapi::api::discovery::v1::EndpointSlice,
    )],
    tc_clients: &[&str],
    ipv6: bool,
) -> Result<(AgentProcess, tempfile::TempDir)> {
    let binary = underpass_binary(underpass)?;
    let manifests = tempfile::Builder::new()
        .prefix("underpass-bench-")
        .tempdir()?;
    let mut text = String::new();
    for (service, slice) in services {
        text += &format!(
            "{}---\n{}---\n",
            serde_yaml::to_string(service)?,
            serde_yaml::to_string(slice)?
        );
    }
    std::fs::write(manifests.path().join("bench.yaml"), text)?;
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{}", topo.prefix));
    let clients: Vec<String> = tc_clients
        .iter()
        .map(|role| {
            assert!(role.starts_with("client"), "TC client {role}: not client*");
            topo.pod(role).namespace.name().to_owned()
        })
        .collect();
    let netns_filter = format!("{}-client*", topo.prefix);
    let cgroup_arg = cgroup.path().to_string_lossy().into_owned();
    let mut agent = AgentProcess::spawn(
        &binary,
        pin_dir,
        manifests.path(),
        // The agent's default polling (manifests 500 ms, namespaces 1 s):
        // its CPU is reported beside the figures and must be a real
        // agent's, not a bench-tuned one's.
        [
            "--netns-filter",
            &netns_filter,
            // A veth pod's eth0 too (the seed's Cilium row); the
            // macvlan client's coordinator veth stays bare.
            "--iface-name",
            "eth0",
            "--cgroup",
            &cgroup_arg,
            "--ipv6",
            if ipv6 { "on" } else { "off" },
        ],
    )?;
    agent.wait_until(Duration::from_secs(30), "ready and attached", |a| {
        let attached = pinned_tc_links(a.pin_dir());
        clients
            .iter()
            .all(|netns| attached.contains(&(netns.clone(), "eth0".to_owned())))
            && a.is_ready()
    })?;
    Ok((agent, manifests))
}
