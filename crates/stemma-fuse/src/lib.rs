//! The FUSE front end of Stemma's page store, and the `pagestore` storage driver.
//!
//! - [`TimelineFs`] presents one page-store timeline as a directory tree: a `fuser`
//!   filesystem whose operations map 1:1 onto the engine's `(timeline, inode)` API.
//! - [`MountedTimeline`] mounts one (as root, with mount(2) directly: no libfuse, no
//!   fusermount), served by several worker threads, and never leaks the mount.
//! - [`PagestoreDriver`] implements [`stemma_storage::StorageDriver`]: one [`PageStore`] under
//!   `<root>/store`, each timeline mounted at `<root>/mnt/<timeline id>` for as long as the
//!   driver lives.
//! - [`server`] runs that driver in a process of its own (`stemma pagestore-server`), so that
//!   the mounts, and the computes using them, outlive the daemon; [`PagestoreClient`] is the
//!   daemon's `StorageDriver`, forwarding every call to it over a Unix socket.
//! - [`fuse_available`] says whether FUSE can be used here, and why not.
//!
//! Performance choices follow `shared/notes/fuse-findings.md`: several FUSE threads with a
//! cloned `/dev/fuse` descriptor each, the kernel's writeback cache, 1 MiB writes, and the page
//! cache kept across opens (only this mount changes the timeline it serves).
//!
//! Invariants: no async runtime, no HTTP, no knowledge of PostgreSQL processes. A timeline is
//! served by at most one mount, and while it is mounted every change to it goes through the
//! mount, so the kernel's caches are never stale.
//!
//! [`PageStore`]: stemma_pagestore::PageStore

mod client;
mod driver;
mod flusher;
mod fs;
pub mod maintenance;
mod mount;
pub mod server;
mod wire;

use std::path::Path;
use std::time::Duration;

pub use client::{PagestoreClient, ServerSpec};
pub use driver::{DriverOptions, PagestoreDriver};
pub use fs::{request_counts, RequestCount, TimelineFs};
pub use mount::{
    clear_stale_mounts, kill_stranded_processes, mounts_under, MountedTimeline, Unmounted,
};
pub use wire::MaintenanceSummary;

/// How a timeline is served through FUSE.
#[derive(Debug, Clone)]
pub struct FuseOptions {
    /// FUSE worker threads per mount. Requests of one compute are served concurrently.
    pub threads: usize,
    /// One `/dev/fuse` descriptor per worker thread (`FUSE_DEV_IOC_CLONE`), so that threads do
    /// not contend on one queue.
    pub clone_fd: bool,
    /// The kernel's writeback cache: small writes are merged in the page cache and sent in
    /// large chunks.
    pub writeback_cache: bool,
    /// Largest write request the kernel sends (bytes). The engine commits up to 1 MiB as one
    /// frame.
    pub max_write: u32,
    /// How long the kernel may trust attributes and directory entries. Long, because nothing
    /// but this mount changes the timeline while it is mounted.
    pub ttl: Duration,
    /// Asynchronous requests (readahead, writeback) the kernel keeps in flight.
    pub max_background: u16,
    /// A top-level directory whose regular files bypass the page cache (FOPEN_DIRECT_IO),
    /// e.g. `pg_wal`. Off by default: measured with pgbench (scale 20, same run), direct I/O
    /// on the WAL saved nothing on TPC-B and doubled `pgbench -i` time, whose bulk WAL
    /// writes then become synchronous round trips instead of merged writeback.
    pub direct_io_dir: Option<String>,
    /// The nice value of the FUSE worker threads (`None`: inherited). Every round trip waits
    /// for one of them to be scheduled, so on a busy host a higher priority than the computes'
    /// keeps commit latency from queueing behind CPU-bound work. Needs root to go below 0;
    /// without the privilege it is left as it is.
    pub nice: Option<i32>,
    /// A top-level directory mounted on a FUSE connection of its own, whose new files are
    /// the engine's external files opened with FUSE passthrough (see
    /// [`TimelineFs::external_dir`]): `pg_wal`, so that a commit's WAL fdatasync costs one
    /// round trip instead of two. Measured (pgbench scale 50, TPC-B): 0.97 of native against
    /// 0.70-0.85 with the WAL through the server. `None`: every file through the server.
    pub external_dir: Option<String>,
    /// Whether the files of `external_dir` are opened with FUSE passthrough when the kernel
    /// offers it. `false` keeps that directory's own mount but sends its files' reads and
    /// writes through the server to their objects: for tests of that path and for measuring
    /// it. (A kernel without passthrough gets no such mount: see
    /// `mount::external_mount_wanted`.)
    pub passthrough: bool,
    /// Whether `external_dir` is a *live directory* instead of a FUSE mount: an ordinary
    /// directory of the host filesystem, kept by the store (`PageStore::attach_live_dir`,
    /// which mirrors it into the timeline) and bind-mounted over the timeline's directory, so
    /// that a commit's WAL fdatasync reaches the disk with no round trip to the server at all.
    /// Measured (pgbench scale 50, TPC-B, against native in the same run): see
    /// `docs/pagestore.md`, "Live directories". `false`: the FUSE mount with passthrough.
    pub live_external_dir: bool,
}

impl Default for FuseOptions {
    fn default() -> Self {
        FuseOptions {
            threads: 4,
            clone_fd: true,
            writeback_cache: true,
            max_write: 1 << 20,
            ttl: Duration::from_secs(60),
            max_background: 64,
            direct_io_dir: None,
            nice: Some(-5),
            external_dir: Some("pg_wal".into()),
            passthrough: true,
            live_external_dir: true,
        }
    }
}

/// `Ok` when this process can mount FUSE filesystems for other users; otherwise why not, in
/// one sentence, so that the daemon can fall back to the `copy` driver and say so.
///
/// Cheap checks only (kernel support, `/dev/fuse`, privileges); a mount can still fail, which
/// [`PagestoreDriver::open`] reports.
pub fn fuse_available() -> Result<(), String> {
    let filesystems = std::fs::read_to_string("/proc/filesystems")
        .map_err(|e| format!("cannot read /proc/filesystems: {e}"))?;
    if !filesystems
        .lines()
        .any(|l| l.split_whitespace().last() == Some("fuse"))
    {
        return Err(
            "the kernel has no FUSE support (no \"fuse\" in /proc/filesystems; try `modprobe fuse`)"
                .into(),
        );
    }
    let dev = Path::new("/dev/fuse");
    if !dev.exists() {
        return Err("/dev/fuse does not exist (in a container, pass --device /dev/fuse)".into());
    }
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(dev) {
        return Err(format!("cannot open /dev/fuse: {e}"));
    }
    let root = nix::unistd::geteuid().is_root();
    let can_mount = root && has_cap_sys_admin();
    if !can_mount {
        let helper = which("fusermount3").or_else(|| which("fusermount"));
        if helper.is_none() {
            return Err(if root {
                "running as root without CAP_SYS_ADMIN (a restricted container?) and no fusermount3 is installed".into()
            } else {
                "not running as root and no fusermount3 is installed (install the fuse3 package, or run the daemon as root)".into()
            });
        }
        // Computes run as another user: the mount needs allow_other, which fusermount grants
        // to non-root users only with user_allow_other.
        let conf = std::fs::read_to_string("/etc/fuse.conf").unwrap_or_default();
        if !conf.lines().any(|l| l.trim() == "user_allow_other") {
            return Err("not running as root and /etc/fuse.conf lacks user_allow_other, which computes running as another user need".into());
        }
    }
    Ok(())
}

fn has_cap_sys_admin() -> bool {
    const CAP_SYS_ADMIN: u32 = 21;
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SYS_ADMIN) != 0)
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
