//! The `sources` table: which production database feeds which root branch, and how.
//!
//! A row is inserted (state `adding`) before anything is done on production or in storage, so
//! that it reserves the source's name and its branch; a crash leaves an `adding` row that the
//! next start removes (with the replication slot it names, if production answers).

use anyhow::Result;
use chrono::{DateTime, Utc};
use rusqlite::{params, OptionalExtension, Row};

use super::{parse_ts, ts, Metadata};

#[derive(Debug, Clone, PartialEq)]
pub struct SourceRow {
    pub name: String,
    pub branch_id: i64,
    /// `physical` or `snapshot`.
    pub mode: String,
    /// The libpq URI, password included: never print it unredacted.
    pub url: String,
    /// The replication slot on production (physical mode).
    pub slot: Option<String>,
    pub jobs: u32,
    /// `source status` warns when the slot holds back more WAL than this.
    pub max_retained_wal_bytes: u64,
    /// `adding`, `ready`, `refreshing` or `removing`.
    pub state: String,
    pub created_at: DateTime<Utc>,
    pub last_refresh_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
}

const COLUMNS: &str = "name, branch_id, mode, url, slot, jobs, max_retained_wal_bytes, state, created_at, last_refresh_at, last_error, last_error_at";

fn opt_ts(s: Option<String>) -> rusqlite::Result<Option<DateTime<Utc>>> {
    s.map(|s| parse_ts(&s)).transpose()
}

fn source_from_row(r: &Row<'_>) -> rusqlite::Result<SourceRow> {
    Ok(SourceRow {
        name: r.get(0)?,
        branch_id: r.get(1)?,
        mode: r.get(2)?,
        url: r.get(3)?,
        slot: r.get(4)?,
        jobs: r.get::<_, i64>(5)?.clamp(1, 64) as u32,
        max_retained_wal_bytes: r.get::<_, i64>(6)?.max(0) as u64,
        state: r.get(7)?,
        created_at: parse_ts(&r.get::<_, String>(8)?)?,
        last_refresh_at: opt_ts(r.get(9)?)?,
        last_error: r.get(10)?,
        last_error_at: opt_ts(r.get(11)?)?,
    })
}

impl Metadata {
    pub fn sources(&self) -> Result<Vec<SourceRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!("SELECT {COLUMNS} FROM sources ORDER BY name"))?;
        let rows = stmt.query_map([], source_from_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    pub fn source(&self, name: &str) -> Result<Option<SourceRow>> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {COLUMNS} FROM sources WHERE name = ?1"),
                [name],
                source_from_row,
            )
            .optional()?)
    }

    pub fn source_of_branch(&self, branch_id: i64) -> Result<Option<SourceRow>> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {COLUMNS} FROM sources WHERE branch_id = ?1"),
                [branch_id],
                source_from_row,
            )
            .optional()?)
    }

    /// Records a new source in state `adding`. Fails when the name or the branch has one.
    pub fn insert_source(&self, s: &SourceRow) -> Result<()> {
        self.conn().execute(
            "INSERT INTO sources(name, branch_id, mode, url, slot, jobs, max_retained_wal_bytes, state, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![s.name, s.branch_id, s.mode, s.url, s.slot, s.jobs as i64, s.max_retained_wal_bytes.min(i64::MAX as u64) as i64, s.state, ts(&s.created_at)],
        )?;
        Ok(())
    }

    pub fn set_source_state(&self, name: &str, state: &str) -> Result<()> {
        self.conn().execute(
            "UPDATE sources SET state = ?2 WHERE name = ?1",
            params![name, state],
        )?;
        Ok(())
    }

    /// Records a successful refresh (or the base backup): clears the last error.
    pub fn source_refreshed(&self, name: &str, at: &DateTime<Utc>) -> Result<()> {
        self.conn().execute(
            "UPDATE sources SET state = 'ready', last_refresh_at = ?2, last_error = NULL, last_error_at = NULL WHERE name = ?1",
            params![name, ts(at)],
        )?;
        Ok(())
    }

    /// Records why the last operation on a source failed; its state goes back to `ready`
    /// unless given.
    pub fn source_failed(&self, name: &str, error: &str, state: &str) -> Result<()> {
        self.conn().execute(
            "UPDATE sources SET state = ?3, last_error = ?2, last_error_at = ?4 WHERE name = ?1",
            params![name, error, state, ts(&Utc::now())],
        )?;
        Ok(())
    }

    pub fn set_source_slot(&self, name: &str, slot: &str) -> Result<()> {
        self.conn().execute(
            "UPDATE sources SET slot = ?2 WHERE name = ?1",
            params![name, slot],
        )?;
        Ok(())
    }

    pub fn delete_source(&self, name: &str) -> Result<()> {
        self.conn()
            .execute("DELETE FROM sources WHERE name = ?1", [name])?;
        Ok(())
    }

    /// Sets the database a branch's connection string names (a source brings its own).
    pub fn set_branch_database(&self, branch_id: i64, database: &str) -> Result<()> {
        self.conn().execute(
            "UPDATE branches SET database = ?2 WHERE id = ?1",
            params![branch_id, database],
        )?;
        Ok(())
    }
}
