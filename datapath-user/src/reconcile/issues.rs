//! The issues the reconciler raises, each naming the object, the map or
//! the limit (what `/metrics` and the log report per service).

use crate::{
    k8s::{Issue, IssueKind, ObjectKey},
    maps::ProgramError,
    model::{Family, Frontend},
};

pub(super) fn limit_issue<A: Family>(frontend: &Frontend<A>, map: &str, capacity: u32) -> Issue {
    Issue {
        kind: IssueKind::Limit,
        object: String::new(),
        field: "spec.ports".into(),
        reason: format!(
            "{frontend}: the {map} map is full ({capacity} entries); {}",
            raise(map)
        ),
    }
}

pub(super) fn program_issue(error: ProgramError) -> Issue {
    let (kind, field) = match &error {
        ProgramError::TooManyBackends { .. } => (IssueKind::Limit, "endpoints"),
        ProgramError::PortZero { .. } => (IssueKind::Invalid, "ports"),
        ProgramError::BackendIdOutOfRange { .. } | ProgramError::RevNatIdOutOfRange { .. } => {
            (IssueKind::Limit, "spec.ports")
        }
        // Room a prune may free: retried after it, as a full map is.
        ProgramError::Map { .. } | ProgramError::SlotsFull { .. } => {
            (IssueKind::Datapath, "spec.ports")
        }
    };
    let reason = match &error {
        ProgramError::Map {
            map, error: cause, ..
        } if is_full(cause) => {
            format!("{error} ({})", raise(map))
        }
        _ => error.to_string(),
    };
    Issue {
        kind,
        object: String::new(),
        field: field.into(),
        reason,
    }
}

/// True when the kernel refused an entry because the map is full.
fn is_full(error: &aya::maps::MapError) -> bool {
    matches!(
        error,
        aya::maps::MapError::SyscallError(e)
            if matches!(e.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC))
    )
}

/// How an operator makes room in `map`.
fn raise(map: &str) -> &'static str {
    match map {
        datapath_common::maps::SERVICES_MAP => {
            "one entry per frontend (ClusterIP port): raise it with --frontends-max"
        }
        datapath_common::maps::BACKENDS_MAP => "raise it with --backends-max",
        datapath_common::maps::MAGLEV_MAP => {
            "one table per backend set served from outside: raise it with --maglev-tables \
             (the frontend is not served from outside on this node until then)"
        }
        datapath_common::maps::REVERSE_NAT_MAP => {
            "one id per frontend (ClusterIP port): raise it with --frontends-max"
        }
        _ => "raise its size",
    }
}

pub(super) fn datapath_issue(map: &str, reason: String) -> Issue {
    Issue {
        kind: IssueKind::Datapath,
        object: format!("map {map}"),
        field: String::new(),
        reason,
    }
}

pub(super) fn with_object(mut issue: Issue, service: &ObjectKey) -> Issue {
    if issue.object.is_empty() {
        issue.object = format!("Service {service}");
    }
    issue
}
