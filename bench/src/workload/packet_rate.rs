//! The packet-rate workload: small UDP datagrams sent as fast as one CPU
//! can (`sendmmsg`, batches of [`BATCH`]), and the packets that arrived
//! counted where they end — a packet generator for a kernel without
//! pktgen. The sender and the kernel's softirq work for what it sends
//! share the sending CPU (a veth hands frames to its peer on the
//! sender's CPU), so a datapath that costs more per packet leaves the
//! sender fewer packets: the figure is packets per second of one CPU.
//!
//! What is counted is read from the kernel, not from the sender: the
//! datagrams that reached the UDP layer of the backend's namespace
//! (`Udp: InDatagrams + RcvbufErrors`: arrived, whether or not the sink
//! kept up), or, where nothing reaches a socket (the `XDP_DROP`
//! ceiling), the frames a node's device received.

use std::{
    fs,
    net::{SocketAddr, UdpSocket},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::{CpuPlaces, Kind, Measurement, Parameters};

/// Payload of every datagram: with UDP, IPv4 and Ethernet headers a
/// 60-byte frame, 64 on a real wire with its FCS — the smallest there is.
pub const PAYLOAD: usize = 18;
/// Datagrams per `sendmmsg` call.
const BATCH: usize = 64;
/// The device standing for a node's NIC (the topology's wire).
const WIRE: &str = "wire";
/// How long queued frames take to land: a veth's ring and a socket's
/// buffer empty in well under a millisecond at these rates.
const DRAIN: Duration = Duration::from_millis(50);

/// Where the packets that arrived are counted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Arrivals {
    /// Datagrams that reached the UDP layer of the namespace at this
    /// path (the backend pod's).
    UdpIn(PathBuf),
    /// Frames the device `wire` received in the namespace at this path
    /// (a node's, whose XDP program drops them all).
    WireReceived(PathBuf),
}

impl Arrivals {
    /// Reads the counter from inside its namespace (on a thread of its
    /// own, which is why `/proc/thread-self`).
    fn read(&self) -> Result<u64> {
        let (netns, what) = match self {
            Arrivals::UdpIn(netns) => (netns, "Udp InDatagrams + RcvbufErrors"),
            Arrivals::WireReceived(netns) => (netns, "the wire's received packets"),
        };
        let text = datapath_user::netns::run_in(Some(netns), || {
            let file = match self {
                Arrivals::UdpIn(_) => "/proc/thread-self/net/snmp",
                Arrivals::WireReceived(_) => "/proc/thread-self/net/dev",
            };
            fs::read_to_string(file)
        })
        .and_then(|read| read)
        .with_context(|| format!("reading {what} in {}", netns.display()))?;
        let value = match self {
            Arrivals::UdpIn(_) => udp_arrivals(&text),
            Arrivals::WireReceived(_) => device_received(&text, WIRE),
        };
        value.with_context(|| format!("no {what} in {}", netns.display()))
    }

    /// As `bench worker` takes it: `udp:<path>` or `wire:<path>`.
    pub fn arg(&self) -> String {
        match self {
            Arrivals::UdpIn(p) => format!("udp:{}", p.display()),
            Arrivals::WireReceived(p) => format!("wire:{}", p.display()),
        }
    }

    pub fn parse(value: &str) -> Result<Self, String> {
        match value.split_once(':') {
            Some(("udp", path)) => Ok(Arrivals::UdpIn(path.into())),
            Some(("wire", path)) => Ok(Arrivals::WireReceived(path.into())),
            _ => Err(format!(
                "{value:?}: expected udp:<netns path> (datagrams at the UDP layer) or \
                 wire:<netns path> (frames the wire received)"
            )),
        }
    }
}

/// `InDatagrams + RcvbufErrors` of `/proc/net/snmp`'s `Udp:` lines (a
/// header line of names, then one of values).
fn udp_arrivals(snmp: &str) -> Option<u64> {
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let names: Vec<&str> = udp.next()?.split_whitespace().collect();
    let values: Vec<&str> = udp.next()?.split_whitespace().collect();
    let field = |name: &str| -> Option<u64> {
        let at = names.iter().position(|n| *n == name)?;
        values.get(at)?.parse().ok()
    };
    Some(field("InDatagrams")? + field("RcvbufErrors")?)
}

/// Received packets of `device` in `/proc/net/dev` ("  wire: bytes
/// packets …").
fn device_received(dev: &str, device: &str) -> Option<u64> {
    dev.lines().find_map(|line| {
        let (name, counters) = line.split_once(':')?;
        if name.trim() != device {
            return None;
        }
        counters.split_whitespace().nth(1)?.parse().ok()
    })
}

/// Sends [`PAYLOAD`]-byte datagrams to `target` for `run.seconds` after
/// a warm-up, counting arrivals at `arrivals`; CPU read from `places`.
pub fn measure_packet_rate(
    target: SocketAddr,
    run: &Parameters,
    places: &CpuPlaces,
    arrivals: &Arrivals,
) -> Result<Measurement> {
    let local: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let socket = UdpSocket::bind(local).context("binding the sender")?;
    socket
        .connect(target)
        .with_context(|| format!("connecting the sender to {target}"))?;
    let mut sender = Batch::new();
    let duration = Duration::from_secs_f64(run.seconds);
    // Warm-up (excluded): neighbours, conntrack entries, caches.
    let warmup = Instant::now() + Duration::from_millis(200).min(duration / 4);
    while Instant::now() < warmup {
        sender.send(&socket);
    }
    // The warm-up's last frames land before the count starts, so that
    // the window's arrivals are its own and its losses exact (below).
    std::thread::sleep(DRAIN);
    let before = arrivals.read()?;
    let cpu_start = places.snapshot()?;
    let started = Instant::now();
    let mut sent = 0u64;
    while started.elapsed() < duration {
        sent += sender.send(&socket);
    }
    let seconds = started.elapsed().as_secs_f64();
    // Frames still in a queue when the clock stopped land now; counting
    // them would count packets the window did not carry, so read at once.
    let after = arrivals.read()?;
    let cpu_end = places.snapshot()?;
    let arrived = after.saturating_sub(before);
    // What was still queued lands now: the rest of what was sent is lost.
    std::thread::sleep(DRAIN);
    let landed = arrivals.read()?.saturating_sub(before);
    if sent == 0 {
        bail!("the sender to {target} sent nothing (sendmmsg failed every time)");
    }
    Ok(Measurement {
        cpu: cpu_end.cost_since(&cpu_start, arrived as f64),
        kind: Kind::PacketRate,
        transactions: arrived,
        seconds,
        per_second: arrived as f64 / seconds,
        mean_us: None,
        p50_us: None,
        p99_us: None,
        // Sent in the window and never counted where they end: dropped
        // on the way (a queue overflowing, a frame refused).
        errors: sent.saturating_sub(landed),
    })
}

/// [`BATCH`] datagrams, ready for `sendmmsg` on a connected socket.
struct Batch {
    payload: [u8; PAYLOAD],
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
}

impl Batch {
    fn new() -> Box<Self> {
        let mut batch = Box::new(Self {
            payload: [0x5a; PAYLOAD],
            iovecs: Vec::with_capacity(BATCH),
            headers: Vec::with_capacity(BATCH),
        });
        // The iovecs point into the boxed payload, the headers into the
        // iovecs: neither moves once built (the Box and the Vecs'
        // capacities are fixed).
        let base = batch.payload.as_mut_ptr().cast();
        for _ in 0..BATCH {
            batch.iovecs.push(libc::iovec {
                iov_base: base,
                iov_len: PAYLOAD,
            });
        }
        for i in 0..BATCH {
            // SAFETY: an all-zero msghdr is valid (no name, no control).
            let mut header: libc::mmsghdr = unsafe { std::mem::zeroed() };
            header.msg_hdr.msg_iov = &mut batch.iovecs[i];
            header.msg_hdr.msg_iovlen = 1;
            batch.headers.push(header);
        }
        batch
    }

    /// One `sendmmsg`: the datagrams the kernel took (0 on an error, such
    /// as a full queue or an ICMP error reported on the socket).
    fn send(&mut self, socket: &UdpSocket) -> u64 {
        use std::os::fd::AsRawFd;
        // SAFETY: `headers` holds BATCH valid mmsghdrs whose iovecs point
        // into `payload`, all alive for the call.
        let sent = unsafe {
            libc::sendmmsg(
                socket.as_raw_fd(),
                self.headers.as_mut_ptr(),
                BATCH as u32,
                0,
            )
        };
        sent.max(0) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_counters_are_read_from_the_kernels_tables() {
        let snmp = "Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n\
                    Udp: 1000 3 7 0 7 0\n\
                    UdpLite: InDatagrams NoPorts\nUdpLite: 5 0\n";
        assert_eq!(udp_arrivals(snmp), Some(1007));
        let dev = "Inter-|   Receive\n face |bytes    packets errs\n\
                   \x20   lo: 0 0 0\n  wire: 6000 100 0 0\n";
        assert_eq!(device_received(dev, "wire"), Some(100));
        assert_eq!(device_received(dev, "eth0"), None);
        for arrivals in [
            Arrivals::UdpIn("/run/netns/a".into()),
            Arrivals::WireReceived("/run/netns/b".into()),
        ] {
            assert_eq!(Arrivals::parse(&arrivals.arg()), Ok(arrivals));
        }
        assert!(Arrivals::parse("/run/netns/a").is_err());
    }
}
