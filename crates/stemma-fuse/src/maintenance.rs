//! The pagestore server's background maintenance: GC of the page store's index, compaction of
//! its data files and index checkpoints ([`PageStore::maintain`]), every
//! [`MAINTENANCE_EVERY`] and soon after a timeline is deleted.
//!
//! One thread, so runs never overlap; FUSE I/O goes on meanwhile: the store walks shared
//! copies of its index with no lock, and holds its write lock only for GC's batches of changes
//! and for switching moved pages to their new place, never while it copies.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use stemma_pagestore::{MaintenanceReport, PageStore};

/// How often maintenance runs when nothing asks for it sooner.
pub const MAINTENANCE_EVERY: Duration = Duration::from_secs(10 * 60);
/// How long after a deletion maintenance runs: long enough to batch a burst of deletions
/// (a reset deletes, then creates), short enough that the space comes back soon.
pub const AFTER_DELETE: Duration = Duration::from_secs(5);

struct Schedule {
    next: Instant,
    stop: bool,
}

/// A handle on the maintenance thread.
pub struct Maintainer {
    schedule: Mutex<Schedule>,
    wake: Condvar,
}

impl Maintainer {
    /// Starts the thread; the first run comes after `every`.
    pub fn start(store: Arc<PageStore>, every: Duration) -> std::io::Result<Arc<Self>> {
        let m = Arc::new(Maintainer {
            schedule: Mutex::new(Schedule {
                next: Instant::now() + every,
                stop: false,
            }),
            wake: Condvar::new(),
        });
        let m2 = m.clone();
        std::thread::Builder::new()
            .name("maintenance".into())
            .spawn(move || m2.run(&store, every))?;
        Ok(m)
    }

    /// Asks for a run within `after` (sooner if one was already due).
    pub fn poke(&self, after: Duration) {
        let mut s = self.schedule.lock();
        let at = Instant::now() + after;
        if at < s.next {
            s.next = at;
            self.wake.notify_one();
        }
    }

    /// No run starts after this; one in progress finishes (or is cut short by the process
    /// exiting, which the store survives like any crash).
    pub fn stop(&self) {
        self.schedule.lock().stop = true;
        self.wake.notify_one();
    }

    fn run(&self, store: &PageStore, every: Duration) {
        loop {
            {
                let mut s = self.schedule.lock();
                loop {
                    if s.stop {
                        return;
                    }
                    let next = s.next;
                    if Instant::now() >= next {
                        break;
                    }
                    self.wake.wait_until(&mut s, next);
                }
                s.next = Instant::now() + every;
            }
            match store.maintain() {
                Ok(r) => log_report(&r),
                Err(e) => tracing::error!(error = %e, "page store maintenance failed"),
            }
        }
    }
}

/// One line for the server's log: what maintenance gave back.
pub fn log_report(r: &MaintenanceReport) {
    tracing::info!(
        reclaimed_bytes = r.bytes_before.saturating_sub(r.bytes_after),
        store_bytes = r.bytes_after,
        versions_dropped = r.gc.versions_dropped,
        orphans_freed = r.gc.orphans_freed,
        index_versions = r.gc.index_versions,
        longest_attrs = r.gc.longest_attrs,
        files_compacted = r.files_compacted,
        pages_moved = r.pages_moved,
        longest_lock_ms = r.longest_lock.as_secs_f64() * 1000.0,
        longest_read_lock_ms = r.longest_read_lock.as_secs_f64() * 1000.0,
        elapsed_ms = r.elapsed.as_millis() as u64,
        "page store maintenance"
    );
}
