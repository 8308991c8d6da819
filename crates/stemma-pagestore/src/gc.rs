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

use crate::state::{InodeIndex, IntMap, Loc, State, Versions, View, PACK_BIT};
use crate::types::{Ino, Lsn, TimelineId, PAGE_SIZE};

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

/// What a timeline's versions still hold after GC: each page version with data, plus an
/// estimate of the frame bytes of each attribute and directory-entry version. Between GCs
/// `own_bytes` grows by the size of each frame the timeline commits, so it counts versions
/// GC will drop; here it comes back to what deleting the timeline would give back.
fn own_bytes(inodes: &IntMap<Ino, Arc<InodeIndex>>) -> u64 {
    const ATTR_BYTES: u64 = 64;
    const ENTRY_BYTES: u64 = 24;
    const EXTERNAL_BYTES: u64 = 40;
    let mut n = 0u64;
    for ii in inodes.values() {
        n += ii.attrs.len() as u64 * ATTR_BYTES;
        for v in ii.pages.values() {
            n += v
                .iter()
                .filter(|(_, loc)| matches!(loc, Loc::Data { .. }))
                .count() as u64
                * PAGE_SIZE as u64;
        }
        for (name, v) in &ii.entries {
            n += v.len() as u64 * (ENTRY_BYTES + name.len() as u64);
        }
        n += ii.symlink.as_ref().map_or(0, |s| s.len() as u64);
        n += ii.external.len() as u64 * EXTERNAL_BYTES;
    }
    n
}

impl State {
    /// Drops every version no read point can reach (see the module docs). `horizon` is the
    /// oldest position a branch may still start at.
    pub(crate) fn gc(&mut self, horizon: Lsn) -> GcCounts {
        let mut counts = GcCounts::default();
        let mut bounds: IntMap<TimelineId, Vec<Lsn>> = IntMap::default();
        for t in self.timelines.values() {
            if let Some((p, at)) = t.parent {
                bounds.entry(p).or_default().push(at);
            }
        }
        let mut ids: Vec<TimelineId> = self.timelines.keys().copied().collect();
        ids.sort();
        for id in ids {
            let mut points = bounds.remove(&id).unwrap_or_default();
            points.push(horizon);
            points.sort_unstable();
            points.dedup();
            let first_point = points[0];
            // Taken out, so that the ancestors (other timelines) can be read while it changes.
            let Some(mut inodes) = self
                .timelines
                .get_mut(&id)
                .map(|t| std::mem::take(&mut t.inodes))
            else {
                continue;
            };
            if let Some(t) = self.timelines.get(&id) {
                let anc = View {
                    st: self,
                    chain: &t.chain[1..],
                };
                inodes.retain(|ino, ii| {
                    // Nothing shares the inode while GC runs (a checkpoint's copy lives only
                    // inside maintenance, like GC): no copy.
                    let ii = Arc::make_mut(ii);
                    let (v, gone) = gc_inode(&anc, *ino, ii, &points, horizon, first_point);
                    counts.versions_dropped += v;
                    counts.inodes_dropped += u64::from(gone);
                    !gone
                });
            }
            if let Some(t) = self.timelines.get_mut(&id) {
                t.own_bytes = own_bytes(&inodes);
                t.inodes = inodes;
            }
        }
        self.gc_horizon = self.gc_horizon.max(horizon);
        counts
    }

    /// Versions in the index (attributes, pages, entries), for reports and tests.
    pub(crate) fn index_versions(&self) -> u64 {
        let mut n = 0u64;
        for t in self.timelines.values() {
            for ii in t.inodes.values() {
                n += ii.attrs.len() as u64;
                n += ii.pages.values().map(|v| v.len() as u64).sum::<u64>();
                n += ii.entries.values().map(|v| v.len() as u64).sum::<u64>();
            }
        }
        n
    }

    /// Bytes of page data the index references, per data file id.
    pub(crate) fn live_bytes(&self) -> IntMap<u32, u64> {
        let mut live: IntMap<u32, u64> = IntMap::default();
        self.for_each_data_loc(|_, _, _, _, file, _| {
            *live.entry(file).or_default() += crate::types::PAGE_SIZE as u64;
        });
        live
    }

    /// Calls `f(timeline, ino, page, lsn, file, off)` for every page version with data.
    pub(crate) fn for_each_data_loc(&self, mut f: impl FnMut(TimelineId, Ino, u64, Lsn, u32, u64)) {
        for t in self.timelines.values() {
            for (ino, ii) in &t.inodes {
                for (page, v) in &ii.pages {
                    for (lsn, loc) in v {
                        if let Loc::Data { file, off } = *loc {
                            f(t.id, *ino, *page, *lsn, file, off);
                        }
                    }
                }
            }
        }
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

    /// Whether any index entry points into data file `id` (a check for tests and for the
    /// cleanup at open).
    pub(crate) fn referenced_files(&self) -> std::collections::BTreeSet<u32> {
        let mut s = std::collections::BTreeSet::new();
        self.for_each_data_loc(|_, _, _, _, file, _| {
            s.insert(file);
        });
        s
    }
}

/// Whether a file id names a pack.
pub(crate) fn is_pack(id: u32) -> bool {
    id & PACK_BIT != 0
}

/// GC of one inode of one timeline: (versions dropped, whether the whole inode goes).
fn gc_inode(
    anc: &View<'_>,
    ino: Ino,
    ii: &mut InodeIndex,
    points: &[Lsn],
    horizon: Lsn,
    first_point: Lsn,
) -> (u64, bool) {
    let mut dropped = prune(&mut ii.attrs, points, horizon);
    // Freed below every read point: no read point can look the inode up, so what it held
    // here is unreachable.
    let freed_for_all = matches!(ii.attrs.as_slice(), [(l, None)] if *l < first_point);
    if freed_for_all {
        dropped += ii.pages.values().map(|v| v.len() as u64).sum::<u64>();
        dropped += ii.entries.values().map(|v| v.len() as u64).sum::<u64>();
        dropped += ii.external.len() as u64;
        ii.pages.clear();
        ii.entries.clear();
        ii.symlink = None;
        ii.external.clear();
    }
    dropped += prune(&mut ii.external, points, horizon);
    dropped += drop_leading_empty(&mut ii.attrs, Option::is_none, || anc.attr(ino).is_none());
    // Looked at first, changed only where something goes: a persistent map's `get_mut` copies
    // the nodes on its path when a checkpoint's copy shares them.
    let edits: Vec<u64> = ii
        .pages
        .iter()
        .filter(|(_, v)| {
            prunable(v, points, horizon) || v.first().is_some_and(|(_, l)| *l == Loc::Zero)
        })
        .map(|(page, _)| *page)
        .collect();
    for page in edits {
        let Some(v) = ii.pages.get_mut(&page) else {
            continue;
        };
        dropped += prune(v, points, horizon);
        dropped += drop_leading_empty(
            v,
            |l| *l == Loc::Zero,
            || anc.walk_page(anc.chain, ino, page) == Loc::Zero,
        );
        if v.is_empty() {
            ii.pages.remove(&page);
        }
    }
    ii.entries.retain(|name, v| {
        dropped += prune(v, points, horizon);
        dropped += drop_leading_empty(v, Option::is_none, || anc.entry(ino, name).is_none());
        !v.is_empty()
    });
    let gone = ii.attrs.is_empty()
        && ii.pages.is_empty()
        && ii.entries.is_empty()
        && ii.symlink.is_none()
        && ii.external.is_empty();
    (dropped, gone)
}

#[cfg(test)]
mod tests {
    use super::*;

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
