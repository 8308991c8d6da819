//! Mounting a timeline, unmounting it without leaking, and finding mounts left by a crash.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fuser::{Config, MountOption, Session, SessionACL};
use nix::mount::MntFlags;
use stemma_pagestore::{PageStore, TimelineId};

use crate::fs::TimelineFs;
use crate::FuseOptions;

/// How long an unmount waits for the FUSE session to end before it aborts the connection.
const SESSION_END_WAIT: Duration = Duration::from_secs(5);
/// How long killing stranded processes waits for them to be reaped.
const STRANDED_REAP_WAIT: Duration = Duration::from_secs(10);

/// A timeline mounted at a directory and served by its own FUSE worker threads. Unmounts on
/// drop; [`MountedTimeline::unmount`] reports how.
pub struct MountedTimeline {
    path: PathBuf,
    timeline: TimelineId,
    /// The FUSE connection's number (`/sys/fs/fuse/connections/<n>`), to abort it if an
    /// unmount cannot end the session.
    conn: Option<u64>,
    thread: Option<JoinHandle<io::Result<()>>>,
    /// The external directory's own mount on top of this one (see
    /// [`MountedTimeline::mount_external_dir`]); unmounted first.
    external: Option<ExternalMount>,
}

/// What is mounted over a timeline's external directory.
enum ExternalMount {
    /// A FUSE connection of its own, with passthrough.
    Fuse(Box<MountedTimeline>),
    /// The timeline's live directory, bind-mounted (see `PageStore::attach_live_dir`).
    Live {
        path: PathBuf,
        store: Arc<PageStore>,
    },
}

/// How an unmount went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmounted {
    /// Unmounted and the session ended.
    Clean,
    /// Files were open: the mount was detached (lazy unmount); processes holding files keep
    /// using them until they close them, and the session ends then.
    Detached,
}

/// Whether the external directory gets a mount of its own, given what the kernel said of
/// passthrough at the timeline mount's INIT (which `mount_fs` waits for). Without passthrough
/// in the kernel, no: that mount has no writeback cache (it exists for passthrough), so each
/// of PostgreSQL's WAL writes would be a round trip to the server, where on the timeline's
/// own mount the writeback cache merges them. Measured with `bench/pagestore-pgbench.sh`
/// (scale 50, native in the same run): the WAL mount with passthrough turned off, `pgbench -i`
/// 2.19x native and TPC-B 0.89; the WAL as ordinary pages on the timeline's mount (the
/// `nowal` variant), `pgbench -i` 1.39x and 1.59x, TPC-B 0.82 and 0.77. The bulk-load goal
/// (1.5x) decides. `FuseOptions::passthrough = false` keeps the mount, to test that path.
/// A live directory needs nothing of the kernel's FUSE: always.
pub(crate) fn external_mount_wanted(options: &FuseOptions, kernel: Option<bool>) -> bool {
    options.live_external_dir || !options.passthrough || kernel != Some(false)
}

impl MountedTimeline {
    /// Mounts timeline `tl` of `store` at `path` (an existing, empty directory).
    pub fn mount(
        store: Arc<PageStore>,
        tl: TimelineId,
        path: &Path,
        options: &FuseOptions,
    ) -> io::Result<Self> {
        let fs = TimelineFs::new(store.clone(), tl, options.clone());
        let mut m = Self::mount_fs(
            fs,
            tl,
            path,
            options.threads,
            format!("stemma-pagestore-{tl}"),
        )?;
        // A live directory is attached only before a compute starts (`sync_timeline`): a
        // branch's fills it with a copy of the segment its point cut, which a branch nobody
        // starts never needs.
        if !options.live_external_dir {
            m.mount_external_dir(&store, options)?;
        }
        Ok(m)
    }

    /// Mounts the timeline's external directory (`FuseOptions::external_dir`, `pg_wal`) on a
    /// FUSE connection of its own, with passthrough (see [`TimelineFs::external_dir`]), if it
    /// exists and is not mounted yet. Only while nothing uses the directory through the
    /// timeline's mount (before a compute starts): files opened there before would be served
    /// by two connections at once. Returns whether it mounted it.
    pub fn mount_external_dir(
        &mut self,
        store: &Arc<PageStore>,
        options: &FuseOptions,
    ) -> io::Result<bool> {
        let Some(name) = options.external_dir.as_deref() else {
            return Ok(false);
        };
        if self.external.is_some()
            || !external_mount_wanted(options, crate::fs::kernel_passthrough())
        {
            return Ok(false);
        }
        let dir = match store.lookup(self.timeline, stemma_pagestore::ROOT_INO, name.as_bytes()) {
            Ok(a) if a.kind == stemma_pagestore::FileKind::Directory => a.ino,
            Ok(_) => return Ok(false),
            Err(e) if e.errno() == libc::ENOENT => return Ok(false),
            Err(e) => return Err(io::Error::other(format!("looking up {name}: {e}"))),
        };
        let path = self.path.join(name);
        let tl = self.timeline;
        if options.live_external_dir {
            let live = store
                .attach_live_dir(tl, dir)
                .map_err(|e| io::Error::other(format!("making {name} live: {e}")))?;
            if let Err(e) = nix::mount::mount(
                Some(&live),
                &path,
                None::<&str>,
                nix::mount::MsFlags::MS_BIND,
                None::<&str>,
            ) {
                let _ = store.detach_live_dir(tl);
                return Err(io::Error::new(
                    io::Error::from(e).kind(),
                    format!(
                        "bind-mounting live directory {} at {}: {e}",
                        live.display(),
                        path.display()
                    ),
                ));
            }
            tracing::info!(timeline = %tl, path = %path.display(), live = %live.display(), "live directory mounted");
            self.external = Some(ExternalMount::Live {
                path,
                store: store.clone(),
            });
            return Ok(true);
        }
        let fs = TimelineFs::external_dir(store.clone(), self.timeline, dir, options.clone());
        let m = Self::mount_fs(fs, tl, &path, 2, format!("stemma-pagestore-{tl}-{name}"))?;
        self.external = Some(ExternalMount::Fuse(Box::new(m)));
        Ok(true)
    }

    fn mount_fs(
        fs: TimelineFs,
        tl: TimelineId,
        path: &Path,
        threads: usize,
        fs_name: String,
    ) -> io::Result<Self> {
        let options = fs.options().clone();
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName(fs_name),
            MountOption::Subtype("stemma".into()),
            // The kernel checks permissions against the modes and owners we report, as a
            // local filesystem would; the compute runs as an unprivileged user.
            MountOption::DefaultPermissions,
            MountOption::NoAtime,
            MountOption::NoDev,
            MountOption::NoSuid,
        ];
        // allow_other: the mount belongs to root, the compute is another user.
        config.acl = SessionACL::All;
        config.n_threads = Some(threads.max(1));
        config.clone_fd = options.clone_fd;
        let session = Session::new(fs, path, &config)?;
        // From here on `session` unmounts when dropped, so a failure below leaks nothing.
        let thread = std::thread::Builder::new()
            .name(format!("fuse-tl-{tl}"))
            .spawn(move || session.run())?;
        // Only now: a stat of the mount point is a FUSE request, served by the session.
        let conn = std::fs::metadata(path)
            .ok()
            .map(|m| nix::sys::stat::minor(m.dev()));
        tracing::info!(timeline = %tl, path = %path.display(), "timeline mounted");
        Ok(MountedTimeline {
            path: path.to_path_buf(),
            timeline: tl,
            conn,
            thread: Some(thread),
            external: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn timeline(&self) -> TimelineId {
        self.timeline
    }

    /// Unmounts; when files are still open the mount is detached instead (it disappears from
    /// the namespace at once, and the session serves open files until they are closed).
    pub fn unmount(mut self) -> io::Result<Unmounted> {
        self.unmount_inner()
    }

    fn unmount_inner(&mut self) -> io::Result<Unmounted> {
        match self.external.take() {
            Some(ExternalMount::Fuse(mut inner)) => {
                // Busy (a compute still holds WAL files open): detached, as the outer one
                // will be.
                if let Err(e) = inner.unmount_inner() {
                    tracing::error!(path = %inner.path.display(), error = %e, "unmount failed");
                    self.external = Some(ExternalMount::Fuse(inner));
                    return Err(e);
                }
            }
            Some(ExternalMount::Live { path, store }) => {
                if let Err(e) = unmount_bind(&path) {
                    tracing::error!(path = %path.display(), error = %e, "unmount failed");
                    self.external = Some(ExternalMount::Live { path, store });
                    return Err(e);
                }
                // The last mirror: what the compute wrote since the previous one.
                if let Err(e) = store.detach_live_dir(self.timeline) {
                    tracing::error!(timeline = %self.timeline, error = %e, "the last mirror of a live directory failed");
                }
            }
            None => {}
        }
        let Some(thread) = self.thread.take() else {
            return Ok(Unmounted::Clean);
        };
        let how = match nix::mount::umount2(&self.path, MntFlags::empty()) {
            Ok(()) => Unmounted::Clean,
            Err(nix::errno::Errno::EBUSY) => {
                tracing::warn!(path = %self.path.display(), "mount busy: detaching it (lazy unmount)");
                nix::mount::umount2(&self.path, MntFlags::MNT_DETACH).map_err(|e| {
                    io::Error::new(
                        io::Error::from(e).kind(),
                        format!("lazy unmount of {}: {e}", self.path.display()),
                    )
                })?;
                Unmounted::Detached
            }
            // Not mounted any more (someone unmounted it): the session has ended or will.
            Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => Unmounted::Clean,
            Err(e) => {
                self.thread = Some(thread);
                return Err(io::Error::new(
                    io::Error::from(e).kind(),
                    format!("unmount of {}: {e}", self.path.display()),
                ));
            }
        };
        if how == Unmounted::Detached {
            // Open files keep the session alive; waiting for them would block the caller for
            // as long as some process keeps a file open. The thread ends by itself then.
            return Ok(how);
        }
        if !wait_finished(&thread, SESSION_END_WAIT) {
            tracing::warn!(path = %self.path.display(), "FUSE session did not end after unmount: aborting the connection");
            if let Some(n) = self.conn {
                abort_connection(n);
            }
            if !wait_finished(&thread, SESSION_END_WAIT) {
                tracing::error!(path = %self.path.display(), "FUSE session still running; leaving its thread");
                return Ok(how);
            }
        }
        match thread.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(path = %self.path.display(), error = %e, "FUSE session ended with an error")
            }
            Err(_) => tracing::error!(path = %self.path.display(), "FUSE session thread panicked"),
        }
        tracing::info!(timeline = %self.timeline, path = %self.path.display(), "timeline unmounted");
        Ok(how)
    }
}

impl Drop for MountedTimeline {
    fn drop(&mut self) {
        if let Err(e) = self.unmount_inner() {
            tracing::error!(path = %self.path.display(), error = %e, "unmount failed");
        }
    }
}

/// Unmounts a bind mount; detached instead when busy (files still open under it).
fn unmount_bind(path: &Path) -> io::Result<()> {
    match nix::mount::umount2(path, MntFlags::empty()) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => Ok(()),
        Err(nix::errno::Errno::EBUSY) => {
            tracing::warn!(path = %path.display(), "live directory busy: detaching it (lazy unmount)");
            nix::mount::umount2(path, MntFlags::MNT_DETACH).map_err(|e| {
                io::Error::new(
                    io::Error::from(e).kind(),
                    format!("lazy unmount of {}: {e}", path.display()),
                )
            })
        }
        Err(e) => Err(io::Error::new(
            io::Error::from(e).kind(),
            format!("unmount of {}: {e}", path.display()),
        )),
    }
}

fn wait_finished<T>(thread: &JoinHandle<T>, limit: Duration) -> bool {
    let start = Instant::now();
    while !thread.is_finished() {
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

/// Ends a FUSE connection through fusectl: every pending and future request fails, so the
/// session's threads return. Best effort.
fn abort_connection(n: u64) {
    let dir = Path::new("/sys/fs/fuse/connections");
    let abort = dir.join(n.to_string()).join("abort");
    if !abort.exists() {
        // fusectl is usually mounted by systemd; mount it when it is not (root only).
        let _ = nix::mount::mount(
            Some("fusectl"),
            dir,
            Some("fusectl"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        );
    }
    if let Err(e) = std::fs::write(&abort, b"1") {
        tracing::warn!(path = %abort.display(), error = %e, "could not abort the FUSE connection");
    }
}

/// Mount points at or below `dir` as `/proc/self/mounts` lists them, deepest first (the order
/// to unmount them in).
pub fn mounts_under(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let text = std::fs::read("/proc/self/mounts")?;
    let mut out = Vec::new();
    for line in text.split(|b| *b == b'\n') {
        let mut fields = line.split(|b| *b == b' ');
        let (Some(_src), Some(target)) = (fields.next(), fields.next()) else {
            continue;
        };
        let target = PathBuf::from(std::ffi::OsStr::from_bytes(&unescape(target)));
        if target.starts_with(dir) {
            out.push(target);
        }
    }
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    Ok(out)
}

/// `/proc/mounts` escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'\\' && i + 3 < s.len() && s[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (s[i + 1] - b'0') * 64 + (s[i + 2] - b'0') * 8 + (s[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    out
}

/// Kills (SIGKILL) the processes whose working directory is the root of one of the mounts
/// below `dir`, except root's and this process, and returns how many. Call it only for
/// mounts whose FUSE server is dead, before detaching them: such a process (a compute, which
/// `chdir`s into its data directory) can never use its working directory again, and a
/// detached mount would keep it there, failing, for good; once it is gone, its supervisor
/// starts it on a new mount. Computes never run as root (PostgreSQL refuses), and sparing
/// root spares an administrator's shell; which non-root user a compute runs as may differ
/// between branches, so it is not a filter.
pub fn kill_stranded_processes(dir: &Path) -> io::Result<usize> {
    let mounts = mounts_under(dir)?;
    if mounts.is_empty() {
        return Ok(0);
    }
    let me = std::process::id() as i32;
    let mut killed = Vec::new();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        // Reading the link does not touch the dead filesystem. A process may exit meanwhile.
        let Ok(cwd) = std::fs::read_link(entry.path().join("cwd")) else {
            continue;
        };
        let Some(m) = mounts.iter().find(|m| **m == cwd) else {
            continue;
        };
        let Ok(meta) = std::fs::metadata(entry.path()) else {
            continue;
        };
        if meta.uid() == 0 {
            continue;
        }
        tracing::warn!(pid, uid = meta.uid(), mount = %m.display(), "killing a process stranded in a mount whose server died");
        if nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .is_ok()
        {
            killed.push(pid);
        }
    }
    // Until they are reaped, PostgreSQL sees its old postmaster (even a zombie) as alive and
    // refuses to start on the new mount. Their parent (the compute supervisor, or init when
    // it died too) reaps them soon; the wait is bounded all the same.
    let start = Instant::now();
    while killed
        .iter()
        .any(|pid| Path::new(&format!("/proc/{pid}")).exists())
    {
        if start.elapsed() > STRANDED_REAP_WAIT {
            tracing::warn!(
                ?killed,
                "killed processes are not reaped yet; their computes may need a second start"
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(killed.len())
}

/// Detaches every mount below `dir`: mounts whose FUSE server died with a previous process
/// ("Transport endpoint is not connected") would otherwise block the directory forever.
pub fn clear_stale_mounts(dir: &Path) -> io::Result<usize> {
    let mut n = 0;
    for m in mounts_under(dir)? {
        match nix::mount::umount2(&m, MntFlags::MNT_DETACH) {
            Ok(()) => {
                tracing::warn!(path = %m.display(), "detached a stale mount left by an earlier process");
                n += 1;
            }
            // A mount on top of a dead FUSE mount (a live directory's bind mount): its path
            // cannot be resolved any more; detaching the dead mount below takes it along.
            Err(nix::errno::Errno::ENOTCONN) => {
                tracing::warn!(path = %m.display(), "a stale mount under a dead one: detached with it");
            }
            Err(e) => {
                return Err(io::Error::new(
                    io::Error::from(e).kind(),
                    format!("detaching stale mount {}: {e}", m.display()),
                ))
            }
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_mounts_escapes_are_decoded() {
        assert_eq!(unescape(br"/a\040b"), b"/a b");
        assert_eq!(unescape(br"/a\134"), b"/a\\");
        assert_eq!(unescape(br"/plain"), b"/plain");
        assert_eq!(unescape(br"/x\04"), br"/x\04");
    }

    #[test]
    fn the_external_directory_is_mounted_only_where_passthrough_is_or_is_tested() {
        // A live directory: wherever.
        let on = FuseOptions::default();
        assert!(external_mount_wanted(&on, Some(true)));
        assert!(external_mount_wanted(&on, Some(false)));
        // Not known (no INIT seen): mounted; the mount's own INIT then says how it serves.
        assert!(external_mount_wanted(&on, None));
        let fuse = FuseOptions {
            live_external_dir: false,
            ..FuseOptions::default()
        };
        assert!(external_mount_wanted(&fuse, Some(true)));
        assert!(!external_mount_wanted(&fuse, Some(false)));
        let off = FuseOptions {
            passthrough: false,
            live_external_dir: false,
            ..FuseOptions::default()
        };
        assert!(external_mount_wanted(&off, Some(false)));
        assert!(external_mount_wanted(&off, Some(true)));
    }
}
