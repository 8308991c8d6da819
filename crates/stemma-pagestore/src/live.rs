//! Live directories: one directory of a timeline (PostgreSQL's `pg_wal`) kept as an ordinary
//! directory of the host filesystem while a compute writes it, and mirrored into the store.
//! See `docs/pagestore.md`, "Live directories".
//!
//! **Why.** Every commit of PostgreSQL is an fdatasync of a WAL segment. Through FUSE that is
//! a round trip to the store even with passthrough (the kernel passes reads and writes to a
//! backing file, not fsyncs), and on a small machine that round trip was most of the gap
//! between TPC-B on the store and on a plain directory. In a live directory the compute's
//! writes and fsyncs go to the host filesystem with no store in between.
//!
//! **How the store keeps versions anyway.** Each file of the live directory is a hard link of
//! an object (`objects/`, the same files external files use, see `external.rs`), so the
//! store reads what the compute wrote without a copy. The store *mirrors* the directory: it
//! turns what it finds (names, and each file's end: its last written page, found as for an
//! fsync of an external file) into ordinary frames. The one rule that makes a branch at any
//! position recover: a frame of the timeline is committed only after a mirror, under the same
//! hold of the state lock (`PageStore::commit`). PostgreSQL writes a data page only after the
//! WAL up to the page's LSN is flushed, so that WAL is in the live directory before the data
//! page reaches the store; the mirror before the data page's frame records it, and a branch
//! at any later position sees WAL covering every data page it sees. A mirror before a commit
//! is cheap: new names are signalled by inotify (read without blocking), and only the files
//! whose end may still move are looked at (usually two: the current segment and the next).
//! A thread of the front end also mirrors every 100 ms (`commit_external_notes`), so that a
//! moment holds the commits made before it on an otherwise idle timeline.
//!
//! **Crashes.** The compute's WAL is durable on the host filesystem by its own fsyncs, so a
//! `kill -9` of the store loses none of it; at open the store mirrors every live directory
//! again before anything else. A recorded end is not itself made durable before its frame
//! (that would be an fdatasync per commit): after a power loss an object can hold less than
//! a durable frame says. The data pages below that frame still need no more than what the
//! compute had flushed (which survived), so those positions stay consistent; but the compute
//! would write new WAL over the lost part, under the history's feet. So at open such an
//! object is *forked*: the timeline goes on in a copy, and the old object stays as history.

use std::collections::{HashMap, HashSet};
use std::fs::{Metadata, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};

use crate::error::{Error, Result};
use crate::external::{extent_mutations, last_written_page, object_path, objects_dir, Found};
use crate::format::Mutation;
use crate::log::sync_dir;
use crate::state::{IntMap, Loc, State, View};
use crate::store::{timeline, PageStore};
use crate::types::{Attr, FileKind, Ino, TimelineId, PAGE_SIZE};

/// The directory holding every timeline's live directories.
pub(crate) fn live_root(store_dir: &Path) -> PathBuf {
    store_dir.join("live")
}

/// Where timeline `tl`'s live copy of its directory `dir` lives.
fn live_path(store_dir: &Path, tl: TimelineId, dir: Ino) -> PathBuf {
    live_root(store_dir).join(format!("{:016x}-{dir}", tl.0))
}

/// The timeline and directory a live directory's name stands for.
fn parse_live_name(name: &[u8]) -> Option<(TimelineId, Ino)> {
    let s = std::str::from_utf8(name).ok()?;
    let (tl, dir) = s.split_once('-')?;
    Some((
        TimelineId(u64::from_str_radix(tl, 16).ok()?),
        dir.parse().ok()?,
    ))
}

/// The attached live directories and the one inotify instance that watches them all (one
/// per store, not per directory: the kernel allows a user 128 instances by default).
#[derive(Default)]
pub(crate) struct LiveDirs {
    inotify: Option<Inotify>,
    dirs: IntMap<TimelineId, LiveDir>,
    /// Which timeline each watch is for.
    owners: HashMap<WatchDescriptor, TimelineId>,
}

/// A live directory the store mirrors.
pub(crate) struct LiveDir {
    /// The timeline's directory it stands for.
    dir: Ino,
    path: PathBuf,
    /// inotify saw a name created, removed or renamed since the last mirror of names.
    names_dirty: bool,
    /// Its watches (one per directory), and the directories the last mirror of names went
    /// through (to be watched).
    watches: Vec<WatchDescriptor>,
    dirs_seen: Vec<PathBuf>,
    /// Every mirrored file, by its inode number on the host.
    files: HashMap<u64, LiveFile>,
}

struct LiveFile {
    /// Its inode in the store, and where it is named there.
    ino: Ino,
    parent: Ino,
    name: Vec<u8>,
    /// End, checksum of the last written page (0: none) and size last recorded.
    noted: Option<(u64, u32, u64)>,
    /// Its end moves no more: a later-named file of its directory has data (PostgreSQL fills
    /// segments in order). Commits skip it; the periodic mirror still looks.
    done: bool,
}

const WATCHED: AddWatchFlags = AddWatchFlags::IN_CREATE
    .union(AddWatchFlags::IN_DELETE)
    .union(AddWatchFlags::IN_MOVED_FROM)
    .union(AddWatchFlags::IN_MOVED_TO)
    .union(AddWatchFlags::IN_ONLYDIR);

impl LiveDir {
    fn new(dir: Ino, path: PathBuf) -> Self {
        LiveDir {
            dir,
            path,
            names_dirty: false,
            watches: Vec::new(),
            dirs_seen: Vec::new(),
            files: HashMap::new(),
        }
    }
}

impl LiveDirs {
    /// Marks the directories whose names changed since the last call.
    fn drain(&mut self) {
        let Some(n) = &self.inotify else {
            return;
        };
        // Non-blocking: an empty queue is EAGAIN.
        while let Ok(events) = n.read_events() {
            if events.is_empty() {
                break;
            }
            for e in events {
                if e.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                    self.dirs.values_mut().for_each(|d| d.names_dirty = true);
                } else if let Some(d) = self.owners.get(&e.wd).and_then(|t| self.dirs.get_mut(t)) {
                    d.names_dirty = true;
                }
            }
        }
    }

    /// Watches `path` for `tl` (again: the kernel returns the same watch).
    fn watch(&mut self, tl: TimelineId, path: &Path) -> Result<WatchDescriptor> {
        let n = match &mut self.inotify {
            Some(n) => n,
            none => none.insert(
                Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
                    .map_err(|e| Error::io("starting inotify", path)(e.into()))?,
            ),
        };
        let wd = n
            .add_watch(path, WATCHED)
            .map_err(|e| Error::io("watching a live directory", path)(e.into()))?;
        self.owners.insert(wd, tl);
        Ok(wd)
    }

    /// Watches the directories `tl`'s last mirror went through.
    fn watch_seen(&mut self, tl: TimelineId) -> Result<()> {
        let seen = match self.dirs.get_mut(&tl) {
            Some(d) => std::mem::take(&mut d.dirs_seen),
            None => return Ok(()),
        };
        for p in seen {
            let wd = self.watch(tl, &p)?;
            if let Some(d) = self.dirs.get_mut(&tl) {
                if !d.watches.contains(&wd) {
                    d.watches.push(wd);
                }
            }
        }
        Ok(())
    }

    /// Stops watching `tl`'s directory and returns it.
    fn remove(&mut self, tl: TimelineId) -> Option<LiveDir> {
        let d = self.dirs.remove(&tl)?;
        for wd in &d.watches {
            self.owners.remove(wd);
            if let Some(n) = &self.inotify {
                // Gone already when its directory was deleted: nothing to do then.
                let _ = n.rm_watch(*wd);
            }
        }
        Some(d)
    }
}

/// The host directory's entries, by name, with what `lstat` says of each (an entry removed
/// meanwhile is left out).
fn host_entries(path: &Path) -> Result<Vec<(Vec<u8>, Metadata)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(path).map_err(Error::io("listing a live directory", path))? {
        let e = e.map_err(Error::io("listing a live directory", path))?;
        match e.metadata() {
            Ok(md) => out.push((e.file_name().as_bytes().to_vec(), md)),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(Error::io("reading a live file's attributes", e.path())(err)),
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<()> {
    match std::os::unix::fs::lchown(path, Some(uid), Some(gid)) {
        Ok(()) => Ok(()),
        // Not root (tests): the files stay this process's, which is then also the owner.
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Ok(()),
        Err(e) => Err(Error::io("setting a live file's owner", path)(e)),
    }
}

impl PageStore {
    /// Makes timeline `tl`'s directory `dir` live and returns the host directory to give the
    /// compute in its place. The first time, the directory is filled from what `tl` sees:
    /// files `tl` owns and finished files of its ancestors as hard links of their objects (no
    /// copy), the others (the segment a branch point cut) copied into objects of its own;
    /// after that the host directory is the truth and is only mirrored. Idempotent.
    pub fn attach_live_dir(&self, tl: TimelineId, dir: Ino) -> Result<PathBuf> {
        let path = live_path(&self.dir, tl, dir);
        if let Some(ld) = self.live.lock().dirs.get(&tl) {
            if ld.dir == dir {
                return Ok(ld.path.clone());
            }
            return Err(Error::InvalidArgument(format!(
                "timeline {tl} has another live directory (inode {})",
                ld.dir
            )));
        }
        if !path.exists() {
            self.fill_live_dir(tl, dir, &path)?;
        }
        let mut st = self.state.write();
        let mut live = self.live.lock();
        let mut ld = LiveDir::new(dir, path.clone());
        // Watched before the first mirror reads it: nothing done after goes unseen.
        ld.watches.push(live.watch(tl, &path)?);
        self.known_live_files(&st, tl, &mut ld)?;
        live.dirs.insert(tl, ld);
        let mirrored = match live.dirs.get_mut(&tl) {
            Some(ld) => self.mirror(&mut st, tl, ld, true, false),
            None => Ok(()),
        };
        if let Err(e) = mirrored.and_then(|()| live.watch_seen(tl)) {
            live.remove(tl);
            return Err(e);
        }
        drop(live);
        self.live_attached
            .store(true, std::sync::atomic::Ordering::Release);
        tracing::debug!(timeline = %tl, path = %path.display(), "attached a live directory");
        Ok(path)
    }

    /// Mirrors `tl`'s live directory one last time and stops watching it (its compute has
    /// stopped). The host directory stays: it is the truth for the next attach.
    pub fn detach_live_dir(&self, tl: TimelineId) -> Result<()> {
        let mut st = self.state.write();
        let Some(mut ld) = self.live.lock().remove(tl) else {
            return Ok(());
        };
        if st.timelines.contains_key(&tl) {
            self.mirror(&mut st, tl, &mut ld, true, false)?;
        }
        Ok(())
    }

    /// The host directory of `tl`'s attached live directory.
    pub fn live_dir(&self, tl: TimelineId) -> Option<PathBuf> {
        self.live.lock().dirs.get(&tl).map(|ld| ld.path.clone())
    }

    /// Before a frame of `tl` (see the module docs): mirrors its live directory if attached;
    /// `full` also looks at names and at every file's end.
    pub(crate) fn mirror_live(&self, st: &mut State, tl: TimelineId, full: bool) -> Result<()> {
        let mut live = self.live.lock();
        live.drain();
        match live.dirs.get_mut(&tl) {
            Some(ld) => self.mirror(st, tl, ld, full, false)?,
            None => return Ok(()),
        }
        live.watch_seen(tl)
    }

    /// Mirrors every attached live directory in full (the periodic mirror).
    pub(crate) fn mirror_all_live(&self, st: &mut State) -> Result<()> {
        let mut live = self.live.lock();
        live.drain();
        let tls: Vec<TimelineId> = live.dirs.keys().copied().collect();
        for tl in tls {
            if !st.timelines.contains_key(&tl) {
                continue;
            }
            if let Some(ld) = live.dirs.get_mut(&tl) {
                self.mirror(st, tl, ld, true, false)?;
            }
            live.watch_seen(tl)?;
        }
        Ok(())
    }

    pub(crate) fn has_live_dirs(&self) -> bool {
        self.live_attached
            .load(std::sync::atomic::Ordering::Acquire)
            && !self.live.lock().dirs.is_empty()
    }

    /// At open: mirrors every live directory left on disk (its compute wrote on after the
    /// last mirror the store made), forking objects a power loss cut short, and removes those
    /// of timelines that are gone.
    pub(crate) fn mirror_live_dirs_at_open(&self) -> Result<()> {
        for (path, name) in self.live_dir_entries()? {
            let parsed = parse_live_name(name.as_bytes());
            let alive = parsed.filter(|(tl, dir)| {
                let st = self.state.read();
                timeline(&st, *tl)
                    .ok()
                    .and_then(|t| View::new(&st, t).attr(*dir))
                    .is_some_and(|a| a.kind == FileKind::Directory)
            });
            let Some((tl, dir)) = alive else {
                // A timeline deleted, or a fill a crash interrupted (`.tmp`).
                std::fs::remove_dir_all(&path)
                    .map_err(Error::io("removing a stale live directory", &path))?;
                continue;
            };
            let mut ld = LiveDir::new(dir, path);
            let mut st = self.state.write();
            self.known_live_files(&st, tl, &mut ld)?;
            self.mirror(&mut st, tl, &mut ld, true, true)?;
        }
        Ok(())
    }

    /// The live directories on disk: path and name (none when there is no `live/` yet).
    fn live_dir_entries(&self) -> Result<Vec<(PathBuf, std::ffi::OsString)>> {
        let root = live_root(&self.dir);
        let entries = match std::fs::read_dir(&root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io("listing live directories", &root)(e)),
        };
        entries
            .map(|e| {
                let e = e.map_err(Error::io("listing live directories", &root))?;
                Ok((e.path(), e.file_name()))
            })
            .collect()
    }

    /// Stops watching `tl`'s live directory without a last mirror (it is being deleted).
    pub(crate) fn forget_live_dir(&self, tl: TimelineId) {
        self.live.lock().remove(tl);
    }

    /// Removes `tl`'s live directories (the timeline is being deleted).
    pub(crate) fn remove_live_dirs(&self, tl: TimelineId) -> Result<()> {
        let prefix = format!("{:016x}-", tl.0);
        for (path, name) in self.live_dir_entries()? {
            if name.as_bytes().starts_with(prefix.as_bytes()) {
                std::fs::remove_dir_all(&path)
                    .map_err(Error::io("removing a live directory", &path))?;
            }
        }
        Ok(())
    }

    /// Fills a new live directory from what `tl` sees of `dir` (without the state lock: the
    /// copies commit frames). Built under a temporary name and renamed, so that a crash
    /// leaves either nothing or the whole directory.
    fn fill_live_dir(&self, tl: TimelineId, dir: Ino, path: &Path) -> Result<()> {
        let root = live_root(&self.dir);
        std::fs::create_dir_all(&root).map_err(Error::io("creating live directories", &root))?;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o711))
            .map_err(Error::io("setting live directories' mode", &root))?;
        let tmp = path.with_extension("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)
                .map_err(Error::io("removing an unfinished live directory", &tmp))?;
        }
        self.fill_host_dir(tl, dir, &tmp)?;
        std::fs::rename(&tmp, path).map_err(Error::io("naming a live directory", path))?;
        sync_dir(&root)?;
        Ok(())
    }

    fn fill_host_dir(&self, tl: TimelineId, dir: Ino, host: &Path) -> Result<()> {
        let a = self.getattr(tl, dir)?;
        std::fs::create_dir(host).map_err(Error::io("creating a live directory", host))?;
        std::fs::set_permissions(host, std::fs::Permissions::from_mode(u32::from(a.perm)))
            .map_err(Error::io("setting a live directory's mode", host))?;
        chown(host, a.uid, a.gid)?;
        let entries = self.readdir(tl, dir)?;
        // Which files have data, to tell the finished ones (a later-named file has data).
        let mut has_data = Vec::with_capacity(entries.len());
        for e in &entries {
            has_data.push(e.kind == FileKind::Regular && self.file_has_data(tl, e.ino)?);
        }
        for (i, e) in entries.iter().enumerate() {
            let p = host.join(std::ffi::OsStr::from_bytes(&e.name));
            match e.kind {
                FileKind::Directory => self.fill_host_dir(tl, e.ino, &p)?,
                FileKind::Symlink => {
                    let target = self.readlink(tl, e.ino)?;
                    std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&target), &p)
                        .map_err(Error::io("creating a live symlink", &p))?;
                }
                FileKind::Regular => {
                    let finished = has_data[i + 1..].iter().any(|d| *d);
                    self.fill_host_file(tl, e.ino, &p, finished, has_data[i])?;
                }
            }
        }
        sync_dir(host)
    }

    /// Whether what `tl` sees of file `ino` has a non-zero byte (external files: a written
    /// page; others: any byte).
    fn file_has_data(&self, tl: TimelineId, ino: Ino) -> Result<bool> {
        if self.is_external(tl, ino)? {
            let x = self.view_of_external(tl, ino)?;
            return Ok(x.extent.end > 0 || self.tail_bytes(&x)?.iter().any(|b| *b != 0));
        }
        let a = self.getattr(tl, ino)?;
        let data = self.read(tl, ino, 0, a.size as usize)?;
        Ok(data.iter().any(|b| *b != 0))
    }

    fn fill_host_file(
        &self,
        tl: TimelineId,
        ino: Ino,
        p: &Path,
        finished: bool,
        has_data: bool,
    ) -> Result<()> {
        let a = self.getattr(tl, ino)?;
        if !self.is_external(tl, ino)? {
            // An ordinary file (not keeping the WAL's discipline): its bytes; the mirror
            // makes it external.
            let data = self.read(tl, ino, 0, a.size as usize)?;
            let f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(u32::from(a.perm))
                .open(p)
                .map_err(Error::io("creating a live file", p))?;
            f.write_all_at(&data, 0)
                .and_then(|()| f.sync_all())
                .map_err(Error::io("writing a live file", p))?;
            return chown(p, a.uid, a.gid);
        }
        if !has_data {
            // A segment made ahead of need and never written: PostgreSQL makes it again.
            return Ok(());
        }
        let x = self.view_of_external(tl, ino)?;
        let object = if x.owned || (finished && self.whole_at_cut(&x)?) {
            // Its own, or an ancestor's that nobody writes any more (a later segment has
            // data): shared, not copied.
            x.extent.object
        } else {
            self.owned_object(tl, ino)?;
            self.view_of_external(tl, ino)?.extent.object
        };
        let src = object_path(&self.dir, object);
        std::fs::hard_link(&src, p)
            .map_err(Error::io("linking an object into a live directory", p))?;
        chown(p, a.uid, a.gid)
    }

    /// Whether a view's object holds exactly what the view sees: the recorded last page is
    /// the file's last, and the object has it unchanged.
    fn whole_at_cut(&self, x: &crate::external::ExternalView) -> Result<bool> {
        let ps = PAGE_SIZE as u64;
        if x.extent.end + ps < x.attr.size {
            return Ok(false);
        }
        let file = self.object_file(x.extent.object)?;
        let tail = self.tail_bytes(x)?;
        let n = (x.attr.size - x.extent.end.min(x.attr.size)) as usize;
        let mut now = vec![0u8; n];
        Ok(file.read_exact_at(&mut now, x.extent.end).is_ok()
            && now[..] == tail[..n]
            && file.metadata().is_ok_and(|m| m.len() == x.attr.size))
    }

    /// Fills `ld.files` with the external files `tl` sees under its directory whose objects
    /// are linked in the host directory (by the object's inode number).
    fn known_live_files(&self, st: &State, tl: TimelineId, ld: &mut LiveDir) -> Result<()> {
        let v = View::new(st, timeline(st, tl)?);
        let mut stack = vec![ld.dir];
        while let Some(d) = stack.pop() {
            for (name, ino) in v.entries(d) {
                match v.attr(ino).map(|a| a.kind) {
                    Some(FileKind::Directory) => stack.push(ino),
                    Some(FileKind::Regular) => {
                        let Some(x) = v.extent(ino) else { continue };
                        let path = object_path(&self.dir, x.object);
                        if let Ok(md) = std::fs::metadata(&path) {
                            ld.files.insert(
                                md.ino(),
                                LiveFile {
                                    ino,
                                    parent: d,
                                    name,
                                    noted: None,
                                    done: false,
                                },
                            );
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// One mirror of `ld` under the state lock: names when inotify saw a change (or `full`),
    /// then the ends of the files whose end may move (every file when `full`). `at_open`
    /// forks objects found shorter than recorded (see the module docs).
    fn mirror(
        &self,
        st: &mut State,
        tl: TimelineId,
        ld: &mut LiveDir,
        full: bool,
        at_open: bool,
    ) -> Result<()> {
        let names = std::mem::take(&mut ld.names_dirty);
        if full || names {
            let mut seen = HashSet::new();
            let (dir, path) = (ld.dir, ld.path.clone());
            self.mirror_names(st, tl, ld, dir, &path, &mut seen)?;
            ld.files.retain(|h, _| seen.contains(h));
        }
        self.mirror_ends(st, tl, ld, full || names, at_open)
    }

    fn mirror_names(
        &self,
        st: &mut State,
        tl: TimelineId,
        ld: &mut LiveDir,
        dir: Ino,
        host: &Path,
        seen: &mut HashSet<u64>,
    ) -> Result<()> {
        ld.dirs_seen.push(host.to_path_buf());
        let entries = host_entries(host)?;
        let names: HashSet<&[u8]> = entries.iter().map(|(n, _)| n.as_slice()).collect();
        // Names gone from the host first, so that a rename onto a name freed here works.
        let stale: Vec<Vec<u8>> = {
            let v = View::new(st, timeline(st, tl)?);
            v.entries(dir)
                .into_keys()
                .filter(|n| !names.contains(n.as_slice()))
                .collect()
        };
        for name in stale {
            self.live_remove(st, tl, dir, &name)?;
        }
        for (name, md) in &entries {
            let p = host.join(std::ffi::OsStr::from_bytes(name));
            let cur = {
                let v = View::new(st, timeline(st, tl)?);
                v.entry(dir, name).and_then(|i| v.attr(i))
            };
            if md.is_dir() {
                let ino = match cur {
                    Some(a) if a.kind == FileKind::Directory => a.ino,
                    other => {
                        if other.is_some() {
                            self.live_remove(st, tl, dir, name)?;
                        }
                        self.live_add(st, tl, dir, name, md, None)?
                    }
                };
                self.mirror_names(st, tl, ld, ino, &p, seen)?;
                continue;
            }
            if !md.is_file() {
                continue; // symlinks and the like stay as the store has them
            }
            let h = md.ino();
            seen.insert(h);
            let known = ld.files.get(&h).map(|f| (f.ino, f.parent, f.name.clone()));
            let alive = known.as_ref().is_some_and(|(ino, _, _)| {
                let v = View::new(st, timeline(st, tl).expect("checked above"));
                v.attr(*ino).is_some()
            });
            match known {
                Some((ino, parent, old)) if alive => {
                    if cur.map(|a| a.ino) != Some(ino) || parent != dir || old != *name {
                        self.live_rename(st, tl, parent, &old, ino, dir, name)?;
                        if let Some(f) = ld.files.get_mut(&h) {
                            f.parent = dir;
                            f.name = name.clone();
                        }
                    }
                }
                _ => {
                    if cur.is_some() {
                        self.live_remove(st, tl, dir, name)?;
                    }
                    if let Some(ino) = self.live_ingest(st, tl, dir, name, &p, md)? {
                        ld.files.insert(
                            h,
                            LiveFile {
                                ino,
                                parent: dir,
                                name: name.clone(),
                                noted: None,
                                done: false,
                            },
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// A new file of the live directory: its host file linked as a new object, and a frame
    /// naming it. `None` when it went away before it could be linked.
    fn live_ingest(
        &self,
        st: &mut State,
        tl: TimelineId,
        dir: Ino,
        name: &[u8],
        host: &Path,
        md: &Metadata,
    ) -> Result<Option<Ino>> {
        let objects = objects_dir(&self.dir);
        std::fs::create_dir_all(&objects)
            .map_err(Error::io("creating the objects directory", &objects))?;
        let id = st.next_object;
        st.next_object += 1;
        let obj = object_path(&self.dir, id);
        match std::fs::hard_link(host, &obj) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("linking a live file as an object", &obj)(e)),
        }
        // The link durable before a frame names it (else `open` sweeps a named object).
        sync_dir(&objects)?;
        self.live_add(st, tl, dir, name, md, Some(id)).map(Some)
    }

    /// A frame naming a new inode `dir/name` with the host's mode and owner: a file whose
    /// bytes are `object`, or a directory.
    fn live_add(
        &self,
        st: &mut State,
        tl: TimelineId,
        dir: Ino,
        name: &[u8],
        md: &Metadata,
        object: Option<u64>,
    ) -> Result<Ino> {
        let pa = {
            let v = View::new(st, timeline(st, tl)?);
            v.attr(dir)
                .ok_or_else(|| Error::InvalidArgument(format!("no directory inode {dir}")))?
        };
        let kind = if object.is_some() {
            FileKind::Regular
        } else {
            FileKind::Directory
        };
        let mut a = self.new_inode(st, kind, (md.mode() & 0o7777) as u16, md.uid(), md.gid());
        if object.is_some() {
            a.size = md.len();
        }
        let muts = self.new_inode_frame(a, pa, name, None, object);
        self.commit_frame(st, tl, &muts)?;
        Ok(a.ino)
    }

    /// Removes `dir/name` from the store (a directory with everything under it).
    fn live_remove(&self, st: &mut State, tl: TimelineId, dir: Ino, name: &[u8]) -> Result<()> {
        let (child, pa, children) = {
            let v = View::new(st, timeline(st, tl)?);
            let Some(child) = v.entry(dir, name).and_then(|i| v.attr(i)) else {
                return Ok(());
            };
            let Some(pa) = v.attr(dir) else {
                return Ok(());
            };
            let children: Vec<Vec<u8>> = if child.kind == FileKind::Directory {
                v.entries(child.ino).into_keys().collect()
            } else {
                Vec::new()
            };
            (child, pa, children)
        };
        for n in children {
            self.live_remove(st, tl, child.ino, &n)?;
        }
        let last = if child.kind == FileKind::Directory {
            Mutation::FreeInode { ino: child.ino }
        } else {
            self.drop_link(st, tl, child)
        };
        let muts = [
            Mutation::DirEntry {
                dir,
                name,
                child: None,
            },
            Mutation::SetAttr(self.touched(pa)),
            last,
        ];
        self.commit_frame(st, tl, &muts)?;
        Ok(())
    }

    /// Moves inode `ino` from `old_dir/old` to `dir/name` (replacing what is there).
    #[allow(clippy::too_many_arguments)]
    fn live_rename(
        &self,
        st: &mut State,
        tl: TimelineId,
        old_dir: Ino,
        old: &[u8],
        ino: Ino,
        dir: Ino,
        name: &[u8],
    ) -> Result<()> {
        let there = View::new(st, timeline(st, tl)?).entry(dir, name);
        if there == Some(ino) {
            return Ok(());
        }
        if there.is_some() {
            self.live_remove(st, tl, dir, name)?;
        }
        let v = View::new(st, timeline(st, tl)?);
        let mut a = v
            .attr(ino)
            .ok_or_else(|| Error::InvalidArgument(format!("no inode {ino}")))?;
        let mut muts = Vec::new();
        if v.entry(old_dir, old) == Some(ino) {
            muts.push(Mutation::DirEntry {
                dir: old_dir,
                name: old,
                child: None,
            });
            if let Some(opa) = v.attr(old_dir) {
                muts.push(Mutation::SetAttr(self.touched(opa)));
            }
        } else {
            // Its old name is gone (removed above as stale): this is a new link of it.
            a.nlink = 1;
        }
        muts.push(Mutation::DirEntry {
            dir,
            name,
            child: Some(ino),
        });
        if dir != old_dir {
            if let Some(pa) = v.attr(dir) {
                muts.push(Mutation::SetAttr(self.touched(pa)));
            }
        }
        a.ctime = self.config.clock.now();
        muts.push(Mutation::SetAttr(a));
        self.commit_frame(st, tl, &muts)?;
        Ok(())
    }

    /// Records the ends of the live files that moved, in one frame: every file when `all`,
    /// else those not done.
    fn mirror_ends(
        &self,
        st: &mut State,
        tl: TimelineId,
        ld: &mut LiveDir,
        all: bool,
        at_open: bool,
    ) -> Result<()> {
        let mut changes: Vec<(Ino, Attr, u64, Found)> = Vec::new();
        let mut forks: Vec<u64> = Vec::new();
        for (h, f) in ld.files.iter_mut() {
            if f.done && !all {
                continue;
            }
            let Some(x) = self.external_view(st, tl, f.ino)? else {
                continue;
            };
            if !x.owned {
                continue; // an ancestor's finished file, shared: never written here
            }
            let file = self.object_file(x.extent.object)?;
            let path = object_path(&self.dir, x.extent.object);
            let len = file
                .metadata()
                .map_err(Error::io("reading an object's size", &path))?
                .len();
            let recorded = match f.noted {
                Some(n) => n,
                None => {
                    let tail = tail_in(self, st, tl, f.ino, x.extent.end)?;
                    let sum = if tail.iter().all(|b| *b == 0) {
                        0
                    } else {
                        crc32fast::hash(&tail)
                    };
                    (x.extent.end, sum, x.attr.size)
                }
            };
            let found = last_written_page(&file, x.extent.end, len, &path)?;
            let lost = recorded.1 != 0 && found.tail.is_none();
            if lost {
                if at_open {
                    forks.push(*h);
                    continue;
                }
                tracing::error!(timeline = %tl, object = x.extent.object, "a live file lost written pages while in use");
            }
            let sum = found.tail.as_deref().map_or(0, crc32fast::hash);
            let now = (found.end, sum, len);
            f.noted = Some(now);
            if now != recorded {
                let mut a = x.attr;
                a.size = len;
                changes.push((f.ino, a, x.extent.object, found));
            }
        }
        if !changes.is_empty() {
            let mut muts = Vec::new();
            for (ino, a, object, found) in &changes {
                muts.extend(extent_mutations(
                    *ino,
                    *a,
                    *object,
                    found.end,
                    found.tail.as_deref(),
                ));
            }
            self.commit_frame(st, tl, &muts)?;
        }
        for h in forks {
            self.fork_live_file(st, tl, ld, h)?;
        }
        if all {
            // Done: a later-named file of the same directory has data.
            let mut by_dir: HashMap<Ino, Vec<(Vec<u8>, u64)>> = HashMap::new();
            for (h, f) in &ld.files {
                by_dir
                    .entry(f.parent)
                    .or_default()
                    .push((f.name.clone(), *h));
            }
            for (_, mut files) in by_dir {
                files.sort();
                let mut later_has_data = false;
                for (_, h) in files.iter().rev() {
                    if let Some(f) = ld.files.get_mut(h) {
                        f.done = later_has_data;
                        let data = f.noted.is_some_and(|(end, sum, _)| end > 0 || sum != 0);
                        later_has_data |= data;
                    }
                }
            }
        }
        Ok(())
    }

    /// At open, a live file whose object lost written pages (a power loss after its end was
    /// recorded): the timeline goes on in a copy of what the object holds now, linked in its
    /// place, and the old object stays for the positions that recorded it.
    fn fork_live_file(
        &self,
        st: &mut State,
        tl: TimelineId,
        ld: &mut LiveDir,
        h: u64,
    ) -> Result<()> {
        let Some(f) = ld.files.remove(&h) else {
            return Ok(());
        };
        let Some(x) = self.external_view(st, tl, f.ino)? else {
            return Ok(());
        };
        let src = self.object_file(x.extent.object)?;
        let len = src
            .metadata()
            .map_err(Error::io(
                "reading an object's size",
                object_path(&self.dir, x.extent.object),
            ))?
            .len();
        let id = st.next_object;
        st.next_object += 1;
        let obj = object_path(&self.dir, id);
        let dst = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&obj)
            .map_err(Error::io("creating an object", &obj))?;
        crate::external::copy_prefix(&src, &dst, len, &[], len)
            .map_err(Error::io("copying a live file", &obj))?;
        let host = self.host_path_of(ld, st, tl, f.parent, &f.name)?;
        let md = std::fs::metadata(&host)
            .map_err(Error::io("reading a live file's attributes", &host))?;
        chown(&obj, md.uid(), md.gid())?;
        let tmp = host.with_extension("stemma-fork");
        std::fs::hard_link(&obj, &tmp).map_err(Error::io("linking a forked live file", &tmp))?;
        std::fs::rename(&tmp, &host).map_err(Error::io("replacing a forked live file", &host))?;
        sync_dir(&objects_dir(&self.dir))?;
        if let Some(parent) = host.parent() {
            sync_dir(parent)?;
        }
        let found = last_written_page(&dst, 0, len, &obj)?;
        let mut a = x.attr;
        a.size = len;
        let muts = extent_mutations(f.ino, a, id, found.end, found.tail.as_deref());
        self.commit_frame(st, tl, &muts)?;
        tracing::warn!(timeline = %tl, old = x.extent.object, new = id, "a live file held less than recorded (a power loss?): the timeline goes on in a copy");
        let new_h = std::fs::metadata(&host)
            .map_err(Error::io("reading a live file's attributes", &host))?
            .ino();
        ld.files.insert(
            new_h,
            LiveFile {
                noted: None,
                done: false,
                ..f
            },
        );
        Ok(())
    }

    /// The host path of store entry `dir/name` of a live directory.
    fn host_path_of(
        &self,
        ld: &LiveDir,
        st: &State,
        tl: TimelineId,
        dir: Ino,
        name: &[u8],
    ) -> Result<PathBuf> {
        let v = View::new(st, timeline(st, tl)?);
        let mut parts = vec![name.to_vec()];
        let mut d = dir;
        while d != ld.dir {
            let (parent, n) = find_parent(&v, ld.dir, d).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "directory inode {d} is not under the live directory"
                ))
            })?;
            parts.push(n);
            d = parent;
        }
        let mut p = ld.path.clone();
        for part in parts.iter().rev() {
            p.push(std::ffi::OsStr::from_bytes(part));
        }
        Ok(p)
    }
}

/// The directory holding `d` under `root`, and `d`'s name there.
fn find_parent(v: &View<'_>, root: Ino, d: Ino) -> Option<(Ino, Vec<u8>)> {
    let mut stack = vec![root];
    while let Some(dir) = stack.pop() {
        for (name, ino) in v.entries(dir) {
            if ino == d {
                return Some((dir, name));
            }
            if v.attr(ino).is_some_and(|a| a.kind == FileKind::Directory) {
                stack.push(ino);
            }
        }
    }
    None
}

/// The page at `end` of `ino` as `tl` sees it, read under the state lock the caller holds.
fn tail_in(store: &PageStore, st: &State, tl: TimelineId, ino: Ino, end: u64) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; PAGE_SIZE];
    let loc = View::new(st, timeline(st, tl)?).page(ino, end / PAGE_SIZE as u64);
    if let Loc::Data { .. } = loc {
        store.read_page(st, loc, &mut buf)?;
    }
    Ok(buf)
}
