//! What maintenance costs and gives back on a large index: how long GC and the switch to a
//! pack hold the write lock, the longest a writer and a reader wait meanwhile, the checkpoint's
//! size, the disk space given back, and open with and without a checkpoint.
//!
//! `[KEEP=1] cargo run --release -p stemma-pagestore --example maintain [-- DIR]`
//!
//! Setup (fake clock, retention 1 h): a root timeline with one 32 MiB file (4096 pages) of
//! which every page is rewritten `ROUNDS` times, and 1000 small files chmod-ed 1000 times each
//! (a million attribute versions, small frames). Then the clock moves past the window and
//! maintenance runs while one thread writes and one reads. With `KEEP=1` the clock stays: GC
//! drops nothing, and the run checkpoints the whole index (the worst case of a periodic run).

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use stemma_pagestore::{Clock, Config, PageStore, SetAttr, PAGE_SIZE, ROOT_INO};

const PAGES: u64 = 4096;
const ROUNDS: u64 = 12;
const FILES: u64 = 1000;
const CHMODS: u64 = 1000;

fn config(now: &Arc<AtomicI64>) -> Config {
    let now = now.clone();
    Config {
        retention: Duration::from_secs(3600),
        clock: Clock::new(move || {
            UNIX_EPOCH + Duration::from_secs(now.load(Ordering::SeqCst) as u64)
        }),
        ..Config::default()
    }
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .map(|e| {
            let e = e.expect("entry");
            let m = e.metadata().expect("stat");
            if m.is_dir() {
                dir_bytes(&e.path())
            } else {
                m.len()
            }
        })
        .sum()
}

fn main() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| tmp.path().to_path_buf());
    let now = Arc::new(AtomicI64::new(1_700_000_000));
    let s = PageStore::open(&dir, config(&now)).expect("open");
    let tl = s.create_root(b"main").expect("root");
    let f = s
        .create(tl, ROOT_INO, b"f", 0o600, 1, 1)
        .expect("create")
        .ino;
    let t = Instant::now();
    for round in 0..ROUNDS {
        now.fetch_add(1, Ordering::SeqCst);
        let page = vec![round as u8 + 1; PAGE_SIZE];
        for p in 0..PAGES {
            s.write(tl, f, p * PAGE_SIZE as u64, &page).expect("write");
        }
    }
    let files: Vec<u64> = (0..FILES)
        .map(|i| {
            s.create(tl, ROOT_INO, format!("s{i}").as_bytes(), 0o600, 1, 1)
                .expect("create")
                .ino
        })
        .collect();
    for i in 0..CHMODS {
        now.fetch_add(1, Ordering::SeqCst);
        for ino in &files {
            let set = SetAttr {
                mode: Some(0o600 | (i as u32 & 0o7)),
                ..SetAttr::default()
            };
            s.setattr(tl, *ino, set).expect("chmod");
        }
    }
    s.sync().expect("sync");
    println!(
        "setup: {} frames, {} index versions, {:.0} MiB on disk, {:.1} s",
        s.last_lsn(),
        s.index_versions(),
        dir_bytes(&dir) as f64 / (1 << 20) as f64,
        t.elapsed().as_secs_f64()
    );
    drop(s);
    let t = Instant::now();
    let s = PageStore::open(&dir, config(&now)).expect("reopen");
    println!(
        "open, replaying the whole log: {:.0} ms",
        t.elapsed().as_secs_f64() * 1000.0
    );

    if std::env::var_os("KEEP").is_none() {
        now.fetch_add(7200, Ordering::SeqCst);
    }
    let s = Arc::new(s);
    let stop = Arc::new(AtomicBool::new(false));
    let worker = |write: bool| {
        let (s, stop) = (s.clone(), stop.clone());
        std::thread::spawn(move || {
            let page = vec![0xABu8; PAGE_SIZE];
            let (mut worst, mut n) = (Duration::ZERO, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let p = (n * 7919) % PAGES;
                let t = Instant::now();
                if write {
                    s.write(tl, f, p * PAGE_SIZE as u64, &page).expect("write");
                } else {
                    s.read(tl, f, p * PAGE_SIZE as u64, PAGE_SIZE)
                        .expect("read");
                }
                worst = worst.max(t.elapsed());
                n += 1;
                if write {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
            (worst, n)
        })
    };
    let (writer, reader) = (worker(true), worker(false));
    let before = dir_bytes(&dir);
    let t = Instant::now();
    let r = s.maintain().expect("maintain");
    let took = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (w_worst, w_n) = writer.join().expect("writer");
    let (r_worst, r_n) = reader.join().expect("reader");
    println!(
        "maintain: {:.0} ms; GC dropped {} versions ({} left) holding the write lock {:.1} ms; \
         longest write-lock step {:.1} ms; {} files compacted, {} pages moved; \
         {:.0} -> {:.0} MiB on disk",
        took.as_secs_f64() * 1000.0,
        r.gc.versions_dropped,
        r.gc.index_versions,
        r.gc.lock_held.as_secs_f64() * 1000.0,
        r.longest_lock.as_secs_f64() * 1000.0,
        r.files_compacted,
        r.pages_moved,
        before as f64 / (1 << 20) as f64,
        dir_bytes(&dir) as f64 / (1 << 20) as f64,
    );
    println!(
        "meanwhile: {w_n} writes, slowest {:.1} ms; {r_n} reads, slowest {:.1} ms",
        w_worst.as_secs_f64() * 1000.0,
        r_worst.as_secs_f64() * 1000.0
    );
    let ckpt: u64 = dir_bytes(&dir.join("checkpoint"));
    println!("checkpoint: {:.1} MiB", ckpt as f64 / (1 << 20) as f64);
    drop(s);
    let t = Instant::now();
    let s = PageStore::open(&dir, config(&now)).expect("reopen");
    println!(
        "open from the checkpoint: {:.0} ms ({} index versions)",
        t.elapsed().as_secs_f64() * 1000.0,
        s.index_versions()
    );
}
