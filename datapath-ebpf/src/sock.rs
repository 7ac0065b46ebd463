//! Socket-LB: cgroup v2 `sock_addr` hooks translate the ClusterIP at
//! connect()/sendmsg() time, before any packet exists, so the pod's
//! packets carry the backend address from the start (no per-packet NAT,
//! no conntrack) and `getpeername`/`recvmsg` show the service again.
//! AF_INET6 sockets reaching an IPv4 service through its IPv4-mapped
//! address (`::ffff:<ClusterIP>`) are translated the same way.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use datapath_common::{
    IPPROTO_TCP, IPPROTO_UDP,
    features::SET_RETVAL,
    lb,
    maps::{Backend, ServiceKey, ServiceValue, SockRevNatKey, SockRevNatValue},
    metrics::Counter,
    sock_lb::SockLbScope,
};

use crate::{
    events, features,
    maps::{BACKENDS, SERVICE_FILTER, SERVICES, SLOTS, SOCK_LB_SKIP, SOCK_REVERSE_NAT},
    metrics::count,
};

/// Return value that lets the syscall proceed.
const ALLOW: i32 = 1;
/// Return value that fails the syscall (with the errno set by set_retval).
const REFUSE: i32 = 0;
const ECONNREFUSED: i32 = 111;

/// The address a hook sees, as the 4 and 6 hooks hold it.
#[derive(Clone, Copy)]
enum Family {
    /// `user_ip4`.
    V4,
    /// `user_ip6` holding an IPv4-mapped address (`::ffff:a.b.c.d`): what
    /// AF_INET6 sockets (most JVMs, dual-stack runtimes) connect to for an
    /// IPv4 service. Its IPv4 part is `user_ip6[3]`.
    V4Mapped,
}

/// `::ffff:0:0/96` as the three leading words of `user_ip6` hold it.
const V4_MAPPED_PREFIX: [u32; 3] = [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff])];

/// The IPv4 address a hook's context names, if it names one.
#[inline(always)]
fn ipv4_of(ctx: &SockAddrContext, family: Family) -> Option<u32> {
    let sa = ctx.sock_addr;
    // SAFETY: the context pointer is valid for the program run; the
    // verifier allows 4-byte reads of these fields in these hooks.
    unsafe {
        match family {
            Family::V4 => Some((*sa).user_ip4),
            Family::V4Mapped => {
                let prefix = [(*sa).user_ip6[0], (*sa).user_ip6[1], (*sa).user_ip6[2]];
                (prefix == V4_MAPPED_PREFIX).then(|| (*sa).user_ip6[3])
            }
        }
    }
}

/// Writes `address_be:port_be` back into the hook's context.
#[inline(always)]
fn set_address(ctx: &SockAddrContext, family: Family, address_be: u32, port_be: u16) {
    let sa = ctx.sock_addr;
    // SAFETY: the context pointer is valid for the program run; these
    // hooks may write the user address and port.
    unsafe {
        match family {
            Family::V4 => (*sa).user_ip4 = address_be,
            Family::V4Mapped => (*sa).user_ip6[3] = address_be,
        }
        (*sa).user_port = port_be as u32;
    }
}

/// connect(2) of TCP and UDP sockets.
#[inline(always)]
pub fn connect4(ctx: &SockAddrContext) -> i32 {
    forward(ctx, Family::V4, false)
}

/// sendmsg(2)/sendto(2) with a destination on unconnected UDP sockets.
#[inline(always)]
pub fn sendmsg4(ctx: &SockAddrContext) -> i32 {
    forward(ctx, Family::V4, true)
}

/// recvmsg(2) on UDP sockets and getpeername(2): the peer address shown to
/// the application becomes the service again.
#[inline(always)]
pub fn reverse4(ctx: &SockAddrContext) -> i32 {
    reverse(ctx, Family::V4)
}

/// connect(2) of AF_INET6 sockets to an IPv4-mapped ClusterIP. (The
/// kernel hands such a socket to the IPv4 code after this hook, without
/// running `connect4`.) Native IPv6 addresses pass untouched.
#[inline(always)]
pub fn connect6(ctx: &SockAddrContext) -> i32 {
    forward(ctx, Family::V4Mapped, false)
}

/// sendmsg(2) of AF_INET6 UDP sockets to an IPv4-mapped ClusterIP. (On
/// current kernels `sendmsg4` already sees these; older ones ran only
/// this hook.)
#[inline(always)]
pub fn sendmsg6(ctx: &SockAddrContext) -> i32 {
    forward(ctx, Family::V4Mapped, true)
}

/// recvmsg(2) and getpeername(2) of AF_INET6 sockets: an IPv4-mapped
/// backend is shown as the IPv4-mapped ClusterIP.
#[inline(always)]
pub fn reverse6(ctx: &SockAddrContext) -> i32 {
    reverse(ctx, Family::V4Mapped)
}

#[inline(always)]
fn reverse(ctx: &SockAddrContext, family: Family) -> i32 {
    let Some(address_be) = ipv4_of(ctx, family) else {
        return ALLOW;
    };
    // SAFETY: the context pointer is valid for the program run.
    let port_be = unsafe { (*ctx.sock_addr).user_port as u16 };
    let key = SockRevNatKey {
        // SAFETY: plain helper call on the program's context.
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        backend_address_be: address_be,
        backend_port_be: port_be,
        _pad: [0; 2],
    };
    // SAFETY: copied out at once.
    if let Some(service) = unsafe { SOCK_REVERSE_NAT.get(key) }.copied() {
        set_address(
            ctx,
            family,
            service.service_address_be,
            service.service_port_be,
        );
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

#[inline(always)]
fn forward(ctx: &SockAddrContext, family: Family, is_sendmsg: bool) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the context pointer is valid for the program run.
    let (port_be, protocol) = unsafe { ((*sa).user_port as u16, (*sa).protocol as u8) };
    if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
        return ALLOW;
    }
    let Some(address_be) = ipv4_of(ctx, family) else {
        return ALLOW;
    };
    let bucket = lb::service_filter_index(address_be, port_be, protocol);
    if !SERVICE_FILTER.get(bucket).is_some_and(|&n| n > 0) {
        return ALLOW;
    }
    // SAFETY: copied out at once.
    let Some(service) =
        (unsafe { SERVICES.get(ServiceKey::new(address_be, port_be, protocol)) }).copied()
    else {
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
        events::no_backend(ctx, address_be, port_be, protocol);
        if features::has(SET_RETVAL) {
            // SAFETY: plain helper call; makes the syscall fail with
            // ECONNREFUSED instead of the default EPERM.
            unsafe { bpf_set_retval(-ECONNREFUSED) };
        }
        return REFUSE;
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
    let Some(backend) = slot_backend(&service, slot) else {
        count(Counter::Error);
        return ALLOW;
    };
    let key = SockRevNatKey {
        cookie,
        backend_address_be: backend.address_be,
        backend_port_be: backend.port_be,
        _pad: [0; 2],
    };
    let value = SockRevNatValue {
        service_address_be: address_be,
        service_port_be: port_be,
        rev_nat_low: service.rev_nat_low,
    };
    // Every datagram of an unconnected socket comes through sendmsg: only
    // write the reverse entry when it is not already there.
    // SAFETY: copied out at once.
    let known = is_sendmsg && unsafe { SOCK_REVERSE_NAT.get(key) }.copied() == Some(value);
    if !known && SOCK_REVERSE_NAT.insert(key, value, 0).is_err() {
        count(Counter::Error);
        events::sock_reverse_nat_insert_failed(ctx);
    }
    set_address(ctx, family, backend.address_be, backend.port_be);
    count(Counter::SockTranslated);
    ALLOW
}

#[inline(always)]
fn slot_backend(service: &ServiceValue, slot: u16) -> Option<Backend> {
    let backend_id = SLOTS.get(service.slot_index(slot))?.backend_id;
    BACKENDS
        .get(backend_id)
        .copied()
        .filter(Backend::is_present_v4)
}
