//! Where objects come from: the API server (kube-rs watchers, which list,
//! watch, and re-list on 410 Gone) or a directory of manifests. Both send
//! the same messages into the agent's store.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use futures::{Stream, StreamExt};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};
use tokio::sync::mpsc;

use super::{
    IssueKind, Object,
    manifest::{self, ManifestError},
    store::{Change, Kind},
    translate::{HEADLESS_LABEL, SERVICE_PROXY_NAME_LABEL},
};

/// What a source tells the agent.
#[derive(Debug)]
pub enum SourceMessage {
    Change(Change),
    /// The first complete set of this kind has been delivered.
    Synced(Kind),
    /// Something could not be read; everything else still is.
    Problem {
        kind: IssueKind,
        message: String,
    },
}

/// Watches Services and EndpointSlices through `client` until the
/// receiver is dropped. Connection errors are retried with backoff.
pub async fn watch_api(client: Client, tx: mpsc::Sender<SourceMessage>) {
    // The same filters kube-proxy applies (server-side, less traffic).
    let services = watcher(
        Api::<Service>::all(client.clone()),
        watcher::Config::default().labels(&format!("!{SERVICE_PROXY_NAME_LABEL}")),
    );
    let slices = watcher(
        Api::<EndpointSlice>::all(client),
        watcher::Config::default().labels(&format!("!{HEADLESS_LABEL}")),
    );
    let services = forward(
        services,
        Kind::Service,
        |s| Object::Service(Box::new(s)),
        tx.clone(),
    );
    let slices = forward(
        slices,
        Kind::EndpointSlice,
        |s| Object::EndpointSlice(Box::new(s)),
        tx,
    );
    tokio::join!(services, slices);
}

async fn forward<K, S>(
    stream: S,
    kind: Kind,
    wrap: impl Fn(K) -> Object,
    tx: mpsc::Sender<SourceMessage>,
) where
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
    K: Clone + std::fmt::Debug + Send + 'static,
{
    let stream = stream.default_backoff();
    futures::pin_mut!(stream);
    let mut listing: Option<Vec<Object>> = None;
    let mut synced = false;
    while let Some(item) = stream.next().await {
        let message = match item {
            Ok(watcher::Event::Init) => {
                listing = Some(Vec::new());
                continue;
            }
            Ok(watcher::Event::InitApply(object)) => {
                listing.get_or_insert_with(Vec::new).push(wrap(object));
                continue;
            }
            Ok(watcher::Event::InitDone) => {
                let objects = listing.take().unwrap_or_default();
                if tx
                    .send(SourceMessage::Change(Change::Replaced(kind, objects)))
                    .await
                    .is_err()
                {
                    return;
                }
                if !synced {
                    synced = true;
                    SourceMessage::Synced(kind)
                } else {
                    continue;
                }
            }
            Ok(watcher::Event::Apply(object)) => {
                SourceMessage::Change(Change::Applied(wrap(object)))
            }
            Ok(watcher::Event::Delete(object)) => {
                SourceMessage::Change(Change::Deleted(wrap(object)))
            }
            Err(e) => SourceMessage::Problem {
                kind: IssueKind::Datapath,
                message: format!("watching {kind:?}s: {e} (retrying)"),
            },
        };
        if tx.send(message).await.is_err() {
            return;
        }
    }
}

/// A file's identity for change detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    // Follows symlinks: ConfigMap volumes swap a `..data` link.
    let meta = std::fs::metadata(path).ok()?;
    meta.is_file().then(|| Stamp {
        modified: meta.modified().ok(),
        len: meta.len(),
        inode: meta.ino(),
    })
}

struct FileState {
    stamp: Stamp,
    objects: Vec<Object>,
}

/// Reads every manifest in `dir` now and again whenever a file changes
/// (polled every `interval`), until the receiver is dropped.
///
/// A file with an unreadable document keeps its last good content (or,
/// when it never had one, its readable documents): a typo in one edit
/// never withdraws services that were being served.
pub async fn watch_dir(dir: PathBuf, interval: Duration, tx: mpsc::Sender<SourceMessage>) {
    let mut files: BTreeMap<PathBuf, FileState> = BTreeMap::new();
    let mut first = true;
    let mut dir_error: Option<String> = None;
    loop {
        let mut changed = false;
        let mut problems = Vec::new();
        let listed = list_manifests(&dir);
        let readable = listed.is_ok();
        match listed {
            Ok(paths) => {
                dir_error = None;
                files.retain(|path, _| {
                    let keep = paths.contains(path);
                    changed |= !keep;
                    keep
                });
                for path in paths {
                    let Some(now) = stamp(&path) else { continue };
                    if files.get(&path).is_some_and(|f| f.stamp == now) {
                        continue;
                    }
                    changed = true;
                    let text = match std::fs::read_to_string(&path) {
                        Ok(text) => text,
                        Err(e) => {
                            problems.push(format!("{}: {e}", path.display()));
                            continue;
                        }
                    };
                    let parsed = manifest::parse(&text, &path.display().to_string());
                    problems.extend(parsed.errors.iter().map(ManifestError::to_string));
                    let previous = files.remove(&path);
                    let objects = match previous {
                        Some(previous) if !parsed.errors.is_empty() => {
                            problems.push(format!(
                                "{}: keeping its last good content ({} objects) until it reads cleanly",
                                path.display(),
                                previous.objects.len()
                            ));
                            previous.objects
                        }
                        _ => parsed.objects,
                    };
                    files.insert(
                        path,
                        FileState {
                            stamp: now,
                            objects,
                        },
                    );
                }
            }
            Err(e) => {
                let message = format!("reading --from-dir {}: {e}", dir.display());
                if dir_error.as_ref() != Some(&message) {
                    problems.push(message.clone());
                    dir_error = Some(message);
                }
            }
        }
        for message in problems {
            if tx
                .send(SourceMessage::Problem {
                    kind: IssueKind::Invalid,
                    message,
                })
                .await
                .is_err()
            {
                return;
            }
        }
        // An unreadable directory is not an empty cluster: nothing is
        // reported (and so nothing withdrawn) until it reads again.
        if readable && (changed || first) {
            let (mut services, mut slices) = (Vec::new(), Vec::new());
            for state in files.values() {
                for object in &state.objects {
                    match object {
                        Object::Service(_) => services.push(object.clone()),
                        Object::EndpointSlice(_) => slices.push(object.clone()),
                    }
                }
            }
            let mut messages = vec![
                SourceMessage::Change(Change::Replaced(Kind::Service, services)),
                SourceMessage::Change(Change::Replaced(Kind::EndpointSlice, slices)),
            ];
            if first {
                messages.push(SourceMessage::Synced(Kind::Service));
                messages.push(SourceMessage::Synced(Kind::EndpointSlice));
                first = false;
            }
            for message in messages {
                if tx.send(message).await.is_err() {
                    return;
                }
            }
        }
        tokio::time::sleep(interval).await;
    }
}

fn list_manifests(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let hidden = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if !hidden && manifest::is_manifest(&path) {
            paths.push(path);
        }
    }
    paths.sort();
    Ok(paths)
}
