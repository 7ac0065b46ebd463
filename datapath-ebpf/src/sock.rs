//! Socket-LB: cgroup v2 `sock_addr` hooks translate the ClusterIP at
//! connect()/sendmsg() time, before any packet exists, so the pod's
//! packets carry the backend address from the start (no per-packet NAT,
//! no conntrack) and `getpeername`/`recvmsg` show the service again.
//!
//! Three kinds of address reach the hooks (`AddressField`): `user_ip4`
//! (AF_INET sockets), an IPv4-mapped `user_ip6` (`::ffff:<ClusterIP>`:
//! AF_INET6 sockets reaching an IPv4 service, translated through the
//! IPv4 maps), and a native IPv6 `user_ip6`, translated through the IPv6
//! maps (`FamilyMaps`). One `forward` and one `reverse` serve all three.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use datapath_common::{
    IPPROTO_TCP, IPPROTO_UDP,
    features::SET_RETVAL,
    lb,
    maps::{
        AFFINITY_CLIENT_NETNS, Ipv6Words, ServiceKey, ServiceKey6, ServiceValue, SockRevNatKey,
        SockRevNatKey6, SockRevNatValue, SockRevNatValue6,
    },
    metrics::Counter,
    sock_lb::SockLbScope,
};

use crate::{
    affinity, events, features,
    maps::{
        BACKENDS, SERVICE_FILTER, SERVICES, SERVICES6, SLOTS, SOCK_LB_SKIP, SOCK_REVERSE_NAT,
        SOCK_REVERSE_NAT6,
    },
    metrics::{count, count_service},
};

/// Return value that lets the syscall proceed.
const ALLOW: i32 = 1;
/// Return value that fails the syscall (with the errno set by set_retval).
const REFUSE: i32 = 0;
const ECONNREFUSED: i32 = 111;

/// Where a hook's context holds the address, and which family's maps
/// translate it.
trait AddressField {
    type Maps: FamilyMaps;
    /// The address the context names, if it is of this kind.
    fn read(ctx: &SockAddrContext) -> Option<<Self::Maps as FamilyMaps>::Address>;
    /// Writes the address (the port is written by the caller).
    fn write(ctx: &SockAddrContext, address: <Self::Maps as FamilyMaps>::Address);
}

/// One family's maps as socket-LB uses them.
trait FamilyMaps {
    type Address: Copy + PartialEq;
    /// Whether a connect() whose slot names no usable backend is refused
    /// (never happens but for a write in progress or a map made afresh):
    /// an IPv4 one is let through untranslated, for the TC path to
    /// translate; no program translates IPv6 packets yet, so an IPv6 one
    /// would go to the ClusterIP and hang.
    const REFUSES_UNRESOLVED: bool;
    /// The `SERVICE_FILTER` bucket of a destination.
    fn filter_index(address: Self::Address, port_be: u16, protocol: u8) -> u32;
    /// The frontend at `address:port_be`, copied out.
    fn service(address: Self::Address, port_be: u16, protocol: u8) -> Option<ServiceValue>;
    /// A present backend of this family under `backend_id`: its address
    /// and port.
    fn backend(backend_id: u32) -> Option<(Self::Address, u16)>;
    /// Remembers which frontend the socket `cookie` was sent to `backend`
    /// through; `is_sendmsg`: skip the write when already remembered.
    /// False when the table refused.
    fn remember(
        cookie: u64,
        backend: (Self::Address, u16),
        frontend: (Self::Address, u16),
        rev_nat_low: u16,
        is_sendmsg: bool,
    ) -> bool;
    /// The frontend the socket `cookie` reaches `peer` through.
    fn frontend_of(cookie: u64, peer: (Self::Address, u16)) -> Option<(Self::Address, u16)>;
    /// Logs a refused flow to a frontend without endpoints.
    fn no_backend(ctx: &SockAddrContext, address: Self::Address, port_be: u16, protocol: u8);
}

/// `user_ip4`.
struct Ip4;
/// `user_ip6` holding an IPv4-mapped address (`::ffff:a.b.c.d`): what
/// AF_INET6 sockets (most JVMs, dual-stack runtimes) connect to for an
/// IPv4 service. Its IPv4 part is `user_ip6[3]`.
struct Ip4Mapped;
/// `user_ip6` holding a native IPv6 address.
struct Ip6;

/// The IPv4 maps (`SERVICES`, `BACKENDS`, `SOCK_REVERSE_NAT`).
struct V4;
/// The IPv6 maps (`SERVICES6`, `BACKENDS` with `BACKEND_ADDRS6`,
/// `SOCK_REVERSE_NAT6`).
struct V6;

/// `::ffff:0:0/96` as the three leading words of `user_ip6` hold it.
const V4_MAPPED_PREFIX: [u32; 3] = [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff])];

#[inline(always)]
fn user_ip6(ctx: &SockAddrContext) -> Ipv6Words {
    let sa = ctx.sock_addr;
    // SAFETY: the context pointer is valid for the program run; the
    // verifier allows 4-byte reads of these fields in the 6 hooks.
    unsafe {
        [
            (*sa).user_ip6[0],
            (*sa).user_ip6[1],
            (*sa).user_ip6[2],
            (*sa).user_ip6[3],
        ]
    }
}

#[inline(always)]
fn is_v4_mapped(address: &Ipv6Words) -> bool {
    [address[0], address[1], address[2]] == V4_MAPPED_PREFIX
}

impl AddressField for Ip4 {
    type Maps = V4;
    #[inline(always)]
    fn read(ctx: &SockAddrContext) -> Option<u32> {
        // SAFETY: the context pointer is valid for the program run.
        Some(unsafe { (*ctx.sock_addr).user_ip4 })
    }
    #[inline(always)]
    fn write(ctx: &SockAddrContext, address: u32) {
        // SAFETY: the 4 hooks may write the user address.
        unsafe { (*ctx.sock_addr).user_ip4 = address }
    }
}

impl AddressField for Ip4Mapped {
    type Maps = V4;
    #[inline(always)]
    fn read(ctx: &SockAddrContext) -> Option<u32> {
        let address = user_ip6(ctx);
        is_v4_mapped(&address).then_some(address[3])
    }
    #[inline(always)]
    fn write(ctx: &SockAddrContext, address: u32) {
        // SAFETY: the 6 hooks may write the user address.
        unsafe { (*ctx.sock_addr).user_ip6[3] = address }
    }
}

impl AddressField for Ip6 {
    type Maps = V6;
    #[inline(always)]
    fn read(ctx: &SockAddrContext) -> Option<Ipv6Words> {
        let address = user_ip6(ctx);
        (!is_v4_mapped(&address)).then_some(address)
    }
    #[inline(always)]
    fn write(ctx: &SockAddrContext, address: Ipv6Words) {
        let sa = ctx.sock_addr;
        // SAFETY: the 6 hooks may write the user address, word by word.
        unsafe {
            (*sa).user_ip6[0] = address[0];
            (*sa).user_ip6[1] = address[1];
            (*sa).user_ip6[2] = address[2];
            (*sa).user_ip6[3] = address[3];
        }
    }
}

impl FamilyMaps for V4 {
    type Address = u32;
    const REFUSES_UNRESOLVED: bool = false;
    #[inline(always)]
    fn filter_index(address: u32, port_be: u16, protocol: u8) -> u32 {
        lb::service_filter_index(address, port_be, protocol)
    }
    #[inline(always)]
    fn service(address: u32, port_be: u16, protocol: u8) -> Option<ServiceValue> {
        // SAFETY: copied out at once.
        unsafe { SERVICES.get(ServiceKey::new(address, port_be, protocol)) }.copied()
    }
    #[inline(always)]
    fn backend(backend_id: u32) -> Option<(u32, u16)> {
        BACKENDS
            .get(backend_id)
            .filter(|b| b.is_present_v4())
            .map(|b| (b.address_be, b.port_be))
    }
    #[inline(always)]
    fn remember(
        cookie: u64,
        (backend_address_be, backend_port_be): (u32, u16),
        (service_address_be, service_port_be): (u32, u16),
        rev_nat_low: u16,
        is_sendmsg: bool,
    ) -> bool {
        let key = SockRevNatKey {
            cookie,
            backend_address_be,
            backend_port_be,
            _pad: [0; 2],
        };
        let value = SockRevNatValue {
            service_address_be,
            service_port_be,
            rev_nat_low,
        };
        // SAFETY: copied out at once.
        let known = is_sendmsg && unsafe { SOCK_REVERSE_NAT.get(key) }.copied() == Some(value);
        known || SOCK_REVERSE_NAT.insert(key, value, 0).is_ok()
    }
    #[inline(always)]
    fn frontend_of(cookie: u64, (address, port_be): (u32, u16)) -> Option<(u32, u16)> {
        let key = SockRevNatKey {
            cookie,
            backend_address_be: address,
            backend_port_be: port_be,
            _pad: [0; 2],
        };
        // SAFETY: copied out at once.
        unsafe { SOCK_REVERSE_NAT.get(key) }
            .map(|service| (service.service_address_be, service.service_port_be))
    }
    #[inline(always)]
    fn no_backend(ctx: &SockAddrContext, address: u32, port_be: u16, protocol: u8) {
        events::no_backend(ctx, address, port_be, protocol);
    }
}

impl FamilyMaps for V6 {
    type Address = Ipv6Words;
    const REFUSES_UNRESOLVED: bool = true;
    #[inline(always)]
    fn filter_index(address: Ipv6Words, port_be: u16, protocol: u8) -> u32 {
        lb::service_filter_index6(address, port_be, protocol)
    }
    #[inline(always)]
    fn service(address: Ipv6Words, port_be: u16, protocol: u8) -> Option<ServiceValue> {
        // SAFETY: copied out at once.
        unsafe { SERVICES6.get(ServiceKey6::new(address, port_be, protocol)) }.copied()
    }
    #[inline(always)]
    fn backend(backend_id: u32) -> Option<(Ipv6Words, u16)> {
        crate::backends::ipv6(backend_id)
    }
    #[inline(always)]
    fn remember(
        cookie: u64,
        (backend_address_be, backend_port_be): (Ipv6Words, u16),
        (service_address_be, service_port_be): (Ipv6Words, u16),
        rev_nat_low: u16,
        is_sendmsg: bool,
    ) -> bool {
        let key = SockRevNatKey6 {
            cookie,
            backend_address_be,
            backend_port_be,
            _pad: [0; 6],
        };
        let value = SockRevNatValue6 {
            service_address_be,
            service_port_be,
            rev_nat_low,
        };
        // SAFETY: copied out at once.
        let known = is_sendmsg && unsafe { SOCK_REVERSE_NAT6.get(key) }.copied() == Some(value);
        known || SOCK_REVERSE_NAT6.insert(key, value, 0).is_ok()
    }
    #[inline(always)]
    fn frontend_of(cookie: u64, (address, port_be): (Ipv6Words, u16)) -> Option<(Ipv6Words, u16)> {
        let key = SockRevNatKey6 {
            cookie,
            backend_address_be: address,
            backend_port_be: port_be,
            _pad: [0; 6],
        };
        // SAFETY: copied out at once.
        unsafe { SOCK_REVERSE_NAT6.get(key) }
            .map(|service| (service.service_address_be, service.service_port_be))
    }
    #[inline(always)]
    fn no_backend(ctx: &SockAddrContext, address: Ipv6Words, port_be: u16, protocol: u8) {
        events::no_backend6(ctx, address, port_be, protocol);
    }
}

/// connect(2) of TCP and UDP sockets.
#[inline(always)]
pub fn connect4(ctx: &SockAddrContext) -> i32 {
    forward::<Ip4>(ctx, false)
}

/// sendmsg(2)/sendto(2) with a destination on unconnected UDP sockets.
#[inline(always)]
pub fn sendmsg4(ctx: &SockAddrContext) -> i32 {
    forward::<Ip4>(ctx, true)
}

/// recvmsg(2) on UDP sockets and getpeername(2): the peer address shown to
/// the application becomes the service again.
#[inline(always)]
pub fn reverse4(ctx: &SockAddrContext) -> i32 {
    reverse::<Ip4>(ctx)
}

/// Non-zero when the IPv6 maps are sized (`--ipv6 on`); the loader
/// overwrites this read-only global
/// (`datapath_common::sock_lb::SOCK_LB_IPV6_GLOBAL`). Zero, the verifier
/// drops the native IPv6 lookups: an IPv4-only node's IPv6 sockets (a
/// QUIC or DNS server's every datagram) pay nothing.
#[unsafe(no_mangle)]
static SOCK_LB_IPV6: u32 = 0;

/// Whether native IPv6 addresses are translated.
#[inline(always)]
fn serves_ipv6() -> bool {
    // SAFETY: a read of our own static. Volatile, so that the compiler
    // reads the value the loader set instead of folding in the default.
    unsafe { core::ptr::read_volatile(&SOCK_LB_IPV6) != 0 }
}

/// connect(2) of AF_INET6 sockets: an IPv6 ClusterIP, or an IPv4 one
/// through its IPv4-mapped address. (The kernel hands a socket connecting
/// to a mapped address to the IPv4 code after this hook, without running
/// `connect4`.)
#[inline(always)]
pub fn connect6(ctx: &SockAddrContext) -> i32 {
    if is_v4_mapped(&user_ip6(ctx)) {
        forward::<Ip4Mapped>(ctx, false)
    } else if serves_ipv6() {
        forward::<Ip6>(ctx, false)
    } else {
        ALLOW
    }
}

/// sendmsg(2) of AF_INET6 UDP sockets. (A datagram to an IPv4-mapped
/// ClusterIP: current kernels run `sendmsg4` for it too, older ones only
/// this hook.)
#[inline(always)]
pub fn sendmsg6(ctx: &SockAddrContext) -> i32 {
    if is_v4_mapped(&user_ip6(ctx)) {
        forward::<Ip4Mapped>(ctx, true)
    } else if serves_ipv6() {
        forward::<Ip6>(ctx, true)
    } else {
        ALLOW
    }
}

/// recvmsg(2) and getpeername(2) of AF_INET6 sockets: a backend is shown
/// as the ClusterIP it was reached through (an IPv4-mapped backend as the
/// IPv4-mapped ClusterIP).
#[inline(always)]
pub fn reverse6(ctx: &SockAddrContext) -> i32 {
    if is_v4_mapped(&user_ip6(ctx)) {
        reverse::<Ip4Mapped>(ctx)
    } else if serves_ipv6() {
        reverse::<Ip6>(ctx)
    } else {
        ALLOW
    }
}

#[inline(always)]
fn set_address<F: AddressField>(
    ctx: &SockAddrContext,
    address: <F::Maps as FamilyMaps>::Address,
    port_be: u16,
) {
    F::write(ctx, address);
    // SAFETY: these hooks may write the user port.
    unsafe { (*ctx.sock_addr).user_port = port_be as u32 };
}

#[inline(always)]
fn reverse<F: AddressField>(ctx: &SockAddrContext) -> i32 {
    let Some(address) = F::read(ctx) else {
        return ALLOW;
    };
    // SAFETY: the context pointer is valid for the program run.
    let port_be = unsafe { (*ctx.sock_addr).user_port as u16 };
    // SAFETY: plain helper call on the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Some((service, service_port_be)) = F::Maps::frontend_of(cookie, (address, port_be)) {
        set_address::<F>(ctx, service, service_port_be);
        count(Counter::SockReverseTranslated);
    }
    ALLOW
}

/// Socket-LB's scope; the loader overwrites this read-only global
/// (`datapath_common::sock_lb::SOCK_LB_SCOPE_GLOBAL`). Unscoped (the
/// default), the verifier drops the check below entirely.
#[unsafe(no_mangle)]
static SOCK_LB_SCOPE: SockLbScope = SockLbScope::ALL;

/// Whether this socket is one socket-LB translates (`SockLbScope`).
#[inline(always)]
fn in_scope(ctx: &SockAddrContext) -> bool {
    // SAFETY: a read of our own static. Volatile, so that the compiler
    // reads the value the loader set instead of folding in the default.
    let scope = unsafe { core::ptr::read_volatile(&SOCK_LB_SCOPE) };
    if !scope.is_scoped() {
        return true;
    }
    // SAFETY: plain helper call on the program's context.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: only tested for presence.
    let listed = scope.skip_listed != 0 && unsafe { SOCK_LB_SKIP.get(netns_cookie) }.is_some();
    scope.translates(netns_cookie, listed)
}

/// Fails the syscall with ECONNREFUSED (EPERM on kernels without
/// `bpf_set_retval`).
#[inline(always)]
fn refuse() -> i32 {
    if features::has(SET_RETVAL) {
        // SAFETY: plain helper call; makes the syscall fail with
        // ECONNREFUSED instead of the default EPERM.
        unsafe { bpf_set_retval(-ECONNREFUSED) };
    }
    REFUSE
}

#[inline(always)]
fn forward<F: AddressField>(ctx: &SockAddrContext, is_sendmsg: bool) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the context pointer is valid for the program run.
    let (port_be, protocol) = unsafe { ((*sa).user_port as u16, (*sa).protocol as u8) };
    if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
        return ALLOW;
    }
    let Some(address) = F::read(ctx) else {
        return ALLOW;
    };
    let bucket = F::Maps::filter_index(address, port_be, protocol);
    if !SERVICE_FILTER.get(bucket).is_some_and(|&n| n > 0) {
        return ALLOW;
    }
    let Some(service) = F::Maps::service(address, port_be, protocol) else {
        return ALLOW;
    };
    // Only service traffic pays for the scope check (a DNS client's every
    // datagram would otherwise).
    if !in_scope(ctx) {
        // Left to the TC path.
        return ALLOW;
    }
    if service.backend_count == 0 {
        count(Counter::NoBackend);
        F::Maps::no_backend(ctx, address, port_be, protocol);
        return refuse();
    }
    // SAFETY: plain helper call on the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // UDP sticks to one backend per socket so that replies map back and
    // a DNS client's retries see one server; TCP spreads per connection.
    let slot = if protocol == IPPROTO_TCP {
        // SAFETY: plain helper call.
        lb::select_slot(unsafe { bpf_get_prandom_u32() }, service.backend_count)
    } else {
        lb::select_slot_for_cookie(cookie, service.backend_count)
    };
    let mut backend_id = SLOTS
        .get(service.slot_index(slot))
        .map_or(0, |s| s.backend_id);
    let timeout = affinity::timeout(service.rev_nat_id());
    if timeout != 0 && backend_id != 0 {
        // A client of a frontend with sessionAffinity: the pod, by its
        // network namespace (`crate::affinity`).
        // SAFETY: plain helper call on the program's context.
        let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
        // `sendmsg` decides every datagram of an unconnected socket, and
        // each stamps the pod's entry (at most once a second): as
        // conntrack keeps a UDP flow on its backend while it sends, the
        // socket is not moved while it sends.
        let client = affinity::id_kind(service.rev_nat_id(), AFFINITY_CLIENT_NETNS);
        let kept = affinity::backend(netns_cookie, 0, client, timeout, backend_id);
        // A remembered backend without its entry (being removed) is not
        // taken.
        if F::Maps::backend(kept).is_some() {
            backend_id = kept;
        }
    }
    let Some(backend) = F::Maps::backend(backend_id) else {
        count(Counter::Error);
        return if F::Maps::REFUSES_UNRESOLVED {
            refuse()
        } else {
            ALLOW
        };
    };
    // Every datagram of an unconnected socket comes through sendmsg: the
    // reverse entry is only written when it is not already there.
    if !F::Maps::remember(
        cookie,
        backend,
        (address, port_be),
        service.rev_nat_low,
        is_sendmsg,
    ) {
        count(Counter::Error);
        events::sock_reverse_nat_insert_failed(ctx);
    }
    set_address::<F>(ctx, backend.0, backend.1);
    count(Counter::SockTranslated);
    // A datagram of an unconnected socket is decided alone: a packet;
    // a connect() is a flow whose packets go straight to the backend.
    if is_sendmsg {
        count_service(service.rev_nat_id(), 1, 0);
    } else {
        count_service(service.rev_nat_id(), 0, 1);
    }
    ALLOW
}
