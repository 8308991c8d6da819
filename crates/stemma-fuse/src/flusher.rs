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
//!
//! The log preparer, a second thread, keeps the log's next segment written and fsynced ahead
//! of need (see `PageStore::prepare_log_segment`).

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

/// A thread that runs a task every `tick` until stopped; stopping it (or dropping the handle)
/// joins it, after the task in progress: the flusher and the log preparer.
pub struct Periodic {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
    name: &'static str,
}

impl Periodic {
    pub fn start(
        name: &'static str,
        tick: Duration,
        mut task: impl FnMut() + Send + 'static,
    ) -> std::io::Result<Self> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || loop {
                {
                    let mut stopped = stop2.0.lock();
                    if *stopped {
                        return;
                    }
                    stop2.1.wait_for(&mut stopped, tick);
                    if *stopped {
                        return;
                    }
                }
                task();
            })?;
        Ok(Periodic {
            stop,
            thread: Some(thread),
            name,
        })
    }

    pub fn stop(&mut self) {
        *self.stop.0.lock() = true;
        self.stop.1.notify_one();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!(
                    thread = self.name,
                    "a background thread of the page store panicked"
                );
            }
        }
    }
}

impl Drop for Periodic {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts the write buffer's flusher (see the module's docs).
pub fn start_flusher(store: Arc<PageStore>, limit: usize) -> std::io::Result<Periodic> {
    Periodic::start("flusher", TICK, move || {
        if store.buffered_bytes() == 0 {
            return;
        }
        if let Err(e) = store.flush_buffered(None, Some(FLUSH_AGE), limit / 2) {
            tracing::error!(error = %e, "committing buffered page writes failed");
        }
    })
}

/// How often the notes of external files' fsyncs are committed when nothing else commits
/// them: well under the store's time granularity (1 s), so that a branch at a moment holds
/// every WAL fsync that returned a granularity before it, even on an idle database.
const NOTE_TICK: Duration = Duration::from_millis(100);

/// Starts the note committer (see [`NOTE_TICK`] and `PageStore::commit_external_notes`).
pub fn start_note_committer(store: Arc<PageStore>) -> std::io::Result<Periodic> {
    Periodic::start("note-committer", NOTE_TICK, move || {
        if let Err(e) = store.commit_external_notes() {
            tracing::error!(error = %e, "committing the notes of external files' fsyncs failed");
        }
    })
}

/// How often the log preparer looks whether the next segment is ready. A segment lasts
/// seconds even under TPC-B (256 MiB at tens of MB/s), and preparing one takes about a
/// second, so a few looks a second keep one ready.
const PREPARE_TICK: Duration = Duration::from_millis(250);

/// Starts the log preparer: keeps the log's next segment written with zeros and fsynced
/// before the log needs it (`PageStore::prepare_log_segment`), off every commit's path.
pub fn start_preparer(store: Arc<PageStore>) -> std::io::Result<Periodic> {
    Periodic::start("log-preparer", PREPARE_TICK, move || {
        if let Err(e) = store.prepare_log_segment() {
            tracing::warn!(error = %e, "preparing the next log segment failed");
        }
    })
}
