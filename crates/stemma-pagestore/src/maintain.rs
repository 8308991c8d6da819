//! Maintenance of a running store: GC of the index, compaction of data files, index
//! checkpoints. See `docs/pagestore.md`, "Checkpoints, GC and compaction".
//!
//! Only short steps take the state's write lock (GC's batches of changes, rolling the active
//! segment, switching locations to a new pack, forgetting deleted files); the walks of the
//! index run on shared copies of it ([`crate::state::SharedIndex`]), reading the live pages
//! and writing the pack with no lock at all.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::checkpoint::{self, file_len};
use crate::error::{Error, Result};
use crate::format::{
    encode_pack_header, encode_pack_record, Mutation, PACK_HEADER_LEN, PACK_RECORD_HEADER_LEN,
};
use crate::gc::{is_pack, DroppedBytes, GcCounts};
use crate::log::sync_dir;
use crate::state::{data_path, pack_path, IntMap, Loc, Pack, SharedIndex, State, PACK_BIT};
use crate::store::PageStore;
use crate::types::{to_nanos, Ino, Lsn, TimelineId, PAGE_SIZE};

/// How much one write-locked step of GC looks at, in inodes (or parts of one) and pages: the
/// lock is let go between batches.
const GC_BATCH_LOOKS: usize = 256;
const GC_BATCH_PAGES: usize = 4096;

/// What [`PageStore::gc`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Inodes freed because nothing could reach them: unlinked while open, and the process
    /// ended before the last close (see [`PageStore::gc`]).
    pub orphans_freed: u64,
    /// The oldest position a branch may still start at: every version at or after it was
    /// kept, and the newest one before it.
    pub horizon: Lsn,
    pub versions_dropped: u64,
    /// Inodes whose every version left a timeline's index.
    pub inodes_dropped: u64,
    /// Versions (attributes, pages, directory entries) left in the index, as of the copy GC
    /// walked.
    pub index_versions: u64,
    /// The longest time one step held the state's write lock: the orphans, a batch of
    /// changes, the timelines' byte counts.
    pub lock_held: Duration,
    /// How long taking the shared copy of the index held the read lock.
    pub read_lock_held: Duration,
    /// The most attribute versions one inode had: a write to it copies them while a shared
    /// copy of the index is alive.
    pub longest_attrs: u64,
}

/// One data file (log segment or pack) as maintenance found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataFileReport {
    pub path: PathBuf,
    pub bytes: u64,
    /// Bytes of pages the index still references.
    pub live_bytes: u64,
    /// Whether this run compacted it away.
    pub compacted: bool,
}

/// What [`PageStore::maintain`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MaintenanceReport {
    pub gc: GcReport,
    /// Every sealed data file, with its live bytes before compaction.
    pub files: Vec<DataFileReport>,
    pub files_compacted: usize,
    pub pages_moved: u64,
    /// The new pack the live pages went to, if any.
    pub pack: Option<PathBuf>,
    /// Bytes of the store's files (segments, packs, checkpoint) before and after.
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// The checkpoint written, if one was.
    pub checkpoint: Option<Lsn>,
    /// The longest time one step held the state's write lock.
    pub longest_lock: Duration,
    /// The longest time one step held the read lock (the walks of the index and the
    /// checkpoint's copy of it): writers wait that long, and readers behind a waiting writer.
    pub longest_read_lock: Duration,
    pub elapsed: Duration,
}

/// Where [`PageStore::maintain_until`] stops: after this step, as a crash there would. For
/// crash tests.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum MaintenanceStep {
    /// The index was collected (memory only).
    Gc,
    /// The new pack is written and fsynced; the index still points at the old files.
    PackWritten,
    /// The index points at the pack (memory only); no checkpoint says so yet.
    Switched,
    /// The checkpoint is durable; the old files are still there.
    Checkpointed,
    /// Everything.
    Done,
}

/// One page version to move: where it is in the index, and where its bytes are.
struct Move {
    tl: TimelineId,
    ino: Ino,
    page: u64,
    lsn: Lsn,
    file: u32,
    off: u64,
}

/// A file chosen for compaction.
struct Victim {
    path: PathBuf,
    file: Arc<File>,
    len: u64,
}

/// What compaction chooses from ([`PageStore::compaction_view`]).
struct CompactionView {
    shared: SharedIndex,
    /// Live page bytes per data file, counted on `shared`.
    live: IntMap<u32, u64>,
    /// The active segment's number and length, and the log's segment size.
    active: u32,
    active_len: u64,
    segment_size: u64,
    /// The sealed segments and the packs: id, path, file.
    files: Vec<(u32, PathBuf, Arc<File>)>,
    next_pack: u32,
}

impl PageStore {
    /// Drops from the index every version that no branch point can reach: older than the
    /// retention window and shadowed at every live child's branch point (see `gc.rs`).
    /// Memory only (but for the orphans below); [`PageStore::maintain`] also makes the result
    /// durable and gives the disk space back. Afterwards a branch at a position before the
    /// horizon is refused.
    ///
    /// First it frees the inodes left with no link and no open handle by a restart (unlinked
    /// while open, the process gone before the last close): one `FreeInode` frame each.
    pub fn gc(&self) -> Result<GcReport> {
        let _m = self.maintenance.lock();
        self.gc_locked()
    }

    fn gc_locked(&self) -> Result<GcReport> {
        // The orphans and the horizon, under the write lock (O(inodes)). From here on no
        // branch may start below the horizon, so what the plan finds unreachable stays so.
        let (orphans_freed, horizon, mut lock_held) = {
            let mut st = self.state.write();
            let t = Instant::now();
            let orphans_freed = self.free_orphans(&mut st)?;
            let horizon = self.retention_horizon(&st);
            st.gc_horizon = st.gc_horizon.max(horizon);
            (orphans_freed, horizon, t.elapsed())
        };
        // The walk of every version, on a shared copy with no lock held; then the changes, in
        // batches under the write lock, each O(what it looks at).
        let (shared, read_lock_held) = {
            let st = self.state.read();
            let t = Instant::now();
            (st.share_index(), t.elapsed())
        };
        let plan = crate::gc::plan(&shared, horizon);
        drop(shared);
        let mut counts = GcCounts::default();
        let mut dropped = DroppedBytes::default();
        for batch in crate::gc::batches(&plan.looks, GC_BATCH_LOOKS, GC_BATCH_PAGES) {
            let mut st = self.state.write();
            let t = Instant::now();
            st.gc_apply(batch, horizon, &mut counts, &mut dropped);
            lock_held = lock_held.max(t.elapsed());
            // Handed to whoever waits (a compute's write, a branch) before the next batch.
            parking_lot::RwLockWriteGuard::unlock_fair(st);
        }
        {
            let mut st = self.state.write();
            let t = Instant::now();
            st.gc_finish(&plan, &dropped);
            lock_held = lock_held.max(t.elapsed());
        }
        Ok(GcReport {
            orphans_freed,
            horizon,
            versions_dropped: counts.versions_dropped,
            inodes_dropped: counts.inodes_dropped,
            index_versions: plan.versions.saturating_sub(counts.versions_dropped),
            lock_held,
            read_lock_held,
            longest_attrs: plan.longest_attrs,
        })
    }

    /// Frees the inodes of a timeline's own level that have no link and no open handle: an
    /// inode unlinked while open whose process ended before the last close (the handle
    /// counts live in memory only). While the store runs, such an inode is freed as its last
    /// handle goes, under the same write lock this runs under, so none is ever in between.
    /// One `FreeInode` frame each; GC then drops its versions once out of the window.
    fn free_orphans(&self, st: &mut State) -> Result<u64> {
        let mut orphans = Vec::new();
        for t in st.timelines.values() {
            for (ino, ii) in &t.inodes {
                let unlinked = matches!(ii.attrs.last(), Some((_, Some(a))) if a.nlink == 0);
                if unlinked && !st.open_counts.contains_key(&(t.id, *ino)) {
                    orphans.push((t.id, *ino));
                }
            }
        }
        orphans.sort_unstable();
        for (tl, ino) in &orphans {
            self.commit(st, *tl, &[Mutation::FreeInode { ino: *ino }])?;
            tracing::info!(timeline = %tl, ino, "freed an inode unlinked while open before a restart");
        }
        Ok(orphans.len() as u64)
    }

    /// The oldest position [`PageStore::branch`] accepts now: the first frame of the
    /// retention window by the time index (the same test `branch` makes), never before an
    /// earlier GC's.
    pub(crate) fn retention_horizon(&self, st: &State) -> Lsn {
        let now_ns = to_nanos(self.config.clock.now()).max(st.last_time_ns);
        let horizon_ns = now_ns.saturating_sub(st.time_index.retention_ns);
        let g = st.time_index.granularity_ns;
        let e = &st.time_index.entries;
        let i = e.partition_point(|(t, _)| t.saturating_add(g) < horizon_ns);
        let h = e.get(i).map_or(st.next_lsn, |(_, l)| *l);
        h.max(st.gc_horizon)
    }

    /// Writes a checkpoint of the index (see `checkpoint.rs`), after making the log durable up
    /// to it, and removes the older ones. Returns its position.
    pub fn checkpoint(&self) -> Result<Lsn> {
        let _m = self.maintenance.lock();
        self.checkpoint_locked().map(|(lsn, _)| lsn)
    }

    /// [`PageStore::checkpoint`]; also returns how long the copy held the read lock.
    fn checkpoint_locked(&self) -> Result<(Lsn, Duration)> {
        self.check_writable()?;
        // Copied under the read lock (writers wait, and readers that come after a waiting
        // writer), sharing every inode: O(inodes); encoded and written without it.
        let (snap, appended, copied) = {
            let st = self.state.read();
            let t = Instant::now();
            let snap = checkpoint::snapshot(&st);
            (snap, st.log.appended, t.elapsed())
        };
        let (lsn, bytes) = checkpoint::encode(&snap)?;
        let objects_known = snap.next_object;
        drop(snap);
        // The checkpoint must never cover frames a power loss could still take away.
        self.sync()?;
        let dir = checkpoint::checkpoint_dir(&self.dir);
        checkpoint::write(&dir, lsn, &bytes)?;
        checkpoint::remove_all_but(&dir, lsn)?;
        *self.checkpointed_at.lock() = appended;
        tracing::info!(
            lsn,
            bytes = bytes.len(),
            copy_ms = copied.as_secs_f64() * 1000.0,
            "wrote an index checkpoint"
        );
        // Only now may objects GC stopped naming go: a restart replays the log from this
        // checkpoint, which names none of them.
        self.sweep_objects(objects_known)?;
        Ok((lsn, copied))
    }

    /// A shared copy of the index with the log's state and the sealed data files, taken
    /// together under the read lock, and the live bytes per file counted on the copy after.
    fn compaction_view(&self, r: &mut MaintenanceReport) -> CompactionView {
        let (shared, active, active_len, segment_size, files, next_pack) = {
            let st = self.state.read();
            let t = Instant::now();
            let shared = st.share_index();
            let active = st.log.active().no;
            let files: Vec<(u32, PathBuf, Arc<File>)> = st
                .log
                .segments
                .iter()
                .filter(|s| s.no != active)
                .map(|s| (s.no, s.path.clone(), s.file.clone()))
                .chain(
                    st.packs
                        .values()
                        .map(|p| (p.no | PACK_BIT, p.path.clone(), p.file.clone())),
                )
                .collect();
            r.longest_read_lock = r.longest_read_lock.max(t.elapsed());
            (
                shared,
                active,
                st.log.active_len,
                st.log.segment_size,
                files,
                st.next_pack,
            )
        };
        let live = shared.live_bytes();
        CompactionView {
            shared,
            live,
            active,
            active_len,
            segment_size,
            files,
            next_pack,
        }
    }

    /// Bytes of the store's files: log segments, packs and checkpoints.
    pub fn disk_bytes(&self) -> Result<u64> {
        let mut total = 0u64;
        for sub in ["log", "pack", "checkpoint"] {
            let dir = self.dir.join(sub);
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io("listing the store's files", &dir)(e)),
            };
            for entry in entries {
                let entry = entry.map_err(Error::io("listing the store's files", &dir))?;
                match entry.metadata() {
                    Ok(m) => total += m.len(),
                    // Removed by a concurrent compaction.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::io("measuring a store file", entry.path())(e)),
                }
            }
        }
        Ok(total)
    }

    /// Versions held by the index (attributes, pages, directory entries of every timeline):
    /// what its memory grows with.
    pub fn index_versions(&self) -> u64 {
        self.state.read().index_versions()
    }

    /// GC, then compaction of the sealed data files whose live bytes are below
    /// `Config::compact_below` of their size, then a checkpoint, then the deletion of the
    /// compacted files. Safe to interrupt anywhere (see the crash table in the design doc).
    pub fn maintain(&self) -> Result<MaintenanceReport> {
        self.maintain_until(MaintenanceStep::Done)
    }

    /// [`PageStore::maintain`], stopped after `stop` as a crash there would stop it.
    #[doc(hidden)]
    pub fn maintain_until(&self, stop: MaintenanceStep) -> Result<MaintenanceReport> {
        self.check_writable()?;
        let _m = self.maintenance.lock();
        let started = Instant::now();
        let mut r = MaintenanceReport {
            bytes_before: self.disk_bytes()?,
            ..MaintenanceReport::default()
        };
        r.gc = self.gc_locked()?;
        r.longest_lock = r.gc.lock_held;
        r.longest_read_lock = r.gc.read_lock_held;
        if stop == MaintenanceStep::Gc {
            return Ok(r);
        }

        // The active segment is never compacted; when most of it is garbage (a deleted
        // branch's writes), seal it so that this run can. The walks of every page version
        // run on a shared copy of the index with no lock held (see `SharedIndex`): one copy,
        // and a second only after a roll, whose copy must see the newly sealed segment's
        // last pages. Nothing new ever points into a sealed file, so the list of pages to
        // move taken from the copy stays complete until the switch.
        let mut view = self.compaction_view(&mut r);
        let active_live = view.live.get(&view.active).copied().unwrap_or(0);
        let roll = view.active_len >= view.segment_size / 4
            && (active_live as f64) < self.config.compact_below * view.active_len as f64;
        if roll {
            {
                let mut st = self.state.write();
                let t = Instant::now();
                let next = st.next_lsn;
                let mark = st.log.roll(next).inspect_err(|e| self.poison(e))?;
                self.note_roll(&st, mark);
                r.longest_lock = r.longest_lock.max(t.elapsed());
            }
            view = self.compaction_view(&mut r);
        }
        let CompactionView {
            shared,
            live,
            files,
            next_pack: pack_no,
            ..
        } = view;
        let mut victims: IntMap<u32, Victim> = IntMap::default();
        for (id, path, file) in files {
            let len = file_len(&file);
            let live_bytes = live.get(&id).copied().unwrap_or(0);
            let compact = (live_bytes as f64) < self.config.compact_below * len as f64;
            r.files.push(DataFileReport {
                path: path.clone(),
                bytes: len,
                live_bytes,
                compacted: compact,
            });
            if compact {
                victims.insert(id, Victim { path, file, len });
            }
        }
        let mut moves = Vec::new();
        if !victims.is_empty() {
            crate::gc::data_locs(shared.inodes(), |tl, ino, page, lsn, file, off| {
                if victims.contains_key(&file) {
                    moves.push(Move {
                        tl,
                        ino,
                        page,
                        lsn,
                        file,
                        off,
                    });
                }
            });
        }
        // Before the switch's write lock: no inode is shared any more.
        drop(shared);
        r.files_compacted = victims.len();

        // Copy the live pages into a new pack, with no lock held.
        let mut new_locs = Vec::new();
        let mut pack = None;
        if !moves.is_empty() {
            moves.sort_unstable_by_key(|m| (m.file, m.off));
            let next_lsn = self.state.read().next_lsn;
            let (p, locs) = self.write_pack(pack_no, next_lsn, &moves, &victims)?;
            r.pack = Some(p.path.clone());
            r.pages_moved = moves.len() as u64;
            new_locs = locs;
            pack = Some(p);
        }
        if stop == MaintenanceStep::PackWritten {
            return Ok(r);
        }

        // Switch the index to the pack: the only step of the copy under the write lock.
        if let Some(p) = pack {
            let mut st = self.state.write();
            let t = Instant::now();
            let id = p.no | PACK_BIT;
            st.next_pack = st.next_pack.max(p.no + 1);
            st.packs.insert(p.no, p);
            let mut switched = 0u64;
            for (m, off) in moves.iter().zip(&new_locs) {
                let from = Loc::Data {
                    file: m.file,
                    off: m.off,
                };
                let to = Loc::Data {
                    file: id,
                    off: *off,
                };
                if st.relocate(m.tl, m.ino, m.page, m.lsn, from, to) {
                    switched += 1;
                }
            }
            // Its entries name the old locations.
            st.ancestor_cache.clear();
            r.longest_lock = r.longest_lock.max(t.elapsed());
            tracing::debug!(pages = switched, "switched the index to the new pack");
        }
        if stop == MaintenanceStep::Switched {
            return Ok(r);
        }

        let grew = self.state.read().log.appended - *self.checkpointed_at.lock();
        if !victims.is_empty() || r.gc.versions_dropped > 0 || grew >= self.config.checkpoint_every
        {
            let (lsn, copied) = self.checkpoint_locked()?;
            r.checkpoint = Some(lsn);
            r.longest_read_lock = r.longest_read_lock.max(copied);
        }
        if stop == MaintenanceStep::Checkpointed {
            return Ok(r);
        }

        // Only now, with a durable checkpoint that no longer needs them, the old files go.
        // Readers that resolved a location in one before the switch hold its `Arc<File>`, and
        // an unlinked file stays readable while open.
        if !victims.is_empty() {
            let still = {
                let shared = {
                    let st = self.state.read();
                    let t = Instant::now();
                    let shared = st.share_index();
                    r.longest_read_lock = r.longest_read_lock.max(t.elapsed());
                    shared
                };
                let refs = shared.referenced_files();
                victims
                    .keys()
                    .copied()
                    .filter(|id| refs.contains(id))
                    .collect::<BTreeSet<u32>>()
            };
            if !still.is_empty() {
                // A bug, but not one to lose data over: keep those files.
                tracing::error!(files = ?still, "compacted files are still referenced; keeping them");
            }
            {
                let mut st = self.state.write();
                let t = Instant::now();
                let gone = |id: u32| victims.contains_key(&id) && !still.contains(&id);
                st.log.segments.retain(|s| !gone(s.no));
                st.packs.retain(|no, _| !gone(no | PACK_BIT));
                let freed: u64 = victims
                    .iter()
                    .filter(|(id, _)| !is_pack(**id) && gone(**id))
                    .map(|(_, v)| v.len)
                    .sum();
                st.log.total_bytes = st.log.total_bytes.saturating_sub(freed);
                r.longest_lock = r.longest_lock.max(t.elapsed());
            }
            let mut dirs = BTreeSet::new();
            for (id, v) in victims.iter().filter(|(id, _)| !still.contains(id)) {
                match std::fs::remove_file(&v.path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::io("removing a compacted data file", &v.path)(e)),
                }
                dirs.insert(if is_pack(*id) { "pack" } else { "log" });
            }
            for d in dirs {
                sync_dir(&self.dir.join(d))?;
            }
        }
        r.bytes_after = self.disk_bytes()?;
        r.elapsed = started.elapsed();
        tracing::info!(
            horizon = r.gc.horizon,
            versions_dropped = r.gc.versions_dropped,
            inodes_dropped = r.gc.inodes_dropped,
            index_versions = r.gc.index_versions,
            longest_attrs = r.gc.longest_attrs,
            files_compacted = r.files_compacted,
            pages_moved = r.pages_moved,
            bytes_before = r.bytes_before,
            bytes_after = r.bytes_after,
            checkpoint = r.checkpoint,
            longest_lock_ms = r.longest_lock.as_secs_f64() * 1000.0,
            longest_read_lock_ms = r.longest_read_lock.as_secs_f64() * 1000.0,
            elapsed_ms = r.elapsed.as_millis() as u64,
            "page store maintenance done"
        );
        Ok(r)
    }

    /// Writes pack `no` with the pages of `moves` (sorted by their current location), fsynced
    /// with its directory entry. Returns it and the new offset of each move's page.
    fn write_pack(
        &self,
        no: u32,
        next_lsn: Lsn,
        moves: &[Move],
        victims: &IntMap<u32, Victim>,
    ) -> Result<(Pack, Vec<u64>)> {
        let pack_dir = self.dir.join("pack");
        std::fs::create_dir_all(&pack_dir)
            .map_err(Error::io("creating the pack directory", &pack_dir))?;
        let path = pack_path(&pack_dir, no);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(Error::io("creating a pack file", &path))?;
        let result = fill_pack(&file, &path, no, next_lsn, moves, victims);
        let locs = match result {
            Ok(locs) => locs,
            Err(e) => {
                // Unreferenced: a reopen would remove it too.
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
        };
        sync_dir(&pack_dir)?;
        Ok((
            Pack {
                no,
                path,
                file: Arc::new(file),
            },
            locs,
        ))
    }
}

fn fill_pack(
    file: &File,
    path: &Path,
    no: u32,
    next_lsn: Lsn,
    moves: &[Move],
    victims: &IntMap<u32, Victim>,
) -> Result<Vec<u64>> {
    const BATCH: usize = 1 << 20;
    file.write_all_at(&encode_pack_header(no, next_lsn), 0)
        .map_err(Error::io("writing a pack header", path))?;
    let mut pos = PACK_HEADER_LEN as u64;
    let mut buf = Vec::with_capacity(BATCH + PAGE_SIZE + PACK_RECORD_HEADER_LEN);
    let mut page = vec![0u8; PAGE_SIZE];
    let mut locs = Vec::with_capacity(moves.len());
    let mut buf_start = pos;
    for m in moves {
        let v = victims.get(&m.file).ok_or_else(|| Error::Corrupt {
            path: data_path(path.parent().and_then(Path::parent).unwrap_or(path), m.file),
            offset: m.off,
            reason: "bug: a page to move is not in a file being compacted".into(),
        })?;
        v.file
            .read_exact_at(&mut page, m.off)
            .map_err(Error::io("reading a page to compact", &v.path))?;
        locs.push(pos + PACK_RECORD_HEADER_LEN as u64);
        encode_pack_record(m.ino, m.page, m.lsn, &page, &mut buf);
        pos += (PACK_RECORD_HEADER_LEN + PAGE_SIZE) as u64;
        if buf.len() >= BATCH {
            file.write_all_at(&buf, buf_start)
                .map_err(Error::io("writing a pack file", path))?;
            buf.clear();
            buf_start = pos;
        }
    }
    file.write_all_at(&buf, buf_start)
        .and_then(|()| file.sync_all())
        .map_err(Error::io("writing a pack file", path))?;
    Ok(locs)
}
