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
/// kube-proxy's list goes with it). An entry stamped after `now` (a
/// clock that went back, a stamp from another clock) is not trusted.
#[inline(always)]
pub const fn decide(
    remembered: Option<(u64, u32)>,
    now: u64,
    timeout: u64,
    still_member: bool,
) -> Decision {
    match remembered {
        Some((last_used, backend_id)) if still_member && last_used <= now => {
            // Strictly less, as `recent --seconds`: an entry exactly
            // `timeout` old has expired.
            if now - last_used < timeout {
                Decision::Keep(backend_id)
            } else {
                Decision::Choose
            }
        }
        _ => Decision::Choose,
    }
}

/// Whether a new flow that went to `chosen` writes its client's entry:
/// always when the entry names another backend (or none), else only when
/// its stamp is more than `refresh` old. kube-proxy's `--set` refreshes
/// on every new connection; stamping at most once a refresh interval
/// (conntrack's, one second) keeps a client opening connections in a loop
/// from writing the map on each, and lets the entry expire at most that
/// much early.
#[inline(always)]
pub const fn should_remember(
    remembered: Option<(u64, u32)>,
    chosen: u32,
    now: u64,
    refresh: u64,
) -> bool {
    match remembered {
        Some((last_used, backend_id)) if backend_id == chosen && last_used <= now => {
            now - last_used > refresh
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
        assert_eq!(decide(Some((1000, 7)), 1000, T, true), Decision::Keep(7));
        assert_eq!(
            decide(Some((1000, 7)), 1000 + T - 1, T, true),
            Decision::Keep(7)
        );
    }

    #[test]
    fn an_entry_as_old_as_the_timeout_has_expired() {
        assert_eq!(decide(Some((1000, 7)), 1000 + T, T, true), Decision::Choose);
        assert_eq!(
            decide(Some((1000, 7)), 1000 + 5 * T, T, true),
            Decision::Choose
        );
    }

    #[test]
    fn a_backend_that_left_rebalances_its_clients_at_once() {
        assert_eq!(decide(Some((1000, 7)), 1001, T, false), Decision::Choose);
    }

    #[test]
    fn a_kept_client_is_stamped_once_a_refresh_interval() {
        const R: u64 = HZ;
        assert!(should_remember(None, 7, 1000, R));
        assert!(
            should_remember(Some((1000, 3)), 7, 1000, R),
            "another backend"
        );
        assert!(!should_remember(Some((1000, 7)), 7, 1000 + R, R));
        assert!(should_remember(Some((1000, 7)), 7, 1001 + R, R));
        assert!(
            should_remember(Some((2000, 7)), 7, 1000, R),
            "from the future"
        );
    }

    #[test]
    fn no_entry_or_one_from_the_future_is_balanced() {
        assert_eq!(decide(None, 1000, T, true), Decision::Choose);
        assert_eq!(decide(Some((2000, 7)), 1000, T, true), Decision::Choose);
        // Near the top of the clock: no overflow.
        assert_eq!(
            decide(Some((u64::MAX - 1, 7)), u64::MAX, T, true),
            Decision::Keep(7)
        );
    }
}
