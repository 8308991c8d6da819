//! POSIX through a real FUSE mount of a page-store timeline, and branches seen through two
//! mounts. Needs root and /dev/fuse.

mod common;

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use common::{postgres_user, tl, Fixture};
use stemma_fuse::{fuse_available, mounts_under, DriverOptions, PagestoreDriver};
use stemma_storage::{CloneConsistency, CloneFilter, StorageDriver, StorageError};

fn read(p: &Path) -> Vec<u8> {
    fs::read(p).unwrap()
}

fn renameat2(from: &Path, to: &Path, flags: u32) -> std::io::Result<()> {
    let a = CString::new(from.as_os_str().as_bytes()).unwrap();
    let b = CString::new(to.as_os_str().as_bytes()).unwrap();
    // SAFETY: valid NUL-terminated paths; AT_FDCWD.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[test]
fn fuse_is_available_here() {
    fuse_available().unwrap();
}

#[test]
fn posix_through_the_mount() {
    let fx = Fixture::new(None);
    let d = fx.driver();
    let id = tl("0a");
    let root = d.create_empty(&id).unwrap();
    assert_eq!(root, d.data_dir(&id));
    let meta = fs::metadata(&root).unwrap();
    assert!(meta.is_dir());
    assert_eq!(meta.mode() & 0o7777, 0o700);
    assert_eq!(
        mounts_under(&fx.root()).unwrap(),
        vec![root.clone()],
        "mounted"
    );

    // Writes at offsets, holes, sizes.
    let f = root.join("data");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&f)
        .unwrap();
    file.write_all_at(b"hello", 0).unwrap();
    file.write_all_at(b"world", 100_000).unwrap();
    file.sync_all().unwrap();
    assert_eq!(file.metadata().unwrap().len(), 100_005);
    let all = read(&f);
    assert_eq!(&all[..5], b"hello");
    assert!(
        all[5..100_000].iter().all(|b| *b == 0),
        "a hole reads as zeros"
    );
    assert_eq!(&all[100_000..], b"world");
    // Overwrite across a page boundary.
    file.write_all_at(&[7u8; 10_000], 4000).unwrap();
    let mut buf = vec![0u8; 10_002];
    file.read_exact_at(&mut buf, 3999).unwrap();
    assert_eq!(buf[0], 0);
    assert!(buf[1..10_001].iter().all(|b| *b == 7));
    assert_eq!(buf[10_001], 0);

    // Truncate, then extend: the cut tail reads as zeros.
    file.set_len(4002).unwrap();
    file.set_len(20_000).unwrap();
    let all = read(&f);
    assert_eq!(all.len(), 20_000);
    assert_eq!(&all[..5], b"hello");
    assert_eq!(&all[4000..4002], &[7, 7]);
    assert!(all[4002..].iter().all(|b| *b == 0));
    drop(file);

    // A large write (several 1 MiB requests) reads back exactly.
    let big: Vec<u8> = (0..3 * 1024 * 1024 + 123)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    fs::write(root.join("big"), &big).unwrap();
    assert_eq!(read(&root.join("big")), big);

    // Append.
    let mut a = OpenOptions::new()
        .append(true)
        .create(true)
        .open(root.join("appended"))
        .unwrap();
    a.write_all(b"one\n").unwrap();
    a.write_all(b"two\n").unwrap();
    drop(a);
    assert_eq!(read(&root.join("appended")), b"one\ntwo\n");

    // Rename over an existing file, and RENAME_NOREPLACE.
    fs::write(root.join("b"), b"old").unwrap();
    fs::write(root.join("c"), b"new").unwrap();
    fs::rename(root.join("c"), root.join("b")).unwrap();
    assert_eq!(read(&root.join("b")), b"new");
    assert!(!root.join("c").exists());
    fs::write(root.join("c"), b"again").unwrap();
    let e = renameat2(&root.join("c"), &root.join("b"), libc::RENAME_NOREPLACE).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
    renameat2(&root.join("c"), &root.join("d"), libc::RENAME_NOREPLACE).unwrap();
    assert_eq!(read(&root.join("d")), b"again");

    // Unlink while open: the open file stays readable and writable.
    fs::write(root.join("gone"), b"still here").unwrap();
    let mut open = OpenOptions::new()
        .read(true)
        .write(true)
        .open(root.join("gone"))
        .unwrap();
    fs::remove_file(root.join("gone")).unwrap();
    assert!(!root.join("gone").exists());
    let mut s = String::new();
    open.read_to_string(&mut s).unwrap();
    assert_eq!(s, "still here");
    open.write_all_at(b"STILL", 0).unwrap();
    let mut buf = [0u8; 10];
    open.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"STILL here");
    drop(open);

    // Directories.
    fs::create_dir(root.join("dir")).unwrap();
    fs::create_dir(root.join("dir/sub")).unwrap();
    fs::write(root.join("dir/sub/f"), b"x").unwrap();
    let e = fs::remove_dir(root.join("dir/sub")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTEMPTY));
    fs::remove_file(root.join("dir/sub/f")).unwrap();
    fs::remove_dir(root.join("dir/sub")).unwrap();
    assert_eq!(
        fs::create_dir(root.join("dir")).unwrap_err().kind(),
        ErrorKind::AlreadyExists
    );

    // readdir of a directory with many entries, while it changes (PostgreSQL removes WAL
    // segments while iterating pg_wal): no entry is skipped.
    for i in 0..300 {
        fs::write(root.join("dir").join(format!("f{i:04}")), b"").unwrap();
    }
    let mut seen = Vec::new();
    for e in fs::read_dir(root.join("dir")).unwrap() {
        let e = e.unwrap();
        seen.push(e.file_name().to_string_lossy().into_owned());
        fs::remove_file(e.path()).unwrap();
    }
    seen.sort();
    let expected: Vec<String> = (0..300).map(|i| format!("f{i:04}")).collect();
    assert_eq!(seen, expected);
    assert_eq!(fs::read_dir(root.join("dir")).unwrap().count(), 0);

    // Symlinks and hard links.
    std::os::unix::fs::symlink("d", root.join("link")).unwrap();
    assert_eq!(fs::read_link(root.join("link")).unwrap(), Path::new("d"));
    assert_eq!(read(&root.join("link")), b"again");
    fs::hard_link(root.join("d"), root.join("d2")).unwrap();
    assert_eq!(fs::metadata(root.join("d")).unwrap().nlink(), 2);
    fs::remove_file(root.join("d")).unwrap();
    assert_eq!(read(&root.join("d2")), b"again");

    // chmod, chown, utimes.
    fs::set_permissions(root.join("d2"), fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(root.join("d2"), Some(12345), Some(23456)).unwrap();
    let m = fs::metadata(root.join("d2")).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o640);
    assert_eq!((m.uid(), m.gid()), (12345, 23456));
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    File::options()
        .write(true)
        .open(root.join("d2"))
        .unwrap()
        .set_modified(t)
        .unwrap();
    assert_eq!(
        fs::metadata(root.join("d2")).unwrap().modified().unwrap(),
        t
    );

    // fsync of a directory, statfs.
    File::open(&root).unwrap().sync_all().unwrap();
    let st = nix::sys::statvfs::statvfs(&root).unwrap();
    assert!(st.blocks() > 0);

    // Everything written survives an unmount and a reopen of the store.
    let fx_root = fx.root();
    let mut fx = fx;
    fx.driver.take().unwrap().shutdown();
    assert!(mounts_under(&fx_root).unwrap().is_empty());
    fx.driver = Some(PagestoreDriver::open(&fx_root, None, DriverOptions::default()).unwrap());
    assert_eq!(read(&root.join("big")), big);
    assert_eq!(read(&root.join("d2")), b"again");
    assert_eq!(read(&root.join("data")).len(), 20_000);
    fx.finish();
}

#[test]
fn new_files_belong_to_the_caller_and_honour_the_umask() {
    let owner = postgres_user();
    let fx = Fixture::new(Some(owner));
    let root = fx.driver().create_empty(&tl("0b")).unwrap();
    let m = fs::metadata(&root).unwrap();
    assert_eq!(
        (m.uid(), m.gid()),
        owner,
        "the root belongs to the configured owner"
    );
    assert_eq!(m.mode() & 0o7777, 0o700);

    let status = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg("umask 027 && echo x > f && mkdir d && ln -s f l")
        .current_dir(&root)
        .uid(owner.0)
        .gid(owner.1)
        .status()
        .unwrap();
    assert!(status.success());
    let f = fs::metadata(root.join("f")).unwrap();
    assert_eq!((f.uid(), f.gid()), owner);
    assert_eq!(f.mode() & 0o7777, 0o640);
    let d = fs::metadata(root.join("d")).unwrap();
    assert_eq!((d.uid(), d.gid()), owner);
    assert_eq!(d.mode() & 0o7777, 0o750);
    let l = fs::symlink_metadata(root.join("l")).unwrap();
    assert_eq!((l.uid(), l.gid()), owner);

    // The kernel checks permissions (default_permissions): another user cannot enter.
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    let status = std::process::Command::new("/bin/ls")
        .arg(&root)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .uid(nobody.uid.as_raw())
        .gid(nobody.gid.as_raw())
        .status()
        .unwrap();
    assert!(!status.success(), "a 0700 directory is closed to others");
    fx.finish();
}

#[test]
fn branches_are_isolated_and_filtered() {
    let mut options = DriverOptions::default();
    options.store.time_granularity = Duration::from_millis(50);
    let fx = Fixture::with_options(None, options);
    let d = fx.driver();
    assert_eq!(d.name(), "pagestore");
    assert!(d
        .describe()
        .starts_with("pagestore: page-level copy-on-write through FUSE"));
    let caps = d.capabilities();
    assert_eq!(caps.clone_consistency, CloneConsistency::CrashConsistent);
    assert!(caps.point_in_time && caps.children_depend_on_parent);

    let main = tl("01");
    let p = d.create_empty(&main).unwrap();
    fs::write(p.join("shared"), vec![1u8; 1 << 20]).unwrap();
    fs::write(p.join("postmaster.pid"), b"1234\n").unwrap();
    fs::create_dir(p.join("pg_stat_tmp")).unwrap();
    fs::write(p.join("pg_stat_tmp/x"), b"tmp").unwrap();
    fs::create_dir_all(p.join("base/1")).unwrap();
    fs::write(p.join("base/1/rel"), b"v1").unwrap();
    // Point in time resolves to the granularity of the store's time map (50 ms here).
    std::thread::sleep(Duration::from_millis(200));
    let before = SystemTime::now();
    std::thread::sleep(Duration::from_millis(200));
    fs::write(p.join("base/1/rel"), b"v2").unwrap();

    let child = tl("02");
    let filter = CloneFilter {
        exclude: vec!["postmaster.pid".into()],
        empty: vec!["pg_stat_tmp".into()],
        only: vec![],
    };
    d.clone_timeline(&main, &child, &filter).unwrap();
    let c = d.data_dir(&child);
    assert_eq!(read(&c.join("shared")), vec![1u8; 1 << 20]);
    assert_eq!(read(&c.join("base/1/rel")), b"v2");
    assert!(!c.join("postmaster.pid").exists());
    assert!(
        p.join("postmaster.pid").exists(),
        "the parent keeps its own"
    );
    assert_eq!(fs::read_dir(c.join("pg_stat_tmp")).unwrap().count(), 0);
    assert!(p.join("pg_stat_tmp/x").exists());
    let u = d.usage(&child).unwrap();
    assert!(
        u.own_storage_bytes < 1 << 20,
        "an unchanged branch costs almost nothing: {u:?}"
    );
    assert!(u.logical_size_bytes >= 1 << 20);

    // Writes never cross.
    fs::write(c.join("base/1/rel"), b"child").unwrap();
    fs::write(p.join("base/1/rel"), b"parent").unwrap();
    fs::write(c.join("only-child"), b"c").unwrap();
    assert_eq!(read(&c.join("base/1/rel")), b"child");
    assert_eq!(read(&p.join("base/1/rel")), b"parent");
    assert!(!p.join("only-child").exists());
    File::open(c.join("shared"))
        .unwrap()
        .write_all_at(b"x", 0)
        .unwrap_err(); // opened read-only
    OpenOptions::new()
        .write(true)
        .open(c.join("shared"))
        .unwrap()
        .write_all_at(b"x", 0)
        .unwrap();
    assert_eq!(read(&p.join("shared"))[0], 1);

    // A point in time: the state before the second write.
    let past = tl("03");
    d.branch_at(&main, &past, before, &CloneFilter::all())
        .unwrap();
    assert_eq!(read(&d.data_dir(&past).join("base/1/rel")), b"v1");
    let e = d
        .branch_at(
            &main,
            &tl("04"),
            SystemTime::now() - Duration::from_secs(30 * 24 * 3600),
            &CloneFilter::all(),
        )
        .unwrap_err();
    assert!(e.to_string().contains("retention window"), "{e}");
    assert!(!d.exists(&tl("04")));
    assert!(matches!(
        d.clone_timeline(&tl("99"), &tl("05"), &CloneFilter::all()),
        Err(StorageError::NotFound(_))
    ));
    assert!(matches!(
        d.create_empty(&main),
        Err(StorageError::AlreadyExists(_))
    ));

    // write_file / remove_file go through the mount.
    d.write_file(&child, Path::new("backup_label"), b"label")
        .unwrap();
    assert_eq!(read(&c.join("backup_label")), b"label");
    d.remove_file(&child, Path::new("backup_label")).unwrap();
    d.remove_file(&child, Path::new("backup_label")).unwrap();
    assert!(!c.join("backup_label").exists());

    let mut ids = d.list().unwrap();
    ids.sort();
    assert_eq!(ids, vec![main.clone(), child.clone(), past.clone()]);

    // A parent with children cannot go; its children can, then it can.
    let e = d.delete(&main).unwrap_err();
    assert!(e.to_string().contains("delete them first"), "{e}");
    assert!(p.join("shared").exists(), "still mounted after the refusal");
    // A busy mount is detached, not left behind.
    let busy = File::open(c.join("shared")).unwrap();
    d.delete(&child).unwrap();
    assert!(!mounts_under(&fx.root()).unwrap().contains(&c));
    drop(busy);
    d.delete(&past).unwrap();
    d.delete(&main).unwrap();
    d.delete(&main).unwrap();
    assert!(d.list().unwrap().is_empty());
    assert!(mounts_under(&fx.root()).unwrap().is_empty());
    fx.finish();
}

#[test]
fn a_second_driver_on_the_same_root_is_refused_and_leaves_the_mounts_alone() {
    let fx = Fixture::new(None);
    let p = fx.driver().create_empty(&tl("0e")).unwrap();
    fs::write(p.join("f"), b"x").unwrap();
    let e = PagestoreDriver::open(&fx.root(), None, DriverOptions::default())
        .err()
        .expect("the store is locked by the first driver");
    assert!(e.to_string().contains("already open"), "{e}");
    assert_eq!(
        read(&p.join("f")),
        b"x",
        "the first driver's mount still serves"
    );
    fx.finish();
}

#[test]
fn a_mount_left_by_a_dead_process_is_cleared_on_open() {
    let fx = Fixture::new(None);
    let root = fx.root();
    let p = root.join("mnt").join("0f");
    fs::create_dir_all(&p).unwrap();
    // What a killed FUSE server leaves: a mount whose /dev/fuse descriptor was closed, so the
    // kernel aborted the connection and every request answers ENOTCONN. Made by hand, with no
    // server thread that could unmount it behind the test's back (a session of our own would
    // drop, and unmount, as soon as its connection is aborted).
    let dev = File::options()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .unwrap();
    let data = format!(
        "fd={},rootmode=40000,user_id=0,group_id=0",
        std::os::fd::AsRawFd::as_raw_fd(&dev)
    );
    nix::mount::mount(
        Some("stemma-dead"),
        &p,
        Some("fuse.stemma"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
        Some(data.as_str()),
    )
    .unwrap();
    drop(dev);
    assert_eq!(mounts_under(&root).unwrap(), vec![p.clone()]);
    assert_eq!(
        fs::metadata(p.join("f")).unwrap_err().raw_os_error(),
        Some(libc::ENOTCONN)
    );
    // What PagestoreDriver::open does before mounting; then the driver opens over it.
    assert_eq!(
        stemma_fuse::clear_stale_mounts(&root.join("mnt")).unwrap(),
        1
    );
    assert!(mounts_under(&root).unwrap().is_empty());
    let d = fx.driver();
    let id = tl("0f");
    let q = d.create_empty(&id).unwrap();
    fs::write(q.join("f"), b"served").unwrap();
    assert_eq!(read(&q.join("f")), b"served");
    fx.finish();
}

#[test]
fn synchronous_writes_are_durable_when_they_return() {
    // The driver's defaults: the write buffer on, so an overwrite inside a file's size waits
    // in memory until its file is fsynced, and a branch (like a power cut) does not see it.
    let fx = Fixture::with_options(None, DriverOptions::default());
    let d = fx.driver();
    let main = tl("01");
    let p = d.create_empty(&main).unwrap();
    for name in ["wal", "plain"] {
        fs::write(p.join(name), vec![0u8; 64 << 10]).unwrap();
        File::open(p.join(name)).unwrap().sync_all().unwrap();
    }
    // Read once through the page cache, so that the direct write below must replace cached
    // pages.
    assert_eq!(read(&p.join("wal")), vec![0u8; 64 << 10]);

    // What PostgreSQL does with wal_sync_method=open_datasync: no fsync, O_DSYNC instead.
    let wal = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DSYNC)
        .open(p.join("wal"))
        .unwrap();
    wal.write_all_at(&[7u8; 8192], 8192).unwrap();
    let plain = OpenOptions::new()
        .write(true)
        .open(p.join("plain"))
        .unwrap();
    plain.write_all_at(&[7u8; 8192], 8192).unwrap();

    let child = tl("02");
    d.clone_timeline(&main, &child, &CloneFilter::default())
        .unwrap();
    let c = d.data_dir(&child);
    let seen = read(&c.join("wal"));
    assert_eq!(
        &seen[8192..16384],
        &[7u8; 8192],
        "the O_DSYNC write was durable"
    );
    assert_eq!(&seen[..8192], &[0u8; 8192]);
    assert_eq!(
        &read(&c.join("plain"))[8192..16384],
        &[0u8; 8192],
        "a write nobody synced is not (what a power cut may lose)"
    );
    // The parent's cached readers see the direct write.
    assert_eq!(&read(&p.join("wal"))[8192..16384], &[7u8; 8192]);
    drop((wal, plain));
}

/// `pg_wal` is a live directory (the default) whose files are external (the store mirrors
/// their ends), or a FUSE mount of its own (their writes go to the store's object inside the
/// kernel): what a branch sees of them is what the store found before the branch's moment,
/// and a moment a second after an fsync holds it even when nothing else is written (the
/// driver mirrors, and commits the fsyncs' notes, every 100 ms).
#[test]
fn files_of_the_wal_mount_are_versioned_by_their_fsyncs() {
    wal_mount_files_are_versioned_by_their_fsyncs(DriverOptions::default());
}

/// The same with passthrough turned off: the mount's reads and writes of external files go
/// to their objects through the server (the path a file opened without passthrough takes).
#[test]
fn files_of_the_wal_mount_are_versioned_by_their_fsyncs_without_passthrough() {
    let mut options = DriverOptions::default();
    options.fuse.passthrough = false;
    options.fuse.live_external_dir = false;
    wal_mount_files_are_versioned_by_their_fsyncs(options);
}

/// The same on a FUSE mount of its own with passthrough (the default is a live directory).
#[test]
fn files_of_the_wal_mount_are_versioned_by_their_fsyncs_on_a_fuse_mount() {
    let mut options = DriverOptions::default();
    options.fuse.live_external_dir = false;
    wal_mount_files_are_versioned_by_their_fsyncs(options);
}

fn wal_mount_files_are_versioned_by_their_fsyncs(options: DriverOptions) {
    let fx = Fixture::with_options(None, options);
    let d = fx.driver();
    let main = tl("0a");
    let data = d.create_empty(&main).unwrap();
    fs::create_dir(data.join("pg_wal")).unwrap();
    d.sync_timeline(&main).unwrap();
    assert!(mounts_under(&data).unwrap().contains(&data.join("pg_wal")));
    let seg = data.join("pg_wal").join("000000010000000000000001");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&seg)
        .unwrap();
    f.write_all_at(&[0u8; 65536], 0).unwrap();
    f.write_all_at(&[1u8; 10_000], 0).unwrap();
    f.sync_data().unwrap();
    std::thread::sleep(Duration::from_millis(1300));
    let at = SystemTime::now();
    std::thread::sleep(Duration::from_millis(200));
    // Written after the moment, in the same page the last fsync ended in, and fsynced.
    f.write_all_at(&[2u8; 100], 10_000).unwrap();
    f.sync_data().unwrap();
    let past = tl("0b");
    d.branch_at(&main, &past, at, &CloneFilter::all()).unwrap();
    let got = read(&d.data_dir(&past).join("pg_wal/000000010000000000000001"));
    let mut want = vec![0u8; 65536];
    want[..10_000].fill(1);
    assert!(
        got == want,
        "the branch sees the file as its last fsync before the moment found it"
    );
    let now = read(&seg);
    assert_eq!(&now[10_000..10_100], &[2u8; 100]);
    drop(f);
    let root = fx.root();
    fx.finish();
    assert!(mounts_under(&root).unwrap().is_empty());
}

/// A branch's WAL file that still shares its parent's object (a finished segment, opened
/// read-only: passthrough onto the parent's object) cannot be opened for writing while that
/// open lasts: the kernel takes one backing file per inode, and the branch must not write its
/// parent's object. The write open is refused with ETXTBSY (not the kernel's EIO), read-only
/// opens go on working, and once they are closed the write open gets a copy of its own.
#[test]
fn a_write_open_of_a_shared_wal_file_waits_for_its_read_only_opens() {
    let mut options = DriverOptions::default();
    options.fuse.live_external_dir = false;
    let fx = Fixture::with_options(None, options);
    let d = fx.driver();
    let main = tl("0a");
    let data = d.create_empty(&main).unwrap();
    fs::create_dir(data.join("pg_wal")).unwrap();
    d.sync_timeline(&main).unwrap();
    let name = "pg_wal/000000010000000000000001";
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(data.join(name))
        .unwrap();
    // Written to its end, so a read-only open in a branch shares the parent's object.
    f.write_all_at(&[1u8; 65536], 0).unwrap();
    f.sync_data().unwrap();
    drop(f);
    let child = tl("0b");
    d.clone_timeline(&main, &child, &CloneFilter::all())
        .unwrap();
    d.sync_timeline(&child).unwrap();
    let seg = d.data_dir(&child).join(name);
    let open_rw = || OpenOptions::new().read(true).write(true).open(&seg);

    let ro = fs::File::open(&seg).unwrap();
    let e = open_rw().map(|_| ()).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ETXTBSY), "{e}");
    // Read-only opens still work, before and after the refused one, and read the file.
    let ro2 = fs::File::open(&seg).unwrap();
    for f in [&ro, &ro2] {
        let mut buf = vec![0u8; 65536];
        f.read_exact_at(&mut buf, 0).unwrap();
        assert!(buf == vec![1u8; 65536]);
    }
    drop((ro, ro2));

    let rw = open_rw().unwrap();
    rw.write_all_at(&[7u8; 100], 10_000).unwrap();
    rw.sync_data().unwrap();
    let ro = fs::File::open(&seg).unwrap();
    let mut seen = vec![0u8; 100];
    ro.read_exact_at(&mut seen, 10_000).unwrap();
    assert_eq!(seen, [7u8; 100], "a read-only open sees the branch's write");
    drop((ro, rw));
    assert!(
        read(&data.join(name)) == vec![1u8; 65536],
        "the parent's WAL file changed"
    );
    let root = fx.root();
    fx.finish();
    assert!(mounts_under(&root).unwrap().is_empty());
}
