//! The pagestore server's protocol: one JSON object per line over a Unix socket, a request
//! from the client, then one response from the server, on the same connection.
//!
//! Every [`StorageDriver`](stemma_storage::StorageDriver) call has a request; errors cross
//! the wire with their [`StorageError`] variant, and an I/O error with its
//! [`io::ErrorKind`], so that the daemon tells "not found" from "has children" exactly as it
//! does with the driver in its own process.

use std::collections::HashSet;
use std::io::{self, BufRead, ErrorKind, Read, Write};
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use stemma_storage::{CloneFilter, StorageError, TimelineId, Usage};

/// The largest line either side accepts (a `write_file` carries the file, as JSON numbers).
pub(crate) const MAX_LINE: u64 = 64 << 20;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum Request {
    Ping,
    Describe,
    CreateEmpty {
        id: String,
    },
    CloneTimeline {
        parent: String,
        child: String,
        filter: WireFilter,
    },
    BranchAt {
        parent: String,
        child: String,
        /// Seconds and nanoseconds since the Unix epoch.
        at_secs: u64,
        at_nanos: u32,
        filter: WireFilter,
    },
    WriteFile {
        id: String,
        path: PathBuf,
        contents: Vec<u8>,
    },
    RemoveFile {
        id: String,
        path: PathBuf,
    },
    Exists {
        id: String,
    },
    SyncTimeline {
        id: String,
    },
    Delete {
        id: String,
    },
    List,
    Usage {
        id: String,
    },
    /// Run the page store's maintenance (GC, compaction, checkpoint) now; the reply comes
    /// when it is done.
    Maintain,
    /// Unmount every timeline and exit. The reply comes once everything is unmounted.
    Shutdown,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Response {
    Ok(Reply),
    Err(WireError),
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Reply {
    Unit,
    Pong { pid: u32 },
    Text(String),
    Path(PathBuf),
    Bool(bool),
    Ids(Vec<String>),
    Usage { logical: u64, own: u64 },
    Maintained(MaintenanceSummary),
}

/// What one maintenance run of the page store did (`PagestoreClient::maintain`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaintenanceSummary {
    /// Bytes of the store's files before and after.
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// Versions GC dropped from the index, and those left.
    pub versions_dropped: u64,
    pub index_versions: u64,
    pub files_compacted: u64,
    pub pages_moved: u64,
}

impl From<&stemma_pagestore::MaintenanceReport> for MaintenanceSummary {
    fn from(r: &stemma_pagestore::MaintenanceReport) -> Self {
        MaintenanceSummary {
            bytes_before: r.bytes_before,
            bytes_after: r.bytes_after,
            versions_dropped: r.gc.versions_dropped,
            index_versions: r.gc.index_versions,
            files_compacted: r.files_compacted as u64,
            pages_moved: r.pages_moved,
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct WireFilter {
    exclude: Vec<PathBuf>,
    empty: Vec<PathBuf>,
    only: Vec<PathBuf>,
}

impl From<&CloneFilter> for WireFilter {
    fn from(f: &CloneFilter) -> Self {
        WireFilter {
            exclude: f.exclude.clone(),
            empty: f.empty.clone(),
            only: f.only.clone(),
        }
    }
}

impl From<WireFilter> for CloneFilter {
    fn from(f: WireFilter) -> Self {
        CloneFilter {
            exclude: f.exclude,
            empty: f.empty,
            only: f.only,
        }
    }
}

pub(crate) fn time_to_wire(t: SystemTime) -> Result<(u64, u32), StorageError> {
    let d = t.duration_since(UNIX_EPOCH).map_err(|_| {
        StorageError::Unsupported("a moment before 1970 cannot be branched from".into())
    })?;
    Ok((d.as_secs(), d.subsec_nanos()))
}

pub(crate) fn time_from_wire(secs: u64, nanos: u32) -> SystemTime {
    UNIX_EPOCH + Duration::new(secs, nanos)
}

pub(crate) fn usage_from_wire(logical: u64, own: u64) -> Usage {
    Usage {
        logical_size_bytes: logical,
        own_storage_bytes: own,
    }
}

pub(crate) fn id_from_wire(s: &str) -> Result<TimelineId, StorageError> {
    TimelineId::parse(s)
}

/// A [`StorageError`] on the wire.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum WireError {
    Io {
        context: String,
        path: PathBuf,
        io_kind: String,
        raw_os_error: Option<i32>,
        message: String,
    },
    NotFound {
        id: String,
    },
    AlreadyExists {
        id: String,
    },
    InvalidTimelineId {
        id: String,
    },
    InvalidPath {
        path: PathBuf,
    },
    Unsupported {
        message: String,
    },
}

impl From<&StorageError> for WireError {
    fn from(e: &StorageError) -> Self {
        match e {
            StorageError::Io {
                context,
                path,
                source,
            } => WireError::Io {
                context: (*context).to_string(),
                path: path.clone(),
                io_kind: format!("{:?}", source.kind()),
                raw_os_error: source.raw_os_error(),
                message: source.to_string(),
            },
            StorageError::NotFound(id) => WireError::NotFound { id: id.to_string() },
            StorageError::AlreadyExists(id) => WireError::AlreadyExists { id: id.to_string() },
            StorageError::InvalidTimelineId(id) => WireError::InvalidTimelineId { id: id.clone() },
            StorageError::InvalidPath(p) => WireError::InvalidPath { path: p.clone() },
            StorageError::Unsupported(m) => WireError::Unsupported { message: m.clone() },
        }
    }
}

impl From<WireError> for StorageError {
    fn from(e: WireError) -> Self {
        // An id that does not parse cannot come from our server; keep the text anyway.
        let id = |s: String| TimelineId::parse(&s).map_err(|_| StorageError::InvalidTimelineId(s));
        match e {
            WireError::Io {
                context,
                path,
                io_kind,
                raw_os_error,
                message,
            } => {
                let source = match raw_os_error {
                    // The OS's own error: its message is the errno's, so nothing is lost.
                    Some(code) if io::Error::from_raw_os_error(code).to_string() == message => {
                        io::Error::from_raw_os_error(code)
                    }
                    _ => io::Error::new(kind_from_name(&io_kind), message),
                };
                StorageError::Io {
                    context: intern(&context),
                    path,
                    source,
                }
            }
            WireError::NotFound { id: s } => match id(s) {
                Ok(id) => StorageError::NotFound(id),
                Err(e) => e,
            },
            WireError::AlreadyExists { id: s } => match id(s) {
                Ok(id) => StorageError::AlreadyExists(id),
                Err(e) => e,
            },
            WireError::InvalidTimelineId { id } => StorageError::InvalidTimelineId(id),
            WireError::InvalidPath { path } => StorageError::InvalidPath(path),
            WireError::Unsupported { message } => StorageError::Unsupported(message),
        }
    }
}

/// The kinds a storage error can carry, by their `Debug` names (the wire's spelling).
const KINDS: &[ErrorKind] = &[
    ErrorKind::NotFound,
    ErrorKind::PermissionDenied,
    ErrorKind::ConnectionRefused,
    ErrorKind::ConnectionReset,
    ErrorKind::NotConnected,
    ErrorKind::AddrInUse,
    ErrorKind::BrokenPipe,
    ErrorKind::AlreadyExists,
    ErrorKind::WouldBlock,
    ErrorKind::NotADirectory,
    ErrorKind::IsADirectory,
    ErrorKind::DirectoryNotEmpty,
    ErrorKind::ReadOnlyFilesystem,
    ErrorKind::StaleNetworkFileHandle,
    ErrorKind::InvalidInput,
    ErrorKind::InvalidData,
    ErrorKind::TimedOut,
    ErrorKind::WriteZero,
    ErrorKind::StorageFull,
    ErrorKind::NotSeekable,
    ErrorKind::QuotaExceeded,
    ErrorKind::FileTooLarge,
    ErrorKind::ResourceBusy,
    ErrorKind::Deadlock,
    ErrorKind::CrossesDevices,
    ErrorKind::TooManyLinks,
    ErrorKind::InvalidFilename,
    ErrorKind::ArgumentListTooLong,
    ErrorKind::Interrupted,
    ErrorKind::Unsupported,
    ErrorKind::UnexpectedEof,
    ErrorKind::OutOfMemory,
];

fn kind_from_name(name: &str) -> ErrorKind {
    KINDS
        .iter()
        .copied()
        .find(|k| format!("{k:?}") == name)
        .unwrap_or(ErrorKind::Other)
}

/// [`StorageError::Io`] wants a `&'static str` context. The server's contexts are a small,
/// fixed set of literals, so each distinct one is leaked once; past a bound (a confused
/// peer) a generic context is used instead of leaking more.
fn intern(s: &str) -> &'static str {
    const MAX_INTERNED: usize = 512;
    static SEEN: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let mut seen = SEEN
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(known) = seen.get(s) {
        return known;
    }
    if seen.len() >= MAX_INTERNED {
        return "in the pagestore server";
    }
    let leaked: &'static str = Box::leak(s.to_string().into_boxed_str());
    seen.insert(leaked);
    leaked
}

/// Writes one message as a line.
pub(crate) fn write_line<T: Serialize>(w: &mut impl Write, msg: &T) -> io::Result<()> {
    let mut buf =
        serde_json::to_vec(msg).map_err(|e| io::Error::new(ErrorKind::InvalidInput, e))?;
    buf.push(b'\n');
    w.write_all(&buf)?;
    w.flush()
}

/// Reads one message; `Ok(None)` at a clean end of the stream.
pub(crate) fn read_line<T: for<'de> Deserialize<'de>>(
    r: &mut impl BufRead,
) -> io::Result<Option<T>> {
    match read_frame(r)? {
        Some(buf) => parse(&buf).map(Some),
        None => Ok(None),
    }
}

/// Reads one line, bounded; `Ok(None)` at a clean end of the stream.
pub(crate) fn read_frame(r: &mut impl BufRead) -> io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::new();
    let n = r.by_ref().take(MAX_LINE + 1).read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        let why = if n as u64 > MAX_LINE {
            format!("a message longer than {MAX_LINE} bytes")
        } else {
            "a message cut off by the end of the stream".to_string()
        };
        return Err(io::Error::new(ErrorKind::InvalidData, why));
    }
    Ok(Some(buf))
}

/// Decodes one line read by [`read_frame`].
pub(crate) fn parse<T: for<'de> Deserialize<'de>>(line: &[u8]) -> io::Result<T> {
    serde_json::from_slice(line)
        .map_err(|e| io::Error::new(ErrorKind::InvalidData, format!("a malformed message: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(e: StorageError) -> StorageError {
        let text = serde_json::to_string(&Response::Err(WireError::from(&e))).unwrap();
        match serde_json::from_str::<Response>(&text).unwrap() {
            Response::Err(w) => w.into(),
            Response::Ok(r) => panic!("not an error: {r:?}"),
        }
    }

    #[test]
    fn errors_keep_their_variant_kind_and_text() {
        let e = StorageError::Io {
            context: "deleting a timeline",
            path: PathBuf::from("/d/mnt/ab"),
            source: io::Error::new(ErrorKind::DirectoryNotEmpty, "has children: cd"),
        };
        let text = e.to_string();
        let back = round_trip(e);
        assert_eq!(back.to_string(), text);
        match back {
            StorageError::Io { source, .. } => {
                assert_eq!(source.kind(), ErrorKind::DirectoryNotEmpty)
            }
            other => panic!("wrong variant: {other:?}"),
        }
        let os = StorageError::Io {
            context: "mounting",
            path: PathBuf::from("/x"),
            source: io::Error::from_raw_os_error(libc::ENOTCONN),
        };
        match round_trip(os) {
            StorageError::Io { source, .. } => {
                assert_eq!(source.raw_os_error(), Some(libc::ENOTCONN))
            }
            other => panic!("wrong variant: {other:?}"),
        }
        let id = TimelineId::parse("ab-01").unwrap();
        assert!(matches!(
            round_trip(StorageError::NotFound(id.clone())),
            StorageError::NotFound(x) if x == id
        ));
        assert!(matches!(
            round_trip(StorageError::AlreadyExists(id.clone())),
            StorageError::AlreadyExists(x) if x == id
        ));
        assert!(matches!(
            round_trip(StorageError::Unsupported("no".into())),
            StorageError::Unsupported(m) if m == "no"
        ));
        assert!(matches!(
            round_trip(StorageError::InvalidPath("../x".into())),
            StorageError::InvalidPath(p) if p == std::path::Path::new("../x")
        ));
    }

    #[test]
    fn every_listed_kind_survives_by_name() {
        for k in KINDS {
            assert_eq!(kind_from_name(&format!("{k:?}")), *k);
        }
        assert_eq!(kind_from_name("SomethingNew"), ErrorKind::Other);
    }

    #[test]
    fn lines_are_bounded_and_complete() {
        let mut ok = io::Cursor::new(b"{\"op\":\"list\"}\n".to_vec());
        assert!(matches!(
            read_line::<Request>(&mut ok).unwrap(),
            Some(Request::List)
        ));
        assert!(read_line::<Request>(&mut ok).unwrap().is_none());
        let mut cut = io::Cursor::new(b"{\"op\":\"li".to_vec());
        assert!(read_line::<Request>(&mut cut).is_err());
    }
}
