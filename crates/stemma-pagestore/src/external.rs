//! External files: a file whose contents live in a file of their own, an *object* under
//! `<store>/objects/`, instead of pages in the log. Made for PostgreSQL's WAL segments, whose
//! every commit is an fdatasync: a front end can hand the object to the kernel (FUSE
//! passthrough), so that writes cost no round trip to the store and an fsync costs one
//! fdatasync of the object. See `docs/pagestore.md`, "External files".
//!
//! **Versions without seeing the writes.** The store does not see an external file's writes,
//! only its fsyncs. What makes branches and points in time work is a discipline its writers
//! keep (PostgreSQL's WAL with `wal_recycle = off` and `wal_init_zero = on` does): a file's
//! written part is a run of pages none of which is all zeros, followed by zeros, and no page
//! before the last written one ever changes (the last one does: PostgreSQL goes on filling
//! the page its last write ended in). At each fsync the store finds the last written page
//! (looking from the last recorded one to the first all-zero page), fdatasyncs the object and
//! notes where that page starts, its bytes and the file's size; the next frame of any kind
//! commits the note first (`SetAttr`, `External { ino, object, end }` and a `Page` of the
//! inode at `end`), with no fsync of the log of its own: the object's fdatasync is the
//! durability, and the note goes before, in the log's order, every change made after the
//! fsync returned, which is what a branch needs by PostgreSQL's WAL-before-data rule. The file
//! as of a position is then its object's pages below the recorded end, the logged last page,
//! and zeros.
//!
//! **Ownership.** An object is written only by the timeline that created it (its *owner*, the
//! one whose own versions name it). Another timeline that sees the file (a branch) reads it as
//! of its branch point; to write it, it first copies what it sees into an object of its own
//! (*materializes* it, at most a WAL segment, once per branch).
//!
//! **Space.** An object is deleted once no version in the index names it: after GC dropped
//! the last one and a checkpoint says so (so that a restart, which replays the log after the
//! checkpoint, cannot bring a reference back), or at open for objects a crash left unnamed.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::format::Mutation;
use crate::log::sync_dir;
use crate::state::{Extent, Loc, State, View};
use crate::store::{timeline, PageStore};
use crate::types::{Attr, Ino, TimelineId, PAGE_SIZE};

/// The directory of a store's objects.
pub(crate) fn objects_dir(store_dir: &Path) -> PathBuf {
    store_dir.join("objects")
}

pub(crate) fn object_path(store_dir: &Path, id: u64) -> PathBuf {
    objects_dir(store_dir).join(format!("{id:016x}.obj"))
}

/// An external file's end, last page and size found by an fsync, not yet committed.
#[derive(Debug, Clone)]
pub(crate) struct PendingExtent {
    pub object: u64,
    pub end: u64,
    /// The page at `end` as the fsync found it (`None`: the file has no written page).
    pub tail: Option<Vec<u8>>,
    pub size: u64,
    /// Which fsync found it (they are numbered): a later one's note wins.
    pub seq: u64,
}

/// The mutations that record an external file's state: its size, where its last written
/// page starts (`External`) and that page's bytes (a page version of the inode, so that GC,
/// compaction and checkpoints keep it like any other page).
pub(crate) fn extent_mutations(
    ino: Ino,
    attr: Attr,
    object: u64,
    end: u64,
    tail: Option<&[u8]>,
) -> Vec<Mutation<'_>> {
    let mut muts = vec![
        Mutation::SetAttr(attr),
        Mutation::External { ino, object, end },
    ];
    let page = end / PAGE_SIZE as u64;
    muts.push(match tail {
        Some(data) => Mutation::Page {
            ino,
            page,
            data,
            data_off: 0,
        },
        None => Mutation::ZeroPage { ino, page },
    });
    muts
}

/// What a timeline sees of one external file.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ExternalView {
    pub extent: Extent,
    /// Whether the timeline owns the object: then it is read and written as it is now.
    pub owned: bool,
    pub attr: Attr,
    /// The timeline and inode it is a view of (to find the logged last page when needed).
    pub tl: TimelineId,
    pub ino: Ino,
}

/// What an fsync of an external file noted: object, end, checksum of the last page, size.
pub(crate) type Noted = (u64, u64, u32, u64);

/// What an fsync finds of an external file: where its last written page starts (every page
/// before it is final) and that page's bytes.
pub(crate) struct Found {
    pub end: u64,
    pub tail: Option<Vec<u8>>,
}

/// Every object some version of the index names.
pub(crate) fn referenced_objects(st: &State) -> HashSet<u64> {
    let mut s = HashSet::new();
    for t in st.timelines.values() {
        for ii in t.inodes.values() {
            s.extend(ii.external.iter().map(|(_, x)| x.object));
        }
    }
    s
}

/// Sets the owner of every object named in the index (the timeline whose own versions name
/// it), and the next object number past them.
pub(crate) fn rebuild_objects(st: &mut State) {
    let mut objects = crate::state::IntMap::default();
    for t in st.timelines.values() {
        for ii in t.inodes.values() {
            for (_, x) in &ii.external {
                objects.insert(x.object, t.id);
                st.next_object = st.next_object.max(x.object + 1);
            }
        }
    }
    st.objects = objects;
}

/// The last written page of an external file, looking from page `from` (the last one found
/// before: the pages before it are final) up to the first all-zero page or the end of the
/// file. Its bytes are what a branch will see of that page: PostgreSQL goes on filling the
/// page its last WAL write ended in (and a concurrent insertion may fill a gap in it), so
/// only the pages before it are final.
///
/// The written part is a run of non-zero pages followed by zeros (the discipline above), so
/// the first zero page is found by galloping (1, 2, 4... pages on) and then halving: a few
/// reads however much was written since `from`. A page-by-page scan read the whole WAL of a
/// bulk load once, under the state lock, in the live directories' mirror: 12.5% of the
/// helper's samples during `pgbench -i` (`perf`, scale 50).
pub(crate) fn last_written_page(file: &File, from: u64, len: u64, path: &Path) -> Result<Found> {
    let ps = PAGE_SIZE as u64;
    let pages = len.div_ceil(ps);
    let first = from / ps;
    let mut buf = vec![0u8; PAGE_SIZE];
    // Reads page `i` into `buf`; whether it has a non-zero byte.
    let written = |i: u64, buf: &mut Vec<u8>| -> Result<bool> {
        let at = i * ps;
        let n = ps.min(len - at) as usize;
        buf.fill(0);
        file.read_exact_at(&mut buf[..n], at)
            .map_err(Error::io("reading an external file's end", path))?;
        Ok(buf.iter().any(|b| *b != 0))
    };
    if first >= pages || !written(first, &mut buf)? {
        return Ok(Found {
            end: first * ps,
            tail: None,
        });
    }
    // `lo` is written (its bytes in `tail`); every page from `hi` on is not (or past the end).
    let mut tail = buf.clone();
    let (mut lo, mut hi) = (first, pages);
    let mut step = 1;
    while lo + step < hi {
        if written(lo + step, &mut buf)? {
            lo += step;
            tail.copy_from_slice(&buf);
            step *= 2;
        } else {
            hi = lo + step;
            break;
        }
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if written(mid, &mut buf)? {
            lo = mid;
            tail.copy_from_slice(&buf);
        } else {
            hi = mid;
        }
    }
    Ok(Found {
        end: lo * ps,
        tail: Some(tail),
    })
}

impl PageStore {
    /// What `tl` sees of `ino` if it is an external file (`None` for other files).
    pub(crate) fn external_view(
        &self,
        st: &State,
        tl: TimelineId,
        ino: Ino,
    ) -> Result<Option<ExternalView>> {
        let v = View::new(st, timeline(st, tl)?);
        let Some(extent) = v.extent(ino) else {
            return Ok(None);
        };
        let Some(attr) = v.attr(ino) else {
            return Ok(None);
        };
        Ok(Some(ExternalView {
            extent,
            owned: st.objects.get(&extent.object) == Some(&tl),
            attr,
            tl,
            ino,
        }))
    }

    /// What `tl` sees of `ino`, which must be an external file.
    pub(crate) fn view_of_external(&self, tl: TimelineId, ino: Ino) -> Result<ExternalView> {
        let st = self.state.read();
        self.external_view(&st, tl, ino)?
            .ok_or_else(|| Error::InvalidArgument(format!("inode {ino} is not external")))
    }

    /// The bytes of the last written page a view's record logged (zeros when there is
    /// none). Looked up only here, not with every view: getattr and the write path make
    /// views too, and they never need it.
    pub(crate) fn tail_bytes(&self, x: &ExternalView) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; PAGE_SIZE];
        let loc = {
            let st = self.state.read();
            let loc =
                View::new(&st, timeline(&st, x.tl)?).page(x.ino, x.extent.end / PAGE_SIZE as u64);
            match loc {
                Loc::Data { file: id, off } => Some((st.data_file(id, off)?, id, off)),
                Loc::Zero => None,
            }
        };
        if let Some((file, id, off)) = loc {
            file.read_exact_at(&mut buf, off).map_err(Error::io(
                "reading a page",
                crate::state::data_path(&self.dir, id),
            ))?;
        }
        Ok(buf)
    }

    /// The open file of object `id` (opened once, kept: objects are few and large).
    pub(crate) fn object_file(&self, id: u64) -> Result<Arc<File>> {
        let mut files = self.object_files.lock();
        if let Some(f) = files.get(&id) {
            return Ok(f.clone());
        }
        let path = object_path(&self.dir, id);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(Error::io("opening an external file's object", &path))?;
        let f = Arc::new(f);
        files.insert(id, f.clone());
        Ok(f)
    }

    /// A new, empty object file, durable in its directory; its number stays pending (safe
    /// from the sweep) until the caller commits a frame naming it or gives it up.
    fn new_object(&self) -> Result<(u64, Arc<File>)> {
        let id = {
            let mut st = self.state.write();
            let id = st.next_object;
            st.next_object += 1;
            st.pending_objects.insert(id);
            id
        };
        let dir = objects_dir(&self.dir);
        let path = object_path(&self.dir, id);
        let made = std::fs::create_dir_all(&dir)
            .map_err(Error::io("creating the objects directory", &dir))
            .and_then(|()| {
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    // Database contents: the store's user only (its directory is 0700 too).
                    .mode(0o600)
                    .open(&path)
                    .map_err(Error::io("creating an external file's object", &path))
            })
            .and_then(|f| sync_dir(&dir).map(|()| f));
        match made {
            Ok(f) => {
                let f = Arc::new(f);
                self.object_files.lock().insert(id, f.clone());
                Ok((id, f))
            }
            Err(e) => {
                self.give_up_object(id);
                Err(e)
            }
        }
    }

    /// Forgets a pending object that no frame will name, and deletes its file.
    fn give_up_object(&self, id: u64) {
        self.state.write().pending_objects.remove(&id);
        self.object_files.lock().remove(&id);
        let path = object_path(&self.dir, id);
        if let Err(e) = std::fs::remove_file(&path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), error = %e, "could not remove an unused object");
            }
        }
    }

    /// Creates an empty external file under `parent` (see the module docs); fails if the name
    /// exists.
    pub fn create_external(
        &self,
        tl: TimelineId,
        parent: Ino,
        name: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<Attr> {
        let (id, _) = self.new_object()?;
        let made = self.add_inode(
            tl,
            parent,
            name,
            |st| {
                self.new_inode(
                    st,
                    crate::FileKind::Regular,
                    (mode & 0o7777) as u16,
                    uid,
                    gid,
                )
            },
            None,
            Some(id),
        );
        match made {
            Ok(a) => {
                self.state.write().pending_objects.remove(&id);
                Ok(a)
            }
            Err(e) => {
                self.give_up_object(id);
                Err(e)
            }
        }
    }

    /// The object `tl` writes `ino` into, copying the part it sees into one of its own first
    /// if another timeline owns the one it sees.
    pub(crate) fn owned_object(&self, tl: TimelineId, ino: Ino) -> Result<Arc<File>> {
        let _one = self.materializing.lock();
        let x = self.view_of_external(tl, ino)?;
        if x.owned {
            return self.object_file(x.extent.object);
        }
        let src = self.object_file(x.extent.object)?;
        let tail = self.tail_bytes(&x)?;
        let (id, dst) = self.new_object()?;
        let copied = copy_prefix(&src, &dst, x.extent.end, &tail, x.attr.size).map_err(Error::io(
            "copying an external file for a branch",
            object_path(&self.dir, id),
        ));
        let committed = copied.and_then(|()| {
            let mut st = self.state.write();
            self.commit(
                &mut st,
                tl,
                &[Mutation::External {
                    ino,
                    object: id,
                    end: x.extent.end,
                }],
            )
        });
        match committed {
            Ok(_) => {
                self.state.write().pending_objects.remove(&id);
                tracing::debug!(timeline = %tl, ino, object = id, from = x.extent.object, bytes = x.extent.end, "materialized an external file");
                Ok(dst)
            }
            Err(e) => {
                self.give_up_object(id);
                Err(e)
            }
        }
    }

    /// Turns an ordinary file of `tl` into an external file with the same contents (its
    /// pages copied into a new object), if its contents keep the external files' discipline
    /// (a run of non-zero pages, then only zeros). Returns whether it did. For files written
    /// before their directory's external mount existed (`initdb`'s first WAL segment): the
    /// caller makes sure nothing has the file open. Earlier positions keep reading the pages.
    pub fn externalize(&self, tl: TimelineId, ino: Ino) -> Result<bool> {
        let _one = self.materializing.lock();
        // Buffered pages committed first: the copy reads them, and none must land later.
        self.sync_file(tl, ino)?;
        let size = {
            let st = self.state.read();
            let v = View::new(&st, timeline(&st, tl)?);
            let Some(a) = v.attr(ino) else {
                return Ok(false);
            };
            if a.kind != crate::FileKind::Regular || v.extent(ino).is_some() {
                return Ok(false);
            }
            a.size
        };
        let data = self.read(tl, ino, 0, size as usize)?;
        let end = data
            .chunks(PAGE_SIZE)
            .position(|p| p.iter().all(|b| *b == 0))
            .map_or(data.len(), |i| i * PAGE_SIZE);
        if data[end..].iter().any(|b| *b != 0) {
            // Not written in order (a segment recycled by an older PostgreSQL setting, say).
            return Ok(false);
        }
        let (id, file) = self.new_object()?;
        let path = object_path(&self.dir, id);
        let written = file
            .write_all_at(&data[..end], 0)
            .and_then(|()| file.set_len(size))
            .and_then(|()| file.sync_all())
            .map_err(Error::io("copying a file into an object", &path));
        // Where its last written page starts, and that page: what branches will see of it.
        let last = end.checked_sub(1).map(|b| b / PAGE_SIZE * PAGE_SIZE);
        let tail = last.map(|l| {
            let mut page = vec![0u8; PAGE_SIZE];
            let n = (data.len() - l).min(PAGE_SIZE);
            page[..n].copy_from_slice(&data[l..l + n]);
            page
        });
        let committed = written.and_then(|()| {
            let mut st = self.state.write();
            let v = View::new(&st, timeline(&st, tl)?);
            // Changed meanwhile (the caller promised it would not): leave it as it is.
            let Some(a) = v.attr(ino).filter(|a| a.size == size) else {
                return Ok(false);
            };
            if v.extent(ino).is_some() {
                return Ok(false);
            }
            let muts = extent_mutations(ino, a, id, last.unwrap_or(0) as u64, tail.as_deref());
            self.commit(&mut st, tl, &muts)?;
            Ok(true)
        });
        match committed {
            Ok(true) => {
                self.state.write().pending_objects.remove(&id);
                Ok(true)
            }
            Ok(false) => {
                self.give_up_object(id);
                Ok(false)
            }
            Err(e) => {
                self.give_up_object(id);
                Err(e)
            }
        }
    }

    /// The file a front end hands the kernel for `ino` opened by `tl` (FUSE passthrough):
    /// its own object; for reading only, the object of the timeline it branched from when that
    /// object holds exactly what the branch sees; else a copy of its own.
    pub fn external_file(&self, tl: TimelineId, ino: Ino, write: bool) -> Result<Arc<File>> {
        let x = self.view_of_external(tl, ino)?;
        if x.owned {
            return self.object_file(x.extent.object);
        }
        // Whole at the cut: the recorded last page is the file's last, and the object holds
        // it unchanged (nothing written after the cut that the branch must not see).
        let ps = PAGE_SIZE as u64;
        if !write && x.extent.end + ps >= x.attr.size {
            let file = self.object_file(x.extent.object)?;
            let tail = self.tail_bytes(&x)?;
            let n = (x.attr.size - x.extent.end.min(x.attr.size)) as usize;
            let mut now = vec![0u8; n];
            let same = file.read_exact_at(&mut now, x.extent.end).is_ok()
                && now[..] == tail[..n]
                && file.metadata().is_ok_and(|m| m.len() == x.attr.size);
            if same {
                return Ok(file);
            }
        }
        self.owned_object(tl, ino)
    }

    /// Whether `ino` is an external file in `tl`.
    pub fn is_external(&self, tl: TimelineId, ino: Ino) -> Result<bool> {
        let st = self.state.read();
        Ok(self.external_view(&st, tl, ino)?.is_some())
    }

    /// Reads an external file: the object as it is when `tl` owns it, else cut at the end
    /// recorded at the branch point. Zeros past the object's end up to the file's size.
    pub(crate) fn read_external(
        &self,
        x: ExternalView,
        offset: u64,
        len: usize,
    ) -> Result<Vec<u8>> {
        let file = self.object_file(x.extent.object)?;
        let path = object_path(&self.dir, x.extent.object);
        let (size, valid) = if x.owned {
            let n = file
                .metadata()
                .map_err(Error::io("reading an object's size", &path))?
                .len();
            (n.max(x.attr.size), n)
        } else {
            (x.attr.size, x.extent.end.min(x.attr.size))
        };
        if offset >= size || len == 0 {
            return Ok(Vec::new());
        }
        let end = size.min(offset.saturating_add(len as u64));
        let mut out = vec![0u8; (end - offset) as usize];
        // Not owned: the last written page as the recorded fsync found it, from the log.
        let ps = PAGE_SIZE as u64;
        let tail_end = (x.extent.end + ps).min(size);
        if !x.owned && offset < tail_end && end > x.extent.end {
            let tail = self.tail_bytes(&x)?;
            let from = offset.max(x.extent.end);
            let to = end.min(tail_end);
            out[(from - offset) as usize..(to - offset) as usize].copy_from_slice(
                &tail[(from - x.extent.end) as usize..(to - x.extent.end) as usize],
            );
        }
        if offset < valid {
            let upto = end.min(valid);
            let dst = &mut out[..(upto - offset) as usize];
            let mut done = 0;
            while done < dst.len() {
                let n = file
                    .read_at(&mut dst[done..], offset + done as u64)
                    .map_err(Error::io("reading an external file", &path))?;
                if n == 0 {
                    break; // the rest reads as zeros
                }
                done += n;
            }
        }
        Ok(out)
    }

    /// Writes an external file (when no front end passes writes to the kernel directly).
    pub(crate) fn write_external(
        &self,
        tl: TimelineId,
        ino: Ino,
        offset: u64,
        data: &[u8],
    ) -> Result<usize> {
        let file = self.owned_object(tl, ino)?;
        file.write_all_at(data, offset).map_err(Error::io(
            "writing an external file",
            PathBuf::from(format!("inode {ino}")),
        ))?;
        Ok(data.len())
    }

    /// The size `tl` sees of an external file it owns: its object's.
    pub(crate) fn live_size(&self, x: &ExternalView) -> Result<u64> {
        let file = self.object_file(x.extent.object)?;
        Ok(file
            .metadata()
            .map_err(Error::io(
                "reading an object's size",
                object_path(&self.dir, x.extent.object),
            ))?
            .len())
    }

    /// The fsync of an external file: finds its written end, makes the object durable, and
    /// notes end and size when they changed, to be committed with the next frame of any kind
    /// (see [`PageStore::commit`]) or by [`PageStore::sync`]. Nothing done after this fsync
    /// returns can reach the log before them, which is all a branch needs (PostgreSQL writes a
    /// data page only after the WAL it depends on is fsynced); committing them here instead
    /// cost a fifth of each WAL fsync's time (the state's write lock and a log append). A
    /// file `tl` does not own has nothing of `tl`'s to sync.
    pub(crate) fn sync_external(&self, tl: TimelineId, ino: Ino, x: ExternalView) -> Result<()> {
        if !x.owned {
            return Ok(());
        }
        let file = self.object_file(x.extent.object)?;
        let path = object_path(&self.dir, x.extent.object);
        let len = file
            .metadata()
            .map_err(Error::io("reading an object's size", &path))?
            .len();
        let seq = self
            .extent_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let from = match self.pending_extents.lock().get(&(tl, ino)) {
            Some(p) if p.object == x.extent.object => p.end.max(x.extent.end),
            _ => x.extent.end,
        };
        // Found before the fdatasync: everything in it was written before, so the fdatasync
        // makes it durable, and what a branch will see is never more than that.
        let found = last_written_page(&file, from, len, &path)?;
        file.sync_data()
            .map_err(Error::io("fsync of an external file", &path))?;
        let sum = found.tail.as_deref().map_or(0, crc32fast::hash);
        let noted = (x.extent.object, found.end, sum, len);
        {
            let mut last = self.last_noted.lock();
            if last.get(&(tl, ino)) == Some(&noted) {
                return Ok(());
            }
            if last.len() >= 65_536 {
                last.clear();
            }
            last.insert((tl, ino), noted);
        }
        let mut pending = self.pending_extents.lock();
        let new = PendingExtent {
            object: x.extent.object,
            end: found.end,
            tail: found.tail,
            size: len,
            seq,
        };
        match pending.get(&(tl, ino)) {
            // A later fsync of the same file noted a later state already.
            Some(p) if p.object == new.object && p.seq > seq => {}
            _ => {
                pending.insert((tl, ino), new);
            }
        }
        Ok(())
    }

    /// Commits the notes of external files' fsyncs now, if there are any (they otherwise wait
    /// for the next frame of any kind). A moment is resolved to the frames committed by then,
    /// so a driver calls this often (every 100 ms) for a point in time to hold a WAL fsync
    /// made on an otherwise idle timeline.
    /// Also mirrors every attached live directory (see `live.rs`), for the same reason.
    pub fn commit_external_notes(&self) -> Result<()> {
        let live = self.has_live_dirs();
        if !self.has_pending_extents() && !live {
            return Ok(());
        }
        let mut st = self.state.write();
        self.commit_pending_extents(&mut st)?;
        if live {
            self.mirror_all_live(&mut st)?;
        }
        Ok(())
    }

    pub(crate) fn has_pending_extents(&self) -> bool {
        !self.pending_extents.lock().is_empty()
    }

    /// Commits the pending ends of external files (one frame per timeline), dropping those
    /// whose file is gone or now names another object.
    pub(crate) fn commit_pending_extents(&self, st: &mut State) -> Result<()> {
        let pending = std::mem::take(&mut *self.pending_extents.lock());
        if pending.is_empty() {
            return Ok(());
        }
        let mut keep: Vec<(TimelineId, Ino, Attr, PendingExtent)> = Vec::new();
        for ((tl, ino), p) in pending {
            if !st.timelines.contains_key(&tl) {
                continue;
            }
            let Some(now) = self.external_view(st, tl, ino)? else {
                continue;
            };
            if !now.owned || now.extent.object != p.object {
                continue;
            }
            let mut a = now.attr;
            a.size = p.size;
            keep.push((tl, ino, a, p));
        }
        keep.sort_by_key(|(tl, ino, _, _)| (*tl, *ino));
        let mut i = 0;
        while i < keep.len() {
            let tl = keep[i].0;
            let mut muts = Vec::new();
            while i < keep.len() && keep[i].0 == tl {
                let (_, ino, a, p) = &keep[i];
                muts.extend(extent_mutations(
                    *ino,
                    *a,
                    p.object,
                    p.end,
                    p.tail.as_deref(),
                ));
                i += 1;
            }
            self.commit_frame(st, tl, &muts)?;
        }
        Ok(())
    }

    /// At open: the written end of every external file a timeline owns and still has, as its
    /// object holds it. Fsyncs commit their ends lazily, so a crash can take the last ones;
    /// the bytes are in the object (durable: the fsync returned), and a branch must see them.
    pub(crate) fn record_external_ends(&self) -> Result<()> {
        let mut st = self.state.write();
        let mut found = Vec::new();
        for t in st.timelines.values() {
            for (ino, ii) in &t.inodes {
                let Some((_, x)) = ii.external.last() else {
                    continue;
                };
                if st.objects.get(&x.object) != Some(&t.id) {
                    continue;
                }
                found.push((t.id, *ino, *x));
            }
        }
        for (tl, ino, x) in found {
            let Some(view) = self.external_view(&st, tl, ino)? else {
                continue;
            };
            if view.extent != x {
                continue;
            }
            let file = self.object_file(x.object)?;
            let path = object_path(&self.dir, x.object);
            let len = file
                .metadata()
                .map_err(Error::io("reading an object's size", &path))?
                .len();
            let found = last_written_page(&file, x.end, len, &path)?;
            // The recorded last page, to tell whether the object went on after it.
            let recorded = {
                let v = View::new(&st, timeline(&st, tl)?);
                let mut buf = vec![0u8; PAGE_SIZE];
                self.read_page(&st, v.page(ino, x.end / PAGE_SIZE as u64), &mut buf)?;
                buf
            };
            let same_tail = match &found.tail {
                Some(t) => *t == recorded,
                None => recorded.iter().all(|b| *b == 0),
            };
            if found.end != x.end || len != view.attr.size || !same_tail {
                self.pending_extents.lock().insert(
                    (tl, ino),
                    PendingExtent {
                        object: x.object,
                        end: found.end,
                        tail: found.tail,
                        size: len,
                        seq: 0,
                    },
                );
            }
        }
        self.commit_pending_extents(&mut st)?;
        drop(st);
        self.sync()
    }

    /// Deletes the object files no version names and no creation holds (pending), among those
    /// numbered below `known_before`. Runs at open, and right after `maintain` wrote a
    /// checkpoint, under the maintenance lock: no GC runs in between, so the objects named now
    /// include every object the checkpoint names, and a restart (which replays the log from
    /// that checkpoint, or a durable prefix of it) can name no deleted object again. Objects
    /// numbered from the checkpoint's counter on are left alone whatever the index says.
    pub(crate) fn sweep_objects(&self, known_before: u64) -> Result<u64> {
        let dir = objects_dir(&self.dir);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(Error::io("listing objects", &dir)(e)),
        };
        let mut candidates = Vec::new();
        for entry in entries {
            let entry = entry.map_err(Error::io("listing objects", &dir))?;
            let name = entry.file_name();
            let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".obj"))
                .and_then(|n| u64::from_str_radix(n, 16).ok())
            else {
                continue;
            };
            if id < known_before {
                candidates.push(id);
            }
        }
        if candidates.is_empty() {
            return Ok(0);
        }
        let doomed: Vec<u64> = {
            let mut st = self.state.write();
            let named_now = referenced_objects(&st);
            let doomed: Vec<u64> = candidates
                .into_iter()
                .filter(|id| !named_now.contains(id) && !st.pending_objects.contains(id))
                .collect();
            for id in &doomed {
                st.objects.remove(id);
            }
            doomed
        };
        let mut files = self.object_files.lock();
        for id in &doomed {
            files.remove(id);
            let path = object_path(&self.dir, *id);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("removing an unused object", &path)(e)),
            }
        }
        drop(files);
        if !doomed.is_empty() {
            sync_dir(&dir)?;
            tracing::debug!(objects = doomed.len(), "removed unused external objects");
        }
        Ok(doomed.len() as u64)
    }

    /// Bytes of the objects `tl` owns.
    pub(crate) fn owned_object_bytes(&self, st: &State, tl: TimelineId) -> u64 {
        st.objects
            .iter()
            .filter(|(_, owner)| **owner == tl)
            .map(|(id, _)| std::fs::metadata(object_path(&self.dir, *id)).map_or(0, |m| m.len()))
            .sum()
    }
}

/// Copies the first `end` bytes of `src` into `dst`, then `tail` (the page at `end` as a
/// branch sees it), sizes `dst` to `size` (zeros after) and makes it durable.
pub(crate) fn copy_prefix(
    src: &File,
    dst: &File,
    end: u64,
    tail: &[u8],
    size: u64,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < end {
        let n = buf.len().min((end - at) as usize);
        let got = src.read_at(&mut buf[..n], at)?;
        if got == 0 {
            break;
        }
        dst.write_all_at(&buf[..got], at)?;
        at += got as u64;
    }
    if end < size {
        let n = tail.len().min((size - end) as usize);
        dst.write_all_at(&tail[..n], end)?;
    }
    dst.set_len(size)?;
    dst.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The search finds what a page-by-page scan finds, for every written length (also not
    /// page-aligned, and a file ending in a partial page) and every starting page before it.
    #[test]
    fn the_last_written_page_is_found_wherever_the_search_starts() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("f");
        let ps = PAGE_SIZE as u64;
        for len in [0, 1, ps, 3 * ps + 100, 37 * ps] {
            for written in (0..=len).step_by(997).chain([len]) {
                let mut data = vec![0u8; len as usize];
                for (i, b) in data[..written as usize].iter_mut().enumerate() {
                    *b = (i % 251) as u8 + 1;
                }
                std::fs::write(&path, &data).unwrap();
                let f = File::open(&path).unwrap();
                let last = written.checked_sub(1).map(|b| b / ps * ps);
                for from in (0..=last.unwrap_or(0)).step_by(PAGE_SIZE) {
                    let got = last_written_page(&f, from, len, &path).unwrap();
                    match last {
                        Some(l) => {
                            assert_eq!(got.end, l, "len {len} written {written} from {from}");
                            let n = (len - l).min(ps) as usize;
                            let mut want = vec![0u8; PAGE_SIZE];
                            want[..n].copy_from_slice(&data[l as usize..l as usize + n]);
                            assert_eq!(got.tail.as_deref(), Some(&want[..]));
                        }
                        None => {
                            assert_eq!(got.end, 0);
                            assert!(got.tail.is_none());
                        }
                    }
                }
            }
        }
    }
}
