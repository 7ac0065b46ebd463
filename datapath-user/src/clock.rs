//! The conntrack clock as user space sees it: kernel jiffies and HZ.
//!
//! The datapath stamps flows with `bpf_jiffies64()`. Planting or ageing
//! entries (tests, garbage collection, `conntrack list`) needs the same
//! clock, which the kernel shows in /proc/timer_list.

use std::{
    fs::File,
    io::{self, BufRead, BufReader},
    sync::OnceLock,
    time::{Duration, Instant},
};

/// The kernel's jiffies counter now.
pub fn jiffies_now() -> io::Result<u64> {
    let file = File::open("/proc/timer_list")?;
    for line in BufReader::new(file).lines() {
        let line = line?;
        if let Some(value) = line.strip_prefix("jiffies:") {
            return value.trim().parse().map_err(io::Error::other);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        "no jiffies line in /proc/timer_list",
    ))
}

/// The kernel's tick rate (CONFIG_HZ), measured once: jiffies counted over
/// 200 ms of CLOCK_MONOTONIC, rounded to the nearest rate Linux offers.
pub fn hz() -> io::Result<u64> {
    static HZ: OnceLock<u64> = OnceLock::new();
    if let Some(hz) = HZ.get() {
        return Ok(*hz);
    }
    let start = (Instant::now(), jiffies_now()?);
    std::thread::sleep(Duration::from_millis(200));
    let end = (Instant::now(), jiffies_now()?);
    let measured = (end.1 - start.1) as f64 / (end.0 - start.0).as_secs_f64();
    let hz = [100u64, 250, 300, 1000]
        .into_iter()
        .min_by(|a, b| {
            (*a as f64 - measured)
                .abs()
                .total_cmp(&(*b as f64 - measured).abs())
        })
        .expect("non-empty");
    Ok(*HZ.get_or_init(|| hz))
}

/// `duration` in ticks at `hz`, rounded up (a lifetime is never shortened).
pub fn ticks(duration: Duration, hz: u64) -> u64 {
    (duration.as_nanos() * u128::from(hz)).div_ceil(1_000_000_000) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_round_up() {
        assert_eq!(ticks(Duration::from_secs(60), 250), 15_000);
        assert_eq!(ticks(Duration::from_millis(1), 250), 1);
        assert_eq!(ticks(Duration::ZERO, 250), 0);
    }
}
