//! [`TimelineFs`]: one page-store timeline as a FUSE filesystem.
//!
//! Every FUSE operation maps 1:1 onto the engine's `(timeline, inode)` API; FUSE inode numbers
//! *are* the engine's inode numbers (the engine never reuses one, so the generation is always
//! 0), and FUSE's root inode 1 is the engine's [`ROOT_INO`].
//!
//! Caching: a timeline is served by exactly one mount and nothing else changes it while it is
//! mounted (the driver writes into a mounted timeline through the mount), so the kernel may keep
//! page cache, attributes and directory entries for long: its own changes invalidate them.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use parking_lot::Mutex;
use stemma_pagestore::{
    Attr, DirEntry, FileKind, Ino, PageStore, SetAttr, TimelineId, PAGE_SIZE, ROOT_INO,
};

use crate::FuseOptions;

/// Most directory listings held open at once per mount. The kernel holds one per open
/// directory, so this only bounds a leak (a kernel that never sends `releasedir`).
const MAX_OPEN_DIRS: usize = 65_536;

/// Most inodes remembered as living in the direct-I/O directory; past it the set is cleared
/// (the cost is only that some files lose the optimisation until looked up again).
const MAX_DIRECT_INODES: usize = 16_384;

/// Block size reported by `statfs`: sizes are computed in these units.
const STATFS_BLOCK: u64 = 4096;

/// FUSE operations, for the request counters.
#[derive(Clone, Copy)]
enum Op {
    Lookup,
    Getattr,
    Setattr,
    Readlink,
    Mknod,
    Mkdir,
    Unlink,
    Rmdir,
    Symlink,
    Rename,
    Link,
    Open,
    Read,
    Write,
    Flush,
    Release,
    Fsync,
    Opendir,
    Readdir,
    Releasedir,
    Fsyncdir,
    Statfs,
    Access,
    Create,
    Fallocate,
}

const OP_NAMES: [&str; 25] = [
    "lookup",
    "getattr",
    "setattr",
    "readlink",
    "mknod",
    "mkdir",
    "unlink",
    "rmdir",
    "symlink",
    "rename",
    "link",
    "open",
    "read",
    "write",
    "flush",
    "release",
    "fsync",
    "opendir",
    "readdir",
    "releasedir",
    "fsyncdir",
    "statfs",
    "access",
    "create",
    "fallocate",
];

/// Requests served, by operation, by every mount of this process, and the time their
/// handlers took (nanoseconds): cheap (two relaxed atomic adds per request) and what tells
/// where a workload's round trips go and which of them are slow to answer.
static OP_COUNTS: [AtomicU64; 25] = [const { AtomicU64::new(0) }; 25];
static OP_NANOS: [AtomicU64; 25] = [const { AtomicU64::new(0) }; 25];

/// Counts one request of `op`; the time until the returned guard drops (the handler's
/// end) is added to the operation's total.
#[must_use]
fn count(op: Op) -> Timed {
    OP_COUNTS[op as usize].fetch_add(1, Ordering::Relaxed);
    Timed(op, std::time::Instant::now())
}

struct Timed(Op, std::time::Instant);

impl Drop for Timed {
    fn drop(&mut self) {
        let ns = u64::try_from(self.1.elapsed().as_nanos()).unwrap_or(u64::MAX);
        OP_NANOS[self.0 as usize].fetch_add(ns, Ordering::Relaxed);
    }
}

thread_local! {
    /// Whether this FUSE worker thread has had its priority set (fuser creates the threads,
    /// so each sets its own on its first request).
    static PRIORITY_SET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Gives the calling worker thread the nice value `nice`, once per thread. Every FUSE round
/// trip waits for one of these threads to be scheduled; on a busy host they should not queue
/// behind the computes they serve (nor behind anything else).
fn set_thread_priority(nice: Option<i32>) {
    let Some(nice) = nice else { return };
    PRIORITY_SET.with(|done| {
        if done.replace(true) {
            return;
        }
        // SAFETY: plain syscall; on Linux, PRIO_PROCESS with who = 0 is the calling thread.
        let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
        if rc != 0 {
            tracing::debug!(nice, error = %std::io::Error::last_os_error(), "could not raise the FUSE thread's priority");
        }
    });
}

/// FUSE requests served so far by every mount of this process, by operation (nonzero only).
pub fn request_counts() -> Vec<RequestCount> {
    OP_NAMES
        .iter()
        .zip(OP_COUNTS.iter().zip(OP_NANOS.iter()))
        .map(|(n, (c, t))| RequestCount {
            op: n,
            count: c.load(Ordering::Relaxed),
            handler_time: std::time::Duration::from_nanos(t.load(Ordering::Relaxed)),
        })
        .filter(|r| r.count > 0)
        .collect()
}

/// One operation's line of [`request_counts`].
#[derive(Debug, Clone, Copy)]
pub struct RequestCount {
    pub op: &'static str,
    pub count: u64,
    /// Total time spent in the handlers of these requests (from the request's arrival in
    /// a worker thread to its answer).
    pub handler_time: std::time::Duration,
}

/// A passthrough file's object and its backing id (alive while some handle holds it).
type Backing = (Arc<std::fs::File>, std::sync::Weak<BackingId>);

/// One timeline served through FUSE. `Send + Sync`: fuser calls it from several worker threads,
/// and the engine locks internally.
pub struct TimelineFs {
    store: Arc<PageStore>,
    tl: TimelineId,
    options: FuseOptions,
    /// Directory listings by handle: taken when a listing starts (offset 0), so that a
    /// directory changed while it is being read (PostgreSQL unlinks WAL segments while it
    /// iterates `pg_wal`) never makes the reader skip or repeat an entry.
    dirs: Mutex<HashMap<u64, Arc<Vec<DirEntry>>>>,
    next_fh: AtomicU64,
    /// The inode of the top-level directory named `options.direct_io_dir` (0: not seen yet).
    direct_dir: AtomicU64,
    /// Regular files seen in that directory: opened with FOPEN_DIRECT_IO (see `open`).
    direct: Mutex<HashSet<Ino>>,
    /// The engine inode FUSE's root (1) stands for: the timeline's root directory, or the
    /// external directory for its own mount (see [`TimelineFs::external_dir`]).
    root: Ino,
    /// Whether this is an external directory's mount: new regular files are external files
    /// of the engine, opened with FUSE passthrough when the kernel offers it.
    external: bool,
    /// The kernel accepted FUSE passthrough (set at `init`).
    passthrough: std::sync::atomic::AtomicBool,
    /// Passthrough files by inode: the object and its backing id, shared by the inode's opens
    /// (the kernel wants one backing file per inode at a time).
    backing: Mutex<HashMap<Ino, Backing>>,
    /// The backing id each passthrough handle holds; the last handle's release closes it.
    handles: Mutex<HashMap<u64, Arc<BackingId>>>,
}

impl TimelineFs {
    pub fn new(store: Arc<PageStore>, tl: TimelineId, options: FuseOptions) -> Self {
        TimelineFs {
            store,
            tl,
            options,
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            direct_dir: AtomicU64::new(0),
            direct: Mutex::new(HashSet::new()),
            root: ROOT_INO,
            external: false,
            passthrough: std::sync::atomic::AtomicBool::new(false),
            backing: Mutex::new(HashMap::new()),
            handles: Mutex::new(HashMap::new()),
        }
    }

    /// The filesystem of directory `dir` (an inode of timeline `tl`) on a mount of its own,
    /// where new regular files are the engine's external files and are opened with FUSE
    /// passthrough: reads and writes go to their object inside the kernel, only an fsync
    /// comes here. For `pg_wal`, where every commit is an fdatasync: one round trip instead
    /// of two. Its own mount because the kernel does not combine passthrough with the
    /// writeback cache on one connection, and the rest of the data directory needs that.
    pub fn external_dir(
        store: Arc<PageStore>,
        tl: TimelineId,
        dir: Ino,
        mut options: FuseOptions,
    ) -> Self {
        options.writeback_cache = false;
        options.direct_io_dir = None;
        let mut fs = TimelineFs::new(store, tl, options);
        fs.root = dir;
        fs.external = true;
        fs
    }

    /// Creates a regular file: an external one on an external directory's mount.
    fn create_file(
        &self,
        parent: Ino,
        name: &OsStr,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<Attr, Errno> {
        let create = if self.external {
            PageStore::create_external
        } else {
            PageStore::create
        };
        create(
            &self.store,
            self.tl,
            parent,
            name.as_bytes(),
            mode,
            uid,
            gid,
        )
        .map_err(errno)
    }

    pub(crate) fn options(&self) -> &FuseOptions {
        &self.options
    }

    /// The engine inode of a FUSE inode number.
    fn ino(&self, i: INodeNo) -> Ino {
        if i.0 == 1 {
            self.root
        } else {
            i.0
        }
    }

    /// The FUSE inode number of an engine inode.
    fn fuse_ino(&self, i: Ino) -> u64 {
        if i == self.root {
            1
        } else {
            i
        }
    }

    fn to_fuse(&self, a: &Attr) -> FileAttr {
        let mut f = to_fuse(a);
        f.ino = INodeNo(self.fuse_ino(a.ino));
        f
    }

    /// Opens `ino` with passthrough if it is an external file and the kernel can: the
    /// backing id to answer with, registered through `register`. `None`: an ordinary open.
    fn passthrough_open(
        &self,
        ino: Ino,
        fh: u64,
        flags: i32,
        register: impl FnOnce(&std::fs::File) -> std::io::Result<BackingId>,
    ) -> Result<Option<Arc<BackingId>>, Errno> {
        if !self.passthrough.load(Ordering::Relaxed)
            || !self.store.is_external(self.tl, ino).map_err(errno)?
        {
            return Ok(None);
        }
        let write = flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0;
        let file = self
            .store
            .external_file(self.tl, ino, write)
            .map_err(errno)?;
        let mut backing = self.backing.lock();
        // The kernel takes one backing file per inode while any passthrough open of it lasts.
        let id = match backing.get(&ino) {
            Some((f, id)) if Arc::ptr_eq(f, &file) => id.upgrade(),
            Some((_, id)) => match id.upgrade() {
                // A read-only open while another open lasts reads the file that one has: the
                // same bytes (nothing can have written the inode through another file).
                Some(id) if !write => Some(id),
                // A write open of a file whose open handles use another object (read-only,
                // its ancestor's, which the branch must not write; PostgreSQL never writes a
                // finished segment): the kernel would refuse the second backing file.
                Some(_) => {
                    tracing::warn!(timeline = %self.tl, ino, "a write open of an external file that is open on another object (its ancestor's): refused until those opens are closed");
                    return Err(Errno::ETXTBSY);
                }
                None => None,
            },
            None => None,
        };
        let id = match id {
            Some(id) => id,
            None => {
                let id = Arc::new(register(&file).map_err(|e| {
                    tracing::error!(timeline = %self.tl, ino, error = %e, "FUSE passthrough: registering a backing file failed");
                    Errno::EIO
                })?);
                backing.insert(ino, (file, Arc::downgrade(&id)));
                id
            }
        };
        drop(backing);
        self.handles.lock().insert(fh, id.clone());
        Ok(Some(id))
    }

    /// Notes that `parent/name` is `a`: remembers the direct-I/O directory and its files.
    fn saw(&self, parent: Ino, name: &[u8], a: &Attr) {
        let Some(dir) = self.options.direct_io_dir.as_deref() else {
            return;
        };
        if parent == ROOT_INO && a.kind == FileKind::Directory && name == dir.as_bytes() {
            self.direct_dir.store(a.ino, Ordering::Relaxed);
        } else if a.kind == FileKind::Regular && parent == self.direct_dir.load(Ordering::Relaxed) {
            let mut d = self.direct.lock();
            if d.len() >= MAX_DIRECT_INODES {
                d.clear();
            }
            d.insert(a.ino);
        }
    }

    /// How a file opened with `flags` is opened: through the page cache, kept across opens
    /// (only this mount changes the timeline), or bypassing it, for a synchronous open or a
    /// file of the direct-I/O directory.
    ///
    /// A synchronous open (`O_DSYNC`, which `O_SYNC` includes) has its writes made durable
    /// before they are answered (see `write`): through the writeback cache a synchronous
    /// write costs three round trips (the write is cached, then the kernel sends the dirty
    /// pages, a SETATTR with the times it kept, and an FSYNC); direct, it is one. PostgreSQL
    /// opens WAL segments this way with `wal_sync_method=open_datasync`. (Measured with
    /// pgbench, scale 50: TPC-B 0.74 of native with open_datasync on both sides against 0.75
    /// with fdatasync, and `pgbench -i` twice as slow on both, so the computes keep
    /// fdatasync.) Other opens of the same file keep the cache: the kernel drops cached pages
    /// a direct write overlaps.
    ///
    /// The direct-I/O directory (`FuseOptions::direct_io_dir`, e.g. `pg_wal` with fdatasync)
    /// saves one of those round trips per commit; measured, it did not pay, so it is off by
    /// default.
    fn open_flags(&self, ino: Ino, flags: i32) -> FopenFlags {
        let direct_dir = self.options.direct_io_dir.is_some() && self.direct.lock().contains(&ino);
        if is_synchronous(flags) || direct_dir {
            FopenFlags::FOPEN_DIRECT_IO
        } else {
            FopenFlags::FOPEN_KEEP_CACHE
        }
    }

    fn ttl(&self) -> Duration {
        self.options.ttl
    }

    fn fh(&self) -> u64 {
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }

    /// New files belong to the caller, or to the parent's group under a setgid directory, as
    /// on a local filesystem: the kernel's permission checks (`default_permissions`) rely on it.
    fn owner_for(&self, req: &Request, parent: Ino) -> Result<(u32, u32, bool), Errno> {
        let pa = self.store.getattr(self.tl, parent).map_err(errno)?;
        let setgid = pa.perm & (libc::S_ISGID as u16) != 0;
        let gid = if setgid { pa.gid } else { req.gid() };
        Ok((req.uid(), gid, setgid))
    }

    fn listing(&self, fh: u64, ino: Ino, offset: u64) -> Result<Arc<Vec<DirEntry>>, Errno> {
        let mut dirs = self.dirs.lock();
        if offset > 0 {
            if let Some(l) = dirs.get(&fh) {
                return Ok(l.clone());
            }
        }
        drop(dirs);
        // A new listing (offset 0 is a rewinddir too): the engine call runs unlocked.
        let entries = Arc::new(self.store.readdir(self.tl, ino).map_err(errno)?);
        dirs = self.dirs.lock();
        if dirs.len() >= MAX_OPEN_DIRS && !dirs.contains_key(&fh) {
            tracing::warn!(timeline = %self.tl, "too many open directory listings");
            return Err(Errno::EMFILE);
        }
        dirs.insert(fh, entries.clone());
        Ok(entries)
    }
}

/// The errno for an engine error; unexpected ones are logged, because the kernel only passes
/// the number on.
/// Whether open flags ask for synchronous writes (`O_DSYNC`; `O_SYNC` includes its bit).
fn is_synchronous(flags: i32) -> bool {
    flags & libc::O_DSYNC != 0
}

fn errno(e: stemma_pagestore::Error) -> Errno {
    let n = e.errno();
    if n == libc::EIO {
        tracing::error!(error = %e, "page store operation failed");
    } else {
        tracing::debug!(error = %e, "page store operation refused");
    }
    Errno::from_i32(n)
}

fn file_type(k: FileKind) -> FileType {
    match k {
        FileKind::Regular => FileType::RegularFile,
        FileKind::Directory => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
    }
}

fn to_fuse(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks(),
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.ctime,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: PAGE_SIZE as u32,
        flags: 0,
    }
}

fn time(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

/// What the kernel said of FUSE passthrough at the latest mount's INIT: 0 nothing yet, 1 it
/// offers it, 2 it does not (a host-wide fact: the same at every mount).
static KERNEL_PASSTHROUGH: AtomicU8 = AtomicU8::new(0);

/// Whether the kernel offers FUSE passthrough, as its last INIT in this process said (`None`
/// before any mount).
pub(crate) fn kernel_passthrough() -> Option<bool> {
    match KERNEL_PASSTHROUGH.load(Ordering::Relaxed) {
        1 => Some(true),
        2 => Some(false),
        _ => None,
    }
}

impl Filesystem for TimelineFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let caps = config.capabilities();
        let offered = caps.contains(InitFlags::FUSE_PASSTHROUGH);
        KERNEL_PASSTHROUGH.store(if offered { 1 } else { 2 }, Ordering::Relaxed);
        let mut wanted = InitFlags::FUSE_BIG_WRITES
            | InitFlags::FUSE_ASYNC_READ
            | InitFlags::FUSE_PARALLEL_DIROPS
            // Symlink targets are immutable in the engine.
            | InitFlags::FUSE_CACHE_SYMLINKS;
        if self.options.writeback_cache {
            // The kernel merges small writes in its page cache and sends them in large chunks:
            // the biggest win for `pgbench -i` (see shared/notes/fuse-findings.md). The engine
            // opens no backing file, so the kernel's reads of write-only files and its own
            // handling of O_APPEND need nothing from us.
            wanted |= InitFlags::FUSE_WRITEBACK_CACHE;
        }
        if self.external && !self.options.passthrough {
            tracing::info!(timeline = %self.tl, "FUSE passthrough off by the options: external files go through the server");
        } else if self.external && offered {
            // Backing files are plain files of the store's filesystem: depth 1.
            match config.set_max_stack_depth(1) {
                Ok(_) => {
                    wanted |= InitFlags::FUSE_PASSTHROUGH;
                    self.passthrough.store(true, Ordering::Relaxed);
                }
                Err(e) => tracing::warn!(error = ?e, "FUSE passthrough: stack depth refused"),
            }
        } else if self.external {
            tracing::warn!(timeline = %self.tl, "the kernel has no FUSE passthrough (Linux 6.9+): external files go through the server");
        }
        if let Err(missing) = config.add_capabilities(wanted & caps) {
            tracing::warn!(?missing, "kernel refused FUSE capabilities");
        }
        if !caps.contains(InitFlags::FUSE_WRITEBACK_CACHE) && self.options.writeback_cache {
            tracing::warn!("the kernel has no FUSE writeback cache: writes will be slower");
        }
        if let Err(max) = config.set_max_write(self.options.max_write) {
            tracing::warn!(max, "max_write capped by the kernel");
            let _ = config.set_max_write(max);
        }
        if let Err(max) = config.set_max_background(self.options.max_background) {
            let _ = config.set_max_background(max);
        }
        let _ = config.set_congestion_threshold(self.options.max_background * 3 / 4);
        tracing::debug!(timeline = %self.tl, "FUSE session initialised");
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _timed = count(Op::Lookup);
        set_thread_priority(self.options.nice);
        match self
            .store
            .lookup(self.tl, self.ino(parent), name.as_bytes())
        {
            Ok(a) => {
                self.saw(self.ino(parent), name.as_bytes(), &a);
                reply.entry(&self.ttl(), &self.to_fuse(&a), Generation(0))
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    // The engine resolves inodes by number in the timeline and keeps no lookup counts:
    // nothing to forget. Unlinked-but-open files are kept alive by open handles instead.
    fn forget(&self, _req: &Request, _ino: INodeNo, _nlookup: u64) {}

    fn getattr(&self, _req: &Request, i: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _timed = count(Op::Getattr);
        set_thread_priority(self.options.nice);
        match self.store.getattr(self.tl, self.ino(i)) {
            Ok(a) => reply.attr(&self.ttl(), &self.to_fuse(&a)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        i: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let _timed = count(Op::Setattr);
        set_thread_priority(self.options.nice);
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(time),
            mtime: mtime.map(time),
        };
        match self.store.setattr(self.tl, self.ino(i), set) {
            Ok(a) => reply.attr(&self.ttl(), &self.to_fuse(&a)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readlink(&self, _req: &Request, i: INodeNo, reply: ReplyData) {
        let _timed = count(Op::Readlink);
        set_thread_priority(self.options.nice);
        match self.store.readlink(self.tl, self.ino(i)) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        let _timed = count(Op::Mknod);
        set_thread_priority(self.options.nice);
        // A data directory holds regular files only; PostgreSQL's sockets live elsewhere.
        if mode & libc::S_IFMT != libc::S_IFREG {
            reply.error(Errno::EPERM);
            return;
        }
        let result = self
            .owner_for(req, self.ino(parent))
            .and_then(|(uid, gid, _)| {
                self.create_file(self.ino(parent), name, mode & !umask & 0o7777, uid, gid)
            });
        match result {
            Ok(a) => reply.entry(&self.ttl(), &self.to_fuse(&a), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let _timed = count(Op::Mkdir);
        set_thread_priority(self.options.nice);
        let result = self
            .owner_for(req, self.ino(parent))
            .and_then(|(uid, gid, setgid)| {
                let mut perm = mode & !umask & 0o7777;
                if setgid {
                    // Subdirectories of a setgid directory inherit the bit.
                    perm |= libc::S_ISGID;
                }
                self.store
                    .mkdir(self.tl, self.ino(parent), name.as_bytes(), perm, uid, gid)
                    .map_err(errno)
            })
            .inspect(|a| self.saw(self.ino(parent), name.as_bytes(), a));
        match result {
            Ok(a) => reply.entry(&self.ttl(), &self.to_fuse(&a), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _timed = count(Op::Unlink);
        set_thread_priority(self.options.nice);
        match self
            .store
            .unlink(self.tl, self.ino(parent), name.as_bytes())
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _timed = count(Op::Rmdir);
        set_thread_priority(self.options.nice);
        match self.store.rmdir(self.tl, self.ino(parent), name.as_bytes()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let _timed = count(Op::Symlink);
        set_thread_priority(self.options.nice);
        let result = self
            .owner_for(req, self.ino(parent))
            .and_then(|(uid, gid, _)| {
                self.store
                    .symlink(
                        self.tl,
                        self.ino(parent),
                        link_name.as_bytes(),
                        target.as_os_str().as_bytes(),
                        uid,
                        gid,
                    )
                    .map_err(errno)
            });
        match result {
            Ok(a) => reply.entry(&self.ttl(), &self.to_fuse(&a), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let _timed = count(Op::Rename);
        set_thread_priority(self.options.nice);
        if flags.intersects(RenameFlags::RENAME_EXCHANGE | RenameFlags::RENAME_WHITEOUT) {
            // Not needed by PostgreSQL, and the engine has no atomic exchange.
            reply.error(Errno::EINVAL);
            return;
        }
        if flags.contains(RenameFlags::RENAME_NOREPLACE) {
            // The kernel holds both parents' locks during a rename and this mount is the only
            // writer of the timeline, so the check cannot race with a create of the name.
            match self
                .store
                .lookup(self.tl, self.ino(newparent), newname.as_bytes())
            {
                Ok(_) => {
                    reply.error(Errno::EEXIST);
                    return;
                }
                Err(e) if e.errno() == libc::ENOENT => {}
                Err(e) => {
                    reply.error(errno(e));
                    return;
                }
            }
        }
        match self.store.rename(
            self.tl,
            self.ino(parent),
            name.as_bytes(),
            self.ino(newparent),
            newname.as_bytes(),
        ) {
            Ok(()) => {
                if let Ok(a) = self
                    .store
                    .lookup(self.tl, self.ino(newparent), newname.as_bytes())
                {
                    self.saw(self.ino(newparent), newname.as_bytes(), &a);
                }
                reply.ok()
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn link(
        &self,
        _req: &Request,
        i: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let _timed = count(Op::Link);
        set_thread_priority(self.options.nice);
        match self.store.link(
            self.tl,
            self.ino(i),
            self.ino(newparent),
            newname.as_bytes(),
        ) {
            Ok(a) => reply.entry(&self.ttl(), &self.to_fuse(&a), Generation(0)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn open(&self, _req: &Request, i: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _timed = count(Op::Open);
        set_thread_priority(self.options.nice);
        // The open flags need no handling: there is no backing file to pass O_APPEND or
        // O_DIRECT to, the kernel applies O_APPEND itself under the writeback cache, and
        // O_TRUNC arrives as a separate setattr.
        if let Err(e) = self.store.open_handle(self.tl, self.ino(i)) {
            reply.error(errno(e));
            return;
        }
        let fh = self.fh();
        match self.passthrough_open(self.ino(i), fh, flags.0, |f| reply.open_backing(f)) {
            Ok(Some(id)) => reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &id),
            // Only this mount changes the timeline, so cached pages stay valid across opens.
            Ok(None) => reply.opened(FileHandle(fh), self.open_flags(self.ino(i), flags.0)),
            Err(e) => {
                let _ = self.store.release_handle(self.tl, self.ino(i));
                reply.error(e)
            }
        }
    }

    fn read(
        &self,
        _req: &Request,
        i: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let _timed = count(Op::Read);
        set_thread_priority(self.options.nice);
        match self.store.read(self.tl, self.ino(i), offset, size as usize) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        i: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let _timed = count(Op::Write);
        set_thread_priority(self.options.nice);
        // A write of a synchronous open (direct, see `open_flags`) is durable when it is
        // answered; the kernel's writeback of cached pages (FUSE_WRITE_CACHE) carries the
        // flags of whichever open it borrows, and is not.
        let durable =
            is_synchronous(flags.0) && !write_flags.contains(WriteFlags::FUSE_WRITE_CACHE);
        let result = self
            .store
            .write(self.tl, self.ino(i), offset, data)
            .and_then(|n| {
                if durable {
                    self.store.sync_file(self.tl, self.ino(i))?;
                }
                Ok(n)
            });
        match result {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let _timed = count(Op::Flush);
        set_thread_priority(self.options.nice);
        // close() promises no durability, and we keep no POSIX locks: ENOSYS tells the kernel
        // to stop sending FLUSH at all, one round trip less per close (the kernel still writes
        // back its dirty pages before the close returns).
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        i: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _timed = count(Op::Release);
        set_thread_priority(self.options.nice);
        // The last handle of a backing id closes it (its drop), after which the inode's next
        // open registers its object again.
        self.handles.lock().remove(&fh.0);
        match self.store.release_handle(self.tl, self.ino(i)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        i: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _timed = count(Op::Fsync);
        set_thread_priority(self.options.nice);
        // The kernel has already sent this file's dirty pages; the store commits those it
        // buffered, and one group-committed fsync of the log makes them (and everything
        // before them) durable.
        match self.store.sync_file(self.tl, self.ino(i)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn opendir(&self, _req: &Request, i: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _timed = count(Op::Opendir);
        set_thread_priority(self.options.nice);
        match self.store.getattr(self.tl, self.ino(i)) {
            Ok(a) if a.kind == FileKind::Directory => {
                reply.opened(FileHandle(self.fh()), FopenFlags::FOPEN_KEEP_CACHE)
            }
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        i: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _timed = count(Op::Readdir);
        set_thread_priority(self.options.nice);
        let entries = match self.listing(fh.0, self.ino(i), offset) {
            Ok(l) => l,
            Err(e) => {
                reply.error(e);
                return;
            }
        };
        // Offsets: 1 is ".", 2 is "..", 3.. the listing; the kernel resumes after the last
        // offset it received.
        let mut next = offset;
        loop {
            let full = match next {
                0 => reply.add(i, 1, FileType::Directory, "."),
                // ".." is only informative here: the kernel resolves it itself.
                1 => reply.add(i, 2, FileType::Directory, ".."),
                n => match entries.get((n - 2) as usize) {
                    Some(e) => reply.add(
                        INodeNo(self.fuse_ino(e.ino)),
                        n + 1,
                        file_type(e.kind),
                        OsStr::from_bytes(&e.name),
                    ),
                    None => break,
                },
            };
            if full {
                break;
            }
            next += 1;
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let _timed = count(Op::Releasedir);
        set_thread_priority(self.options.nice);
        self.dirs.lock().remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _timed = count(Op::Fsyncdir);
        set_thread_priority(self.options.nice);
        // Directory changes are frames of the same log: the same sync covers them.
        match self.store.sync() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let _timed = count(Op::Statfs);
        set_thread_priority(self.options.nice);
        match self.store.statfs() {
            Ok(s) => {
                let files = s.inodes.max(1);
                reply.statfs(
                    s.total_bytes / STATFS_BLOCK,
                    s.free_bytes / STATFS_BLOCK,
                    s.available_bytes / STATFS_BLOCK,
                    // Inode numbers are not a limited resource here: report plenty free.
                    files + u64::from(u32::MAX),
                    u64::from(u32::MAX),
                    STATFS_BLOCK as u32,
                    s.max_name_len,
                    STATFS_BLOCK as u32,
                )
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn access(&self, _req: &Request, i: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        let _timed = count(Op::Access);
        set_thread_priority(self.options.nice);
        // With default_permissions the kernel checks permissions itself and does not send
        // ACCESS; answer existence for kernels that do.
        match self.store.getattr(self.tl, self.ino(i)) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let _timed = count(Op::Create);
        set_thread_priority(self.options.nice);
        let result = self
            .owner_for(req, self.ino(parent))
            .and_then(|(uid, gid, _)| {
                // The kernel has usually applied the umask already (no FUSE_DONT_MASK); applying
                // it again is harmless and keeps the promise on kernels that did not.
                let a =
                    self.create_file(self.ino(parent), name, mode & !umask & 0o7777, uid, gid)?;
                self.saw(self.ino(parent), name.as_bytes(), &a);
                self.store.open_handle(self.tl, a.ino).map_err(errno)
            });
        let a = match result {
            Ok(a) => a,
            Err(e) => {
                reply.error(e);
                return;
            }
        };
        let fh = self.fh();
        match self.passthrough_open(a.ino, fh, flags, |f| reply.open_backing(f)) {
            Ok(Some(id)) => reply.created_passthrough(
                &self.ttl(),
                &self.to_fuse(&a),
                Generation(0),
                FileHandle(fh),
                FopenFlags::empty(),
                &id,
            ),
            Ok(None) => reply.created(
                &self.ttl(),
                &self.to_fuse(&a),
                Generation(0),
                FileHandle(fh),
                self.open_flags(a.ino, flags),
            ),
            Err(e) => {
                let _ = self.store.release_handle(self.tl, a.ino);
                reply.error(e)
            }
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        i: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let _timed = count(Op::Fallocate);
        set_thread_priority(self.options.nice);
        // Only plain allocation (mode 0): holes read as zeros, so it is an extension of the
        // size. Punching holes and the like are refused, and glibc's posix_fallocate falls
        // back to writing zeros.
        if mode != 0 {
            reply.error(Errno::EOPNOTSUPP);
            return;
        }
        let Some(end) = offset.checked_add(length) else {
            reply.error(Errno::EFBIG);
            return;
        };
        let result = self.store.getattr(self.tl, self.ino(i)).and_then(|a| {
            if end > a.size {
                self.store.setattr(
                    self.tl,
                    self.ino(i),
                    SetAttr {
                        size: Some(end),
                        ..SetAttr::default()
                    },
                )?;
            }
            Ok(())
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }
}
