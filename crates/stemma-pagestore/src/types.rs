//! The public value types: identifiers, attributes, directory entries, usage.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// A position in the store's single global order of changes. Every committed operation takes
/// the next one; `0` is "before everything" and never names a change.
pub type Lsn = u64;

/// An inode number. Unique within a family of timelines (a root and its descendants) because
/// the store allocates them from one global counter and never reuses one; [`ROOT_INO`] is the
/// root directory of every timeline.
pub type Ino = u64;

/// The root directory of every timeline (FUSE's root inode number).
pub const ROOT_INO: Ino = 1;

/// The size of a page, PostgreSQL's block size. File contents are stored page by page.
pub const PAGE_SIZE: usize = 8192;

/// Longest file name in a directory (bytes), as on Linux.
pub const MAX_NAME_LEN: usize = 255;

/// Longest symlink target (bytes).
pub const MAX_SYMLINK_LEN: usize = 4095;

/// Longest timeline label (bytes).
pub const MAX_LABEL_LEN: usize = 255;

/// Largest file: 2^32 pages of 8 KiB (32 TiB), so that a page number fits the format's
/// reasoning about sizes without overflow.
pub const MAX_FILE_SIZE: u64 = (1u64 << 32) * PAGE_SIZE as u64;

/// A timeline's identifier: the position of the record that created it, so ids are unique,
/// never reused and sort by creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TimelineId(pub u64);

impl fmt::Display for TimelineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What an inode is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FileKind {
    Regular,
    Directory,
    Symlink,
}

impl FileKind {
    pub(crate) fn code(self) -> u8 {
        match self {
            FileKind::Regular => 1,
            FileKind::Directory => 2,
            FileKind::Symlink => 3,
        }
    }

    pub(crate) fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(FileKind::Regular),
            2 => Some(FileKind::Directory),
            3 => Some(FileKind::Symlink),
            _ => None,
        }
    }
}

/// The attributes of an inode, as `stat` shows them.
///
/// Directories report `nlink == 2` whatever their subdirectories (PostgreSQL does not look),
/// and size 0. `atime` changes only through [`crate::SetAttr`]: reads never write (noatime).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attr {
    pub ino: Ino,
    pub kind: FileKind,
    /// Permission bits (`mode & 0o7777`); the file type is `kind`.
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    #[serde(with = "nanos")]
    pub atime: SystemTime,
    #[serde(with = "nanos")]
    pub mtime: SystemTime,
    #[serde(with = "nanos")]
    pub ctime: SystemTime,
}

impl Attr {
    /// Number of 512-byte blocks, as `stat` reports, counting the file as fully allocated
    /// (holes are not tracked per file).
    pub fn blocks(&self) -> u64 {
        self.size.div_ceil(512)
    }
}

/// A change of attributes: each `Some` field is set. A `size` truncates or extends the file
/// (extending leaves a hole that reads as zeros).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SystemTime>,
    pub mtime: Option<SystemTime>,
}

/// One entry of a directory listing (without `.` and `..`, which the FUSE layer adds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub ino: Ino,
    pub kind: FileKind,
}

/// Where a branch starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BranchPoint {
    /// The parent's current state: every change committed before the branch.
    Now,
    /// The parent's state made of the changes with a position strictly below this one.
    Lsn(Lsn),
    /// The parent's state at a past moment (see `Config::time_granularity` for the precision).
    Time(SystemTime),
}

/// A timeline as the store knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimelineInfo {
    pub id: TimelineId,
    /// The parent timeline and the branch position: the child sees the parent's changes whose
    /// position is strictly below it.
    pub parent: Option<(TimelineId, Lsn)>,
    pub label: Vec<u8>,
    pub created_at: SystemTime,
}

/// Bytes used by one timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// The sum of the sizes of the timeline's regular files (hard links counted once).
    pub logical_size_bytes: u64,
    /// Bytes of log records written to this timeline itself: what deleting it will give back
    /// once compaction exists. An unchanged branch costs one small record.
    pub own_storage_bytes: u64,
}

/// Totals for `statfs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatFs {
    /// Size and free space of the filesystem that holds the store, in bytes.
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub available_bytes: u64,
    /// Bytes of log segments.
    pub log_bytes: u64,
    /// Inode numbers allocated so far (all timelines).
    pub inodes: u64,
    pub block_size: u32,
    pub max_name_len: u32,
}

pub(crate) fn to_nanos(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_nanos()).map_or(i64::MIN, |n| -n),
    }
}

pub(crate) fn from_nanos(n: i64) -> SystemTime {
    if n >= 0 {
        UNIX_EPOCH + Duration::from_nanos(n as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(n.unsigned_abs())
    }
}

/// Serde for a `SystemTime` as nanoseconds since the Unix epoch (an `i64`, negative before it),
/// as in the log: serde's own `SystemTime` refuses times before the epoch, which `utimes` can set.
pub(crate) mod nanos {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::SystemTime;

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i64(super::to_nanos(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        Ok(super::from_nanos(i64::deserialize(d)?))
    }
}
