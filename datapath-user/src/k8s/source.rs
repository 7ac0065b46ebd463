//! Where objects come from: the API server (kube-rs watchers, which list,
//! watch, and re-list on 410 Gone) or a directory of manifests. Both send
//! the same messages into the agent's store.

use std::{
    collections::{BTreeMap, BTreeSet},
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
    IssueKind, Object, ObjectKey,
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
    /// The first complete set misses objects that could not be read: the
    /// agent must not prune frontends nothing seems to ask for.
    Incomplete(String),
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
    // Only the fields translation reads are kept (see `view`).
    let services = forward(services, Kind::Service, |s| Object::from(&s), tx.clone());
    let slices = forward(slices, Kind::EndpointSlice, |s| Object::from(&s), tx);
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
                let object = wrap(object);
                SourceMessage::Change(Change::Deleted(object.kind(), object.key().clone()))
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

/// What the source remembers of a file: its stamp and which objects it
/// defined (keys only: the objects themselves live in the store alone).
struct FileState {
    stamp: Stamp,
    keys: BTreeSet<(Kind, ObjectKey)>,
}

/// Reads every manifest in `dir` now and again whenever a file changes
/// (polled every `interval`), until the receiver is dropped.
///
/// A changed file sends its objects (the store ignores unchanged ones)
/// and deletions for the objects it no longer defines. A file with an
/// unreadable document sends nothing: the store keeps what the file last
/// said, so a typo in one edit never withdraws services being served.
pub async fn watch_dir(dir: PathBuf, interval: Duration, tx: mpsc::Sender<SourceMessage>) {
    let mut files: BTreeMap<PathBuf, FileState> = BTreeMap::new();
    // A changed file is read once its stamp has held still for a poll: a
    // file being written in place (not renamed into place) is not read
    // half-written, which could parse cleanly and withdraw services.
    let mut settling: BTreeMap<PathBuf, Stamp> = BTreeMap::new();
    let mut first = true;
    // The first read had unreadable documents: the agent must not prune
    // what a previous agent programmed from them.
    let mut first_incomplete = false;
    let mut dir_error: Option<String> = None;
    // The first complete read, sent as one replacement.
    let mut initial: Vec<Object> = Vec::new();
    loop {
        let mut messages = Vec::new();
        // Sent after every file is read, minus what another file still
        // defines (an object moved between files is not deleted).
        let mut deletions: BTreeSet<(Kind, ObjectKey)> = BTreeSet::new();
        let mut problems = Vec::new();
        match list_manifests(&dir) {
            Ok(paths) => {
                dir_error = None;
                let removed: Vec<PathBuf> = files
                    .keys()
                    .filter(|p| !paths.contains(p))
                    .cloned()
                    .collect();
                for path in removed {
                    if let Some(state) = files.remove(&path) {
                        deletions.extend(state.keys);
                    }
                }
                settling.retain(|path, _| paths.contains(path));
                let mut unsettled = false;
                for path in paths {
                    let Some(now) = stamp(&path) else { continue };
                    if files.get(&path).is_some_and(|f| f.stamp == now) {
                        settling.remove(&path);
                        continue;
                    }
                    if settling.get(&path) != Some(&now) {
                        settling.insert(path, now);
                        unsettled = true;
                        continue;
                    }
                    settling.remove(&path);
                    let text = match std::fs::read_to_string(&path) {
                        Ok(text) => text,
                        Err(e) => {
                            problems.push(format!("{}: {e}", path.display()));
                            continue;
                        }
                    };
                    let parsed =
                        manifest::parse_with(&text, &path.display().to_string(), |t| t.view());
                    drop(text);
                    problems.extend(parsed.errors.iter().map(ManifestError::to_string));
                    first_incomplete |= first && !parsed.errors.is_empty();
                    let previous = files.remove(&path);
                    if !parsed.errors.is_empty()
                        && let Some(mut previous) = previous
                    {
                        problems.push(format!(
                            "{}: keeping what it defined before ({} objects) until it reads cleanly",
                            path.display(),
                            previous.keys.len()
                        ));
                        // Not re-read until it changes again.
                        previous.stamp = now;
                        files.insert(path, previous);
                        continue;
                    }
                    let keys: BTreeSet<(Kind, ObjectKey)> = parsed
                        .objects
                        .iter()
                        .map(|o| (o.kind(), o.key().clone()))
                        .collect();
                    deletions.extend(
                        previous
                            .map(|p| p.keys)
                            .unwrap_or_default()
                            .into_iter()
                            .filter(|k| !keys.contains(k)),
                    );
                    if first {
                        initial.extend(parsed.objects);
                    } else {
                        messages.extend(
                            parsed
                                .objects
                                .into_iter()
                                .map(|o| SourceMessage::Change(Change::Applied(o))),
                        );
                    }
                    files.insert(path, FileState { stamp: now, keys });
                }
                for state in files.values() {
                    for key in &state.keys {
                        deletions.remove(key);
                    }
                }
                messages.extend(
                    deletions
                        .into_iter()
                        .map(|(kind, key)| SourceMessage::Change(Change::Deleted(kind, key))),
                );
                if first && !unsettled {
                    // The first complete read replaces whatever the store
                    // had, and tells the agent it may sync.
                    let (services, slices): (Vec<Object>, Vec<Object>) =
                        std::mem::take(&mut initial)
                            .into_iter()
                            .partition(|o| o.kind() == Kind::Service);
                    messages.push(SourceMessage::Change(Change::Replaced(
                        Kind::Service,
                        services,
                    )));
                    messages.push(SourceMessage::Change(Change::Replaced(
                        Kind::EndpointSlice,
                        slices,
                    )));
                    if first_incomplete {
                        messages.push(SourceMessage::Incomplete(format!(
                            "a manifest in {} could not be read",
                            dir.display()
                        )));
                    }
                    messages.push(SourceMessage::Synced(Kind::Service));
                    messages.push(SourceMessage::Synced(Kind::EndpointSlice));
                    first = false;
                }
            }
            // An unreadable directory is not an empty cluster: nothing is
            // reported (and so nothing withdrawn) until it reads again.
            Err(e) => {
                let message = format!("reading --from-dir {}: {e}", dir.display());
                if dir_error.as_ref() != Some(&message) {
                    problems.push(message.clone());
                    dir_error = Some(message);
                }
            }
        }
        let problems = problems.into_iter().map(|message| SourceMessage::Problem {
            kind: IssueKind::Invalid,
            message,
        });
        for message in problems.chain(messages) {
            if tx.send(message).await.is_err() {
                return;
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
