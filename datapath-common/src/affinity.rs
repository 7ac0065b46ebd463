//! `sessionAffinity: ClientIP` (`docs/affinity-plan.md`): which backend a
//! client's new flow takes when its service remembers clients. Pure, so
//! that the programs of both paths and the tests share one rule.
//!
//! kube-proxy's rule (iptables `recent --rcheck --seconds T --reap`,
//! nftables sets with a timeout): a client whose last new connection to
//! the service port was less than `T` ago goes to the endpoint it went to
//! then, as long as that endpoint is still one of the port's; every new
//! connection refreshes the client's entry. Only new connections count
//! (packets of established flows never reach the nat table), so a
//! long-lived connection does not keep its client's affinity alive.

/// `sessionAffinityConfig.clientIP.timeoutSeconds` when the field is
/// absent (the API server's default).
pub const DEFAULT_TIMEOUT_SECONDS: u32 = 10_800;
/// The largest timeout the API server accepts (one day).
pub const MAX_TIMEOUT_SECONDS: u32 = 86_400;

/// What a new flow does about its client's affinity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Goes to this backend id again.
    Keep(u32),
    /// Balanced as any new flow (then remembered).
    Choose,
}

/// The decision for a new flow of a client whose remembered entry is
/// `remembered` (`last_used`, `backend_id`; `None`: none, or evicted),
/// at `now`, with the service's `timeout` (in the same clock's units as
/// `now` and `last_used`: jiffies in the programs). `still_member`: the
/// remembered backend is still one of the service's (a backend that left
/// re-balances its clients at once, as the endpoint chain that held
/// kube-proxy's list goes with it); asked only of an entry within its
/// timeout (in the programs it is a hash lookup). An entry stamped after
/// `now` (a clock that went back, a stamp from another clock) is not
/// trusted.
#[inline(always)]
pub fn decide(
    remembered: Option<(u64, u32)>,
    now: u64,
    timeout: u64,
    still_member: impl FnOnce(u32) -> bool,
) -> Decision {
    match remembered {
        // Strictly less, as `recent --seconds`: an entry exactly
        // `timeout` old has expired.
        Some((last_used, backend_id))
            if last_used <= now && now - last_used < timeout && still_member(backend_id) =>
        {
            Decision::Keep(backend_id)
        }
        _ => Decision::Choose,
    }
}

/// Whether a new flow that went to `chosen` writes its client's entry:
/// always when the entry names another backend (or none), else only when
/// its stamp is more than `refresh` old, or more than a quarter of
/// `timeout` (a timeout near the refresh interval would otherwise expire
/// before its stamp came due). kube-proxy's `--set` refreshes on every
/// new connection; stamping at most once a refresh interval (conntrack's,
/// one second) keeps a client opening connections in a loop from writing
/// the map on each, and lets the entry expire at most that much (or a
/// quarter of its timeout) early.
#[inline(always)]
pub const fn should_remember(
    remembered: Option<(u64, u32)>,
    chosen: u32,
    now: u64,
    refresh: u64,
    timeout: u64,
) -> bool {
    let due = if timeout / 4 < refresh {
        timeout / 4
    } else {
        refresh
    };
    match remembered {
        Some((last_used, backend_id)) if backend_id == chosen && last_used <= now => {
            now - last_used > due
        }
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HZ: u64 = 250;
    const T: u64 = 10 * HZ;

    #[test]
    fn a_recent_client_keeps_its_backend() {
        assert_eq!(
            decide(Some((1000, 7)), 1000, T, |_| true),
            Decision::Keep(7)
        );
        assert_eq!(
            decide(Some((1000, 7)), 1000 + T - 1, T, |_| true),
            Decision::Keep(7)
        );
    }

    #[test]
    fn an_entry_as_old_as_the_timeout_has_expired() {
        assert_eq!(
            decide(Some((1000, 7)), 1000 + T, T, |_| true),
            Decision::Choose
        );
        assert_eq!(
            decide(Some((1000, 7)), 1000 + 5 * T, T, |_| true),
            Decision::Choose
        );
    }

    #[test]
    fn a_backend_that_left_rebalances_its_clients_at_once() {
        assert_eq!(
            decide(Some((1000, 7)), 1001, T, |_| false),
            Decision::Choose
        );
    }

    #[test]
    fn a_kept_client_is_stamped_once_a_refresh_interval() {
        const R: u64 = HZ;
        assert!(should_remember(None, 7, 1000, R, T));
        assert!(
            should_remember(Some((1000, 3)), 7, 1000, R, T),
            "another backend"
        );
        assert!(!should_remember(Some((1000, 7)), 7, 1000 + R, R, T));
        assert!(should_remember(Some((1000, 7)), 7, 1001 + R, R, T));
        assert!(
            should_remember(Some((2000, 7)), 7, 1000, R, T),
            "from the future"
        );
    }

    /// A timeout as short as the refresh interval (`timeoutSeconds: 1`):
    /// a client connecting every 0.9 s keeps its backend for good, as
    /// with kube-proxy, because its entry is stamped every quarter of it.
    #[test]
    fn a_short_timeout_is_stamped_before_it_expires() {
        const R: u64 = HZ;
        let (mut stamp, mut now) = (1000, 1000);
        for _ in 0..20 {
            now += HZ * 9 / 10;
            assert_eq!(
                decide(Some((stamp, 7)), now, HZ, |_| true),
                Decision::Keep(7)
            );
            if should_remember(Some((stamp, 7)), 7, now, R, HZ) {
                stamp = now;
            }
        }
        // With the refresh interval alone it would have expired.
        assert!(!should_remember(
            Some((1000, 7)),
            7,
            1000 + HZ * 9 / 10,
            R,
            4 * R
        ));
    }

    #[test]
    fn no_entry_or_one_from_the_future_is_balanced() {
        assert_eq!(decide(None, 1000, T, |_| true), Decision::Choose);
        assert_eq!(decide(Some((2000, 7)), 1000, T, |_| true), Decision::Choose);
        // Near the top of the clock: no overflow.
        assert_eq!(
            decide(Some((u64::MAX - 1, 7)), u64::MAX, T, |_| true),
            Decision::Keep(7)
        );
    }
}
