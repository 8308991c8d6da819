//! The write buffer's background flusher: what the kernel's writeback threads are to a native
//! filesystem's page cache.
//!
//! The page store keeps page overwrites in memory until their file is fsynced (see the
//! engine's `buffer.rs`). This thread commits to the log, once a second, the files whose
//! oldest buffered page is older than [`FLUSH_AGE`] (the kernel's `dirty_expire_centisecs`),
//! and the oldest files while the buffer holds more than half its limit (the kernel's
//! background ratio); a writer that finds the buffer full commits the oldest files itself.
//! It does not fsync: the pages are durable at the next fsync of anything, as a native
//! filesystem's written-back pages are at the next journal commit.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use stemma_pagestore::PageStore;

/// How long a file's page writes may wait in memory without an fsync.
pub const FLUSH_AGE: Duration = Duration::from_secs(30);
/// How often the flusher looks.
const TICK: Duration = Duration::from_secs(1);

/// The default size of the write buffer: a sixteenth of the machine's memory, at most 1 GiB
/// (`STEMMA_PAGESTORE_WRITE_BUFFER_MB` overrides it; 0 turns the buffer off).
pub fn default_write_buffer() -> usize {
    if let Some(mb) = std::env::var("STEMMA_PAGESTORE_WRITE_BUFFER_MB")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        return mb << 20;
    }
    // SAFETY: sysconf has no preconditions.
    let (pages, page) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let total = (pages.max(0) as u64).saturating_mul(page.max(0) as u64);
    (total / 16).min(1 << 30) as usize
}

/// A handle on the flusher thread; stopping it (or dropping the handle) joins it.
pub struct Flusher {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Flusher {
    /// Starts the thread (nothing to do when the store has no write buffer).
    pub fn start(store: Arc<PageStore>, limit: usize) -> std::io::Result<Self> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("flusher".into())
            .spawn(move || run(&store, limit, &stop2))?;
        Ok(Flusher {
            stop,
            thread: Some(thread),
        })
    }

    pub fn stop(&mut self) {
        *self.stop.0.lock() = true;
        self.stop.1.notify_one();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("the write buffer's flusher thread panicked");
            }
        }
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(store: &PageStore, limit: usize, stop: &(Mutex<bool>, Condvar)) {
    loop {
        {
            let mut stopped = stop.0.lock();
            if *stopped {
                return;
            }
            stop.1.wait_for(&mut stopped, TICK);
            if *stopped {
                return;
            }
        }
        if store.buffered_bytes() == 0 {
            continue;
        }
        if let Err(e) = store.flush_buffered(None, Some(FLUSH_AGE), limit / 2) {
            tracing::error!(error = %e, "committing buffered page writes failed");
        }
    }
}
