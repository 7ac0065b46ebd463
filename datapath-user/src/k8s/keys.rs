//! Names shared by every step on the Kubernetes side: an object's key and
//! the labels kube-proxy (and so the agent) reads.

use std::fmt;

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde::Serialize;

/// Label naming the Service an EndpointSlice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// A service with this label is proxied by someone else (kube-proxy skips
/// it too).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Set by the EndpointSlice controller on slices of headless services.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

/// A namespaced object's identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    pub fn of_service(service: &Service) -> Self {
        Self::new(
            service.metadata.namespace.as_deref().unwrap_or("default"),
            service.metadata.name.as_deref().unwrap_or(""),
        )
    }

    pub fn of_slice(slice: &EndpointSlice) -> Self {
        Self::new(
            slice.metadata.namespace.as_deref().unwrap_or("default"),
            slice.metadata.name.as_deref().unwrap_or(""),
        )
    }

    /// The Service an EndpointSlice belongs to, from its label.
    pub fn owner_of_slice(slice: &EndpointSlice) -> Option<Self> {
        let name = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
        Some(Self::new(
            slice.metadata.namespace.as_deref().unwrap_or("default"),
            name.as_str(),
        ))
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}
