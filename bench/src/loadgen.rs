//! An open-loop HTTP/1.1 load generator (the seed's tcpkali / wrk2
//! role): requests leave on a timetable at a fixed rate over many
//! keep-alive connections, and each latency is taken from the request's
//! *scheduled* send time, so a slow response does not hide the requests
//! queued behind it (no coordinated omission). A request due while every
//! connection is busy waits for the first free one, its wait counted.
//!
//! One thread, epoll over non-blocking sockets plus a timerfd armed at the
//! next scheduled send (hrtimer precision, no busy polling: the machine's
//! other core serves the requests).

use std::{
    collections::VecDeque,
    io::{self, Read, Write},
    net::{SocketAddr, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// The percentiles reported, as quantiles.
pub const QUANTILES: [f64; 7] = [0.5, 0.9, 0.95, 0.99, 0.999, 0.9999, 0.99999];

/// What to run.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    pub target: SocketAddr,
    /// The request path (e.g. `/350`).
    pub path: String,
    /// Requests per second; `None` = closed loop (every connection sends
    /// again as soon as its response is in: the maximum rate).
    pub rate: Option<f64>,
    pub connections: usize,
    pub duration: Duration,
    /// Measured from the start but not recorded (connections warm,
    /// caches filled).
    pub warmup: Duration,
}

/// What a run measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoadResult {
    /// The scheduled rate (requests/s); absent for a closed-loop run.
    pub target_rate: Option<f64>,
    /// Responses per second over the recorded interval.
    pub achieved_rate: f64,
    pub requests: u64,
    /// Non-200 responses and requests lost to reset connections.
    pub errors: u64,
    /// Requests still queued or in flight 2 s after the run's end (an
    /// overloaded rate); recorded in the percentiles at their wait so
    /// far, a lower bound.
    pub unfinished: u64,
    /// Bytes of one response (headers + body).
    pub response_bytes: usize,
    /// Latency at each of [`QUANTILES`], µs.
    pub percentiles_us: Vec<f64>,
    pub mean_us: f64,
    pub max_us: f64,
    /// Whether the run kept its timetable: the achieved rate is within 2 %
    /// of the scheduled one, every request was answered and no request
    /// ever waited behind a full set of busy connections (a backlog
    /// longer than the connection count means a queue is building: the
    /// setup is saturated even if it catches up by the end).
    pub sustained: bool,
    /// The most requests ever waiting for a free connection.
    pub max_backlog: usize,
}

/// CLOCK_MONOTONIC in nanoseconds (the clock timerfd is armed on).
fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Where one HTTP/1.1 response ends in `buffer`, if it is complete:
/// `Ok(Some((length, status)))`. Only `Content-Length` framing (what
/// nginx sends for static files) is accepted.
pub fn response_length(buffer: &[u8]) -> Result<Option<(usize, u16)>> {
    let Some(header_end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") else {
        ensure!(buffer.len() < 64 * 1024, "response header over 64 KiB");
        return Ok(None);
    };
    let head = std::str::from_utf8(&buffer[..header_end]).context("response header not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let mut content_length = None;
    for line in lines {
        if let Some((name, value)) = line.split_once(':')
            && name.trim().eq_ignore_ascii_case("content-length")
        {
            content_length = Some(
                value
                    .trim()
                    .parse::<usize>()
                    .with_context(|| format!("bad Content-Length {value:?}"))?,
            );
        }
    }
    let body = content_length.context("response without Content-Length")?;
    let total = header_end + 4 + body;
    Ok((buffer.len() >= total).then_some((total, status)))
}

/// The request times of an open-loop run: request `k` is due at
/// `start + k / rate`.
pub fn scheduled_ns(start: u64, rate: f64, k: u64) -> u64 {
    start + (k as f64 * 1e9 / rate) as u64
}

struct Connection {
    stream: TcpStream,
    /// When the request in flight was scheduled (open loop) or sent.
    in_flight: Option<u64>,
    buffer: Vec<u8>,
    alive: bool,
}

struct Epoll(OwnedFd);

impl Epoll {
    fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; the fd is owned below.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh, owned descriptor.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn add(&self, fd: i32, token: u64) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: event is valid for the call.
        if unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut event) } != 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Stops watching `fd` (a dead connection would otherwise be reported
    /// ready on every wait, level-triggered).
    fn remove(&self, fd: i32) {
        // SAFETY: plain syscall; a null event is allowed for DEL.
        unsafe {
            libc::epoll_ctl(
                self.0.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd,
                std::ptr::null_mut(),
            )
        };
    }

    fn wait(&self, events: &mut [libc::epoll_event], timeout_ms: i32) -> io::Result<usize> {
        // SAFETY: events is a valid buffer of its length.
        let n = unsafe {
            libc::epoll_wait(
                self.0.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as i32,
                timeout_ms,
            )
        };
        if n < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                return Ok(0);
            }
            return Err(error);
        }
        Ok(n as usize)
    }
}

struct Timer(OwnedFd);

impl Timer {
    fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; the fd is owned below.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh, owned descriptor.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Fires once at `at_ns` (CLOCK_MONOTONIC, absolute).
    fn arm(&self, at_ns: u64) -> io::Result<()> {
        let at_ns = at_ns.max(1);
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: (at_ns / 1_000_000_000) as libc::time_t,
                tv_nsec: (at_ns % 1_000_000_000) as libc::c_long,
            },
        };
        // SAFETY: spec is valid; the old value is not asked for.
        let rc = unsafe {
            libc::timerfd_settime(
                self.0.as_raw_fd(),
                libc::TFD_TIMER_ABSTIME,
                &spec,
                std::ptr::null_mut(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn drain(&self) {
        let mut expirations = [0u8; 8];
        // SAFETY: reading 8 bytes into a buffer of 8 (EAGAIN is fine).
        unsafe { libc::read(self.0.as_raw_fd(), expirations.as_mut_ptr().cast(), 8) };
    }
}

const TIMER_TOKEN: u64 = u64::MAX;

/// Runs `spec` from the calling thread's namespace.
pub fn run_load(spec: &LoadSpec) -> Result<LoadResult> {
    ensure!(spec.connections > 0, "at least one connection is needed");
    if let Some(rate) = spec.rate {
        ensure!(
            rate.is_finite() && rate > 0.0,
            "the request rate must be positive"
        );
    }
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: bench\r\nUser-Agent: underpass-bench\r\n\r\n",
        spec.path
    )
    .into_bytes();
    let epoll = Epoll::new()?;
    let timer = Timer::new()?;
    epoll.add(timer.0.as_raw_fd(), TIMER_TOKEN)?;
    let mut connections = Vec::with_capacity(spec.connections);
    for i in 0..spec.connections {
        let stream = TcpStream::connect_timeout(&spec.target, Duration::from_secs(2))
            .with_context(|| format!("connection {i} to {}", spec.target))?;
        stream.set_nodelay(true)?;
        stream.set_nonblocking(true)?;
        epoll.add(stream.as_raw_fd(), i as u64)?;
        connections.push(Connection {
            stream,
            in_flight: None,
            buffer: Vec::with_capacity(8192),
            alive: true,
        });
    }
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 120_000_000_000, 3)?;
    let start = now_ns();
    let record_from = start + spec.warmup.as_nanos() as u64;
    let end = record_from + spec.duration.as_nanos() as u64;
    let mut idle: VecDeque<usize> = (0..connections.len()).collect();
    let mut backlog: VecDeque<u64> = VecDeque::new();
    let mut max_backlog = 0usize;
    let mut next_k = 0u64;
    let mut completed = 0u64;
    let mut completed_in_window = 0u64;
    let mut errors = 0u64;
    let mut unfinished = 0u64;
    let mut response_bytes = 0usize;
    let mut events =
        vec![libc::epoll_event { events: 0, u64: 0 }; (connections.len() + 1).min(1024)];
    let send = |connection: &mut Connection, stamp: u64| -> bool {
        connection.in_flight = Some(stamp);
        // An idle keep-alive socket's send buffer is empty: a request
        // this small goes out whole or the connection is broken.
        matches!(connection.stream.write(&request), Ok(n) if n == request.len())
    };
    let mut dead = 0usize;
    // Marks connection `i` dead once: unwatched, never handed a request
    // again; its request in flight (if any) counted as an error.
    let kill = |connection: &mut Connection, dead: &mut usize, errors: &mut u64| {
        if connection.alive {
            connection.alive = false;
            *dead += 1;
            epoll.remove(connection.stream.as_raw_fd());
        }
        if connection.in_flight.take().is_some() {
            *errors += 1;
        }
    };
    loop {
        let now = now_ns();
        let scheduling = now < end;
        // Move every request that is due (and due before the end) onto
        // the backlog.
        if let Some(rate) = spec.rate {
            let horizon = now.min(end - 1);
            while scheduled_ns(start, rate, next_k) <= horizon {
                backlog.push_back(scheduled_ns(start, rate, next_k));
                next_k += 1;
            }
        }
        // Hand due requests to free connections.
        while let Some(&i) = idle.front() {
            if !connections[i].alive {
                idle.pop_front();
                continue;
            }
            let stamp = match spec.rate {
                Some(_) => match backlog.pop_front() {
                    Some(stamp) => stamp,
                    None => break,
                },
                None if scheduling => now,
                None => break,
            };
            // A queued request keeps its place: the drain after the end
            // still sends what was due before it.
            idle.pop_front();
            if !send(&mut connections[i], stamp) {
                // Not sent: it goes to the next free connection.
                connections[i].in_flight = None;
                if spec.rate.is_some() {
                    backlog.push_front(stamp);
                }
                kill(&mut connections[i], &mut dead, &mut errors);
            }
        }
        // Queueing only counts while recording, after free connections
        // took what they could.
        if now >= record_from && scheduling {
            max_backlog = max_backlog.max(backlog.len());
        }
        let in_flight = connections.iter().filter(|c| c.in_flight.is_some()).count();
        if !scheduling && ((in_flight == 0 && backlog.is_empty()) || now > end + 2_000_000_000) {
            let waiting = connections
                .iter()
                .filter_map(|c| c.in_flight)
                .chain(backlog.iter().copied());
            for stamp in waiting.filter(|&s| s >= record_from) {
                histogram.saturating_record(now.saturating_sub(stamp).max(1));
                unfinished += 1;
            }
            break;
        }
        ensure!(
            dead < connections.len(),
            "every connection to {} failed",
            spec.target
        );
        if let Some(rate) = spec.rate
            && scheduling
        {
            timer.arm(scheduled_ns(start, rate, next_k).min(end))?;
        } else {
            timer.arm(end.max(now + 1_000_000))?;
        }
        let ready = epoll.wait(&mut events, 1000)?;
        for event in &events[..ready] {
            let token = event.u64;
            if token == TIMER_TOKEN {
                timer.drain();
                continue;
            }
            let i = token as usize;
            let connection = &mut connections[i];
            if !connection.alive {
                continue;
            }
            let mut chunk = [0u8; 16384];
            let mut closed = false;
            loop {
                match connection.stream.read(&mut chunk) {
                    Ok(0) => {
                        closed = true;
                        break;
                    }
                    Ok(n) => connection.buffer.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => {
                        closed = true;
                        break;
                    }
                }
            }
            match response_length(&connection.buffer) {
                Ok(Some((length, status))) => {
                    let done = now_ns();
                    let Some(stamp) = connection.in_flight.take() else {
                        bail!("{}: a response nobody asked for", spec.target);
                    };
                    if length != connection.buffer.len() {
                        bail!("{}: a response nobody asked for", spec.target);
                    }
                    connection.buffer.clear();
                    response_bytes = length;
                    if status != 200 {
                        errors += 1;
                    } else if stamp >= record_from && stamp < end {
                        histogram.saturating_record(done.saturating_sub(stamp).max(1));
                        completed += 1;
                        if done < end {
                            completed_in_window += 1;
                        }
                    }
                    if !closed {
                        idle.push_back(i);
                    }
                }
                Ok(None) => {}
                Err(error) => bail!("{}: {error:#}", spec.target),
            }
            if closed {
                kill(connection, &mut dead, &mut errors);
            }
        }
    }
    let recorded = spec.duration.as_secs_f64();
    let achieved_rate = completed_in_window as f64 / recorded;
    let sustained = match spec.rate {
        Some(rate) => {
            achieved_rate >= rate * 0.98 && unfinished == 0 && max_backlog <= spec.connections
        }
        None => true,
    };
    let us = |ns: u64| ns as f64 / 1e3;
    Ok(LoadResult {
        target_rate: spec.rate,
        achieved_rate,
        requests: completed,
        errors,
        unfinished,
        response_bytes,
        percentiles_us: QUANTILES
            .iter()
            .map(|&q| us(histogram.value_at_quantile(q)))
            .collect(),
        mean_us: histogram.mean() / 1e3,
        max_us: us(histogram.max()),
        sustained,
        max_backlog,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_responses_by_content_length() {
        let head = b"HTTP/1.1 200 OK\r\nServer: nginx\r\ncontent-length: 5\r\n\r\n";
        let mut full = head.to_vec();
        full.extend_from_slice(b"hello");
        assert_eq!(response_length(&full).unwrap(), Some((full.len(), 200)));
        assert_eq!(response_length(&full[..full.len() - 1]).unwrap(), None);
        assert_eq!(response_length(&head[..10]).unwrap(), None);
        let missing = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(
            response_length(missing).unwrap(),
            Some((missing.len(), 404))
        );
        assert!(response_length(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
        assert!(response_length(b"garbage\r\n\r\n").is_err());
    }

    #[test]
    fn timetable_is_independent_of_responses() {
        assert_eq!(scheduled_ns(1_000, 1000.0, 0), 1_000);
        assert_eq!(scheduled_ns(1_000, 1000.0, 3), 3_001_000);
        assert_eq!(scheduled_ns(0, 3.0, 1), 333_333_333);
    }
}
