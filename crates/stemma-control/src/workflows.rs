//! The team workflows: pull-request branches, migrations, schema diffs, scheduled resets and
//! the GitHub comment with a branch's schema changes.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use chrono::{DateTime, Utc};
use stemma_api as api;
use stemma_compute::DiesWithParent;
use tokio::process::Command;

use crate::engine::Engine;
use crate::metadata::{BranchRow, MigrationRecord};
use crate::{ControlError, Result};

/// How much of a migration's output is kept.
const LOG_TAIL_BYTES: usize = 4000;
/// A migration command that runs longer than this is stopped and counts as failed.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// A pull-request event queued by the webhook receiver, handled in order by one worker.
#[derive(Debug, Clone)]
pub enum PrEvent {
    Open {
        number: u64,
        repository: Option<String>,
    },
    Synchronize {
        number: u64,
        repository: Option<String>,
    },
    Close {
        number: u64,
    },
}

fn tail(s: &str) -> String {
    if s.len() <= LOG_TAIL_BYTES {
        return s.to_string();
    }
    let mut start = s.len() - LOG_TAIL_BYTES;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &s[start..])
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Engine {
    /// The parent of a branch created without one.
    pub(crate) fn default_parent(&self) -> String {
        self.cfg
            .project
            .default_parent
            .clone()
            .unwrap_or_else(|| self.cfg.root_branch.clone())
    }

    pub fn pr_branch_name(&self, number: u64) -> String {
        format!("{}{number}", self.cfg.project.pull_requests.prefix)
    }

    /// Creates the branch of pull request `number` if it does not exist and runs migrations on
    /// a new one. Idempotent: an existing branch is returned as it is.
    pub async fn pr_open(&self, number: u64, parent: Option<&str>) -> Result<api::Branch> {
        let name = self.pr_branch_name(number);
        if self.meta.branch(&name)?.is_some() {
            return self.get_branch(&name).await;
        }
        let pr = &self.cfg.project.pull_requests;
        let parent = match parent.map(String::from).or_else(|| pr.parent.clone()) {
            Some(p) => p,
            None if self.meta.branch("staging")?.is_some() => "staging".into(),
            None => self.default_parent(),
        };
        let req = api::CreateBranchRequest {
            name: name.clone(),
            parent: Some(parent),
            ttl: Some(pr.ttl.clone()),
            ..Default::default()
        };
        match self.create_branch(&req).await {
            Ok(_) => {}
            // Opened concurrently (a webhook and `stemma pr open`): the other one made it.
            Err(ControlError::Conflict(_)) if self.meta.branch(&name)?.is_some() => {
                return self.get_branch(&name).await
            }
            Err(e) => return Err(e),
        }
        self.migrate_if_configured(&name).await?;
        self.get_branch(&name).await
    }

    /// A push to the pull request: optionally reset its branch, then migrate again.
    pub async fn pr_synchronize(&self, number: u64) -> Result<api::Branch> {
        let name = self.pr_branch_name(number);
        if self.meta.branch(&name)?.is_none() {
            // Missed `opened` (or the branch expired): make it now.
            return self.pr_open(number, None).await;
        }
        if self.cfg.project.pull_requests.reset_on_synchronize {
            self.reset_branch(&name, None).await?;
        }
        self.migrate_if_configured(&name).await?;
        self.get_branch(&name).await
    }

    /// Deletes the branch of pull request `number`; a missing branch is fine.
    pub async fn pr_close(&self, number: u64) -> Result<bool> {
        let name = self.pr_branch_name(number);
        match self.delete_branch(&name).await {
            Ok(()) => Ok(true),
            Err(ControlError::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub(crate) async fn handle_pr_event(&self, event: PrEvent) {
        let outcome = match &event {
            PrEvent::Open { number, repository } => {
                let r = self.pr_open(*number, None).await;
                if r.is_ok() {
                    self.comment_schema_diff(*number, repository.as_deref())
                        .await;
                }
                r.map(|_| ())
            }
            PrEvent::Synchronize { number, repository } => {
                let r = self.pr_synchronize(*number).await;
                if r.is_ok() {
                    self.comment_schema_diff(*number, repository.as_deref())
                        .await;
                }
                r.map(|_| ())
            }
            PrEvent::Close { number } => self.pr_close(*number).await.map(|_| ()),
        };
        match outcome {
            Ok(()) => tracing::info!(?event, "pull request event handled"),
            Err(e) => tracing::error!(?event, error = %e, "pull request event failed"),
        }
    }

    async fn migrate_if_configured(&self, name: &str) -> Result<()> {
        let m = &self.cfg.project.migrations;
        if m.directory.is_none() && m.command.is_none() {
            return Ok(());
        }
        self.run_migrations(name).await.map(|_| ())
    }

    /// Runs the configured migrations on a branch and records the outcome. A failed migration
    /// leaves the branch in place for inspection; the outcome says what failed.
    pub async fn run_migrations(&self, name: &str) -> Result<api::Branch> {
        let b = self
            .meta
            .branch(name)?
            .ok_or_else(|| ControlError::NotFound(format!("branch {name:?} does not exist")))?;
        let m = &self.cfg.project.migrations;
        if m.directory.is_none() && m.command.is_none() {
            return Err(ControlError::Invalid(
                "no migrations are configured: set [migrations] directory or command in stemma.toml".into(),
            ));
        }
        self.meta.set_migration(
            b.id,
            &MigrationRecord {
                status: "running".into(),
                log: String::new(),
                at: Utc::now(),
            },
        )?;
        let database = m.database.clone().unwrap_or_else(|| b.database.clone());
        let result = match (self.cfg.project.migrations_dir(), &m.command) {
            (Some(dir), _) => self.migrate_directory(&b, &database, &dir).await,
            (None, Some(cmd)) => self.migrate_command(&b, &database, cmd).await,
            (None, None) => Ok(String::new()),
        };
        let record = match result {
            Ok(log) => MigrationRecord {
                status: "ok".into(),
                log: tail(&log),
                at: Utc::now(),
            },
            Err(log) => MigrationRecord {
                status: "failed".into(),
                log: tail(&log),
                at: Utc::now(),
            },
        };
        tracing::info!(branch = name, status = %record.status, "migrations ran");
        self.meta.set_migration(b.id, &record)?;
        self.get_branch(name).await
    }

    /// A libpq URI to the branch's compute through its Unix socket, waking it.
    async fn direct_uri(&self, b: &BranchRow, database: &str) -> Result<String> {
        let socket = self
            .wake(&Self::compute_key(b))
            .await
            .map_err(|r| ControlError::Conflict(r.message))?
            .socket;
        let dir = socket
            .parent()
            .ok_or_else(|| anyhow!("socket path without a directory"))?;
        Ok(format!(
            "postgresql://{}:{}@/{}?host={}&port={}",
            b.db_user,
            b.db_password,
            database,
            dir.display(),
            crate::engine::COMPUTE_SOCKET_PORT
        ))
    }

    async fn psql(&self, args: &[&str]) -> std::result::Result<String, String> {
        let out = Command::new(self.supervisor.install().bin("psql"))
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1"])
            .args(args)
            .stdin(Stdio::null())
            .dies_with_parent()
            .output()
            .await
            .map_err(|e| format!("running psql: {e}"))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            Ok(text)
        } else {
            Err(text)
        }
    }

    /// Applies `*.sql` files of `dir` in name order, each once: applied files are recorded in
    /// `public.stemma_migrations` of the branch, in the same transaction as the file, so a
    /// branch inherits its parent's record and applies only what is new.
    async fn migrate_directory(
        &self,
        b: &BranchRow,
        database: &str,
        dir: &Path,
    ) -> std::result::Result<String, String> {
        let uri = self
            .direct_uri(b, database)
            .await
            .map_err(|e| e.to_string())?;
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| format!("reading the migrations directory {}: {e}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "sql"))
            .collect();
        files.sort();
        let mut log = String::new();
        self.psql(&[
            "-d",
            &uri,
            "-c",
            "CREATE TABLE IF NOT EXISTS public.stemma_migrations (name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
        ])
        .await?;
        let applied: BTreeSet<String> = self
            .psql(&[
                "-A",
                "-t",
                "-d",
                &uri,
                "-c",
                "SELECT name FROM public.stemma_migrations",
            ])
            .await?
            .lines()
            .map(|l| l.trim().to_string())
            .collect();
        for file in files {
            let Some(fname) = file.file_name().and_then(|n| n.to_str()).map(String::from) else {
                continue;
            };
            if applied.contains(&fname) {
                continue;
            }
            let record = format!(
                "INSERT INTO public.stemma_migrations(name) VALUES ('{}')",
                fname.replace('\'', "''")
            );
            let path = file.display().to_string();
            match self
                .psql(&[
                    "--single-transaction",
                    "-d",
                    &uri,
                    "-f",
                    &path,
                    "-c",
                    &record,
                ])
                .await
            {
                Ok(out) => log.push_str(&format!("applied {fname}\n{out}")),
                Err(out) => {
                    log.push_str(&format!("FAILED {fname}\n{out}"));
                    return Err(log);
                }
            }
        }
        if log.is_empty() {
            log.push_str("no new migrations\n");
        }
        Ok(log)
    }

    /// Runs the configured command with the branch's `DATABASE_URL` (through the proxy) and
    /// `PG*` variables, from the configuration file's directory.
    async fn migrate_command(
        &self,
        b: &BranchRow,
        database: &str,
        cmd: &str,
    ) -> std::result::Result<String, String> {
        let url = Self::connection_string(b, database);
        let child = Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .current_dir(&self.cfg.project.base_dir)
            .env("DATABASE_URL", &url)
            .env("PGHOST", "127.0.0.1")
            .env("PGPORT", b.port.to_string())
            .env("PGUSER", &b.db_user)
            .env("PGPASSWORD", &b.db_password)
            .env("PGDATABASE", database)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting the migration command {cmd:?}: {e}"))?;
        let out = tokio::time::timeout(MIGRATION_TIMEOUT, child.wait_with_output())
            .await
            .map_err(|_| {
                format!(
                    "the migration command {cmd:?} ran longer than {}s",
                    MIGRATION_TIMEOUT.as_secs()
                )
            })?
            .map_err(|e| format!("waiting for the migration command: {e}"))?;
        let text = format!(
            "$ {cmd}\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            Ok(text)
        } else {
            Err(format!("{text}\n(exit: {})", out.status))
        }
    }

    async fn databases(&self, b: &BranchRow) -> Result<BTreeSet<String>> {
        let uri = self.direct_uri(b, "postgres").await?;
        let out = self
            .psql(&[
                "-A",
                "-t",
                "-d",
                &uri,
                "-c",
                "SELECT datname FROM pg_database WHERE NOT datistemplate ORDER BY 1",
            ])
            .await
            .map_err(|e| ControlError::Internal(anyhow!("listing databases: {e}")))?;
        Ok(out
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect())
    }

    async fn schema_of(&self, b: &BranchRow, database: &str) -> Result<String> {
        let uri = self.direct_uri(b, database).await?;
        let out = Command::new(self.supervisor.install().bin("pg_dump"))
            .args(["--schema-only", "--no-owner", "--no-privileges", "-d", &uri])
            .stdin(Stdio::null())
            .dies_with_parent()
            .output()
            .await
            .context("running pg_dump")?;
        if !out.status.success() {
            return Err(ControlError::Internal(anyhow!(
                "pg_dump --schema-only of {} failed: {}",
                b.name,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        // Lines that differ between any two dumps: versions and per-dump random keys.
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| {
                !(l.starts_with("-- Dumped from")
                    || l.starts_with("-- Dumped by")
                    || l.starts_with("\\restrict")
                    || l.starts_with("\\unrestrict"))
            })
            .map(|l| format!("{l}\n"))
            .collect())
    }

    /// The schema of `name` against `against` (default: its parent), per database.
    pub async fn schema_diff(
        &self,
        name: &str,
        against: Option<&str>,
        markdown: bool,
    ) -> Result<api::SchemaDiff> {
        let b = self
            .meta
            .branch(name)?
            .ok_or_else(|| ControlError::NotFound(format!("branch {name:?} does not exist")))?;
        let other = match against {
            Some(a) => self
                .meta
                .branch(a)?
                .ok_or_else(|| ControlError::NotFound(format!("branch {a:?} does not exist")))?,
            None => {
                let pid = b.parent_id.ok_or_else(|| {
                    ControlError::Invalid(format!(
                        "branch {name:?} is a root: name a branch to compare with (--against)"
                    ))
                })?;
                self.meta
                    .branch_by_id(pid)?
                    .context("the parent of a branch is missing")?
            }
        };
        let mine = self.databases(&b).await?;
        let theirs = self.databases(&other).await?;
        let mut out = String::new();
        let mut identical = true;
        for db in mine.union(&theirs) {
            let a = if theirs.contains(db) {
                self.schema_of(&other, db).await?
            } else {
                String::new()
            };
            let c = if mine.contains(db) {
                self.schema_of(&b, db).await?
            } else {
                String::new()
            };
            if a == c {
                continue;
            }
            identical = false;
            let diff = similar::TextDiff::from_lines(&a, &c)
                .unified_diff()
                .context_radius(3)
                .header(&format!("{}/{db}", other.name), &format!("{}/{db}", b.name))
                .to_string();
            if markdown {
                out.push_str(&format!("**database `{db}`**\n\n```diff\n{diff}```\n\n"));
            } else {
                out.push_str(&diff);
            }
        }
        if markdown {
            let head = format!(
                "### Schema changes in `{}` against `{}`\n\n",
                b.name, other.name
            );
            out = if identical {
                format!("{head}No schema changes.\n")
            } else {
                format!("{head}{out}")
            };
        }
        Ok(api::SchemaDiff {
            branch: b.name,
            against: other.name,
            identical,
            diff: out,
        })
    }

    /// Posts the PR branch's schema diff as a comment on the pull request, when a GitHub token
    /// is configured. Failures are logged: a comment is a courtesy, not part of the workflow.
    async fn comment_schema_diff(&self, number: u64, repository: Option<&str>) {
        let (Some(token), Some(repo)) = (self.cfg.project.github_token(), repository) else {
            return;
        };
        let name = self.pr_branch_name(number);
        let diff = match self.schema_diff(&name, None, true).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(branch = %name, error = %e, "schema diff for the PR comment failed");
                return;
            }
        };
        let url = format!(
            "{}/repos/{repo}/issues/{number}/comments",
            self.cfg.project.github_api_url()
        );
        let body = serde_json::json!({ "body": diff.diff });
        let result = tokio::task::spawn_blocking(move || {
            ureq::post(&url)
                .set("Authorization", &format!("Bearer {token}"))
                .set("Accept", "application/vnd.github+json")
                .set("User-Agent", "stemma")
                .timeout(Duration::from_secs(20))
                .send_json(body)
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .await;
        match result {
            Ok(Ok(())) => tracing::info!(number, "posted the schema diff on the pull request"),
            Ok(Err(e)) => tracing::warn!(number, error = %e, "posting the PR comment failed"),
            Err(e) => tracing::warn!(number, error = %e, "posting the PR comment panicked"),
        }
    }

    /// One pass of the scheduler: runs the resets that are due. `next` holds each schedule's
    /// next time; it is filled on the first pass.
    pub async fn run_due_schedules(self: &Arc<Self>) {
        let now = Utc::now();
        for s in &self.cfg.project.schedules {
            let Ok(cron) = s.cron() else { continue };
            let due = {
                let mut next = lock(&self.schedule_next);
                let at = *next.entry(s.key()).or_insert_with(|| {
                    cron.find_next_occurrence(&now, false)
                        .unwrap_or(now + chrono::Duration::days(365))
                });
                if at <= now {
                    next.insert(
                        s.key(),
                        cron.find_next_occurrence(&now, false)
                            .unwrap_or(now + chrono::Duration::days(365)),
                    );
                    true
                } else {
                    false
                }
            };
            if !due {
                continue;
            }
            // Steps in order; the first failure skips the rest (see `source.rs`).
            self.run_schedule_steps(s).await;
        }
    }

    /// The next scheduled reset of a branch, if one is scheduled.
    pub(crate) fn next_reset_at(&self, branch: &str) -> Option<DateTime<Utc>> {
        let s = self
            .cfg
            .project
            .schedules
            .iter()
            .find(|s| s.branch == branch)?;
        if let Some(at) = lock(&self.schedule_next).get(branch) {
            return Some(*at);
        }
        s.cron().ok()?.find_next_occurrence(&Utc::now(), false).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tails_keep_the_end_on_a_char_boundary() {
        assert_eq!(tail("short"), "short");
        let long = "é".repeat(LOG_TAIL_BYTES);
        let t = tail(&long);
        assert!(t.starts_with('…'));
        assert!(t.len() <= LOG_TAIL_BYTES + 4);
    }
}
