//! The write buffer: page overwrites that wait in memory until their file is synced.
//!
//! Why: one fsync makes the whole log durable, so without this every page PostgreSQL evicts
//! from its shared buffers lands in the log and the next commit's WAL fsync has to flush it
//! too. On a native filesystem those pages wait in the kernel's page cache until the
//! checkpoint fsyncs their file (or the kernel's writeback gets to them, after 30 s). This
//! buffer does the same for the page store: an overwrite of pages inside a file's current size
//! is kept here, and only becomes a frame of the log ("committed") when
//!
//! - its file is synced ([`crate::PageStore::sync_file`]: FUSE's fsync of that file),
//! - anything else changes that file's size or pages through the ordinary path (a write past
//!   the end, a truncate), which commits the buffered pages first so the file's own order holds,
//! - the buffer is over its memory limit (oldest files first), or a file's oldest buffered page
//!   is older than the age limit ([`crate::PageStore::flush_buffered`], run by the server).
//!
//! Until then the pages are visible to reads of the same timeline (they overlay the index) and
//! to nothing else: a branch sees the log only, exactly as after a power cut that lost the
//! unsynced writes. Losing them in a crash is allowed: nobody fsynced them.
//!
//! Only size-preserving overwrites are buffered, so a buffered page never needs an attribute
//! change to be committed with it (times are the kernel's, which keeps them with its writeback
//! cache and sends them with its next SETATTR). Inode numbers are never reused, so a buffered
//! page whose inode has gone by the time it is committed is simply dropped.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use crate::types::{Ino, TimelineId, PAGE_SIZE};

/// The buffered pages of one file.
pub(crate) struct DirtyFile {
    pub pages: BTreeMap<u64, Box<[u8]>>,
    /// When the oldest of them was buffered.
    pub since: Instant,
    /// Files are committed oldest first: this orders them (`since` may tie).
    pub seq: u64,
}

#[derive(Default)]
pub(crate) struct WriteBuffer {
    pub files: HashMap<(TimelineId, Ino), DirtyFile>,
    pub bytes: usize,
    next_seq: u64,
}

impl WriteBuffer {
    /// The buffered copy of a page, if any.
    pub fn page(&self, tl: TimelineId, ino: Ino, page: u64) -> Option<&[u8]> {
        self.files
            .get(&(tl, ino))
            .and_then(|f| f.pages.get(&page))
            .map(|p| &p[..])
    }

    pub fn has(&self, tl: TimelineId, ino: Ino) -> bool {
        self.files.contains_key(&(tl, ino))
    }

    /// The page's buffered copy to change in place, created from `current` (the committed
    /// version) when it has none.
    pub fn page_mut(
        &mut self,
        tl: TimelineId,
        ino: Ino,
        page: u64,
        current: impl FnOnce(&mut [u8]) -> crate::Result<()>,
    ) -> crate::Result<&mut [u8]> {
        if !self
            .files
            .get(&(tl, ino))
            .is_some_and(|f| f.pages.contains_key(&page))
        {
            let mut buf = vec![0u8; PAGE_SIZE].into_boxed_slice();
            current(&mut buf)?;
            let seq = &mut self.next_seq;
            self.files
                .entry((tl, ino))
                .or_insert_with(|| {
                    *seq += 1;
                    DirtyFile {
                        pages: BTreeMap::new(),
                        since: Instant::now(),
                        seq: *seq,
                    }
                })
                .pages
                .insert(page, buf);
            self.bytes += PAGE_SIZE;
        }
        match self
            .files
            .get_mut(&(tl, ino))
            .and_then(|f| f.pages.get_mut(&page))
        {
            Some(p) => Ok(&mut p[..]),
            None => unreachable!("the page was inserted above"),
        }
    }

    /// Takes a file's buffered pages out (to commit or drop them).
    pub fn take(&mut self, tl: TimelineId, ino: Ino) -> Option<BTreeMap<u64, Box<[u8]>>> {
        let f = self.files.remove(&(tl, ino))?;
        self.bytes -= f.pages.len() * PAGE_SIZE;
        Some(f.pages)
    }

    /// Takes up to `n` of a file's buffered pages out, lowest first.
    pub fn take_some(&mut self, tl: TimelineId, ino: Ino, n: usize) -> Vec<(u64, Box<[u8]>)> {
        let Some(f) = self.files.get_mut(&(tl, ino)) else {
            return Vec::new();
        };
        let mut out = Vec::with_capacity(n.min(f.pages.len()));
        while out.len() < n {
            match f.pages.pop_first() {
                Some(p) => out.push(p),
                None => break,
            }
        }
        if f.pages.is_empty() {
            self.files.remove(&(tl, ino));
        }
        self.bytes -= out.len() * PAGE_SIZE;
        out
    }

    /// Takes the listed pages out (those buffered).
    pub fn take_pages(&mut self, tl: TimelineId, ino: Ino, pages: &[u64]) -> Vec<(u64, Box<[u8]>)> {
        let Some(f) = self.files.get_mut(&(tl, ino)) else {
            return Vec::new();
        };
        let out: Vec<_> = pages
            .iter()
            .filter_map(|p| f.pages.remove(p).map(|d| (*p, d)))
            .collect();
        if f.pages.is_empty() {
            self.files.remove(&(tl, ino));
        }
        self.bytes -= out.len() * PAGE_SIZE;
        out
    }

    /// The numbers of a file's buffered pages, lowest first.
    pub fn page_numbers(&self, tl: TimelineId, ino: Ino) -> Vec<u64> {
        self.first_pages(tl, ino, usize::MAX)
    }

    /// The numbers of up to `n` of a file's buffered pages, lowest first.
    pub fn first_pages(&self, tl: TimelineId, ino: Ino, n: usize) -> Vec<u64> {
        self.files
            .get(&(tl, ino))
            .map(|f| f.pages.keys().take(n).copied().collect())
            .unwrap_or_default()
    }

    pub fn pages_of(&self, tl: TimelineId, ino: Ino) -> usize {
        self.files.get(&(tl, ino)).map_or(0, |f| f.pages.len())
    }

    /// Forgets every buffered page of a timeline (it is being deleted).
    pub fn drop_timeline(&mut self, tl: TimelineId) {
        let gone: Vec<_> = self.files.keys().filter(|k| k.0 == tl).copied().collect();
        for k in gone {
            self.take(k.0, k.1);
        }
    }

    /// Files to commit: all of a timeline's (`only`), or those buffered before `older_than`,
    /// then the oldest others until what stays is at most `keep_bytes`.
    pub fn pick(
        &self,
        only: Option<TimelineId>,
        older_than: Option<Instant>,
        keep_bytes: usize,
    ) -> Vec<(TimelineId, Ino)> {
        let mut files: Vec<_> = self
            .files
            .iter()
            .filter(|(k, _)| only.is_none_or(|t| k.0 == t))
            .map(|(k, f)| (f.seq, f.since, *k, f.pages.len() * PAGE_SIZE))
            .collect();
        files.sort_unstable_by_key(|f| f.0);
        let mut left = self.bytes;
        let mut out = Vec::new();
        for (_, since, key, bytes) in files {
            let old = older_than.is_some_and(|t| since <= t);
            if only.is_some() || old || left > keep_bytes {
                out.push(key);
                left -= bytes;
            }
        }
        out
    }
}
