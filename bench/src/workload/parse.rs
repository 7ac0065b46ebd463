//! Reading the Debian tools' figures from their output. A figure that is
//! not where the tool prints it is an error naming the tool and the
//! figure — never a fallback to another figure (a missing percentile read
//! as the mean would store p50 = p99 = mean without anyone noticing).
//!
//! The formats, as the tools print them (captured samples in
//! `bench/tests/fixtures/`):
//! - sockperf 3.7: `[Valid Duration] RunTime=1.550 sec; SentMessages=…;
//!   ReceivedMessages=65703`, `avg-latency=11.777 (std-dev=…)`,
//!   `---> percentile 50.000 =    8.400` (padded), lines behind ANSI
//!   colour codes;
//! - iperf3 3.12 `-J`: `end.sum_received.{bits_per_second, bytes,
//!   seconds}` (omitted seconds, `-O`, not included);
//! - redis-benchmark 7.0 `--csv`: a header line, then per test
//!   `"GET","rps","avg","min","p50","p95","p99","max"` (latencies in ms).

use anyhow::{Context, Result, bail};

/// sockperf ping-pong's figures over its valid duration (the 400 ms
/// warm-up excluded). Latencies are one-way (RTT/2), µs.
#[derive(Clone, Debug, PartialEq)]
pub struct Sockperf {
    pub valid_seconds: f64,
    pub received_messages: u64,
    /// Warm-up included (the whole run, for CPU per message).
    pub total_received_messages: u64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

pub fn sockperf(output: &str) -> Result<Sockperf> {
    let text = strip_ansi(output);
    let total = text
        .lines()
        .find(|l| l.contains("[Total Run]"))
        .context("sockperf printed no `[Total Run]` line")?;
    let valid = text
        .lines()
        .find(|l| l.contains("[Valid Duration]"))
        .context("sockperf printed no `[Valid Duration]` line (did the run end early?)")?;
    Ok(Sockperf {
        valid_seconds: number_after(valid, "RunTime=").context("sockperf: valid RunTime")?,
        received_messages: number_after(valid, "ReceivedMessages=")
            .context("sockperf: valid ReceivedMessages")? as u64,
        total_received_messages: number_after(total, "ReceivedMessages=")
            .context("sockperf: total ReceivedMessages")? as u64,
        mean_us: number_after(&text, "avg-latency=").context("sockperf: avg-latency")?,
        p50_us: percentile(&text, "50.000").context("sockperf: percentile 50.000")?,
        p99_us: percentile(&text, "99.000").context("sockperf: percentile 99.000")?,
    })
}

/// `---> percentile 99.000 =   29.690`.
fn percentile(text: &str, which: &str) -> Option<f64> {
    let label = format!("percentile {which}");
    text.lines()
        .find_map(|line| Some(line.split_once(&label)?.1))
        .and_then(|rest| rest.trim_start().strip_prefix('=')?.trim().parse().ok())
}

/// iperf3's receiver-side totals (omitted seconds left out), and the
/// bytes of the whole run (for CPU per MB over the whole run).
#[derive(Clone, Debug, PartialEq)]
pub struct Iperf3 {
    pub bits_per_second: f64,
    pub bytes: f64,
    pub seconds: f64,
    /// Every interval's bytes, omitted ones included (sender side).
    pub bytes_with_omitted: f64,
}

pub fn iperf3(json_output: &str) -> Result<Iperf3> {
    let json: serde_json::Value =
        serde_json::from_str(json_output).context("iperf3 -J printed no JSON")?;
    if let Some(error) = json["error"].as_str() {
        bail!("iperf3: {error}");
    }
    let received = &json["end"]["sum_received"];
    let field = |name: &str| {
        received[name]
            .as_f64()
            .with_context(|| format!("iperf3: end.sum_received.{name} missing"))
    };
    let intervals = json["intervals"]
        .as_array()
        .context("iperf3: no intervals")?;
    let bytes_with_omitted = intervals
        .iter()
        .map(|i| {
            i["sum"]["bytes"]
                .as_f64()
                .context("iperf3: an interval without sum.bytes")
        })
        .sum::<Result<f64>>()?;
    Ok(Iperf3 {
        bits_per_second: field("bits_per_second")?,
        bytes: field("bytes")?,
        seconds: field("seconds")?,
        bytes_with_omitted,
    })
}

/// One test's line of redis-benchmark `--csv`; latencies in µs.
#[derive(Clone, Debug, PartialEq)]
pub struct Redis {
    pub requests_per_second: f64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// The columns redis-benchmark 7.0 prints; checked against the header
/// so that another version's layout fails instead of shifting figures.
const REDIS_HEADER: [&str; 8] = [
    "test",
    "rps",
    "avg_latency_ms",
    "min_latency_ms",
    "p50_latency_ms",
    "p95_latency_ms",
    "p99_latency_ms",
    "max_latency_ms",
];

/// The line of `test` (`"GET"`, `"SET"`).
pub fn redis_csv(output: &str, test: &str) -> Result<Redis> {
    let cells = |line: &str| -> Vec<String> {
        line.split(',')
            .map(|c| c.trim().trim_matches('"').to_owned())
            .collect()
    };
    let mut lines = output.lines().filter(|l| !l.trim().is_empty());
    let header = cells(lines.next().context("redis-benchmark printed nothing")?);
    if header != REDIS_HEADER {
        bail!("redis-benchmark --csv: unexpected columns {header:?} (expected {REDIS_HEADER:?})");
    }
    let row = lines
        .map(cells)
        .find(|row| row.first().is_some_and(|t| t == test))
        .with_context(|| format!("redis-benchmark printed no {test} line"))?;
    let column = |name: &str| -> Result<f64> {
        let at = REDIS_HEADER.iter().position(|h| *h == name).expect("known");
        row.get(at)
            .and_then(|c| c.parse::<f64>().ok())
            .with_context(|| format!("redis-benchmark {test}: {name} is not a number"))
    };
    let ms = 1e3;
    Ok(Redis {
        requests_per_second: column("rps")?,
        mean_us: column("avg_latency_ms")? * ms,
        p50_us: column("p50_latency_ms")? * ms,
        p99_us: column("p99_latency_ms")? * ms,
    })
}

/// The number right after `name` (`RunTime=1.550 sec` → 1.55).
fn number_after(text: &str, name: &str) -> Option<f64> {
    let at = text.find(name)? + name.len();
    let rest = text[at..].trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Drops ANSI escape sequences (`ESC [ … letter`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
