//! The in-memory index: per timeline, per inode, the versions of attributes, pages and
//! directory entries, each pointing into the log. Rebuilt on open by replaying the log through
//! [`State::apply_frame`], the same function the write path uses, so what a reopened store
//! shows is by construction what the running one showed.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::hash::{BuildHasherDefault, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::{decode_body, Mutation};
use crate::log::{segment_path, LogWriter};
use crate::types::{from_nanos, Attr, Ino, Lsn, TimelineId, ROOT_INO};

/// A hasher for the integer keys of the index (inode numbers, timeline ids): one multiply
/// instead of SipHash, because a read on a deep ancestry does one lookup per level. The keys
/// are allocated by the store, not chosen by users, so hash flooding is not a concern.
#[derive(Default)]
pub(crate) struct IntHasher(u64);

impl Hasher for IntHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(29);
    }
}

pub(crate) type IntMap<K, V> = HashMap<K, V, BuildHasherDefault<IntHasher>>;

/// Where a page version lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Loc {
    /// All zeros: a hole, a page written with zeros, or a page cut by a truncate.
    Zero,
    /// `PAGE_SIZE` bytes at `off` in data file `file`: log segment number `file`, or pack
    /// number `file & !PACK_BIT` when [`PACK_BIT`] is set (see [`data_path`]).
    Data { file: u32, off: u64 },
}

/// Set in a [`Loc::Data`] file id that names a pack file (written by compaction) rather than a
/// log segment: the two number spaces never meet.
pub(crate) const PACK_BIT: u32 = 1 << 31;

/// The path of data file `id` (a log segment or a pack) in the store's directory.
pub(crate) fn data_path(store_dir: &Path, id: u32) -> PathBuf {
    if id & PACK_BIT != 0 {
        pack_path(&store_dir.join("pack"), id & !PACK_BIT)
    } else {
        segment_path(&store_dir.join("log"), id)
    }
}

pub(crate) fn pack_path(pack_dir: &Path, no: u32) -> PathBuf {
    pack_dir.join(format!("{no:010}.pack"))
}

/// A pack file: pages that compaction copied out of sparse segments or packs.
pub(crate) struct Pack {
    pub no: u32,
    pub path: PathBuf,
    pub file: Arc<File>,
}

/// Versions of one key, oldest first. Positions only grow, so appends keep it sorted.
pub(crate) type Versions<T> = Vec<(Lsn, T)>;

/// The newest version strictly below `bound`.
pub(crate) fn newest_below<T>(v: &[(Lsn, T)], bound: Lsn) -> Option<&T> {
    let n = if bound == Lsn::MAX {
        v.len()
    } else {
        v.partition_point(|(l, _)| *l < bound)
    };
    n.checked_sub(1).map(|i| &v[i].1)
}

fn push_version<T>(v: &mut Versions<T>, lsn: Lsn, x: T) {
    match v.last_mut() {
        // Two changes of one key in one frame: the frame is atomic, keep the last.
        Some((l, old)) if *l == lsn => *old = x,
        last => {
            debug_assert!(last.is_none_or(|(l, _)| *l < lsn), "versions out of order");
            v.push((lsn, x));
        }
    }
}

/// One timeline's own changes to one inode.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub(crate) struct InodeIndex {
    /// `None`: the inode was freed (its last link gone and nobody holds it open).
    pub attrs: Versions<Option<Attr>>,
    /// A persistent B-tree: cloning it (for a checkpoint) is O(1), and a write after a clone
    /// copies only the nodes on its path.
    pub pages: imbl::OrdMap<u64, Versions<Loc>>,
    pub entries: BTreeMap<Box<[u8]>, Versions<Option<Ino>>>,
    /// A symlink's target never changes, so it has no versions.
    pub symlink: Option<Box<[u8]>>,
    /// For an external file (see `external.rs`), where its contents are. Kept out of the
    /// serde encoding of the checkpoint's timelines (checkpoints carry it after them, so
    /// that checkpoints written before external files existed still load).
    #[serde(skip)]
    pub external: Versions<Extent>,
}

impl InodeIndex {
    /// Its versions: attributes, pages, directory entries.
    pub(crate) fn versions(&self) -> u64 {
        self.attrs.len() as u64
            + self.pages.values().map(|v| v.len() as u64).sum::<u64>()
            + self.entries.values().map(|v| v.len() as u64).sum::<u64>()
    }
}

/// A copy of the index's inodes that shares their versions with the live index
/// ([`State::share_index`]): O(inodes) to take under the read lock, then walked with no lock
/// while writers go on (a write to an inode the copy shares copies that inode first).
pub(crate) struct SharedIndex {
    pub timelines: Vec<SharedTimeline>,
}

pub(crate) struct SharedTimeline {
    pub id: TimelineId,
    pub parent: Option<(TimelineId, Lsn)>,
    /// Its `own_bytes` counter when copied.
    pub own_bytes: u64,
    pub inodes: Vec<(Ino, Arc<InodeIndex>)>,
}

impl SharedIndex {
    /// Every inode of every timeline.
    pub(crate) fn inodes(&self) -> impl Iterator<Item = (TimelineId, Ino, &InodeIndex)> {
        self.timelines
            .iter()
            .flat_map(|t| t.inodes.iter().map(|(ino, ii)| (t.id, *ino, &**ii)))
    }

    /// The data files the copy's page versions point into.
    pub(crate) fn referenced_files(&self) -> std::collections::BTreeSet<u32> {
        let mut s = std::collections::BTreeSet::new();
        crate::gc::data_locs(self.inodes(), |_, _, _, _, file, _| {
            s.insert(file);
        });
        s
    }

    /// Bytes of page data the copy references, per data file id.
    pub(crate) fn live_bytes(&self) -> IntMap<u32, u64> {
        let mut live: IntMap<u32, u64> = IntMap::default();
        crate::gc::data_locs(self.inodes(), |_, _, _, _, file, _| {
            *live.entry(file).or_default() += crate::types::PAGE_SIZE as u64;
        });
        live
    }
}

/// Where an external file's contents are as of one position: the bytes below `end` of
/// object `object`, zeros after (up to the file's size).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Extent {
    pub object: u64,
    pub end: u64,
}

#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct Timeline {
    pub id: TimelineId,
    pub parent: Option<(TimelineId, Lsn)>,
    pub label: Vec<u8>,
    #[serde(with = "crate::types::nanos")]
    pub created_at: SystemTime,
    /// This timeline and its ancestors, nearest first, each with the bound below which its
    /// changes are visible here (`Lsn::MAX` for the timeline itself).
    pub chain: Vec<(TimelineId, Lsn)>,
    pub children: usize,
    /// Shared with a checkpoint's copy while it is encoded: a change then copies the one
    /// inode it touches (`Arc::make_mut`), never the whole index.
    pub inodes: IntMap<Ino, Arc<InodeIndex>>,
    pub own_bytes: u64,
}

/// LSN ↔ wall-clock time, sampled: an entry `(t, lsn)` says frame `lsn` was committed at `t`
/// and the frames after it, up to the next entry's, within `granularity` of `t`.
#[derive(Debug, Default)]
pub(crate) struct TimeIndex {
    pub entries: Vec<(i64, Lsn)>,
    pub granularity_ns: i64,
    pub retention_ns: i64,
}

impl TimeIndex {
    fn record(&mut self, time_ns: i64, lsn: Lsn) {
        let push = match self.entries.last() {
            None => true,
            Some((t, _)) => time_ns > *t && time_ns - *t >= self.granularity_ns,
        };
        if push {
            self.entries.push((time_ns, lsn));
            // Bound the index by the retention window: keep one entry older than the horizon
            // so that a moment just inside the window still resolves.
            let horizon = time_ns.saturating_sub(self.retention_ns);
            let old = self.entries.partition_point(|(t, _)| *t < horizon);
            if old > 1 && old > self.entries.len() / 2 {
                self.entries.drain(..old - 1);
            }
        }
    }

    /// The branch position for moment `t`: every frame known to be committed at or before `t`
    /// (precise to `granularity`, erring towards the past). `None` when no frame is that old.
    pub fn position_at(&self, t: i64, next_lsn: Lsn) -> Option<Lsn> {
        let i = self.entries.partition_point(|(et, _)| *et <= t);
        let (et, elsn) = *self.entries.get(i.checked_sub(1)?)?;
        let end = self.entries.get(i).map_or(next_lsn, |(_, l)| *l);
        // Frames in [elsn, end) were committed in [et, et + granularity): all of them are at or
        // before t when t is past that interval; otherwise only elsn is known to be.
        if t.saturating_sub(et) >= self.granularity_ns {
            Some(end)
        } else {
            Some(elsn + 1)
        }
    }

    /// A moment no later than when frame `lsn` was committed, if the index still knows it.
    pub fn time_of(&self, lsn: Lsn) -> Option<i64> {
        let i = self.entries.partition_point(|(_, l)| *l <= lsn);
        self.entries.get(i.checked_sub(1)?).map(|(t, _)| *t)
    }
}

/// Where a page of a timeline resolves to *through its ancestors* (the levels after the
/// timeline's own in its chain): `(timeline, ino, page) → Loc`.
///
/// Why no invalidation is needed: a timeline's ancestors are seen only below their bounds
/// (branch positions), and every new frame takes a position above every existing bound, so
/// what the ancestors hold below them never changes; an ancestor cannot be deleted while it has
/// descendants, and timeline ids are positions, never reused. Only the timeline's own level
/// changes, and it is looked up before the cache. Compaction moves page data: it clears the
/// cache under the same write lock that switches the index to the new locations
/// ([`AncestorCache::clear`]), and GC never changes what a read point sees.
///
/// Bounded: a fixed number of direct-mapped slots (a colliding key replaces the old one), split
/// into shards with a lock each so that concurrent readers rarely meet. Slots are allocated on
/// first use, so a store that never reads a deep timeline pays nothing.
pub(crate) struct AncestorCache {
    shards: [Mutex<Option<Box<[CacheSlot]>>>; CACHE_SHARDS],
}

/// A timeline with fewer ancestors than this walks them: one or two lookups cost about what the
/// cache's own lookup costs.
pub(crate) const CACHE_MIN_ANCESTORS: usize = 3;
const CACHE_SHARDS: usize = 16;
/// 16 × 8192 slots of 32 bytes: 4 MiB at most, enough for a 1 GiB working set of pages.
const CACHE_SLOTS_PER_SHARD: usize = 8192;

#[derive(Clone, Copy)]
struct CacheSlot {
    /// 0: empty (no timeline has id 0).
    timeline: u64,
    ino: u64,
    page: u64,
    loc: Loc,
}

const EMPTY_SLOT: CacheSlot = CacheSlot {
    timeline: 0,
    ino: 0,
    page: 0,
    loc: Loc::Zero,
};

impl Default for AncestorCache {
    fn default() -> Self {
        AncestorCache {
            shards: std::array::from_fn(|_| Mutex::new(None)),
        }
    }
}

impl AncestorCache {
    fn index(tl: TimelineId, ino: Ino, page: u64) -> (usize, usize) {
        let mut h = IntHasher::default();
        h.write_u64(tl.0);
        h.write_u64(ino);
        h.write_u64(page);
        let h = h.finish();
        (
            (h as usize) % CACHE_SHARDS,
            ((h >> 32) as usize) % CACHE_SLOTS_PER_SHARD,
        )
    }

    /// Forgets everything. Called under the state's write lock when page data moves, so no
    /// reader (they hold the read lock while they resolve and insert) can put back a stale
    /// location.
    pub fn clear(&self) {
        for shard in &self.shards {
            *shard.lock() = None;
        }
    }

    fn get(&self, tl: TimelineId, ino: Ino, page: u64) -> Option<Loc> {
        let (shard, slot) = Self::index(tl, ino, page);
        let g = self.shards[shard].lock();
        let s = g.as_ref()?[slot];
        (s.timeline == tl.0 && s.ino == ino && s.page == page).then_some(s.loc)
    }

    fn insert(&self, tl: TimelineId, ino: Ino, page: u64, loc: Loc) {
        let (shard, slot) = Self::index(tl, ino, page);
        let mut g = self.shards[shard].lock();
        let slots =
            g.get_or_insert_with(|| vec![EMPTY_SLOT; CACHE_SLOTS_PER_SHARD].into_boxed_slice());
        slots[slot] = CacheSlot {
            timeline: tl.0,
            ino,
            page,
            loc,
        };
    }
}

pub(crate) struct State {
    /// The store's directory.
    pub dir: PathBuf,
    pub timelines: IntMap<TimelineId, Timeline>,
    /// Pages resolved through deep ancestries; see [`AncestorCache`].
    pub ancestor_cache: AncestorCache,
    pub next_lsn: Lsn,
    pub next_ino: Ino,
    pub last_time_ns: i64,
    pub log: LogWriter,
    pub time_index: TimeIndex,
    /// Open handles per (timeline, inode), in memory only: after a restart nothing is open.
    pub open_counts: HashMap<(TimelineId, Ino), u32>,
    /// The oldest position GC kept every version for: a branch below it is refused whatever
    /// the clock says now (a clock set back must not expose what GC dropped).
    pub gc_horizon: Lsn,
    /// Pack files by number (without [`PACK_BIT`]).
    pub packs: BTreeMap<u32, Pack>,
    /// The number the next pack file gets.
    pub next_pack: u32,
    /// External objects by number, with the timeline that owns (and alone writes) each: the
    /// one whose own versions name it. Rebuilt from the index at open.
    pub objects: IntMap<u64, TimelineId>,
    /// The number the next external object gets.
    pub next_object: u64,
    /// Objects whose file exists but whose first frame is not committed yet: the sweep of
    /// unreferenced objects leaves them alone.
    pub pending_objects: HashSet<u64>,
}

/// A read-only view of one timeline through its ancestry.
pub(crate) struct View<'a> {
    pub st: &'a State,
    pub chain: &'a [(TimelineId, Lsn)],
}

impl<'a> View<'a> {
    pub fn new(st: &'a State, tl: &'a Timeline) -> Self {
        View {
            st,
            chain: &tl.chain,
        }
    }

    /// The first level (nearest timeline) with a version of the key below its bound decides:
    /// a deep ancestry costs one hash lookup per level that never touched the inode.
    pub(crate) fn find<T>(
        &self,
        ino: Ino,
        get: impl Fn(&'a InodeIndex) -> Option<&'a Versions<T>>,
    ) -> Option<&'a T> {
        for (id, bound) in self.chain {
            let Some(ii) = self.st.timelines.get(id).and_then(|t| t.inodes.get(&ino)) else {
                continue;
            };
            if let Some(x) = get(ii).and_then(|v| newest_below(v, *bound)) {
                return Some(x);
            }
        }
        None
    }

    pub fn attr(&self, ino: Ino) -> Option<Attr> {
        self.find(ino, |ii| Some(&ii.attrs)).copied().flatten()
    }

    pub fn page(&self, ino: Ino, page: u64) -> Loc {
        let Some(((own, _), ancestors)) = self.chain.split_first() else {
            return Loc::Zero;
        };
        if ancestors.len() < CACHE_MIN_ANCESTORS {
            return self
                .find(ino, |ii| ii.pages.get(&page))
                .copied()
                .unwrap_or(Loc::Zero);
        }
        // The timeline's own level changes with every write: always looked up first.
        if let Some(loc) = self
            .st
            .timelines
            .get(own)
            .and_then(|t| t.inodes.get(&ino))
            .and_then(|ii| ii.pages.get(&page))
            .and_then(|v| v.last())
        {
            return loc.1;
        }
        let cache = &self.st.ancestor_cache;
        if let Some(loc) = cache.get(*own, ino, page) {
            debug_assert_eq!(
                Some(loc),
                Some(self.walk_page(ancestors, ino, page)),
                "ancestor cache of timeline {own} is stale for inode {ino} page {page}"
            );
            return loc;
        }
        let loc = self.walk_page(ancestors, ino, page);
        cache.insert(*own, ino, page, loc);
        loc
    }

    /// Resolves a page through `levels` (part of the chain), nearest first.
    pub(crate) fn walk_page(&self, levels: &[(TimelineId, Lsn)], ino: Ino, page: u64) -> Loc {
        View {
            st: self.st,
            chain: levels,
        }
        .find(ino, |ii| ii.pages.get(&page))
        .copied()
        .unwrap_or(Loc::Zero)
    }

    /// Where an external file's contents are, if it is one.
    pub fn extent(&self, ino: Ino) -> Option<Extent> {
        self.find(ino, |ii| Some(&ii.external)).copied()
    }

    pub fn entry(&self, dir: Ino, name: &[u8]) -> Option<Ino> {
        self.find(dir, |ii| ii.entries.get(name)).copied().flatten()
    }

    pub fn symlink(&self, ino: Ino) -> Option<&'a [u8]> {
        self.chain.iter().find_map(|(id, _)| {
            self.st
                .timelines
                .get(id)?
                .inodes
                .get(&ino)?
                .symlink
                .as_deref()
        })
    }

    /// The entries of a directory: for each name the nearest level decides.
    pub fn entries(&self, dir: Ino) -> BTreeMap<Vec<u8>, Ino> {
        let mut decided: BTreeMap<&[u8], Option<Ino>> = BTreeMap::new();
        for (id, bound) in self.chain {
            let Some(ii) = self.st.timelines.get(id).and_then(|t| t.inodes.get(&dir)) else {
                continue;
            };
            for (name, v) in &ii.entries {
                if decided.contains_key(&**name) {
                    continue;
                }
                if let Some(x) = newest_below(v, *bound) {
                    decided.insert(name, *x);
                }
            }
        }
        decided
            .into_iter()
            .filter_map(|(n, c)| c.map(|c| (n.to_vec(), c)))
            .collect()
    }

    pub fn is_empty_dir(&self, dir: Ino) -> bool {
        // Cheap enough: directories that get removed are small in practice.
        self.entries(dir).is_empty()
    }

    /// Pages at or after `from` that are visible and not zero.
    pub fn data_pages_from(&self, ino: Ino, from: u64) -> BTreeSet<u64> {
        let mut candidates = BTreeSet::new();
        for (id, _) in self.chain {
            if let Some(ii) = self.st.timelines.get(id).and_then(|t| t.inodes.get(&ino)) {
                candidates.extend(ii.pages.range(from..).map(|(p, _)| *p));
            }
        }
        candidates
            .into_iter()
            .filter(|p| self.page(ino, *p) != Loc::Zero)
            .collect()
    }
}

impl State {
    /// The file holding data file `id` (a log segment or a pack).
    pub fn data_file(&self, id: u32, off: u64) -> Result<Arc<File>> {
        let file = if id & PACK_BIT != 0 {
            self.packs.get(&(id & !PACK_BIT)).map(|p| &p.file)
        } else {
            self.log.file(id)
        };
        file.cloned().ok_or_else(|| Error::Corrupt {
            path: data_path(&self.dir, id),
            offset: off,
            reason: "index points into a missing data file".into(),
        })
    }

    /// Applies one frame (already durable or about to be) to the index. `frame_off` is where
    /// the frame starts in segment `seg`, `frame_len` its total size. Errors mean the log
    /// contradicts itself (a frame for a missing timeline, say): corruption, not a torn tail.
    pub fn apply_frame(
        &mut self,
        seg: u32,
        frame_off: u64,
        frame_len: u64,
        body: &[u8],
    ) -> Result<(), String> {
        let fb = decode_body(body)?;
        if fb.lsn != self.next_lsn {
            return Err(format!(
                "frame at position {} where {} was expected",
                fb.lsn, self.next_lsn
            ));
        }
        let lsn = fb.lsn;
        let tl = TimelineId(fb.timeline);
        let body_off = frame_off + crate::format::FRAME_HEADER_LEN as u64;
        self.last_time_ns = self.last_time_ns.max(fb.time_ns);
        self.time_index.record(fb.time_ns, lsn);

        for m in &fb.muts {
            match *m {
                Mutation::CreateTimeline { parent, label } => {
                    if tl.0 != lsn || self.timelines.contains_key(&tl) {
                        return Err(format!("timeline {tl} created at position {lsn}"));
                    }
                    let mut chain = vec![(tl, Lsn::MAX)];
                    let parent = match parent {
                        None => None,
                        Some((p, at)) => {
                            let p = TimelineId(p);
                            let pt = self
                                .timelines
                                .get_mut(&p)
                                .ok_or_else(|| format!("branch of missing timeline {p}"))?;
                            if at > lsn || at <= p.0 {
                                return Err(format!("branch of {p} at impossible position {at}"));
                            }
                            pt.children += 1;
                            chain.push((p, at));
                            chain.extend(pt.chain.iter().skip(1).copied());
                            Some((p, at))
                        }
                    };
                    self.timelines.insert(
                        tl,
                        Timeline {
                            id: tl,
                            parent,
                            label: label.to_vec(),
                            created_at: from_nanos(fb.time_ns),
                            chain,
                            children: 0,
                            inodes: IntMap::default(),
                            own_bytes: 0,
                        },
                    );
                }
                Mutation::DeleteTimeline => {
                    let t = self
                        .timelines
                        .remove(&tl)
                        .ok_or_else(|| format!("deletion of missing timeline {tl}"))?;
                    if t.children != 0 {
                        return Err(format!("deletion of timeline {tl} that has children"));
                    }
                    if let Some((p, _)) = t.parent {
                        if let Some(pt) = self.timelines.get_mut(&p) {
                            pt.children -= 1;
                        }
                    }
                    self.open_counts.retain(|(t, _), _| *t != tl);
                }
                Mutation::Truncate { ino, from_page } => {
                    let t = self
                        .timelines
                        .get(&tl)
                        .ok_or_else(|| format!("change to missing timeline {tl}"))?;
                    let cut = View::new(self, t).data_pages_from(ino, from_page);
                    let ii = self.inode_mut(tl, ino)?;
                    for p in cut {
                        push_version(ii.pages.entry(p).or_default(), lsn, Loc::Zero);
                    }
                }
                Mutation::SetAttr(a) => {
                    self.next_ino = self.next_ino.max(a.ino + 1);
                    push_version(&mut self.inode_mut(tl, a.ino)?.attrs, lsn, Some(a));
                }
                Mutation::FreeInode { ino } => {
                    push_version(&mut self.inode_mut(tl, ino)?.attrs, lsn, None);
                    self.open_counts.remove(&(tl, ino));
                }
                Mutation::Page {
                    ino,
                    page,
                    data_off,
                    ..
                } => {
                    let off = body_off + data_off as u64;
                    let ii = self.inode_mut(tl, ino)?;
                    push_version(
                        ii.pages.entry(page).or_default(),
                        lsn,
                        Loc::Data { file: seg, off },
                    );
                }
                Mutation::ZeroPage { ino, page } => {
                    let ii = self.inode_mut(tl, ino)?;
                    push_version(ii.pages.entry(page).or_default(), lsn, Loc::Zero);
                }
                Mutation::DirEntry { dir, name, child } => {
                    let ii = self.inode_mut(tl, dir)?;
                    match ii.entries.get_mut(name) {
                        Some(v) => push_version(v, lsn, child),
                        None => {
                            ii.entries.insert(name.into(), vec![(lsn, child)]);
                        }
                    }
                }
                Mutation::Symlink { ino, target } => {
                    self.inode_mut(tl, ino)?.symlink = Some(target.into());
                }
                Mutation::External { ino, object, end } => {
                    let owner = *self.objects.entry(object).or_insert(tl);
                    if owner != tl {
                        return Err(format!(
                            "timeline {tl} names object {object} of timeline {owner}"
                        ));
                    }
                    self.next_object = self.next_object.max(object + 1);
                    push_version(
                        &mut self.inode_mut(tl, ino)?.external,
                        lsn,
                        Extent { object, end },
                    );
                }
            }
        }
        if let Some(t) = self.timelines.get_mut(&tl) {
            t.own_bytes += frame_len;
        }
        self.next_lsn = lsn + 1;
        debug_assert!(self.next_ino > ROOT_INO);
        Ok(())
    }

    /// A copy of every timeline's inodes that shares their versions (see [`SharedIndex`]).
    pub(crate) fn share_index(&self) -> SharedIndex {
        let mut timelines: Vec<SharedTimeline> = self
            .timelines
            .values()
            .map(|t| SharedTimeline {
                id: t.id,
                parent: t.parent,
                own_bytes: t.own_bytes,
                inodes: t.inodes.iter().map(|(i, ii)| (*i, ii.clone())).collect(),
            })
            .collect();
        timelines.sort_by_key(|t| t.id);
        SharedIndex { timelines }
    }

    fn inode_mut(&mut self, tl: TimelineId, ino: Ino) -> Result<&mut InodeIndex, String> {
        let t = self
            .timelines
            .get_mut(&tl)
            .ok_or_else(|| format!("change to missing timeline {tl}"))?;
        Ok(Arc::make_mut(t.inodes.entry(ino).or_default()))
    }
}
