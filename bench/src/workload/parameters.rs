//! How long and how hard each workload runs: the seed's parameters
//! unless told otherwise, and every difference from them said in words
//! under the table (a figure measured otherwise than the seed's is not
//! its peer without saying so).
//!
//! The seed's commands: `sockperf pp --tcp -i <IP> -p 12345 -t 30`
//! (default message size), `netperf -H <IP> -l 10 -t TCP_RR --
//! -r100,100`, `iperf3 -c <IP> -d -P 1|2|4` (default `-t 10`; its `-d`
//! is iperf3's debug flag), `redis-benchmark -h <IP> -p 6379 -d 1000 -t
//! get,set` (default `-n 100000`, `-c 50`; SET runs first).

use serde::{Deserialize, Serialize};

use super::Kind;

/// One workload's run parameters.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Parameters {
    /// Seconds measured (time-bound workloads: all but redis).
    pub seconds: f64,
    /// Requests (redis-benchmark `-n`).
    pub requests: u64,
    /// Leading seconds left out of the figure (iperf3 `-O`).
    pub omit_seconds: u64,
}

/// redis-benchmark's default `-n` (and `-c 50`, which we keep by not
/// passing it), as the seed ran it.
const SEED_REDIS_REQUESTS: u64 = 100_000;
/// iperf3 `-O`: TCP's slow start is not the datapath's throughput.
const IPERF_OMIT_SECONDS: u64 = 1;

impl Kind {
    /// The seed's parameters (our own clients: the netperf-style ones'
    /// `-l 10`).
    pub fn seed_parameters(self) -> Parameters {
        let seconds = match self {
            Kind::Sockperf => 30.0,
            _ => 10.0,
        };
        Parameters {
            seconds,
            requests: SEED_REDIS_REQUESTS,
            omit_seconds: if self.is_iperf() {
                IPERF_OMIT_SECONDS
            } else {
                0
            },
        }
    }

    /// The parameters of a run: the seed's; `seconds` for every
    /// time-bound workload if given; scaled down with `quick` (CI).
    pub fn parameters(self, seconds: Option<f64>, quick: bool) -> Parameters {
        let seed = self.seed_parameters();
        if quick {
            return Parameters {
                seconds: match self {
                    // sockperf excludes a 400 ms warm-up of its own.
                    Kind::Sockperf => 1.0,
                    k if k.is_iperf() => 1.0,
                    _ => 0.3,
                },
                requests: 2_000,
                omit_seconds: 0,
            };
        }
        Parameters {
            seconds: seconds.unwrap_or(seed.seconds),
            ..seed
        }
    }

    /// How this run differs from the seed's command, in words; empty when
    /// it does not.
    pub fn deviations(self, run: &Parameters) -> Vec<String> {
        let seed = self.seed_parameters();
        let mut said = Vec::new();
        match self {
            Kind::RedisGet | Kind::RedisSet if run.requests != seed.requests => {
                said.push(format!(
                    "redis-benchmark -n {} (seed: the default, {})",
                    run.requests, seed.requests
                ));
            }
            Kind::RedisGet | Kind::RedisSet => {}
            _ if run.seconds != seed.seconds => said.push(format!(
                "{} for {} s (seed: {} s)",
                self.tool(),
                run.seconds,
                seed.seconds
            )),
            _ => {}
        }
        if self.is_iperf() && run.omit_seconds > 0 {
            said.push(format!(
                "iperf3 -O {}: the first second (slow start) left out; the seed does not say",
                run.omit_seconds
            ));
        }
        match self {
            Kind::Rr => said.push(
                "TCP_RR by our client (netperf is not in Debian): one connection, 100 B each way"
                    .into(),
            ),
            Kind::RedisGet => said
                .push("GET measured after a SET run of the same key (as `-t get,set` does)".into()),
            Kind::PacketRate => said.push(
                "not in the seeds: one sending CPU (sendmmsg, 18-byte datagrams, 60-byte \
                 frames) shares that CPU with the softirq work its packets cause; the figure \
                 is the packets that arrived (at the backend's UDP layer; for the XDP_DROP \
                 ceiling, at node1's wire), so a costlier path leaves the sender fewer"
                    .into(),
            ),
            _ => {}
        }
        said
    }

    fn is_iperf(self) -> bool {
        matches!(self, Kind::Iperf1 | Kind::Iperf2 | Kind::Iperf4)
    }

    /// The tool or client, as a reader knows it.
    fn tool(self) -> &'static str {
        match self {
            Kind::Latency => "ping-pong (ours)",
            Kind::Rr => "TCP_RR",
            Kind::Crr => "TCP_CRR",
            Kind::Sockperf => "sockperf",
            Kind::Iperf1 | Kind::Iperf2 | Kind::Iperf4 => "iperf3",
            Kind::RedisGet | Kind::RedisSet => "redis-benchmark",
            Kind::PacketRate => "the packet-rate sender (ours)",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seeds_parameters_by_default_and_every_deviation_said() {
        let sockperf = Kind::Sockperf.parameters(None, false);
        assert_eq!(sockperf.seconds, 30.0);
        assert!(Kind::Sockperf.deviations(&sockperf).is_empty());
        let redis = Kind::RedisSet.parameters(None, false);
        assert_eq!(redis.requests, 100_000);
        assert!(Kind::RedisSet.deviations(&redis).is_empty());

        let short = Kind::Sockperf.parameters(Some(3.0), false);
        assert_eq!(
            Kind::Sockperf.deviations(&short),
            ["sockperf for 3 s (seed: 30 s)"]
        );
        let quick = Kind::RedisGet.parameters(None, true);
        assert!(Kind::RedisGet.deviations(&quick)[0].contains("-n 2000"));
        assert!(
            Kind::Iperf1
                .deviations(&Kind::Iperf1.parameters(None, false))
                .iter()
                .any(|d| d.contains("-O 1"))
        );
    }
}
