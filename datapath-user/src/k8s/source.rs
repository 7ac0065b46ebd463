//! Where objects come from: the API server (kube-rs watchers, which list,
//! watch, and re-list on 410 Gone) or a directory of manifests. Both send
//! the same messages into the agent's store.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use futures::{Stream, StreamExt};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{Api, Client, runtime::watcher};
use tokio::sync::mpsc;

use super::{
    IssueKind, Object, ObjectKey,
    dir_events::{DirEvents, Wake},
    keys::{HEADLESS_LABEL, SERVICE_PROXY_NAME_LABEL},
    manifest::{self, ManifestError},
    store::{Change, Kind},
};

/// What a source tells the agent.
#[derive(Debug)]
pub enum SourceMessage {
    Change(Change),
    /// Changes that belong together (one pass over `--from-dir`: a file's
    /// Service and its EndpointSlice), applied in one update.
    Changes(Vec<Change>),
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
    /// This node's zone and addresses (from its Node, with what the
    /// operator gave: `super::node_facts`), at first and whenever they
    /// change.
    Node(NodeFacts),
}

/// This node's zone and addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeFacts {
    pub zone: Option<String>,
    /// Sorted, without repeats.
    pub addresses: Vec<std::net::IpAddr>,
}

/// How failed lists and watches are retried: thousands of agents must not
/// hammer an API server that is already failing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// The pause after the first failure.
    pub initial: Duration,
    /// The longest pause; each failure doubles the last one up to it.
    pub max: Duration,
}

impl Default for Backoff {
    /// kube-proxy's informers back off from 800 ms to 30 s; this is close.
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// The pause after `last` (none: the first failure since success),
    /// before jitter.
    pub fn next(&self, last: Option<Duration>) -> Duration {
        last.map_or(self.initial, |d| (d * 2).min(self.max))
    }

    /// `pause` spread by ±20 %, so that agents that failed together do not
    /// retry together.
    fn jittered(pause: Duration) -> Duration {
        pause.mul_f64(rand::random_range(0.8..1.2))
    }

    /// After a failed list or watch: reports it as an API problem
    /// (`describe` says what failed, given the coming pause), then waits
    /// that pause, longer than `pause` was. False when the agent stopped
    /// listening.
    pub(super) async fn report_and_wait(
        &self,
        pause: &mut Option<Duration>,
        tx: &mpsc::Sender<SourceMessage>,
        describe: impl FnOnce(Duration) -> String,
    ) -> bool {
        let next = self.next(*pause);
        *pause = Some(next);
        let problem = SourceMessage::Problem {
            kind: IssueKind::Api,
            message: describe(next),
        };
        if tx.send(problem).await.is_err() {
            return false;
        }
        tokio::time::sleep(Self::jittered(next)).await;
        true
    }
}

/// kube-proxy's label selector, for both resources: objects of another
/// service proxy, and headless services' objects, are not ours.
pub fn label_selector() -> String {
    format!("!{SERVICE_PROXY_NAME_LABEL},!{HEADLESS_LABEL}")
}

/// Watches Services and EndpointSlices through `client` until the
/// receiver is dropped. Failed lists and watches are retried with a
/// growing back-off (`Backoff::default`).
pub async fn watch_api(client: Client, tx: mpsc::Sender<SourceMessage>) {
    watch_api_with(client, tx, Backoff::default()).await;
}

/// `watch_api` with the given back-off.
pub async fn watch_api_with(client: Client, tx: mpsc::Sender<SourceMessage>, backoff: Backoff) {
    // Filtered server-side, as kube-proxy's informers are; lists are
    // served from the API server's watch cache (resourceVersion=0), as
    // kube-proxy's are, instead of a quorum read of etcd on every start
    // and re-list.
    let mut config = watcher::Config::default()
        .labels(&label_selector())
        .any_semantic();
    // The watch cache does not paginate (it answers a limited list with
    // everything), and kube-rs drops resourceVersion=0 from a limited
    // list, which would turn it back into a quorum read: no limit.
    config.page_size = None;
    let services = watcher(Api::<Service>::all(client.clone()), config.clone());
    let slices = watcher(Api::<EndpointSlice>::all(client), config);
    // Only the fields translation reads are kept (see `view`).
    let services = forward(
        services,
        Kind::Service,
        |s| Object::from(&s),
        tx.clone(),
        backoff,
    );
    let slices = forward(
        slices,
        Kind::EndpointSlice,
        |s| Object::from(&s),
        tx,
        backoff,
    );
    tokio::join!(services, slices);
}

/// Sends a watcher's events on as the agent's messages. The back-off is
/// ours, not kube-rs's: that one is reset by the `Init` event a re-list
/// begins with, so a list that keeps failing was retried after ~1 s
/// forever. Here only a list that completed, or an event, resets it.
async fn forward<K, S>(
    stream: S,
    kind: Kind,
    wrap: impl Fn(K) -> Object,
    tx: mpsc::Sender<SourceMessage>,
    backoff: Backoff,
) where
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
    K: Clone + std::fmt::Debug + Send + 'static,
{
    futures::pin_mut!(stream);
    let mut listing: Option<Vec<Object>> = None;
    let mut synced = false;
    let mut pause: Option<Duration> = None;
    while let Some(item) = stream.next().await {
        if matches!(
            item,
            Ok(watcher::Event::InitDone | watcher::Event::Apply(_) | watcher::Event::Delete(_))
        ) {
            pause = None;
        }
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
            // 410 Gone: the watch fell behind the watch cache's window, a
            // routine event; the watcher lists again at once (it is not a
            // failure of the API server, so no pause and no issue).
            Err(watcher::Error::WatchError(status)) if status.code == 410 => continue,
            Err(e) => {
                let describe = |next| format!("watching {kind:?}s: {e} (retrying in {next:?})");
                if !backoff.report_and_wait(&mut pause, &tx, describe).await {
                    return;
                }
                continue;
            }
        };
        if tx.send(message).await.is_err() {
            return;
        }
    }
}

/// Poll intervals a file may keep changing before the operator is told
/// it is not being read.
const CHANGING_TOO_LONG: u32 = 10;

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
    /// Sorted, without repeats: a set's tree nodes would cost half as
    /// much again per key (100,000 objects in one file).
    keys: Box<[(Kind, ObjectKey)]>,
}

/// Reads every manifest in `dir` now and again whenever a file changes
/// (woken by the directory's change events, `super::dir_events`, and
/// polled every `interval` besides), until the receiver is dropped.
///
/// A changed file sends its objects (the store ignores unchanged ones)
/// and deletions for the objects it no longer defines. A file with an
/// unreadable document sends nothing: the store keeps what the file last
/// said, so a typo in one edit never withdraws services being served.
pub async fn watch_dir(dir: PathBuf, interval: Duration, tx: mpsc::Sender<SourceMessage>) {
    let mut files: BTreeMap<PathBuf, FileState> = BTreeMap::new();
    let (mut events, no_events) = DirEvents::watch(&dir);
    if let Some(message) = no_events {
        tracing::warn!("{message}");
    }
    // What woke this pass: files it names as complete (renamed into
    // place) are read at once.
    let mut wake = Wake::default();
    // Any other changed file is read once its stamp has held still for a
    // whole `interval` (since it was first seen so), however many passes
    // events cause meanwhile: a file being written in place is not read
    // half-written, which could parse cleanly and withdraw services.
    let mut settling: BTreeMap<PathBuf, (Stamp, Instant)> = BTreeMap::new();
    // Since when each unread file has been changing, and whether the
    // operator was told: a file rewritten in place more often than
    // `interval` is never read (nor, at start-up, is anything synced).
    let mut changing_since: BTreeMap<PathBuf, (Instant, bool)> = BTreeMap::new();
    let mut first = true;
    // The first read had unreadable documents: the agent must not prune
    // what a previous agent programmed from them.
    let mut first_incomplete = false;
    let mut dir_error: Option<String> = None;
    // The first complete read, sent as one replacement.
    // Per file: a file rewritten or removed before that read completes
    // must not leave its earlier objects in it.
    let mut initial: BTreeMap<PathBuf, Vec<Object>> = BTreeMap::new();
    loop {
        let mut messages = Vec::new();
        // Sent after every file is read, minus what another file still
        // defines (an object moved between files is not deleted).
        let mut deletions: BTreeSet<(Kind, ObjectKey)> = BTreeSet::new();
        let mut problems = Vec::new();
        match list_manifests(&dir) {
            Ok(paths) => {
                dir_error = None;
                // A set: with a manifest per service, a pass over 50,000
                // files would otherwise compare every path with every
                // other.
                let listed: std::collections::HashSet<&PathBuf> = paths.iter().collect();
                let removed: Vec<PathBuf> = files
                    .keys()
                    .filter(|p| !listed.contains(p))
                    .cloned()
                    .collect();
                for path in removed {
                    initial.remove(&path);
                    if let Some(state) = files.remove(&path) {
                        deletions.extend(state.keys);
                    }
                }
                settling.retain(|path, _| listed.contains(path));
                changing_since.retain(|path, _| listed.contains(path));
                drop(listed);
                let mut unsettled = false;
                for path in paths {
                    let Some(now) = stamp(&path) else {
                        // Listed but not readable as a file (a dangling
                        // link): the first read is not complete.
                        first_incomplete |= first;
                        continue;
                    };
                    if files.get(&path).is_some_and(|f| f.stamp == now) {
                        settling.remove(&path);
                        changing_since.remove(&path);
                        continue;
                    }
                    let settled = settling
                        .get(&path)
                        .is_some_and(|(seen, since)| *seen == now && since.elapsed() >= interval);
                    if !settled && !wake.is_complete(&path) {
                        let (since, told) = changing_since
                            .entry(path.clone())
                            .or_insert((Instant::now(), false));
                        if !*told && since.elapsed() >= interval * CHANGING_TOO_LONG {
                            *told = true;
                            problems.push(format!(
                                "{}: changing for {:.0?} without holding still for {interval:?}; not read until it does (write manifests by rename)",
                                path.display(),
                                since.elapsed()
                            ));
                        }
                        if settling.get(&path).is_none_or(|(seen, _)| *seen != now) {
                            settling.insert(path, (now, Instant::now()));
                        }
                        unsettled = true;
                        continue;
                    }
                    settling.remove(&path);
                    changing_since.remove(&path);
                    let text = match std::fs::read_to_string(&path) {
                        Ok(text) => text,
                        Err(e) => {
                            problems.push(format!("{}: {e}", path.display()));
                            first_incomplete |= first;
                            continue;
                        }
                    };
                    if stamp(&path) != Some(now) {
                        // Written to while it was read: read it again once
                        // it holds still.
                        settling.insert(path, (now, Instant::now()));
                        unsettled = true;
                        continue;
                    }
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
                    let mut keys: Vec<(Kind, ObjectKey)> = parsed
                        .objects
                        .iter()
                        .map(|o| (o.kind(), o.key().clone()))
                        .collect();
                    keys.sort_unstable();
                    keys.dedup();
                    deletions.extend(
                        previous
                            .map(|p| p.keys)
                            .unwrap_or_default()
                            .into_iter()
                            .filter(|k| keys.binary_search(k).is_err()),
                    );
                    let keys = keys.into_boxed_slice();
                    if first {
                        initial.insert(path.clone(), parsed.objects);
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
                // Only when something was withdrawn: this walks every key
                // of every file (an edit that keeps its objects' names,
                // the usual one, costs nothing here at any scale).
                if !deletions.is_empty() {
                    for state in files.values() {
                        for key in &state.keys {
                            deletions.remove(key);
                        }
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
                            .into_values()
                            .flatten()
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
        // One pass's changes travel together, so that the agent never
        // applies a Service without the slice read beside it.
        let (changes, others): (Vec<_>, Vec<_>) = messages
            .into_iter()
            .partition(|m| matches!(m, SourceMessage::Change(_)));
        let changes: Vec<Change> = changes
            .into_iter()
            .filter_map(|m| match m {
                SourceMessage::Change(change) => Some(change),
                _ => None,
            })
            .collect();
        let changes = (!changes.is_empty()).then_some(SourceMessage::Changes(changes));
        for message in problems.chain(changes).chain(others) {
            if tx.send(message).await.is_err() {
                return;
            }
        }
        wake = events.next(interval).await;
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
