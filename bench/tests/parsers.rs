//! The tools' parsers against output captured from the Debian packages
//! (sockperf 3.7, iperf3 3.12, redis-benchmark 7.0 on loopback in a
//! namespace): every figure read from where the tool prints it, and a
//! figure that is missing is an error, not a fallback.

use bench::workload::parse;

const SOCKPERF: &str = include_str!("fixtures/sockperf-3.7-ping-pong-tcp.txt");
const IPERF3: &str = include_str!("fixtures/iperf3-3.12-P2-O1.json");
const REDIS: &str = include_str!("fixtures/redis-benchmark-7.0-get-set.csv");

#[test]
fn sockperf_percentiles_are_read_from_their_padded_lines_over_the_valid_duration() {
    let figures = parse::sockperf(SOCKPERF).unwrap();
    assert_eq!(
        figures,
        parse::Sockperf {
            valid_seconds: 1.55,
            received_messages: 65703,
            total_received_messages: 80736,
            mean_us: 11.777,
            p50_us: 8.4,
            p99_us: 29.69,
        }
    );
}

#[test]
fn sockperf_without_a_percentile_is_an_error_not_the_mean() {
    let without_p99: String = SOCKPERF
        .lines()
        .filter(|l| !l.contains("percentile 99.000"))
        .map(|l| format!("{l}\n"))
        .collect();
    let error = parse::sockperf(&without_p99).unwrap_err();
    assert!(
        format!("{error:#}").contains("percentile 99.000"),
        "{error:#}"
    );
    let cut_short: String = SOCKPERF
        .lines()
        .take_while(|l| !l.contains("Valid Duration"))
        .collect();
    assert!(parse::sockperf(&cut_short).is_err());
}

#[test]
fn iperf3_reads_the_receivers_totals() {
    let figures = parse::iperf3(IPERF3).unwrap();
    assert_eq!(figures.bytes, 2_615_017_578.0);
    assert!((figures.bits_per_second - 10_440_332_862.723).abs() < 1.0);
    assert!((figures.seconds - 2.003781).abs() < 1e-9);
    // The omitted first second counts for CPU per MB, not for the rate.
    assert_eq!(figures.bytes_with_omitted, 4_069_785_600.0);
    let refused = r#"{"start":{},"intervals":[],"end":{},"error":"unable to connect to server: Connection refused"}"#;
    let error = parse::iperf3(refused).unwrap_err();
    assert!(format!("{error:#}").contains("Connection refused"));
    assert!(parse::iperf3("iperf3: error - unable to connect").is_err());
}

#[test]
fn redis_columns_are_taken_by_name_p50_and_p99_not_p95_and_max() {
    let get = parse::redis_csv(REDIS, "GET").unwrap();
    assert_eq!(
        get,
        parse::Redis {
            requests_per_second: 32154.34,
            mean_us: 1052.0,
            p50_us: 791.0,
            p99_us: 6639.0,
        }
    );
    let set = parse::redis_csv(REDIS, "SET").unwrap();
    assert_eq!(set.requests_per_second, 31446.54);
    assert_eq!(set.p99_us, 6023.0);
    // SET runs before GET with `-t get,set`, whatever order is given.
    let first_test = REDIS.lines().nth(1).unwrap();
    assert!(first_test.starts_with("\"SET\""), "{first_test}");
}

#[test]
fn redis_with_other_columns_or_no_line_for_the_test_is_an_error() {
    let other_layout = REDIS.replacen("p95_latency_ms", "p90_latency_ms", 1);
    assert!(parse::redis_csv(&other_layout, "GET").is_err());
    let only_set: String = REDIS
        .lines()
        .filter(|l| !l.starts_with("\"GET\""))
        .map(|l| format!("{l}\n"))
        .collect();
    let error = parse::redis_csv(&only_set, "GET").unwrap_err();
    assert!(format!("{error:#}").contains("no GET line"), "{error:#}");
    assert!(parse::redis_csv("", "GET").is_err());
}
