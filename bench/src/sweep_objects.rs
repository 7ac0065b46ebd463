//! The services and EndpointSlices the control-plane benches sweep
//! (`bench agent`, `bench scale`): service `bench/svc-<i>` at
//! 10.96.0.1 + i, port 80 → 8080, its endpoints from 10.128.0.1 up.

use std::net::Ipv4Addr;

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

/// The ClusterIP of service `i`.
pub(crate) fn service_address(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 1)) + i as u32)
}

/// The `k`-th endpoint address of the sweep.
pub(crate) fn endpoint_address(k: u64) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 1)) + k as u32)
}

/// Service `bench/svc-<i>`: port 80 → 8080.
pub(crate) fn service(i: usize) -> Service {
    crate::cluster::service_objects(&format!("svc-{i}"), service_address(i), &[(80, 8080)], &[]).0
}

/// The EndpointSlice of `svc-<i>` with `addresses` ready.
pub(crate) fn slice(i: usize, addresses: impl IntoIterator<Item = Ipv4Addr>) -> EndpointSlice {
    let addresses: Vec<Ipv4Addr> = addresses.into_iter().collect();
    crate::cluster::service_objects(
        &format!("svc-{i}"),
        service_address(i),
        &[(80, 8080)],
        &addresses,
    )
    .1
}
