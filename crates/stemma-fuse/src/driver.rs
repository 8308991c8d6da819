//! [`PagestoreDriver`]: the `pagestore` [`StorageDriver`].
//!
//! Layout under the driver's root:
//!
//! ```text
//! <root>/            0711 (computes traverse it)
//!   store/           the PageStore (0700)
//!   mnt/             0711
//!     <timeline id>/ mount point of that timeline: the compute's data directory
//! ```
//!
//! The control plane's timeline ids are the engine timelines' labels. Every timeline is mounted
//! while the driver is open (when the driver opens, and when a timeline is created), and
//! unmounted by [`PagestoreDriver::shutdown`] or on drop. Changes the driver makes to a mounted
//! timeline go through its mount, so the kernel's caches stay right; changes to a new timeline
//! (its root's owner, a clone's excluded files) are made in the engine before it is mounted.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{self, ErrorKind, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use stemma_pagestore::{BranchPoint, FileKind, Ino, PageStore, SetAttr, ROOT_INO};
use stemma_storage::{
    Capabilities, CloneConsistency, CloneFilter, Result, StorageDriver, StorageError, TimelineId,
    Usage,
};

use crate::flusher::{
    default_write_buffer, start_flusher, start_note_committer, start_preparer, Periodic,
};
use crate::mount::{clear_stale_mounts, kill_stranded_processes, MountedTimeline};
use crate::FuseOptions;

type EngineTl = stemma_pagestore::TimelineId;

/// Settings of a [`PagestoreDriver`].
#[derive(Debug, Clone)]
pub struct DriverOptions {
    pub fuse: FuseOptions,
    /// The engine's settings (retention window, segment size, write buffer).
    pub store: stemma_pagestore::Config,
    /// Whether a background thread prepares the log's next segment ahead of need (only
    /// with zeros ahead of the log on). `STEMMA_PAGESTORE_PREPARE_SEGMENTS=0` turns it off.
    pub prepare_segments: bool,
}

impl Default for DriverOptions {
    /// The engine's defaults, with a write buffer of [`default_write_buffer`] bytes.
    fn default() -> Self {
        DriverOptions {
            fuse: FuseOptions::default(),
            store: stemma_pagestore::Config {
                write_buffer: default_write_buffer(),
                log_zero_ahead: std::env::var("STEMMA_PAGESTORE_ZERO_AHEAD_MB")
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(4)
                    << 20,
                ..stemma_pagestore::Config::default()
            },
            prepare_segments: std::env::var("STEMMA_PAGESTORE_PREPARE_SEGMENTS").as_deref()
                != Ok("0"),
        }
    }
}

/// The `pagestore` driver. See the module docs for the layout and the mount lifecycle.
pub struct PagestoreDriver {
    root: PathBuf,
    mnt_dir: PathBuf,
    store: Arc<PageStore>,
    owner: Option<(u32, u32)>,
    options: DriverOptions,
    /// Mounted timelines by id. The lock also serializes the driver's changes (create, clone,
    /// delete), so that an id is never mounted twice nor created twice.
    mounts: Mutex<HashMap<TimelineId, MountedTimeline>>,
    /// Background threads: the write buffer's flusher (when the store buffers) and the log
    /// preparer (when it zeroes ahead). Stopped at shutdown.
    background: Mutex<Vec<Periodic>>,
}

fn engine_err(context: &'static str, path: &Path, e: stemma_pagestore::Error) -> StorageError {
    let kind = io::Error::from_raw_os_error(e.errno()).kind();
    StorageError::Io {
        context,
        path: path.to_path_buf(),
        source: io::Error::new(kind, e),
    }
}

fn io_err(context: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StorageError {
    let path = path.to_path_buf();
    move |source| StorageError::Io {
        context,
        path,
        source,
    }
}

/// Rejects absolute paths and `..`, so that a relative path stays inside a timeline.
fn check_relative(p: &Path) -> Result<()> {
    let ok = !p.as_os_str().is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)));
    if ok {
        Ok(())
    } else {
        Err(StorageError::InvalidPath(p.to_path_buf()))
    }
}

/// What the pagestore can do: clones are O(1) snapshots that keep reading their parent, at
/// any moment of the retention window.
pub(crate) const CAPABILITIES: Capabilities = Capabilities {
    clone_consistency: CloneConsistency::CrashConsistent,
    point_in_time: true,
    children_depend_on_parent: true,
    // What makes `pg_wal`'s external files safe to version by their fsyncs alone (see
    // `stemma_pagestore`'s `external.rs`): a finished segment is unlinked, never renamed and
    // overwritten, and a new one is zeros until written. Set on the command line, so that
    // neither a branch's settings nor `ALTER SYSTEM` can change them.
    compute_settings: &[("wal_recycle", "off"), ("wal_init_zero", "on")],
};

/// The mount point (the compute's data directory) of timeline `id` under a driver's root.
pub(crate) fn mount_point(root: &Path, id: &TimelineId) -> PathBuf {
    root.join("mnt").join(id.as_str())
}

/// The retention window for people: "7 days", "36 hours", else humantime's "1h 30m".
fn window_text(d: Duration) -> String {
    let plural = |n: u64, unit: &str| format!("{n} {unit}{}", if n == 1 { "" } else { "s" });
    match d.as_secs() {
        s if s > 0 && d.subsec_nanos() == 0 && s % 86_400 == 0 => plural(s / 86_400, "day"),
        s if s > 0 && d.subsec_nanos() == 0 && s % 3_600 == 0 => plural(s / 3_600, "hour"),
        _ => humantime::format_duration(d).to_string(),
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

impl PagestoreDriver {
    /// Opens (creating it if needed) the driver's root, opens the page store (replaying its
    /// log; it fails if another process has it open), detaches mounts a crashed earlier
    /// process left below `<root>/mnt`, and mounts every timeline; a timeline that cannot be
    /// mounted fails the whole open. `owner` is the uid/gid of the computes' user: it owns the root
    /// directory of every new timeline; `None` keeps this process's user.
    pub fn open(root: &Path, owner: Option<(u32, u32)>, options: DriverOptions) -> Result<Self> {
        let store_dir = root.join("store");
        let mnt_dir = root.join("mnt");
        for (dir, mode) in [(root, 0o711), (&mnt_dir, 0o711), (&store_dir, 0o700)] {
            std::fs::create_dir_all(dir).map_err(io_err("creating a pagestore directory", dir))?;
            // Computes (another user) must traverse into their mount point.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
                .map_err(io_err("setting the mode of a pagestore directory", dir))?;
        }
        // The store's lock first: it proves no other live process serves these mounts.
        let store = PageStore::open(&store_dir, options.store.clone())
            .map_err(|e| engine_err("opening the page store", &store_dir, e))?;
        // Mounts found now belong to a dead server (we hold the lock). Computes still
        // working in them go first: they could never use their data directory again.
        kill_stranded_processes(&mnt_dir).map_err(io_err(
            "stopping processes stranded in stale mounts",
            &mnt_dir,
        ))?;
        clear_stale_mounts(&mnt_dir).map_err(io_err("detaching stale mounts", &mnt_dir))?;
        let store = Arc::new(store);
        let mut background = Vec::new();
        if options.store.write_buffer > 0 {
            background.push(
                start_flusher(store.clone(), options.store.write_buffer)
                    .map_err(io_err("starting the write buffer's flusher", root))?,
            );
        }
        if options.fuse.external_dir.is_some() {
            background.push(
                start_note_committer(store.clone())
                    .map_err(io_err("starting the external files' note committer", root))?,
            );
        }
        if options.prepare_segments && options.store.log_zero_ahead > 0 {
            background.push(
                start_preparer(store.clone()).map_err(io_err("starting the log preparer", root))?,
            );
        }
        let driver = PagestoreDriver {
            root: root.to_path_buf(),
            mnt_dir,
            store,
            owner,
            options,
            mounts: Mutex::new(HashMap::new()),
            background: Mutex::new(background),
        };
        let ids = driver.list()?;
        {
            let mut mounts = driver.mounts.lock();
            for id in &ids {
                driver.mount_locked(&mut mounts, id)?;
            }
        }
        tracing::info!(root = %root.display(), timelines = ids.len(), "pagestore driver opened");
        Ok(driver)
    }

    /// The page store behind the driver (for measurements and tests).
    pub fn store(&self) -> &Arc<PageStore> {
        &self.store
    }

    /// The driver's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Mounts `id` if it is not mounted (the driver mounts every timeline itself; this is for
    /// a caller that unmounted one, or after a failed mount) and returns its data directory.
    pub fn ensure_mounted(&self, id: &TimelineId) -> Result<PathBuf> {
        let mut mounts = self.mounts.lock();
        self.mount_locked(&mut mounts, id)?;
        Ok(self.data_dir(id))
    }

    /// Unmounts every timeline (detaching busy ones: their processes keep their open files
    /// until they close them). Idempotent; also done on drop. Stop the computes first.
    pub fn shutdown(&self) {
        let mounts: Vec<_> = self.mounts.lock().drain().collect();
        for (id, m) in mounts {
            if let Err(e) = m.unmount() {
                tracing::error!(timeline = %id, error = %e, "unmount failed");
            }
        }
        for mut t in self.background.lock().drain(..) {
            t.stop();
        }
        // What nobody fsynced still goes to disk on a clean stop, as a native filesystem's
        // page cache does at unmount.
        if let Err(e) = self
            .store
            .flush_buffered(None, None, 0)
            .and_then(|_| self.store.sync())
        {
            tracing::error!(error = %e, "committing buffered page writes at shutdown failed");
        }
    }

    /// The engine timeline labelled `id`. Labels are unique because creation checks under
    /// the driver's lock; the newest wins should an old bug have made two.
    /// Makes the ordinary files of the external directory (`pg_wal`) external files, so that
    /// they too go through passthrough: `initdb` wrote its first WAL segment through the
    /// timeline's mount, before the WAL's own mount existed, and a branch inherits its
    /// parent's. Called before a compute starts, when nothing has them open.
    fn externalize_dir(&self, tl: EngineTl, data_dir: &Path) -> Result<()> {
        let Some(name) = self.options.fuse.external_dir.as_deref() else {
            return Ok(());
        };
        let path = data_dir.join(name);
        let err = |e| engine_err("making the WAL's files external", &path, e);
        let dir = match self
            .store
            .lookup(tl, stemma_pagestore::ROOT_INO, name.as_bytes())
        {
            Ok(a) if a.kind == stemma_pagestore::FileKind::Directory => a.ino,
            Ok(_) => return Ok(()),
            Err(e) if e.errno() == libc::ENOENT => return Ok(()),
            Err(e) => return Err(err(e)),
        };
        for entry in self.store.readdir(tl, dir).map_err(err)? {
            if entry.kind == stemma_pagestore::FileKind::Regular
                && self.store.externalize(tl, entry.ino).map_err(err)?
            {
                tracing::debug!(timeline = %tl, ino = entry.ino, file = %String::from_utf8_lossy(&entry.name), "made a WAL file external");
            }
        }
        Ok(())
    }

    fn engine_id(&self, id: &TimelineId) -> Option<EngineTl> {
        self.store
            .timelines()
            .into_iter()
            .filter(|t| t.label == id.as_str().as_bytes())
            .map(|t| t.id)
            .max()
    }

    fn mount_locked(
        &self,
        mounts: &mut HashMap<TimelineId, MountedTimeline>,
        id: &TimelineId,
    ) -> Result<()> {
        if mounts.contains_key(id) {
            return Ok(());
        }
        let tl = self
            .engine_id(id)
            .ok_or_else(|| StorageError::NotFound(id.clone()))?;
        let path = self.data_dir(id);
        match std::fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err("creating a mount point", &path)(e)),
        }
        let m = MountedTimeline::mount(self.store.clone(), tl, &path, &self.options.fuse)
            .map_err(io_err("mounting a timeline with FUSE", &path))?;
        mounts.insert(id.clone(), m);
        Ok(())
    }

    /// Creates `child` as a branch of `parent` at `at`, removes what `filter` leaves out, and
    /// mounts it. On failure nothing is left behind.
    fn branch(
        &self,
        parent: &TimelineId,
        child: &TimelineId,
        at: BranchPoint,
        filter: &CloneFilter,
    ) -> Result<()> {
        for p in filter
            .exclude
            .iter()
            .chain(&filter.empty)
            .chain(&filter.only)
        {
            check_relative(p)?;
        }
        let mut mounts = self.mounts.lock();
        let ptl = self
            .engine_id(parent)
            .ok_or_else(|| StorageError::NotFound(parent.clone()))?;
        if self.engine_id(child).is_some() {
            return Err(StorageError::AlreadyExists(child.clone()));
        }
        let ctl = self
            .store
            .branch(ptl, at, child.as_str().as_bytes())
            .map_err(|e| match e {
                stemma_pagestore::Error::OutsideRetention { requested, oldest } => {
                    StorageError::Io {
                        context: "branching at a past moment",
                        path: self.data_dir(parent),
                        source: io::Error::new(
                            ErrorKind::InvalidInput,
                            format!(
                                "{} is outside the retention window of timeline {parent}: the oldest moment that can be branched is {}",
                                rfc3339(requested),
                                rfc3339(oldest)
                            ),
                        ),
                    }
                }
                stemma_pagestore::Error::InFuture(t) => StorageError::Io {
                    context: "branching at a past moment",
                    path: self.data_dir(parent),
                    source: io::Error::new(
                        ErrorKind::InvalidInput,
                        format!("{} is in the future", rfc3339(t)),
                    ),
                },
                stemma_pagestore::Error::BeforeTimelineCreated { .. } => StorageError::Io {
                    context: "branching at a past moment",
                    path: self.data_dir(parent),
                    source: io::Error::new(
                        ErrorKind::InvalidInput,
                        format!("timeline {parent} did not exist yet at that moment"),
                    ),
                },
                e => engine_err("branching a timeline", &self.data_dir(parent), e),
            })?;
        let result = self
            .apply_filter(ctl, filter)
            .and_then(|()| {
                self.store
                    .sync()
                    .map_err(|e| engine_err("syncing a new branch", &self.data_dir(child), e))
            })
            .and_then(|()| self.mount_locked(&mut mounts, child));
        if let Err(e) = result {
            if let Err(e2) = self.store.delete_timeline(ctl) {
                tracing::error!(timeline = %child, error = %e2, "could not roll back a failed branch");
            }
            return Err(e);
        }
        tracing::info!(%parent, %child, ?at, "branched timeline");
        Ok(())
    }

    /// Removes from the new, not yet mounted timeline `tl` what `filter` leaves out. A branch
    /// copies nothing, so leaving something out is the child's own change: a removal.
    fn apply_filter(&self, tl: EngineTl, filter: &CloneFilter) -> Result<()> {
        if filter.exclude.is_empty() && filter.empty.is_empty() && filter.only.is_empty() {
            return Ok(());
        }
        self.filter_dir(tl, ROOT_INO, Path::new(""), filter, false)
    }

    fn filter_dir(
        &self,
        tl: EngineTl,
        dir: Ino,
        rel: &Path,
        filter: &CloneFilter,
        inside_only: bool,
    ) -> Result<()> {
        let ctx = |e| engine_err("removing an excluded entry from a branch", rel, e);
        for entry in self.store.readdir(tl, dir).map_err(ctx)? {
            let rel_child = rel.join(OsStr::from_bytes(&entry.name));
            let excluded = filter.exclude.iter().any(|p| p == &rel_child);
            let outside_only = !inside_only
                && !filter.only.is_empty()
                && !filter
                    .only
                    .iter()
                    .any(|p| p.starts_with(&rel_child) || rel_child.starts_with(p));
            if excluded || outside_only {
                self.remove_tree(tl, dir, &entry.name, entry.kind)
                    .map_err(ctx)?;
                continue;
            }
            if entry.kind != FileKind::Directory {
                continue;
            }
            if filter.empty.iter().any(|p| p == &rel_child) {
                for inner in self.store.readdir(tl, entry.ino).map_err(ctx)? {
                    self.remove_tree(tl, entry.ino, &inner.name, inner.kind)
                        .map_err(ctx)?;
                }
                continue;
            }
            let now_inside = inside_only || filter.only.iter().any(|p| rel_child.starts_with(p));
            self.filter_dir(tl, entry.ino, &rel_child, filter, now_inside)?;
        }
        Ok(())
    }

    /// Removes `parent/name` and everything below it. Iterative: a data directory is shallow,
    /// but a recursion depth the disk decides is not something to rely on.
    fn remove_tree(
        &self,
        tl: EngineTl,
        parent: Ino,
        name: &[u8],
        kind: FileKind,
    ) -> stemma_pagestore::Result<()> {
        if kind != FileKind::Directory {
            return self.store.unlink(tl, parent, name);
        }
        // (parent, name, ino, children pushed)
        let top = self.store.lookup(tl, parent, name)?.ino;
        let mut stack = vec![(parent, name.to_vec(), top, false)];
        while let Some((p, n, ino, expanded)) = stack.pop() {
            if expanded {
                self.store.rmdir(tl, p, &n)?;
                continue;
            }
            stack.push((p, n, ino, true));
            for e in self.store.readdir(tl, ino)? {
                if e.kind == FileKind::Directory {
                    stack.push((ino, e.name, e.ino, false));
                } else {
                    self.store.unlink(tl, ino, &e.name)?;
                }
            }
        }
        Ok(())
    }

    fn chown_path(&self, path: &Path) -> Result<()> {
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::lchown(path, Some(uid), Some(gid))
                .map_err(io_err("changing the owner", path))?;
        }
        Ok(())
    }
}

impl Drop for PagestoreDriver {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl StorageDriver for PagestoreDriver {
    fn name(&self) -> &'static str {
        "pagestore"
    }

    fn describe(&self) -> String {
        let f = &self.options.fuse;
        let wal = match &f.external_dir {
            Some(d) if f.live_external_dir => {
                format!(", {d} a live directory of the host filesystem that the store mirrors")
            }
            Some(d) if !f.passthrough => format!(", {d} on a mount of its own, through the server"),
            Some(d) => match crate::fs::kernel_passthrough() {
                Some(false) => format!(
                    ", {d} on the timeline's mount (the kernel has no FUSE passthrough, Linux 6.9+)"
                ),
                _ => format!(", {d} on a mount of its own with FUSE passthrough"),
            },
            None => String::new(),
        };
        format!(
            "pagestore: page-level copy-on-write through FUSE (store in {}, {} timeline(s) mounted under {}, {} FUSE threads per mount, writeback cache {}{wal}); branches cost one record, are crash-consistent without pausing the parent, and can start at any moment of the last {}",
            self.store.dir().display(),
            self.mounts.lock().len(),
            self.mnt_dir.display(),
            f.threads,
            if f.writeback_cache { "on" } else { "off" },
            window_text(self.options.store.retention),
        )
    }

    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    fn create_empty(&self, id: &TimelineId) -> Result<PathBuf> {
        let mut mounts = self.mounts.lock();
        if self.engine_id(id).is_some() {
            return Err(StorageError::AlreadyExists(id.clone()));
        }
        let path = self.data_dir(id);
        let tl = self
            .store
            .create_root(id.as_str().as_bytes())
            .map_err(|e| engine_err("creating a timeline", &path, e))?;
        let result = (|| {
            // initdb wants its directory 0700 and owned by the compute's user.
            let (uid, gid) = self.owner.unzip();
            self.store
                .setattr(
                    tl,
                    ROOT_INO,
                    SetAttr {
                        mode: Some(0o700),
                        uid,
                        gid,
                        ..SetAttr::default()
                    },
                )
                .and_then(|_| self.store.sync())
                .map_err(|e| engine_err("setting the owner of a new timeline", &path, e))?;
            self.mount_locked(&mut mounts, id)
        })();
        if let Err(e) = result {
            if let Err(e2) = self.store.delete_timeline(tl) {
                tracing::error!(timeline = %id, error = %e2, "could not roll back a failed create");
            }
            return Err(e);
        }
        tracing::info!(timeline = %id, path = %path.display(), "created empty timeline");
        Ok(path)
    }

    /// A branch of `parent` at its current state: O(1), crash-consistent, no pause of a running
    /// parent. `filter`'s excluded entries are removed from the child (`only` keeps only those
    /// entries). Called again for an existing `child` (a staged clone, which this driver never
    /// needs), it only applies `filter`'s removals again, through the mount.
    fn clone_timeline(
        &self,
        parent: &TimelineId,
        child: &TimelineId,
        filter: &CloneFilter,
    ) -> Result<()> {
        if self.engine_id(child).is_some() {
            if self.engine_id(parent).is_none() {
                return Err(StorageError::NotFound(parent.clone()));
            }
            for p in &filter.exclude {
                check_relative(p)?;
                let path = self.data_dir(child).join(p);
                let r = match std::fs::symlink_metadata(&path) {
                    Ok(m) if m.is_dir() => std::fs::remove_dir_all(&path),
                    Ok(_) => std::fs::remove_file(&path),
                    Err(e) => Err(e),
                };
                match r {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err("removing an excluded entry", &path)(e)),
                }
            }
            return Ok(());
        }
        self.branch(parent, child, BranchPoint::Now, filter)
    }

    fn branch_at(
        &self,
        parent: &TimelineId,
        child: &TimelineId,
        at: SystemTime,
        filter: &CloneFilter,
    ) -> Result<()> {
        self.branch(parent, child, BranchPoint::Time(at), filter)
    }

    fn write_file(&self, id: &TimelineId, relative: &Path, contents: &[u8]) -> Result<()> {
        check_relative(relative)?;
        // Through the mount, so that the kernel's caches of the timeline stay right.
        let dir = self.ensure_mounted(id)?;
        let path = dir.join(relative);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err("creating a file", &path))?;
        f.write_all(contents)
            .map_err(io_err("writing a file", &path))?;
        f.sync_all().map_err(io_err("syncing a file", &path))?;
        self.chown_path(&path)
    }

    fn remove_file(&self, id: &TimelineId, relative: &Path) -> Result<()> {
        check_relative(relative)?;
        let path = self.ensure_mounted(id)?.join(relative);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("removing a file", &path)(e)),
        }
    }

    fn data_dir(&self, id: &TimelineId) -> PathBuf {
        mount_point(&self.root, id)
    }

    /// Commits every buffered page write of timeline `id` and syncs: a compute starting on it
    /// then runs crash recovery from a durable image (its `syncfs` does not reach FUSE).
    /// Also mounts `pg_wal` on its own connection if it is not yet (a timeline made by
    /// `initdb` through the mount gets its `pg_wal` only then): no compute runs on the
    /// timeline at this point, so nothing holds a file of it open through the outer mount.
    fn sync_timeline(&self, id: &TimelineId) -> Result<()> {
        let tl = self
            .engine_id(id)
            .ok_or_else(|| StorageError::NotFound(id.clone()))?;
        self.store
            .sync_timeline(tl)
            .map_err(|e| engine_err("syncing a timeline", &self.data_dir(id), e))?;
        let mut mounts = self.mounts.lock();
        let wanted = crate::mount::external_mount_wanted(
            &self.options.fuse,
            crate::fs::kernel_passthrough(),
        );
        // Without the WAL's own mount its files stay ordinary pages (see
        // `external_mount_wanted`).
        if let Some(m) = mounts.get_mut(id).filter(|_| wanted) {
            let path = m.path().to_path_buf();
            self.externalize_dir(tl, &path)?;
            m.mount_external_dir(&self.store, &self.options.fuse)
                .map_err(io_err("mounting the WAL directory", &path))?;
        }
        Ok(())
    }

    fn exists(&self, id: &TimelineId) -> bool {
        self.engine_id(id).is_some()
    }

    /// Unmounts (detaching the mount when files are open) and deletes the timeline. Refused,
    /// with nothing changed, while child timelines read through it.
    fn delete(&self, id: &TimelineId) -> Result<()> {
        let mut mounts = self.mounts.lock();
        let path = self.data_dir(id);
        let Some(tl) = self.engine_id(id) else {
            // Missing: make sure no mount or mount point is left either.
            if let Some(m) = mounts.remove(id) {
                m.unmount()
                    .map_err(io_err("unmounting a timeline", &path))?;
            }
            let _ = std::fs::remove_dir(&path);
            return Ok(());
        };
        let children: Vec<String> = self
            .store
            .timelines()
            .into_iter()
            .filter(|t| t.parent.map(|(p, _)| p) == Some(tl))
            .map(|t| String::from_utf8_lossy(&t.label).into_owned())
            .collect();
        if !children.is_empty() {
            return Err(StorageError::Io {
                context: "deleting a timeline",
                path,
                source: io::Error::new(
                    ErrorKind::DirectoryNotEmpty,
                    format!(
                        "timeline {id} has child timelines that read through it ({}): delete them first",
                        children.join(", ")
                    ),
                ),
            });
        }
        if let Some(m) = mounts.remove(id) {
            m.unmount()
                .map_err(io_err("unmounting a timeline", &path))?;
        }
        self.store
            .delete_timeline(tl)
            .map_err(|e| engine_err("deleting a timeline", &path, e))?;
        match std::fs::remove_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "could not remove a mount point")
            }
        }
        tracing::info!(timeline = %id, "deleted timeline");
        Ok(())
    }

    fn list(&self) -> Result<Vec<TimelineId>> {
        let mut out: Vec<TimelineId> = self
            .store
            .timelines()
            .into_iter()
            .filter_map(|t| {
                let label = String::from_utf8_lossy(&t.label).into_owned();
                match TimelineId::parse(&label) {
                    Ok(id) => Some(id),
                    Err(_) => {
                        tracing::warn!(engine_timeline = %t.id, label, "page store timeline with a label that is no timeline id; ignored");
                        None
                    }
                }
            })
            .collect();
        out.sort();
        out.dedup();
        Ok(out)
    }

    fn usage(&self, id: &TimelineId) -> Result<Usage> {
        let tl = self
            .engine_id(id)
            .ok_or_else(|| StorageError::NotFound(id.clone()))?;
        let u = self
            .store
            .usage(tl)
            .map_err(|e| engine_err("measuring a timeline", &self.data_dir(id), e))?;
        Ok(Usage {
            logical_size_bytes: u.logical_size_bytes,
            own_storage_bytes: u.own_storage_bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_retention_window_reads_as_people_say_it() {
        assert_eq!(window_text(Duration::from_secs(7 * 86_400)), "7 days");
        assert_eq!(window_text(Duration::from_secs(86_400)), "1 day");
        assert_eq!(window_text(Duration::from_secs(36 * 3_600)), "36 hours");
        assert_eq!(window_text(Duration::from_secs(5_400)), "1h 30m");
    }
}
