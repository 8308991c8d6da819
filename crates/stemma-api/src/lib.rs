//! The types of Stemma's JSON HTTP API, and a small blocking client for them.
//!
//! This crate is an **API boundary**: the field names here are the stable `--output json` and
//! HTTP shapes promised to scripts (snake_case; adding a field is fine, renaming or removing one
//! is a breaking change). The daemon serialises these types; the CLI deserialises them.

mod client;

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use client::{Client, ClientError};

/// An error and its causes on one line, each cause once: a cause whose text an outer one
/// already printed (an error that shows its source in its own message) is skipped. What the
/// daemon puts in an API error and the CLI prints.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    for cause in std::iter::successors(Some(e), |e| e.source()) {
        let s = cause.to_string();
        if out.contains(&s) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&s);
    }
    out
}

/// Whether a branch's compute is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BranchState {
    Running,
    Suspended,
}

/// A branch: a named, writable database state with a parent (except roots).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Branch {
    pub name: String,
    /// The parent branch; `null` for a root.
    pub parent: Option<String>,
    pub created_at: DateTime<Utc>,
    pub state: BranchState,
    /// A libpq URI with credentials; stable for the branch's life (suspend, reset, restarts).
    pub connection_string: String,
    pub protected: bool,
    pub expires_at: Option<DateTime<Utc>>,
    pub logical_size_bytes: u64,
    pub own_storage_bytes: u64,
    /// The database the connection string points at.
    pub database: String,
    pub port: u16,
    pub timeline_id: String,
    pub last_reset_at: Option<DateTime<Utc>>,
    /// Seconds of idleness before the compute is suspended; `null` for the default.
    pub suspend_timeout_seconds: Option<u64>,
    /// PostgreSQL settings of this branch's compute that override Stemma's defaults.
    pub settings: BTreeMap<String, String>,
    pub compute: Option<Compute>,
    /// Why the compute is not running although it should, when it failed to start.
    pub compute_error: Option<String>,
    /// Why the branch's port is not served, when another program holds it.
    pub endpoint_error: Option<String>,
    /// `expires_at` has passed but the branch is kept: it has children.
    pub expired: bool,
    /// The last migration run (pull-request branches).
    pub migration: Option<Migration>,
    /// The next scheduled reset, when `stemma.toml` schedules one.
    pub next_reset_at: Option<DateTime<Utc>>,
    pub last_scheduled_reset: Option<ScheduledReset>,
    /// Set on an anonymized branch: its masking rules and last run.
    #[serde(default)]
    pub anonymization: Option<Anonymization>,
    /// Set while this root follows a physical source: it is a read-only hot standby of
    /// production with production's roles, so `connection_string` names production's user
    /// (from the source URL, without its password) and `note` says how to log in.
    #[serde(default)]
    pub follows_source: Option<String>,
    /// Something to know before connecting (shown by the CLI), e.g. a standby's login.
    #[serde(default)]
    pub note: Option<String>,
}

/// The masking rules of an anonymized branch, and its last (re-)anonymization.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Anonymization {
    /// SHA-256 (hex) of the rules that the next reset applies.
    pub rules_digest: String,
    pub last_run: Option<AnonymizationRun>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AnonymizationRun {
    pub at: DateTime<Utc>,
    /// SHA-256 (hex) of the rules that run used.
    pub rules_digest: String,
    /// `ok` or `failed`.
    pub outcome: String,
    /// Why it failed (never a row value).
    pub message: Option<String>,
    pub tables: u64,
    pub rows: u64,
}

/// Creates an anonymized branch: a new root of storage written only with masked rows of the
/// parent's current state.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct AnonymizeRequest {
    pub name: String,
    /// The branch whose data is masked; by default the default parent.
    pub parent: Option<String>,
    /// The masking rules file's text (TOML; see docs/anonymize.md).
    pub rules: String,
    /// Tables copied in parallel; default 2.
    pub jobs: Option<u32>,
    #[serde(default)]
    pub protected: bool,
    pub suspend_timeout: Option<String>,
}

/// Progress of one table in an anonymization.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TableProgress {
    pub database: String,
    /// `schema.table`
    pub table: String,
    pub rows: u64,
    pub bytes: u64,
    pub done: bool,
}

/// Issues an API token restricted to a branch and the branches under it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreateTokenRequest {
    pub name: String,
    pub branch: String,
}

/// A restricted API token. The secret is shown once, when it is created.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Token {
    pub name: String,
    /// The root of the subtree the token may see and change.
    pub branch: String,
    pub created_at: DateTime<Utc>,
    /// Only in the answer to its creation.
    pub token: Option<String>,
}

/// The outcome of a migration run.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Migration {
    /// `ok`, `failed` or `running`.
    pub status: String,
    pub finished_at: DateTime<Utc>,
    /// The tail of the migration's output.
    pub log: String,
}

/// The last run of a scheduled reset.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ScheduledReset {
    pub at: DateTime<Utc>,
    /// `ok` or `failed`.
    pub outcome: String,
    pub message: Option<String>,
}

/// Opens the branch of a pull request (idempotent).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct PullRequestRequest {
    /// The parent; default from `stemma.toml`, else `staging` when it exists, else the default
    /// parent.
    pub parent: Option<String>,
}

/// The schema differences between two branches, per database.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SchemaDiff {
    pub branch: String,
    pub against: String,
    pub identical: bool,
    /// A unified diff (`format=unified`) or a Markdown comment (`format=markdown`).
    pub diff: String,
}

/// A running compute (one stock `postgres` process).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Compute {
    pub branch: String,
    pub pid: i32,
    /// The branch's port (served by the proxy).
    pub port: u16,
    pub started_at: DateTime<Utc>,
    pub restarts: u32,
}

/// The daemon's state.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Status {
    pub version: String,
    pub api_url: String,
    pub pid: u32,
    pub started_at: DateTime<Utc>,
    pub data_dir: String,
    /// The storage driver's name: `copy` or `pagestore`.
    pub storage: String,
    /// How the driver works on this host, and why.
    pub storage_detail: String,
    /// The shared proxy port; `null` until the proxy exists.
    pub proxy_port: Option<u16>,
    pub postgres_version: u32,
    pub postgres_bin_dir: String,
    /// The OS user computes run as.
    pub compute_user: String,
    pub branches: usize,
    pub computes: Vec<Compute>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct CreateBranchRequest {
    pub name: String,
    /// The parent branch; defaults to `main`.
    pub parent: Option<String>,
    /// A past moment to branch from (RFC 3339); needs a driver with point-in-time support.
    pub at: Option<String>,
    /// Time to live, e.g. `12h` or `7d`: sets `expires_at`.
    pub ttl: Option<String>,
    #[serde(default)]
    pub protected: bool,
    /// e.g. `5m`; `0` never suspends.
    pub suspend_timeout: Option<String>,
    /// PostgreSQL settings for the compute (`work_mem` = `16MB`...); by default the parent's.
    pub settings: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct ResetBranchRequest {
    /// Keep the branch's current state as a new branch with this name.
    pub preserve_under_name: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct RestoreBranchRequest {
    pub at: String,
    pub preserve_under_name: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct RenameBranchRequest {
    pub new_name: String,
}

/// Fields to change; absent fields stay as they are.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct UpdateBranchRequest {
    pub protected: Option<bool>,
    /// A duration from now, or `none` to clear `expires_at`.
    pub ttl: Option<String>,
    pub suspend_timeout: Option<String>,
    /// PostgreSQL settings to change: a value sets, `null` removes the override. The compute
    /// restarts to apply them.
    pub settings: Option<BTreeMap<String, Option<String>>>,
    /// New masking rules (the file's text) for an anonymized branch, applied at its next reset.
    pub anonymize: Option<String>,
}

/// Creates a root branch: empty, or imported from an external database.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct InitRequest {
    pub name: String,
    /// A libpq URI of the database to import (`pg_dump` / `pg_restore`).
    pub from: Option<String>,
    /// Parallel jobs for the dump and the restore; default 2.
    pub jobs: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OperationState {
    Running,
    Succeeded,
    Failed,
}

/// A long-running operation (an import), polled by the CLI for its progress.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Operation {
    pub id: String,
    pub kind: String,
    pub state: OperationState,
    /// What it is doing now, in words.
    pub phase: String,
    pub done: u64,
    pub total: u64,
    pub error: Option<String>,
    /// The branch made, once it succeeded.
    pub branch: Option<Branch>,
    /// Per-table progress (anonymization).
    #[serde(default)]
    pub tables: Vec<TableProgress>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ConnectionString {
    pub branch: String,
    pub database: String,
    pub connection_string: String,
    /// Set while the branch follows a physical source (see [`Branch::follows_source`]).
    #[serde(default)]
    pub follows_source: Option<String>,
    /// Something to know before connecting, e.g. a standby's login.
    #[serde(default)]
    pub note: Option<String>,
    /// Production's password, only when asked with `source_password=true` by the daemon's
    /// own token, and only while the branch follows a physical source: `stemma psql` passes
    /// it to psql in its environment. Never printed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_password: Option<String>,
}

/// Every error response has this shape.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ApiError {
    /// A stable machine-readable code: `not_found`, `conflict`, `invalid`, `unsupported`,
    /// `unauthorized`, `internal`.
    pub code: String,
    /// What went wrong and, where possible, what to do.
    pub error: String,
}

// ----- sources ------------------------------------------------------------------------------

/// How a source feeds its root branch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SourceMode {
    /// A base backup, then a hot standby streaming from production (same major version).
    Physical,
    /// A consistent `pg_dump`, restored into a new timeline on `source refresh`.
    Snapshot,
}

impl SourceMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceMode::Physical => "physical",
            SourceMode::Snapshot => "snapshot",
        }
    }
}

/// Adds a source that feeds a root branch.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AddSourceRequest {
    pub name: String,
    /// A libpq URI of production, e.g. `postgresql://replicator:secret@db.internal:5432/app`.
    pub url: String,
    pub mode: SourceMode,
    /// The root branch it feeds (created when missing); default `main`.
    pub branch: Option<String>,
    /// Replace a root that already holds data (its children keep their state).
    #[serde(default)]
    pub replace: bool,
    /// Snapshot mode: parallel jobs (connections to production); default 2.
    pub jobs: Option<u32>,
    /// Physical mode: `source status` warns above this much WAL held back by the slot;
    /// default 1 GiB.
    pub max_retained_wal_bytes: Option<u64>,
}

/// A source and how it is doing. The URL's password is always redacted (`****`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Source {
    pub name: String,
    pub branch: String,
    pub mode: SourceMode,
    /// `adding`, `ready`, `refreshing`, `removing`.
    pub state: String,
    /// The URL with its password replaced by `****`.
    pub url: String,
    /// Physical mode: the replication slot on production.
    pub slot: Option<String>,
    /// Physical mode: the standby's state as production sees it (`streaming`, `catchup`,
    /// `disconnected`), or `unknown` when production cannot be asked.
    pub replication: Option<String>,
    /// Physical mode: bytes of WAL production wrote that the standby has not replayed.
    pub lag_bytes: Option<u64>,
    /// Physical mode: production's measure of the replay lag, in seconds.
    pub lag_seconds: Option<f64>,
    /// Physical mode: bytes of WAL the slot keeps on production.
    pub retained_wal_bytes: Option<u64>,
    pub max_retained_wal_bytes: u64,
    pub jobs: u32,
    pub created_at: DateTime<Utc>,
    /// When the root last took a snapshot (snapshot mode) or its base backup (physical).
    pub last_refresh_at: Option<DateTime<Utc>>,
    /// Why the last operation failed (cleared by the next success).
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    pub warnings: Vec<String>,
    /// The last `refresh` step of a schedule on this source (`ok`, `failed`, `skipped`).
    pub last_scheduled_refresh: Option<ScheduledReset>,
}
