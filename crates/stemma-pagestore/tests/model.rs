//! Model-based test: random sequences of operations run against the page store and against a
//! plain in-memory model (a map of paths per timeline); after every operation each timeline must
//! read exactly as the model says. Operations include branches (of branches, at past positions),
//! timeline deletion, fsync, clean reopen, and simulated power loss: the store is dropped and
//! the log's unsynced tail is cut at a random byte (sometimes followed by garbage), after which
//! the store must come back as of the last fsync or a later prefix of the operations.
//!
//! A fake clock advances (`Tick`), so the retention window moves; `Gc` and `Maintain` collect
//! the index, compact and checkpoint, `Maintain` possibly crashing after one of its steps.
//! Branches at past positions must work inside the window and be refused before it, and
//! after each GC the oldest position of the window (the horizon) is branched and checked.
//!
//! External files (`create_external`, the kind the WAL is) get operations of their own,
//! written only as PostgreSQL writes WAL segments: grown with zeros, then appended to right
//! after their last written byte (filling the last written page, then the next), each change
//! fsynced (the file and then the log, so that a
//! crash never rolls them back: their bytes live outside the log). Branches at any position
//! must see them cut where they were, branches that append must write into a copy of their
//! own, and no object may be deleted while a reachable version names it.
//!
//! `PROPTEST_CASES=1000 cargo nextest run -p stemma-pagestore --test model` runs it longer.
//! A failure prints the minimal sequence of operations; proptest also records its seed in
//! `proptest-regressions/model.txt`, and reruns that case first on the next run.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use proptest::prelude::*;

mod common;
use common::{cases, power_cut};
use stemma_pagestore::{
    BranchPoint, Clock, Config, FileKind, MaintenanceStep, PageStore, SetAttr, TimelineId, ROOT_INO,
};

/// Seconds of history a branch can reach back (the store's retention window).
const RETENTION_SECS: i64 = 60;

const PATHS: &[&str] = &["a", "b", "d", "d/a", "d/b", "d/e", "d/e/a"];
/// External files live at the root under names of their own, which the other operations
/// never touch (their writes and truncates would break the writing discipline).
const EXT_PATHS: &[&str] = &["w0", "w1"];
const PAGE: usize = stemma_pagestore::PAGE_SIZE;
const MAX_TIMELINES: usize = 8;

#[derive(Debug, Clone)]
enum Op {
    Write {
        tl: usize,
        path: usize,
        offset: u32,
        len: u32,
        fill: u8,
    },
    Truncate {
        tl: usize,
        path: usize,
        size: u32,
    },
    Create {
        tl: usize,
        path: usize,
    },
    Mkdir {
        tl: usize,
        path: usize,
    },
    Symlink {
        tl: usize,
        path: usize,
    },
    Unlink {
        tl: usize,
        path: usize,
    },
    UnlinkWhileOpen {
        tl: usize,
        path: usize,
    },
    Rmdir {
        tl: usize,
        path: usize,
    },
    Rename {
        tl: usize,
        from: usize,
        to: usize,
    },
    Branch {
        tl: usize,
        past: Option<u32>,
    },
    Delete {
        tl: usize,
    },
    Sync,
    Reopen,
    Crash {
        cut: u16,
        junk: bool,
    },
    /// Creates an external file.
    ExtCreate {
        tl: usize,
        path: usize,
    },
    /// Sizes an external file to at least `pages` pages of zeros (`wal_init_zero`), fsynced.
    ExtGrow {
        tl: usize,
        path: usize,
        pages: u8,
    },
    /// Writes `len` non-zero bytes right after the external file's last non-zero byte (in
    /// the page it ends in, as PostgreSQL fills its WAL pages), fsynced.
    ExtAppend {
        tl: usize,
        path: usize,
        len: u16,
        fill: u8,
    },
    ExtUnlink {
        tl: usize,
        path: usize,
    },
    /// The server's log preparer runs: the next segment may be prepared, and the log rolls
    /// into it when the active one is full.
    Prepare,
    /// The clock moves on.
    Tick {
        secs: u8,
    },
    /// GC of the index, then a check of the horizon on timeline `tl`.
    Gc {
        tl: usize,
    },
    /// GC, compaction, checkpoint; `step < 4` crashes (power loss) after that step.
    Maintain {
        tl: usize,
        step: u8,
        cut: u16,
        junk: bool,
    },
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let tl = 0..MAX_TIMELINES;
    // Most operations hit a few hot paths, so that sequences like write, truncate, extend on
    // one file are common.
    let path = prop_oneof![4 => Just(0usize), 2 => Just(3usize), 3 => 0..PATHS.len()];
    prop_oneof![
        8 => (tl.clone(), path.clone(), 0u32..40_000, 1u32..20_000, any::<u8>())
            .prop_map(|(tl, path, offset, len, fill)| Op::Write { tl, path, offset, len, fill }),
        3 => (tl.clone(), path.clone(), 0u32..40_000).prop_map(|(tl, path, size)| Op::Truncate { tl, path, size }),
        5 => (tl.clone(), path.clone()).prop_map(|(tl, path)| Op::Create { tl, path }),
        3 => (tl.clone(), path.clone()).prop_map(|(tl, path)| Op::Mkdir { tl, path }),
        1 => (tl.clone(), path.clone()).prop_map(|(tl, path)| Op::Symlink { tl, path }),
        2 => (tl.clone(), path.clone()).prop_map(|(tl, path)| Op::Unlink { tl, path }),
        1 => (tl.clone(), path.clone()).prop_map(|(tl, path)| Op::UnlinkWhileOpen { tl, path }),
        2 => (tl.clone(), path.clone()).prop_map(|(tl, path)| Op::Rmdir { tl, path }),
        3 => (tl.clone(), path.clone(), path.clone()).prop_map(|(tl, from, to)| Op::Rename { tl, from, to }),
        3 => (tl.clone(), proptest::option::of(any::<u32>())).prop_map(|(tl, past)| Op::Branch { tl, past }),
        1 => tl.clone().prop_map(|tl| Op::Delete { tl }),
        2 => Just(Op::Sync),
        3 => Just(Op::Prepare),
        1 => Just(Op::Reopen),
        2 => (tl.clone(), 0..EXT_PATHS.len()).prop_map(|(tl, path)| Op::ExtCreate { tl, path }),
        1 => (tl.clone(), 0..EXT_PATHS.len(), 1u8..6).prop_map(|(tl, path, pages)| Op::ExtGrow { tl, path, pages }),
        4 => (tl.clone(), 0..EXT_PATHS.len(), 1u16..20_000, any::<u8>())
            .prop_map(|(tl, path, len, fill)| Op::ExtAppend { tl, path, len, fill }),
        1 => (tl.clone(), 0..EXT_PATHS.len()).prop_map(|(tl, path)| Op::ExtUnlink { tl, path }),
        2 => (any::<u16>(), any::<bool>()).prop_map(|(cut, junk)| Op::Crash { cut, junk }),
        4 => (0u8..60).prop_map(|secs| Op::Tick { secs }),
        2 => tl.clone().prop_map(|tl| Op::Gc { tl }),
        3 => (tl.clone(), 0u8..5, any::<u16>(), any::<bool>())
            .prop_map(|(tl, step, cut, junk)| Op::Maintain { tl, step, cut, junk }),
    ]
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    File(Vec<u8>),
    Dir,
    Link(Vec<u8>),
}

type Fs = BTreeMap<String, Node>;

#[derive(Debug, Clone, Default)]
struct Model {
    timelines: BTreeMap<u64, Fs>,
    children: BTreeMap<u64, usize>,
    parent: BTreeMap<u64, u64>,
}

const ENOENT: i32 = libc::ENOENT;
const ENOTDIR: i32 = libc::ENOTDIR;
const EISDIR: i32 = libc::EISDIR;
const EEXIST: i32 = libc::EEXIST;
const ENOTEMPTY: i32 = libc::ENOTEMPTY;
const EINVAL: i32 = libc::EINVAL;

fn split(path: &str) -> (&str, &str) {
    match path.rfind('/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => ("", path),
    }
}

fn kind(n: &Node) -> FileKind {
    match n {
        Node::File(_) => FileKind::Regular,
        Node::Dir => FileKind::Directory,
        Node::Link(_) => FileKind::Symlink,
    }
}

/// Walks `path` component by component, as the engine's lookups do.
fn m_resolve(fs: &Fs, path: &str) -> Result<FileKind, i32> {
    let mut k = FileKind::Directory;
    if path.is_empty() {
        return Ok(k);
    }
    let mut cur = String::new();
    for comp in path.split('/') {
        if k != FileKind::Directory {
            return Err(ENOTDIR);
        }
        if !cur.is_empty() {
            cur.push('/');
        }
        cur.push_str(comp);
        k = kind(fs.get(&cur).ok_or(ENOENT)?);
    }
    Ok(k)
}

fn m_parent_dir(fs: &Fs, path: &str) -> Result<(), i32> {
    match m_resolve(fs, split(path).0)? {
        FileKind::Directory => Ok(()),
        _ => Err(ENOTDIR),
    }
}

fn has_children(fs: &Fs, dir: &str) -> bool {
    let prefix = format!("{dir}/");
    fs.range(prefix.clone()..)
        .next()
        .is_some_and(|(k, _)| k.starts_with(&prefix))
}

fn pattern(fill: u8, len: usize) -> Vec<u8> {
    // fill 0 writes zeros (the zero-page path); otherwise a pattern with some zero bytes.
    (0..len)
        .map(|i| {
            if fill == 0 {
                0
            } else {
                fill.wrapping_mul((i % 11) as u8)
            }
        })
        .collect()
}

/// The model's side of a filesystem operation: the errno the engine must return, or the change.
fn model_apply(fs: &mut Fs, op: &Op) -> Result<(), i32> {
    match *op {
        Op::Write {
            path,
            offset,
            len,
            fill,
            ..
        } => {
            let p = PATHS[path];
            match m_resolve(fs, p)? {
                FileKind::Directory => return Err(EISDIR),
                FileKind::Symlink => return Err(EINVAL),
                FileKind::Regular => {}
            }
            let Some(Node::File(data)) = fs.get_mut(p) else {
                unreachable!()
            };
            let (off, len) = (offset as usize, len as usize);
            if data.len() < off + len {
                data.resize(off + len, 0);
            }
            data[off..off + len].copy_from_slice(&pattern(fill, len));
        }
        Op::Truncate { path, size, .. } => {
            let p = PATHS[path];
            match m_resolve(fs, p)? {
                FileKind::Directory => return Err(EISDIR),
                FileKind::Symlink => return Err(EINVAL),
                FileKind::Regular => {}
            }
            let Some(Node::File(data)) = fs.get_mut(p) else {
                unreachable!()
            };
            data.resize(size as usize, 0);
        }
        Op::Create { path, .. } | Op::Mkdir { path, .. } | Op::Symlink { path, .. } => {
            let p = PATHS[path];
            m_parent_dir(fs, p)?;
            if fs.contains_key(p) {
                return Err(EEXIST);
            }
            let node = match op {
                Op::Create { .. } => Node::File(Vec::new()),
                Op::Mkdir { .. } => Node::Dir,
                _ => Node::Link(format!("target-of-{p}").into_bytes()),
            };
            fs.insert(p.to_string(), node);
        }
        Op::Unlink { path, .. } | Op::UnlinkWhileOpen { path, .. } => {
            let p = PATHS[path];
            m_parent_dir(fs, p)?;
            match fs.get(p) {
                None => return Err(ENOENT),
                Some(Node::Dir) => return Err(EISDIR),
                Some(_) => {}
            }
            fs.remove(p);
        }
        Op::Rmdir { path, .. } => {
            let p = PATHS[path];
            m_parent_dir(fs, p)?;
            match fs.get(p) {
                None => return Err(ENOENT),
                Some(Node::Dir) => {}
                Some(_) => return Err(ENOTDIR),
            }
            if has_children(fs, p) {
                return Err(ENOTEMPTY);
            }
            fs.remove(p);
        }
        Op::Rename { from, to, .. } => {
            let (f, t) = (PATHS[from], PATHS[to]);
            m_parent_dir(fs, f)?;
            m_parent_dir(fs, t)?;
            let src_is_dir = match fs.get(f) {
                None => return Err(ENOENT),
                Some(n) => *n == Node::Dir,
            };
            if f == t {
                return Ok(());
            }
            let tp = split(t).0;
            if src_is_dir && (tp == f || tp.starts_with(&format!("{f}/"))) {
                return Err(EINVAL);
            }
            if let Some(d) = fs.get(t) {
                match (src_is_dir, *d == Node::Dir) {
                    (true, false) => return Err(ENOTDIR),
                    (false, true) => return Err(EISDIR),
                    (true, true) if has_children(fs, t) => return Err(ENOTEMPTY),
                    _ => {}
                }
                fs.remove(t);
            }
            let prefix = format!("{f}/");
            let moved: Vec<String> = fs
                .keys()
                .filter(|k| *k == f || k.starts_with(&prefix))
                .cloned()
                .collect();
            for k in moved {
                let n = fs.remove(&k).unwrap_or(Node::Dir);
                fs.insert(format!("{t}{}", &k[f.len()..]), n);
            }
        }
        _ => unreachable!("not a filesystem operation"),
    }
    Ok(())
}

fn e_resolve(s: &PageStore, tl: TimelineId, path: &str) -> Result<u64, i32> {
    let mut ino = ROOT_INO;
    if path.is_empty() {
        return Ok(ino);
    }
    for comp in path.split('/') {
        ino = s
            .lookup(tl, ino, comp.as_bytes())
            .map_err(|e| e.errno())?
            .ino;
    }
    Ok(ino)
}

/// The engine's side of a filesystem operation.
fn engine_apply(s: &PageStore, tl: TimelineId, op: &Op, before: &Fs) -> Result<(), i32> {
    let err = |e: stemma_pagestore::Error| e.errno();
    match *op {
        Op::Write {
            path,
            offset,
            len,
            fill,
            ..
        } => {
            let ino = e_resolve(s, tl, PATHS[path])?;
            let n = s
                .write(tl, ino, offset.into(), &pattern(fill, len as usize))
                .map_err(err)?;
            assert_eq!(n, len as usize);
        }
        Op::Truncate { path, size, .. } => {
            let ino = e_resolve(s, tl, PATHS[path])?;
            let set = SetAttr {
                size: Some(size.into()),
                ..SetAttr::default()
            };
            let a = s.setattr(tl, ino, set).map_err(err)?;
            assert_eq!(a.size, u64::from(size));
        }
        Op::Create { path, .. } | Op::Mkdir { path, .. } | Op::Symlink { path, .. } => {
            let (dir, name) = split(PATHS[path]);
            let parent = e_resolve(s, tl, dir)?;
            let name = name.as_bytes();
            match op {
                Op::Create { .. } => s.create(tl, parent, name, 0o600, 1, 1),
                Op::Mkdir { .. } => s.mkdir(tl, parent, name, 0o700, 1, 1),
                _ => s.symlink(
                    tl,
                    parent,
                    name,
                    format!("target-of-{}", PATHS[path]).as_bytes(),
                    1,
                    1,
                ),
            }
            .map_err(err)?;
        }
        Op::Unlink { path, .. } => {
            let (dir, name) = split(PATHS[path]);
            let parent = e_resolve(s, tl, dir)?;
            s.unlink(tl, parent, name.as_bytes()).map_err(err)?;
        }
        Op::UnlinkWhileOpen { path, .. } => {
            let (dir, name) = split(PATHS[path]);
            let parent = e_resolve(s, tl, dir)?;
            let held = match s.lookup(tl, parent, name.as_bytes()) {
                Ok(a) if a.kind == FileKind::Regular => Some(s.open_handle(tl, a.ino).unwrap().ino),
                _ => None,
            };
            s.unlink(tl, parent, name.as_bytes()).map_err(err)?;
            if let Some(ino) = held {
                // Still readable by inode, with its contents, until released.
                let Some(Node::File(want)) = before.get(PATHS[path]) else {
                    panic!("model has no file")
                };
                let got = s.read(tl, ino, 0, 1 << 20).unwrap();
                assert!(&got == want, "unlinked open file changed");
                s.release_handle(tl, ino).unwrap();
                assert_eq!(s.getattr(tl, ino).unwrap_err().errno(), ENOENT);
            }
        }
        Op::Rmdir { path, .. } => {
            let (dir, name) = split(PATHS[path]);
            let parent = e_resolve(s, tl, dir)?;
            s.rmdir(tl, parent, name.as_bytes()).map_err(err)?;
        }
        Op::Rename { from, to, .. } => {
            let (fd, fname) = split(PATHS[from]);
            let (td, tname) = split(PATHS[to]);
            let fp = e_resolve(s, tl, fd)?;
            let tp = e_resolve(s, tl, td)?;
            s.rename(tl, fp, fname.as_bytes(), tp, tname.as_bytes())
                .map_err(err)?;
        }
        _ => unreachable!(),
    }
    Ok(())
}

/// Where an external file's written part ends in the model: after its last non-zero byte
/// (appends write no zero bytes).
fn written_end(data: &[u8]) -> usize {
    data.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1)
}

/// Bytes with no zero among them, like WAL records (whose pages never hold a zero page).
fn nonzero(fill: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| 1 + ((usize::from(fill) + i * 7) % 255) as u8)
        .collect()
}

/// An operation on an external file, in the model and in the engine; each ends with the
/// file's fsync and the log's, so that no crash rolls it back. Returns the last position
/// that changed nothing a reader sees (a branch copying the file before it writes it).
fn ext_apply(s: &PageStore, tl: TimelineId, fs: &mut Fs, op: &Op) -> Result<u64, TestCaseError> {
    let unchanged = match *op {
        Op::ExtGrow { path, .. } | Op::ExtAppend { path, .. } => {
            if let Ok(ino) = e_resolve(s, tl, EXT_PATHS[path]) {
                // A branch's first write copies the file: its own frame, first.
                s.external_file(tl, ino, true).unwrap();
            }
            s.last_lsn()
        }
        _ => s.last_lsn(),
    };
    let err = |e: stemma_pagestore::Error| e.errno();
    let path = match *op {
        Op::ExtCreate { path, .. }
        | Op::ExtGrow { path, .. }
        | Op::ExtAppend { path, .. }
        | Op::ExtUnlink { path, .. } => EXT_PATHS[path],
        _ => unreachable!(),
    };
    let exists = fs.contains_key(path);
    let got: Result<(), i32> = match *op {
        Op::ExtCreate { .. } => s
            .create_external(tl, ROOT_INO, path.as_bytes(), 0o600, 1, 1)
            .map(|_| ())
            .map_err(err),
        Op::ExtUnlink { .. } => s.unlink(tl, ROOT_INO, path.as_bytes()).map_err(err),
        Op::ExtGrow { pages, .. } => (|| {
            let ino = e_resolve(s, tl, path)?;
            let size = (usize::from(pages) * PAGE) as u64;
            if s.getattr(tl, ino).map_err(err)?.size < size {
                let set = SetAttr {
                    size: Some(size),
                    ..SetAttr::default()
                };
                s.setattr(tl, ino, set).map_err(err)?;
            }
            s.sync_file(tl, ino).map_err(err)
        })(),
        Op::ExtAppend { len, fill, .. } => (|| {
            let ino = e_resolve(s, tl, path)?;
            let Some(Node::File(data)) = fs.get(path) else {
                return Err(ENOENT);
            };
            let at = written_end(data) as u64;
            s.write(tl, ino, at, &nonzero(fill, usize::from(len)))
                .map_err(err)?;
            s.sync_file(tl, ino).map_err(err)
        })(),
        _ => unreachable!(),
    };
    let want = match (op, exists) {
        (Op::ExtCreate { .. }, true) => Err(EEXIST),
        (Op::ExtCreate { .. }, false) => {
            fs.insert(path.to_string(), Node::File(Vec::new()));
            Ok(())
        }
        (_, false) => Err(ENOENT),
        (Op::ExtUnlink { .. }, true) => {
            fs.remove(path);
            Ok(())
        }
        (Op::ExtGrow { pages, .. }, true) => {
            let Some(Node::File(data)) = fs.get_mut(path) else {
                unreachable!()
            };
            let size = usize::from(*pages) * PAGE;
            if data.len() < size {
                data.resize(size, 0);
            }
            Ok(())
        }
        (Op::ExtAppend { len, fill, .. }, true) => {
            let Some(Node::File(data)) = fs.get_mut(path) else {
                unreachable!()
            };
            let at = written_end(data);
            let new = nonzero(*fill, usize::from(*len));
            if data.len() < at + new.len() {
                data.resize(at + new.len(), 0);
            }
            data[at..at + new.len()].copy_from_slice(&new);
            Ok(())
        }
        _ => unreachable!(),
    };
    prop_assert_eq!(got, want, "{:?} on timeline {}", op, tl);
    s.sync().unwrap();
    Ok(unchanged)
}

/// Reads a whole timeline back from the engine as a model filesystem.
fn engine_fs(s: &PageStore, tl: TimelineId) -> Fs {
    let mut fs = Fs::new();
    let mut stack = vec![(ROOT_INO, String::new())];
    while let Some((dir, prefix)) = stack.pop() {
        for e in s.readdir(tl, dir).unwrap() {
            let name = String::from_utf8(e.name).unwrap();
            let path = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            let a = s.getattr(tl, e.ino).unwrap();
            assert_eq!(a.kind, e.kind);
            let node = match e.kind {
                FileKind::Directory => {
                    stack.push((e.ino, path.clone()));
                    Node::Dir
                }
                FileKind::Regular => {
                    let data = s.read(tl, e.ino, 0, 1 << 20).unwrap();
                    assert_eq!(
                        a.size,
                        data.len() as u64,
                        "{path}: size and contents disagree"
                    );
                    Node::File(data)
                }
                FileKind::Symlink => Node::Link(s.readlink(tl, e.ino).unwrap()),
            };
            fs.insert(path, node);
        }
    }
    fs
}

fn describe_diff(got: &Fs, want: &Fs) -> String {
    let mut out = String::new();
    for (k, v) in want {
        match got.get(k) {
            None => out += &format!("missing {k}; "),
            Some(g) if g != v => match (g, v) {
                (Node::File(a), Node::File(b)) => {
                    let first = a.iter().zip(b).position(|(x, y)| x != y);
                    out += &format!(
                        "{k}: len {} vs {}, first difference at {first:?}; ",
                        a.len(),
                        b.len()
                    );
                }
                _ => out += &format!("{k}: {g:?} vs {v:?}; "),
            },
            _ => {}
        }
    }
    for k in got.keys().filter(|k| !want.contains_key(*k)) {
        out += &format!("unexpected {k}; ");
    }
    out
}

fn check_all(s: &PageStore, m: &Model) -> Result<(), TestCaseError> {
    let ids: Vec<u64> = s.timelines().into_iter().map(|t| t.id.0).collect();
    let want: Vec<u64> = m.timelines.keys().copied().collect();
    prop_assert_eq!(ids, want, "timelines differ");
    for (id, fs) in &m.timelines {
        let got = engine_fs(s, TimelineId(*id));
        prop_assert!(&got == fs, "timeline {}: {}", id, describe_diff(&got, fs));
    }
    Ok(())
}

/// `compact_below` above 1 compacts every sealed file on every run: the live pages move each
/// time.
fn config(now: &Arc<AtomicI64>, compact_below: f64) -> Config {
    let now = now.clone();
    // The smallest segments, so that rolls happen within a test case; an exact time index.
    Config {
        segment_size: 1 << 16,
        // Zeros ahead of the log's end: recovery must tell them from frames, and sealing a
        // segment must cut them off. On whatever the fsync rate, and with them prepared
        // segments (`Op::Prepare`): the log rolls into them, and crashes find them.
        log_zero_ahead: 1 << 13,
        log_zero_ahead_bytes_per_sync: u64::MAX,
        compact_below,
        retention: Duration::from_secs(RETENTION_SECS as u64),
        time_granularity: Duration::ZERO,
        clock: Clock::new(move || {
            UNIX_EPOCH + Duration::from_secs(now.load(Ordering::SeqCst) as u64)
        }),
        ..Config::default()
    }
}

/// History of the run: the model after every position, and when each position was committed.
struct History {
    states: Vec<(u64, Model)>,
    times: BTreeMap<u64, i64>,
}

impl History {
    /// Records frames up to `last` that change nothing a reader sees (GC freeing an inode a
    /// restart left unlinked while open): each is a position a crash may come back to, with
    /// the model as it is.
    fn invisible_frames(&mut self, last: u64, m: &Model, now: i64) {
        let known = self.states.last().map_or(0, |(l, _)| *l);
        for l in known + 1..=last {
            self.states.push((l, m.clone()));
            self.times.insert(l, now);
        }
    }

    /// The model as of every change strictly below `p`.
    fn before(&self, p: u64) -> &Model {
        &self.states.iter().rev().find(|(l, _)| *l < p).unwrap().1
    }

    /// Whether a branch at position `p` is inside the retention window at `now`.
    fn in_window(&self, p: u64, next: u64, now: i64) -> bool {
        p == next
            || self
                .times
                .get(&p)
                .is_some_and(|t| *t >= now - RETENTION_SECS)
    }

    /// The oldest position inside the window: what GC must report as its horizon.
    fn horizon(&self, next: u64, now: i64) -> u64 {
        self.times
            .iter()
            .find(|(_, t)| **t >= now - RETENTION_SECS)
            .map_or(next, |(l, _)| *l)
    }
}

/// After a GC with horizon `h`: a branch of `parent` at `h` (the oldest point of the window)
/// reads as the model did then, and one just before it is refused. The branches are deleted
/// again (synced), so the model does not change.
fn check_horizon(
    st: &PageStore,
    history: &History,
    parent: u64,
    h: u64,
    now: i64,
) -> Result<(), TestCaseError> {
    let next = st.last_lsn() + 1;
    // Positions after the last recorded one were committed by this GC (freeing inodes a
    // crash left unlinked while open), now: inside the window.
    let first_new = history.times.keys().last().map_or(1, |l| l + 1);
    prop_assert_eq!(h, history.horizon(first_new, now), "GC horizon");
    if h > parent && h <= next {
        let child = st
            .branch(TimelineId(parent), BranchPoint::Lsn(h), b"horizon")
            .unwrap();
        let want = &history.before(h).timelines[&parent];
        let got = engine_fs(st, child);
        prop_assert!(
            &got == want,
            "branch at the horizon {}: {}",
            h,
            describe_diff(&got, want)
        );
        st.delete_timeline(child).unwrap();
    }
    if h > parent + 1 {
        let r = st.branch(TimelineId(parent), BranchPoint::Lsn(h - 1), b"old");
        prop_assert!(
            matches!(r, Err(stemma_pagestore::Error::OutsideRetention { .. })),
            "branch before the horizon {}: {:?}",
            h,
            r
        );
    }
    Ok(())
}

fn run(ops: Vec<Op>, compact_below: f64) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(AtomicI64::new(1_000_000));
    let now = || clock.load(Ordering::SeqCst);
    let mut s = Some(PageStore::open(dir.path(), config(&clock, compact_below)).unwrap());
    let root = s.as_ref().unwrap().create_root(b"root").unwrap();
    let mut m = Model::default();
    m.timelines.insert(root.0, Fs::new());
    // The model after every position: (lsn, model), to branch at past positions and to know
    // what a crash must come back to; and the time of every position.
    let mut history = History {
        states: vec![(root.0, m.clone())],
        times: BTreeMap::from([(root.0, now())]),
    };

    for op in &ops {
        let st = s.as_ref().unwrap();
        let before = st.last_lsn();
        let mut ext_before = None;
        let ids: Vec<u64> = m.timelines.keys().copied().collect();
        let pick = |i: usize| ids[i % ids.len()];
        // A power loss now: the store must come back as of a prefix at least as long as the
        // last fsync.
        let crash = |s: &mut Option<PageStore>,
                     m: &mut Model,
                     history: &mut History,
                     cut: u16,
                     junk: bool|
         -> Result<(), TestCaseError> {
            let st = s.as_ref().unwrap();
            let before = st.last_lsn();
            let mark = st.durable_mark();
            drop(s.take());
            power_cut(dir.path(), mark, cut, junk);
            let reopened = PageStore::open(dir.path(), config(&clock, compact_below)).unwrap();
            let r = reopened.last_lsn();
            prop_assert!(
                r >= mark.lsn,
                "lost synced changes: recovered to {} < {}",
                r,
                mark.lsn
            );
            prop_assert!(r <= before);
            history.states.retain(|(l, _)| *l <= r);
            history.times.retain(|l, _| *l <= r);
            let (l, snap) = history.states.last().unwrap().clone();
            prop_assert_eq!(l, r, "recovered to a position that no operation ended at");
            *m = snap;
            *s = Some(reopened);
            Ok(())
        };
        match op {
            Op::Sync => st.sync().unwrap(),
            Op::Prepare => {
                st.prepare_log_segment().unwrap();
            }
            Op::Reopen => {
                drop(s.take());
                s = Some(PageStore::open(dir.path(), config(&clock, compact_below)).unwrap());
            }
            Op::Crash { cut, junk } => crash(&mut s, &mut m, &mut history, *cut, *junk)?,
            Op::Tick { secs } => {
                clock.fetch_add(i64::from(*secs), Ordering::SeqCst);
            }
            Op::Gc { tl } => {
                let r = st.gc().unwrap();
                history.invisible_frames(st.last_lsn(), &m, now());
                check_horizon(st, &history, pick(*tl), r.horizon, now())?;
            }
            Op::Maintain {
                tl,
                step,
                cut,
                junk,
            } => {
                let stop = [
                    MaintenanceStep::Gc,
                    MaintenanceStep::PackWritten,
                    MaintenanceStep::Switched,
                    MaintenanceStep::Checkpointed,
                    MaintenanceStep::Done,
                ][usize::from(*step)];
                let r = st.maintain_until(stop).unwrap();
                history.invisible_frames(st.last_lsn(), &m, now());
                if stop == MaintenanceStep::Done {
                    check_horizon(st, &history, pick(*tl), r.gc.horizon, now())?;
                } else {
                    crash(&mut s, &mut m, &mut history, *cut, *junk)?;
                }
            }
            Op::Branch { tl, past } => {
                if m.timelines.len() >= MAX_TIMELINES {
                    continue;
                }
                let parent = pick(*tl);
                let next = before + 1;
                let pos = past.map(|p| parent + 1 + u64::from(p) % (next - parent));
                let at = pos.map_or(BranchPoint::Now, BranchPoint::Lsn);
                let p = pos.unwrap_or(next);
                let r = st.branch(TimelineId(parent), at, b"child");
                if !history.in_window(p, next, now()) {
                    prop_assert!(
                        matches!(r, Err(stemma_pagestore::Error::OutsideRetention { .. })),
                        "branch at {} outside the window: {:?}",
                        p,
                        r
                    );
                    continue;
                }
                let child = r.unwrap();
                // The parent as of every change below p.
                let fs = history.before(p).timelines[&parent].clone();
                m.timelines.insert(child.0, fs);
                *m.children.entry(parent).or_default() += 1;
                m.parent.insert(child.0, parent);
            }
            Op::Delete { tl } => {
                if m.timelines.len() == 1 {
                    continue;
                }
                let id = pick(*tl);
                let kids = m.children.get(&id).copied().unwrap_or(0);
                let r = st.delete_timeline(TimelineId(id)).map_err(|e| e.errno());
                if kids > 0 {
                    prop_assert_eq!(r, Err(ENOTEMPTY));
                } else {
                    prop_assert_eq!(r, Ok(()));
                    m.timelines.remove(&id);
                    if let Some(p) = m.parent.remove(&id) {
                        *m.children.get_mut(&p).unwrap() -= 1;
                    }
                }
            }
            Op::ExtCreate { tl, .. }
            | Op::ExtGrow { tl, .. }
            | Op::ExtAppend { tl, .. }
            | Op::ExtUnlink { tl, .. } => {
                let id = pick(*tl);
                let pre = m.clone();
                let unchanged =
                    ext_apply(st, TimelineId(id), m.timelines.get_mut(&id).unwrap(), op)?;
                ext_before = Some((pre, unchanged));
            }
            fs_op => {
                let (Op::Write { tl, .. }
                | Op::Truncate { tl, .. }
                | Op::Create { tl, .. }
                | Op::Mkdir { tl, .. }
                | Op::Symlink { tl, .. }
                | Op::Unlink { tl, .. }
                | Op::UnlinkWhileOpen { tl, .. }
                | Op::Rmdir { tl, .. }
                | Op::Rename { tl, .. }) = fs_op
                else {
                    unreachable!()
                };
                let id = pick(*tl);
                let fs = m.timelines.get_mut(&id).unwrap();
                let before_fs = fs.clone();
                let want = model_apply(fs, fs_op);
                if want.is_err() {
                    *fs = before_fs.clone();
                }
                let got = engine_apply(st, TimelineId(id), fs_op, &before_fs);
                prop_assert_eq!(got, want, "{:?} on timeline {}", fs_op, id);
            }
        }
        let st = s.as_ref().unwrap();
        let after = st.last_lsn();
        for l in history.states.last().map_or(0, |(l, _)| *l) + 1..=after {
            // An operation on an external file in a branch may first copy it (a frame that
            // changes nothing a reader sees); its last frame is the change.
            let state = match &ext_before {
                Some((pre, unchanged)) if l <= *unchanged => pre.clone(),
                _ => m.clone(),
            };
            history.states.push((l, state));
            history.times.insert(l, now());
        }
        check_all(st, &m)?;
    }
    // And everything survives a final clean reopen, and one after full maintenance.
    drop(s.take());
    let st = PageStore::open(dir.path(), config(&clock, compact_below)).unwrap();
    check_all(&st, &m)?;
    st.maintain().unwrap();
    drop(st);
    let st = PageStore::open(dir.path(), config(&clock, compact_below)).unwrap();
    check_all(&st, &m)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), max_shrink_iters: 2000, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_model(
        ops in proptest::collection::vec(op_strategy(), 1..60),
        compact_below in prop_oneof![Just(0.5), Just(1.5)],
    ) {
        run(ops, compact_below)?;
    }
}

/// Fixed sequences that once mattered, run on every test run.
#[test]
fn truncate_then_extend_in_a_branch() {
    let ops = vec![
        Op::Create { tl: 0, path: 0 },
        Op::Write {
            tl: 0,
            path: 0,
            offset: 0,
            len: 30_000,
            fill: 7,
        },
        Op::Branch { tl: 0, past: None },
        Op::Truncate {
            tl: 1,
            path: 0,
            size: 100,
        },
        Op::Truncate {
            tl: 1,
            path: 0,
            size: 35_000,
        },
        Op::Crash { cut: 0, junk: true },
        Op::Write {
            tl: 0,
            path: 0,
            offset: 39_000,
            len: 10,
            fill: 3,
        },
    ];
    run(ops, 0.5).unwrap();
}
