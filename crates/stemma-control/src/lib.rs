//! Stemma's control plane: the metadata store, branch operations, crash reconciliation,
//! import from an external database, and the JSON HTTP API the CLI talks to.
//!
//! The path of a request: the CLI (or any HTTP client) calls the API ([`api`]); a handler calls
//! one [`Engine`] method; the engine checks the request against the metadata ([`metadata`]),
//! asks the storage driver for timelines and the supervisor for computes, and records the
//! outcome in one metadata transaction.
//!
//! Architecture invariants:
//! - Only [`metadata`] speaks SQL; only [`api`] speaks HTTP.
//! - Storage is created before metadata points at it and deleted after metadata stops pointing
//!   at it, so a crash between the two leaves an orphan that [`Engine::reconcile`] deletes,
//!   never a branch without data.
//! - Branch operations that change metadata or storage run one at a time (the engine's
//!   operation lock); reads do not take it.

mod access;
mod anonymize;
pub mod api;
mod config;
pub mod daemon;
mod endpoints;
mod engine;
mod import;
mod masking;
pub mod metadata;
mod metrics;
pub mod names;
pub mod project;
mod source;
mod workflows;

pub use access::{Access, Caller};
pub use config::{
    Config, DaemonInfo, DEFAULT_API_LISTEN, DEFAULT_CHECKPOINT_BEFORE_BRANCH, DEFAULT_PORT_BASE,
    DEFAULT_PROXY_LISTEN,
};
pub use engine::Engine;
pub use project::ProjectConfig;

/// An error of a user operation, with the class the API maps to an HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Unsupported(String),
    /// The caller's token does not reach this branch.
    #[error("{0}")]
    Forbidden(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<stemma_storage::StorageError> for ControlError {
    fn from(e: stemma_storage::StorageError) -> Self {
        match e {
            stemma_storage::StorageError::Unsupported(m) => ControlError::Unsupported(m),
            // What the caller asked for cannot be (a moment outside the retention window, in
            // the future): the request's fault, said without the driver's paths.
            stemma_storage::StorageError::Io {
                context, source, ..
            } if source.kind() == std::io::ErrorKind::InvalidInput => {
                ControlError::Invalid(format!("{context}: {source}"))
            }
            other => ControlError::Internal(anyhow::Error::new(other).context("storage")),
        }
    }
}

impl From<stemma_compute::ComputeError> for ControlError {
    fn from(e: stemma_compute::ComputeError) -> Self {
        ControlError::Internal(anyhow::Error::new(e))
    }
}

pub type Result<T, E = ControlError> = std::result::Result<T, E>;
