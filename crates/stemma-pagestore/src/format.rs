//! The bytes on disk: segment headers and frames. `docs/pagestore.md` describes the same
//! layout in prose; keep both in step.
//!
//! All integers are little-endian. A frame is one atomic operation: its checksum covers the
//! whole body, so recovery applies a frame entirely or not at all.

use crate::types::{from_nanos, to_nanos, Attr, FileKind, Ino, Lsn, PAGE_SIZE};

/// First bytes of every segment file.
pub(crate) const SEGMENT_MAGIC: &[u8; 8] = b"STMPGSEG";
/// Bumped on any incompatible change; a reader refuses versions it does not know.
pub(crate) const FORMAT_VERSION: u32 = 1;
pub(crate) const SEGMENT_HEADER_LEN: usize = 32;

/// First bytes of every frame ("FRM1" read as little-endian).
pub(crate) const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"FRM1");
/// magic u32, body length u32, CRC-32 of the body u32.
pub(crate) const FRAME_HEADER_LEN: usize = 12;
/// A frame body is never larger: writes are split into frames of at most
/// [`MAX_PAGES_PER_FRAME`] pages. A larger length in a header is garbage (a torn tail).
pub(crate) const MAX_BODY_LEN: usize = 4 << 20;
/// 128 pages = 1 MiB, FUSE's largest write, so one FUSE write is one frame.
pub(crate) const MAX_PAGES_PER_FRAME: usize = 128;

const TAG_SET_ATTR: u8 = 1;
const TAG_FREE_INODE: u8 = 2;
const TAG_PAGE: u8 = 3;
const TAG_ZERO_PAGE: u8 = 4;
const TAG_TRUNCATE: u8 = 5;
const TAG_DIR_ENTRY: u8 = 6;
const TAG_SYMLINK: u8 = 7;
const TAG_CREATE_TIMELINE: u8 = 8;
const TAG_DELETE_TIMELINE: u8 = 9;
const TAG_EXTERNAL: u8 = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SegmentHeader {
    pub seg_no: u32,
    /// The position of the first frame the segment holds (or will hold).
    pub first_lsn: Lsn,
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN] {
        encode_file_header(SEGMENT_MAGIC, self.seg_no, self.first_lsn)
    }

    pub fn decode(b: &[u8; SEGMENT_HEADER_LEN]) -> Result<Self, String> {
        let (seg_no, first_lsn) = decode_file_header(SEGMENT_MAGIC, "segment", b)?;
        Ok(SegmentHeader { seg_no, first_lsn })
    }
}

/// Segment and pack files share one header layout: magic, version, number, a position, CRC.
fn encode_file_header(magic: &[u8; 8], no: u32, lsn: Lsn) -> [u8; SEGMENT_HEADER_LEN] {
    let mut b = [0u8; SEGMENT_HEADER_LEN];
    b[0..8].copy_from_slice(magic);
    b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&no.to_le_bytes());
    b[16..24].copy_from_slice(&lsn.to_le_bytes());
    let crc = crc32fast::hash(&b[0..24]);
    b[24..28].copy_from_slice(&crc.to_le_bytes());
    b
}

fn decode_file_header(
    magic: &[u8; 8],
    what: &str,
    b: &[u8; SEGMENT_HEADER_LEN],
) -> Result<(u32, Lsn), String> {
    if &b[0..8] != magic {
        return Err(format!("not a {what} file (bad magic)"));
    }
    let crc = u32::from_le_bytes([b[24], b[25], b[26], b[27]]);
    if crc != crc32fast::hash(&b[0..24]) {
        return Err(format!("{what} header checksum mismatch"));
    }
    let version = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
    if version != FORMAT_VERSION {
        return Err(format!(
            "format version {version}, this build reads version {FORMAT_VERSION}"
        ));
    }
    let mut lsn = [0u8; 8];
    lsn.copy_from_slice(&b[16..24]);
    Ok((
        u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
        u64::from_le_bytes(lsn),
    ))
}

/// First bytes of every pack file (pages copied by compaction).
pub(crate) const PACK_MAGIC: &[u8; 8] = b"STMPGPAK";
/// Same layout as a segment header; the position is the log's next position when the pack
/// was written (for diagnosis only).
pub(crate) const PACK_HEADER_LEN: usize = SEGMENT_HEADER_LEN;
/// Before each page of a pack: ino u64, page u64, LSN u64 of the version, CRC-32 of the page
/// u32, zero u32. The index points at the page bytes that follow.
pub(crate) const PACK_RECORD_HEADER_LEN: usize = 32;

pub(crate) fn encode_pack_header(no: u32, lsn: Lsn) -> [u8; PACK_HEADER_LEN] {
    encode_file_header(PACK_MAGIC, no, lsn)
}

/// The pack's number, from its header.
pub(crate) fn decode_pack_header(b: &[u8; PACK_HEADER_LEN]) -> Result<u32, String> {
    decode_file_header(PACK_MAGIC, "pack", b).map(|(no, _)| no)
}

/// Appends one page record (header and data) to `out`.
pub(crate) fn encode_pack_record(ino: Ino, page: u64, lsn: Lsn, data: &[u8], out: &mut Vec<u8>) {
    debug_assert_eq!(data.len(), PAGE_SIZE);
    out.extend_from_slice(&ino.to_le_bytes());
    out.extend_from_slice(&page.to_le_bytes());
    out.extend_from_slice(&lsn.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    out.extend_from_slice(data);
}

/// One change inside a frame. Page data borrows from the frame body; `data_off` is the data's
/// offset inside the body, which the index turns into a file offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Mutation<'a> {
    SetAttr(Attr),
    FreeInode {
        ino: Ino,
    },
    Page {
        ino: Ino,
        page: u64,
        data: &'a [u8],
        data_off: usize,
    },
    ZeroPage {
        ino: Ino,
        page: u64,
    },
    /// Every page at or after `from_page` reads as zeros from here on.
    Truncate {
        ino: Ino,
        from_page: u64,
    },
    DirEntry {
        dir: Ino,
        name: &'a [u8],
        /// `None` removes the name.
        child: Option<Ino>,
    },
    Symlink {
        ino: Ino,
        target: &'a [u8],
    },
    CreateTimeline {
        parent: Option<(u64, Lsn)>,
        label: &'a [u8],
    },
    DeleteTimeline,
    /// The inode's contents are external object `object` (a file of its own, see
    /// `external.rs`), of which the bytes below `end` are written and durable; zeros after.
    External {
        ino: Ino,
        object: u64,
        end: u64,
    },
}

/// A decoded frame body.
#[derive(Debug)]
pub(crate) struct FrameBody<'a> {
    pub lsn: Lsn,
    pub timeline: u64,
    pub time_ns: i64,
    pub muts: Vec<Mutation<'a>>,
}

/// Encodes a whole frame (header and body).
pub(crate) fn encode_frame(
    lsn: Lsn,
    timeline: u64,
    time_ns: i64,
    muts: &[Mutation<'_>],
) -> Vec<u8> {
    // Sized up front: a 1 MiB write would otherwise grow (and copy) the buffer eight times.
    let pages = muts
        .iter()
        .filter(|m| matches!(m, Mutation::Page { .. }))
        .count();
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + 32 + muts.len() * 64 + pages * PAGE_SIZE);
    out.extend_from_slice(&FRAME_MAGIC.to_le_bytes());
    out.extend_from_slice(&[0u8; 8]); // length and checksum, filled below
    out.extend_from_slice(&lsn.to_le_bytes());
    out.extend_from_slice(&timeline.to_le_bytes());
    out.extend_from_slice(&time_ns.to_le_bytes());
    out.extend_from_slice(&(muts.len() as u32).to_le_bytes());
    for m in muts {
        match m {
            Mutation::SetAttr(a) => {
                out.push(TAG_SET_ATTR);
                out.extend_from_slice(&a.ino.to_le_bytes());
                out.push(a.kind.code());
                out.extend_from_slice(&a.perm.to_le_bytes());
                out.extend_from_slice(&a.uid.to_le_bytes());
                out.extend_from_slice(&a.gid.to_le_bytes());
                out.extend_from_slice(&a.nlink.to_le_bytes());
                out.extend_from_slice(&a.size.to_le_bytes());
                out.extend_from_slice(&to_nanos(a.atime).to_le_bytes());
                out.extend_from_slice(&to_nanos(a.mtime).to_le_bytes());
                out.extend_from_slice(&to_nanos(a.ctime).to_le_bytes());
            }
            Mutation::FreeInode { ino } => {
                out.push(TAG_FREE_INODE);
                out.extend_from_slice(&ino.to_le_bytes());
            }
            Mutation::Page {
                ino, page, data, ..
            } => {
                debug_assert_eq!(data.len(), PAGE_SIZE);
                out.push(TAG_PAGE);
                out.extend_from_slice(&ino.to_le_bytes());
                out.extend_from_slice(&page.to_le_bytes());
                out.extend_from_slice(data);
            }
            Mutation::ZeroPage { ino, page } => {
                out.push(TAG_ZERO_PAGE);
                out.extend_from_slice(&ino.to_le_bytes());
                out.extend_from_slice(&page.to_le_bytes());
            }
            Mutation::Truncate { ino, from_page } => {
                out.push(TAG_TRUNCATE);
                out.extend_from_slice(&ino.to_le_bytes());
                out.extend_from_slice(&from_page.to_le_bytes());
            }
            Mutation::DirEntry { dir, name, child } => {
                out.push(TAG_DIR_ENTRY);
                out.extend_from_slice(&dir.to_le_bytes());
                out.extend_from_slice(&child.unwrap_or(0).to_le_bytes());
                out.extend_from_slice(&(name.len() as u16).to_le_bytes());
                out.extend_from_slice(name);
            }
            Mutation::Symlink { ino, target } => {
                out.push(TAG_SYMLINK);
                out.extend_from_slice(&ino.to_le_bytes());
                out.extend_from_slice(&(target.len() as u16).to_le_bytes());
                out.extend_from_slice(target);
            }
            Mutation::CreateTimeline { parent, label } => {
                out.push(TAG_CREATE_TIMELINE);
                let (p, at) = parent.unwrap_or((0, 0));
                out.extend_from_slice(&p.to_le_bytes());
                out.extend_from_slice(&at.to_le_bytes());
                out.extend_from_slice(&(label.len() as u16).to_le_bytes());
                out.extend_from_slice(label);
            }
            Mutation::DeleteTimeline => out.push(TAG_DELETE_TIMELINE),
            Mutation::External { ino, object, end } => {
                out.push(TAG_EXTERNAL);
                out.extend_from_slice(&ino.to_le_bytes());
                out.extend_from_slice(&object.to_le_bytes());
                out.extend_from_slice(&end.to_le_bytes());
            }
        }
    }
    let body_len = (out.len() - FRAME_HEADER_LEN) as u32;
    let crc = crc32fast::hash(&out[FRAME_HEADER_LEN..]);
    out[4..8].copy_from_slice(&body_len.to_le_bytes());
    out[8..12].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Parses a frame header: `Some(body_len)` when the magic is right and the length plausible.
pub(crate) fn decode_frame_header(h: &[u8; FRAME_HEADER_LEN]) -> Result<(usize, u32), String> {
    let magic = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    if magic != FRAME_MAGIC {
        return Err(format!("bad frame magic {magic:#010x}"));
    }
    let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
    if !(28..=MAX_BODY_LEN).contains(&len) {
        return Err(format!("implausible frame length {len}"));
    }
    Ok((len, u32::from_le_bytes([h[8], h[9], h[10], h[11]])))
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.buf.len());
        let end =
            end.ok_or_else(|| format!("frame body ends inside a field at byte {}", self.pos))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.bytes(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        let b = self.bytes(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, String> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, String> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn i64(&mut self) -> Result<i64, String> {
        Ok(self.u64()? as i64)
    }
}

/// Decodes a frame body whose checksum was already verified.
pub(crate) fn decode_body(body: &[u8]) -> Result<FrameBody<'_>, String> {
    let mut c = Cursor { buf: body, pos: 0 };
    let lsn = c.u64()?;
    let timeline = c.u64()?;
    let time_ns = c.i64()?;
    let n = c.u32()? as usize;
    // Each mutation takes at least 2 bytes; a larger count is garbage, not a reason to allocate.
    if n > body.len() / 2 {
        return Err(format!("implausible mutation count {n}"));
    }
    let mut muts = Vec::with_capacity(n);
    for _ in 0..n {
        let tag = c.u8()?;
        let m = match tag {
            TAG_SET_ATTR => {
                let ino = c.u64()?;
                let kind = c.u8()?;
                let kind =
                    FileKind::from_code(kind).ok_or_else(|| format!("unknown file kind {kind}"))?;
                Mutation::SetAttr(Attr {
                    ino,
                    kind,
                    perm: c.u16()?,
                    uid: c.u32()?,
                    gid: c.u32()?,
                    nlink: c.u32()?,
                    size: c.u64()?,
                    atime: from_nanos(c.i64()?),
                    mtime: from_nanos(c.i64()?),
                    ctime: from_nanos(c.i64()?),
                })
            }
            TAG_FREE_INODE => Mutation::FreeInode { ino: c.u64()? },
            TAG_PAGE => {
                let ino = c.u64()?;
                let page = c.u64()?;
                let data_off = c.pos;
                let data = c.bytes(PAGE_SIZE)?;
                Mutation::Page {
                    ino,
                    page,
                    data,
                    data_off,
                }
            }
            TAG_ZERO_PAGE => Mutation::ZeroPage {
                ino: c.u64()?,
                page: c.u64()?,
            },
            TAG_TRUNCATE => Mutation::Truncate {
                ino: c.u64()?,
                from_page: c.u64()?,
            },
            TAG_DIR_ENTRY => {
                let dir = c.u64()?;
                let child = c.u64()?;
                let len = c.u16()? as usize;
                Mutation::DirEntry {
                    dir,
                    child: (child != 0).then_some(child),
                    name: c.bytes(len)?,
                }
            }
            TAG_SYMLINK => {
                let ino = c.u64()?;
                let len = c.u16()? as usize;
                Mutation::Symlink {
                    ino,
                    target: c.bytes(len)?,
                }
            }
            TAG_CREATE_TIMELINE => {
                let p = c.u64()?;
                let at = c.u64()?;
                let len = c.u16()? as usize;
                Mutation::CreateTimeline {
                    parent: (p != 0).then_some((p, at)),
                    label: c.bytes(len)?,
                }
            }
            TAG_DELETE_TIMELINE => Mutation::DeleteTimeline,
            TAG_EXTERNAL => Mutation::External {
                ino: c.u64()?,
                object: c.u64()?,
                end: c.u64()?,
            },
            other => return Err(format!("unknown mutation tag {other}")),
        };
        muts.push(m);
    }
    if c.pos != body.len() {
        return Err(format!(
            "{} trailing bytes after the last mutation",
            body.len() - c.pos
        ));
    }
    Ok(FrameBody {
        lsn,
        timeline,
        time_ns,
        muts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn frame_round_trips() {
        let page_data = vec![7u8; PAGE_SIZE];
        let t = UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789);
        let attr = Attr {
            ino: 9,
            kind: FileKind::Regular,
            perm: 0o600,
            uid: 70,
            gid: 71,
            nlink: 1,
            size: 12345,
            atime: t,
            mtime: t,
            ctime: t,
        };
        let muts = vec![
            Mutation::SetAttr(attr),
            Mutation::FreeInode { ino: 3 },
            Mutation::Page {
                ino: 9,
                page: 4,
                data: &page_data,
                data_off: 0,
            },
            Mutation::ZeroPage { ino: 9, page: 5 },
            Mutation::Truncate {
                ino: 9,
                from_page: 2,
            },
            Mutation::DirEntry {
                dir: 1,
                name: b"base",
                child: Some(9),
            },
            Mutation::DirEntry {
                dir: 1,
                name: b"gone",
                child: None,
            },
            Mutation::Symlink {
                ino: 10,
                target: b"/x/y",
            },
            Mutation::CreateTimeline {
                parent: Some((4, 17)),
                label: b"dev",
            },
            Mutation::DeleteTimeline,
            Mutation::External {
                ino: 11,
                object: 5,
                end: 16384,
            },
        ];
        let frame = encode_frame(42, 4, -5, &muts);
        let mut h = [0u8; FRAME_HEADER_LEN];
        h.copy_from_slice(&frame[..FRAME_HEADER_LEN]);
        let (len, crc) = decode_frame_header(&h).unwrap();
        let body = &frame[FRAME_HEADER_LEN..];
        assert_eq!(len, body.len());
        assert_eq!(crc, crc32fast::hash(body));
        let fb = decode_body(body).unwrap();
        assert_eq!((fb.lsn, fb.timeline, fb.time_ns), (42, 4, -5));
        assert_eq!(fb.muts.len(), muts.len());
        for (a, b) in fb.muts.iter().zip(&muts) {
            match (a, b) {
                (
                    Mutation::Page {
                        ino,
                        page,
                        data,
                        data_off,
                    },
                    Mutation::Page { .. },
                ) => {
                    assert_eq!((*ino, *page), (9, 4));
                    assert_eq!(*data, &page_data[..]);
                    assert_eq!(&body[*data_off..*data_off + PAGE_SIZE], *data);
                }
                _ => assert_eq!(a, b),
            }
        }
    }

    #[test]
    fn segment_header_rejects_damage() {
        let h = SegmentHeader {
            seg_no: 3,
            first_lsn: 99,
        };
        let mut b = h.encode();
        assert_eq!(SegmentHeader::decode(&b).unwrap(), h);
        b[17] ^= 1;
        assert!(SegmentHeader::decode(&b).is_err());
    }

    #[test]
    fn garbage_is_not_a_frame() {
        assert!(decode_frame_header(&[0u8; FRAME_HEADER_LEN]).is_err());
        let mut h = [0u8; FRAME_HEADER_LEN];
        h[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
        h[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_frame_header(&h).is_err());
        assert!(decode_body(&[1, 2, 3]).is_err());
    }
}
