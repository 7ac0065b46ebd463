//! The issues the reconciler raises, each naming the object, the map or
//! the limit (what `/metrics` and the log report per service).

use crate::{
    k8s::{Issue, IssueKind, ObjectKey},
    maps::ProgramError,
    model::Frontend,
};

pub(super) fn limit_issue(frontend: &Frontend, map: &str, capacity: u32) -> Issue {
    Issue {
        kind: IssueKind::Limit,
        object: String::new(),
        field: "spec.ports".into(),
        reason: format!("{frontend}: the {map} map is full ({capacity} entries); raise its size"),
    }
}

pub(super) fn program_issue(error: ProgramError) -> Issue {
    let (kind, field) = match &error {
        ProgramError::TooManyBackends { .. } => (IssueKind::Limit, "endpoints"),
        ProgramError::PortZero { .. } => (IssueKind::Invalid, "ports"),
        ProgramError::BackendIdOutOfRange { .. } | ProgramError::RevNatIdOutOfRange { .. } => {
            (IssueKind::Limit, "spec.ports")
        }
        ProgramError::Map { .. } => (IssueKind::Datapath, "spec.ports"),
    };
    Issue {
        kind,
        object: String::new(),
        field: field.into(),
        reason: error.to_string(),
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
