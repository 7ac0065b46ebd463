//! The lab's one error: which namespace, which step, why.

/// Errors name the namespace and the step that failed.
#[derive(Debug, thiserror::Error)]
#[error("network namespace {netns}: {step}: {reason}")]
pub struct TopologyError {
    pub netns: String,
    pub step: String,
    pub reason: String,
}

impl TopologyError {
    /// The kernel lacks what the step needs (e.g. the ipvlan driver).
    pub fn is_unsupported(&self) -> bool {
        self.reason.starts_with(IPVLAN_UNSUPPORTED)
    }
}

pub type Result<T> = std::result::Result<T, TopologyError>;

pub(crate) fn err(netns: &str, step: impl Into<String>, reason: impl ToString) -> TopologyError {
    TopologyError {
        netns: netns.to_owned(),
        step: step.into(),
        reason: reason.to_string(),
    }
}

/// What a kernel without the ipvlan driver is told to need.
pub const IPVLAN_UNSUPPORTED: &str =
    "this kernel has no ipvlan driver (build it with CONFIG_IPVLAN=m or =y)";
