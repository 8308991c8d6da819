//! Supervision of stock PostgreSQL computes.
//!
//! A **compute** is one unmodified `postgres` process serving one branch's data directory. This
//! crate finds the installed PostgreSQL ([`PgInstall`]), runs `initdb`, starts computes as an
//! unprivileged user when the daemon is root, adopts computes that outlived a daemon restart,
//! restarts computes that die (with backoff) and stops them cleanly ([`Supervisor`]). It also
//! brackets clones of a running compute with an online backup ([`OnlineBackup`]), and checkpoints
//! a running compute before a crash-consistent branch point ([`checkpoint_if_behind`]).
//!
//! Architecture invariants:
//! - A compute is identified by its data directory: `postmaster.pid` inside it is the truth about
//!   whether it runs, so a restarted daemon finds its computes again instead of starting twins.
//! - This crate knows nothing about branches, metadata or HTTP. It is told which data directory,
//!   port and settings to run; the control plane decides when.

mod backup;
mod checkpoint;
mod install;
mod process;
mod session;
mod supervisor;

pub use backup::{BackupFiles, OnlineBackup};
pub use checkpoint::{checkpoint_if_behind, replay_bound, ReplayDebt};
pub use install::{ComputeUser, PgInstall};
pub use process::{initdb, read_postmaster_pid, DiesWithParent, InitdbOptions, PostmasterPid};
pub use session::SessionTarget;
pub use supervisor::{ComputeInfo, ComputeSpec, Supervisor};

/// Errors from compute supervision. Messages say what to do next where there is something to do.
#[derive(Debug, thiserror::Error)]
pub enum ComputeError {
    #[error(
        "no PostgreSQL server installation found (looked at STEMMA_PG_BIN, PATH, `pg_config --bindir` and /usr/lib/postgresql/*/bin); install it, e.g. `apt-get install postgresql`, or set STEMMA_PG_BIN to the directory holding `postgres`"
    )]
    NoPostgres,
    #[error("{0}")]
    User(String),
    #[error(
        "port {port} is already in use by another program; free it or give the branch another port"
    )]
    PortInUse { port: u16 },
    #[error("the compute for {label} did not start: {reason}")]
    StartFailed { label: String, reason: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{context}: {source}")]
    Postgres {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("{0}")]
    Failed(String),
}

impl ComputeError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| ComputeError::Io { context, source }
    }
}

pub type Result<T, E = ComputeError> = std::result::Result<T, E>;
