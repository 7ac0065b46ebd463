//! Reading Services and EndpointSlices from Kubernetes YAML or JSON text:
//! multi-document files, `kind: List`, and anything else skipped by kind.

use std::{fmt, path::Path};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde::Deserialize;

use super::view::{ServiceView, SliceView};

/// An object as the agent keeps it: the fields translation reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Object {
    Service(ServiceView),
    EndpointSlice(SliceView),
}

impl Object {
    pub fn kind(&self) -> super::store::Kind {
        match self {
            Object::Service(_) => super::store::Kind::Service,
            Object::EndpointSlice(_) => super::store::Kind::EndpointSlice,
        }
    }

    pub fn key(&self) -> &super::ObjectKey {
        match self {
            Object::Service(s) => &s.key,
            Object::EndpointSlice(s) => &s.key,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Object::Service(s) => format!("Service {}", s.key),
            Object::EndpointSlice(s) => format!("EndpointSlice {}", s.key),
        }
    }
}

impl From<&Service> for Object {
    fn from(service: &Service) -> Self {
        Object::Service(ServiceView::from(service))
    }
}

impl From<&EndpointSlice> for Object {
    fn from(slice: &EndpointSlice) -> Self {
        Object::EndpointSlice(SliceView::from(slice))
    }
}

/// An object as read, typed.
#[derive(Clone, Debug, PartialEq)]
pub enum Typed {
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
}

impl Typed {
    /// The fields the agent keeps.
    pub fn view(&self) -> Object {
        match self {
            Typed::Service(s) => Object::Service(ServiceView::from(&**s)),
            Typed::EndpointSlice(s) => Object::EndpointSlice(SliceView::from(&**s)),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Typed::Service(s) => format!("Service {}", super::ObjectKey::of_service(s)),
            Typed::EndpointSlice(s) => format!("EndpointSlice {}", super::ObjectKey::of_slice(s)),
        }
    }
}

/// A document that could not be read; the others in the file still are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    /// File (or other origin) and 1-based document number.
    pub origin: String,
    pub document: usize,
    /// "Service ns/name" when the document got that far.
    pub object: Option<String>,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} document {}", self.origin, self.document)?;
        if let Some(object) = &self.object {
            write!(f, " ({object})")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ManifestError {}

/// What a file held.
#[derive(Debug)]
pub struct Parsed<T = Typed> {
    pub objects: Vec<T>,
    pub errors: Vec<ManifestError>,
    /// Documents of other kinds (Deployments…), skipped.
    pub skipped: usize,
}

/// Whether `path` looks like a manifest by its extension.
pub fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

/// Parses every document of `text` (YAML, which includes JSON).
pub fn parse(text: &str, origin: &str) -> Parsed {
    parse_with(text, origin, |typed| typed)
}

/// `parse`, converting each object as soon as it is read (the agent keeps
/// views: a large file never exists as typed objects all at once).
pub fn parse_with<T>(text: &str, origin: &str, convert: impl Fn(Typed) -> T) -> Parsed<T> {
    let mut parsed = Parsed {
        objects: Vec::new(),
        errors: Vec::new(),
        skipped: 0,
    };
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let number = index + 1;
        let value = match serde_yaml::Value::deserialize(document) {
            Ok(serde_yaml::Value::Null) => continue, // an empty document ("---" at the end)
            Ok(value) => value,
            Err(e) => {
                parsed.errors.push(ManifestError {
                    origin: origin.to_owned(),
                    document: number,
                    object: None,
                    message: format!("not valid YAML: {e}"),
                });
                // The YAML stream cannot be resynchronised after a syntax
                // error: later documents are lost, and the caller keeps
                // this file's previous objects.
                break;
            }
        };
        read_value(value, origin, number, &mut parsed, &convert);
    }
    parsed
}

fn read_value<T>(
    value: serde_yaml::Value,
    origin: &str,
    number: usize,
    parsed: &mut Parsed<T>,
    convert: &impl Fn(Typed) -> T,
) {
    let text = |key: &str| value.get(key).and_then(|v| v.as_str()).map(str::to_owned);
    let kind = text("kind");
    let api_version = text("apiVersion");
    let name = value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .unwrap_or("?")
        .to_owned();
    let error = |object: Option<String>, message: String| ManifestError {
        origin: origin.to_owned(),
        document: number,
        object,
        message,
    };
    match (api_version.as_deref(), kind.as_deref()) {
        (Some("v1"), Some("Service")) => match serde_yaml::from_value::<Service>(value) {
            Ok(service) => parsed
                .objects
                .push(convert(Typed::Service(Box::new(service)))),
            Err(e) => parsed
                .errors
                .push(error(Some(format!("Service {name}")), e.to_string())),
        },
        (Some("discovery.k8s.io/v1"), Some("EndpointSlice")) => {
            match serde_yaml::from_value::<EndpointSlice>(value) {
                Ok(slice) => parsed
                    .objects
                    .push(convert(Typed::EndpointSlice(Box::new(slice)))),
                Err(e) => parsed
                    .errors
                    .push(error(Some(format!("EndpointSlice {name}")), e.to_string())),
            }
        }
        (Some(version), Some("EndpointSlice")) => parsed.errors.push(error(
            Some(format!("EndpointSlice {name}")),
            format!("apiVersion {version} is not served; use discovery.k8s.io/v1"),
        )),
        (_, Some("List") | Some("ServiceList") | Some("EndpointSliceList")) => {
            let items = value.get("items").and_then(|i| i.as_sequence()).cloned();
            for item in items.unwrap_or_default() {
                read_value(item, origin, number, parsed, convert);
            }
        }
        (_, Some(_)) => parsed.skipped += 1,
        (_, None) => parsed.errors.push(error(None, "no `kind` field".into())),
    }
}
