//! The `copy` driver: every timeline is a whole directory tree of its own.
//!
//! A clone copies the parent's files, with reflinks (the `FICLONE` ioctl: the new file shares
//! the parent's extents until either side writes) where the filesystem supports them (XFS,
//! Btrfs), and by a plain copy elsewhere (ext4). The method is probed once when the driver is
//! opened and reported by [`StorageDriver::describe`].
//!
//! Layout: `<root>/<timeline id>/` is the compute's data directory, mode 0700, owned by the
//! compute's user. Nothing else lives under `<root>`, so every entry is a timeline.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::{
    check_relative, Capabilities, CloneConsistency, CloneFilter, Result, StorageDriver,
    StorageError, TimelineId, Usage,
};

/// `FICLONE` from `linux/fs.h`: `_IOW(0x94, 9, int)`.
const FICLONE: libc::c_ulong = 0x4004_9409;

/// How the `copy` driver copies file contents on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneMethod {
    /// `FICLONE`: shared extents, copy-on-write by the filesystem.
    Reflink,
    /// A full copy of every byte (`copy_file_range`).
    FullCopy,
}

pub struct CopyDriver {
    root: PathBuf,
    owner: Option<(u32, u32)>,
    method: CloneMethod,
    fs_type: String,
}

impl CopyDriver {
    /// Opens (creating it if needed) a timeline root. `owner` is the uid/gid that new
    /// directories and files get (the compute's user); `None` keeps the current user.
    pub fn open(root: &Path, owner: Option<(u32, u32)>) -> Result<Self> {
        fs::create_dir_all(root).map_err(StorageError::io("creating the timeline root", root))?;
        // The compute's user must be able to traverse into its own data directory.
        fs::set_permissions(root, fs::Permissions::from_mode(0o711)).map_err(StorageError::io(
            "setting the mode of the timeline root",
            root,
        ))?;
        let method = probe_reflink(root)?;
        let fs_type = filesystem_type(root);
        tracing::info!(root = %root.display(), ?method, fs_type, "copy driver opened");
        Ok(CopyDriver {
            root: root.to_path_buf(),
            owner,
            method,
            fs_type,
        })
    }

    pub fn method(&self) -> CloneMethod {
        self.method
    }

    fn dir(&self, id: &TimelineId) -> PathBuf {
        self.root.join(id.as_str())
    }

    fn chown(&self, path: &Path) -> Result<()> {
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::lchown(path, Some(uid), Some(gid))
                .map_err(StorageError::io("changing the owner", path))?;
        }
        Ok(())
    }

    /// Gives `path` the owner of `like` (a clone keeps its source's owners: a timeline's
    /// files belong to the user its compute runs as, which may differ between subtrees).
    fn chown_like(&self, path: &Path, like: &fs::Metadata) -> Result<()> {
        if self.owner.is_some() {
            std::os::unix::fs::lchown(path, Some(like.uid()), Some(like.gid()))
                .map_err(StorageError::io("changing the owner", path))?;
        }
        Ok(())
    }

    fn copy_file(&self, src: &Path, dst: &Path, meta: &fs::Metadata) -> Result<()> {
        let input = match File::open(src) {
            Ok(f) => f,
            // PostgreSQL may delete a file while a clone of a running compute reads the
            // directory; the online backup's WAL replay accounts for it.
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(StorageError::io("opening a file to clone", src)(e)),
        };
        let mut output = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(meta.mode() & 0o7777)
            .open(dst)
            .map_err(StorageError::io("creating a file in the clone", dst))?;
        match self.method {
            CloneMethod::Reflink => {
                // SAFETY: both descriptors are open for the duration of the call.
                let rc = unsafe { libc::ioctl(output.as_raw_fd(), FICLONE, input.as_raw_fd()) };
                if rc != 0 {
                    return Err(StorageError::io("reflinking a file", dst)(
                        std::io::Error::last_os_error(),
                    ));
                }
            }
            CloneMethod::FullCopy => {
                let mut input = input;
                std::io::copy(&mut input, &mut output)
                    .map_err(StorageError::io("copying a file", dst))?;
            }
        }
        output
            .flush()
            .map_err(StorageError::io("writing a file", dst))?;
        fs::set_permissions(dst, fs::Permissions::from_mode(meta.mode() & 0o7777))
            .map_err(StorageError::io("setting a file's mode", dst))?;
        self.chown_like(dst, meta)
    }

    /// Copies `src` (relative path `rel`) into `dst`, recursively, honouring `filter`.
    fn copy_tree(&self, src: &Path, dst: &Path, rel: &Path, filter: &CloneFilter) -> Result<()> {
        let entries = match fs::read_dir(src) {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(StorageError::io("reading a directory to clone", src)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(StorageError::io("reading a directory to clone", src))?;
            let name = entry.file_name();
            let rel_child = rel.join(&name);
            if filter.exclude.iter().any(|p| p == &rel_child) {
                continue;
            }
            if !filter.only.is_empty()
                && !filter
                    .only
                    .iter()
                    .any(|p| p.starts_with(&rel_child) || rel_child.starts_with(p))
            {
                continue;
            }
            let src_child = entry.path();
            let dst_child = dst.join(&name);
            let meta = match fs::symlink_metadata(&src_child) {
                Ok(m) => m,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(StorageError::io("reading metadata", &src_child)(e)),
            };
            let ft = meta.file_type();
            if ft.is_dir() {
                match fs::create_dir(&dst_child) {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(StorageError::io("creating a directory", &dst_child)(e)),
                }
                fs::set_permissions(&dst_child, fs::Permissions::from_mode(meta.mode() & 0o7777))
                    .map_err(StorageError::io("setting a directory's mode", &dst_child))?;
                self.chown_like(&dst_child, &meta)?;
                let emptied = filter.empty.iter().any(|p| p == &rel_child);
                // Inside an `only` entry everything is taken.
                let inner = if filter.only.iter().any(|p| rel_child.starts_with(p)) {
                    CloneFilter {
                        only: Vec::new(),
                        ..filter.clone()
                    }
                } else {
                    filter.clone()
                };
                if !emptied {
                    self.copy_tree(&src_child, &dst_child, &rel_child, &inner)?;
                }
            } else if ft.is_symlink() {
                let target = fs::read_link(&src_child)
                    .map_err(StorageError::io("reading a symlink", &src_child))?;
                match fs::remove_file(&dst_child) {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => return Err(StorageError::io("replacing a symlink", &dst_child)(e)),
                }
                std::os::unix::fs::symlink(&target, &dst_child)
                    .map_err(StorageError::io("creating a symlink", &dst_child))?;
                self.chown_like(&dst_child, &meta)?;
            } else if ft.is_file() {
                self.copy_file(&src_child, &dst_child, &meta)?;
            }
            // Sockets and FIFOs are not part of a data directory's state.
        }
        Ok(())
    }
}

impl StorageDriver for CopyDriver {
    fn name(&self) -> &'static str {
        "copy"
    }

    fn describe(&self) -> String {
        match self.method {
            CloneMethod::Reflink => format!(
                "copy: reflink clones ({} supports FICLONE; a branch shares its parent's extents until written)",
                self.fs_type
            ),
            CloneMethod::FullCopy => format!(
                "copy: full copies ({} has no reflinks; each branch costs the whole database)",
                self.fs_type
            ),
        }
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            compute_settings: &[],
            clone_consistency: CloneConsistency::NeedsOnlineBackup,
            point_in_time: false,
            children_depend_on_parent: false,
        }
    }

    fn create_empty(&self, id: &TimelineId) -> Result<PathBuf> {
        let dir = self.dir(id);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                return Err(StorageError::AlreadyExists(id.clone()))
            }
            Err(e) => return Err(StorageError::io("creating a timeline", &dir)(e)),
        }
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
            .map_err(StorageError::io("setting a timeline's mode", &dir))?;
        self.chown(&dir)?;
        Ok(dir)
    }

    fn clone_timeline(
        &self,
        parent: &TimelineId,
        child: &TimelineId,
        filter: &CloneFilter,
    ) -> Result<()> {
        let src = self.dir(parent);
        if !src.is_dir() {
            return Err(StorageError::NotFound(parent.clone()));
        }
        for p in filter
            .exclude
            .iter()
            .chain(&filter.empty)
            .chain(&filter.only)
        {
            check_relative(p)?;
        }
        let dst = self.dir(child);
        if !dst.is_dir() {
            self.create_empty(child)?;
        }
        let src_meta = fs::metadata(&src).map_err(StorageError::io("reading metadata", &src))?;
        self.chown_like(&dst, &src_meta)?;
        self.copy_tree(&src, &dst, Path::new(""), filter)?;
        // Make the clone durable before the caller records it as complete.
        sync_filesystem(&dst)
    }

    fn write_file(&self, id: &TimelineId, relative: &Path, contents: &[u8]) -> Result<()> {
        check_relative(relative)?;
        let dir = self.dir(id);
        if !dir.is_dir() {
            return Err(StorageError::NotFound(id.clone()));
        }
        let path = dir.join(relative);
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .map_err(StorageError::io("creating a file", &path))?;
        f.write_all(contents)
            .map_err(StorageError::io("writing a file", &path))?;
        f.sync_all()
            .map_err(StorageError::io("syncing a file", &path))?;
        // The file belongs to whoever owns the timeline.
        let dir_meta = fs::metadata(&dir).map_err(StorageError::io("reading metadata", &dir))?;
        self.chown_like(&path, &dir_meta)
    }

    fn remove_file(&self, id: &TimelineId, relative: &Path) -> Result<()> {
        check_relative(relative)?;
        let path = self.dir(id).join(relative);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StorageError::io("removing a file", &path)(e)),
        }
    }

    fn data_dir(&self, id: &TimelineId) -> PathBuf {
        self.dir(id)
    }

    fn exists(&self, id: &TimelineId) -> bool {
        self.dir(id).is_dir()
    }

    fn delete(&self, id: &TimelineId) -> Result<()> {
        remove_dir_while_busy(&self.dir(id))
    }

    fn list(&self) -> Result<Vec<TimelineId>> {
        let mut out = Vec::new();
        for entry in
            fs::read_dir(&self.root).map_err(StorageError::io("listing timelines", &self.root))?
        {
            let entry = entry.map_err(StorageError::io("listing timelines", &self.root))?;
            if let Some(name) = entry.file_name().to_str() {
                if let Ok(id) = TimelineId::parse(name) {
                    out.push(id);
                }
            }
        }
        out.sort();
        Ok(out)
    }

    fn usage(&self, id: &TimelineId) -> Result<Usage> {
        let dir = self.dir(id);
        if !dir.is_dir() {
            return Err(StorageError::NotFound(id.clone()));
        }
        let mut usage = Usage::default();
        measure(&dir, self.method, &mut usage)?;
        Ok(usage)
    }
}

/// Adds the sizes under `dir` to `usage`. With reflinks, extents still shared with another
/// file do not count as this timeline's own storage.
fn measure(dir: &Path, method: CloneMethod, usage: &mut Usage) -> Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(StorageError::io("measuring a timeline", dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(StorageError::io("measuring a timeline", dir))?;
        let path = entry.path();
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(StorageError::io("measuring a timeline", &path)(e)),
        };
        if meta.is_dir() {
            usage.own_storage_bytes += meta.blocks() * 512;
            measure(&path, method, usage)?;
        } else if meta.is_file() {
            usage.logical_size_bytes += meta.len();
            let allocated = meta.blocks() * 512;
            let own = match method {
                CloneMethod::FullCopy => allocated,
                CloneMethod::Reflink => allocated.saturating_sub(shared_bytes(&path).unwrap_or(0)),
            };
            usage.own_storage_bytes += own;
        }
    }
    Ok(())
}

/// Bytes of `path` in extents that the filesystem reports as shared (FIEMAP).
fn shared_bytes(path: &Path) -> std::io::Result<u64> {
    const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
    const FIEMAP_EXTENT_LAST: u32 = 0x1;
    const FIEMAP_EXTENT_SHARED: u32 = 0x2000;
    const EXTENTS: usize = 128;

    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Extent {
        logical: u64,
        physical: u64,
        length: u64,
        reserved64: [u64; 2],
        flags: u32,
        reserved: [u32; 3],
    }
    #[repr(C)]
    struct Fiemap {
        start: u64,
        length: u64,
        flags: u32,
        mapped_extents: u32,
        extent_count: u32,
        reserved: u32,
        extents: [Extent; EXTENTS],
    }

    let file = File::open(path)?;
    let mut shared = 0u64;
    let mut start = 0u64;
    // Bounded: each round advances past at least one extent, and files have finitely many.
    loop {
        let mut map = Fiemap {
            start,
            length: u64::MAX - start,
            flags: 0,
            mapped_extents: 0,
            extent_count: EXTENTS as u32,
            reserved: 0,
            extents: [Extent::default(); EXTENTS],
        };
        // SAFETY: `map` is a properly sized, initialised fiemap with room for EXTENTS extents.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP, &mut map as *mut Fiemap) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let n = map.mapped_extents as usize;
        if n == 0 {
            return Ok(shared);
        }
        for e in &map.extents[..n.min(EXTENTS)] {
            if e.flags & FIEMAP_EXTENT_SHARED != 0 {
                shared += e.length;
            }
        }
        let last = map.extents[n.min(EXTENTS) - 1];
        if last.flags & FIEMAP_EXTENT_LAST != 0 {
            return Ok(shared);
        }
        start = last.logical + last.length;
    }
}

/// Tries `FICLONE` between two probe files under `root`.
fn probe_reflink(root: &Path) -> Result<CloneMethod> {
    let a = root.join(".reflink-probe-a");
    let b = root.join(".reflink-probe-b");
    let result = (|| -> std::io::Result<CloneMethod> {
        let mut fa = File::create(&a)?;
        fa.write_all(&[0u8; 4096])?;
        fa.sync_all()?;
        let fb = File::create(&b)?;
        // SAFETY: both descriptors are open for the duration of the call.
        let rc = unsafe { libc::ioctl(fb.as_raw_fd(), FICLONE, fa.as_raw_fd()) };
        Ok(if rc == 0 {
            CloneMethod::Reflink
        } else {
            CloneMethod::FullCopy
        })
    })();
    let _ = fs::remove_file(&a);
    let _ = fs::remove_file(&b);
    result.map_err(StorageError::io("probing for reflink support", root))
}

/// The filesystem type of `path`, from /proc/self/mounts (longest matching mount point).
fn filesystem_type(path: &Path) -> String {
    let path = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut best: Option<(usize, String)> = None;
    for line in mounts.lines() {
        let mut parts = line.split_whitespace();
        let (Some(_dev), Some(mnt), Some(fstype)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if path.starts_with(mnt) && best.as_ref().is_none_or(|(len, _)| mnt.len() > *len) {
            best = Some((mnt.len(), fstype.to_string()));
        }
    }
    best.map(|(_, t)| t).unwrap_or_else(|| "unknown".into())
}

/// syncfs(2) on the filesystem holding `path`: one call instead of an fsync per copied file.
fn sync_filesystem(path: &Path) -> Result<()> {
    let f = File::open(path).map_err(StorageError::io("opening for sync", path))?;
    // SAFETY: the descriptor is open for the duration of the call.
    let rc = unsafe { libc::syncfs(f.as_raw_fd()) };
    if rc != 0 {
        return Err(StorageError::io("syncing the filesystem", path)(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Removes a timeline's directory. A process may still be finishing inside it (the standalone
/// backend of an operation's `initdb` cut off by a crash of the daemon: `initdb` dies with the
/// daemon, its backend only at the end of its input, and it writes a negative pid in
/// `postmaster.pid`, which no stop of a postmaster finds) and create entries while it is
/// removed, which fails with "directory not empty": try again, for up to 10 s.
fn remove_dir_while_busy(dir: &Path) -> Result<()> {
    let mut tries = 0;
    loop {
        match fs::remove_dir_all(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) if e.kind() == ErrorKind::DirectoryNotEmpty && tries < 200 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) => return Err(StorageError::io("deleting a timeline", dir)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeline_is_deleted_while_a_process_still_writes_in_it() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("busy");
        fs::create_dir_all(dir.join("base")).unwrap();
        for i in 0..200 {
            fs::write(dir.join("base").join(i.to_string()), b"x").unwrap();
        }
        // A writer that goes on creating entries for a while, as a stray initdb does.
        let d2 = dir.join("base");
        let writer = std::thread::spawn(move || {
            let end = std::time::Instant::now() + std::time::Duration::from_millis(300);
            let mut i = 1000;
            while std::time::Instant::now() < end {
                let _ = fs::create_dir_all(&d2);
                let _ = fs::write(d2.join(i.to_string()), b"y");
                i += 1;
            }
        });
        std::thread::sleep(std::time::Duration::from_millis(20));
        remove_dir_while_busy(&dir).unwrap();
        writer.join().unwrap();
        // The writer may have recreated it after the removal: that is a new directory.
        let _ = fs::remove_dir_all(&dir);
    }

    fn tid(s: &str) -> TimelineId {
        TimelineId::parse(s).unwrap()
    }

    #[test]
    fn clone_copies_everything_and_isolates_writes() {
        let tmp = tempfile::tempdir().unwrap();
        let d = CopyDriver::open(tmp.path(), None).unwrap();
        let a = tid("a1");
        let dir = d.create_empty(&a).unwrap();
        fs::create_dir(dir.join("base")).unwrap();
        fs::write(dir.join("base/1"), b"hello").unwrap();
        std::os::unix::fs::symlink("base", dir.join("link")).unwrap();
        d.clone_timeline(&a, &tid("b2"), &CloneFilter::all())
            .unwrap();
        let b = d.data_dir(&tid("b2"));
        assert_eq!(fs::read(b.join("base/1")).unwrap(), b"hello");
        assert_eq!(fs::read_link(b.join("link")).unwrap(), Path::new("base"));
        fs::write(b.join("base/1"), b"changed").unwrap();
        assert_eq!(fs::read(dir.join("base/1")).unwrap(), b"hello");
        let mode = fs::metadata(&b).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert_eq!(d.list().unwrap(), vec![a.clone(), tid("b2")]);
    }

    #[test]
    fn filters_exclude_empty_and_only() {
        let tmp = tempfile::tempdir().unwrap();
        let d = CopyDriver::open(tmp.path(), None).unwrap();
        let a = tid("a1");
        let dir = d.create_empty(&a).unwrap();
        fs::create_dir_all(dir.join("pg_wal/archive_status")).unwrap();
        fs::write(dir.join("pg_wal/000001"), b"wal").unwrap();
        fs::create_dir(dir.join("pg_stat_tmp")).unwrap();
        fs::write(dir.join("pg_stat_tmp/x"), b"tmp").unwrap();
        fs::write(dir.join("postmaster.pid"), b"1").unwrap();
        fs::write(dir.join("PG_VERSION"), b"15").unwrap();
        let b = tid("b2");
        let filter = CloneFilter {
            exclude: vec!["postmaster.pid".into(), "pg_wal".into()],
            empty: vec!["pg_stat_tmp".into()],
            only: vec![],
        };
        d.clone_timeline(&a, &b, &filter).unwrap();
        let bd = d.data_dir(&b);
        assert!(bd.join("PG_VERSION").exists());
        assert!(!bd.join("postmaster.pid").exists());
        assert!(bd.join("pg_stat_tmp").is_dir());
        assert!(!bd.join("pg_stat_tmp/x").exists());
        assert!(!bd.join("pg_wal").exists());
        d.clone_timeline(&a, &b, &CloneFilter::only(&["pg_wal"]))
            .unwrap();
        assert_eq!(fs::read(bd.join("pg_wal/000001")).unwrap(), b"wal");
        assert!(bd.join("pg_wal/archive_status").is_dir());
        assert!(!bd.join("postmaster.pid").exists());
    }

    #[test]
    fn usage_and_delete() {
        let tmp = tempfile::tempdir().unwrap();
        let d = CopyDriver::open(tmp.path(), None).unwrap();
        let a = tid("a1");
        let dir = d.create_empty(&a).unwrap();
        fs::write(dir.join("f"), vec![7u8; 100_000]).unwrap();
        let u = d.usage(&a).unwrap();
        assert_eq!(u.logical_size_bytes, 100_000);
        assert!(u.own_storage_bytes >= 100_000, "{u:?}");
        d.delete(&a).unwrap();
        assert!(!d.exists(&a));
        d.delete(&a).unwrap();
        assert!(matches!(d.usage(&a), Err(StorageError::NotFound(_))));
    }

    #[test]
    fn write_file_rejects_escapes() {
        let tmp = tempfile::tempdir().unwrap();
        let d = CopyDriver::open(tmp.path(), None).unwrap();
        let a = tid("a1");
        d.create_empty(&a).unwrap();
        d.write_file(&a, Path::new("backup_label"), b"x").unwrap();
        assert!(d.write_file(&a, Path::new("../x"), b"x").is_err());
        d.remove_file(&a, Path::new("backup_label")).unwrap();
        d.remove_file(&a, Path::new("backup_label")).unwrap();
    }
}
