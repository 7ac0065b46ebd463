//! The `--from-dir` source: what the store holds after files are added,
//! edited, broken, moved between and removed.

use std::{collections::BTreeSet, path::Path, time::Duration};

use datapath_user::k8s::{
    source::{SourceMessage, watch_dir},
    store::Store,
};
use tokio::sync::mpsc;

fn service(name: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: d}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n---\n"
    )
}

/// Feeds the source's messages into a store until `want` services are
/// there (by name), or panics after a few seconds.
async fn until(
    rx: &mut mpsc::Receiver<SourceMessage>,
    store: &mut Store,
    problems: &mut Vec<String>,
    want: &[&str],
) {
    let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let have: BTreeSet<String> = store.service_keys().map(|k| k.name().to_owned()).collect();
        if have == want {
            return;
        }
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(SourceMessage::Change(change))) => {
                store.apply(change);
            }
            Ok(Some(SourceMessage::Changes(changes))) => {
                for change in changes {
                    store.apply(change);
                }
            }
            Ok(Some(SourceMessage::Problem { message, .. })) => problems.push(message),
            Ok(Some(SourceMessage::Synced(_))) => {}
            Ok(Some(SourceMessage::Incomplete(message))) => problems.push(message),
            _ => panic!("store has {have:?}, want {want:?}; problems {problems:?}"),
        }
    }
}

fn write(dir: &Path, name: &str, text: &str) {
    let temp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&temp, text).unwrap();
    std::fs::rename(temp, dir.join(name)).unwrap();
}

#[tokio::test]
async fn files_added_edited_broken_moved_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path();
    write(
        path,
        "a.yaml",
        &(service("one", "10.96.0.1") + &service("two", "10.96.0.2")),
    );
    write(path, "ignored.txt", "not a manifest");
    let (tx, mut rx) = mpsc::channel(64);
    let source = tokio::spawn(watch_dir(path.to_owned(), Duration::from_millis(20), tx));
    let (mut store, mut problems) = (Store::default(), Vec::new());
    until(&mut rx, &mut store, &mut problems, &["one", "two"]).await;

    // A new file adds; an edit removes what the file no longer defines.
    write(path, "b.yaml", &service("three", "10.96.0.3"));
    until(&mut rx, &mut store, &mut problems, &["one", "two", "three"]).await;
    write(path, "a.yaml", &service("one", "10.96.0.1"));
    until(&mut rx, &mut store, &mut problems, &["one", "three"]).await;

    // A broken edit keeps what the file defined, and says so.
    write(path, "a.yaml", "kind: Service\nspec: [\n");
    tokio::time::sleep(Duration::from_millis(200)).await;
    until(&mut rx, &mut store, &mut problems, &["one", "three"]).await;
    while let Ok(message) = rx.try_recv() {
        if let SourceMessage::Problem { message, .. } = message {
            problems.push(message);
        }
    }
    assert!(
        problems
            .iter()
            .any(|p| p.contains("a.yaml") && p.contains("keeping what it defined")),
        "{problems:?}"
    );

    // An object moved from b.yaml to a.yaml in one step is not deleted.
    write(
        path,
        "a.yaml",
        &(service("one", "10.96.0.1") + &service("three", "10.96.0.3")),
    );
    write(path, "b.yaml", "");
    tokio::time::sleep(Duration::from_millis(200)).await;
    until(&mut rx, &mut store, &mut problems, &["one", "three"]).await;

    // A removed file removes its objects.
    std::fs::remove_file(path.join("a.yaml")).unwrap();
    until(&mut rx, &mut store, &mut problems, &[]).await;
    source.abort();
}

/// Change events, not the poll, bring a file renamed into place: with a
/// poll of 3 s it is read at once. A file written in place is never read
/// before it held still for a whole poll, however many passes other files'
/// events cause meanwhile: half of it, left open, is not read when another
/// file arrives (each half could parse cleanly and withdraw services).
#[tokio::test]
async fn a_renamed_file_is_read_at_once_and_a_half_written_one_not_at_all() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path();
    let (tx, mut rx) = mpsc::channel(64);
    let source = tokio::spawn(watch_dir(path.to_owned(), Duration::from_secs(3), tx));
    let (mut store, mut problems) = (Store::default(), Vec::new());
    // An empty directory is read completely at once (and the events are
    // watched from before that read).
    let mut synced = 0;
    while synced < 2 {
        match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            Ok(Some(SourceMessage::Synced(_))) => synced += 1,
            Ok(Some(SourceMessage::Change(change))) => {
                store.apply(change);
            }
            Ok(Some(SourceMessage::Changes(changes))) => {
                for change in changes {
                    store.apply(change);
                }
            }
            other => panic!("before the first sync: {other:?}"),
        }
    }

    // Written in place: the first service, left open.
    let mut file = std::fs::File::create(path.join("b.yaml")).unwrap();
    file.write_all(service("two", "10.96.0.2").as_bytes())
        .unwrap();
    file.flush().unwrap();
    // Another file arrives meanwhile, renamed into place: read at once,
    // and the half-written one is not.
    tokio::time::sleep(Duration::from_millis(100)).await;
    write(path, "a.yaml", &service("one", "10.96.0.1"));
    // At once: well within the poll (3 s; without its event the file would
    // be read after one to two polls).
    tokio::time::timeout(
        Duration::from_secs(2),
        until(&mut rx, &mut store, &mut problems, &["one"]),
    )
    .await
    .expect("the renamed file read at once");
    tokio::time::sleep(Duration::from_millis(300)).await;
    while let Ok(message) = rx.try_recv() {
        if let SourceMessage::Changes(changes) = message {
            for change in changes {
                store.apply(change);
            }
        }
    }
    let have: Vec<String> = store.service_keys().map(|k| k.name().to_owned()).collect();
    assert_eq!(have, ["one"], "a file still being written was read");
    // The rest, and closed: read once it held still for a poll.
    file.write_all(service("three", "10.96.0.3").as_bytes())
        .unwrap();
    drop(file);
    until(&mut rx, &mut store, &mut problems, &["one", "two", "three"]).await;
    assert!(problems.is_empty(), "{problems:?}");
    source.abort();
}

/// A file rewritten in place more often than the poll is never read
/// half-way, and the operator is told which one after ten polls.
#[tokio::test]
async fn a_file_that_never_holds_still_is_named() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();
    std::fs::write(path.join("busy.yaml"), "# -1\n").unwrap();
    let writer = {
        let path = path.join("busy.yaml");
        std::thread::spawn(move || {
            for i in 0..400 {
                let mut file = std::fs::File::create(&path).unwrap();
                writeln!(file, "# {i}").unwrap();
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let (tx, mut rx) = mpsc::channel(64);
    let source = tokio::spawn(watch_dir(path, Duration::from_millis(200), tx));
    let named = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match rx.recv().await {
                Some(SourceMessage::Problem { message, .. }) => break message,
                Some(SourceMessage::Synced(_)) => panic!("synced while a file was being written"),
                Some(_) => {}
                None => panic!("the source stopped"),
            }
        }
    })
    .await
    .expect("a problem naming the file");
    assert!(
        named.contains("busy.yaml") && named.contains("write manifests by rename"),
        "{named}"
    );
    writer.join().unwrap();
    source.abort();
}
