//! Kubernetes side of the agent: reading objects, keeping them, and
//! translating them into the frontends the datapath serves.

mod dir_events;
mod interned;
pub mod keys;
pub mod manifest;
pub mod node_facts;
pub mod source;
pub mod store;
pub mod translate;
pub mod view;
mod view_table;

pub use manifest::{Object, Typed};
pub use translate::{
    DesiredFrontend, Endpoint, HealthCheck, Ipv6Serving, Issue, IssueKind, NodeContext, ObjectKey,
    ServiceTranslation, Translation, translate, translate_service, translate_view,
};
