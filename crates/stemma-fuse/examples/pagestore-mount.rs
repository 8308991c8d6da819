//! Mounts page-store timelines with the `pagestore` driver and serves them until SIGINT or
//! SIGTERM; used by `bench/pagestore-pgbench.sh`.
//!
//! ```text
//! pagestore-mount ROOT TIMELINE_ID [--owner UID:GID]
//! ```
//!
//! Creates the timeline when it does not exist, prints its data directory on stdout, then
//! waits. Tuning for experiments, from the environment: `STEMMA_FUSE_THREADS`,
//! `STEMMA_FUSE_WRITEBACK` (0/1), `STEMMA_FUSE_CLONE_FD` (0/1), `STEMMA_FUSE_MAX_BACKGROUND`,
//! `STEMMA_FUSE_DIRECT_DIR` (empty: none), `STEMMA_FUSE_NICE` (a number; empty: inherit),
//! `STEMMA_FUSE_EXTERNAL_DIR` (empty: none), `STEMMA_FUSE_PASSTHROUGH` (0/1),
//! `STEMMA_FUSE_LIVE` (0: the external directory on a FUSE mount of its own, not live).
//!
//! `SIGUSR2` readies the timeline for a compute, as the daemon does before starting one
//! (`sync_timeline`: after `initdb`, this mounts `pg_wal` on its own connection).

use std::io::Write;
use std::path::PathBuf;

use nix::sys::signal::{SigSet, Signal};
use stemma_fuse::{DriverOptions, PagestoreDriver};
use stemma_storage::{StorageDriver, TimelineId};

fn env_num<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "stemma_fuse=info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        return Err("usage: pagestore-mount ROOT TIMELINE_ID [--owner UID:GID]".into());
    }
    let root = PathBuf::from(&args[1]);
    let id = TimelineId::parse(&args[2])?;
    let owner = match args.get(3).map(String::as_str) {
        Some("--owner") => {
            let spec = args.get(4).ok_or("--owner needs UID:GID")?;
            let (u, g) = spec.split_once(':').ok_or("--owner needs UID:GID")?;
            Some((u.parse()?, g.parse()?))
        }
        Some(other) => return Err(format!("unknown argument {other:?}").into()),
        None => None,
    };
    let mut options = DriverOptions::default();
    if let Some(n) = env_num("STEMMA_FUSE_THREADS") {
        options.fuse.threads = n;
    }
    if let Some(n) = env_num::<u8>("STEMMA_FUSE_WRITEBACK") {
        options.fuse.writeback_cache = n != 0;
    }
    if let Some(n) = env_num::<u8>("STEMMA_FUSE_CLONE_FD") {
        options.fuse.clone_fd = n != 0;
    }
    if let Some(n) = env_num("STEMMA_FUSE_MAX_BACKGROUND") {
        options.fuse.max_background = n;
    }
    if let Ok(n) = std::env::var("STEMMA_FUSE_NICE") {
        options.fuse.nice = n.parse().ok();
    }
    if let Ok(d) = std::env::var("STEMMA_FUSE_DIRECT_DIR") {
        options.fuse.direct_io_dir = Some(d).filter(|d| !d.is_empty());
    }
    if let Ok(d) = std::env::var("STEMMA_FUSE_EXTERNAL_DIR") {
        options.fuse.external_dir = Some(d).filter(|d| !d.is_empty());
    }
    if let Some(n) = env_num::<u8>("STEMMA_FUSE_PASSTHROUGH") {
        options.fuse.passthrough = n != 0;
    }
    if let Some(n) = env_num::<u8>("STEMMA_FUSE_LIVE") {
        options.fuse.live_external_dir = n != 0;
    }

    // Block the stop signals before any thread starts, so that they all inherit the mask and
    // only the sigwait below receives them.
    let mut stop = SigSet::empty();
    stop.add(Signal::SIGINT);
    stop.add(Signal::SIGTERM);
    // SIGUSR1 prints the FUSE request counters (to see where a workload's round trips go).
    stop.add(Signal::SIGUSR1);
    stop.add(Signal::SIGUSR2);
    stop.thread_block()?;

    let driver = PagestoreDriver::open(&root, owner, options)?;
    let dir = if driver.exists(&id) {
        driver.data_dir(&id)
    } else {
        driver.create_empty(&id)?
    };
    eprintln!("{}", driver.describe());
    println!("{}", dir.display());
    std::io::stdout().flush()?;
    loop {
        let sig = stop.wait()?;
        if sig == Signal::SIGUSR2 {
            match driver.sync_timeline(&id) {
                Ok(()) => eprintln!("ready for a compute"),
                Err(e) => eprintln!("readying the timeline failed: {e}"),
            }
            continue;
        }
        eprintln!("{sig:?}: FUSE requests (count, handler time):");
        for r in stemma_fuse::request_counts() {
            eprintln!(
                "  {:<10} {:>10} {:>10.3} s {:>8.1} us each",
                r.op,
                r.count,
                r.handler_time.as_secs_f64(),
                r.handler_time.as_secs_f64() * 1e6 / r.count as f64
            );
        }
        if sig != Signal::SIGUSR1 {
            break;
        }
    }
    eprintln!("unmounting");
    driver.shutdown();
    Ok(())
}
