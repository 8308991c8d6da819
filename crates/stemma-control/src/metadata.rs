//! The metadata store: branches, timelines and daemon settings, in SQLite.
//!
//! Every user operation changes metadata inside one transaction; multi-step operations record
//! their storage side effects as timeline states so that a crash is repaired on the next start:
//!
//! - a timeline is inserted as `creating` *before* its storage exists, and becomes `ready` in
//!   the same transaction that makes a branch point at it;
//! - a timeline becomes `deleting` in the same transaction that stops any branch pointing at it,
//!   and its row is removed only *after* its storage is gone.
//!
//! So on start, `creating` and `deleting` timelines are deleted from storage (the operation is
//! rolled back or completed), and storage that no row names is an orphan to delete.
//!
//! This module is the only one that speaks SQL, so another store (PostgreSQL, for several
//! hosts) can replace it behind the same methods.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension, Row, Transaction};

/// Schema migrations, applied in order; `PRAGMA user_version` holds how many ran.
/// Never edit a released migration: add a new one.
const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    r#"
    CREATE TABLE kv (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    CREATE TABLE timelines (
        id         TEXT PRIMARY KEY,
        parent_id  TEXT REFERENCES timelines(id),
        state      TEXT NOT NULL CHECK (state IN ('creating', 'ready', 'deleting')),
        created_at TEXT NOT NULL
    );
    CREATE TABLE branches (
        id                   INTEGER PRIMARY KEY,
        name                 TEXT NOT NULL UNIQUE,
        parent_id            INTEGER REFERENCES branches(id),
        timeline_id          TEXT NOT NULL REFERENCES timelines(id),
        created_at           TEXT NOT NULL,
        protected            INTEGER NOT NULL DEFAULT 0,
        expires_at           TEXT,
        port                 INTEGER NOT NULL UNIQUE,
        db_user              TEXT NOT NULL,
        db_password          TEXT NOT NULL,
        database             TEXT NOT NULL,
        suspend_timeout_secs INTEGER,
        settings             TEXT NOT NULL DEFAULT '{}',
        compute_desired      TEXT NOT NULL DEFAULT 'running'
                             CHECK (compute_desired IN ('running', 'stopped')),
        last_reset_at        TEXT
    );
    CREATE INDEX branches_parent ON branches(parent_id);
    "#,
    // 2: migration outcomes, scheduled resets, webhook deliveries.
    r#"
    ALTER TABLE branches ADD COLUMN migration_status TEXT;
    ALTER TABLE branches ADD COLUMN migration_log TEXT;
    ALTER TABLE branches ADD COLUMN migration_at TEXT;
    CREATE TABLE schedule_runs (
        branch      TEXT PRIMARY KEY,
        last_run_at TEXT NOT NULL,
        outcome     TEXT NOT NULL,
        message     TEXT
    );
    CREATE TABLE webhook_deliveries (
        id          TEXT PRIMARY KEY,
        received_at TEXT NOT NULL
    );
    "#,
    // 3: anonymized branches (their masking rules and last run) and restricted API tokens.
    r#"
    CREATE TABLE anonymizations (
        branch_id     INTEGER PRIMARY KEY REFERENCES branches(id) ON DELETE CASCADE,
        rules         TEXT NOT NULL,
        digest        TEXT NOT NULL,
        last_run_at   TEXT,
        last_digest   TEXT,
        outcome       TEXT,
        message       TEXT,
        tables        INTEGER,
        rows          INTEGER
    );
    CREATE TABLE tokens (
        name       TEXT PRIMARY KEY,
        hash       TEXT NOT NULL UNIQUE,
        branch_id  INTEGER NOT NULL REFERENCES branches(id) ON DELETE CASCADE,
        created_at TEXT NOT NULL
    );
    "#,
    // 4: sources, the production databases a root branch follows (see `sources.rs`).
    r#"
    CREATE TABLE sources (
        name            TEXT PRIMARY KEY,
        branch_id       INTEGER NOT NULL UNIQUE,
        mode            TEXT NOT NULL CHECK (mode IN ('physical', 'snapshot')),
        url             TEXT NOT NULL,
        slot            TEXT,
        jobs            INTEGER NOT NULL DEFAULT 2,
        max_retained_wal_bytes INTEGER NOT NULL,
        state           TEXT NOT NULL,
        created_at      TEXT NOT NULL,
        last_refresh_at TEXT,
        last_error      TEXT,
        last_error_at   TEXT
    );
    "#,
];

// Sources' SQL lives beside, in `metadata/sources.rs`.
mod sources;
pub use sources::SourceRow;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimelineState {
    Creating,
    Ready,
    Deleting,
}

impl TimelineState {
    fn as_str(self) -> &'static str {
        match self {
            TimelineState::Creating => "creating",
            TimelineState::Ready => "ready",
            TimelineState::Deleting => "deleting",
        }
    }

    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "creating" => TimelineState::Creating,
            "ready" => TimelineState::Ready,
            "deleting" => TimelineState::Deleting,
            other => bail!("unknown timeline state {other:?} in metadata"),
        })
    }
}

#[derive(Debug, Clone)]
pub struct TimelineRow {
    pub id: String,
    pub parent_id: Option<String>,
    pub state: TimelineState,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BranchRow {
    pub id: i64,
    pub name: String,
    pub parent_id: Option<i64>,
    pub timeline_id: String,
    pub created_at: DateTime<Utc>,
    pub protected: bool,
    pub expires_at: Option<DateTime<Utc>>,
    pub port: u16,
    pub db_user: String,
    pub db_password: String,
    pub database: String,
    pub suspend_timeout_secs: Option<u64>,
    pub settings: BTreeMap<String, String>,
    /// Whether the compute should run.
    pub compute_running: bool,
    pub last_reset_at: Option<DateTime<Utc>>,
    pub migration: Option<MigrationRecord>,
}

/// The outcome of the last migration run on a branch.
#[derive(Debug, Clone, PartialEq)]
pub struct MigrationRecord {
    /// `ok`, `failed` or `running`.
    pub status: String,
    pub log: String,
    pub at: DateTime<Utc>,
}

/// The last run of a branch's schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleRun {
    pub at: DateTime<Utc>,
    /// `ok` or `failed`.
    pub outcome: String,
    pub message: Option<String>,
}

/// The masking rules of an anonymized branch and its last run.
#[derive(Debug, Clone, PartialEq)]
pub struct AnonymizationRow {
    pub branch_id: i64,
    /// The rules file's text, applied at the next (re-)anonymization.
    pub rules: String,
    /// SHA-256 of `rules`, hex.
    pub digest: String,
    pub last_run: Option<AnonymizationRun>,
}

/// The outcome of one anonymization of a branch.
#[derive(Debug, Clone, PartialEq)]
pub struct AnonymizationRun {
    pub at: DateTime<Utc>,
    /// The digest of the rules that run used.
    pub digest: String,
    /// `ok` or `failed`.
    pub outcome: String,
    pub message: Option<String>,
    pub tables: u64,
    pub rows: u64,
}

/// An API token restricted to a subtree of branches. Only its hash is stored.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRow {
    pub name: String,
    pub branch_id: i64,
    pub created_at: DateTime<Utc>,
}

/// What a new branch row holds (the id is assigned by the store).
#[derive(Debug, Clone)]
pub struct NewBranch {
    pub name: String,
    pub parent_id: Option<i64>,
    pub timeline_id: String,
    pub protected: bool,
    pub expires_at: Option<DateTime<Utc>>,
    pub port: u16,
    pub db_user: String,
    pub db_password: String,
    pub database: String,
    pub suspend_timeout_secs: Option<u64>,
    pub settings: BTreeMap<String, String>,
}

/// Changes to a branch's settings; `None` leaves a field alone.
#[derive(Debug, Clone, Default)]
pub struct BranchUpdate {
    pub protected: Option<bool>,
    pub expires_at: Option<Option<DateTime<Utc>>>,
    pub suspend_timeout_secs: Option<Option<u64>>,
    pub settings: Option<BTreeMap<String, String>>,
}

pub struct Metadata {
    conn: Mutex<Connection>,
}

fn ts(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn parse_ts(s: &str) -> rusqlite::Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
        })
}

const BRANCH_COLUMNS: &str = "id, name, parent_id, timeline_id, created_at, protected, expires_at, port, db_user, db_password, database, suspend_timeout_secs, settings, compute_desired, last_reset_at, migration_status, migration_log, migration_at";

fn branch_from_row(r: &Row<'_>) -> rusqlite::Result<BranchRow> {
    let settings: String = r.get(12)?;
    Ok(BranchRow {
        id: r.get(0)?,
        name: r.get(1)?,
        parent_id: r.get(2)?,
        timeline_id: r.get(3)?,
        created_at: parse_ts(&r.get::<_, String>(4)?)?,
        protected: r.get(5)?,
        expires_at: r
            .get::<_, Option<String>>(6)?
            .map(|s| parse_ts(&s))
            .transpose()?,
        port: r.get(7)?,
        db_user: r.get(8)?,
        db_password: r.get(9)?,
        database: r.get(10)?,
        suspend_timeout_secs: r.get::<_, Option<i64>>(11)?.map(|v| v.max(0) as u64),
        settings: serde_json::from_str(&settings).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(12, rusqlite::types::Type::Text, Box::new(e))
        })?,
        compute_running: r.get::<_, String>(13)? == "running",
        last_reset_at: r
            .get::<_, Option<String>>(14)?
            .map(|s| parse_ts(&s))
            .transpose()?,
        migration: match (
            r.get::<_, Option<String>>(15)?,
            r.get::<_, Option<String>>(16)?,
            r.get::<_, Option<String>>(17)?,
        ) {
            (Some(status), log, Some(at)) => Some(MigrationRecord {
                status,
                log: log.unwrap_or_default(),
                at: parse_ts(&at)?,
            }),
            _ => None,
        },
    })
}

impl Metadata {
    /// Opens (creating if needed) the store at `path` and applies pending migrations.
    pub fn open(path: &Path) -> Result<Self> {
        let mut conn = Connection::open(path)
            .with_context(|| format!("opening the metadata store {}", path.display()))?;
        // The store holds every branch's credentials, the masking key and token digests:
        // readable by the daemon's user only (computes run as another user and must not read
        // it). SQLite gives its -wal and -shm files the database file's mode.
        for suffix in ["", "-wal", "-shm"] {
            let mut p = path.as_os_str().to_owned();
            p.push(suffix);
            let p = std::path::PathBuf::from(p);
            if p.exists() {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))
                    .with_context(|| format!("restricting {}", p.display()))?;
            }
        }
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // Every committed operation must survive a power loss.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let known = MIGRATIONS.len() as i64;
        if version > known {
            bail!(
                "the metadata store {} has schema version {version}, newer than this stemma knows ({known}); upgrade stemma",
                path.display()
            );
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.transaction()?;
            tx.execute_batch(sql)
                .with_context(|| format!("applying metadata migration {}", i + 1))?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
            tracing::info!(version = i + 1, "metadata schema migrated");
        }
        Ok(Metadata {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` in one transaction, committed when it returns `Ok`.
    fn tx<T>(&self, f: impl FnOnce(&Transaction<'_>) -> Result<T>) -> Result<T> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let out = f(&tx)?;
        tx.commit().context("committing a metadata transaction")?;
        Ok(out)
    }

    pub fn get_kv(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .conn()
            .query_row("SELECT value FROM kv WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    }

    pub fn set_kv(&self, key: &str, value: &str) -> Result<()> {
        self.conn().execute(
            "INSERT INTO kv(key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [key, value],
        )?;
        Ok(())
    }

    pub fn branches(&self) -> Result<Vec<BranchRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {BRANCH_COLUMNS} FROM branches ORDER BY name"
        ))?;
        let rows = stmt.query_map([], branch_from_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    pub fn branch(&self, name: &str) -> Result<Option<BranchRow>> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {BRANCH_COLUMNS} FROM branches WHERE name = ?1"),
                [name],
                branch_from_row,
            )
            .optional()?)
    }

    pub fn branch_by_id(&self, id: i64) -> Result<Option<BranchRow>> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {BRANCH_COLUMNS} FROM branches WHERE id = ?1"),
                [id],
                branch_from_row,
            )
            .optional()?)
    }

    /// Names of the direct children of branch `id`.
    pub fn children(&self, id: i64) -> Result<Vec<String>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT name FROM branches WHERE parent_id = ?1 ORDER BY name")?;
        let rows = stmt.query_map([id], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<Vec<String>>>()?)
    }

    pub fn used_ports(&self) -> Result<Vec<u16>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT port FROM branches")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<Vec<u16>>>()?)
    }

    pub fn timelines(&self) -> Result<Vec<TimelineRow>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT id, parent_id, state, created_at FROM timelines ORDER BY id")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, String>(2)?,
                parse_ts(&r.get::<_, String>(3)?)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, parent_id, state, created_at) = row?;
            out.push(TimelineRow {
                id,
                parent_id,
                state: TimelineState::parse(&state)?,
                created_at,
            });
        }
        Ok(out)
    }

    /// Records a timeline about to be created in storage.
    pub fn begin_timeline(&self, id: &str, parent_id: Option<&str>) -> Result<()> {
        self.conn().execute(
            "INSERT INTO timelines(id, parent_id, state, created_at) VALUES (?1, ?2, 'creating', ?3)",
            params![id, parent_id, ts(&Utc::now())],
        )?;
        Ok(())
    }

    /// How many timelines were branched from `id`.
    pub fn timeline_children(&self, id: &str) -> Result<usize> {
        Ok(self.conn().query_row(
            "SELECT count(*) FROM timelines WHERE parent_id = ?1",
            [id],
            |r| r.get::<_, i64>(0),
        )? as usize)
    }

    pub fn timeline_parent(&self, id: &str) -> Result<Option<String>> {
        Ok(self
            .conn()
            .query_row("SELECT parent_id FROM timelines WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()?
            .flatten())
    }

    /// Whether a branch points at timeline `id`.
    pub fn timeline_in_use(&self, id: &str) -> Result<bool> {
        Ok(self.conn().query_row(
            "SELECT count(*) FROM branches WHERE timeline_id = ?1",
            [id],
            |r| r.get::<_, i64>(0),
        )? > 0)
    }

    /// Keeps a timeline that no branch uses but whose children still read through it: it is
    /// `ready` again, and goes when its last child does.
    pub fn retire_timeline(&self, id: &str) -> Result<()> {
        self.conn()
            .execute("UPDATE timelines SET state = 'ready' WHERE id = ?1", [id])?;
        Ok(())
    }

    /// Forgets a timeline whose storage is gone (or never was made).
    pub fn forget_timeline(&self, id: &str) -> Result<()> {
        self.tx(|tx| {
            // Children made by a driver whose clones depend on parents keep a dangling parent
            // otherwise; the copy driver's clones are independent.
            tx.execute(
                "UPDATE timelines SET parent_id = NULL WHERE parent_id = ?1",
                [id],
            )?;
            tx.execute("DELETE FROM timelines WHERE id = ?1", [id])?;
            Ok(())
        })
    }

    /// Makes a `creating` timeline ready and creates the branch on it, in one transaction.
    pub fn commit_new_branch(&self, b: &NewBranch) -> Result<BranchRow> {
        let id = self.tx(|tx| {
            set_timeline_state(tx, &b.timeline_id, TimelineState::Ready)?;
            insert_branch(tx, b)
        })?;
        self.branch_by_id(id)?
            .context("a branch just inserted is missing")
    }

    /// Deletes a branch and marks its timeline for deletion, in one transaction.
    pub fn delete_branch(&self, id: i64) -> Result<()> {
        self.tx(|tx| {
            let timeline: String = tx.query_row(
                "SELECT timeline_id FROM branches WHERE id = ?1",
                [id],
                |r| r.get(0),
            )?;
            tx.execute("DELETE FROM branches WHERE id = ?1", [id])?;
            set_timeline_state(tx, &timeline, TimelineState::Deleting)?;
            Ok(())
        })
    }

    /// Points branch `id` at the `creating` timeline `new_timeline` (now ready). The old
    /// timeline goes to `preserve` (a new branch) when given, else is marked for deletion.
    /// Returns the old timeline's id and the preserved branch, if any.
    pub fn swap_timeline(
        &self,
        id: i64,
        new_timeline: &str,
        preserve: Option<NewBranch>,
    ) -> Result<(String, Option<BranchRow>)> {
        let (old, preserved) = self.tx(|tx| {
            let old: String = tx.query_row(
                "SELECT timeline_id FROM branches WHERE id = ?1",
                [id],
                |r| r.get(0),
            )?;
            set_timeline_state(tx, new_timeline, TimelineState::Ready)?;
            tx.execute(
                "UPDATE branches SET timeline_id = ?2, last_reset_at = ?3 WHERE id = ?1",
                params![id, new_timeline, ts(&Utc::now())],
            )?;
            let preserved = match preserve {
                Some(mut p) => {
                    p.timeline_id = old.clone();
                    Some(insert_branch(tx, &p)?)
                }
                None => {
                    set_timeline_state(tx, &old, TimelineState::Deleting)?;
                    None
                }
            };
            Ok((old, preserved))
        })?;
        let preserved = match preserved {
            Some(pid) => self.branch_by_id(pid)?,
            None => None,
        };
        Ok((old, preserved))
    }

    pub fn rename_branch(&self, id: i64, new_name: &str) -> Result<()> {
        self.conn().execute(
            "UPDATE branches SET name = ?2 WHERE id = ?1",
            params![id, new_name],
        )?;
        Ok(())
    }

    pub fn update_branch(&self, id: i64, u: &BranchUpdate) -> Result<()> {
        self.tx(|tx| {
            if let Some(p) = u.protected {
                tx.execute(
                    "UPDATE branches SET protected = ?2 WHERE id = ?1",
                    params![id, p],
                )?;
            }
            if let Some(e) = &u.expires_at {
                tx.execute(
                    "UPDATE branches SET expires_at = ?2 WHERE id = ?1",
                    params![id, e.as_ref().map(ts)],
                )?;
            }
            if let Some(settings) = &u.settings {
                tx.execute(
                    "UPDATE branches SET settings = ?2 WHERE id = ?1",
                    params![id, serde_json::to_string(settings)?],
                )?;
            }
            if let Some(s) = u.suspend_timeout_secs {
                tx.execute(
                    "UPDATE branches SET suspend_timeout_secs = ?2 WHERE id = ?1",
                    params![id, s.map(|v| v as i64)],
                )?;
            }
            Ok(())
        })
    }

    pub fn set_migration(&self, id: i64, m: &MigrationRecord) -> Result<()> {
        self.conn().execute(
            "UPDATE branches SET migration_status = ?2, migration_log = ?3, migration_at = ?4 WHERE id = ?1",
            params![id, m.status, m.log, ts(&m.at)],
        )?;
        Ok(())
    }

    pub fn schedule_run(&self, branch: &str) -> Result<Option<ScheduleRun>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT last_run_at, outcome, message FROM schedule_runs WHERE branch = ?1",
                [branch],
                |r| {
                    Ok(ScheduleRun {
                        at: parse_ts(&r.get::<_, String>(0)?)?,
                        outcome: r.get(1)?,
                        message: r.get(2)?,
                    })
                },
            )
            .optional()?)
    }

    pub fn record_schedule_run(&self, branch: &str, run: &ScheduleRun) -> Result<()> {
        self.conn().execute(
            "INSERT INTO schedule_runs(branch, last_run_at, outcome, message) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT(branch) DO UPDATE SET last_run_at = excluded.last_run_at, outcome = excluded.outcome, message = excluded.message",
            params![branch, ts(&run.at), run.outcome, run.message],
        )?;
        Ok(())
    }

    /// Records a webhook delivery; returns false when it was seen before. Deliveries older
    /// than a week are forgotten (GitHub redelivers within days), which bounds the table.
    pub fn record_delivery(&self, id: &str) -> Result<bool> {
        self.tx(|tx| {
            let week_ago = Utc::now() - chrono::Duration::days(7);
            tx.execute(
                "DELETE FROM webhook_deliveries WHERE received_at < ?1",
                [ts(&week_ago)],
            )?;
            let n = tx.execute(
                "INSERT OR IGNORE INTO webhook_deliveries(id, received_at) VALUES (?1, ?2)",
                params![id, ts(&Utc::now())],
            )?;
            Ok(n == 1)
        })
    }

    /// Makes a `creating` timeline ready and creates an anonymized branch on it with its
    /// rules and first run, in one transaction.
    pub fn commit_anonymized_branch(
        &self,
        b: &NewBranch,
        rules: &str,
        digest: &str,
        run: &AnonymizationRun,
    ) -> Result<BranchRow> {
        let id = self.tx(|tx| {
            set_timeline_state(tx, &b.timeline_id, TimelineState::Ready)?;
            let id = insert_branch(tx, b)?;
            tx.execute(
                "INSERT INTO anonymizations(branch_id, rules, digest) VALUES (?1, ?2, ?3)",
                params![id, rules, digest],
            )?;
            write_anonymization_run(tx, id, run)?;
            Ok(id)
        })?;
        self.branch_by_id(id)?
            .context("a branch just inserted is missing")
    }

    pub fn anonymization(&self, branch_id: i64) -> Result<Option<AnonymizationRow>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT branch_id, rules, digest, last_run_at, last_digest, outcome, message, tables, rows \
                 FROM anonymizations WHERE branch_id = ?1",
                [branch_id],
                |r| {
                    let last_run = match r.get::<_, Option<String>>(3)? {
                        Some(at) => Some(AnonymizationRun {
                            at: parse_ts(&at)?,
                            digest: r.get::<_, Option<String>>(4)?.unwrap_or_default(),
                            outcome: r.get::<_, Option<String>>(5)?.unwrap_or_default(),
                            message: r.get(6)?,
                            tables: r.get::<_, Option<i64>>(7)?.unwrap_or(0).max(0) as u64,
                            rows: r.get::<_, Option<i64>>(8)?.unwrap_or(0).max(0) as u64,
                        }),
                        None => None,
                    };
                    Ok(AnonymizationRow {
                        branch_id: r.get(0)?,
                        rules: r.get(1)?,
                        digest: r.get(2)?,
                        last_run,
                    })
                },
            )
            .optional()?)
    }

    /// New rules for an anonymized branch, used from its next reset on.
    pub fn set_anonymization_rules(&self, branch_id: i64, rules: &str, digest: &str) -> Result<()> {
        let n = self.conn().execute(
            "UPDATE anonymizations SET rules = ?2, digest = ?3 WHERE branch_id = ?1",
            params![branch_id, rules, digest],
        )?;
        if n != 1 {
            bail!("branch {branch_id} is not an anonymized branch");
        }
        Ok(())
    }

    pub fn record_anonymization_run(&self, branch_id: i64, run: &AnonymizationRun) -> Result<()> {
        self.tx(|tx| write_anonymization_run(tx, branch_id, run))
    }

    pub fn insert_token(&self, name: &str, hash: &str, branch_id: i64) -> Result<()> {
        self.conn()
            .execute(
                "INSERT INTO tokens(name, hash, branch_id, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![name, hash, branch_id, ts(&Utc::now())],
            )
            .with_context(|| format!("recording token {name}"))?;
        Ok(())
    }

    /// The token whose hash is `hash`.
    pub fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRow>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT name, branch_id, created_at FROM tokens WHERE hash = ?1",
                [hash],
                token_from_row,
            )
            .optional()?)
    }

    pub fn tokens(&self) -> Result<Vec<TokenRow>> {
        let conn = self.conn();
        let mut st =
            conn.prepare("SELECT name, branch_id, created_at FROM tokens ORDER BY name")?;
        let rows = st.query_map([], token_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Returns whether a token of that name existed.
    pub fn delete_token(&self, name: &str) -> Result<bool> {
        Ok(self
            .conn()
            .execute("DELETE FROM tokens WHERE name = ?1", [name])?
            == 1)
    }

    pub fn set_compute_running(&self, id: i64, running: bool) -> Result<()> {
        self.conn().execute(
            "UPDATE branches SET compute_desired = ?2 WHERE id = ?1",
            params![id, if running { "running" } else { "stopped" }],
        )?;
        Ok(())
    }
}

fn set_timeline_state(tx: &Transaction<'_>, id: &str, state: TimelineState) -> Result<()> {
    let n = tx.execute(
        "UPDATE timelines SET state = ?2 WHERE id = ?1",
        params![id, state.as_str()],
    )?;
    if n != 1 {
        bail!("timeline {id} is not in the metadata");
    }
    Ok(())
}

fn token_from_row(r: &Row<'_>) -> rusqlite::Result<TokenRow> {
    Ok(TokenRow {
        name: r.get(0)?,
        branch_id: r.get(1)?,
        created_at: parse_ts(&r.get::<_, String>(2)?)?,
    })
}

fn write_anonymization_run(tx: &Transaction<'_>, id: i64, run: &AnonymizationRun) -> Result<()> {
    tx.execute(
        "UPDATE anonymizations SET last_run_at = ?2, last_digest = ?3, outcome = ?4, message = ?5, tables = ?6, rows = ?7 WHERE branch_id = ?1",
        params![
            id,
            ts(&run.at),
            run.digest,
            run.outcome,
            run.message,
            run.tables as i64,
            run.rows as i64
        ],
    )?;
    Ok(())
}

fn insert_branch(tx: &Transaction<'_>, b: &NewBranch) -> Result<i64> {
    tx.execute(
        "INSERT INTO branches(name, parent_id, timeline_id, created_at, protected, expires_at, port, db_user, db_password, database, suspend_timeout_secs, settings) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        params![
            b.name,
            b.parent_id,
            b.timeline_id,
            ts(&Utc::now()),
            b.protected,
            b.expires_at.as_ref().map(ts),
            b.port,
            b.db_user,
            b.db_password,
            b.database,
            b.suspend_timeout_secs.map(|v| v as i64),
            serde_json::to_string(&b.settings)?,
        ],
    )
    .with_context(|| format!("recording branch {}", b.name))?;
    Ok(tx.last_insert_rowid())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_branch(name: &str, timeline: &str, port: u16, parent: Option<i64>) -> NewBranch {
        NewBranch {
            name: name.into(),
            parent_id: parent,
            timeline_id: timeline.into(),
            protected: false,
            expires_at: None,
            port,
            db_user: "stemma".into(),
            db_password: "pw".into(),
            database: "postgres".into(),
            suspend_timeout_secs: None,
            settings: BTreeMap::new(),
        }
    }

    #[test]
    fn lifecycle_keeps_timelines_consistent() {
        let dir = tempfile::tempdir().unwrap();
        let m = Metadata::open(&dir.path().join("m.db")).unwrap();
        m.begin_timeline("a1", None).unwrap();
        let main = m
            .commit_new_branch(&new_branch("main", "a1", 5000, None))
            .unwrap();
        assert_eq!(m.timelines().unwrap()[0].state, TimelineState::Ready);
        m.begin_timeline("b2", Some("a1")).unwrap();
        let dev = m
            .commit_new_branch(&new_branch("dev", "b2", 5001, Some(main.id)))
            .unwrap();
        assert_eq!(m.children(main.id).unwrap(), vec!["dev".to_string()]);
        assert_eq!(m.used_ports().unwrap().len(), 2);

        // Reset dev, preserving the old state.
        m.begin_timeline("c3", Some("a1")).unwrap();
        let (old, kept) = m
            .swap_timeline(
                dev.id,
                "c3",
                Some(new_branch("dev-old", "", 5002, Some(main.id))),
            )
            .unwrap();
        assert_eq!(old, "b2");
        assert_eq!(kept.unwrap().timeline_id, "b2");
        assert_eq!(m.branch("dev").unwrap().unwrap().timeline_id, "c3");
        assert!(m.branch("dev").unwrap().unwrap().last_reset_at.is_some());

        // Reset again without preserving: the old timeline is marked for deletion.
        m.begin_timeline("d4", Some("a1")).unwrap();
        let (old, kept) = m.swap_timeline(dev.id, "d4", None).unwrap();
        assert_eq!(old, "c3");
        assert!(kept.is_none());
        let states: BTreeMap<String, TimelineState> = m
            .timelines()
            .unwrap()
            .into_iter()
            .map(|t| (t.id, t.state))
            .collect();
        assert_eq!(states["c3"], TimelineState::Deleting);
        m.forget_timeline("c3").unwrap();

        m.delete_branch(dev.id).unwrap();
        assert!(m.branch("dev").unwrap().is_none());
        let states: BTreeMap<String, TimelineState> = m
            .timelines()
            .unwrap()
            .into_iter()
            .map(|t| (t.id, t.state))
            .collect();
        assert_eq!(states["d4"], TimelineState::Deleting);
    }

    #[test]
    fn a_failed_transaction_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let m = Metadata::open(&dir.path().join("m.db")).unwrap();
        m.begin_timeline("a1", None).unwrap();
        m.commit_new_branch(&new_branch("main", "a1", 5000, None))
            .unwrap();
        m.begin_timeline("b2", None).unwrap();
        // Duplicate port: the insert fails, so the timeline must stay `creating`.
        assert!(m
            .commit_new_branch(&new_branch("other", "b2", 5000, None))
            .is_err());
        let t = m.timelines().unwrap();
        assert_eq!(
            t.iter().find(|t| t.id == "b2").unwrap().state,
            TimelineState::Creating
        );
        assert!(m.branch("other").unwrap().is_none());
    }

    #[test]
    fn reopening_keeps_data_and_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        {
            let m = Metadata::open(&path).unwrap();
            m.set_kv("k", "v").unwrap();
            m.begin_timeline("a1", None).unwrap();
            let mut b = new_branch("main", "a1", 5000, None);
            b.settings.insert("work_mem".into(), "8MB".into());
            b.expires_at = Some(Utc::now());
            m.commit_new_branch(&b).unwrap();
        }
        let m = Metadata::open(&path).unwrap();
        assert_eq!(m.get_kv("k").unwrap().as_deref(), Some("v"));
        let b = m.branch("main").unwrap().unwrap();
        assert_eq!(b.settings["work_mem"], "8MB");
        assert!(b.expires_at.is_some());
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        {
            let c = Connection::open(&path).unwrap();
            c.pragma_update(None, "user_version", 99).unwrap();
        }
        let err = Metadata::open(&path).err().unwrap();
        assert!(err.to_string().contains("newer"), "{err}");
    }
}
