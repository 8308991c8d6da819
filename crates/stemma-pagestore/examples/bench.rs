//! Page reads and writes per second of the engine alone (no FUSE), on a timeline one
//! generation deep and one twenty generations deep.
//!
//! `cargo run --release -p stemma-pagestore --example bench [-- DIR]`
//!
//! Setup: a root timeline with one 64 MiB file (8192 pages); 20 generations of branches, each
//! rewriting 1% of the pages and then branching. Depth 1 is a fresh child of the root; depth 20
//! the last generation. Reads are random single pages; writes random single pages without
//! fsync (one fsync at the end, timed separately).

use std::time::{Duration, Instant};

use stemma_pagestore::{BranchPoint, Config, PageStore, TimelineId, PAGE_SIZE, ROOT_INO};

const PAGES: u64 = 8192;
const DEPTH: usize = 20;

/// xorshift: reproducible and free of dependencies.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn reads_per_sec(s: &PageStore, tl: TimelineId, ino: u64, rng: &mut Rng) -> f64 {
    let budget = Duration::from_secs(2);
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < budget {
        for _ in 0..1000 {
            let p = rng.next() % PAGES;
            let data = s
                .read(tl, ino, p * PAGE_SIZE as u64, PAGE_SIZE)
                .expect("read");
            assert_eq!(data.len(), PAGE_SIZE);
            n += 1;
        }
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn writes_per_sec(s: &PageStore, tl: TimelineId, ino: u64, rng: &mut Rng) -> (f64, Duration) {
    let page = vec![0x5Au8; PAGE_SIZE];
    let budget = Duration::from_secs(2);
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < budget {
        for _ in 0..500 {
            let p = rng.next() % PAGES;
            s.write(tl, ino, p * PAGE_SIZE as u64, &page)
                .expect("write");
            n += 1;
        }
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    let t = Instant::now();
    s.sync().expect("sync");
    (rate, t.elapsed())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let tmp;
    let dir = match std::env::args().nth(1) {
        Some(d) => std::path::PathBuf::from(d),
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let s = PageStore::open(&dir, Config::default())?;
    let root = s.create_root(b"root")?;
    let ino = s.create(root, ROOT_INO, b"16384", 0o600, 0, 0)?.ino;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let chunk: Vec<u8> = (0..128 * PAGE_SIZE).map(|i| (i % 251) as u8 + 1).collect();
    for off in (0..PAGES * PAGE_SIZE as u64).step_by(chunk.len()) {
        s.write(root, ino, off, &chunk)?;
    }
    let depth1 = s.branch(root, BranchPoint::Now, b"depth-1")?;
    let mut tl = root;
    for _ in 0..DEPTH {
        for _ in 0..PAGES / 100 {
            let p = rng.next() % PAGES;
            s.write(tl, ino, p * PAGE_SIZE as u64, &chunk[..PAGE_SIZE])?;
        }
        tl = s.branch(tl, BranchPoint::Now, b"gen")?;
    }
    let depth20 = tl;
    s.sync()?;

    // Warm the kernel's page cache for both before measuring.
    reads_per_sec(&s, depth1, ino, &mut rng);
    let r1 = reads_per_sec(&s, depth1, ino, &mut rng);
    let r20 = reads_per_sec(&s, depth20, ino, &mut rng);
    let (w1, sync1) = writes_per_sec(&s, depth1, ino, &mut rng);
    let (w20, sync20) = writes_per_sec(&s, depth20, ino, &mut rng);
    let r1b = reads_per_sec(&s, depth1, ino, &mut rng);
    let r20b = reads_per_sec(&s, depth20, ino, &mut rng);
    println!("pagestore engine, {PAGES} pages of {PAGE_SIZE} bytes, single thread");
    println!(
        "random page reads/s   depth 1: {r1:>10.0}   depth {DEPTH}: {r20:>10.0}   ratio {:.2}",
        r20 / r1
    );
    println!(
        "random page writes/s  depth 1: {w1:>10.0}   depth {DEPTH}: {w20:>10.0}   ratio {:.2}",
        w20 / w1
    );
    println!(
        "reads/s after writes  depth 1: {r1b:>10.0}   depth {DEPTH}: {r20b:>10.0}   ratio {:.2}",
        r20b / r1b
    );
    println!("fsync after the write runs: {sync1:?} and {sync20:?}");
    Ok(())
}
