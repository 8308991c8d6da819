//! Errors of the page store. Filesystem-shaped errors carry an errno (see [`Error::errno`]) so
//! that the FUSE layer can answer the kernel without interpreting messages.

use std::path::PathBuf;
use std::time::SystemTime;

use crate::types::{Ino, Lsn, TimelineId};

/// Everything that can go wrong in the page store. Each variant says what was being done.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("timeline {timeline}: {what}: no such file or directory")]
    NotFound { timeline: TimelineId, what: String },
    #[error("timeline {timeline}: {what}: already exists")]
    AlreadyExists { timeline: TimelineId, what: String },
    #[error("timeline {timeline}: inode {ino} is not a directory")]
    NotADirectory { timeline: TimelineId, ino: Ino },
    #[error("timeline {timeline}: inode {ino} is a directory")]
    IsADirectory { timeline: TimelineId, ino: Ino },
    #[error("timeline {timeline}: directory inode {ino} is not empty")]
    DirectoryNotEmpty { timeline: TimelineId, ino: Ino },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("name of {len} bytes is too long (at most {max})")]
    NameTooLong { len: usize, max: usize },
    #[error("operation not permitted: {0}")]
    NotPermitted(String),
    #[error("file too large: {0}")]
    FileTooLarge(String),

    #[error("timeline {0} does not exist in the page store")]
    TimelineNotFound(TimelineId),
    #[error("timeline {timeline} has {children} child timeline(s): delete them first")]
    TimelineHasChildren {
        timeline: TimelineId,
        children: usize,
    },
    #[error(
        "{requested:?} is outside the retention window: the oldest point that can be branched is {oldest:?}"
    )]
    OutsideRetention {
        requested: SystemTime,
        oldest: SystemTime,
    },
    #[error("{0:?} is in the future")]
    InFuture(SystemTime),
    #[error(
        "timeline {timeline} did not exist yet at position {lsn} (it was created at {created})"
    )]
    BeforeTimelineCreated {
        timeline: TimelineId,
        lsn: Lsn,
        created: Lsn,
    },
    #[error("position {lsn} has not been reached yet (the log ends at {last})")]
    PositionInFuture { lsn: Lsn, last: Lsn },

    #[error("{context}: {path}: {source}")]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("page store log is corrupt: {path} at byte {offset}: {reason}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("page store in {0} is already open in another process (its LOCK file is held)")]
    Locked(PathBuf),
    #[error(
        "the page store stopped accepting writes after a failed fsync (data may be lost since the last successful one); reopen it to recover from the log"
    )]
    Poisoned,
}

impl Error {
    pub(crate) fn io(
        context: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Error::Io {
            context,
            path,
            source,
        }
    }

    /// The errno a filesystem call should return for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::NotFound { .. } | Error::TimelineNotFound(_) => libc::ENOENT,
            Error::AlreadyExists { .. } => libc::EEXIST,
            Error::NotADirectory { .. } => libc::ENOTDIR,
            Error::IsADirectory { .. } => libc::EISDIR,
            Error::DirectoryNotEmpty { .. } | Error::TimelineHasChildren { .. } => libc::ENOTEMPTY,
            Error::InvalidArgument(_)
            | Error::OutsideRetention { .. }
            | Error::InFuture(_)
            | Error::BeforeTimelineCreated { .. }
            | Error::PositionInFuture { .. } => libc::EINVAL,
            Error::NameTooLong { .. } => libc::ENAMETOOLONG,
            Error::NotPermitted(_) => libc::EPERM,
            Error::FileTooLarge(_) => libc::EFBIG,
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::Corrupt { .. } | Error::Locked(_) | Error::Poisoned => libc::EIO,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
