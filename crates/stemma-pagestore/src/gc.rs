//! Garbage collection of the index: which versions some reader can still reach.
//!
//! A timeline's own versions of a key (an inode's attributes, a page, a directory entry) are
//! read from a fixed set of **read points**, each seeing the newest version strictly below it:
//!
//! - its head (every version),
//! - each live child's branch bound (a child, and all of its descendants, read the timeline
//!   there: a grandchild's chain carries its parent's bound for this level),
//! - every position `p ≥ horizon`, where a branch at a past position may still be taken: all
//!   versions at or after the horizon, plus the newest one before it.
//!
//! A version that is the newest below no read point is dropped. GC never changes what a read
//! point sees, so it needs no coordination with readers beyond the write lock, and the
//! ancestor cache (which caches what ancestors show at their bounds, all read points) stays
//! valid. On top of that:
//!
//! - a leading run of "empty" versions (a zero page, a freed inode, a removed name) is dropped
//!   when the ancestors show nothing for the key either: falling through finds the same
//!   nothing;
//! - an inode freed below every read point is unreachable from all of them (every lookup finds
//!   it freed), so its pages, entries and symlink go too.

use std::sync::Arc;

use crate::state::{InodeIndex, IntMap, Loc, SharedIndex, State, Versions, View, PACK_BIT};
use crate::types::{Attr, Ino, Lsn, TimelineId, PAGE_SIZE};

/// What one GC pass dropped from the index.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct GcCounts {
    pub versions_dropped: u64,
    pub inodes_dropped: u64,
}

/// Whether version `i` of `v` is the newest below some read point: the last, any at or after
/// the horizon, and any followed by a point before (or at) the next version. `points` is
/// sorted and includes the horizon.
fn keeps<T>(v: &[(Lsn, T)], i: usize, points: &[Lsn], horizon: Lsn) -> bool {
    let lsn = v[i].0;
    i + 1 == v.len() || lsn >= horizon || {
        let next = v[i + 1].0;
        // The first point above this version: it sees this one if the next is not below it.
        let j = points.partition_point(|p| *p <= lsn);
        points.get(j).is_some_and(|p| *p <= next)
    }
}

/// Whether [`prune`] would drop anything from `v` (a look that changes nothing, so that GC
/// touches, and copies out of a shared checkpoint copy, only what it changes).
fn prunable<T>(v: &[(Lsn, T)], points: &[Lsn], horizon: Lsn) -> bool {
    (0..v.len()).any(|i| !keeps(v, i, points, horizon))
}

/// Keeps only the versions [`keeps`] keeps; returns how many went.
fn prune<T>(v: &mut Versions<T>, points: &[Lsn], horizon: Lsn) -> u64 {
    let n = v.len();
    if n <= 1 {
        return 0;
    }
    let keep: Vec<bool> = (0..n).map(|i| keeps(v, i, points, horizon)).collect();
    let before = v.len();
    let mut it = keep.into_iter();
    v.retain(|_| it.next().unwrap_or(true));
    (before - v.len()) as u64
}

/// Drops the leading versions that `empty` says show nothing, when nothing shows through
/// from the ancestors either.
fn drop_leading_empty<T>(
    v: &mut Versions<T>,
    empty: impl Fn(&T) -> bool,
    ancestors_empty: impl FnOnce() -> bool,
) -> u64 {
    let lead = v.iter().take_while(|(_, x)| empty(x)).count();
    if lead == 0 || !ancestors_empty() {
        return 0;
    }
    v.drain(..lead);
    lead as u64
}

const ATTR_BYTES: u64 = 64;
const ENTRY_BYTES: u64 = 24;
const EXTERNAL_BYTES: u64 = 40;

/// Page versions with data in `v`.
fn data_versions(v: &[(Lsn, Loc)]) -> u64 {
    v.iter()
        .filter(|(_, loc)| matches!(loc, Loc::Data { .. }))
        .count() as u64
}

/// What an inode's versions hold: each page version with data, plus an estimate of the frame
/// bytes of each attribute and directory-entry version. Between GCs a timeline's `own_bytes`
/// grows by the size of each frame it commits, so it counts versions GC will drop; GC brings
/// it back to the sum of this over its inodes, what deleting the timeline would give back.
pub(crate) fn inode_own_bytes(ii: &InodeIndex) -> u64 {
    let mut n = ii.attrs.len() as u64 * ATTR_BYTES;
    n += ii.pages.values().map(|v| data_versions(v)).sum::<u64>() * PAGE_SIZE as u64;
    for (name, v) in &ii.entries {
        n += v.len() as u64 * (ENTRY_BYTES + name.len() as u64);
    }
    n += ii.symlink.as_ref().map_or(0, |s| s.len() as u64);
    n + ii.external.len() as u64 * EXTERNAL_BYTES
}

/// Each timeline's read points below its head: its children's branch bounds and the horizon,
/// sorted. A timeline with no children has the horizon alone.
fn read_points(
    parents: impl Iterator<Item = Option<(TimelineId, Lsn)>>,
    horizon: Lsn,
) -> IntMap<TimelineId, Vec<Lsn>> {
    let mut points: IntMap<TimelineId, Vec<Lsn>> = IntMap::default();
    for (p, at) in parents.flatten() {
        points.entry(p).or_default().push(at);
    }
    for v in points.values_mut() {
        v.push(horizon);
        v.sort_unstable();
        v.dedup();
    }
    points
}

/// One inode GC must look at, found on a shared copy of the index with no lock held.
pub(crate) struct Look {
    tl: TimelineId,
    ino: Ino,
    /// The pages with something to drop (every page when the inode is freed below every
    /// read point), at most [`LOOK_PAGES`]: a large file is several looks. Attributes,
    /// entries and the external file's versions are looked at every time (a few versions).
    pages: Vec<u64>,
}

/// Pages per [`Look`] at most.
const LOOK_PAGES: usize = 1024;

/// Splits `looks` into the batches one write-locked step of GC applies: at most `max_looks`
/// looks and about `max_pages` pages each.
pub(crate) fn batches(
    looks: &[Look],
    max_looks: usize,
    max_pages: usize,
) -> impl Iterator<Item = &[Look]> {
    let mut rest = looks;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut pages = 0;
        let mut n = 0;
        while n < rest.len() && n < max_looks && (n == 0 || pages < max_pages) {
            pages += rest[n].pages.len();
            n += 1;
        }
        let (batch, tail) = rest.split_at(n);
        rest = tail;
        Some(batch)
    })
}

/// What one GC pass will do, planned on a shared copy of the index ([`plan`]).
pub(crate) struct GcPlan {
    pub looks: Vec<Look>,
    /// Per timeline: the bytes its inodes held in the copy ([`inode_own_bytes`]), and its
    /// `own_bytes` counter then (frames committed since are added back at the end).
    own: Vec<(TimelineId, u64, u64)>,
    /// Versions in the copy.
    pub versions: u64,
    /// The most attribute versions one inode had in the copy: what a write to it copies
    /// while a shared copy is alive (see `SharedIndex`).
    pub longest_attrs: u64,
}

/// Finds, with no lock held, the inodes and pages where GC may drop something (a superset:
/// [`State::gc_apply`] decides with the read points of the moment). O(index), the walk that
/// used to hold the write lock.
pub(crate) fn plan(shared: &SharedIndex, horizon: Lsn) -> GcPlan {
    let points = read_points(shared.timelines.iter().map(|t| t.parent), horizon);
    let alone = [horizon];
    let mut plan = GcPlan {
        looks: Vec::new(),
        own: Vec::with_capacity(shared.timelines.len()),
        versions: 0,
        longest_attrs: 0,
    };
    for t in &shared.timelines {
        let pts = points.get(&t.id).map_or(&alone[..], Vec::as_slice);
        let mut bytes = 0u64;
        for (ino, ii) in &t.inodes {
            bytes += inode_own_bytes(ii);
            plan.versions += ii.versions();
            plan.longest_attrs = plan.longest_attrs.max(ii.attrs.len() as u64);
            if let Some(pages) = look_at(ii, pts, horizon) {
                if pages.is_empty() {
                    plan.looks.push(Look {
                        tl: t.id,
                        ino: *ino,
                        pages: Vec::new(),
                    });
                }
                for chunk in pages.chunks(LOOK_PAGES) {
                    plan.looks.push(Look {
                        tl: t.id,
                        ino: *ino,
                        pages: chunk.to_vec(),
                    });
                }
            }
        }
        plan.own.push((t.id, bytes, t.own_bytes));
    }
    plan
}

/// Whether GC may drop something from an inode, with the pages to look at: all of them when
/// it is freed below every read point (everything goes).
fn look_at(ii: &InodeIndex, points: &[Lsn], horizon: Lsn) -> Option<Vec<u64>> {
    let kept: Vec<&(Lsn, Option<Attr>)> = (0..ii.attrs.len())
        .filter(|i| keeps(&ii.attrs, *i, points, horizon))
        .map(|i| &ii.attrs[i])
        .collect();
    if matches!(kept.as_slice(), [(l, None)] if *l < points[0]) {
        return Some(ii.pages.keys().copied().collect());
    }
    let pages: Vec<u64> = ii
        .pages
        .iter()
        .filter(|(_, v)| {
            prunable(v, points, horizon) || v.first().is_some_and(|(_, l)| *l == Loc::Zero)
        })
        .map(|(page, _)| *page)
        .collect();
    let other = kept.len() < ii.attrs.len()
        || ii.attrs.first().is_some_and(|(_, a)| a.is_none())
        || prunable(&ii.external, points, horizon)
        || ii
            .entries
            .values()
            .any(|v| prunable(v, points, horizon) || v.first().is_some_and(|(_, c)| c.is_none()));
    (other || !pages.is_empty()).then_some(pages)
}

/// What [`State::gc_apply`] dropped per timeline, in [`inode_own_bytes`]'s measure.
pub(crate) type DroppedBytes = IntMap<TimelineId, u64>;

impl State {
    /// GC of the inodes `looks` names, with the read points of the moment (children created
    /// since the plan start at or after the horizon, which keeps what they see; children
    /// deleted since only leave more for the next pass). Inodes gone since are skipped.
    pub(crate) fn gc_apply(
        &mut self,
        looks: &[Look],
        horizon: Lsn,
        counts: &mut GcCounts,
        dropped: &mut DroppedBytes,
    ) {
        let points = read_points(self.timelines.values().map(|t| t.parent), horizon);
        let alone = [horizon];
        for look in looks {
            let Some(t) = self.timelines.get_mut(&look.tl) else {
                continue;
            };
            // Taken out, so that the ancestors (other timelines) can be read while it changes.
            let Some(mut arc) = t.inodes.remove(&look.ino) else {
                continue;
            };
            let chain = t.chain[1..].to_vec();
            let anc = View {
                st: self,
                chain: &chain,
            };
            let pts = points.get(&look.tl).map_or(&alone[..], Vec::as_slice);
            // Unshared once the plan's copy is gone: no copy.
            let ii = Arc::make_mut(&mut arc);
            let r = gc_inode(&anc, look.ino, ii, pts, horizon, &look.pages);
            counts.versions_dropped += r.versions;
            *dropped.entry(look.tl).or_default() += r.bytes;
            if r.gone {
                counts.inodes_dropped += 1;
            } else if let Some(t) = self.timelines.get_mut(&look.tl) {
                t.inodes.insert(look.ino, arc);
            }
        }
    }

    /// Sets each timeline's `own_bytes` to what its versions hold after the pass, plus the
    /// frames it committed since the plan's copy.
    pub(crate) fn gc_finish(&mut self, plan: &GcPlan, dropped: &DroppedBytes) {
        for (tl, held, counter) in &plan.own {
            if let Some(t) = self.timelines.get_mut(tl) {
                let since = t.own_bytes.saturating_sub(*counter);
                let gone = dropped.get(tl).copied().unwrap_or(0);
                t.own_bytes = held.saturating_sub(gone) + since;
            }
        }
    }

    /// Versions in the index (attributes, pages, entries), for reports and tests.
    pub(crate) fn index_versions(&self) -> u64 {
        self.timelines
            .values()
            .flat_map(|t| t.inodes.values())
            .map(|ii| ii.versions())
            .sum()
    }

    /// Points the page version `(tl, ino, page, lsn)` at `to` if it is still at `from`.
    /// Returns whether it did (the timeline may have been deleted since).
    pub(crate) fn relocate(
        &mut self,
        tl: TimelineId,
        ino: Ino,
        page: u64,
        lsn: Lsn,
        from: Loc,
        to: Loc,
    ) -> bool {
        let Some(v) = self
            .timelines
            .get_mut(&tl)
            .and_then(|t| t.inodes.get_mut(&ino))
            .and_then(|ii| Arc::make_mut(ii).pages.get_mut(&page))
        else {
            return false;
        };
        match v.binary_search_by_key(&lsn, |(l, _)| *l) {
            Ok(i) if v[i].1 == from => {
                v[i].1 = to;
                true
            }
            _ => false,
        }
    }
}

/// Calls `f(timeline, ino, page, lsn, file, off)` for every page version with data of `inodes`.
pub(crate) fn data_locs<'a>(
    inodes: impl Iterator<Item = (TimelineId, Ino, &'a InodeIndex)>,
    mut f: impl FnMut(TimelineId, Ino, u64, Lsn, u32, u64),
) {
    for (tl, ino, ii) in inodes {
        for (page, v) in &ii.pages {
            for (lsn, loc) in v {
                if let Loc::Data { file, off } = *loc {
                    f(tl, ino, *page, *lsn, file, off);
                }
            }
        }
    }
}

/// Whether a file id names a pack.
pub(crate) fn is_pack(id: u32) -> bool {
    id & PACK_BIT != 0
}

/// What GC did to one inode.
struct InodeGc {
    versions: u64,
    /// In [`inode_own_bytes`]'s measure.
    bytes: u64,
    /// Every version went: the inode leaves the timeline's index.
    gone: bool,
}

/// GC of one inode of one timeline, looking at `pages` only.
fn gc_inode(
    anc: &View<'_>,
    ino: Ino,
    ii: &mut InodeIndex,
    points: &[Lsn],
    horizon: Lsn,
    pages: &[u64],
) -> InodeGc {
    let mut versions = prune(&mut ii.attrs, points, horizon);
    let mut bytes = versions * ATTR_BYTES;
    // Freed below every read point: no read point can look the inode up, so what it held
    // here is unreachable (its pages go as they are looked at, a large file over several
    // looks).
    let freed_for_all = matches!(ii.attrs.as_slice(), [(l, None)] if *l < points[0]);
    if freed_for_all {
        versions += ii.entries.values().map(|v| v.len() as u64).sum::<u64>();
        versions += ii.external.len() as u64;
        bytes += ii
            .entries
            .iter()
            .map(|(name, v)| v.len() as u64 * (ENTRY_BYTES + name.len() as u64))
            .sum::<u64>();
        bytes += ii.symlink.as_ref().map_or(0, |s| s.len() as u64);
        bytes += ii.external.len() as u64 * EXTERNAL_BYTES;
        ii.entries.clear();
        ii.symlink = None;
        ii.external.clear();
    }
    let external = prune(&mut ii.external, points, horizon);
    versions += external;
    bytes += external * EXTERNAL_BYTES;
    for page in pages {
        if freed_for_all {
            if let Some(v) = ii.pages.remove(page) {
                versions += v.len() as u64;
                bytes += data_versions(&v) * PAGE_SIZE as u64;
            }
            continue;
        }
        // A persistent map's `get_mut` copies the nodes on its path that a copy shares: only
        // the pages with something to drop are touched.
        let Some(v) = ii.pages.get_mut(page) else {
            continue;
        };
        let data_before = data_versions(v);
        versions += prune(v, points, horizon);
        versions += drop_leading_empty(
            v,
            |l| *l == Loc::Zero,
            || anc.walk_page(anc.chain, ino, *page) == Loc::Zero,
        );
        bytes += (data_before - data_versions(v)) * PAGE_SIZE as u64;
        if v.is_empty() {
            ii.pages.remove(page);
        }
    }
    ii.entries.retain(|name, v| {
        let n = prune(v, points, horizon)
            + drop_leading_empty(v, Option::is_none, || anc.entry(ino, name).is_none());
        versions += n;
        bytes += n * (ENTRY_BYTES + name.len() as u64);
        !v.is_empty()
    });
    // A freed inode's last attribute version goes with its last page, not before: the next
    // look at its remaining pages needs it to know they go too.
    if !freed_for_all || ii.pages.is_empty() {
        let lead = drop_leading_empty(&mut ii.attrs, Option::is_none, || anc.attr(ino).is_none());
        versions += lead;
        bytes += lead * ATTR_BYTES;
    }
    let gone = ii.attrs.is_empty()
        && ii.pages.is_empty()
        && ii.entries.is_empty()
        && ii.symlink.is_none()
        && ii.external.is_empty();
    InodeGc {
        versions,
        bytes,
        gone,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_bound_looks_and_pages_and_cover_everything_once() {
        let look = |n: usize| Look {
            tl: TimelineId(1),
            ino: n as u64,
            pages: (0..n as u64).collect(),
        };
        let looks: Vec<Look> = [0, 5000, 10, 10, 10, 3000, 0, 0, 1].map(look).into();
        let sizes: Vec<Vec<usize>> = batches(&looks, 3, 4096)
            .map(|b| b.iter().map(|l| l.pages.len()).collect())
            .collect();
        // A look larger than a batch goes alone; otherwise up to 3 looks, stopping once the
        // pages reach 4096.
        assert_eq!(
            sizes,
            vec![vec![0, 5000], vec![10, 10, 10], vec![3000, 0, 0], vec![1]]
        );
        assert_eq!(batches(&[], 3, 4096).count(), 0);
    }

    #[test]
    fn prune_keeps_the_newest_below_every_point() {
        let mut v: Versions<u8> = (1..=10).map(|l| (l * 10, l as u8)).collect();
        // Points: a child bound at 35, the horizon at 75. Versions 10..=100 every 10.
        let dropped = prune(&mut v, &[35, 75], 75);
        let kept: Vec<u64> = v.iter().map(|(l, _)| *l).collect();
        // 30 is newest below 35; 70 newest below 75; 80, 90, 100 at/after the horizon.
        assert_eq!(kept, vec![30, 70, 80, 90, 100]);
        assert_eq!(dropped, 5);
        // A point exactly at a version's position does not see it (strictly below).
        let mut v: Versions<u8> = vec![(10, 1), (20, 2), (30, 3)];
        prune(&mut v, &[20], 1000);
        assert_eq!(v, vec![(10, 1), (30, 3)]);
    }

    #[test]
    fn leading_empty_versions_go_only_when_nothing_shows_through() {
        let mut v: Versions<Option<u8>> = vec![(1, None), (2, None), (3, Some(1))];
        assert_eq!(drop_leading_empty(&mut v, Option::is_none, || false), 0);
        assert_eq!(drop_leading_empty(&mut v, Option::is_none, || true), 2);
        assert_eq!(v, vec![(3, Some(1))]);
    }
}
