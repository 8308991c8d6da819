//! The pagestore server and its client: every driver call crosses the socket, and errors
//! keep their variant and I/O kind. The server runs on a thread of the test process here;
//! `crates/stemma-cli/tests/recovery.rs` runs it as the daemon does, in a process of its own.

mod common;

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use stemma_fuse::{mounts_under, server, DriverOptions, PagestoreClient, ServerSpec};
use stemma_storage::{CloneFilter, StorageDriver, StorageError};

use common::tl;

fn io_kind(e: StorageError) -> ErrorKind {
    match e {
        StorageError::Io { source, .. } => source.kind(),
        other => panic!("not an I/O error: {other:?}"),
    }
}

/// A pagestore server on a thread of this process, over `root`, and a client connected to it
/// (polling, bounded, until the server answers).
fn start_on_thread(
    root: &Path,
    log: &Path,
    options: DriverOptions,
) -> (
    std::thread::JoinHandle<stemma_storage::Result<()>>,
    PagestoreClient,
) {
    let server = {
        let root = root.to_path_buf();
        std::thread::spawn(move || server::run(&root, None, options))
    };
    let spec = ServerSpec {
        program: "/nonexistent".into(),
        args: vec![],
        root: root.to_path_buf(),
        owner: None,
        log: log.to_path_buf(),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let client = loop {
        match PagestoreClient::connect(spec.clone()) {
            Ok(c) => break c,
            Err(e) => {
                assert!(!server.is_finished(), "the server ended: {e}");
                assert!(Instant::now() < deadline, "the server never answered: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    (server, client)
}

#[test]
fn driver_calls_cross_the_socket_with_their_errors() {
    common::init_tracing();
    let dir = tempfile::Builder::new()
        .prefix("stemma-fuse-server-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let root = dir.path().join("root");
    let (server, client) = start_on_thread(
        &root,
        &dir.path().join("server.log"),
        DriverOptions::default(),
    );
    assert_eq!(client.server_pid(), std::process::id());
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let (a, b, c) = (tl("aa"), tl("bb"), tl("cc"));
        let data = client.create_empty(&a).unwrap();
        assert_eq!(data, root.join("mnt/aa"));
        assert_eq!(client.data_dir(&a), data);
        client.write_file(&a, Path::new("hello"), b"x").unwrap();
        client.write_file(&a, Path::new("keep"), b"y").unwrap();
        assert_eq!(std::fs::read(data.join("hello")).unwrap(), b"x");
        client
            .clone_timeline(
                &a,
                &b,
                &CloneFilter {
                    exclude: vec!["hello".into()],
                    ..CloneFilter::all()
                },
            )
            .unwrap();
        assert!(!client.data_dir(&b).join("hello").exists());
        assert_eq!(
            std::fs::read(client.data_dir(&b).join("keep")).unwrap(),
            b"y"
        );
        client.remove_file(&b, Path::new("keep")).unwrap();
        client.remove_file(&b, Path::new("keep")).unwrap();
        assert!(data.join("keep").exists(), "a write leaked into the parent");
        assert_eq!(client.list().unwrap(), vec![a.clone(), b.clone()]);
        assert!(client.exists(&a) && !client.exists(&c));
        assert!(client.usage(&a).unwrap().logical_size_bytes >= 2);
        assert!(client.describe().contains("served by the pagestore server"));

        assert!(matches!(client.create_empty(&a), Err(StorageError::AlreadyExists(x)) if x == a));
        assert!(matches!(client.usage(&c), Err(StorageError::NotFound(x)) if x == c));
        assert!(matches!(
            client.write_file(&a, Path::new("../x"), b""),
            Err(StorageError::InvalidPath(_))
        ));
        assert_eq!(
            io_kind(client.delete(&a).unwrap_err()),
            ErrorKind::DirectoryNotEmpty
        );
        let future = SystemTime::now() + Duration::from_secs(3600);
        let e = client
            .branch_at(&a, &c, future, &CloneFilter::all())
            .unwrap_err();
        assert!(e.to_string().contains("in the future"), "{e}");
        assert_eq!(io_kind(e), ErrorKind::InvalidInput);
        assert!(!client.exists(&c));

        // A request the server does not know gets an answer, and the connection goes on.
        let mut raw = UnixStream::connect(server::socket_path(&root)).unwrap();
        raw.write_all(b"{\"op\":\"fly\"}\n{\"op\":\"ping\"}\n")
            .unwrap();
        let mut lines = BufReader::new(&raw).lines();
        let refused = lines.next().unwrap().unwrap();
        assert!(
            refused.starts_with("{\"err\"") && refused.contains("does not understand"),
            "{refused}"
        );
        assert!(lines.next().unwrap().unwrap().contains("pong"));

        client.delete(&b).unwrap();
        client.delete(&b).unwrap();
        assert_eq!(client.list().unwrap(), vec![a.clone()]);
    }));
    client.shutdown_server().unwrap();
    let ended = server.join().expect("the server thread panicked");
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
    ended.unwrap();
    assert!(mounts_under(dir.path()).unwrap().is_empty(), "mounts left");
    assert!(!server::socket_path(&root).exists());
    assert!(!server::pid_path(&root).exists());
    // Calls after the end fail with an error that names the server's log.
    let e = client.list().unwrap_err().to_string();
    assert!(e.contains("server.log"), "{e}");
}

/// Bytes of every file under `dir` (the store's segments, packs and checkpoint).
fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let m = e.metadata().unwrap();
        total += if m.is_dir() {
            dir_bytes(&e.path())
        } else {
            m.len()
        };
    }
    total
}

/// Deleting a branch that wrote data, then maintenance (asked for over the socket here; the
/// server also runs it by itself after a deletion), gives the store's disk space back, and
/// the parent reads the same.
#[test]
fn deleting_a_branch_gives_the_store_space_back() {
    common::init_tracing();
    let dir = tempfile::Builder::new()
        .prefix("stemma-fuse-gc-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let root = dir.path().join("root");
    let options = DriverOptions {
        store: stemma_pagestore::Config {
            segment_size: 1 << 20,
            ..stemma_pagestore::Config::default()
        },
        ..DriverOptions::default()
    };
    let (server, client) = start_on_thread(&root, &dir.path().join("server.log"), options);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let (a, b) = (tl("aa"), tl("bb"));
        let kept: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8 + 1).collect();
        std::fs::write(client.create_empty(&a).unwrap().join("kept"), &kept).unwrap();
        client.clone_timeline(&a, &b, &CloneFilter::all()).unwrap();
        let n = 8u64 << 20;
        let big: Vec<u8> = (0..n).map(|i| (i % 241) as u8 + 1).collect();
        let path = client.data_dir(&b).join("big");
        std::fs::write(&path, &big).unwrap();
        std::fs::File::open(&path).unwrap().sync_all().unwrap();
        let store = root.join("store");
        let before = dir_bytes(&store);
        assert!(before > n, "{before} bytes in the store");
        client.delete(&b).unwrap();
        let s = client.maintain().unwrap();
        let after = dir_bytes(&store);
        assert!(
            before - after >= n * 9 / 10,
            "{before} -> {after} bytes after deleting a branch of {n}: {s:?}"
        );
        assert_eq!(
            std::fs::read(client.data_dir(&a).join("kept")).unwrap(),
            kept
        );
    }));
    client.shutdown_server().unwrap();
    let ended = server.join().expect("the server thread panicked");
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
    ended.unwrap();
}
