//! `underpass-lab probe` run as a pod's process: inside a namespace and
//! a cgroup (socket-LB only sees processes in its cgroup), reporting each
//! request as a JSON line.

use std::{
    io::{self, BufRead, BufReader, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
};

use super::{Answer, ProbeKind};

/// The `underpass-lab` binary that runs probes: `$UNDERPASS_LAB` when
/// set, this process itself when it is that binary (the demo), else the
/// one beside it or one directory up (a test executable lives in
/// `target/<profile>/deps/`, the binary in `target/<profile>/`). `cargo
/// xtask test` builds it before the suites; `cargo test -p datapath-user`
/// alone does not (build it with `cargo build -p lab`).
pub fn probe_binary() -> io::Result<PathBuf> {
    const NAME: &str = "underpass-lab";
    if let Some(path) = std::env::var_os("UNDERPASS_LAB") {
        return Ok(PathBuf::from(path));
    }
    let me = std::env::current_exe()?;
    if me.file_name().is_some_and(|n| n == NAME) {
        return Ok(me);
    }
    me.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(NAME))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "{NAME} not found beside {} (nor UNDERPASS_LAB set): build it with \
                     `cargo build -p lab` (`cargo xtask test` does)",
                    me.display()
                ),
            )
        })
}

/// `underpass-lab probe` with its common flags.
fn probe_command(
    netns: &Path,
    cgroup: Option<&Path>,
    kind: ProbeKind,
    target: SocketAddr,
) -> io::Result<Command> {
    let mut cmd = Command::new(probe_binary()?);
    cmd.arg("probe")
        .arg("--netns")
        .arg(netns)
        .args(["--target", &target.to_string()])
        .args(["--protocol", kind.arg(), "--timeout-ms", "1500"]);
    if let Some(cgroup) = cgroup {
        cmd.arg("--cgroup").arg(cgroup);
    }
    Ok(cmd)
}

/// An `underpass-lab probe --hold` process: one socket inside a namespace and
/// cgroup (so socket-LB sees it as a pod's process), asked on demand.
/// Killed on drop.
pub struct HeldProbe {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl HeldProbe {
    pub fn spawn(
        netns: &Path,
        cgroup: Option<&Path>,
        kind: ProbeKind,
        target: impl Into<SocketAddr>,
    ) -> io::Result<Self> {
        let mut child = probe_command(netns, cgroup, kind, target.into())?
            .arg("--hold")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        Ok(Self {
            child,
            stdin,
            stdout,
        })
    }

    /// Asks once on the held socket.
    pub fn ask(&mut self) -> io::Result<ProbeResult> {
        writeln!(self.stdin)?;
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            return Err(io::Error::other("the probe process exited"));
        }
        parse_probe_line(&line)
    }
}

impl Drop for HeldProbe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a probe process reported for one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeResult {
    Answer(Answer),
    Failed { error: String, errno: Option<i32> },
}

/// Runs `underpass-lab probe` inside `netns` and `cgroup`, the way a
/// pod's process would run under socket-LB, and collects its results.
pub fn probe_process(
    netns: &Path,
    cgroup: Option<&Path>,
    kind: ProbeKind,
    target: impl Into<SocketAddr>,
    count: u32,
) -> io::Result<Vec<ProbeResult>> {
    probe_process_with(netns, cgroup, kind, target, count, &[])
}

/// `probe_process` with more `probe` flags (e.g. `--ipv4-mapped`).
pub fn probe_process_with(
    netns: &Path,
    cgroup: Option<&Path>,
    kind: ProbeKind,
    target: impl Into<SocketAddr>,
    count: u32,
    extra: &[&str],
) -> io::Result<Vec<ProbeResult>> {
    let output = probe_command(netns, cgroup, kind, target.into())?
        .args(["--count", &count.to_string()])
        .args(extra)
        .output()?;
    if !output.status.success() {
        return Err(io::Error::other(format!(
            "probe failed: {}",
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(parse_probe_line)
        .collect()
}

/// One JSON line of `probe`'s output.
fn parse_probe_line(line: &str) -> io::Result<ProbeResult> {
    let value: serde_json::Value = serde_json::from_str(line).map_err(io::Error::other)?;
    Ok(match (value["server"].as_str(), value["peer"].as_str()) {
        (Some(server), Some(peer)) => ProbeResult::Answer(Answer {
            server: server.to_owned(),
            peer: peer.parse().map_err(io::Error::other)?,
        }),
        _ => ProbeResult::Failed {
            error: value["error"].as_str().unwrap_or("?").to_owned(),
            errno: value["errno"].as_i64().map(|e| e as i32),
        },
    })
}
