//! [`PageStore`]: the filesystem operations, branching and durability on top of the log and
//! the index.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use nix::fcntl::{Flock, FlockArg};
use parking_lot::{Mutex, RwLock};

use crate::buffer::WriteBuffer;
use crate::checkpoint;
use crate::error::{Error, Result};
use crate::external;
use crate::format::{
    decode_pack_header, encode_frame, Mutation, SegmentHeader, FRAME_HEADER_LEN,
    MAX_PAGES_PER_FRAME, PACK_HEADER_LEN, SEGMENT_HEADER_LEN,
};
use crate::log::{
    self, create_segment, open_rw, scan_segment, segment_path, DurableMark, LogWriter, Segment,
};
use crate::state::{data_path, pack_path, IntMap, Loc, Pack, State, TimeIndex, Timeline, View};
use crate::types::*;

/// Where the store gets the time from. Tests substitute a fake clock to exercise point-in-time
/// branching and the retention window deterministically.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> SystemTime + Send + Sync>);

impl Clock {
    pub fn system() -> Self {
        Clock(Arc::new(SystemTime::now))
    }

    pub fn new(f: impl Fn() -> SystemTime + Send + Sync + 'static) -> Self {
        Clock(Arc::new(f))
    }

    pub fn now(&self) -> SystemTime {
        (self.0)()
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Clock")
    }
}

/// Settings of a store. `Config::default()` is what production uses.
#[derive(Debug, Clone)]
pub struct Config {
    /// A segment is closed (fsynced whole) and a new one started once it would grow past this.
    pub segment_size: u64,
    /// How far back a branch can be taken (by time or position).
    pub retention: Duration,
    /// Precision of the position ↔ time map: one entry per this much time, so the map holds at
    /// most `retention / time_granularity` entries. A branch at a moment includes every change
    /// committed at least this long before it, and maybe later ones up to that moment.
    pub time_granularity: Duration,
    pub clock: Clock,
    /// Compaction rewrites a sealed segment or a pack whose live page bytes are below this
    /// fraction of its size (see [`PageStore::maintain`]).
    pub compact_below: f64,
    /// [`PageStore::maintain`] writes an index checkpoint when it changed anything, or when
    /// the log grew by this much since the last one (which bounds the replay at open).
    pub checkpoint_every: u64,
    /// Most bytes of page overwrites kept in memory until their file is synced (the write
    /// buffer, see `buffer.rs`); 0 commits every write at once. Past this a writer commits the
    /// oldest files itself; [`PageStore::flush_buffered`] is the background's way.
    pub write_buffer: usize,
    /// Bytes of zeros kept written ahead of the log's end (0: none), so that fsyncs after
    /// appends do not also commit the file's growth.
    pub log_zero_ahead: u64,
    /// Zeros are written ahead (and segments prepared, see
    /// [`PageStore::prepare_log_segment`]) only while the log is fsynced at least once per
    /// this many bytes appended: small commits, where the saved inode write is much of an
    /// fsync. A bulk load (few fsyncs, many bytes) would only pay twice the writes.
    /// `u64::MAX`: whatever the rate.
    pub log_zero_ahead_bytes_per_sync: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            segment_size: 256 << 20,
            retention: Duration::from_secs(7 * 24 * 3600),
            time_granularity: Duration::from_secs(1),
            clock: Clock::system(),
            compact_below: 0.5,
            checkpoint_every: 64 << 20,
            write_buffer: 0,
            log_zero_ahead: 0,
            log_zero_ahead_bytes_per_sync: 256 << 10,
        }
    }
}

/// The page store: one filesystem per timeline over one append-only log. See the crate docs.
///
/// All methods take `&self` and may be called from many threads: reads share a lock and do
/// their disk reads outside it; changes are serialized by the same lock (an append to the log
/// and an index update each); [`PageStore::sync`] runs outside it and merges concurrent callers
/// into one fsync (group commit).
pub struct PageStore {
    pub(crate) dir: PathBuf,
    pub(crate) config: Config,
    pub(crate) state: RwLock<State>,
    /// The last position replayed at open.
    recovered_lsn: Lsn,
    /// Held while an fsync runs, so that callers queue behind it and then find their changes
    /// already durable.
    sync_serial: Mutex<()>,
    pub(crate) durable: Mutex<DurableMark>,
    /// The end of the log as of the last commit, kept apart from the state lock so that an
    /// fsync never waits for a writer holding it (a writer's `pwrite` can block on the disk).
    log_end: Mutex<LogEnd>,
    /// Set when an fsync (or an append) failed: after a failed fsync the kernel may have dropped
    /// the dirty pages, so the only safe way on is to reopen and trust the log.
    poisoned: AtomicBool,
    /// One GC, compaction or checkpoint at a time.
    pub(crate) maintenance: Mutex<()>,
    /// `LogWriter::appended` when the last checkpoint was taken.
    pub(crate) checkpointed_at: Mutex<u64>,
    /// Page overwrites not yet committed (lock order: `state`, then this).
    buffer: Mutex<WriteBuffer>,
    /// fdatasyncs of the log (the writer's `syncs`: it zeroes ahead only under frequent ones).
    log_syncs: Arc<AtomicU64>,
    /// The last frame that changed each file (its pages or attributes), so that an fsync of
    /// one file waits only until that frame is durable, not for whatever other files appended
    /// after it (lock order: `state`, then this). A file missing here (none of its changes
    /// made since the store was opened, or the table was cleared) waits for the whole log.
    file_commits: Mutex<HashMap<(TimelineId, Ino), Lsn>>,
    /// Held while a segment is prepared ([`PageStore::prepare_log_segment`]): one at a time.
    preparing: Mutex<()>,
    /// How far the log's cached pages have been let go ([`log::drop_cached`]): segment and
    /// offset.
    uncached: Mutex<(u32, u64)>,
    /// Open object files of external files, by object number (see `external.rs`).
    pub(crate) object_files: Mutex<IntMap<u64, Arc<File>>>,
    /// Held while a branch copies an external file into an object of its own: one at a time,
    /// so that two writers never both copy.
    pub(crate) materializing: Mutex<()>,
    /// Ends and sizes of external files found by fsyncs and not committed yet (lock order:
    /// `state`, then this); the next commit of any frame commits them first.
    pub(crate) pending_extents: Mutex<HashMap<(TimelineId, Ino), external::PendingExtent>>,
    /// Numbers the fsyncs of external files, so that the later of two concurrent ones wins.
    pub(crate) extent_seq: AtomicU64,
    /// What the last fsync of each external file found (object, end, checksum of the last
    /// page, size): an fsync that finds the same notes nothing.
    pub(crate) last_noted: Mutex<HashMap<(TimelineId, Ino), external::Noted>>,
    /// Attached live directories, by timeline (see `live.rs`; lock order: `state`, then this).
    pub(crate) live: Mutex<crate::live::LiveDirs>,
    /// Whether any live directory was ever attached: commits skip the `live` lock until then.
    pub(crate) live_attached: AtomicBool,
    _lock: Flock<File>,
}

impl fmt::Debug for PageStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageStore")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// Where the log ends: what an fsync started now makes durable.
struct LogEnd {
    file: Arc<File>,
    path: PathBuf,
    mark: DurableMark,
}

fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|x| *x == 0)
}

fn check_name(name: &[u8]) -> Result<()> {
    if name.len() > MAX_NAME_LEN {
        return Err(Error::NameTooLong {
            len: name.len(),
            max: MAX_NAME_LEN,
        });
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(Error::InvalidArgument(format!(
            "{:?} is not a valid file name",
            String::from_utf8_lossy(name)
        )));
    }
    Ok(())
}

/// Whether bytes `from..to` of `file` are all zeros (the log's zeroed-ahead tail).
fn zeros_from(file: &File, from: u64, to: u64) -> bool {
    let mut buf = vec![0u8; 1 << 16];
    let mut pos = from;
    while pos < to {
        let n = (to - pos).min(buf.len() as u64) as usize;
        if file.read_exact_at(&mut buf[..n], pos).is_err() || buf[..n].iter().any(|b| *b != 0) {
            return false;
        }
        pos += n as u64;
    }
    true
}

pub(crate) fn timeline(st: &State, tl: TimelineId) -> Result<&Timeline> {
    st.timelines.get(&tl).ok_or(Error::TimelineNotFound(tl))
}

fn not_found(tl: TimelineId, what: String) -> Error {
    Error::NotFound { timeline: tl, what }
}

fn attr_of(v: &View<'_>, tl: TimelineId, ino: Ino) -> Result<Attr> {
    v.attr(ino)
        .ok_or_else(|| not_found(tl, format!("inode {ino}")))
}

fn dir_attr(v: &View<'_>, tl: TimelineId, ino: Ino) -> Result<Attr> {
    let a = attr_of(v, tl, ino)?;
    if a.kind != FileKind::Directory {
        return Err(Error::NotADirectory { timeline: tl, ino });
    }
    Ok(a)
}

fn regular_attr(v: &View<'_>, tl: TimelineId, ino: Ino) -> Result<Attr> {
    let a = attr_of(v, tl, ino)?;
    match a.kind {
        FileKind::Regular => Ok(a),
        FileKind::Directory => Err(Error::IsADirectory { timeline: tl, ino }),
        FileKind::Symlink => Err(Error::InvalidArgument(format!("inode {ino} is a symlink"))),
    }
}

fn name_str(name: &[u8]) -> Cow<'_, str> {
    String::from_utf8_lossy(name)
}

impl PageStore {
    /// Opens (or creates) the store in `dir`, replaying the log. A torn tail left by a crash is
    /// cut off; damage anywhere else is reported as corruption and nothing is changed.
    pub fn open(dir: &Path, config: Config) -> Result<Self> {
        let started = Instant::now();
        let log_dir = dir.join("log");
        std::fs::create_dir_all(&log_dir)
            .map_err(Error::io("creating page store directory", &log_dir))?;
        let lock_path = dir.join("LOCK");
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(Error::io("opening lock file", &lock_path))?;
        let lock = match Flock::lock(lock_file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                return Err(Error::Locked(dir.to_path_buf()))
            }
            Err((_, e)) => {
                return Err(Error::Io {
                    context: "locking page store",
                    path: lock_path,
                    source: e.into(),
                })
            }
        };

        let mut nums = Vec::new();
        for entry in
            std::fs::read_dir(&log_dir).map_err(Error::io("listing log segments", &log_dir))?
        {
            let entry = entry.map_err(Error::io("listing log segments", &log_dir))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if let Some(n) = name
                .strip_suffix(".seg")
                .and_then(|n| n.parse::<u32>().ok())
            {
                nums.push(n);
            } else if name.ends_with(log::PREPARED_SUFFIX) {
                // Prepared ahead of need and never rolled into: not part of the log.
                let path = entry.path();
                std::fs::remove_file(&path)
                    .map_err(Error::io("removing a prepared log segment", &path))?;
            }
        }
        nums.sort_unstable();

        // The newest checkpoint holds the index up to its position; only the log after it is
        // replayed. Damage in it is corruption (it was fsynced whole under a temporary name
        // before the rename), not a reason to fall back to an older one: compaction may have
        // deleted what the older one needs.
        let ckpt_dir = checkpoint::checkpoint_dir(dir);
        let (ckpts, _) = checkpoint::list(&ckpt_dir)?;
        let snap = match ckpts.last() {
            Some((lsn, path)) => Some(checkpoint::load(path, *lsn)?),
            None => None,
        };
        let ckpt_lsn = ckpts.last().map(|(l, _)| *l);
        let ckpt_pos = snap.as_ref().map(|s| (s.log_seg, s.log_off));
        // Segments from the checkpoint's on are the log to replay and are numbered without
        // gaps; those before it only hold pages (their frames are in the checkpoint), and
        // compaction deletes them one by one.
        let replay_from = match ckpt_pos {
            None => 0,
            Some((seg, _)) => {
                nums.iter()
                    .position(|n| *n == seg)
                    .ok_or_else(|| Error::Corrupt {
                        path: segment_path(&log_dir, seg),
                        offset: 0,
                        reason: "the index checkpoint says the log goes on in this segment, which is missing".into(),
                    })?
            }
        };
        for w in nums[replay_from..].windows(2) {
            if w[1] != w[0] + 1 {
                return Err(Error::Corrupt {
                    path: segment_path(&log_dir, w[0] + 1),
                    offset: 0,
                    reason: "log segment missing (segments must be numbered without gaps)".into(),
                });
            }
        }

        let mut st = State {
            dir: dir.to_path_buf(),
            timelines: IntMap::default(),
            ancestor_cache: Default::default(),
            next_lsn: 1,
            next_ino: ROOT_INO + 1,
            last_time_ns: i64::MIN,
            log: LogWriter {
                dir: log_dir.clone(),
                segments: Vec::new(),
                active_len: 0,
                behind: 0,
                segment_size: config.segment_size.max(1 << 16),
                total_bytes: 0,
                appended: 0,
                zero_ahead: config.log_zero_ahead,
                zero_bytes_per_sync: config.log_zero_ahead_bytes_per_sync,
                zeroed_to: 0,
                syncs: Arc::new(AtomicU64::new(0)),
                zero_check: (0, 0),
                zeroing: false,
                prepared: Arc::new(Mutex::new(None)),
            },
            time_index: TimeIndex {
                entries: Vec::new(),
                granularity_ns: to_nanos_dur(config.time_granularity),
                retention_ns: to_nanos_dur(config.retention),
            },
            open_counts: HashMap::new(),
            gc_horizon: 0,
            packs: BTreeMap::new(),
            next_pack: 0,
            objects: IntMap::default(),
            next_object: 1,
            pending_objects: HashSet::new(),
        };
        if let Some(snap) = snap {
            st.next_lsn = snap.next_lsn;
            st.next_ino = snap.next_ino;
            st.last_time_ns = snap.last_time_ns;
            st.gc_horizon = snap.gc_horizon;
            st.time_index.entries = snap.time_entries;
            st.next_object = snap.next_object;
            for t in snap.timelines {
                st.timelines.insert(t.id, t);
            }
            for (tl, ino, versions) in snap.externals {
                if let Some(t) = st.timelines.get_mut(&tl) {
                    Arc::make_mut(t.inodes.entry(ino).or_default()).external = versions;
                }
            }
            external::rebuild_objects(&mut st);
        }

        let mut segments: Vec<Segment> = Vec::new();
        let mut active_len = 0u64;
        let mut total = 0u64;
        let mut frames = 0u64;
        // Bytes of log no checkpoint covers: the first maintenance checkpoints when they are
        // many, so that the next open does not replay them again.
        let mut replayed = 0u64;
        for &no in &nums[..replay_from] {
            let path = segment_path(&log_dir, no);
            let file = open_rw(&path)?;
            total += checkpoint::file_len(&file);
            segments.push(Segment {
                no,
                path,
                file: Arc::new(file),
            });
        }
        for (i, &no) in nums.iter().enumerate().skip(replay_from) {
            let last = i + 1 == nums.len();
            let resume = ckpt_pos.filter(|(seg, _)| *seg == no).map(|(_, off)| off);
            let path = segment_path(&log_dir, no);
            let file = open_rw(&path)?;
            let file_len = file
                .metadata()
                .map_err(Error::io("reading log segment size", &path))?
                .len();
            let mut hb = [0u8; SEGMENT_HEADER_LEN];
            let header = if file_len >= SEGMENT_HEADER_LEN as u64 {
                file.read_exact_at(&mut hb, 0)
                    .map_err(Error::io("reading log segment header", &path))?;
                SegmentHeader::decode(&hb)
            } else {
                Err("shorter than a segment header".to_string())
            };
            let header = match header {
                Ok(h) => h,
                Err(reason)
                    if last && resume.is_none() && file_len <= SEGMENT_HEADER_LEN as u64 =>
                {
                    // A crash while creating the segment: it never held a frame.
                    tracing::warn!(path = %path.display(), %reason, "removing a log segment whose creation was cut off");
                    std::fs::remove_file(&path)
                        .map_err(Error::io("removing unfinished log segment", &path))?;
                    log::sync_dir(&log_dir)?;
                    break;
                }
                Err(reason) => {
                    return Err(Error::Corrupt {
                        path,
                        offset: 0,
                        reason,
                    })
                }
            };
            // The checkpoint's segment started at or before the checkpoint's position.
            let header_ok = header.seg_no == no
                && match resume {
                    Some(_) => header.first_lsn <= st.next_lsn,
                    None => header.first_lsn == st.next_lsn,
                };
            if !header_ok {
                return Err(Error::Corrupt {
                    path,
                    offset: 0,
                    reason: format!(
                        "segment header says segment {} from position {}, expected segment {no} from position {}",
                        header.seg_no, header.first_lsn, st.next_lsn
                    ),
                });
            }
            let mut expected = st.next_lsn;
            let end = scan_segment(
                &path,
                &file,
                resume.unwrap_or(0),
                &mut expected,
                |off, len, body| {
                    frames += 1;
                    st.apply_frame(no, off, len, body)
                        .map_err(|reason| Error::Corrupt {
                            path: path.clone(),
                            offset: off,
                            reason,
                        })
                },
            )?;
            if let Some(reason) = end.damage {
                if !last {
                    return Err(Error::Corrupt {
                        path,
                        offset: end.valid_len,
                        reason: format!("{reason} in a segment that was complete"),
                    });
                }
                // Zeros ahead of the last frame (a prepared segment is zeros to its end: look
                // at the first few MiB only, this decides no more than the message).
                let look = end.file_len.min(end.valid_len + (4 << 20));
                if zeros_from(&file, end.valid_len, look) {
                    tracing::debug!(
                        path = %path.display(),
                        offset = end.valid_len,
                        "cutting the zeros written ahead of the log"
                    );
                } else {
                    tracing::warn!(
                        path = %path.display(),
                        offset = end.valid_len,
                        discarded_bytes = end.file_len - end.valid_len,
                        %reason,
                        "discarding the torn tail of the log (changes after the last fsync)"
                    );
                }
                file.set_len(end.valid_len)
                    .map_err(Error::io("cutting the torn tail of the log", &path))?;
            }
            active_len = end.valid_len;
            total += end.valid_len;
            replayed += end.valid_len.saturating_sub(resume.unwrap_or(0));
            segments.push(Segment {
                no,
                path,
                file: Arc::new(file),
            });
        }
        if segments.is_empty() {
            segments.push(create_segment(&log_dir, 0, st.next_lsn)?);
            active_len = SEGMENT_HEADER_LEN as u64;
            total = active_len;
        }
        st.log.segments = segments;
        st.log.active_len = active_len;
        st.log.zeroed_to = active_len;
        st.log.behind = active_len;
        st.log.total_bytes = total;
        st.log.appended = replayed;
        let removed = open_packs_and_drop_garbage(&mut st, replay_from)?;
        if let Some(lsn) = ckpt_lsn {
            checkpoint::remove_all_but(&ckpt_dir, lsn)?;
        }
        // What recovery read may sit only in the page cache (a kill -9 loses nothing, a power
        // loss would): make it durable before anything is built on it.
        let active = st.log.active();
        active
            .file
            .sync_all()
            .map_err(Error::io("syncing the recovered log", &active.path))?;
        let mark = DurableMark {
            seg: active.no,
            len: active_len,
            lsn: st.next_lsn - 1,
        };
        tracing::info!(
            dir = %dir.display(),
            frames,
            checkpoint = ckpt_lsn,
            removed_files = removed,
            segments = st.log.segments.len(),
            packs = st.packs.len(),
            timelines = st.timelines.len(),
            last_lsn = st.next_lsn - 1,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "page store opened"
        );
        let st_active_file = st.log.active().file.clone();
        let st_active_path = st.log.active().path.clone();
        let log_syncs = st.log.syncs.clone();
        let recovered_lsn = st.next_lsn - 1;
        let store = PageStore {
            recovered_lsn,
            dir: dir.to_path_buf(),
            config,
            state: RwLock::new(st),
            sync_serial: Mutex::new(()),
            durable: Mutex::new(mark),
            log_end: Mutex::new(LogEnd {
                file: st_active_file,
                path: st_active_path,
                mark,
            }),
            poisoned: AtomicBool::new(false),
            maintenance: Mutex::new(()),
            checkpointed_at: Mutex::new(0),
            buffer: Mutex::new(WriteBuffer::default()),
            log_syncs,
            file_commits: Mutex::new(HashMap::new()),
            preparing: Mutex::new(()),
            uncached: Mutex::new((0, 0)),
            object_files: Mutex::new(IntMap::default()),
            materializing: Mutex::new(()),
            pending_extents: Mutex::new(HashMap::new()),
            extent_seq: AtomicU64::new(0),
            last_noted: Mutex::new(HashMap::new()),
            live: Mutex::new(Default::default()),
            live_attached: AtomicBool::new(false),
            _lock: lock,
        };
        // Objects no version names: created or copied for a frame a crash cut off, or left
        // by a sweep interrupted before it deleted them.
        store.sweep_objects(u64::MAX)?;
        // What computes wrote in live directories after the last mirror (see `live.rs`);
        // first, so that an object a power loss cut short is forked, not just recorded.
        store.mirror_live_dirs_at_open()?;
        // Ends found by fsyncs whose frames a crash took (they are committed lazily).
        store.record_external_ends()?;
        Ok(store)
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The position the log was recovered to when the store was opened, before the frames
    /// `open` itself commits (what computes wrote in live directories meanwhile).
    pub fn recovered_lsn(&self) -> Lsn {
        self.recovered_lsn
    }

    /// The position of the last committed change (0 when there is none).
    pub fn last_lsn(&self) -> Lsn {
        self.state.read().next_lsn - 1
    }

    /// What the last fsync made durable. For crash tests: bytes past `len` of segment `seg`
    /// may be lost by a power failure.
    #[doc(hidden)]
    pub fn durable_mark(&self) -> DurableMark {
        *self.durable.lock()
    }

    fn now(&self) -> SystemTime {
        self.config.clock.now()
    }

    pub(crate) fn check_writable(&self) -> Result<()> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(Error::Poisoned);
        }
        Ok(())
    }

    pub(crate) fn poison(&self, e: &Error) {
        tracing::error!(error = %e, "page store write failed; refusing further changes until reopened");
        self.poisoned.store(true, Ordering::Release);
    }

    /// After maintenance sealed the active segment (under the write lock): the new one is
    /// where fsyncs go, and everything before it is durable.
    pub(crate) fn note_roll(&self, st: &State, mark: DurableMark) {
        self.durable.lock().advance(mark);
        let active = st.log.active();
        let mut end = self.log_end.lock();
        end.file = active.file.clone();
        end.path = active.path.clone();
        end.mark = mark;
    }

    /// Appends one frame and applies it to the index: the single way anything changes.
    ///
    /// Ends of external files recorded by fsyncs since the last commit go first, in a frame
    /// of their own (see `external.rs`): whatever this frame holds was done after those
    /// fsyncs returned, and a branch at any later position must see them.
    pub(crate) fn commit(
        &self,
        st: &mut State,
        tl: TimelineId,
        muts: &[Mutation<'_>],
    ) -> Result<Lsn> {
        self.commit_pending_extents(st)?;
        // The timeline's live directory is mirrored before any frame of it (see `live.rs`).
        if self.live_attached.load(Ordering::Acquire) {
            self.mirror_live(st, tl, false)?;
        }
        self.commit_frame(st, tl, muts)
    }

    /// `commit` for a caller that mirrored `tl`'s live directory itself, under this same hold
    /// of the state lock, and chose the frame's contents after that mirror (`add_inode`: a
    /// mirror between would change the directory it checked).
    fn commit_mirrored(
        &self,
        st: &mut State,
        tl: TimelineId,
        muts: &[Mutation<'_>],
    ) -> Result<Lsn> {
        self.commit_pending_extents(st)?;
        self.commit_frame(st, tl, muts)
    }

    /// Appends one frame, without the pending extents first (`commit` is the way in).
    pub(crate) fn commit_frame(
        &self,
        st: &mut State,
        tl: TimelineId,
        muts: &[Mutation<'_>],
    ) -> Result<Lsn> {
        self.check_writable()?;
        let lsn = st.next_lsn;
        let time_ns = to_nanos(self.now()).max(st.last_time_ns);
        let frame = encode_frame(lsn, tl.0, time_ns, muts);
        let mut rolled = None;
        let (seg, off) = st
            .log
            .append(&frame, lsn, &mut rolled)
            .inspect_err(|e| self.poison(e))?;
        if let Some(m) = rolled {
            self.durable.lock().advance(m);
        }
        st.apply_frame(seg, off, frame.len() as u64, &frame[FRAME_HEADER_LEN..])
            .map_err(|reason| {
                let e = Error::Corrupt {
                    path: segment_path(&st.log.dir, seg),
                    offset: off,
                    reason: format!("bug: a frame just written does not apply: {reason}"),
                };
                self.poison(&e);
                e
            })?;
        // A freed inode's buffered pages can never be committed: let their memory go now.
        // Not waiting for the buffer: this may run inside `commit_buffered`, which holds it
        // (a live directory's mirror before a frame, `live.rs`); pages missed here are
        // dropped when their file is next committed (it is gone, and inode numbers are never
        // used again).
        for m in muts {
            if let Mutation::FreeInode { ino } = m {
                if let Some(mut b) = self.buffer.try_lock() {
                    b.take(tl, *ino);
                }
            }
        }
        let active = st.log.active();
        let mut end = self.log_end.lock();
        if end.mark.seg != active.no {
            end.file = active.file.clone();
            end.path = active.path.clone();
        }
        end.mark = DurableMark {
            seg: active.no,
            len: st.log.active_len,
            lsn,
        };
        drop(end);
        // After `log_end`: whoever finds a file's last frame here finds it in `log_end` too,
        // so the fsync it then starts covers that frame.
        let mut files = self.file_commits.lock();
        if files.len() >= MAX_FILE_COMMITS {
            files.clear();
        }
        for m in muts {
            match m {
                Mutation::SetAttr(a) => {
                    files.insert((tl, a.ino), lsn);
                }
                Mutation::Page { ino, .. }
                | Mutation::ZeroPage { ino, .. }
                | Mutation::Truncate { ino, .. } => {
                    files.insert((tl, *ino), lsn);
                }
                Mutation::FreeInode { ino } => {
                    files.remove(&(tl, *ino));
                }
                _ => {}
            }
        }
        Ok(lsn)
    }

    /// Makes every change committed so far durable (fsync, fdatasync and fsyncdir of any file
    /// of any timeline all map here). Concurrent callers share one fsync.
    pub fn sync(&self) -> Result<()> {
        // The ends of external files fsynced so far are changes too.
        if self.has_pending_extents() {
            let mut st = self.state.write();
            self.commit_pending_extents(&mut st)?;
        }
        // Every commit that returned before this call has moved `log_end` (under the state
        // lock, which this does not take).
        let target = self.log_end.lock().mark.lsn;
        self.sync_to(target)
    }

    /// Makes every frame up to `target` durable; concurrent callers share one fsync, which
    /// covers everything appended before it starts.
    fn sync_to(&self, target: Lsn) -> Result<()> {
        self.check_writable()?;
        if self.durable.lock().lsn >= target {
            return Ok(());
        }
        let _serial = self.sync_serial.lock();
        // Capture again: whatever was committed while we queued rides along (group commit).
        let (file, path, mark) = {
            let end = self.log_end.lock();
            (end.file.clone(), end.path.clone(), end.mark)
        };
        if self.durable.lock().lsn >= target {
            return Ok(());
        }
        if let Err(source) = file.sync_data() {
            let e = Error::Io {
                context: "fsync of the log",
                path,
                source,
            };
            self.poison(&e);
            return Err(e);
        }
        self.log_syncs.fetch_add(1, Ordering::Relaxed);
        self.durable.lock().advance(mark);
        self.uncache(&file, mark);
        Ok(())
    }

    // ---- timelines ----

    /// Lets the kernel drop the cached pages of the log that a sync just made durable, but the
    /// last [`UNCACHE_MARGIN`] before the end (the tail page is appended to, and a partial
    /// page not in the cache would have to be read back first). Why: the log only grows, so
    /// its page cache would too, a second copy of pages the kernel already caches above the
    /// mount for the computes that read them; on this VM every page of never-used memory costs
    /// the hypervisor a fault on first touch (writes into fresh page cache ran at a fifth of
    /// the speed of writes into recycled pages), which made each `pgbench -i` on one store
    /// slower than the one before. Dropped pages are freed and reused by the next appends.
    fn uncache(&self, file: &File, mark: DurableMark) {
        let mut u = self.uncached.lock();
        if u.0 != mark.seg {
            *u = (mark.seg, 0);
        }
        let upto = mark.len.saturating_sub(UNCACHE_MARGIN) / UNCACHE_STEP * UNCACHE_STEP;
        if upto > u.1 {
            log::drop_cached(file, u.1, upto - u.1);
            u.1 = upto;
        }
    }

    /// Creates an empty timeline: a root directory (mode 0700, owned by this process's user)
    /// and nothing else. Durable when it returns.
    pub fn create_root(&self, label: &[u8]) -> Result<TimelineId> {
        check_label(label)?;
        let id = {
            let mut st = self.state.write();
            // The new timeline's id is its frame's position: the pending frame goes first.
            self.commit_pending_extents(&mut st)?;
            let id = TimelineId(st.next_lsn);
            let now = self.now();
            let root = Attr {
                ino: ROOT_INO,
                kind: FileKind::Directory,
                perm: 0o700,
                uid: nix::unistd::geteuid().as_raw(),
                gid: nix::unistd::getegid().as_raw(),
                nlink: 2,
                size: 0,
                atime: now,
                mtime: now,
                ctime: now,
            };
            self.commit_frame(
                &mut st,
                id,
                &[
                    Mutation::CreateTimeline {
                        parent: None,
                        label,
                    },
                    Mutation::SetAttr(root),
                ],
            )?;
            id
        };
        self.sync()?;
        tracing::info!(timeline = %id, "created root timeline");
        Ok(id)
    }

    /// Creates a child of `parent` that sees the parent's state at `at`. Records one frame and
    /// copies nothing, whatever the size of the parent, and needs nothing from whoever writes
    /// the parent: the child sees exactly the changes before its position, a state a crash of
    /// the parent could have left. Durable when it returns.
    pub fn branch(&self, parent: TimelineId, at: BranchPoint, label: &[u8]) -> Result<TimelineId> {
        check_label(label)?;
        let t0 = Instant::now();
        let (id, waited) = {
            let mut st = self.state.write();
            let waited = t0.elapsed();
            timeline(&st, parent)?;
            // A branch at "now" sees every fsync that returned before it, and its id is its
            // frame's position: the pending frame goes first. So does a mirror of the
            // parent's live directory: everything its compute wrote before this call.
            self.commit_pending_extents(&mut st)?;
            if matches!(at, BranchPoint::Now) {
                self.mirror_live(&mut st, parent, true)?;
            }
            let now_ns = to_nanos(self.now()).max(st.last_time_ns);
            let horizon_ns = now_ns.saturating_sub(st.time_index.retention_ns);
            let outside = |requested: i64| Error::OutsideRetention {
                requested: from_nanos(requested),
                oldest: from_nanos(horizon_ns),
            };
            let pos = match at {
                BranchPoint::Now => st.next_lsn,
                BranchPoint::Lsn(p) => {
                    if p > st.next_lsn {
                        return Err(Error::PositionInFuture {
                            lsn: p,
                            last: st.next_lsn - 1,
                        });
                    }
                    if p < st.next_lsn {
                        // The state at p lasted until frame p replaced it: inside the window
                        // when frame p was committed after the horizon.
                        let t = st.time_index.time_of(p).ok_or_else(|| outside(i64::MIN))?;
                        if t.saturating_add(st.time_index.granularity_ns) < horizon_ns {
                            return Err(outside(t));
                        }
                    }
                    p
                }
                BranchPoint::Time(t) => {
                    let t_ns = to_nanos(t);
                    if t_ns > now_ns {
                        return Err(Error::InFuture(t));
                    }
                    if t_ns < horizon_ns {
                        return Err(outside(t_ns));
                    }
                    st.time_index
                        .position_at(t_ns, st.next_lsn)
                        .ok_or_else(|| outside(t_ns))?
                }
            };
            if pos < st.gc_horizon && pos < st.next_lsn {
                // GC has dropped versions below its horizon: whatever the clock says now (it
                // may have been set back), those states are gone.
                let t = st.time_index.time_of(pos).unwrap_or(i64::MIN);
                return Err(outside(t));
            }
            if pos <= parent.0 {
                return Err(Error::BeforeTimelineCreated {
                    timeline: parent,
                    lsn: pos,
                    created: parent.0,
                });
            }
            let id = TimelineId(st.next_lsn);
            // `commit_frame`: an fsync's end noted since (without the state lock) must not
            // take this position; it goes with the next frame.
            self.commit_frame(
                &mut st,
                id,
                &[Mutation::CreateTimeline {
                    parent: Some((parent.0, pos)),
                    label,
                }],
            )?;
            (id, waited)
        };
        let recorded = t0.elapsed();
        self.sync()?;
        // The parts of its time, for anyone asking why a branch took long: waiting for the
        // state lock (maintenance's walks hold it), the frame (with the live mirror), the fsync.
        tracing::info!(
            timeline = %id, %parent, ?at,
            lock_wait_us = waited.as_micros() as u64,
            recorded_us = recorded.as_micros() as u64,
            total_us = t0.elapsed().as_micros() as u64,
            "created branch"
        );
        Ok(id)
    }

    /// Deletes a timeline that has no children. Its log records become garbage for compaction.
    pub fn delete_timeline(&self, tl: TimelineId) -> Result<()> {
        {
            let mut st = self.state.write();
            let t = timeline(&st, tl)?;
            if t.children > 0 {
                return Err(Error::TimelineHasChildren {
                    timeline: tl,
                    children: t.children,
                });
            }
            self.forget_live_dir(tl);
            self.commit(&mut st, tl, &[Mutation::DeleteTimeline])?;
            self.buffer.lock().drop_timeline(tl);
        }
        self.remove_live_dirs(tl)?;
        self.sync()?;
        tracing::info!(timeline = %tl, "deleted timeline");
        Ok(())
    }

    /// Every timeline, by id.
    pub fn timelines(&self) -> Vec<TimelineInfo> {
        let st = self.state.read();
        let mut v: Vec<TimelineInfo> = st.timelines.values().map(info).collect();
        v.sort_by_key(|t| t.id);
        v
    }

    pub fn timeline(&self, tl: TimelineId) -> Result<TimelineInfo> {
        let st = self.state.read();
        timeline(&st, tl).map(info)
    }

    /// Measures a timeline. Walks its directory tree, so it costs one step per file.
    pub fn usage(&self, tl: TimelineId) -> Result<Usage> {
        let st = self.state.read();
        let t = timeline(&st, tl)?;
        let v = View::new(&st, t);
        let mut seen = HashSet::new();
        let mut stack = vec![ROOT_INO];
        let mut logical = 0u64;
        while let Some(dir) = stack.pop() {
            for ino in v.entries(dir).into_values() {
                let Some(a) = v.attr(ino) else { continue };
                match a.kind {
                    FileKind::Directory => stack.push(ino),
                    FileKind::Regular if seen.insert(ino) => logical += a.size,
                    _ => {}
                }
            }
        }
        Ok(Usage {
            logical_size_bytes: logical,
            own_storage_bytes: t.own_bytes + self.owned_object_bytes(&st, tl),
        })
    }

    pub fn statfs(&self) -> Result<StatFs> {
        let s = nix::sys::statvfs::statvfs(&self.dir).map_err(|e| Error::Io {
            context: "statfs of the page store's filesystem",
            path: self.dir.clone(),
            source: e.into(),
        })?;
        let frag = s.fragment_size();
        let st = self.state.read();
        Ok(StatFs {
            total_bytes: s.blocks() * frag,
            free_bytes: s.blocks_free() * frag,
            available_bytes: s.blocks_available() * frag,
            log_bytes: st.log.total_bytes,
            inodes: st.next_ino - 1,
            block_size: PAGE_SIZE as u32,
            max_name_len: MAX_NAME_LEN as u32,
        })
    }

    // ---- reading ----

    pub fn getattr(&self, tl: TimelineId, ino: Ino) -> Result<Attr> {
        let st = self.state.read();
        let a = attr_of(&View::new(&st, timeline(&st, tl)?), tl, ino)?;
        self.with_live_size(&st, tl, a)
    }

    /// An external file's size is its object's, when the timeline owns it: its writes go to
    /// the object directly, and the size is recorded only at fsyncs.
    fn with_live_size(&self, st: &State, tl: TimelineId, mut a: Attr) -> Result<Attr> {
        if a.kind == FileKind::Regular {
            if let Some(x) = self.external_view(st, tl, a.ino)? {
                if x.owned {
                    a.size = self.live_size(&x)?;
                }
            }
        }
        Ok(a)
    }

    pub fn lookup(&self, tl: TimelineId, parent: Ino, name: &[u8]) -> Result<Attr> {
        let st = self.state.read();
        let v = View::new(&st, timeline(&st, tl)?);
        dir_attr(&v, tl, parent)?;
        let ino = v.entry(parent, name).ok_or_else(|| {
            not_found(
                tl,
                format!("{:?} in directory inode {parent}", name_str(name)),
            )
        })?;
        let a = attr_of(&v, tl, ino)?;
        self.with_live_size(&st, tl, a)
    }

    /// The entries of a directory, sorted by name, without `.` and `..`.
    pub fn readdir(&self, tl: TimelineId, ino: Ino) -> Result<Vec<DirEntry>> {
        let st = self.state.read();
        let v = View::new(&st, timeline(&st, tl)?);
        dir_attr(&v, tl, ino)?;
        Ok(v.entries(ino)
            .into_iter()
            .filter_map(|(name, child)| {
                let a = v.attr(child)?;
                Some(DirEntry {
                    name,
                    ino: child,
                    kind: a.kind,
                })
            })
            .collect())
    }

    pub fn readlink(&self, tl: TimelineId, ino: Ino) -> Result<Vec<u8>> {
        let st = self.state.read();
        let v = View::new(&st, timeline(&st, tl)?);
        let a = attr_of(&v, tl, ino)?;
        match (a.kind, v.symlink(ino)) {
            (FileKind::Symlink, Some(t)) => Ok(t.to_vec()),
            _ => Err(Error::InvalidArgument(format!(
                "inode {ino} is not a symlink"
            ))),
        }
    }

    /// Reads up to `len` bytes at `offset`; fewer at the end of the file. Holes read as zeros.
    pub fn read(&self, tl: TimelineId, ino: Ino, offset: u64, len: usize) -> Result<Vec<u8>> {
        let mut plan = Vec::new();
        let mut buffered = Vec::new();
        let end = {
            let st = self.state.read();
            let v = View::new(&st, timeline(&st, tl)?);
            let a = regular_attr(&v, tl, ino)?;
            if let Some(x) = self.external_view(&st, tl, ino)? {
                drop(st);
                return self.read_external(x, offset, len);
            }
            if offset >= a.size || len == 0 {
                return Ok(Vec::new());
            }
            let end = a.size.min(offset.saturating_add(len as u64));
            let ps = PAGE_SIZE as u64;
            // Buffered pages are copied under the state lock: a commit moves them to the index
            // under its write lock, so this sees each page in exactly one of the two.
            let buf = self.buffer.lock();
            let has_buffered = buf.has(tl, ino);
            for page in offset / ps..end.div_ceil(ps) {
                if has_buffered {
                    if let Some(d) = buf.page(tl, ino, page) {
                        buffered.push((page, d.to_vec()));
                        continue;
                    }
                }
                if let Loc::Data { file: id, off } = v.page(ino, page) {
                    plan.push((page, st.data_file(id, off)?, id, off));
                }
            }
            end
        };
        // The bytes an index entry points at never change (the log is append-only, packs are
        // written once), so the disk reads run without the lock; compaction may unlink a file
        // we hold meanwhile, which Linux keeps readable until we drop it.
        let ps = PAGE_SIZE as u64;
        let mut out = vec![0u8; (end - offset) as usize];
        for (page, data) in buffered {
            let from = (page * ps).max(offset);
            let to = ((page + 1) * ps).min(end);
            out[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&data[(from - page * ps) as usize..(to - page * ps) as usize]);
        }
        for (page, file, seg, off) in plan {
            let from = (page * ps).max(offset);
            let to = ((page + 1) * ps).min(end);
            let dst = &mut out[(from - offset) as usize..(to - offset) as usize];
            file.read_exact_at(dst, off + (from - page * ps))
                .map_err(Error::io("reading a page", data_path(&self.dir, seg)))?;
        }
        Ok(out)
    }

    pub(crate) fn read_page(&self, st: &State, loc: Loc, buf: &mut [u8]) -> Result<()> {
        match loc {
            Loc::Zero => buf.fill(0),
            Loc::Data { file: id, off } => {
                st.data_file(id, off)?
                    .read_exact_at(buf, off)
                    .map_err(Error::io("reading a page", data_path(&st.dir, id)))?;
            }
        }
        Ok(())
    }

    // ---- changing files ----

    /// Writes `data` at `offset`, extending the file as needed (a gap reads as zeros). Each
    /// chunk of up to 1 MiB is one atomic frame.
    pub fn write(&self, tl: TimelineId, ino: Ino, offset: u64, data: &[u8]) -> Result<usize> {
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|e| *e <= MAX_FILE_SIZE)
            .ok_or_else(|| {
                Error::FileTooLarge(format!("write of {} bytes at offset {offset}", data.len()))
            })?;
        let external = {
            let st = self.state.read();
            regular_attr(&View::new(&st, timeline(&st, tl)?), tl, ino)?;
            self.external_view(&st, tl, ino)?.is_some()
        };
        if external {
            return self.write_external(tl, ino, offset, data);
        }
        if self.config.write_buffer > 0
            && !data.is_empty()
            && self.write_buffered(tl, ino, offset, data)?
        {
            if self.buffer.lock().bytes > self.config.write_buffer {
                self.flush_buffered(None, None, self.config.write_buffer / 4 * 3)?;
            }
            return Ok(data.len());
        }
        let ps = PAGE_SIZE as u64;
        let chunk = (MAX_PAGES_PER_FRAME * PAGE_SIZE) as u64;
        let mut pos = offset;
        while pos < end {
            // Chunks end on page boundaries so that no page is split between two frames.
            let next = ((pos / ps) * ps + chunk).min(end);
            let d = &data[(pos - offset) as usize..(next - offset) as usize];
            let mut st = self.state.write();
            // The file's buffered pages go first, so its own order holds (and the
            // read-modify-write below reads what the file holds).
            self.commit_buffered(&mut st, tl, ino, None)?;
            self.write_chunk(&mut st, tl, ino, pos, d)?;
            let behind = st.log.write_behind();
            drop(st);
            if let Some((file, from, len)) = behind {
                log::start_writeback(&file, from, len);
            }
            pos = next;
        }
        Ok(data.len())
    }

    /// Puts an overwrite inside the file's current size into the write buffer. `false` (and
    /// nothing done) when the write would change the size: that goes through the log at once.
    fn write_buffered(&self, tl: TimelineId, ino: Ino, offset: u64, data: &[u8]) -> Result<bool> {
        let st = self.state.read();
        let v = View::new(&st, timeline(&st, tl)?);
        let a = regular_attr(&v, tl, ino)?;
        let end = offset + data.len() as u64;
        if end > a.size {
            return Ok(false);
        }
        self.check_writable()?;
        let ps = PAGE_SIZE as u64;
        let mut buf = self.buffer.lock();
        for page in offset / ps..end.div_ceil(ps) {
            let ps_start = page * ps;
            let from = ps_start.max(offset);
            let to = (ps_start + ps).min(end);
            let whole = to - from == ps;
            let dst = buf.page_mut(tl, ino, page, |b| {
                if whole {
                    Ok(())
                } else {
                    self.read_page(&st, v.page(ino, page), b)
                }
            })?;
            dst[(from - ps_start) as usize..(to - ps_start) as usize]
                .copy_from_slice(&data[(from - offset) as usize..(to - offset) as usize]);
        }
        Ok(true)
    }

    /// Commits a file's buffered pages: all of them, or only `these` page numbers (those
    /// still buffered), lowest first, one frame per [`MAX_PAGES_PER_FRAME`], under the state
    /// lock the caller holds. Returns how many pages it committed. Pages of a file or
    /// timeline that has gone are dropped.
    fn commit_buffered(
        &self,
        st: &mut State,
        tl: TimelineId,
        ino: Ino,
        these: Option<&[u64]>,
    ) -> Result<usize> {
        let mut buf = self.buffer.lock();
        if !buf.has(tl, ino) {
            return Ok(0);
        }
        let alive = timeline(st, tl)
            .ok()
            .and_then(|t| View::new(st, t).attr(ino))
            .is_some_and(|a| a.kind == FileKind::Regular);
        if !alive {
            buf.take(tl, ino);
            return Ok(0);
        }
        let mut done = 0;
        let mut rest = these;
        loop {
            let pages = match &mut rest {
                None => buf.take_some(tl, ino, MAX_PAGES_PER_FRAME),
                Some(list) => {
                    let (now, later) = list.split_at(list.len().min(MAX_PAGES_PER_FRAME));
                    *list = later;
                    buf.take_pages(tl, ino, now)
                }
            };
            if pages.is_empty() {
                if rest.is_some_and(|l| !l.is_empty()) {
                    continue;
                }
                return Ok(done);
            }
            done += pages.len();
            let muts: Vec<Mutation<'_>> = pages
                .iter()
                .map(|(page, d)| {
                    if is_zero(d) {
                        Mutation::ZeroPage { ino, page: *page }
                    } else {
                        Mutation::Page {
                            ino,
                            page: *page,
                            data: d,
                            data_off: 0,
                        }
                    }
                })
                .collect();
            self.commit(st, tl, &muts)?;
        }
    }

    /// Commits a file's buffered pages (all, or only `these`) one frame per hold of the state
    /// lock, so that readers and writers go on in between. When it commits more than one
    /// frame it paces itself: each frame is written to disk (`sync_file_range`, no journal
    /// commit) before the next is appended, so that a bulk commit (PostgreSQL's checkpoint
    /// fsyncing a relation file, the flusher) never leaves a large backlog of dirty log that
    /// a concurrent commit's fsync would have to wait for. Returns the bytes committed.
    fn commit_file_paced(&self, tl: TimelineId, ino: Ino, these: Option<Vec<u64>>) -> Result<u64> {
        let total = match &these {
            Some(l) => l.len(),
            None => self.buffer.lock().pages_of(tl, ino),
        };
        let pace = total > MAX_PAGES_PER_FRAME;
        let mut rest: &[u64] = these.as_deref().unwrap_or(&[]);
        let mut bytes = 0u64;
        loop {
            let mut st = self.state.write();
            let (seg_before, len_before) = (st.log.active().no, st.log.active_len);
            let n = match these {
                None => {
                    // One frame's worth: `take_some` inside stops at MAX_PAGES_PER_FRAME
                    // only per frame, so bound it here.
                    let first: Vec<u64> =
                        self.buffer.lock().first_pages(tl, ino, MAX_PAGES_PER_FRAME);
                    if first.is_empty() {
                        return Ok(bytes);
                    }
                    self.commit_buffered(&mut st, tl, ino, Some(&first))?
                }
                Some(_) => {
                    if rest.is_empty() {
                        return Ok(bytes);
                    }
                    let (now, later) = rest.split_at(rest.len().min(MAX_PAGES_PER_FRAME));
                    rest = later;
                    self.commit_buffered(&mut st, tl, ino, Some(now))?
                }
            };
            bytes += (n * PAGE_SIZE) as u64;
            if n == 0 {
                continue;
            }
            let active = st.log.active();
            let file = active.file.clone();
            let from = if active.no == seg_before {
                len_before
            } else {
                SEGMENT_HEADER_LEN as u64
            };
            let to = st.log.active_len;
            let behind = if pace {
                st.log.behind = st.log.behind.max(to);
                None
            } else {
                st.log.write_behind()
            };
            drop(st);
            if pace {
                log::write_and_wait(&file, from, to - from);
            } else if let Some((file, from, len)) = behind {
                log::start_writeback(&file, from, len);
            }
        }
    }

    /// Commits buffered page writes to the log (without syncing): every file of timeline
    /// `only` if given; else the files buffered before `older_than`, and then the oldest
    /// others until at most `keep_bytes` stay buffered. Paced (see `commit_file_paced`).
    /// Returns the bytes committed.
    pub fn flush_buffered(
        &self,
        only: Option<TimelineId>,
        older_than: Option<Duration>,
        keep_bytes: usize,
    ) -> Result<u64> {
        let cutoff = older_than.and_then(|d| Instant::now().checked_sub(d));
        let files = self.buffer.lock().pick(only, cutoff, keep_bytes);
        let before = self.last_lsn();
        let mut bytes = 0u64;
        for (tl, ino) in files {
            bytes += self.commit_file_paced(tl, ino, None)?;
        }
        if bytes > 0 {
            tracing::debug!(bytes, from_lsn = %before, "committed buffered page writes");
        }
        Ok(bytes)
    }

    /// Bytes of page writes waiting in the write buffer.
    pub fn buffered_bytes(&self) -> usize {
        self.buffer.lock().bytes
    }

    /// Prepares the log's next segment ahead of need (zeros written and fsynced, see
    /// `log::PreparedSegment`) when the log is being fsynced often (small commits, where the
    /// zeros ahead of the log pay), the active segment is a quarter full (so that a young or
    /// idle store does not hold a segment of zeros for nothing) and none is ready. Takes the state lock only to look; the
    /// writing happens outside it, so commits go on meanwhile. Meant for a background thread
    /// (the server calls it a few times a second); returns whether it wrote a segment.
    pub fn prepare_log_segment(&self) -> Result<bool> {
        let _one = self.preparing.lock();
        let (dir, next_no, size, wanted, slot) = {
            let st = self.state.read();
            let l = &st.log;
            (
                l.dir.clone(),
                l.active().no + 1,
                l.segment_size,
                l.zero_ahead > 0 && l.zeroing && l.active_len >= l.segment_size / 4,
                l.prepared.clone(),
            )
        };
        {
            let mut p = slot.lock();
            match p.as_ref() {
                Some(ready) if ready.no == next_no => return Ok(false),
                Some(_) => {
                    // The log rolled past it before it was ready.
                    if let Some(stale) = p.take() {
                        let _ = std::fs::remove_file(&stale.path);
                    }
                }
                None => {}
            }
        }
        if !wanted {
            return Ok(false);
        }
        self.check_writable()?;
        let seg = log::prepare_segment(&dir, next_no, size)?;
        tracing::debug!(segment = next_no, bytes = size, "prepared a log segment");
        if let Some(stale) = slot.lock().replace(seg) {
            let _ = std::fs::remove_file(&stale.path);
        }
        Ok(true)
    }

    /// FUSE's fsync of one file: commits its buffered pages, then makes the file's last
    /// frame durable (with [`PageStore::sync`]'s group commit).
    pub fn sync_file(&self, tl: TimelineId, ino: Ino) -> Result<()> {
        let external = {
            let st = self.state.read();
            match st.timelines.get(&tl) {
                Some(_) => self.external_view(&st, tl, ino)?,
                None => None,
            }
        };
        if let Some(x) = external {
            return self.sync_external(tl, ino, x);
        }
        // The pages buffered now are what this fsync covers; pages buffered while it runs
        // are later writes, which it need not wait for (and under a steady writer might
        // never catch up with).
        let pages = self.buffer.lock().page_numbers(tl, ino);
        if !pages.is_empty() {
            self.commit_file_paced(tl, ino, Some(pages))?;
        }
        let last = self.file_commits.lock().get(&(tl, ino)).copied();
        match last {
            Some(lsn) => self.sync_to(lsn),
            None => self.sync(),
        }
    }

    /// Commits every buffered page of `tl` and syncs: what a `syncfs` of its filesystem
    /// asks. Called before a compute starts on the timeline, so that crash recovery starts
    /// from a durable image.
    pub fn sync_timeline(&self, tl: TimelineId) -> Result<()> {
        self.flush_buffered(Some(tl), None, 0)?;
        self.sync()
    }

    fn write_chunk(
        &self,
        st: &mut State,
        tl: TimelineId,
        ino: Ino,
        offset: u64,
        data: &[u8],
    ) -> Result<()> {
        let ps = PAGE_SIZE as u64;
        let end = offset + data.len() as u64;
        let mut a = {
            let v = View::new(st, timeline(st, tl)?);
            regular_attr(&v, tl, ino)?
        };
        // (page, new contents): borrowed when the write covers the whole page, else merged
        // with the current version (read-modify-write).
        let mut pages: Vec<(u64, Cow<'_, [u8]>, Loc)> = Vec::new();
        for page in offset / ps..end.div_ceil(ps) {
            let ps_start = page * ps;
            let from = ps_start.max(offset);
            let to = (ps_start + ps).min(end);
            let src = &data[(from - offset) as usize..(to - offset) as usize];
            let cur = View::new(st, timeline(st, tl)?).page(ino, page);
            let new: Cow<'_, [u8]> = if src.len() == PAGE_SIZE {
                Cow::Borrowed(src)
            } else {
                let mut buf = vec![0u8; PAGE_SIZE];
                self.read_page(st, cur, &mut buf)?;
                buf[(from - ps_start) as usize..(to - ps_start) as usize].copy_from_slice(src);
                Cow::Owned(buf)
            };
            pages.push((page, new, cur));
        }
        let mut muts = Vec::with_capacity(pages.len() + 1);
        for (page, new, cur) in &pages {
            if is_zero(new) {
                // Zero pages cost no data: PostgreSQL extends files with them.
                if *cur != Loc::Zero {
                    muts.push(Mutation::ZeroPage { ino, page: *page });
                }
            } else {
                muts.push(Mutation::Page {
                    ino,
                    page: *page,
                    data: new,
                    data_off: 0,
                });
            }
        }
        let now = self.now();
        a.size = a.size.max(end);
        a.mtime = now;
        a.ctime = now;
        muts.push(Mutation::SetAttr(a));
        self.commit(st, tl, &muts)?;
        Ok(())
    }

    /// chmod, chown, truncate or extend, utimes: the `Some` fields of `set`.
    pub fn setattr(&self, tl: TimelineId, ino: Ino, set: SetAttr) -> Result<Attr> {
        if let Some(size) = set.size {
            if size <= MAX_FILE_SIZE && self.is_external(tl, ino)? {
                // The object changes size first: its writer is the kernel, not the log.
                self.owned_object(tl, ino)?
                    .set_len(size)
                    .map_err(Error::io(
                        "resizing an external file",
                        self.dir.join("objects"),
                    ))?;
            }
        }
        let mut st = self.state.write();
        if set.size.is_some() {
            // A truncate must not be followed by older buffered pages of the same file.
            self.commit_buffered(&mut st, tl, ino, None)?;
        }
        let v = View::new(&st, timeline(&st, tl)?);
        let old = attr_of(&v, tl, ino)?;
        let now = self.now();
        let mut a = old;
        if let Some(m) = set.mode {
            a.perm = (m & 0o7777) as u16;
        }
        if let Some(u) = set.uid {
            a.uid = u;
        }
        if let Some(g) = set.gid {
            a.gid = g;
        }
        if let Some(t) = set.atime {
            a.atime = t;
        }
        a.ctime = now;
        let mut muts = Vec::new();
        let mut tail = Vec::new();
        if let Some(size) = set.size {
            regular_attr(&v, tl, ino)?;
            if size > MAX_FILE_SIZE {
                return Err(Error::FileTooLarge(format!("size {size}")));
            }
            let ps = PAGE_SIZE as u64;
            if size < old.size {
                // Bytes past the end must read as zeros if the file grows again: cut the
                // partial last page's tail and every later page.
                let within = (size % ps) as usize;
                if within != 0 {
                    let page = size / ps;
                    let cur = v.page(ino, page);
                    if cur != Loc::Zero {
                        let mut buf = vec![0u8; PAGE_SIZE];
                        self.read_page(&st, cur, &mut buf)?;
                        buf[within..].fill(0);
                        tail.push((page, buf));
                    }
                }
                muts.push(Mutation::Truncate {
                    ino,
                    from_page: size.div_ceil(ps),
                });
            }
            if size != old.size {
                a.mtime = now;
            }
            a.size = size;
        }
        if let Some(t) = set.mtime {
            a.mtime = t;
        }
        if let (Some(size), Some(x)) = (set.size, v.extent(ino)) {
            if x.end > size {
                muts.push(Mutation::External {
                    ino,
                    object: x.object,
                    end: size,
                });
            }
        }
        for (page, buf) in &tail {
            muts.push(if is_zero(buf) {
                Mutation::ZeroPage { ino, page: *page }
            } else {
                Mutation::Page {
                    ino,
                    page: *page,
                    data: buf,
                    data_off: 0,
                }
            });
        }
        muts.push(Mutation::SetAttr(a));
        self.commit(&mut st, tl, &muts)?;
        Ok(a)
    }

    // ---- changing directories ----

    /// The attributes of a new inode, its number taken now: whatever commits a frame before
    /// the caller's (a live directory's mirror, in `commit`) cannot take the same one.
    pub(crate) fn new_inode(
        &self,
        st: &mut State,
        kind: FileKind,
        perm: u16,
        uid: u32,
        gid: u32,
    ) -> Attr {
        let now = self.now();
        let ino = st.next_ino;
        st.next_ino += 1;
        Attr {
            ino,
            kind,
            perm,
            uid,
            gid,
            nlink: if kind == FileKind::Directory { 2 } else { 1 },
            size: 0,
            atime: now,
            mtime: now,
            ctime: now,
        }
    }

    pub(crate) fn touched(&self, mut a: Attr) -> Attr {
        let now = self.now();
        a.mtime = now;
        a.ctime = now;
        a
    }

    /// Adds a new inode under `parent`.
    pub(crate) fn add_inode(
        &self,
        tl: TimelineId,
        parent: Ino,
        name: &[u8],
        mut attr_fn: impl FnMut(&mut State) -> Attr,
        target: Option<&[u8]>,
        object: Option<u64>,
    ) -> Result<Attr> {
        check_name(name)?;
        let mut st = self.state.write();
        // The mirror `commit` would make may add names and inodes: it goes before the checks
        // and the choice of a number, and not again between them and the frame.
        if self.live_attached.load(Ordering::Acquire) {
            self.mirror_live(&mut st, tl, false)?;
        }
        let v = View::new(&st, timeline(&st, tl)?);
        let pa = dir_attr(&v, tl, parent)?;
        if v.entry(parent, name).is_some() {
            return Err(Error::AlreadyExists {
                timeline: tl,
                what: format!("{:?} in directory inode {parent}", name_str(name)),
            });
        }
        let a = attr_fn(&mut st);
        let muts = self.new_inode_frame(a, pa, name, target, object);
        self.commit_mirrored(&mut st, tl, &muts)?;
        Ok(a)
    }

    /// The frame of a new inode `a` named `name` in the directory `pa`: its attributes, the
    /// entry, the directory's times, and its symlink target or external object.
    pub(crate) fn new_inode_frame<'a>(
        &self,
        a: Attr,
        pa: Attr,
        name: &'a [u8],
        target: Option<&'a [u8]>,
        object: Option<u64>,
    ) -> Vec<Mutation<'a>> {
        let mut muts = vec![
            Mutation::SetAttr(a),
            Mutation::DirEntry {
                dir: pa.ino,
                name,
                child: Some(a.ino),
            },
            Mutation::SetAttr(self.touched(pa)),
        ];
        if let Some(target) = target {
            muts.push(Mutation::Symlink { ino: a.ino, target });
        }
        if let Some(object) = object {
            muts.push(Mutation::External {
                ino: a.ino,
                object,
                end: 0,
            });
        }
        muts
    }

    /// Creates an empty regular file; fails if the name exists.
    pub fn create(
        &self,
        tl: TimelineId,
        parent: Ino,
        name: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<Attr> {
        self.add_inode(
            tl,
            parent,
            name,
            |st| self.new_inode(st, FileKind::Regular, (mode & 0o7777) as u16, uid, gid),
            None,
            None,
        )
    }

    pub fn mkdir(
        &self,
        tl: TimelineId,
        parent: Ino,
        name: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<Attr> {
        self.add_inode(
            tl,
            parent,
            name,
            |st| self.new_inode(st, FileKind::Directory, (mode & 0o7777) as u16, uid, gid),
            None,
            None,
        )
    }

    pub fn symlink(
        &self,
        tl: TimelineId,
        parent: Ino,
        name: &[u8],
        target: &[u8],
        uid: u32,
        gid: u32,
    ) -> Result<Attr> {
        if target.is_empty() || target.len() > MAX_SYMLINK_LEN || target.contains(&0) {
            return Err(Error::InvalidArgument(format!(
                "symlink target of {} bytes",
                target.len()
            )));
        }
        self.add_inode(
            tl,
            parent,
            name,
            |st| {
                let mut a = self.new_inode(st, FileKind::Symlink, 0o777, uid, gid);
                a.size = target.len() as u64;
                a
            },
            Some(target),
            None,
        )
    }

    /// A new name for an existing file (not a directory).
    pub fn link(&self, tl: TimelineId, ino: Ino, new_parent: Ino, new_name: &[u8]) -> Result<Attr> {
        check_name(new_name)?;
        let mut st = self.state.write();
        let v = View::new(&st, timeline(&st, tl)?);
        let mut a = attr_of(&v, tl, ino)?;
        if a.kind == FileKind::Directory {
            return Err(Error::NotPermitted(format!(
                "hard link to directory inode {ino}"
            )));
        }
        let pa = dir_attr(&v, tl, new_parent)?;
        if v.entry(new_parent, new_name).is_some() {
            return Err(Error::AlreadyExists {
                timeline: tl,
                what: format!("{:?} in directory inode {new_parent}", name_str(new_name)),
            });
        }
        a.nlink += 1;
        a.ctime = self.now();
        let muts = [
            Mutation::SetAttr(a),
            Mutation::DirEntry {
                dir: new_parent,
                name: new_name,
                child: Some(ino),
            },
            Mutation::SetAttr(self.touched(pa)),
        ];
        self.commit(&mut st, tl, &muts)?;
        Ok(a)
    }

    /// The change that removes one link of `a`: fewer links, or the inode freed when that was
    /// the last link and nobody holds it open (else [`PageStore::release_handle`] frees it).
    pub(crate) fn drop_link(&self, st: &State, tl: TimelineId, mut a: Attr) -> Mutation<'static> {
        a.nlink = a.nlink.saturating_sub(1);
        if a.nlink == 0 && !st.open_counts.contains_key(&(tl, a.ino)) {
            Mutation::FreeInode { ino: a.ino }
        } else {
            a.ctime = self.now();
            Mutation::SetAttr(a)
        }
    }

    /// Removes a name of a file or symlink. A file still open stays readable by inode until
    /// its last [`PageStore::release_handle`].
    pub fn unlink(&self, tl: TimelineId, parent: Ino, name: &[u8]) -> Result<()> {
        let mut st = self.state.write();
        let v = View::new(&st, timeline(&st, tl)?);
        let pa = dir_attr(&v, tl, parent)?;
        let child = v.entry(parent, name).ok_or_else(|| {
            not_found(
                tl,
                format!("{:?} in directory inode {parent}", name_str(name)),
            )
        })?;
        let ca = attr_of(&v, tl, child)?;
        if ca.kind == FileKind::Directory {
            return Err(Error::IsADirectory {
                timeline: tl,
                ino: child,
            });
        }
        let muts = [
            Mutation::DirEntry {
                dir: parent,
                name,
                child: None,
            },
            Mutation::SetAttr(self.touched(pa)),
            self.drop_link(&st, tl, ca),
        ];
        self.commit(&mut st, tl, &muts)?;
        Ok(())
    }

    /// Removes an empty directory.
    pub fn rmdir(&self, tl: TimelineId, parent: Ino, name: &[u8]) -> Result<()> {
        let mut st = self.state.write();
        let v = View::new(&st, timeline(&st, tl)?);
        let pa = dir_attr(&v, tl, parent)?;
        let child = v.entry(parent, name).ok_or_else(|| {
            not_found(
                tl,
                format!("{:?} in directory inode {parent}", name_str(name)),
            )
        })?;
        dir_attr(&v, tl, child)?;
        if !v.is_empty_dir(child) {
            return Err(Error::DirectoryNotEmpty {
                timeline: tl,
                ino: child,
            });
        }
        let muts = [
            Mutation::DirEntry {
                dir: parent,
                name,
                child: None,
            },
            Mutation::SetAttr(self.touched(pa)),
            Mutation::FreeInode { ino: child },
        ];
        self.commit(&mut st, tl, &muts)?;
        Ok(())
    }

    /// Moves `parent/name` to `new_parent/new_name` in one atomic frame, replacing what is
    /// there (a file by a file, an empty directory by a directory), as rename(2) does.
    pub fn rename(
        &self,
        tl: TimelineId,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
    ) -> Result<()> {
        check_name(new_name)?;
        let mut st = self.state.write();
        let v = View::new(&st, timeline(&st, tl)?);
        let pa = dir_attr(&v, tl, parent)?;
        let npa = dir_attr(&v, tl, new_parent)?;
        let src = v.entry(parent, name).ok_or_else(|| {
            not_found(
                tl,
                format!("{:?} in directory inode {parent}", name_str(name)),
            )
        })?;
        let sa = attr_of(&v, tl, src)?;
        if parent == new_parent && name == new_name {
            return Ok(());
        }
        if sa.kind == FileKind::Directory && is_in_subtree(&v, src, new_parent) {
            return Err(Error::InvalidArgument(format!(
                "cannot move directory inode {src} inside itself"
            )));
        }
        let dst = v.entry(new_parent, new_name);
        if dst == Some(src) {
            // Two links of one inode: rename(2) does nothing.
            return Ok(());
        }
        let mut muts = vec![
            Mutation::DirEntry {
                dir: parent,
                name,
                child: None,
            },
            Mutation::DirEntry {
                dir: new_parent,
                name: new_name,
                child: Some(src),
            },
        ];
        if let Some(d) = dst {
            let da = attr_of(&v, tl, d)?;
            match (
                sa.kind == FileKind::Directory,
                da.kind == FileKind::Directory,
            ) {
                (true, false) => {
                    return Err(Error::NotADirectory {
                        timeline: tl,
                        ino: d,
                    })
                }
                (false, true) => {
                    return Err(Error::IsADirectory {
                        timeline: tl,
                        ino: d,
                    })
                }
                (true, true) => {
                    if !v.is_empty_dir(d) {
                        return Err(Error::DirectoryNotEmpty {
                            timeline: tl,
                            ino: d,
                        });
                    }
                    muts.push(Mutation::FreeInode { ino: d });
                }
                (false, false) => muts.push(self.drop_link(&st, tl, da)),
            }
        }
        muts.push(Mutation::SetAttr(self.touched(pa)));
        if new_parent != parent {
            muts.push(Mutation::SetAttr(self.touched(npa)));
        }
        let mut sa = sa;
        sa.ctime = self.now();
        muts.push(Mutation::SetAttr(sa));
        self.commit(&mut st, tl, &muts)?;
        Ok(())
    }

    // ---- open files ----

    /// Notes an open handle on `ino`, so that unlinking its last name keeps it readable.
    pub fn open_handle(&self, tl: TimelineId, ino: Ino) -> Result<Attr> {
        let mut st = self.state.write();
        let a = attr_of(&View::new(&st, timeline(&st, tl)?), tl, ino)?;
        // A counter, not a queue: bounded by the handles the kernel holds.
        *st.open_counts.entry((tl, ino)).or_insert(0) += 1;
        Ok(a)
    }

    /// Drops a handle taken by [`PageStore::open_handle`]; the last one frees an unlinked inode.
    pub fn release_handle(&self, tl: TimelineId, ino: Ino) -> Result<()> {
        let mut st = self.state.write();
        let Some(n) = st.open_counts.get_mut(&(tl, ino)) else {
            tracing::warn!(timeline = %tl, ino, "release of an inode that is not open");
            return Ok(());
        };
        *n -= 1;
        if *n > 0 {
            return Ok(());
        }
        st.open_counts.remove(&(tl, ino));
        let Some(t) = st.timelines.get(&tl) else {
            return Ok(());
        };
        if let Some(a) = View::new(&st, t).attr(ino) {
            if a.nlink == 0 {
                self.commit(&mut st, tl, &[Mutation::FreeInode { ino }])?;
            }
        }
        Ok(())
    }
}

/// Whether `ino` is `dir` or lies below it.
fn is_in_subtree(v: &View<'_>, dir: Ino, ino: Ino) -> bool {
    let mut stack = vec![dir];
    let mut seen = HashSet::new();
    while let Some(d) = stack.pop() {
        if d == ino {
            return true;
        }
        if !seen.insert(d) {
            continue;
        }
        for child in v.entries(d).into_values() {
            if v.attr(child).is_some_and(|a| a.kind == FileKind::Directory) {
                stack.push(child);
            }
        }
    }
    false
}

fn check_label(label: &[u8]) -> Result<()> {
    if label.len() > MAX_LABEL_LEN {
        return Err(Error::InvalidArgument(format!(
            "timeline label of {} bytes (at most {MAX_LABEL_LEN})",
            label.len()
        )));
    }
    Ok(())
}

fn info(t: &Timeline) -> TimelineInfo {
    TimelineInfo {
        id: t.id,
        parent: t.parent,
        label: t.label.clone(),
        created_at: t.created_at,
    }
}

/// At open, after the index is loaded: opens the pack files the index references and removes
/// the data files nothing references any more, leftovers of a compaction a crash interrupted
/// (a pack written but never switched to, segments and packs switched away from but not yet
/// deleted). Only segments before the checkpoint's (index `replay_from`) can go: their frames
/// are in the checkpoint. Returns how many files were removed.
fn open_packs_and_drop_garbage(st: &mut State, replay_from: usize) -> Result<usize> {
    let pack_dir = st.dir.join("pack");
    std::fs::create_dir_all(&pack_dir)
        .map_err(Error::io("creating the pack directory", &pack_dir))?;
    let referenced = st.share_index().referenced_files();
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(&pack_dir).map_err(Error::io("listing pack files", &pack_dir))? {
        let entry = entry.map_err(Error::io("listing pack files", &pack_dir))?;
        let name = entry.file_name();
        let Some(no) = name
            .to_string_lossy()
            .strip_suffix(".pack")
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        st.next_pack = st.next_pack.max(no + 1);
        let path = pack_path(&pack_dir, no);
        if !referenced.contains(&(no | crate::state::PACK_BIT)) {
            removed.push(path);
            continue;
        }
        let file = open_rw(&path)?;
        let mut hb = [0u8; PACK_HEADER_LEN];
        file.read_exact_at(&mut hb, 0)
            .map_err(Error::io("reading a pack header", &path))?;
        match decode_pack_header(&hb) {
            Ok(n) if n == no => {}
            Ok(n) => {
                return Err(Error::Corrupt {
                    path,
                    offset: 0,
                    reason: format!("pack header says pack {n}"),
                })
            }
            Err(reason) => {
                return Err(Error::Corrupt {
                    path,
                    offset: 0,
                    reason,
                })
            }
        }
        st.packs.insert(
            no,
            Pack {
                no,
                path,
                file: Arc::new(file),
            },
        );
    }
    let mut kept = Vec::with_capacity(st.log.segments.len());
    for (i, seg) in std::mem::take(&mut st.log.segments).into_iter().enumerate() {
        if i < replay_from && !referenced.contains(&seg.no) {
            st.log.total_bytes = st
                .log
                .total_bytes
                .saturating_sub(checkpoint::file_len(&seg.file));
            removed.push(seg.path);
        } else {
            kept.push(seg);
        }
    }
    st.log.segments = kept;
    for id in &referenced {
        let present = if crate::gc::is_pack(*id) {
            st.packs.contains_key(&(id & !crate::state::PACK_BIT))
        } else {
            st.log.file(*id).is_some()
        };
        if !present {
            return Err(Error::Corrupt {
                path: data_path(&st.dir, *id),
                offset: 0,
                reason: "the index references this data file, which is missing".into(),
            });
        }
    }
    for path in &removed {
        tracing::info!(path = %path.display(), "removing a data file nothing references (a compaction was interrupted)");
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("removing an unreferenced data file", path)(e)),
        }
    }
    if !removed.is_empty() {
        log::sync_dir(&st.log.dir)?;
        log::sync_dir(&pack_dir)?;
    }
    Ok(removed.len())
}

fn to_nanos_dur(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

/// The log's cached pages are let go in steps of this many bytes, the last
/// [`UNCACHE_MARGIN`] before the durable end kept.
const UNCACHE_STEP: u64 = 1 << 20;
const UNCACHE_MARGIN: u64 = 1 << 20;

/// Files whose last frame [`PageStore::file_commits`] remembers, at most (then it starts
/// again: a forgotten file's fsync waits for the whole log, which is only slower).
const MAX_FILE_COMMITS: usize = 1 << 20;
