//! The open-loop load generator against an HTTP server on loopback whose
//! pace the test controls: a stall must show in the latency of every
//! request scheduled during it (no coordinated omission), and a rate the
//! server cannot serve must be reported as not kept.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{Arc, Mutex},
    time::Duration,
};

use bench::loadgen::{LoadSpec, QUANTILES, run_load};

/// Serves `GET`s on loopback: each response waits for `gate` (held by a
/// stall) and then `delay`.
fn server(gate: Arc<Mutex<()>>, delay: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let gate = gate.clone();
            std::thread::spawn(move || serve(stream, &gate, delay));
        }
    });
    address
}

fn serve(mut stream: TcpStream, gate: &Mutex<()>, delay: Duration) {
    let _ = stream.set_nodelay(true);
    let mut pending = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let Ok(n) = stream.read(&mut chunk) else {
            return;
        };
        if n == 0 {
            return;
        }
        pending.extend_from_slice(&chunk[..n]);
        while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            pending.drain(..end + 4);
            drop(gate.lock().unwrap());
            std::thread::sleep(delay);
            if stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
                .is_err()
            {
                return;
            }
        }
    }
}

fn p(result: &bench::loadgen::LoadResult, q: f64) -> f64 {
    let i = QUANTILES.iter().position(|&x| x == q).unwrap();
    result.percentiles_us[i]
}

#[test]
fn a_stall_delays_every_request_scheduled_during_it() {
    let gate = Arc::new(Mutex::new(()));
    let target = server(gate.clone(), Duration::ZERO);
    let staller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(800));
        let _held = gate.lock().unwrap();
        std::thread::sleep(Duration::from_millis(300));
    });
    let result = run_load(&LoadSpec {
        target,
        path: "/350".into(),
        rate: Some(2000.0),
        connections: 8,
        duration: Duration::from_millis(1500),
        warmup: Duration::from_millis(200),
    })
    .unwrap();
    staller.join().unwrap();
    assert_eq!(result.errors, 0, "{result:?}");
    assert!(result.achieved_rate > 1800.0, "{result:?}");
    assert_eq!(result.response_bytes, 43);
    // ~600 of ~3000 recorded requests were due during the 300 ms stall:
    // their latency runs from 300 ms down to 0. Measured from the actual
    // send instead, only the 8 in flight would show it.
    assert!(p(&result, 0.9) > 50_000.0, "p90 {result:?}");
    assert!(result.max_us > 250_000.0, "max {result:?}");
    assert!(p(&result, 0.5) < 50_000.0, "p50 {result:?}");
    assert!(result.max_backlog > 100, "{result:?}");
    // A queue built behind the stall: the timetable was not kept.
    assert!(!result.sustained, "{result:?}");
}

#[test]
fn a_rate_the_server_cannot_serve_is_not_kept() {
    // 2 connections × 5 ms per response: at most ~400 responses/s.
    let target = server(Arc::new(Mutex::new(())), Duration::from_millis(5));
    let result = run_load(&LoadSpec {
        target,
        path: "/".into(),
        rate: Some(2000.0),
        connections: 2,
        duration: Duration::from_millis(800),
        warmup: Duration::from_millis(100),
    })
    .unwrap();
    assert!(!result.sustained, "{result:?}");
    assert!(result.achieved_rate < 600.0, "{result:?}");

    let closed = run_load(&LoadSpec {
        target,
        path: "/".into(),
        rate: None,
        connections: 2,
        duration: Duration::from_millis(500),
        warmup: Duration::from_millis(100),
    })
    .unwrap();
    assert!(closed.sustained && closed.target_rate.is_none());
    // At most 2 connections × one response per 5 ms; how close it gets
    // depends on the machine's load, so only progress is asserted below.
    assert!(
        closed.requests > 10 && closed.achieved_rate < 450.0,
        "{closed:?}"
    );
}
