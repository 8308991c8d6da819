//! Unit tests of the store through its public API. The model-based test is in
//! `tests/model.rs`.

use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use super::*;

fn open(dir: &Path) -> PageStore {
    PageStore::open(dir, Config::default()).unwrap()
}

fn small_segments() -> Config {
    Config {
        segment_size: 1 << 16,
        ..Config::default()
    }
}

fn file(s: &PageStore, tl: TimelineId, name: &str) -> Ino {
    s.create(tl, ROOT_INO, name.as_bytes(), 0o600, 1, 1)
        .unwrap()
        .ino
}

/// A new external file (its bytes in an object of its own), as the WAL mount creates them.
fn external(s: &PageStore, tl: TimelineId, name: &str) -> Ino {
    s.create_external(tl, ROOT_INO, name.as_bytes(), 0o600, 1, 1)
        .unwrap()
        .ino
}

fn all(s: &PageStore, tl: TimelineId, ino: Ino) -> Vec<u8> {
    s.read(tl, ino, 0, usize::MAX / 2).unwrap()
}

/// Compares contents without printing megabytes on failure.
fn assert_same(got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "lengths differ");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "contents differ first at byte {i}: {} != {}",
            got[i], want[i]
        );
    }
}

#[test]
fn store_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<PageStore>();
}

#[test]
fn writes_at_any_offset_and_holes_read_as_zeros() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path());
    let tl = s.create_root(b"main").unwrap();
    let f = file(&s, tl, "f");
    s.write(tl, f, 3 * PAGE_SIZE as u64 + 100, b"hello")
        .unwrap();
    let a = s.getattr(tl, f).unwrap();
    assert_eq!(a.size, 3 * PAGE_SIZE as u64 + 105);
    let data = all(&s, tl, f);
    assert_eq!(data.len() as u64, a.size);
    assert!(data[..3 * PAGE_SIZE + 100].iter().all(|b| *b == 0));
    assert_eq!(&data[3 * PAGE_SIZE + 100..], b"hello");
    // A write straddling pages, then a partial overwrite.
    let big: Vec<u8> = (0..3 * PAGE_SIZE).map(|i| (i % 251) as u8 + 1).collect();
    s.write(tl, f, 1000, &big).unwrap();
    s.write(tl, f, 2000, b"XY").unwrap();
    let data = all(&s, tl, f);
    assert_eq!(&data[1000..2000], &big[..1000]);
    assert_eq!(&data[2000..2002], b"XY");
    assert_eq!(&data[2002..1000 + big.len()], &big[1002..]);
    // Reads past the end are short; reads at the end empty.
    let size = s.getattr(tl, f).unwrap().size;
    assert_eq!(size, 1000 + big.len() as u64);
    assert_eq!(s.read(tl, f, size - 2, 10).unwrap(), &big[big.len() - 2..]);
    assert!(s.read(tl, f, size + 10, 10).unwrap().is_empty());
    // A write larger than one frame (1 MiB) is split and reads back whole.
    let huge: Vec<u8> = (0..(3 << 20)).map(|i| (i % 13) as u8).collect();
    s.write(tl, f, 77, &huge).unwrap();
    assert_same(&s.read(tl, f, 77, huge.len()).unwrap(), &huge);
}

#[test]
fn truncate_then_extend_reads_zeros_even_over_ancestor_pages() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path());
    let tl = s.create_root(b"main").unwrap();
    let f = file(&s, tl, "f");
    s.write(tl, f, 0, &vec![0xAA; 4 * PAGE_SIZE]).unwrap();
    let child = s.branch(tl, BranchPoint::Now, b"c").unwrap();
    let cut = PAGE_SIZE as u64 + 10;
    s.setattr(
        child,
        f,
        SetAttr {
            size: Some(cut),
            ..SetAttr::default()
        },
    )
    .unwrap();
    s.setattr(
        child,
        f,
        SetAttr {
            size: Some(4 * PAGE_SIZE as u64),
            ..SetAttr::default()
        },
    )
    .unwrap();
    let data = all(&s, child, f);
    assert!(data[..cut as usize].iter().all(|b| *b == 0xAA));
    assert!(data[cut as usize..].iter().all(|b| *b == 0));
    // The parent is untouched.
    assert!(all(&s, tl, f).iter().all(|b| *b == 0xAA));
    // A write past the end after a truncate leaves zeros in between.
    s.setattr(
        child,
        f,
        SetAttr {
            size: Some(5),
            ..SetAttr::default()
        },
    )
    .unwrap();
    s.write(child, f, 3 * PAGE_SIZE as u64, b"z").unwrap();
    let data = all(&s, child, f);
    assert_eq!(&data[..5], &[0xAA; 5]);
    assert!(data[5..3 * PAGE_SIZE].iter().all(|b| *b == 0));
    assert_eq!(data[3 * PAGE_SIZE], b'z');
}

#[test]
fn branches_are_isolated_and_see_the_parent_at_the_branch_point() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path());
    let main = s.create_root(b"main").unwrap();
    let f = file(&s, main, "f");
    s.write(main, f, 0, b"one").unwrap();
    let before_two = s.last_lsn() + 1;
    s.write(main, f, 0, b"two").unwrap();
    let a = s.branch(main, BranchPoint::Now, b"a").unwrap();
    let b = s.branch(main, BranchPoint::Now, b"b").unwrap();
    s.write(main, f, 0, b"MMM").unwrap();
    s.write(a, f, 0, b"AAA").unwrap();
    let g = file(&s, b, "g");
    assert_eq!(all(&s, main, f), b"MMM");
    assert_eq!(all(&s, a, f), b"AAA");
    assert_eq!(all(&s, b, f), b"two");
    assert!(s.lookup(main, ROOT_INO, b"g").is_err());
    assert!(s.lookup(a, ROOT_INO, b"g").is_err());
    assert_eq!(s.lookup(b, ROOT_INO, b"g").unwrap().ino, g);
    // A branch at a past position, and a branch of a branch.
    let past = s
        .branch(main, BranchPoint::Lsn(before_two), b"past")
        .unwrap();
    assert_eq!(all(&s, past, f), b"one");
    let aa = s.branch(a, BranchPoint::Now, b"aa").unwrap();
    s.write(a, f, 0, b"a2!").unwrap();
    assert_eq!(all(&s, aa, f), b"AAA");
    // Deleting: refused while children exist.
    assert_eq!(s.delete_timeline(a).unwrap_err().errno(), libc::ENOTEMPTY);
    s.delete_timeline(aa).unwrap();
    s.delete_timeline(a).unwrap();
    assert!(matches!(s.getattr(a, f), Err(Error::TimelineNotFound(_))));
    // Positions outside the parent's life are refused.
    assert!(matches!(
        s.branch(past, BranchPoint::Lsn(past.0), b"x"),
        Err(Error::BeforeTimelineCreated { .. })
    ));
    assert!(matches!(
        s.branch(main, BranchPoint::Lsn(s.last_lsn() + 5), b"x"),
        Err(Error::PositionInFuture { .. })
    ));
}

#[test]
fn an_unchanged_branch_costs_almost_nothing() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path());
    let main = s.create_root(b"main").unwrap();
    let f = file(&s, main, "f");
    s.write(main, f, 0, &vec![1u8; 100 * PAGE_SIZE]).unwrap();
    let child = s.branch(main, BranchPoint::Now, b"child").unwrap();
    let u = s.usage(child).unwrap();
    assert_eq!(u.logical_size_bytes, 100 * PAGE_SIZE as u64);
    assert!(u.own_storage_bytes < 1024, "{u:?}");
    assert!(s.usage(main).unwrap().own_storage_bytes > 100 * PAGE_SIZE as u64);
    s.write(child, f, 0, &[2u8; PAGE_SIZE]).unwrap();
    let u = s.usage(child).unwrap();
    assert!(
        u.own_storage_bytes > PAGE_SIZE as u64 && u.own_storage_bytes < 2 * PAGE_SIZE as u64,
        "{u:?}"
    );
}

#[test]
fn point_in_time_branches_and_the_retention_window() {
    let d = tempfile::tempdir().unwrap();
    let now = Arc::new(AtomicI64::new(1_000_000));
    let n2 = now.clone();
    let config = Config {
        retention: Duration::from_secs(3600),
        time_granularity: Duration::ZERO,
        clock: Clock::new(move || {
            UNIX_EPOCH + Duration::from_secs(n2.load(Ordering::SeqCst) as u64)
        }),
        ..Config::default()
    };
    let at = |secs: i64| UNIX_EPOCH + Duration::from_secs(secs as u64);
    let s = PageStore::open(d.path(), config.clone()).unwrap();
    let main = s.create_root(b"main").unwrap();
    let f = file(&s, main, "f");
    for (t, v) in [(1_000_100, b"v1"), (1_000_200, b"v2"), (1_000_300, b"v3")] {
        now.store(t, Ordering::SeqCst);
        s.write(main, f, 0, v).unwrap();
    }
    now.store(1_002_000, Ordering::SeqCst);
    let b = s
        .branch(main, BranchPoint::Time(at(1_000_250)), b"t")
        .unwrap();
    assert_eq!(all(&s, b, f), b"v2");
    let b = s
        .branch(main, BranchPoint::Time(at(1_000_200)), b"t")
        .unwrap();
    assert_eq!(all(&s, b, f), b"v2");
    let b = s
        .branch(main, BranchPoint::Time(at(1_000_199)), b"t")
        .unwrap();
    assert_eq!(all(&s, b, f), b"v1");
    // Before the file existed, but after the timeline did.
    let b = s
        .branch(main, BranchPoint::Time(at(1_000_050)), b"t")
        .unwrap();
    assert_eq!(s.readdir(b, ROOT_INO).unwrap().len(), 1);
    assert!(matches!(
        s.branch(main, BranchPoint::Time(at(999_000)), b"t"),
        Err(Error::OutsideRetention { .. })
    ));
    assert!(matches!(
        s.branch(main, BranchPoint::Time(at(1_003_000)), b"t"),
        Err(Error::InFuture(_))
    ));
    // Time moves on: the early states leave the window, the state that still holds does not.
    now.store(1_000_250 + 3600, Ordering::SeqCst);
    assert!(matches!(
        s.branch(main, BranchPoint::Time(at(1_000_240)), b"t"),
        Err(Error::OutsideRetention { .. })
    ));
    assert!(matches!(
        s.branch(main, BranchPoint::Lsn(f + 1), b"t"),
        Err(Error::OutsideRetention { .. })
    ));
    let b = s.branch(main, BranchPoint::Time(at(1_000_260 + 3600 - 3600)), b"t");
    assert!(b.is_err() || all(&s, b.unwrap(), f) == b"v2");
    // The map survives a reopen.
    drop(s);
    let s = PageStore::open(d.path(), config).unwrap();
    let b = s
        .branch(main, BranchPoint::Time(at(1_000_300)), b"t")
        .unwrap();
    assert_eq!(all(&s, b, f), b"v3");
}

#[test]
fn an_unlinked_file_stays_readable_while_open() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path());
    let tl = s.create_root(b"main").unwrap();
    let f = file(&s, tl, "f");
    s.write(tl, f, 0, b"still here").unwrap();
    s.open_handle(tl, f).unwrap();
    s.unlink(tl, ROOT_INO, b"f").unwrap();
    assert!(s.lookup(tl, ROOT_INO, b"f").is_err());
    assert_eq!(all(&s, tl, f), b"still here");
    assert_eq!(s.getattr(tl, f).unwrap().nlink, 0);
    s.write(tl, f, 0, b"STILL").unwrap();
    s.release_handle(tl, f).unwrap();
    assert_eq!(s.getattr(tl, f).unwrap_err().errno(), libc::ENOENT);
    // Replaced by a rename while open: the same.
    let a = file(&s, tl, "a");
    let b = file(&s, tl, "b");
    s.write(tl, b, 0, b"old b").unwrap();
    s.open_handle(tl, b).unwrap();
    s.rename(tl, ROOT_INO, b"a", ROOT_INO, b"b").unwrap();
    assert_eq!(s.lookup(tl, ROOT_INO, b"b").unwrap().ino, a);
    assert_eq!(all(&s, tl, b), b"old b");
    s.release_handle(tl, b).unwrap();
    assert!(s.getattr(tl, b).is_err());
}

#[test]
fn directories_rename_and_links_follow_posix() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path());
    let tl = s.create_root(b"main").unwrap();
    let x = s.mkdir(tl, ROOT_INO, b"x", 0o700, 1, 1).unwrap().ino;
    let y = s.mkdir(tl, x, b"y", 0o700, 1, 1).unwrap().ino;
    let f = s.create(tl, y, b"f", 0o600, 1, 1).unwrap().ino;
    assert_eq!(
        s.create(tl, y, b"f", 0o600, 1, 1).unwrap_err().errno(),
        libc::EEXIST
    );
    assert_eq!(
        s.rmdir(tl, ROOT_INO, b"x").unwrap_err().errno(),
        libc::ENOTEMPTY
    );
    assert_eq!(s.rmdir(tl, y, b"f").unwrap_err().errno(), libc::ENOTDIR);
    assert_eq!(
        s.unlink(tl, ROOT_INO, b"x").unwrap_err().errno(),
        libc::EISDIR
    );
    assert_eq!(
        s.rename(tl, ROOT_INO, b"x", y, b"z").unwrap_err().errno(),
        libc::EINVAL
    );
    assert_eq!(
        s.create(tl, f, b"q", 0o600, 1, 1).unwrap_err().errno(),
        libc::ENOTDIR
    );
    assert_eq!(
        s.create(tl, ROOT_INO, b"a/b", 0o600, 1, 1)
            .unwrap_err()
            .errno(),
        libc::EINVAL
    );
    assert_eq!(
        s.create(tl, ROOT_INO, &[b'a'; 256], 0o600, 1, 1)
            .unwrap_err()
            .errno(),
        libc::ENAMETOOLONG
    );
    // Directory over an empty directory; over a non-empty one is refused; over a file too.
    let e = s.mkdir(tl, ROOT_INO, b"e", 0o700, 1, 1).unwrap().ino;
    s.rename(tl, x, b"y", ROOT_INO, b"e").unwrap();
    assert_eq!(s.lookup(tl, ROOT_INO, b"e").unwrap().ino, y);
    assert!(s.getattr(tl, e).is_err());
    assert_eq!(s.lookup(tl, y, b"f").unwrap().ino, f);
    let g = s.create(tl, ROOT_INO, b"g", 0o600, 1, 1).unwrap().ino;
    assert_eq!(
        s.rename(tl, ROOT_INO, b"x", ROOT_INO, b"e")
            .unwrap_err()
            .errno(),
        libc::ENOTEMPTY
    );
    assert_eq!(
        s.rename(tl, ROOT_INO, b"x", ROOT_INO, b"g")
            .unwrap_err()
            .errno(),
        libc::ENOTDIR
    );
    assert_eq!(
        s.rename(tl, ROOT_INO, b"g", ROOT_INO, b"x")
            .unwrap_err()
            .errno(),
        libc::EISDIR
    );
    // Hard links.
    s.link(tl, g, x, b"g2").unwrap();
    assert_eq!(s.getattr(tl, g).unwrap().nlink, 2);
    s.unlink(tl, ROOT_INO, b"g").unwrap();
    assert_eq!(s.getattr(tl, g).unwrap().nlink, 1);
    assert_eq!(
        s.link(tl, x, ROOT_INO, b"xx").unwrap_err().errno(),
        libc::EPERM
    );
    // Symlinks.
    let l = s.symlink(tl, ROOT_INO, b"ts", b"/mnt/ts1", 1, 1).unwrap();
    assert_eq!(l.kind, FileKind::Symlink);
    assert_eq!(s.readlink(tl, l.ino).unwrap(), b"/mnt/ts1");
    assert_eq!(s.readlink(tl, g).unwrap_err().errno(), libc::EINVAL);
    let names: Vec<_> = s
        .readdir(tl, ROOT_INO)
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, vec![b"e".to_vec(), b"ts".to_vec(), b"x".to_vec()]);
}

#[test]
fn setattr_changes_mode_owner_and_times() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path());
    let tl = s.create_root(b"main").unwrap();
    assert_eq!(s.getattr(tl, ROOT_INO).unwrap().perm, 0o700);
    let f = file(&s, tl, "f");
    let t = UNIX_EPOCH + Duration::new(1_600_000_000, 123);
    let a = s
        .setattr(
            tl,
            f,
            SetAttr {
                mode: Some(0o100640),
                uid: Some(70),
                gid: Some(71),
                atime: Some(t),
                mtime: Some(t),
                size: None,
            },
        )
        .unwrap();
    assert_eq!(
        (a.perm, a.uid, a.gid, a.atime, a.mtime),
        (0o640, 70, 71, t, t)
    );
    drop(s);
    let s = open(d.path());
    assert_eq!(s.getattr(tl, f).unwrap(), a);
}

#[test]
fn reopen_replays_everything_and_a_torn_tail_is_cut() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path());
    let tl = s.create_root(b"main").unwrap();
    let f = file(&s, tl, "f");
    for i in 0..40u8 {
        s.write(tl, f, u64::from(i) * 3000, &[i + 1; 3000]).unwrap();
    }
    s.sync().unwrap();
    let expect = all(&s, tl, f);
    let durable = s.durable_mark();
    s.write(tl, f, 0, b"not synced").unwrap();
    drop(s);
    // Power loss: the unsynced write is half on disk.
    let seg = d
        .path()
        .join("log")
        .join(format!("{:010}.seg", durable.seg));
    let len = std::fs::metadata(&seg).unwrap().len();
    assert!(len > durable.len);
    let fh = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    fh.set_len(durable.len + (len - durable.len) / 2).unwrap();
    drop(fh);
    let s = open(d.path());
    assert_same(&all(&s, tl, f), &expect);
    assert_eq!(s.last_lsn(), durable.lsn);
    // And the store carries on writing after the cut.
    s.write(tl, f, 0, b"after").unwrap();
    drop(s);
    let s = open(d.path());
    assert_eq!(&all(&s, tl, f)[..5], b"after");
}

#[test]
fn segments_roll_and_reopen() {
    let d = tempfile::tempdir().unwrap();
    let s = PageStore::open(d.path(), small_segments()).unwrap();
    let tl = s.create_root(b"main").unwrap();
    let f = file(&s, tl, "f");
    for i in 0..40u8 {
        s.write(tl, f, u64::from(i) * 3000, &[i + 1; 3000]).unwrap();
    }
    let expect = all(&s, tl, f);
    let last = s.last_lsn();
    drop(s);
    assert!(std::fs::read_dir(d.path().join("log")).unwrap().count() > 3);
    let s = PageStore::open(d.path(), small_segments()).unwrap();
    assert_same(&all(&s, tl, f), &expect);
    assert_eq!(s.last_lsn(), last);
}

#[test]
fn damage_in_a_complete_segment_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let s = PageStore::open(d.path(), small_segments()).unwrap();
    let tl = s.create_root(b"main").unwrap();
    let f = file(&s, tl, "f");
    for i in 0..30u64 {
        s.write(tl, f, i * PAGE_SIZE as u64, &[7; PAGE_SIZE])
            .unwrap();
    }
    drop(s);
    let seg0 = d.path().join("log").join(format!("{:010}.seg", 0));
    let mut bytes = std::fs::read(&seg0).unwrap();
    bytes[5000] ^= 0xFF;
    std::fs::write(&seg0, bytes).unwrap();
    let err = PageStore::open(d.path(), small_segments()).unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
}

#[test]
fn a_second_open_of_the_same_directory_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let _s = open(d.path());
    assert!(matches!(
        PageStore::open(d.path(), Config::default()),
        Err(Error::Locked(_))
    ));
}

#[test]
fn deep_ancestry_reads_the_nearest_version() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path());
    let mut tl = s.create_root(b"g0").unwrap();
    let f = file(&s, tl, "f");
    s.write(tl, f, 0, &vec![0u8; 30 * PAGE_SIZE]).unwrap();
    let mut expect = vec![0u8; 30 * PAGE_SIZE];
    for g in 1..=25u8 {
        // Each generation changes its own page, then branches.
        let p = usize::from(g);
        s.write(tl, f, (p * PAGE_SIZE) as u64, &[g; PAGE_SIZE])
            .unwrap();
        expect[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].fill(g);
        tl = s.branch(tl, BranchPoint::Now, b"g").unwrap();
    }
    assert_same(&all(&s, tl, f), &expect);
    drop(s);
    let s = open(d.path());
    assert_same(&all(&s, tl, f), &expect);
}

/// A branch taken while another thread writes sees a prefix of the writes: the writer fills
/// page i with byte i in order, so a crash-consistent child holds pages 1..=k and zeros after.
#[test]
fn a_branch_of_a_parent_being_written_is_crash_consistent() {
    let d = tempfile::tempdir().unwrap();
    let s = Arc::new(open(d.path()));
    let main = s.create_root(b"main").unwrap();
    let f = file(&s, main, "f");
    let pages = 300u64;
    let writer = {
        let s = s.clone();
        std::thread::spawn(move || {
            for i in 1..=pages {
                s.write(main, f, i * PAGE_SIZE as u64, &[i as u8; PAGE_SIZE])
                    .unwrap();
                if i % 50 == 0 {
                    s.sync().unwrap();
                }
            }
        })
    };
    let mut children = Vec::new();
    for _ in 0..20 {
        children.push(s.branch(main, BranchPoint::Now, b"c").unwrap());
    }
    writer.join().unwrap();
    let mut seen = Vec::new();
    for c in children {
        let data = all(&s, c, f);
        let k = data.len() / PAGE_SIZE;
        for i in 1..k {
            assert!(
                data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]
                    .iter()
                    .all(|b| *b == i as u8),
                "child {c} page {i}"
            );
        }
        seen.push(k);
    }
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "later branches see more: {seen:?}"
    );
}

#[test]
fn concurrent_readers_and_writers_on_many_timelines() {
    let d = tempfile::tempdir().unwrap();
    let s = Arc::new(PageStore::open(d.path(), small_segments()).unwrap());
    let main = s.create_root(b"main").unwrap();
    let f = file(&s, main, "f");
    s.write(main, f, 0, &vec![9u8; 64 * PAGE_SIZE]).unwrap();
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                let tl = s.branch(main, BranchPoint::Now, b"t").unwrap();
                for i in 0..200u64 {
                    let page = (i * 7 + u64::from(t)) % 64;
                    s.write(tl, f, page * PAGE_SIZE as u64, &[t + 10; PAGE_SIZE])
                        .unwrap();
                    let back = s.read(tl, f, page * PAGE_SIZE as u64, PAGE_SIZE).unwrap();
                    assert!(back.iter().all(|b| *b == t + 10));
                    if i % 20 == 0 {
                        s.sync().unwrap();
                    }
                }
                tl
            })
        })
        .collect();
    let tls: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(all(&s, main, f).iter().all(|b| *b == 9));
    drop(tls);
}

#[test]
fn statfs_reports_totals() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path());
    let tl = s.create_root(b"main").unwrap();
    file(&s, tl, "f");
    let st = s.statfs().unwrap();
    assert!(st.total_bytes > 0 && st.log_bytes > 0 && st.inodes >= 2);
}

/// The ancestor-resolution cache (timelines with 3+ ancestors) must see exactly what a walk
/// sees: changes made to ancestors after a branch stay invisible, the leaf's own writes and
/// truncates win over cached ancestor pages, and holes stay holes.
#[test]
fn deep_ancestry_reads_through_the_cache_stay_isolated() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path());
    let root = s.create_root(b"root").unwrap();
    let f = file(&s, root, "f");
    let ps = PAGE_SIZE as u64;
    // Pages 0..8 written by the root; page 9 a hole; generation g rewrites page g.
    for p in 0..8u64 {
        s.write(root, f, p * ps, &[1; PAGE_SIZE]).unwrap();
    }
    let mut tl = root;
    let mut gens = vec![root];
    for g in 1..=5u8 {
        tl = s.branch(tl, BranchPoint::Now, b"gen").unwrap();
        s.write(tl, f, u64::from(g) * ps, &[g + 1; PAGE_SIZE])
            .unwrap();
        gens.push(tl);
    }
    let leaf = s.branch(tl, BranchPoint::Now, b"leaf").unwrap();
    let page = |t: TimelineId, p: u64| s.read(t, f, p * ps, PAGE_SIZE).unwrap();
    let expect = |p: u64| -> u8 {
        if (1..=5).contains(&p) {
            p as u8 + 1
        } else {
            1
        }
    };
    for _ in 0..2 {
        // Twice: the second pass is served from the cache.
        for p in 0..8 {
            assert_eq!(page(leaf, p), vec![expect(p); PAGE_SIZE], "page {p}");
        }
    }
    // Ancestors change after the branch: the leaf must not see it, cached or not.
    for (g, t) in gens.iter().enumerate() {
        s.write(*t, f, 0, &[0xEE; PAGE_SIZE]).unwrap();
        s.write(*t, f, (g as u64 + 1) * ps, &[0xDD; PAGE_SIZE])
            .unwrap();
    }
    s.write(root, f, 9 * ps, &[0xCC; PAGE_SIZE]).unwrap();
    for p in 0..8 {
        assert_eq!(page(leaf, p), vec![expect(p); PAGE_SIZE], "page {p}");
    }
    assert_eq!(s.getattr(leaf, f).unwrap().size, 8 * ps);
    // The leaf's own changes win over what the cache holds for its ancestors.
    s.write(leaf, f, 2 * ps, &[0x77; PAGE_SIZE]).unwrap();
    assert_eq!(page(leaf, 2), vec![0x77; PAGE_SIZE]);
    s.setattr(
        leaf,
        f,
        SetAttr {
            size: Some(3 * ps),
            ..SetAttr::default()
        },
    )
    .unwrap();
    s.setattr(
        leaf,
        f,
        SetAttr {
            size: Some(8 * ps),
            ..SetAttr::default()
        },
    )
    .unwrap();
    for p in 3..8 {
        assert_eq!(page(leaf, p), vec![0; PAGE_SIZE], "page {p} after the cut");
    }
    assert_eq!(page(leaf, 1), vec![expect(1); PAGE_SIZE]);
    // And a reopened store (empty cache) agrees.
    let before: Vec<_> = (0..8).map(|p| page(leaf, p)).collect();
    drop(s);
    let s = open(d.path());
    for (p, want) in before.iter().enumerate() {
        assert_eq!(&s.read(leaf, f, p as u64 * ps, PAGE_SIZE).unwrap(), want);
    }
}

// ---- GC, compaction, checkpoints ----

/// A clock the test moves by hand (seconds since the epoch).
fn fake_clock(start: i64) -> (Arc<AtomicI64>, Clock) {
    let now = Arc::new(AtomicI64::new(start));
    let n2 = now.clone();
    (
        now,
        Clock::new(move || UNIX_EPOCH + Duration::from_secs(n2.load(Ordering::SeqCst) as u64)),
    )
}

/// A config on a fake clock (at 1 000 000 s) with a one-hour retention window and exact
/// times: the clock, and the config.
fn hour_window() -> (Arc<AtomicI64>, Config) {
    let (now, clock) = fake_clock(1_000_000);
    let config = Config {
        retention: Duration::from_secs(3600),
        time_granularity: Duration::ZERO,
        clock,
        ..Config::default()
    };
    (now, config)
}

/// Bytes of every file under `dir`, as `du --apparent-size` would add them up.
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

/// A store in `dir` whose log interleaves small rewrites of main's file `f` with larger
/// writes to a branch `dev`, so that once `dev` goes, segments hold live pages among dead
/// ones: `rounds` times, one page of `f` (cycling over `main_pages` pages) and `dev_pages`
/// new pages of dev's own file (contents from `dev_seed`).
struct Interleaved {
    s: PageStore,
    config: Config,
    main: TimelineId,
    f: Ino,
    dev: TimelineId,
}

fn interleaved(
    dir: &Path,
    segment_size: u64,
    rounds: u64,
    main_pages: u64,
    dev_pages: u64,
    dev_seed: u64,
) -> Interleaved {
    let config = Config {
        segment_size,
        ..Config::default()
    };
    let s = PageStore::open(dir, config.clone()).unwrap();
    let main = s.create_root(b"main").unwrap();
    let f = file(&s, main, "f");
    let dev = s.branch(main, BranchPoint::Now, b"dev").unwrap();
    let g = file(&s, dev, "g");
    let ps = PAGE_SIZE as u64;
    for i in 0..rounds {
        s.write(main, f, (i % main_pages) * ps, &pattern(i, PAGE_SIZE))
            .unwrap();
        let len = dev_pages as usize * PAGE_SIZE;
        s.write(dev, g, i * dev_pages * ps, &pattern(dev_seed + i, len))
            .unwrap();
    }
    Interleaved {
        s,
        config,
        main,
        f,
        dev,
    }
}

/// Distinct, non-zero contents for a write (so no page is stored as a zero page).
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64).wrapping_mul(31).wrapping_add(seed * 7) % 251) as u8 + 1)
        .collect()
}

const MIB: usize = 1 << 20;

#[test]
fn deleting_a_branch_and_maintenance_give_its_space_back() {
    let d = tempfile::tempdir().unwrap();
    let config = Config {
        segment_size: MIB as u64,
        ..Config::default()
    };
    let s = PageStore::open(d.path(), config.clone()).unwrap();
    let main = s.create_root(b"main").unwrap();
    let f = file(&s, main, "f");
    let main_data = pattern(1, MIB);
    s.write(main, f, 0, &main_data).unwrap();
    let dev = s.branch(main, BranchPoint::Now, b"dev").unwrap();
    let g = file(&s, dev, "g");
    let n = 8 * MIB;
    for (i, chunk) in pattern(2, n).chunks(128 << 10).enumerate() {
        s.write(dev, g, (i * (128 << 10)) as u64, chunk).unwrap();
    }
    s.sync().unwrap();
    let before = dir_bytes(d.path());
    s.delete_timeline(dev).unwrap();
    let r = s.maintain().unwrap();
    let after = dir_bytes(d.path());
    assert!(
        before - after >= (n as u64) * 9 / 10,
        "{before} -> {after} bytes after deleting a branch of {n}: {r:?}"
    );
    assert_eq!(r.bytes_after, s.disk_bytes().unwrap());
    assert_same(&all(&s, main, f), &main_data);
    drop(s);
    let s = PageStore::open(d.path(), config).unwrap();
    assert_same(&all(&s, main, f), &main_data);
    assert_eq!(dir_bytes(d.path()), after);
    assert!(matches!(s.getattr(dev, g), Err(Error::TimelineNotFound(_))));
}

/// Segments that hold some live pages among dead ones: the live ones move to a pack, and
/// every timeline, a branch at a past position included, reads the same before and after,
/// and after a reopen.
#[test]
fn compaction_moves_live_pages_and_everything_reads_the_same() {
    let d = tempfile::tempdir().unwrap();
    // One page of main for every three of dev, so every segment is mostly dev's.
    let Interleaved {
        s,
        config,
        main,
        f,
        dev,
    } = interleaved(d.path(), 256 << 10, 200, 50, 3, 1000);
    let mid = s.last_lsn();
    let past = s
        .branch(main, BranchPoint::Lsn(mid - 100), b"past")
        .unwrap();
    // A deep chain, so that reads go through the ancestor cache.
    let mut deep = main;
    for _ in 0..4 {
        deep = s.branch(deep, BranchPoint::Now, b"deep").unwrap();
    }
    let want_main = all(&s, main, f);
    let want_past = all(&s, past, f);
    let want_deep = all(&s, deep, f);
    s.delete_timeline(dev).unwrap();
    let r = s.maintain().unwrap();
    assert!(r.files_compacted > 0 && r.pages_moved > 0, "{r:?}");
    assert!(r.bytes_after < r.bytes_before, "{r:?}");
    let check = |s: &PageStore| {
        assert_same(&all(s, main, f), &want_main);
        assert_same(&all(s, past, f), &want_past);
        assert_same(&all(s, deep, f), &want_deep);
        // Branching at a position inside the window still works after compaction.
        let again = s
            .branch(main, BranchPoint::Lsn(mid - 100), b"again")
            .unwrap();
        assert_same(&all(s, again, f), &want_past);
        s.delete_timeline(again).unwrap();
    };
    check(&s);
    // A second run finds nothing more to do and changes nothing.
    let r2 = s.maintain().unwrap();
    assert_eq!(r2.pages_moved, 0, "{r2:?}");
    check(&s);
    drop(s);
    let s = PageStore::open(d.path(), config).unwrap();
    check(&s);
    // Writes go on after a reopen from a checkpoint, and survive another.
    s.write(main, f, 0, b"after").unwrap();
    drop(s);
    let s = open(d.path());
    assert_eq!(&all(&s, main, f)[..5], b"after");
}

#[test]
fn gc_past_the_retention_window_frees_the_index_and_refuses_old_branches() {
    let d = tempfile::tempdir().unwrap();
    let (now, config) = hour_window();
    let config = Config {
        segment_size: 256 << 10,
        ..config
    };
    let s = PageStore::open(d.path(), config.clone()).unwrap();
    let main = s.create_root(b"main").unwrap();
    let f = file(&s, main, "f");
    s.write(main, f, 0, &pattern(0, 16 * PAGE_SIZE)).unwrap();
    // A child taken early keeps the first version alive (its bound is a read point).
    let early = s.branch(main, BranchPoint::Now, b"early").unwrap();
    let want_early = all(&s, early, f);
    let old_lsn = s.last_lsn();
    for round in 1..=50u64 {
        now.fetch_add(10, Ordering::SeqCst);
        s.write(main, f, 0, &pattern(round, 16 * PAGE_SIZE))
            .unwrap();
    }
    let want_main = all(&s, main, f);
    let before = s.index_versions();
    assert!(before > 50 * 17, "{before}");
    let own_before = s.usage(main).unwrap().own_storage_bytes;
    assert!(own_before > 50 * 16 * PAGE_SIZE as u64, "{own_before}");
    // Inside the window nothing goes.
    let r = s.gc().unwrap();
    assert_eq!(r.versions_dropped, 0, "{r:?}");
    now.fetch_add(2 * 3600, Ordering::SeqCst);
    let r = s.gc().unwrap();
    assert!(r.index_versions < before / 10, "{before} versions -> {r:?}");
    // Own storage counts what is left: main's last version and the one `early` reads.
    let own_after = s.usage(main).unwrap().own_storage_bytes;
    assert!(
        own_after >= 2 * 16 * PAGE_SIZE as u64 && own_after < 3 * 16 * PAGE_SIZE as u64,
        "{own_before} -> {own_after}"
    );
    assert_same(&all(&s, main, f), &want_main);
    assert_same(&all(&s, early, f), &want_early);
    assert!(matches!(
        s.branch(main, BranchPoint::Lsn(old_lsn + 5), b"x"),
        Err(Error::OutsideRetention { .. })
    ));
    let now_branch = s.branch(main, BranchPoint::Now, b"now").unwrap();
    assert_same(&all(&s, now_branch, f), &want_main);
    // A moment inside the window (after every write) still resolves, to the last state.
    let secs = now.load(Ordering::SeqCst) - 60;
    let recent = s
        .branch(
            main,
            BranchPoint::Time(UNIX_EPOCH + Duration::from_secs(secs as u64)),
            b"recent",
        )
        .unwrap();
    assert_same(&all(&s, recent, f), &want_main);
    s.delete_timeline(recent).unwrap();
    // Even with the clock set back, what GC dropped stays out of reach.
    now.fetch_sub(2 * 3600, Ordering::SeqCst);
    assert!(matches!(
        s.branch(main, BranchPoint::Lsn(old_lsn + 5), b"x"),
        Err(Error::OutsideRetention { .. })
    ));
    now.fetch_add(2 * 3600, Ordering::SeqCst);
    // Maintenance makes it durable and gives the disk back; a reopen loads the collected
    // index from the checkpoint.
    let disk = dir_bytes(d.path());
    let m = s.maintain().unwrap();
    let versions = s.index_versions();
    assert!(
        dir_bytes(d.path()) < disk / 2,
        "{disk} -> {} bytes: {m:?}",
        dir_bytes(d.path())
    );
    drop(s);
    let s = PageStore::open(d.path(), config).unwrap();
    assert_eq!(s.index_versions(), versions);
    assert_same(&all(&s, main, f), &want_main);
    assert_same(&all(&s, early, f), &want_early);
    assert!(matches!(
        s.branch(main, BranchPoint::Lsn(old_lsn + 5), b"x"),
        Err(Error::OutsideRetention { .. })
    ));
    // Freed files leave the index once out of the window (and no branch point sees them).
    s.unlink(main, ROOT_INO, b"f").unwrap();
    s.delete_timeline(early).unwrap();
    s.delete_timeline(now_branch).unwrap();
    let before = s.index_versions();
    now.fetch_add(2 * 3600, Ordering::SeqCst);
    let r = s.gc().unwrap();
    assert!(r.inodes_dropped >= 1, "{r:?}");
    assert!(s.index_versions() < before);
    assert!(s.lookup(main, ROOT_INO, b"f").is_err());
}

/// Sets up `files` files of two pages, each written four times 10 s apart, and a child
/// taken after the first round; returns the store, its clock, the root, the child and the files.
fn aged_files(
    dir: &Path,
    files: usize,
) -> (PageStore, Arc<AtomicI64>, TimelineId, TimelineId, Vec<Ino>) {
    let (now, config) = hour_window();
    let s = PageStore::open(dir, config).unwrap();
    let main = s.create_root(b"main").unwrap();
    let inos: Vec<Ino> = (0..files)
        .map(|i| file(&s, main, &format!("f{i}")))
        .collect();
    let mut early = None;
    for round in 0..4u64 {
        now.fetch_add(10, Ordering::SeqCst);
        for (i, ino) in inos.iter().enumerate() {
            s.write(
                main,
                *ino,
                0,
                &pattern(round * 10_000 + i as u64, 2 * PAGE_SIZE),
            )
            .unwrap();
        }
        if round == 0 {
            early = Some(s.branch(main, BranchPoint::Now, b"early").unwrap());
        }
    }
    let early = early.unwrap();
    (s, now, main, early, inos)
}

/// GC changes the index in batches of inodes, letting go of the write lock in between: with
/// more inodes than one batch, everything still reads the same, and each timeline's own bytes
/// come out exactly what its versions hold.
#[test]
fn gc_in_batches_keeps_every_read_point_and_counts_own_bytes_exactly() {
    let d = tempfile::tempdir().unwrap();
    let (s, now, main, early, inos) = aged_files(d.path(), 700);
    let want_main: Vec<Vec<u8>> = inos.iter().map(|i| all(&s, main, *i)).collect();
    let want_early: Vec<Vec<u8>> = inos.iter().map(|i| all(&s, early, *i)).collect();
    now.fetch_add(2 * 3600, Ordering::SeqCst);
    let before = s.index_versions();
    let r = s.gc().unwrap();
    // Per page, rounds 0 (seen by `early`) and 3 stay, 1 and 2 go; so do attribute versions.
    assert!(r.versions_dropped >= 700 * 2 * 2, "{r:?}");
    assert_eq!(s.index_versions(), before - r.versions_dropped);
    assert_eq!(r.index_versions, before - r.versions_dropped);
    for (i, ino) in inos.iter().enumerate() {
        assert_same(&all(&s, main, *ino), &want_main[i]);
        assert_same(&all(&s, early, *ino), &want_early[i]);
    }
    let st = s.state.read();
    for tl in [main, early] {
        let t = &st.timelines[&tl];
        let held: u64 = t
            .inodes
            .values()
            .map(|ii| crate::gc::inode_own_bytes(ii))
            .sum();
        assert_eq!(t.own_bytes, held, "timeline {tl}");
    }
}

/// What happens between two batches of GC (writes, a branch, a deletion) changes nothing
/// GC decides: the plan is a superset, each batch decides with the read points of its moment.
#[test]
fn changes_between_gc_batches_are_kept() {
    let d = tempfile::tempdir().unwrap();
    let (s, now, main, early, inos) = aged_files(d.path(), 40);
    let want_early: Vec<Vec<u8>> = inos.iter().map(|i| all(&s, early, *i)).collect();
    // A second early child, deleted between the batches: its read point goes with it.
    let doomed = s.branch(main, BranchPoint::Now, b"doomed").unwrap();
    now.fetch_add(2 * 3600, Ordering::SeqCst);
    let horizon = {
        let mut st = s.state.write();
        let h = s.retention_horizon(&st);
        st.gc_horizon = st.gc_horizon.max(h);
        h
    };
    let plan = crate::gc::plan(&s.state.read().share_index(), horizon);
    assert!(plan.looks.len() >= 40, "{}", plan.looks.len());
    let (first, rest) = plan.looks.split_at(plan.looks.len() / 2);
    let mut counts = crate::gc::GcCounts::default();
    let mut dropped = crate::gc::DroppedBytes::default();
    s.state
        .write()
        .gc_apply(first, horizon, &mut counts, &mut dropped);
    // Between the batches: new versions of every file, a branch of that state, a deletion.
    for (i, ino) in inos.iter().enumerate() {
        s.write(
            main,
            *ino,
            PAGE_SIZE as u64,
            &pattern(90_000 + i as u64, PAGE_SIZE),
        )
        .unwrap();
    }
    let want_main: Vec<Vec<u8>> = inos.iter().map(|i| all(&s, main, *i)).collect();
    let now_child = s.branch(main, BranchPoint::Now, b"now").unwrap();
    s.delete_timeline(doomed).unwrap();
    s.state
        .write()
        .gc_apply(rest, horizon, &mut counts, &mut dropped);
    s.state.write().gc_finish(&plan, &dropped);
    assert!(counts.versions_dropped > 0, "{counts:?}");
    for (i, ino) in inos.iter().enumerate() {
        assert_same(&all(&s, main, *ino), &want_main[i]);
        assert_same(&all(&s, now_child, *ino), &want_main[i]);
        assert_same(&all(&s, early, *ino), &want_early[i]);
    }
    // A second pass finds nothing more to drop but what the deletion freed.
    s.gc().unwrap();
    for (i, ino) in inos.iter().enumerate() {
        assert_same(&all(&s, main, *ino), &want_main[i]);
        assert_same(&all(&s, early, *ino), &want_early[i]);
    }
}

/// A freed file larger than one look of GC goes over several looks (and batches), all in
/// one pass, and leaves the index.
#[test]
fn a_large_freed_file_leaves_the_index_in_one_gc() {
    let d = tempfile::tempdir().unwrap();
    let (now, config) = hour_window();
    let s = PageStore::open(d.path(), config).unwrap();
    let main = s.create_root(b"main").unwrap();
    let big = file(&s, main, "big");
    let small = file(&s, main, "small");
    s.write(main, big, 0, &pattern(1, 5000 * PAGE_SIZE))
        .unwrap();
    s.write(main, small, 0, &pattern(2, PAGE_SIZE)).unwrap();
    s.unlink(main, ROOT_INO, b"big").unwrap();
    let before = s.index_versions();
    now.fetch_add(2 * 3600, Ordering::SeqCst);
    let r = s.gc().unwrap();
    assert_eq!(r.inodes_dropped, 1, "{r:?}");
    assert!(r.versions_dropped >= 5000, "{r:?}");
    assert_eq!(s.index_versions(), before - r.versions_dropped);
    assert!(!s.state.read().timelines[&main].inodes.contains_key(&big));
    assert_same(&all(&s, main, small), &pattern(2, PAGE_SIZE));
    // What the timeline holds is the small file and the root directory.
    assert!(s.usage(main).unwrap().own_storage_bytes < 2 * PAGE_SIZE as u64);
}

/// What a crash after each step of maintenance leaves: a store that opens and reads exactly
/// as before, and finishes the job on the next run.
#[test]
fn a_crash_after_any_maintenance_step_reopens_the_same() {
    for step in [
        MaintenanceStep::Gc,
        MaintenanceStep::PackWritten,
        MaintenanceStep::Switched,
        MaintenanceStep::Checkpointed,
        MaintenanceStep::Done,
    ] {
        let d = tempfile::tempdir().unwrap();
        let Interleaved {
            s,
            config,
            main,
            f,
            dev,
        } = interleaved(d.path(), 128 << 10, 60, 20, 2, 500);
        let past_at = s.last_lsn() - 30;
        s.delete_timeline(dev).unwrap();
        let want = all(&s, main, f);
        let past = s.branch(main, BranchPoint::Lsn(past_at), b"past").unwrap();
        let want_past = all(&s, past, f);
        let r = s.maintain_until(step).unwrap();
        drop(s);
        let s = PageStore::open(d.path(), config.clone()).unwrap();
        assert_same(&all(&s, main, f), &want);
        assert_same(&all(&s, past, f), &want_past);
        let full = s.maintain().unwrap();
        assert_same(&all(&s, main, f), &want);
        drop(s);
        let s = PageStore::open(d.path(), config).unwrap();
        assert_same(&all(&s, main, f), &want);
        assert_same(&all(&s, past, f), &want_past);
        assert!(
            s.disk_bytes().unwrap() < 1 << 20,
            "after a crash at {step:?} ({r:?}) and a full run ({full:?}): {} bytes",
            s.disk_bytes().unwrap()
        );
    }
}

/// Readers resolve a location under the lock and read after releasing it: compaction may
/// move and delete the file in between, and the read must still return the right bytes.
#[test]
fn reads_during_compaction_return_the_right_bytes() {
    let d = tempfile::tempdir().unwrap();
    let config = Config {
        segment_size: 128 << 10,
        // Every file is compacted every time: the live pages move on each run.
        compact_below: 1.1,
        ..Config::default()
    };
    let s = Arc::new(PageStore::open(d.path(), config).unwrap());
    let main = s.create_root(b"main").unwrap();
    let f = file(&s, main, "f");
    let ps = PAGE_SIZE as u64;
    let pages = 32u64;
    for p in 0..pages {
        s.write(main, f, p * ps, &[p as u8 + 1; PAGE_SIZE]).unwrap();
    }
    let deep = (0..4).fold(main, |tl, _| s.branch(tl, BranchPoint::Now, b"d").unwrap());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|r| {
            let (s, stop) = (s.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let p = (n * 7 + r) % pages;
                    let tl = if n & 1 == 0 { main } else { deep };
                    let got = s.read(tl, f, p * ps, PAGE_SIZE).unwrap();
                    assert!(got.iter().all(|b| *b == p as u8 + 1), "page {p}");
                    n += 1;
                }
                n
            })
        })
        .collect();
    for round in 0..6u64 {
        // Garbage around the live pages: a branch's writes, then its deletion.
        let tmp = s.branch(main, BranchPoint::Now, b"tmp").unwrap();
        let g = file(&s, tmp, "g");
        s.write(tmp, g, 0, &pattern(round, 40 * PAGE_SIZE)).unwrap();
        s.delete_timeline(tmp).unwrap();
        s.maintain().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        assert!(r.join().unwrap() > 0);
    }
}

#[test]
fn a_damaged_checkpoint_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path());
    let tl = s.create_root(b"main").unwrap();
    let f = file(&s, tl, "f");
    s.write(tl, f, 0, b"data").unwrap();
    let lsn = s.checkpoint().unwrap();
    drop(s);
    let path = d.path().join("checkpoint").join(format!("{lsn:020}.ckpt"));
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(&path, bytes).unwrap();
    let err = PageStore::open(d.path(), Config::default()).unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
}

/// An inode unlinked while open whose process ended before the last close has no link and no
/// handle after a restart: GC frees it (a frame), and once out of the window its pages go.
#[test]
fn an_inode_unlinked_while_open_before_a_restart_is_freed() {
    let d = tempfile::tempdir().unwrap();
    let (now, clock) = fake_clock(1_000_000);
    let config = Config {
        segment_size: 256 << 10,
        retention: Duration::from_secs(3600),
        clock,
        ..Config::default()
    };
    let s = PageStore::open(d.path(), config.clone()).unwrap();
    let tl = s.create_root(b"main").unwrap();
    let f = file(&s, tl, "f");
    s.write(tl, f, 0, &pattern(3, 64 * PAGE_SIZE)).unwrap();
    s.open_handle(tl, f).unwrap();
    s.unlink(tl, ROOT_INO, b"f").unwrap();
    // Open, so not an orphan while the store runs.
    assert_eq!(s.gc().unwrap().orphans_freed, 0);
    assert_eq!(s.getattr(tl, f).unwrap().nlink, 0);
    s.sync().unwrap();
    drop(s); // the process ends with the file still open
    let s = PageStore::open(d.path(), config.clone()).unwrap();
    assert_eq!(s.getattr(tl, f).unwrap().nlink, 0);
    let before = dir_bytes(d.path());
    assert_eq!(s.gc().unwrap().orphans_freed, 1);
    assert_eq!(s.getattr(tl, f).unwrap_err().errno(), libc::ENOENT);
    now.fetch_add(7200, Ordering::SeqCst);
    let r = s.maintain().unwrap();
    assert_eq!(r.gc.orphans_freed, 0);
    assert!(
        dir_bytes(d.path()) < before - 32 * PAGE_SIZE as u64,
        "{before} -> {}: {r:?}",
        dir_bytes(d.path())
    );
    drop(s);
    let s = PageStore::open(d.path(), config).unwrap();
    assert_eq!(s.getattr(tl, f).unwrap_err().errno(), libc::ENOENT);
    assert!(s.readdir(tl, ROOT_INO).unwrap().is_empty());
}

fn buffered() -> Config {
    Config {
        write_buffer: 1 << 20,
        ..Config::default()
    }
}

#[test]
fn an_fsync_of_one_file_waits_only_for_that_files_frames() {
    let d = tempfile::tempdir().unwrap();
    let s = PageStore::open(d.path(), buffered()).unwrap();
    let tl = s.create_root(b"main").unwrap();
    let a = file(&s, tl, "a");
    let b = file(&s, tl, "b");
    s.write(tl, a, 0, &[1u8; PAGE_SIZE]).unwrap();
    s.sync_file(tl, a).unwrap();
    let after_a = s.durable_mark().lsn;
    assert_eq!(
        after_a,
        s.last_lsn(),
        "an fsync makes the file's frames durable"
    );
    // Another file appends; fsyncing `a` again has nothing to wait for.
    s.write(tl, b, 0, &[2u8; PAGE_SIZE]).unwrap();
    s.sync_file(tl, a).unwrap();
    assert_eq!(
        s.durable_mark().lsn,
        after_a,
        "an fsync of a waited for b's frame"
    );
    // A buffered overwrite of `a` is committed by its fsync, and that fsync covers every
    // frame before it (b's too: one fsync of the log).
    s.write(tl, a, 0, &[3u8; PAGE_SIZE]).unwrap();
    assert!(
        s.buffered_bytes() > 0,
        "an overwrite inside the file is buffered"
    );
    s.sync_file(tl, a).unwrap();
    assert_eq!(s.durable_mark().lsn, s.last_lsn());
    assert_eq!(all(&s, tl, a), vec![3u8; PAGE_SIZE]);
    // Reopened, the store knows no file's last frame: an fsync waits for the whole log.
    s.write(tl, b, PAGE_SIZE as u64, &[5u8; PAGE_SIZE]).unwrap();
    assert!(s.durable_mark().lsn < s.last_lsn());
    drop(s);
    let s = PageStore::open(d.path(), buffered()).unwrap();
    s.write(tl, b, 2 * PAGE_SIZE as u64, &[6u8; PAGE_SIZE])
        .unwrap();
    s.sync_file(tl, a).unwrap();
    assert_eq!(s.durable_mark().lsn, s.last_lsn());
}

#[test]
fn the_log_rolls_into_a_prepared_segment_and_open_drops_an_unused_one() {
    let d = tempfile::tempdir().unwrap();
    let config = Config {
        segment_size: 1 << 16,
        log_zero_ahead: 1 << 13,
        ..Config::default()
    };
    let log_dir = d.path().join("log");
    let names = || {
        let mut n: Vec<String> = std::fs::read_dir(&log_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        n.sort();
        n
    };
    let s = PageStore::open(d.path(), config.clone()).unwrap();
    let tl = s.create_root(b"main").unwrap();
    let f = file(&s, tl, "wal");
    // Small commits, each fsynced: the log is worth zeros ahead, and so a prepared segment.
    let mut want = Vec::new();
    fn commit(s: &PageStore, tl: TimelineId, f: Ino, want: &mut Vec<u8>, i: usize) {
        let page = vec![(i % 250) as u8 + 1; 1000];
        s.write(tl, f, want.len() as u64, &page).unwrap();
        s.sync_file(tl, f).unwrap();
        want.extend_from_slice(&page);
    }
    let mut i = 0;
    while !s.prepare_log_segment().unwrap() {
        commit(&s, tl, f, &mut want, i);
        i += 1;
        assert!(i < 200, "no segment was prepared under frequent fsyncs");
    }
    assert_eq!(names(), ["0000000000.seg", "0000000001.seg.prepared"]);
    assert!(
        !s.prepare_log_segment().unwrap(),
        "one is ready: nothing to do"
    );
    // Fill the first segment: the log rolls into the prepared one, zeros and all.
    while names().len() == 2 && names()[1].ends_with(".prepared") {
        commit(&s, tl, f, &mut want, i);
        i += 1;
    }
    assert_eq!(names(), ["0000000000.seg", "0000000001.seg"]);
    let len = |n: &str| std::fs::metadata(log_dir.join(n)).unwrap().len();
    assert_eq!(
        len("0000000001.seg"),
        1 << 16,
        "the prepared segment's zeros"
    );
    assert_eq!(all(&s, tl, f), want);
    // Nothing is prepared for a segment that has just begun; once it is a quarter full the
    // next one is. A clean stop leaves it, and the next open deletes it and cuts the zeros
    // ahead of the last frame.
    assert!(
        !s.prepare_log_segment().unwrap(),
        "the new segment is empty"
    );
    while !s.prepare_log_segment().unwrap() {
        commit(&s, tl, f, &mut want, i);
        i += 1;
        assert!(i < 400, "no segment prepared once the active one filled");
    }
    assert_eq!(names().len(), 3);
    drop(s);
    let s = PageStore::open(d.path(), config.clone()).unwrap();
    assert_eq!(names(), ["0000000000.seg", "0000000001.seg"]);
    assert!(len("0000000001.seg") < 1 << 16);
    assert_eq!(all(&s, tl, f), want);
    commit(&s, tl, f, &mut want, i);
    assert_eq!(all(&s, tl, f), want);

    // Power cuts inside a prepared segment: roll into one again, then cut its file anywhere
    // past what was synced (zeros, maybe followed by garbage): every synced commit comes
    // back, the rest is cut off.
    let mut s = s;
    for (round, cut) in [0u64, 1, 777, 4096, 30_000].into_iter().enumerate() {
        // A reopened store decides again, after some commits, that zeros are worth it.
        let mut tries = 0;
        while !s.prepare_log_segment().unwrap() {
            i += 1;
            commit(&s, tl, f, &mut want, i);
            tries += 1;
            assert!(tries < 200, "round {round}: no segment prepared");
        }
        let seg_before = s.durable_mark().seg;
        while s.durable_mark().seg == seg_before {
            i += 1;
            commit(&s, tl, f, &mut want, i);
        }
        for _ in 0..3 {
            i += 1;
            commit(&s, tl, f, &mut want, i);
        }
        // One more write, not synced: it may be lost.
        s.write(tl, f, want.len() as u64, &[9u8; 100]).unwrap();
        let mark = s.durable_mark();
        drop(s);
        let seg = log_dir.join(format!("{:010}.seg", mark.seg));
        let file = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
        assert_eq!(
            file.metadata().unwrap().len(),
            1 << 16,
            "a prepared segment"
        );
        file.set_len(mark.len + cut).unwrap();
        if round % 2 == 1 {
            use std::os::unix::fs::FileExt;
            file.write_all_at(&[0x5a; 64], mark.len + cut).unwrap();
        }
        drop(file);
        s = PageStore::open(d.path(), config.clone()).unwrap();
        let got = all(&s, tl, f);
        assert!(
            got == want || (got.len() == want.len() + 100 && got[..want.len()] == want[..]),
            "round {round}: after a cut {cut} bytes past the synced end the file is not what was synced"
        );
        // What the unsynced write left, if anything, is part of the file from now on.
        want = got;
        assert!(names().iter().all(|n| !n.ends_with(".prepared")));
    }
}

/// The store's object files (external files' contents).
fn object_files(dir: &Path) -> usize {
    match std::fs::read_dir(dir.join("objects")) {
        Ok(e) => e.count(),
        Err(_) => 0,
    }
}

/// A WAL segment's life: created, zero-filled, written a page at a time with an fsync after
/// each; a branch sees it cut where the last fsync before the branch point found it written.
#[test]
fn an_external_file_is_versioned_by_its_fsyncs() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path());
    let main = s.create_root(b"main").unwrap();
    let wal = external(&s, main, "000000010000000000000001");
    assert!(s.is_external(main, wal).unwrap());
    assert_eq!(object_files(d.path()), 1);
    let seg = 16 * PAGE_SIZE;
    // Zero-filled and synced, as PostgreSQL does with wal_init_zero.
    s.write(main, wal, 0, &vec![0u8; seg]).unwrap();
    s.sync_file(main, wal).unwrap();
    assert_eq!(s.getattr(main, wal).unwrap().size, seg as u64);
    let empty = s.branch(main, BranchPoint::Now, b"empty").unwrap();
    // Three pages, each synced; the parent's live view sees writes before any fsync.
    let page = |i: usize| vec![i as u8 + 1; PAGE_SIZE];
    for i in 0..3 {
        s.write(main, wal, (i * PAGE_SIZE) as u64, &page(i))
            .unwrap();
        s.sync_file(main, wal).unwrap();
    }
    let three = s.branch(main, BranchPoint::Now, b"three").unwrap();
    // A fourth page written but not synced before the branch: not part of it.
    s.write(main, wal, 3 * PAGE_SIZE as u64, &page(3)).unwrap();
    let unsynced = s.branch(main, BranchPoint::Now, b"unsynced").unwrap();
    s.sync_file(main, wal).unwrap();
    let want_main: Vec<u8> = (0..4)
        .flat_map(page)
        .chain(std::iter::repeat_n(0, seg - 4 * PAGE_SIZE))
        .collect();
    assert_same(&all(&s, main, wal), &want_main);
    let want_three: Vec<u8> = (0..3)
        .flat_map(page)
        .chain(std::iter::repeat_n(0, seg - 3 * PAGE_SIZE))
        .collect();
    assert_same(&all(&s, three, wal), &want_three);
    assert_same(&all(&s, unsynced, wal), &want_three);
    assert_same(&all(&s, empty, wal), &vec![0u8; seg]);
    assert_eq!(s.getattr(three, wal).unwrap().size, seg as u64);

    // A branch writes into a copy of its own; parent and sibling do not see it.
    s.write(three, wal, 3 * PAGE_SIZE as u64, b"branch")
        .unwrap();
    s.sync_file(three, wal).unwrap();
    assert_eq!(object_files(d.path()), 2);
    let mut want_branch = want_three.clone();
    want_branch[3 * PAGE_SIZE..3 * PAGE_SIZE + 6].copy_from_slice(b"branch");
    assert_same(&all(&s, three, wal), &want_branch);
    assert_same(&all(&s, main, wal), &want_main);
    assert_same(&all(&s, unsynced, wal), &want_three);
    // The file a front end hands the kernel: the parent's object for a whole file opened
    // to read, else the branch's own.
    let f = s.external_file(three, wal, true).unwrap();
    let mut b = [0u8; 6];
    std::os::unix::fs::FileExt::read_exact_at(&*f, &mut b, 3 * PAGE_SIZE as u64).unwrap();
    assert_eq!(&b, b"branch");

    // Everything comes back after a reopen, from the log and from a checkpoint.
    drop(s);
    let s = open(d.path());
    assert_same(&all(&s, main, wal), &want_main);
    assert_same(&all(&s, three, wal), &want_branch);
    assert_same(&all(&s, unsynced, wal), &want_three);
    s.checkpoint().unwrap();
    drop(s);
    let s = open(d.path());
    assert_same(&all(&s, main, wal), &want_main);
    assert_same(&all(&s, three, wal), &want_branch);
    assert_same(&all(&s, unsynced, wal), &want_three);
    assert_same(&all(&s, empty, wal), &vec![0u8; seg]);
    assert_eq!(object_files(d.path()), 2);
    // A later write by the parent continues where it was, and a truncate cuts the record.
    s.write(main, wal, 4 * PAGE_SIZE as u64, &page(4)).unwrap();
    s.sync_file(main, wal).unwrap();
    s.setattr(
        main,
        wal,
        SetAttr {
            size: Some(2 * PAGE_SIZE as u64),
            ..SetAttr::default()
        },
    )
    .unwrap();
    let cut = s.branch(main, BranchPoint::Now, b"cut").unwrap();
    let want_cut: Vec<u8> = (0..2).flat_map(page).collect();
    assert_same(&all(&s, main, wal), &want_cut);
    assert_same(&all(&s, cut, wal), &want_cut);
    assert_same(&all(&s, three, wal), &want_branch);
}

/// An external file's object goes once GC no longer needs any version naming it and a
/// checkpoint says so; an object no frame names (a crash between its creation and its first
/// frame) goes at open.
#[test]
fn objects_no_version_names_are_deleted() {
    let d = tempfile::tempdir().unwrap();
    let (now, config) = hour_window();
    let s = PageStore::open(d.path(), config.clone()).unwrap();
    let main = s.create_root(b"main").unwrap();
    let keep = external(&s, main, "keep");
    let gone = external(&s, main, "gone");
    for ino in [keep, gone] {
        s.write(main, ino, 0, &pattern(ino, 2 * PAGE_SIZE)).unwrap();
        s.sync_file(main, ino).unwrap();
    }
    assert_eq!(object_files(d.path()), 2);
    // A branch that has not copied `gone` keeps its object alive after the parent unlinks it.
    let child = s.branch(main, BranchPoint::Now, b"child").unwrap();
    s.unlink(main, ROOT_INO, b"gone").unwrap();
    now.fetch_add(2 * 3600, Ordering::SeqCst);
    s.write(main, keep, 0, b"x").unwrap();
    s.maintain().unwrap();
    assert_eq!(object_files(d.path()), 2);
    assert_same(&all(&s, child, gone), &pattern(gone, 2 * PAGE_SIZE));
    // With the branch gone, nothing names it.
    s.delete_timeline(child).unwrap();
    now.fetch_add(2 * 3600, Ordering::SeqCst);
    s.write(main, keep, 0, b"y").unwrap();
    s.maintain().unwrap();
    assert_eq!(object_files(d.path()), 1);
    let mut want = pattern(keep, 2 * PAGE_SIZE);
    want[0] = b'y';
    assert_same(&all(&s, main, keep), &want);
    // An object file no frame names.
    drop(s);
    std::fs::write(
        d.path().join("objects").join("00000000000000ff.obj"),
        b"junk",
    )
    .unwrap();
    let s = PageStore::open(d.path(), config).unwrap();
    assert_eq!(object_files(d.path()), 1);
    assert_same(&all(&s, main, keep), &want);
}

/// An fsync of an external file records its end lazily (with the next frame of any kind); a
/// crash before that frame must not hide from later branches what the fsync made durable.
#[test]
fn an_external_files_end_lost_with_a_crash_is_found_again_at_open() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path());
    let main = s.create_root(b"main").unwrap();
    let wal = external(&s, main, "wal");
    s.write(main, wal, 0, &vec![0u8; 8 * PAGE_SIZE]).unwrap();
    s.sync_file(main, wal).unwrap();
    s.sync().unwrap();
    let before = s.last_lsn();
    s.write(main, wal, 0, &pattern(1, 2 * PAGE_SIZE)).unwrap();
    s.sync_file(main, wal).unwrap();
    // No frame yet: the end waits for the next commit.
    assert_eq!(s.last_lsn(), before);
    drop(s);
    let s = open(d.path());
    let child = s.branch(main, BranchPoint::Now, b"after").unwrap();
    let mut want = pattern(1, 2 * PAGE_SIZE);
    want.resize(8 * PAGE_SIZE, 0);
    assert_same(&all(&s, child, wal), &want);
    // And a branch taken while the end is pending sees it: the branch's frame commits it.
    s.write(main, wal, 2 * PAGE_SIZE as u64, &pattern(2, PAGE_SIZE))
        .unwrap();
    s.sync_file(main, wal).unwrap();
    let child = s.branch(main, BranchPoint::Now, b"pending").unwrap();
    want[2 * PAGE_SIZE..3 * PAGE_SIZE].copy_from_slice(&pattern(2, PAGE_SIZE));
    assert_same(&all(&s, child, wal), &want);
}

/// A file written before its directory had an external mount (initdb's first WAL segment)
/// becomes external with the same contents; earlier positions still read its pages. A file
/// that does not keep the discipline (a zero page inside its written part) stays as it is.
#[test]
fn an_ordinary_file_in_order_can_become_external() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path());
    let main = s.create_root(b"main").unwrap();
    let seg = file(&s, main, "seg");
    s.write(main, seg, 0, &vec![0u8; 8 * PAGE_SIZE]).unwrap();
    s.write(main, seg, 0, &pattern(3, 3 * PAGE_SIZE)).unwrap();
    let holey = file(&s, main, "holey");
    s.write(main, holey, 2 * PAGE_SIZE as u64, &pattern(4, PAGE_SIZE))
        .unwrap();
    let want = all(&s, main, seg);
    let before = s.branch(main, BranchPoint::Now, b"before").unwrap();
    assert!(s.externalize(main, seg).unwrap());
    assert!(s.is_external(main, seg).unwrap());
    assert!(!s.externalize(main, seg).unwrap(), "already external");
    assert!(!s.externalize(main, holey).unwrap());
    assert!(!s.is_external(main, holey).unwrap());
    assert_same(&all(&s, main, seg), &want);
    // Appended in place past its written part, and a branch sees it cut there.
    s.write(main, seg, 3 * PAGE_SIZE as u64, &pattern(5, PAGE_SIZE))
        .unwrap();
    s.sync_file(main, seg).unwrap();
    let after = s.branch(main, BranchPoint::Now, b"after").unwrap();
    let mut want2 = want.clone();
    want2[3 * PAGE_SIZE..4 * PAGE_SIZE].copy_from_slice(&pattern(5, PAGE_SIZE));
    assert_same(&all(&s, after, seg), &want2);
    assert_same(&all(&s, before, seg), &want);
    assert!(!s.is_external(before, seg).unwrap());
    drop(s);
    let s = open(d.path());
    assert_same(&all(&s, main, seg), &want2);
    assert_same(&all(&s, before, seg), &want);
}

/// PostgreSQL goes on filling the WAL page its last write ended in: a branch must see that
/// page as the fsync before its branch point found it, not as its parent (or the timeline
/// it copied from) fills it afterwards. Found by a branch of a branch that replayed its
/// parent's later transaction from that page.
#[test]
fn a_branch_does_not_see_its_parent_fill_the_last_page_after_it() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path());
    let main = s.create_root(b"main").unwrap();
    let wal = external(&s, main, "wal");
    s.write(main, wal, 0, &vec![0u8; 4 * PAGE_SIZE]).unwrap();
    s.write(main, wal, 0, &[7u8; PAGE_SIZE + 100]).unwrap();
    s.sync_file(main, wal).unwrap();
    let mut seen = vec![0u8; 4 * PAGE_SIZE];
    seen[..PAGE_SIZE + 100].fill(7);
    let dev = s.branch(main, BranchPoint::Now, b"dev").unwrap();
    // The parent fills the rest of that page after the branch.
    s.write(main, wal, PAGE_SIZE as u64 + 100, &[8u8; 200])
        .unwrap();
    s.sync_file(main, wal).unwrap();
    assert_same(&all(&s, dev, wal), &seen);
    // The branch writes into its copy (made from the page as it saw it), past its end.
    s.write(dev, wal, PAGE_SIZE as u64 + 100, &[9u8; 50])
        .unwrap();
    s.sync_file(dev, wal).unwrap();
    let child = s.branch(dev, BranchPoint::Now, b"dev-child").unwrap();
    let mut dev_seen = seen.clone();
    dev_seen[PAGE_SIZE + 100..PAGE_SIZE + 150].fill(9);
    assert_same(&all(&s, dev, wal), &dev_seen);
    assert_same(&all(&s, child, wal), &dev_seen);
    // dev goes on in the same page; its child keeps what it saw, also in its own copy.
    s.write(dev, wal, PAGE_SIZE as u64 + 150, &[10u8; 50])
        .unwrap();
    s.sync_file(dev, wal).unwrap();
    assert_same(&all(&s, child, wal), &dev_seen);
    let f = s.external_file(child, wal, true).unwrap();
    let mut got = vec![0u8; 4 * PAGE_SIZE];
    std::os::unix::fs::FileExt::read_exact_at(&*f, &mut got, 0).unwrap();
    assert_same(&got, &dev_seen);
    // Read-only, a file whose object went on past the branch's view is not shared.
    let ro = s.external_file(dev, wal, false).unwrap();
    std::os::unix::fs::FileExt::read_exact_at(&*ro, &mut got, 0).unwrap();
    let mut dev_now = dev_seen.clone();
    dev_now[PAGE_SIZE + 150..PAGE_SIZE + 200].fill(10);
    assert_same(&got, &dev_now);
    // And after a reopen (the last pages come from the log).
    drop(s);
    let s = open(d.path());
    assert_same(&all(&s, child, wal), &dev_seen);
    let mut main_now = seen.clone();
    main_now[PAGE_SIZE + 100..PAGE_SIZE + 300].fill(8);
    assert_same(&all(&s, main, wal), &main_now);
}

/// A store with a timeline whose `pg_wal` is an attached live directory: (its directory,
/// the store, the timeline, `pg_wal`'s inode, the host directory).
fn live_fixture() -> (
    tempfile::TempDir,
    PageStore,
    TimelineId,
    Ino,
    std::path::PathBuf,
) {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path());
    let (uid, gid) = (
        nix::unistd::getuid().as_raw(),
        nix::unistd::getgid().as_raw(),
    );
    let main = s.create_root(b"main").unwrap();
    let wal = s
        .mkdir(main, ROOT_INO, b"pg_wal", 0o700, uid, gid)
        .unwrap()
        .ino;
    let host = s.attach_live_dir(main, wal).unwrap();
    (d, s, main, wal, host)
}

/// The host inode of a file.
fn host_ino(p: &Path) -> u64 {
    std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap())
}

#[test]
fn a_live_directory_is_mirrored_before_every_frame_and_branches_see_it_as_of_their_position() {
    use std::os::unix::fs::FileExt;
    let (d, s, main, wal, host) = live_fixture();
    assert_eq!(s.attach_live_dir(main, wal).unwrap(), host, "idempotent");
    let seg = 16 * PAGE_SIZE;
    let ps = PAGE_SIZE as u64;
    let page = |i: usize| vec![i as u8 + 1; PAGE_SIZE];
    let name1 = "000000010000000000000001";
    // PostgreSQL's way: a temporary file of zeros, renamed to the segment's name.
    std::fs::write(host.join("xlogtemp.7"), vec![0u8; seg]).unwrap();
    std::fs::rename(host.join("xlogtemp.7"), host.join(name1)).unwrap();
    let w1 = std::fs::OpenOptions::new()
        .write(true)
        .open(host.join(name1))
        .unwrap();
    w1.write_all_at(&page(0), 0).unwrap();
    w1.write_all_at(&page(1), ps).unwrap();
    // A data file's frame after that WAL: a mirror before it records the WAL.
    file(&s, main, "data");
    let with_two = s.last_lsn() + 1;
    let seg1 = s.lookup(main, wal, name1.as_bytes()).unwrap().ino;
    assert!(s.is_external(main, seg1).unwrap());
    assert!(
        s.lookup(main, wal, b"xlogtemp.7").is_err(),
        "the rename is mirrored"
    );
    w1.write_all_at(&page(2), 2 * ps).unwrap();
    let two = s.branch(main, BranchPoint::Lsn(with_two), b"two").unwrap();
    let three = s.branch(main, BranchPoint::Now, b"three").unwrap();
    let upto = |n: usize| -> Vec<u8> {
        (0..n)
            .flat_map(page)
            .chain(std::iter::repeat_n(0, seg - n * PAGE_SIZE))
            .collect()
    };
    assert_same(&all(&s, two, seg1), &upto(2));
    assert_same(&all(&s, three, seg1), &upto(3));
    assert_same(&all(&s, main, seg1), &upto(3));
    assert!(s.lookup(two, ROOT_INO, b"data").is_ok());

    // A branch's live directory: the segment its point cut is a copy of its own, cut there.
    let h3 = s.attach_live_dir(three, wal).unwrap();
    assert_ne!(h3, host);
    assert_ne!(host_ino(&h3.join(name1)), host_ino(&host.join(name1)));
    assert_same(&std::fs::read(h3.join(name1)).unwrap(), &upto(3));
    w1.write_all_at(&page(3), 3 * ps).unwrap();
    s.sync().unwrap();
    assert_same(&std::fs::read(h3.join(name1)).unwrap(), &upto(3));
    // Its compute writes its copy; the parent never sees it.
    let w3 = std::fs::OpenOptions::new()
        .write(true)
        .open(h3.join(name1))
        .unwrap();
    w3.write_all_at(b"branch", 3 * ps).unwrap();
    s.write(
        three,
        s.lookup(three, ROOT_INO, b"data").unwrap().ino,
        0,
        b"x",
    )
    .unwrap();
    s.sync().unwrap();
    let mut want3 = upto(3);
    want3[3 * PAGE_SIZE..3 * PAGE_SIZE + 6].copy_from_slice(b"branch");
    assert_same(&all(&s, three, seg1), &want3);
    assert_same(&all(&s, main, seg1), &upto(4));

    // The parent fills its first segment and moves on to a second: the first is finished,
    // and a new branch shares it (a hard link of the same object), copying only the second.
    for i in 4..16 {
        w1.write_all_at(&page(i), i as u64 * ps).unwrap();
    }
    let name2 = "000000010000000000000002";
    std::fs::write(host.join(name2), vec![0u8; seg]).unwrap();
    let w2 = std::fs::OpenOptions::new()
        .write(true)
        .open(host.join(name2))
        .unwrap();
    w2.write_all_at(&page(9), 0).unwrap();
    let four = s.branch(main, BranchPoint::Now, b"four").unwrap();
    let h4 = s.attach_live_dir(four, wal).unwrap();
    assert_eq!(host_ino(&h4.join(name1)), host_ino(&host.join(name1)));
    assert_ne!(host_ino(&h4.join(name2)), host_ino(&host.join(name2)));
    let seg2 = s.lookup(main, wal, name2.as_bytes()).unwrap().ino;
    let mut want_seg2 = vec![0u8; seg];
    want_seg2[..PAGE_SIZE].copy_from_slice(&page(9));
    assert_same(&std::fs::read(h4.join(name2)).unwrap(), &want_seg2);
    assert_same(&all(&s, four, seg2), &want_seg2);

    // The parent removes its first segment: gone from it, kept by the branches.
    std::fs::remove_file(host.join(name1)).unwrap();
    s.commit_external_notes().unwrap();
    assert!(s.lookup(main, wal, name1.as_bytes()).is_err());
    assert_same(&all(&s, four, seg1), &upto(16));
    assert_same(&std::fs::read(h4.join(name1)).unwrap(), &upto(16));

    // A crash of the store: what the compute wrote after the last mirror is found at open.
    w2.write_all_at(&page(10), ps).unwrap();
    drop(s);
    let s = open(d.path());
    want_seg2[PAGE_SIZE..2 * PAGE_SIZE].copy_from_slice(&page(10));
    assert_same(&all(&s, main, seg2), &want_seg2);
    let after = s.branch(main, BranchPoint::Now, b"after").unwrap();
    assert_same(&all(&s, after, seg2), &want_seg2);
    // Attached again, the directory is the same one, not filled again.
    assert_eq!(s.attach_live_dir(main, wal).unwrap(), host);
    s.detach_live_dir(main).unwrap();

    // Deleting a timeline deletes its live directory.
    s.delete_timeline(three).unwrap();
    assert!(!h3.exists());
    drop((w1, w2, w3));
}

#[test]
fn a_live_file_that_lost_written_pages_is_forked_at_open() {
    use std::os::unix::fs::FileExt;
    let (d, s, main, wal, host) = live_fixture();
    let name = "000000010000000000000001";
    let seg = 8 * PAGE_SIZE;
    let ps = PAGE_SIZE as u64;
    let page = |i: usize| vec![i as u8 + 1; PAGE_SIZE];
    std::fs::write(host.join(name), vec![0u8; seg]).unwrap();
    let w = std::fs::OpenOptions::new()
        .write(true)
        .open(host.join(name))
        .unwrap();
    for i in 0..4 {
        w.write_all_at(&page(i), i as u64 * ps).unwrap();
    }
    file(&s, main, "data");
    let before = s.last_lsn() + 1;
    let ino = s.lookup(main, wal, name.as_bytes()).unwrap().ino;
    let old = host_ino(&host.join(name));
    drop(s);
    // A power loss took the last two pages the store had recorded.
    w.write_all_at(&vec![0u8; 2 * PAGE_SIZE], 2 * ps).unwrap();
    drop(w);
    let s = open(d.path());
    assert_ne!(host_ino(&host.join(name)), old, "forked at open");
    // The compute writes new WAL over the lost part, in the copy.
    assert_eq!(s.attach_live_dir(main, wal).unwrap(), host);
    let w = std::fs::OpenOptions::new()
        .write(true)
        .open(host.join(name))
        .unwrap();
    w.write_all_at(&page(7), 2 * ps).unwrap();
    s.commit_external_notes().unwrap();
    let now: Vec<u8> = [page(0), page(1), page(7)]
        .concat()
        .into_iter()
        .chain(std::iter::repeat_n(0, seg - 3 * PAGE_SIZE))
        .collect();
    assert_same(&all(&s, main, ino), &now);
    // The position before the loss keeps the old object: a hole where pages were lost (its
    // recovery stops there), never the new WAL.
    let past = s.branch(main, BranchPoint::Lsn(before), b"past").unwrap();
    let got = all(&s, past, ino);
    assert_same(&got[..2 * PAGE_SIZE], &[page(0), page(1)].concat());
    assert!(got[2 * PAGE_SIZE..3 * PAGE_SIZE].iter().all(|b| *b == 0));
    s.detach_live_dir(main).unwrap();
}

#[test]
fn a_file_created_while_the_compute_adds_a_wal_segment_gets_a_number_of_its_own() {
    let (_d, s, main, wal, host) = live_fixture();
    let name = "000000010000000000000001";
    // The compute creates a segment after the mirror `add_inode` makes first, before the
    // frame of the new file is committed (it writes to the host filesystem, not waiting for
    // the store's lock): the mirror before that frame must not give it the same number.
    let a = s
        .add_inode(
            main,
            ROOT_INO,
            b"postmaster.pid",
            |st| {
                std::fs::write(host.join(name), vec![7u8; PAGE_SIZE]).unwrap();
                s.new_inode(st, FileKind::Regular, 0o600, 1, 1)
            },
            None,
            None,
        )
        .unwrap();
    s.write(main, a.ino, 0, b"4242\n").unwrap();
    s.sync().unwrap();
    let seg = s.lookup(main, wal, name.as_bytes()).unwrap().ino;
    assert_ne!(seg, a.ino, "two files with one inode number");
    assert_eq!(all(&s, main, a.ino), b"4242\n");
    assert_eq!(all(&s, main, seg), vec![7u8; PAGE_SIZE]);
}
