//! Names shared by every step on the Kubernetes side: an object's key and
//! the labels kube-proxy (and so the agent) reads.

use std::{fmt, sync::Arc};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde::Serialize;

/// Label naming the Service an EndpointSlice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// A service with this label is proxied by someone else (kube-proxy skips
/// it too).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Set by the EndpointSlice controller on slices of headless services.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

/// A namespaced object's identity: `namespace/name` in one shared,
/// immutable string. The agent keeps several copies of every key (the
/// store, its indexes, the reconciler's owners, the directory source's
/// files, the dirty sets of a sync); a clone shares the text instead of
/// allocating two strings (at 50,000 services that was tens of MB).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ObjectKey {
    text: Arc<str>,
    /// Where `namespace` ends in `text` (the `/` that follows it).
    split: u32,
}

impl ObjectKey {
    pub fn new(namespace: impl AsRef<str>, name: impl AsRef<str>) -> Self {
        let (namespace, name) = (namespace.as_ref(), name.as_ref());
        let mut text = String::with_capacity(namespace.len() + 1 + name.len());
        text.push_str(namespace);
        text.push('/');
        text.push_str(name);
        Self {
            text: text.into(),
            // A namespace is a DNS label (at most 63 bytes); not even a
            // file's can reach 4 GiB.
            split: namespace.len() as u32,
        }
    }

    pub fn namespace(&self) -> &str {
        &self.text[..self.split as usize]
    }

    pub fn name(&self) -> &str {
        &self.text[self.split as usize + 1..]
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
        f.write_str(&self.text)
    }
}

impl fmt::Debug for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectKey")
            .field("namespace", &self.namespace())
            .field("name", &self.name())
            .finish()
    }
}

/// By namespace, then name (as the two strings it stands for). On bytes:
/// sorted sets of keys compare millions of times in a large sync, and
/// `str` slicing checks character boundaries each time.
impl Ord for ObjectKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        if Arc::ptr_eq(&self.text, &other.text) {
            return std::cmp::Ordering::Equal;
        }
        let (a, b) = (self.text.as_bytes(), other.text.as_bytes());
        let (a_split, b_split) = (self.split as usize, other.split as usize);
        a[..a_split]
            .cmp(&b[..b_split])
            .then_with(|| a[a_split + 1..].cmp(&b[b_split + 1..]))
    }
}

impl PartialOrd for ObjectKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// As `{namespace, name}`.
impl Serialize for ObjectKey {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut out = serializer.serialize_struct("ObjectKey", 2)?;
        out.serialize_field("namespace", self.namespace())?;
        out.serialize_field("name", self.name())?;
        out.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_keeps_its_parts_and_orders_by_namespace_then_name() {
        let key = ObjectKey::new("default", "echo");
        assert_eq!((key.namespace(), key.name()), ("default", "echo"));
        assert_eq!(key.to_string(), "default/echo");
        // As the pair of strings: "a" before "a-b" although '/' > '-'.
        let mut keys = [ObjectKey::new("a-b", "x"), ObjectKey::new("a", "y")];
        keys.sort();
        assert_eq!(keys[0].namespace(), "a");
        // A slash in a name (a file's, not the API server's) stays in it.
        let odd = ObjectKey::new("ns", "a/b");
        assert_eq!((odd.namespace(), odd.name()), ("ns", "a/b"));
        assert_ne!(odd, ObjectKey::new("ns/a", "b"));
        assert_eq!(
            serde_json::to_string(&key).unwrap(),
            r#"{"namespace":"default","name":"echo"}"#
        );
    }
}
