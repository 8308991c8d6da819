//! The append-only log: numbered segment files of checksummed frames.
//!
//! Only the active (last) segment ever has bytes that are not yet durable: a segment is
//! fsynced whole before the next one is created. That is what lets recovery treat damage in the
//! last segment as a torn tail (cut it off) and damage anywhere else as corruption (refuse).

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::format::{decode_frame_header, SegmentHeader, FRAME_HEADER_LEN, SEGMENT_HEADER_LEN};
use crate::types::Lsn;

pub(crate) fn segment_path(dir: &Path, seg_no: u32) -> PathBuf {
    dir.join(format!("{seg_no:010}.seg"))
}

/// Suffix of a segment file prepared ahead of need (see [`PreparedSegment`]).
pub(crate) const PREPARED_SUFFIX: &str = ".seg.prepared";

pub(crate) fn prepared_path(dir: &Path, seg_no: u32) -> PathBuf {
    dir.join(format!("{seg_no:010}{PREPARED_SUFFIX}"))
}

/// A future segment written whole with zeros and fsynced, away from every commit, so that
/// when the log rolls into it no append ever has to write zeros ahead (see
/// [`LogWriter::zero_ahead`]) and no commit's fsync ever has to flush them: the blocks are
/// allocated and written already, and an fdatasync after an append writes only the frames
/// (PostgreSQL pre-allocates its WAL segments the same way). Until the roll gives it its
/// header and its name it is not part of the log: `open` deletes any it finds.
pub(crate) struct PreparedSegment {
    pub no: u32,
    pub path: PathBuf,
    pub file: File,
}

/// Writes `size` bytes of zeros into a new file for segment `seg_no` and fsyncs it.
pub(crate) fn prepare_segment(dir: &Path, seg_no: u32, size: u64) -> Result<PreparedSegment> {
    let path = prepared_path(dir, seg_no);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(Error::io("creating a prepared log segment", &path))?;
    // Written to disk a few MiB at a time as it goes, so that the disk never has a whole
    // segment queued in front of a commit's fsync.
    const STEP: u64 = 8 << 20;
    let (mut pos, mut on_disk) = (0u64, 0u64);
    while pos < size {
        let n = (size - pos).min(ZEROS.len() as u64) as usize;
        file.write_all_at(&ZEROS[..n], pos)
            .map_err(Error::io("writing a prepared log segment", &path))?;
        pos += n as u64;
        if pos - on_disk >= STEP || pos == size {
            write_and_wait(&file, on_disk, pos - on_disk);
            on_disk = pos;
        }
    }
    file.sync_data()
        .map_err(Error::io("syncing a prepared log segment", &path))?;
    Ok(PreparedSegment {
        no: seg_no,
        path,
        file,
    })
}

impl PreparedSegment {
    /// Whether the file is as long as it was prepared to be (the segment size is fixed by
    /// the store's configuration, which a reopen may change).
    fn file_len_is(&self, size: u64) -> bool {
        self.file.metadata().is_ok_and(|m| m.len() == size)
    }
}

/// Turns a prepared segment into segment `p.no` whose first frame will be `first_lsn`: its
/// header, durable before the rename gives it its name, so that a segment file under a
/// segment's name always has a valid header (a crash before the rename leaves a prepared
/// file, which `open` deletes).
fn activate_prepared(dir: &Path, p: PreparedSegment, first_lsn: Lsn) -> Result<Segment> {
    let header = SegmentHeader {
        seg_no: p.no,
        first_lsn,
    }
    .encode();
    p.file
        .write_all_at(&header, 0)
        .and_then(|()| p.file.sync_data())
        .map_err(Error::io("writing log segment header", &p.path))?;
    let path = segment_path(dir, p.no);
    std::fs::rename(&p.path, &path).map_err(Error::io("naming a prepared log segment", &path))?;
    sync_dir(dir)?;
    tracing::debug!(path = %path.display(), first_lsn, "rolled into a prepared log segment");
    Ok(Segment {
        no: p.no,
        path,
        file: Arc::new(p.file),
    })
}

/// Makes a directory's entries (a new or removed segment file) durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(Error::io("syncing directory", dir))
}

pub(crate) struct Segment {
    pub no: u32,
    pub path: PathBuf,
    pub file: Arc<File>,
}

/// Once this many bytes have been appended since, their writeback is started (without waiting
/// for it). Why: every fsync makes the whole log durable, so without this the data pages that
/// PostgreSQL writes between commits (evicted buffers, checkpoints) reach the disk only when
/// the next commit's fsync forces them, on that commit's clock.
pub(crate) const WRITE_BEHIND: u64 = 512 << 10;

/// Asks the kernel to let go of the cached pages of a range of `file` that is durable (clean
/// pages; a hint, so errors are ignored). See `PageStore::uncache` for why.
pub(crate) fn drop_cached(file: &File, from: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on a descriptor the caller owns.
    unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            from as libc::off_t,
            len as libc::off_t,
            libc::POSIX_FADV_DONTNEED,
        );
    }
}

/// Starts writeback of a range of `file` and returns at once: a hint, so errors are ignored
/// (an fsync reports them).
pub(crate) fn start_writeback(file: &File, from: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on a descriptor the caller owns.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            from as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// Writes a range of `file` to disk and waits for it (`sync_file_range`: no journal commit,
/// no cache flush, so not durable by itself): paces a bulk commit to the disk's speed.
/// Errors are left to the next fsync, which reports them.
pub(crate) fn write_and_wait(file: &File, from: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on a descriptor the caller owns.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            from as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER,
        );
    }
}

/// The writing end of the log. Lives inside the store's state lock: appends are serialized.
pub(crate) struct LogWriter {
    pub dir: PathBuf,
    pub segments: Vec<Segment>,
    /// Bytes of the active segment (header included); the next frame goes here.
    pub active_len: u64,
    /// Where the writeback started by [`LogWriter::write_behind`] ends in the active segment.
    pub behind: u64,
    pub segment_size: u64,
    /// Total bytes of all segments.
    pub total_bytes: u64,
    /// Bytes appended since the store was opened, plus those replayed at open (never
    /// decreases): how much log no checkpoint covers, against the value at the last one.
    pub appended: u64,
    /// How far ahead of the last frame the active segment is kept written with zeros (0:
    /// not at all), and where those zeros end. See [`LogWriter::zero_ahead`].
    pub zero_ahead: u64,
    pub zeroed_to: u64,
    /// `Config::log_zero_ahead_bytes_per_sync`.
    pub zero_bytes_per_sync: u64,
    /// Log fsyncs done so far (the store counts them), and `(appended, fsyncs)` when the
    /// writer last decided whether to zero ahead.
    pub syncs: Arc<std::sync::atomic::AtomicU64>,
    pub zero_check: (u64, u64),
    /// Whether, at the last check, the log was fsynced often enough to be worth zeros ahead
    /// (and prepared segments).
    pub zeroing: bool,
    /// The next segment, when one has been prepared ([`PreparedSegment`]); `roll` takes it.
    pub prepared: Arc<parking_lot::Mutex<Option<PreparedSegment>>>,
}

/// Zeros to write ahead of the log from.
static ZEROS: [u8; 1 << 20] = [0; 1 << 20];

/// What the last fsync made durable: every frame up to `lsn`, every byte of segment `seg`
/// below `len` and every earlier segment whole.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DurableMark {
    pub seg: u32,
    pub len: u64,
    pub lsn: Lsn,
}

impl DurableMark {
    pub(crate) fn advance(&mut self, other: DurableMark) {
        if (other.seg, other.len) > (self.seg, self.len) {
            self.seg = other.seg;
            self.len = other.len;
        }
        self.lsn = self.lsn.max(other.lsn);
    }
}

pub(crate) fn open_rw(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(Error::io("opening log segment", path))
}

/// Creates segment `seg_no` holding only its header, durably (file and directory entry).
pub(crate) fn create_segment(dir: &Path, seg_no: u32, first_lsn: Lsn) -> Result<Segment> {
    let path = segment_path(dir, seg_no);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(Error::io("creating log segment", &path))?;
    let header = SegmentHeader { seg_no, first_lsn }.encode();
    file.write_all_at(&header, 0)
        .and_then(|()| file.sync_all())
        .map_err(Error::io("writing log segment header", &path))?;
    sync_dir(dir)?;
    tracing::debug!(path = %path.display(), first_lsn, "created log segment");
    Ok(Segment {
        no: seg_no,
        path,
        file: Arc::new(file),
    })
}

impl LogWriter {
    pub fn active(&self) -> &Segment {
        // The writer is built with at least one segment and never drops the last one.
        &self.segments[self.segments.len() - 1]
    }

    /// Appends one encoded frame; returns the segment number and the frame's offset in it.
    /// `lsn` is the frame's position, the first of a new segment if this append rolls.
    ///
    /// On an I/O error nothing is recorded: the next append overwrites the same bytes, and a
    /// crash before that leaves a torn tail that recovery cuts off.
    pub fn append(
        &mut self,
        frame: &[u8],
        lsn: Lsn,
        rolled: &mut Option<DurableMark>,
    ) -> Result<(u32, u64)> {
        let len = frame.len() as u64;
        if self.active_len > SEGMENT_HEADER_LEN as u64 && self.active_len + len > self.segment_size
        {
            *rolled = Some(self.roll(lsn)?);
        }
        let seg = self.active();
        seg.file
            .write_all_at(frame, self.active_len)
            .map_err(Error::io("appending to log segment", &seg.path))?;
        let (no, at) = (seg.no, self.active_len);
        self.active_len += len;
        self.total_bytes += len;
        self.appended += len;
        self.zero_ahead()?;
        Ok((no, at))
    }

    /// Keeps the blocks ahead of the last frame allocated and written (with zeros), so that
    /// an fdatasync after an append overwrites blocks the file already has and needs no
    /// journal commit of a new size or new blocks (PostgreSQL zero-fills its WAL segments
    /// for the same reason). The zeros are not frames: recovery stops at them and cuts them
    /// off like a torn tail, and a segment is cut to its last frame before it is sealed.
    fn zero_ahead(&mut self) -> Result<()> {
        if self.zero_ahead == 0 {
            return Ok(());
        }
        if self.appended >= self.zero_check.0 + self.zero_ahead / 2 {
            let syncs = self.syncs.load(std::sync::atomic::Ordering::Relaxed);
            let (bytes, synced) = (self.appended - self.zero_check.0, syncs - self.zero_check.1);
            self.zero_check = (self.appended, syncs);
            self.zeroing = self.zero_bytes_per_sync == u64::MAX
                || synced.saturating_mul(self.zero_bytes_per_sync) >= bytes;
        }
        if !self.zeroing || self.active_len + self.zero_ahead / 2 <= self.zeroed_to {
            return Ok(());
        }
        let from = self.zeroed_to.max(self.active_len);
        let to = (from + self.zero_ahead).min(self.segment_size);
        let seg = self.active();
        let mut pos = from;
        while pos < to {
            let n = (to - pos).min(ZEROS.len() as u64) as usize;
            seg.file
                .write_all_at(&ZEROS[..n], pos)
                .map_err(Error::io("writing zeros ahead of the log", &seg.path))?;
            pos += n as u64;
        }
        self.zeroed_to = to;
        Ok(())
    }

    /// Seals the active segment (fsynced whole) and starts the next one, whose first frame
    /// will be `next_lsn`. Returns what is now durable. Used when a segment is full, and by
    /// compaction to make the garbage of the active segment reclaimable.
    pub fn roll(&mut self, next_lsn: Lsn) -> Result<DurableMark> {
        // Everything in the old segment must be durable before a newer segment exists, so
        // that recovery only ever finds a torn tail in the last segment.
        let old = self.active();
        if self.zeroed_to > self.active_len {
            old.file.set_len(self.active_len).map_err(Error::io(
                "cutting the zeros off a full log segment",
                &old.path,
            ))?;
        }
        old.file
            .sync_all()
            .map_err(Error::io("syncing full log segment", &old.path))?;
        let next_no = old.no + 1;
        let prepared = self.prepared.lock().take();
        let (seg, zeroed_to) = match prepared {
            Some(p) if p.no == next_no && p.file_len_is(self.segment_size) => (
                activate_prepared(&self.dir, p, next_lsn)?,
                self.segment_size,
            ),
            other => {
                if let Some(p) = other {
                    // Prepared for a number the log has passed (a roll came first): never
                    // part of the log.
                    let _ = std::fs::remove_file(&p.path);
                }
                (
                    create_segment(&self.dir, next_no, next_lsn)?,
                    SEGMENT_HEADER_LEN as u64,
                )
            }
        };
        self.segments.push(seg);
        self.active_len = SEGMENT_HEADER_LEN as u64;
        self.zeroed_to = zeroed_to;
        self.behind = SEGMENT_HEADER_LEN as u64;
        self.total_bytes += SEGMENT_HEADER_LEN as u64;
        Ok(DurableMark {
            seg: next_no,
            len: SEGMENT_HEADER_LEN as u64,
            lsn: next_lsn - 1,
        })
    }

    /// When [`WRITE_BEHIND`] bytes were appended since the last time, the range whose
    /// writeback the caller should start ([`start_writeback`]) once it has released the state
    /// lock (starting writeback may wait for the disk's queue).
    pub fn write_behind(&mut self) -> Option<(Arc<File>, u64, u64)> {
        if self.active_len < self.behind + WRITE_BEHIND {
            return None;
        }
        let from = self.behind;
        self.behind = self.active_len;
        Some((self.active().file.clone(), from, self.active_len - from))
    }

    pub fn file(&self, seg_no: u32) -> Option<&Arc<File>> {
        // Sorted by number; compaction may have removed some below the last checkpoint.
        self.segments
            .binary_search_by_key(&seg_no, |s| s.no)
            .ok()
            .map(|i| &self.segments[i].file)
    }
}

/// How the scan of one segment ended.
pub(crate) struct ScanEnd {
    /// Bytes of valid header and frames.
    pub valid_len: u64,
    /// Why the scan stopped before the end of the file, if it did.
    pub damage: Option<String>,
    pub file_len: u64,
}

/// Reads the frames of one segment in order from byte `start` (past the header; a checkpoint
/// may say where its frames end), calling `f(frame_offset, frame_len, body)` for each valid
/// one. Stops at the first frame that is short, damaged, or not at position `*next_lsn`, and
/// reports where.
pub(crate) fn scan_segment(
    path: &Path,
    file: &File,
    start: u64,
    next_lsn: &mut Lsn,
    mut f: impl FnMut(u64, u64, &[u8]) -> Result<()>,
) -> Result<ScanEnd> {
    let file_len = file
        .metadata()
        .map_err(Error::io("reading log segment size", path))?
        .len();
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut hdr = [0u8; SEGMENT_HEADER_LEN];
    r.read_exact(&mut hdr)
        .map_err(Error::io("reading log segment header", path))?;
    let mut pos = SEGMENT_HEADER_LEN as u64;
    if start > pos {
        if start > file_len {
            return Err(Error::Corrupt {
                path: path.to_path_buf(),
                offset: start,
                reason: format!(
                    "the checkpoint says the log goes on at byte {start}, but the segment has {file_len} bytes"
                ),
            });
        }
        r.seek(SeekFrom::Start(start))
            .map_err(Error::io("seeking in log segment", path))?;
        pos = start;
    }
    let mut body = Vec::new();
    let damage = loop {
        if pos == file_len {
            break None;
        }
        if file_len - pos < FRAME_HEADER_LEN as u64 {
            break Some(format!(
                "{} bytes too short for a frame header",
                file_len - pos
            ));
        }
        let mut fh = [0u8; FRAME_HEADER_LEN];
        r.read_exact(&mut fh)
            .map_err(Error::io("reading log frame", path))?;
        let (len, crc) = match decode_frame_header(&fh) {
            Ok(x) => x,
            Err(e) => break Some(e),
        };
        if file_len - pos - (FRAME_HEADER_LEN as u64) < len as u64 {
            break Some(format!(
                "frame of {len} bytes runs past the end of the file"
            ));
        }
        body.resize(len, 0);
        r.read_exact(&mut body)
            .map_err(Error::io("reading log frame", path))?;
        if crc32fast::hash(&body) != crc {
            break Some("frame checksum mismatch".to_string());
        }
        let lsn = u64::from_le_bytes([
            body[0], body[1], body[2], body[3], body[4], body[5], body[6], body[7],
        ]);
        if lsn != *next_lsn {
            // A stale but intact frame (left behind by an earlier cut) is still the end.
            break Some(format!(
                "frame at position {lsn} where {} was expected",
                *next_lsn
            ));
        }
        let frame_len = (FRAME_HEADER_LEN + len) as u64;
        f(pos, frame_len, &body)?;
        *next_lsn += 1;
        pos += frame_len;
    };
    Ok(ScanEnd {
        valid_len: pos,
        damage,
        file_len,
    })
}
