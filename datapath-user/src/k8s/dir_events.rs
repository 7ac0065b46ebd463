//! Wakes the `--from-dir` source as soon as something in its directory
//! changes (inotify), instead of at the next poll: an edited manifest
//! reaches the maps in milliseconds, not in one to two poll intervals.
//!
//! The poll stays, as the fallback: for file systems without inotify (some
//! network ones), after the event queue overflowed, and when the directory
//! itself was replaced (its watch ends; it is made again at the next poll).
//!
//! The events also say when a file is complete: renamed into place (as
//! atomic writers and most editors do), or swapped in with the whole
//! directory (a ConfigMap volume's `..data` link). Such a file is read at
//! once. Any other change waits until its stamp held still for a whole
//! poll interval, so that a file still being written is never read
//! half-written: "closed after writing" is not taken as complete, since
//! a script appending documents closes the file after each one, and each
//! part could parse cleanly and withdraw the services still to come.

use std::{
    collections::BTreeMap,
    ffi::OsStr,
    path::{Path, PathBuf},
    time::Duration,
};

use futures::{FutureExt, StreamExt};
use inotify::{EventMask, EventStream, Inotify, WatchMask};

/// What woke the source.
#[derive(Debug, Default)]
pub struct Wake {
    /// Files whose last event was "renamed into place": complete, read
    /// without waiting for them to settle.
    pub complete: Vec<PathBuf>,
    /// A `..`-named entry (a ConfigMap volume's `..data` link) was swapped:
    /// every file may have changed at once, each complete.
    pub all_complete: bool,
}

impl Wake {
    /// True when `path` may be read without waiting for it to settle.
    pub fn is_complete(&self, path: &Path) -> bool {
        self.all_complete || self.complete.iter().any(|p| p == path)
    }
}

/// The directory's change events, or nothing (then only the poll wakes).
pub struct DirEvents {
    dir: PathBuf,
    stream: Option<EventStream<Vec<u8>>>,
}

impl DirEvents {
    /// Watches `dir`. Without inotify (or without a watch on `dir`) the
    /// source polls only; the message says why, for the operator.
    pub fn watch(dir: &Path) -> (Self, Option<String>) {
        let stream = Inotify::init().and_then(|inotify| {
            inotify.watches().add(
                dir,
                WatchMask::CLOSE_WRITE
                    | WatchMask::MOVED_TO
                    | WatchMask::MOVED_FROM
                    | WatchMask::CREATE
                    | WatchMask::DELETE
                    | WatchMask::MODIFY
                    | WatchMask::ATTRIB
                    | WatchMask::ONLYDIR,
            )?;
            inotify.into_event_stream(vec![0; 16 * 1024])
        });
        match stream {
            Ok(stream) => (
                Self {
                    dir: dir.to_owned(),
                    stream: Some(stream),
                },
                None,
            ),
            Err(e) => (
                Self {
                    dir: dir.to_owned(),
                    stream: None,
                },
                Some(format!(
                    "--from-dir {}: no change events ({e}); changes are seen by polling only",
                    dir.display()
                )),
            ),
        }
    }

    /// Waits for the next change, or `poll` at most. Events that are
    /// already queued are taken together (one rescan for a burst).
    pub async fn next(&mut self, poll: Duration) -> Wake {
        let Some(stream) = self.stream.as_mut() else {
            tokio::time::sleep(poll).await;
            // The watch ended (the directory was replaced) or could not be
            // made: try again, quietly, once a poll.
            if let (again, None) = Self::watch(&self.dir) {
                tracing::info!(dir = %self.dir.display(), "watching the directory's change events again");
                self.stream = again.stream;
            }
            return Wake::default();
        };
        let first = tokio::select! {
            event = stream.next() => event,
            () = tokio::time::sleep(poll) => return Wake::default(),
        };
        // The last event per name decides whether the file is complete.
        let mut last: BTreeMap<PathBuf, EventMask> = BTreeMap::new();
        let mut wake = Wake::default();
        let mut event = first;
        loop {
            match event {
                Some(Ok(e)) => {
                    if e.mask
                        .intersects(EventMask::IGNORED | EventMask::Q_OVERFLOW)
                    {
                        // The watch is gone (the directory was removed or
                        // replaced) or events were lost: the poll sees all.
                        if e.mask.contains(EventMask::IGNORED) {
                            tracing::warn!(
                                dir = %self.dir.display(),
                                "the directory's watch ended; changes are seen by polling only"
                            );
                            self.stream = None;
                            return wake;
                        }
                    } else if let Some(name) = e.name.as_deref() {
                        if is_swap_entry(name) {
                            wake.all_complete = true;
                        }
                        last.insert(self.dir.join(name), e.mask);
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(
                        dir = %self.dir.display(),
                        "reading the directory's change events: {e}; changes are seen by polling only"
                    );
                    self.stream = None;
                    break;
                }
                None => {
                    self.stream = None;
                    break;
                }
            }
            match self.stream.as_mut().and_then(|s| s.next().now_or_never()) {
                Some(next) => event = next,
                None => break,
            }
        }
        wake.complete = last
            .into_iter()
            .filter(|(_, mask)| mask.contains(EventMask::MOVED_TO))
            .map(|(path, _)| path)
            .collect();
        wake
    }
}

/// A ConfigMap volume swaps its `..data` link (and a `..2024_…` directory)
/// to change every file at once.
fn is_swap_entry(name: &OsStr) -> bool {
    name.as_encoded_bytes().starts_with(b"..")
}

#[cfg(test)]
mod tests {
    use std::{io::Write, time::Instant};

    use super::*;

    #[tokio::test]
    async fn a_file_renamed_into_place_wakes_the_source_at_once_and_is_complete() {
        let dir = tempfile::tempdir().unwrap();
        let (mut events, problem) = DirEvents::watch(dir.path());
        assert_eq!(problem, None);
        let path = dir.path().join("a.yaml");
        let writer = {
            let (path, temp) = (path.clone(), dir.path().join(".a.yaml.tmp"));
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                std::fs::write(&temp, b"x: 1\n").unwrap();
                std::fs::rename(&temp, &path).unwrap();
            })
        };
        let started = Instant::now();
        let mut wake = events.next(Duration::from_secs(30)).await;
        // CREATE may come in a batch of its own, before the close.
        while !wake.is_complete(&path) {
            assert!(started.elapsed() < Duration::from_secs(10), "{wake:?}");
            wake = events.next(Duration::from_secs(30)).await;
        }
        assert!(started.elapsed() < Duration::from_secs(10));
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn a_file_written_in_place_is_never_complete_even_once_closed() {
        let dir = tempfile::tempdir().unwrap();
        let (mut events, _) = DirEvents::watch(dir.path());
        let path = dir.path().join("a.yaml");
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(b"x: 1\n").unwrap();
        let wake = events.next(Duration::from_secs(30)).await;
        assert!(!wake.is_complete(&path), "{wake:?}");
        drop(f);
        let wake = events.next(Duration::from_secs(30)).await;
        assert!(!wake.is_complete(&path), "{wake:?}");
    }

    #[tokio::test]
    async fn a_swapped_configmap_link_makes_every_file_complete() {
        let dir = tempfile::tempdir().unwrap();
        let (mut events, _) = DirEvents::watch(dir.path());
        std::os::unix::fs::symlink("somewhere", dir.path().join("..data_tmp")).unwrap();
        std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
        let wake = events.next(Duration::from_secs(30)).await;
        assert!(wake.is_complete(&dir.path().join("services.yaml")));
    }

    #[tokio::test]
    async fn a_replaced_directory_is_watched_again() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("manifests");
        std::fs::create_dir(&dir).unwrap();
        let (mut events, _) = DirEvents::watch(&dir);
        std::fs::remove_dir(&dir).unwrap();
        std::fs::create_dir(&dir).unwrap();
        // The watch's end, then a poll that makes it again.
        for _ in 0..3 {
            events.next(Duration::from_millis(20)).await;
        }
        assert!(events.stream.is_some(), "watching again");
        let temp = dir.join(".a.yaml.tmp");
        std::fs::write(&temp, b"x: 1\n").unwrap();
        std::fs::rename(&temp, dir.join("a.yaml")).unwrap();
        let seen = tokio::time::timeout(Duration::from_secs(10), async {
            while !events
                .next(Duration::from_secs(30))
                .await
                .is_complete(&dir.join("a.yaml"))
            {}
        })
        .await;
        assert!(seen.is_ok(), "no event from the new directory");
    }

    #[tokio::test]
    async fn without_events_the_poll_wakes() {
        let dir = tempfile::tempdir().unwrap();
        let (mut events, _) = DirEvents::watch(dir.path());
        let wake = events.next(Duration::from_millis(20)).await;
        assert!(wake.complete.is_empty() && !wake.all_complete);
    }
}
