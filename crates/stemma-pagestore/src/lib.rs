//! Stemma's page store: the storage engine behind the `pagestore` driver.
//!
//! It keeps one **filesystem per timeline** (inodes with attributes, directories, regular files
//! made of 8 KiB pages, symlinks) in a single append-only log, and makes a **branch** of any
//! timeline, at its current state or at a past position or moment, by writing one small record:
//! the child reads its parent's pages until it changes them (copy-on-write at page level). A
//! later step exposes each timeline through FUSE as the data directory of a PostgreSQL compute;
//! the operations here map 1:1 onto FUSE's (lookup, getattr, setattr, read, write, create,
//! mkdir, unlink, rmdir, rename, symlink, readlink, readdir, statfs, fsync, open/release).
//!
//! ```no_run
//! use stemma_pagestore::{BranchPoint, Config, PageStore, ROOT_INO};
//! # fn main() -> Result<(), stemma_pagestore::Error> {
//! let store = PageStore::open(std::path::Path::new("/var/lib/stemma/pagestore"), Config::default())?;
//! let main = store.create_root(b"main")?;
//! let f = store.create(main, ROOT_INO, b"PG_VERSION", 0o600, 999, 999)?;
//! store.write(main, f.ino, 0, b"17\n")?;
//! store.sync()?; // durable from here on
//! let dev = store.branch(main, BranchPoint::Now, b"dev")?; // O(1)
//! assert_eq!(store.read(dev, f.ino, 0, 100)?, b"17\n");
//! # Ok(()) }
//! ```
//!
//! The on-disk format, the write and read paths, branching and what a crash does at each step
//! are described in `docs/pagestore.md` at the root of the repository.
//!
//! # Invariants
//!
//! - **No async runtime, no HTTP, no knowledge of PostgreSQL processes or of branches' names.**
//!   The API is synchronous and blocking; [`PageStore`] is `Send + Sync` and locks internally,
//!   because FUSE calls it from several worker threads.
//! - **One global order.** Every change is one frame of the log and takes the next position
//!   ([`Lsn`]). A frame is atomic: recovery applies it whole or not at all.
//! - **A timeline below its branch point is never written.** A child sees exactly its parent's
//!   changes with a position strictly below the branch position, so a branch of a parent that
//!   is being written is a state a crash of the parent could have left (crash-consistent).
//!   Creating a branch copies nothing.
//! - **The log is append-only.** Bytes an index entry points at never change, which is why
//!   reads do their I/O without holding the lock.
//! - **Durable means fsynced.** When [`PageStore::sync`] returns, every change committed before
//!   it survives `kill -9` and power loss; changes not yet synced may be lost, but only as a
//!   suffix of the order (never a change without the ones before it).
//! - **Inode numbers are never reused** within a family of timelines; [`ROOT_INO`] is the root
//!   directory of every timeline.
//! - The index lives in memory. It is loaded at open from the newest index checkpoint, if any,
//!   and the frames after it are replayed. [`PageStore::maintain`] drops from it what no
//!   branch point can reach (GC), rewrites sparse data files into packs (compaction), and
//!   writes a checkpoint before it deletes anything.

mod buffer;
mod checkpoint;
mod error;
mod external;
mod format;
mod gc;
mod live;
mod log;
mod maintain;
mod state;
mod store;
mod types;

pub use error::{Error, Result};
pub use log::DurableMark;
pub use maintain::{DataFileReport, GcReport, MaintenanceReport, MaintenanceStep};
pub use store::{Clock, Config, PageStore};
pub use types::{
    Attr, BranchPoint, DirEntry, FileKind, Ino, Lsn, SetAttr, StatFs, TimelineId, TimelineInfo,
    Usage, MAX_FILE_SIZE, MAX_LABEL_LEN, MAX_NAME_LEN, MAX_SYMLINK_LEN, PAGE_SIZE, ROOT_INO,
};

#[cfg(test)]
mod tests;
