//! The agent suites' fixture: the agent as a separate process in
//! `--from-dir` mode, its pins and manifest folder (removed on drop, also
//! when a test fails), the manifests they write, and `EchoLab`, the
//! topology with echo servers most agent tests start from.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use datapath_user::attach::pinned_tc_links;
use lab::{Topology, standard_pods, workload};

pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 7, 7);
pub const TARGET: u16 = 8080;
pub const TIMEOUT: Duration = Duration::from_secs(2);

pub fn manifest(backends: &[Ipv4Addr]) -> String {
    let mut text = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: echo, namespace: e2e}}\nspec:\n  clusterIP: {VIP}\n  ports: [{{name: http, port: 80, targetPort: {TARGET}}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: echo-1\n  namespace: e2e\n  labels: {{kubernetes.io/service-name: echo}}\naddressType: IPv4\nports: [{{name: http, port: {TARGET}}}]\nendpoints:\n"
    );
    for address in backends {
        text += &format!("- addresses: [{address}]\n  conditions: {{ready: true}}\n");
    }
    text
}

/// Writes `text` to `path` atomically (as kubectl/ConfigMaps do), so the
/// agent never reads half a file.
pub fn write_atomically(path: &Path, text: &str) {
    let temp = path.with_extension("tmp");
    std::fs::write(&temp, text).unwrap();
    std::fs::rename(&temp, path).unwrap();
}

pub struct Agent {
    child: Child,
    pub metrics: SocketAddrV4,
}

impl Agent {
    /// The TC path only (`--no-socket-lb`).
    pub fn start(pin_dir: &Path, dir: &Path, netns_filter: &str) -> Self {
        Self::start_with(pin_dir, dir, netns_filter, &["--no-socket-lb"])
    }

    /// With `socket_lb` instead of the default `--no-socket-lb`: e.g.
    /// `--cgroup <dir>` to put socket-LB on a test cgroup only.
    pub fn start_with(pin_dir: &Path, dir: &Path, netns_filter: &str, socket_lb: &[&str]) -> Self {
        Self::spawn(pin_dir, dir, netns_filter, socket_lb, Stdio::inherit())
    }

    /// As `start_with`, its log (stderr) written to `stderr`.
    pub fn spawn(
        pin_dir: &Path,
        dir: &Path,
        netns_filter: &str,
        socket_lb: &[&str],
        stderr: Stdio,
    ) -> Self {
        let agent = Self::spawn_unready(pin_dir, dir, netns_filter, socket_lb, stderr);
        agent.wait_ready();
        agent
    }

    /// As `spawn`, without waiting until it is ready.
    pub fn spawn_unready(
        pin_dir: &Path,
        dir: &Path,
        netns_filter: &str,
        socket_lb: &[&str],
        stderr: Stdio,
    ) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let metrics = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
        let child = Command::new(env!("CARGO_BIN_EXE_underpass"))
            .args(["agent", "--pin-dir"])
            .arg(pin_dir)
            .arg("--from-dir")
            .arg(dir)
            .args(["--dir-poll-ms", "50", "--netns-poll-ms", "50"])
            .args(["--netns-filter", netns_filter])
            .args(socket_lb)
            .args(["--metrics-address", &metrics.to_string()])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("starting underpass agent");
        Self { child, metrics }
    }

    pub fn get(&self, path: &str) -> Option<String> {
        let mut stream = TcpStream::connect_timeout(&self.metrics.into(), TIMEOUT).ok()?;
        write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        Some(response)
    }

    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self
                .get("/readyz")
                .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("agent not ready within 20 s");
    }

    /// SIGTERM, as a DaemonSet rollout sends.
    pub fn stop(mut self) {
        // SAFETY: kill on our child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        assert!(status.success(), "agent exited with {status}");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Removes the pins (maps and links) on drop, also when a test fails.
pub struct PinDir(pub PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        for (netns, iface) in pinned_tc_links(&self.0) {
            let _ = datapath_user::loader::detach_pinned_tc(&self.0, Some(&netns), &iface);
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if condition() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting until {what}");
}

pub fn ask_service(topo: &Topology) -> std::io::Result<String> {
    let target = SocketAddrV4::new(VIP, 80);
    topo.pod("client")
        .namespace
        .run(|| workload::tcp_request(target, TIMEOUT))
        .unwrap()
        .map(|a| a.server)
}

/// A test's manifest directory, removed on drop (also when the test
/// fails).
pub struct ManifestDir(PathBuf);

impl std::ops::Deref for ManifestDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for ManifestDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for ManifestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn tempdir(prefix: &str) -> ManifestDir {
    let dir = std::env::temp_dir().join(format!("{prefix}-manifests"));
    std::fs::create_dir_all(&dir).unwrap();
    ManifestDir(dir)
}

pub fn drain_manifest(endpoints: &[(Ipv4Addr, &str)]) -> String {
    let mut text = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: drain, namespace: e2e}}\nspec:\n  clusterIP: {VIP}\n  ports:\n  - {{name: http, port: 80, targetPort: {TARGET}}}\n  - {{name: dns, port: 53, protocol: UDP, targetPort: 5353}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: drain-1\n  namespace: e2e\n  labels: {{kubernetes.io/service-name: drain}}\naddressType: IPv4\nports:\n- {{name: http, port: {TARGET}}}\n- {{name: dns, port: 5353, protocol: UDP}}\nendpoints:"
    );
    if endpoints.is_empty() {
        text += " []\n";
    }
    for (address, conditions) in endpoints {
        text += &format!("\n- addresses: [{address}]\n  conditions: {conditions}");
    }
    text + "\n"
}

/// The datapath counter `event` as the agent's /metrics reports it.
pub fn datapath_event(metrics: &str, event: &str) -> u64 {
    let series = format!("datapath_events_total{{event=\"{event}\"}}");
    metrics
        .lines()
        .find(|l| l.contains(&series))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {event} counter in {metrics}"))
}

/// The standard topology with a TCP echo server (named after its pod)
/// at [`TARGET`] on each of `servers`, its pin directory and manifest
/// folder (both removed on drop), and `echo.yaml` listing those servers
/// as the endpoints of [`VIP`]:80.
pub struct EchoLab {
    pub topo: Topology,
    pub pins: PinDir,
    pub dir: ManifestDir,
    _servers: Vec<workload::Server>,
}

impl EchoLab {
    pub fn new(servers: &[&str]) -> Self {
        let topo = Topology::build(&standard_pods()).expect("building the topology");
        let running = servers
            .iter()
            .map(|role| {
                let pod = topo.pod(role);
                workload::tcp_server(&pod.namespace, pod.address, TARGET, role).unwrap()
            })
            .collect();
        let pins = PinDir(PathBuf::from(format!("/sys/fs/bpf/{}", topo.prefix)));
        let dir = tempdir(&topo.prefix);
        let backends: Vec<Ipv4Addr> = servers.iter().map(|r| topo.pod(r).address).collect();
        write_atomically(&dir.join("echo.yaml"), &manifest(&backends));
        Self {
            topo,
            pins,
            dir,
            _servers: running,
        }
    }

    /// The agent's namespace filter for the client pod(s).
    pub fn client_filter(&self) -> String {
        format!("{}-client*", self.topo.prefix)
    }

    /// An agent on the TC path only, attaching to the client.
    pub fn agent(&self) -> Agent {
        Agent::start(&self.pins.0, &self.dir, &self.client_filter())
    }

    /// An agent with `args` instead of `--no-socket-lb`.
    pub fn agent_with(&self, args: &[&str]) -> Agent {
        Agent::start_with(&self.pins.0, &self.dir, &self.client_filter(), args)
    }

    /// Waits until the agent pinned the pair on the client's eth0.
    pub fn wait_client_attached(&self) {
        let client = self.topo.pod("client").namespace.name().to_owned();
        wait_until("the client's eth0 is attached", || {
            pinned_tc_links(&self.pins.0).contains(&(client.clone(), "eth0".into()))
        });
    }

    /// One request from the client to the service; the answering server.
    pub fn ask(&self) -> std::io::Result<String> {
        ask_service(&self.topo)
    }
}
