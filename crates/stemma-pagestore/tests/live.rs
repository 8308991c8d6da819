//! Model-based test of live directories (`live.rs`): a timeline's `pg_wal` is a directory of
//! the host filesystem that its compute writes directly, and the store mirrors it.
//!
//! Random operations play a compute's part on the host directory (as PostgreSQL writes WAL:
//! a temporary file of zeros renamed to the next segment's name, records appended after the
//! last written byte and fsynced, finished segments removed), and the store's part (data-file
//! writes through the store, the periodic mirror, syncs, clean reopens, power cuts of the
//! log). The model is the host directory as it is, and the store's record of it as of the
//! last mirror. Which operations mirror is the store's promise: every frame of the timeline
//! comes after a mirror under the same hold of the state lock (so a data write's frame comes
//! after the WAL written before it), a branch at "now" mirrors, and `open` mirrors.
//!
//! After every operation the timeline reads as the model says. A branch at any position an
//! operation ended at must see the data files and `pg_wal` as they were then; its own live
//! directory must hold that `pg_wal` (never-written files may be left out), and its compute's
//! writes there must not reach the parent's files.
//!
//! `PROPTEST_CASES=1000 cargo nextest run -p stemma-pagestore --test live` runs it longer.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use stemma_pagestore::{
    BranchPoint, Config, FileKind, Ino, PageStore, TimelineId, PAGE_SIZE, ROOT_INO,
};

mod common;
use common::{cases, power_cut};

/// Small segments, so that cases fill several.
const SEG: usize = 3 * PAGE_SIZE;
const TEMP: &str = "xlogtemp.1";

#[derive(Debug, Clone)]
enum Op {
    /// A new segment's temporary file, zeros, fsynced (if there is none).
    WalTemp,
    /// The temporary file renamed to the next segment's name.
    WalInstall,
    /// Non-zero bytes after the last written byte of the first segment with room, fsynced.
    WalAppend {
        len: u16,
        fill: u8,
    },
    /// The first segment removed, once a later one has data (it is finished).
    WalRemove,
    /// A store write appending to a data file (`new`: a new file first).
    Data {
        new: bool,
        len: u16,
        fill: u8,
    },
    /// The server's periodic mirror.
    Mirror,
    /// A branch at "now" or at a past position an operation ended at, checked and deleted.
    Branch {
        past: Option<u16>,
        child_writes: bool,
    },
    Sync,
    Reopen,
    Crash {
        cut: u16,
        junk: bool,
    },
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::WalTemp),
        3 => Just(Op::WalInstall),
        8 => (1u16..12_000, any::<u8>()).prop_map(|(len, fill)| Op::WalAppend { len, fill }),
        1 => Just(Op::WalRemove),
        6 => (proptest::bool::weighted(0.2), 1u16..10_000, any::<u8>())
            .prop_map(|(new, len, fill)| Op::Data { new, len, fill }),
        2 => Just(Op::Mirror),
        4 => (proptest::option::of(any::<u16>()), any::<bool>())
            .prop_map(|(past, child_writes)| Op::Branch { past, child_writes }),
        2 => Just(Op::Sync),
        1 => Just(Op::Reopen),
        2 => (any::<u16>(), any::<bool>()).prop_map(|(cut, junk)| Op::Crash { cut, junk }),
    ]
}

type Files = BTreeMap<String, Vec<u8>>;

/// What a failure prints of files: each one's size, written end and a hash of its bytes.
fn digest(files: &Files) -> BTreeMap<String, (usize, usize, u64)> {
    use std::hash::{Hash, Hasher};
    files
        .iter()
        .map(|(n, d)| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            d.hash(&mut h);
            (n.clone(), (d.len(), written_end(d), h.finish()))
        })
        .collect()
}

/// What a reader of the timeline sees: its data files and its `pg_wal`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Snap {
    data: Files,
    wal: Files,
}

fn segment_name(n: u32) -> String {
    format!("{:08X}{:08X}{:08X}", 1, 0, n)
}

fn nonzero(fill: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| 1 + ((usize::from(fill) + i * 7) % 255) as u8)
        .collect()
}

fn written_end(data: &[u8]) -> usize {
    data.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1)
}

fn segments(files: &Files) -> Vec<&String> {
    files.keys().filter(|k| k.as_str() != TEMP).collect()
}

fn fsync(path: &Path) {
    std::fs::File::open(path).unwrap().sync_all().unwrap();
}

/// The compute's side of a WAL operation: changes the host directory and the model of it.
fn host_apply(dir: &Path, host: &mut Files, next_seg: &mut u32, op: &Op) {
    match *op {
        Op::WalTemp if !host.contains_key(TEMP) => {
            std::fs::write(dir.join(TEMP), vec![0u8; SEG]).unwrap();
            fsync(&dir.join(TEMP));
            host.insert(TEMP.into(), vec![0u8; SEG]);
        }
        Op::WalInstall => {
            if let Some(data) = host.remove(TEMP) {
                let name = segment_name(*next_seg);
                *next_seg += 1;
                std::fs::rename(dir.join(TEMP), dir.join(&name)).unwrap();
                fsync(dir);
                host.insert(name, data);
            }
        }
        Op::WalAppend { len, fill } => {
            // PostgreSQL fills segments in name order: the first with room.
            let Some(name) = segments(host)
                .into_iter()
                .find(|n| written_end(&host[*n]) < SEG)
                .cloned()
            else {
                return;
            };
            let data = host.get_mut(&name).unwrap();
            let at = written_end(data);
            let bytes = nonzero(fill, usize::from(len).min(SEG - at));
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join(&name))
                .unwrap();
            f.write_all_at(&bytes, at as u64).unwrap();
            f.sync_data().unwrap();
            data[at..at + bytes.len()].copy_from_slice(&bytes);
        }
        Op::WalRemove => {
            let segs = segments(host);
            let finished = segs.len() > 1 && segs[1..].iter().any(|n| written_end(&host[*n]) > 0);
            if finished {
                let name = segs[0].clone();
                std::fs::remove_file(dir.join(&name)).unwrap();
                host.remove(&name);
            }
        }
        _ => {}
    }
}

/// The regular files of directory `dir` as timeline `tl` reads them.
fn store_files(s: &PageStore, tl: TimelineId, dir: Ino) -> Files {
    s.readdir(tl, dir)
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == FileKind::Regular && e.name != b"." && e.name != b"..")
        .map(|e| {
            let size = s.getattr(tl, e.ino).unwrap().size;
            let data = s.read(tl, e.ino, 0, size as usize).unwrap();
            (String::from_utf8(e.name).unwrap(), data)
        })
        .collect()
}

/// What the store shows of timeline `tl`.
fn store_snap(s: &PageStore, tl: TimelineId, wal: Ino) -> Snap {
    Snap {
        data: store_files(s, tl, ROOT_INO),
        wal: store_files(s, tl, wal),
    }
}

/// What a host directory holds.
fn host_files(dir: &Path) -> Files {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().into_string().unwrap(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

fn config() -> Config {
    Config {
        segment_size: 1 << 16,
        ..Config::default()
    }
}

struct Store {
    s: PageStore,
    main: TimelineId,
    wal: Ino,
    host: PathBuf,
}

/// Opens the store and attaches main's live directory, as the driver does before its compute
/// starts.
fn open(dir: &Path, main: TimelineId, wal: Ino) -> Store {
    let s = PageStore::open(dir, config()).unwrap();
    let host = s.attach_live_dir(main, wal).unwrap();
    Store { s, main, wal, host }
}

/// Checks a branch at `at` against `want`, its live directory, and that its compute's writes
/// stay its own; then deletes it.
fn check_branch(
    st: &Store,
    at: BranchPoint,
    want: &Snap,
    host_now: &Files,
    child_writes: bool,
) -> Result<(), TestCaseError> {
    let child = st.s.branch(st.main, at, b"child").unwrap();
    let got = store_snap(&st.s, child, st.wal);
    prop_assert_eq!(
        digest(&got.data),
        digest(&want.data),
        "data files of a branch at {:?}",
        at
    );
    prop_assert_eq!(
        digest(&got.wal),
        digest(&want.wal),
        "pg_wal of a branch at {:?}",
        at
    );
    let h = st.s.attach_live_dir(child, st.wal).unwrap();
    let filled = host_files(&h);
    for (name, data) in &want.wal {
        match filled.get(name) {
            Some(f) => prop_assert!(
                f == data,
                "{} in the branch's live directory: {:?} against {:?}",
                name,
                digest(&Files::from([(name.clone(), f.clone())])),
                digest(&Files::from([(name.clone(), data.clone())]))
            ),
            None => prop_assert!(
                data.iter().all(|b| *b == 0),
                "{} left out of the branch's live directory",
                name
            ),
        }
    }
    for name in filled.keys() {
        prop_assert!(want.wal.contains_key(name), "{} in the branch only", name);
    }
    if child_writes {
        // The branch's compute appends to its last segment with room and removes the first.
        let segs = segments(&filled);
        if let Some(name) = segs.iter().find(|n| written_end(&filled[**n]) < SEG) {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(h.join(name))
                .unwrap();
            let at = written_end(&filled[*name]);
            f.write_all_at(&nonzero(99, SEG - at), at as u64).unwrap();
            f.sync_data().unwrap();
        }
        if let Some(first) = segs.first() {
            std::fs::remove_file(h.join(first)).unwrap();
        }
        st.s.commit_external_notes().unwrap();
        prop_assert_eq!(
            digest(&host_files(&st.host)),
            digest(host_now),
            "the branch wrote into its parent"
        );
    }
    st.s.delete_timeline(child).unwrap();
    prop_assert!(!h.exists(), "a deleted branch's live directory stays");
    Ok(())
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let (main, wal) = {
        let s = PageStore::open(dir.path(), config()).unwrap();
        let main = s.create_root(b"main").unwrap();
        let wal = s.mkdir(main, ROOT_INO, b"pg_wal", 0o700, 1, 1).unwrap().ino;
        s.sync().unwrap();
        (main, wal)
    };
    let mut st = Some(open(dir.path(), main, wal));
    // The host directory as it is, and the store's record of it as of the last mirror.
    let mut host = Files::new();
    let mut seen = Snap::default();
    let mut next_seg = 1u32;
    let mut next_file = 0u32;
    // What a reader saw after each position an operation ended at; positions in between
    // (frames of a mirror, before the operation's own) are not branched at.
    let mut history: BTreeMap<u64, Snap> = BTreeMap::new();
    history.insert(st.as_ref().unwrap().s.last_lsn(), seen.clone());

    for op in &ops {
        let s = st.as_ref().unwrap();
        let host_dir = s.host.clone();
        let before = s.s.last_lsn();
        // Whether the operation mirrored main's live directory: then the store's record of it
        // is the host directory, and the positions from the operation's last frame on hold
        // its outcome (those between `before` and it may be a mirror's frames part way, and
        // are not branched at).
        let mut mirrored = false;
        match op {
            Op::WalTemp | Op::WalInstall | Op::WalAppend { .. } | Op::WalRemove => {
                host_apply(&host_dir, &mut host, &mut next_seg, op);
            }
            Op::Data { new, len, fill } => {
                let names: Vec<String> = seen.data.keys().cloned().collect();
                let (ino, name) = if *new || names.is_empty() {
                    let name = format!("f{next_file}");
                    next_file += 1;
                    let a =
                        s.s.create(main, ROOT_INO, name.as_bytes(), 0o600, 1, 1)
                            .unwrap();
                    // Its frame came after a mirror: a position of its own, the file empty.
                    seen.wal = host.clone();
                    seen.data.insert(name.clone(), Vec::new());
                    history.insert(s.s.last_lsn(), seen.clone());
                    (a.ino, name)
                } else {
                    let name = names[usize::from(*fill) % names.len()].clone();
                    (
                        s.s.lookup(main, ROOT_INO, name.as_bytes()).unwrap().ino,
                        name,
                    )
                };
                let data = seen.data.entry(name).or_default();
                let bytes = nonzero(*fill, usize::from(*len));
                s.s.write(main, ino, data.len() as u64, &bytes).unwrap();
                data.extend_from_slice(&bytes);
                mirrored = true;
            }
            Op::Mirror => {
                s.s.commit_external_notes().unwrap();
                mirrored = true;
            }
            Op::Branch { past, child_writes } => {
                let (at, want) = match past {
                    None => {
                        // A branch at "now" mirrors its parent first.
                        seen.wal = host.clone();
                        (BranchPoint::Now, seen.clone())
                    }
                    Some(p) => {
                        let positions: Vec<u64> = history.keys().copied().collect();
                        let l = positions[usize::from(*p) % positions.len()];
                        (BranchPoint::Lsn(l + 1), history[&l].clone())
                    }
                };
                check_branch(s, at, &want, &host, *child_writes)?;
                // The branch's frames change nothing main sees; its compute's writes were
                // followed by the periodic mirror, main's too.
                mirrored = past.is_none() || *child_writes;
            }
            Op::Sync => s.s.sync().unwrap(),
            Op::Reopen => {
                drop(st.take());
                st = Some(open(dir.path(), main, wal));
                mirrored = true;
            }
            Op::Crash { cut, junk } => {
                let mark = s.s.durable_mark();
                drop(st.take());
                power_cut(dir.path(), mark, *cut, *junk);
                st = Some(open(dir.path(), main, wal));
                let r = st.as_ref().unwrap().s.recovered_lsn();
                prop_assert!(r >= mark.lsn, "lost synced changes: {} < {}", r, mark.lsn);
                // Back to the last position an operation ended at (a cut inside a mirror's
                // frames changed no data file); `open` then mirrored the host directory.
                history.retain(|l, _| *l <= r);
                seen.data = history.iter().next_back().unwrap().1.data.clone();
                mirrored = true;
            }
        }
        let s = st.as_ref().unwrap();
        let after = s.s.last_lsn();
        if mirrored {
            seen.wal = host.clone();
            history.insert(after, seen.clone());
        } else {
            for l in before + 1..=after {
                history.insert(l, seen.clone());
            }
        }
        prop_assert_eq!(
            digest(&store_files(&s.s, main, ROOT_INO)),
            digest(&seen.data),
            "main's data files after {:?}",
            op
        );
        prop_assert_eq!(
            digest(&host_files(&s.host)),
            digest(&host),
            "main's live directory after {:?}",
            op
        );
        if mirrored {
            // What the store recorded (main's own reads of its live files see the host
            // files): a branch at the last position, with its live directory.
            check_branch(s, BranchPoint::Lsn(after + 1), &seen, &host, false)?;
            for l in after + 1..=s.s.last_lsn() {
                history.insert(l, seen.clone());
            }
        }
    }
    drop(st.take());
    let s = open(dir.path(), main, wal);
    seen.wal = host;
    prop_assert_eq!(
        digest(&store_files(&s.s, main, ROOT_INO)),
        digest(&seen.data),
        "data files after a last reopen"
    );
    check_branch(&s, BranchPoint::Now, &seen, &seen.wal, true)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), max_shrink_iters: 2000, ..ProptestConfig::default() })]

    #[test]
    fn live_directory_matches_model(ops in proptest::collection::vec(op_strategy(), 1..50)) {
        run(ops)?;
    }
}
