//! Anonymized branches, part two: building one (issue 8).
//!
//! An anonymized branch is a **new root of storage**: its timeline starts with `initdb`, not
//! as a copy-on-write child of the parent, and is written only with masked rows, so nothing
//! in it (heap, TOAST, indexes, WAL, statistics), at any position of its history, ever held
//! a raw value. Its branch row still names the parent, which is what `reset` re-anonymizes
//! from.
//!
//! A run (creation and reset alike):
//! 1. **Validate**, before anything is created: parse the rules, read the parent's schema and
//!    a sample of each column (in memory), run the detector and [`stemma_anonymize::plan`].
//!    A bad file, an unknown column or a flagged column without a rule ends here.
//! 2. A new timeline with `initdb` and a private compute on its own socket. A new branch gets
//!    new credentials; a reset keeps the branch's.
//! 3. Roles (without passwords: production's password hashes stay there); per database:
//!    `CREATE DATABASE`, then the pre-data schema (`pg_dump --section=pre-data | psql`, a
//!    pipe: nothing on disk).
//! 4. Unique domains: every distinct value of each masked unique column (and the columns
//!    joined to it by foreign keys) resolved into a collision-free mapping, in memory.
//! 5. Tables, several at once: `COPY ... TO STDOUT` from the parent, each row through a
//!    [`RowMasker`], `COPY ... FROM STDIN` into the new compute. Rows only ever sit in
//!    memory buffers.
//! 6. Post-data (indexes, constraints, triggers, materialized views refreshed from masked
//!    rows), sequence values, `ANALYZE`.
//! 7. The swap: the new branch row (creation), or the branch pointed at the new timeline
//!    (reset). Until then the old state serves; a failure removes the new timeline and leaves
//!    everything as it was.
//!
//! Large objects (`pg_largeobject`) are not copied: they are opaque bytes that no rule can
//! mask.

use std::collections::{HashMap, HashSet};
use std::process::Stdio;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use bytes::Bytes;
use chrono::Utc;
use futures_util::{pin_mut, SinkExt, StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};
use stemma_anonymize::{
    ColumnMask, ColumnRef, Masker, Plan, RowMasker, Rules, SecretKey, UniqueMapper, UniqueMapping,
};
use stemma_api as api;
use stemma_compute::{ComputeSpec, DiesWithParent};
use stemma_storage::TimelineId;
use tokio::io::AsyncReadExt;

use crate::anonymize::{quote, LocalDb};
use crate::engine::{new_timeline_id, random_password, Engine, DB_SUPERUSER};
use crate::metadata::{AnonymizationRun, BranchRow, NewBranch};
use crate::{ControlError, Result};

/// Where the secret key of every mask lives: the metadata store, outside every branch.
const KEY_NAME: &str = "anonymize_key";

/// Buffered masked output sent to the new compute per message.
const FLUSH_BYTES: usize = 256 * 1024;

/// What a run needs once the rules are validated against the parent.
pub(crate) struct Prepared {
    rules_text: String,
    digest: String,
    plan: Plan,
    locale: stemma_anonymize::Locale,
}

/// One table to copy.
struct TableJob {
    index: usize,
    database: String,
    schema: String,
    name: String,
    /// The COPY column list (generated columns left out: they are computed again).
    columns: Vec<String>,
    masker: RowMasker,
}

pub(crate) fn digest_of(rules: &str) -> String {
    hex::encode(Sha256::digest(rules.as_bytes()))
}

/// What a run builds: a new branch, or a new state for an existing one.
enum Target {
    New {
        name: String,
        protected: bool,
        suspend_timeout_secs: Option<u64>,
    },
    Reset {
        branch_id: i64,
        preserve_under_name: Option<String>,
    },
}

impl Engine {
    /// The secret key of every mask, made on first use.
    fn anonymize_key(&self) -> Result<SecretKey> {
        if let Some(hex) = self.meta.get_kv(KEY_NAME)? {
            return SecretKey::from_hex(&hex)
                .ok_or_else(|| anyhow!("the masking key in the metadata store is damaged").into());
        }
        let key = SecretKey::generate();
        self.meta.set_kv(KEY_NAME, &key.to_hex())?;
        Ok(key)
    }

    /// Step 1: validates `rules` against `parent`'s current schema and samples.
    pub(crate) async fn prepare_anonymization(
        &self,
        parent: &BranchRow,
        rules_text: &str,
    ) -> Result<Prepared> {
        let rules = Rules::parse(rules_text)
            .map_err(|e| ControlError::Invalid(format!("masking rules: {e}")))?;
        let db = self.local_db(parent).await?;
        let (schema, samples) = db.schema(true).await?;
        let flags = stemma_anonymize::detect(&schema, &samples);
        drop(samples);
        let plan = stemma_anonymize::plan(&rules, &schema, &flags).map_err(|e| {
            ControlError::Invalid(format!(
                "masking rules do not fit branch \"{}\": {e}",
                parent.name
            ))
        })?;
        Ok(Prepared {
            rules_text: rules_text.to_string(),
            digest: digest_of(rules_text),
            plan,
            locale: rules.options.locale,
        })
    }

    /// `branch create NAME --parent P --anonymize RULES`: validates, then builds the branch in
    /// the background; the operation reports progress per table.
    pub async fn anonymize(
        self: &Arc<Self>,
        req: &api::AnonymizeRequest,
    ) -> Result<api::Operation> {
        let default_parent = self.default_parent();
        let parent_name = req.parent.as_deref().unwrap_or(&default_parent);
        let parent = self.meta.branch(parent_name)?.ok_or_else(|| {
            ControlError::NotFound(format!(
                "parent branch {parent_name:?} does not exist (see `stemma branch list`)"
            ))
        })?;
        let suspend_timeout_secs = req
            .suspend_timeout
            .as_deref()
            .map(|s| crate::names::parse_duration(s).map(|d| d.as_secs()))
            .transpose()?;
        self.check_new_name(&req.name)?;
        let prepared = self.prepare_anonymization(&parent, &req.rules).await?;
        self.reserve_name(&req.name)?;
        let target = Target::New {
            name: req.name.clone(),
            protected: req.protected,
            suspend_timeout_secs,
        };
        let jobs = req.jobs.unwrap_or(2).clamp(1, 16) as usize;
        Ok(self.spawn_anonymization(parent, prepared, target, jobs, req.name.clone()))
    }

    /// Re-anonymizes branch `name` from its parent's current state, in the background.
    pub async fn reanonymize(self: &Arc<Self>, name: &str) -> Result<api::Operation> {
        let (b, parent, prepared) = self.prepare_reanonymization(name).await?;
        let target = Target::Reset {
            branch_id: b.id,
            preserve_under_name: None,
        };
        Ok(self.spawn_anonymization(parent, prepared, target, 2, b.name.clone()))
    }

    /// Re-anonymizes branch `name` and waits: what `reset` (and a scheduled reset) does on an
    /// anonymized branch.
    pub(crate) async fn reanonymize_and_wait(
        &self,
        name: &str,
        preserve_under_name: Option<&str>,
    ) -> Result<api::Branch> {
        if let Some(keep) = preserve_under_name {
            self.check_new_name(keep)?;
        }
        let (b, parent, prepared) = self.prepare_reanonymization(name).await?;
        let op = format!("op-{}", new_timeline_id());
        self.insert_job(new_operation(&op));
        let target = Target::Reset {
            branch_id: b.id,
            preserve_under_name: preserve_under_name.map(String::from),
        };
        let result = self
            .run_anonymization(&op, &parent, &prepared, target, 2)
            .await;
        self.finish_operation(&op, &b.name, &result).await;
        self.release_name(&busy_key(b.id));
        let row = result?;
        self.get_branch(&row.name).await
    }

    async fn prepare_reanonymization(
        &self,
        name: &str,
    ) -> Result<(BranchRow, BranchRow, Prepared)> {
        let b = self
            .meta
            .branch(name)?
            .ok_or_else(|| ControlError::NotFound(format!("branch {name:?} does not exist")))?;
        let anon = self.meta.anonymization(b.id)?.ok_or_else(|| {
            ControlError::Invalid(format!("branch {name:?} is not an anonymized branch"))
        })?;
        let parent = b
            .parent_id
            .map(|id| self.meta.branch_by_id(id))
            .transpose()?
            .flatten()
            .ok_or_else(|| {
                ControlError::Conflict(format!(
                    "the parent of anonymized branch {name:?} no longer exists"
                ))
            })?;
        // One run per branch at a time.
        {
            let mut reserved = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
            if !reserved.insert(busy_key(b.id)) {
                return Err(ControlError::Conflict(format!(
                    "branch {name:?} is being anonymized already"
                )));
            }
        }
        match self.prepare_anonymization(&parent, &anon.rules).await {
            Ok(p) => Ok((b, parent, p)),
            Err(e) => {
                self.release_name(&busy_key(b.id));
                let _ = self.meta.record_anonymization_run(
                    b.id,
                    &AnonymizationRun {
                        at: Utc::now(),
                        digest: anon.digest,
                        outcome: "failed".into(),
                        message: Some(e.to_string()),
                        tables: 0,
                        rows: 0,
                    },
                );
                Err(e)
            }
        }
    }

    /// `branch set NAME --anonymize RULES`: new rules, checked against the parent now,
    /// applied at the next reset.
    pub(crate) async fn set_anonymization_rules(&self, b: &BranchRow, rules: &str) -> Result<()> {
        if self.meta.anonymization(b.id)?.is_none() {
            return Err(ControlError::Invalid(format!(
                "branch {:?} is not an anonymized branch; create one with `stemma branch create NAME --parent P --anonymize RULES`",
                b.name
            )));
        }
        let parent = b
            .parent_id
            .map(|id| self.meta.branch_by_id(id))
            .transpose()?
            .flatten()
            .ok_or_else(|| anyhow!("the parent of an anonymized branch is missing"))?;
        let prepared = self.prepare_anonymization(&parent, rules).await?;
        self.meta
            .set_anonymization_rules(b.id, &prepared.rules_text, &prepared.digest)?;
        Ok(())
    }

    fn spawn_anonymization(
        self: &Arc<Self>,
        parent: BranchRow,
        prepared: Prepared,
        target: Target,
        jobs: usize,
        label: String,
    ) -> api::Operation {
        let op_id = format!("op-{}", new_timeline_id());
        let op = new_operation(&op_id);
        self.insert_job(op.clone());
        let engine = self.clone();
        tokio::spawn(async move {
            let release = match &target {
                Target::New { name, .. } => name.clone(),
                Target::Reset { branch_id, .. } => busy_key(*branch_id),
            };
            let result = engine
                .run_anonymization(&op_id, &parent, &prepared, target, jobs)
                .await;
            engine.finish_operation(&op_id, &label, &result).await;
            engine.release_name(&release);
        });
        op
    }

    async fn finish_operation(&self, op: &str, label: &str, result: &Result<BranchRow>) {
        match result {
            Ok(row) => {
                let branch = self.get_branch(&row.name).await.ok();
                self.update_job(op, |o| {
                    o.state = api::OperationState::Succeeded;
                    o.phase = "done".into();
                    o.done = o.total;
                    o.branch = branch;
                })
            }
            Err(e) => {
                tracing::error!(branch = %label, error = %e, "anonymization failed");
                self.update_job(op, |o| {
                    o.state = api::OperationState::Failed;
                    o.error = Some(format!("anonymizing {label:?} failed: {e:#}"));
                });
            }
        }
    }

    /// Steps 2 to 7. On failure nothing is left: the new timeline and its compute go.
    async fn run_anonymization(
        &self,
        op: &str,
        parent: &BranchRow,
        prepared: &Prepared,
        target: Target,
        jobs: usize,
    ) -> Result<BranchRow> {
        let started = std::time::Instant::now();
        let existing = match &target {
            Target::Reset { branch_id, .. } => Some(
                self.meta
                    .branch_by_id(*branch_id)?
                    .ok_or_else(|| ControlError::NotFound("the branch was deleted".into()))?,
            ),
            Target::New { .. } => None,
        };
        let password = existing
            .as_ref()
            .map_or_else(random_password, |b| b.db_password.clone());
        let tl = new_timeline_id();
        self.meta.begin_timeline(tl.as_str(), None)?;
        let mut spec: Option<ComputeSpec> = None;
        let outcome = self
            .build_anonymized_timeline(op, parent, prepared, &tl, &password, jobs, &mut spec)
            .await;
        if let Some(spec) = spec.take() {
            if let Err(e) = self.supervisor.stop(&spec.key, &spec.data_dir).await {
                tracing::warn!(error = %e, "stopping the anonymization's compute");
            }
        }
        let counts = match outcome {
            Ok(c) => c,
            Err(e) => {
                if let Err(e) = self.destroy_timeline(tl.as_str()).await {
                    tracing::error!(error = %e, "removing a failed anonymization's timeline; the next start removes it");
                }
                if let Some(b) = &existing {
                    let _ = self.meta.record_anonymization_run(
                        b.id,
                        &AnonymizationRun {
                            at: Utc::now(),
                            digest: prepared.digest.clone(),
                            outcome: "failed".into(),
                            message: Some(e.to_string()),
                            tables: 0,
                            rows: 0,
                        },
                    );
                }
                return Err(e);
            }
        };
        let run = AnonymizationRun {
            at: Utc::now(),
            digest: prepared.digest.clone(),
            outcome: "ok".into(),
            message: None,
            tables: counts.0,
            rows: counts.1,
        };
        self.update_job(op, |o| o.phase = "finishing".into());
        let _op = self.op_lock.lock().await;
        let row = match (&target, existing) {
            (
                Target::New {
                    name,
                    protected,
                    suspend_timeout_secs,
                },
                _,
            ) => {
                self.release_name(name);
                let new = NewBranch {
                    name: name.clone(),
                    parent_id: Some(parent.id),
                    timeline_id: tl.to_string(),
                    protected: *protected,
                    expires_at: None,
                    port: 0,
                    db_user: DB_SUPERUSER.into(),
                    db_password: password,
                    database: parent.database.clone(),
                    suspend_timeout_secs: *suspend_timeout_secs,
                    settings: parent.settings.clone(),
                };
                let committed = self.check_new_name(name).and_then(|()| {
                    let port = self.allocate_port(&[])?;
                    Ok(self.meta.commit_anonymized_branch(
                        &NewBranch { port, ..new },
                        &prepared.rules_text,
                        &prepared.digest,
                        &run,
                    )?)
                });
                let row = match committed {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = self.destroy_timeline(tl.as_str()).await;
                        return Err(e);
                    }
                };
                if let Err(e) = self.open_endpoint(&row).await {
                    tracing::error!(branch = %row.name, error = %e, "anonymized branch has no endpoint");
                }
                if let Err(e) = self.start_compute_of(&row).await {
                    tracing::error!(branch = %row.name, error = %e, "anonymized branch did not start");
                }
                row
            }
            (
                Target::Reset {
                    preserve_under_name,
                    ..
                },
                Some(b),
            ) => {
                let why = format!(
                    "branch \"{}\" was re-anonymized from the current state of \"{}\"; reconnect with the same connection string",
                    b.name, parent.name
                );
                let row = self
                    .replace_timeline(&b, &tl, preserve_under_name.as_deref(), &why)
                    .await?;
                self.meta.record_anonymization_run(row.id, &run)?;
                row
            }
            (Target::Reset { .. }, None) => {
                return Err(anyhow!("a reset without its branch").into());
            }
        };
        tracing::info!(
            branch = %row.name,
            parent = %parent.name,
            tables = run.tables,
            rows = run.rows,
            seconds = started.elapsed().as_secs_f64(),
            "anonymized branch ready"
        );
        Ok(row)
    }

    /// Steps 2 to 6: fills timeline `tl`. Returns (tables, rows) copied.
    #[allow(clippy::too_many_arguments)]
    async fn build_anonymized_timeline(
        &self,
        op: &str,
        parent: &BranchRow,
        prepared: &Prepared,
        tl: &TimelineId,
        password: &str,
        jobs: usize,
        spec_out: &mut Option<ComputeSpec>,
    ) -> Result<(u64, u64)> {
        let phase = |p: &str| {
            tracing::info!(op, phase = p, "anonymize");
            self.update_job(op, |o| o.phase = p.to_string());
        };
        phase("creating the branch");
        // Its computes run as their own OS user, apart from the parent's files.
        let owner = match self.supervisor.user() {
            Some(_) => Some(self.anonymized_compute_user()?),
            None => None,
        };
        self.initdb_timeline_as(tl, password, owner.clone()).await?;
        let mut spec = self.compute_spec(&crate::import::NewBranchView::row(tl, 0))?;
        spec.user = owner;
        spec.key = format!("anonymize-{op}");
        spec.socket_dir = self
            .cfg
            .data_dir
            .join("run")
            .join(format!("anon-{:08x}", rand::random::<u32>()));
        spec.label = format!("{op} (anonymizing)");
        spec.log_path = self.cfg.logs_dir().join(format!("{op}.log"));
        spec.settings
            .insert("synchronous_commit".into(), "off".into());
        self.supervisor.start(spec.clone()).await?;
        *spec_out = Some(spec.clone());
        let dst = LocalDb {
            socket_dir: spec.socket_dir.clone(),
            port: spec.port,
            user: DB_SUPERUSER.into(),
            password: password.to_string(),
        };
        // The parent stays up (and is not reset or deleted) while it is read.
        let src = self.local_db(parent).await?;
        let gate = self.gate(parent.id);
        let _parent_held = gate.read().await;

        phase("copying roles");
        let roles = self
            .capture(
                &src,
                "postgres",
                "pg_dumpall",
                &["--roles-only", "--no-role-passwords"],
            )
            .await?;
        let roles = crate::import::without_role(&roles, DB_SUPERUSER);
        let roles = crate::import::without_role(&roles, &parent.db_user);
        self.feed_psql(&dst, "postgres", roles.into_bytes(), "roles")
            .await?;

        let databases = src.databases().await?;
        let masker = Masker::new(self.anonymize_key()?, prepared.locale);
        phase("mapping unique values");
        let mappings = self.unique_mappings(&src, prepared, &masker).await?;
        let mut tables = Vec::new();
        for db in &databases {
            phase(&format!("schema of database {db}"));
            if db != "postgres" {
                let admin = dst.connect("postgres").await?;
                admin
                    .batch_execute(&format!("CREATE DATABASE {}", quote(db)))
                    .await
                    .with_context(|| format!("creating database {db:?}"))?;
            }
            self.pipe_dump(&src, &dst, db, "pre-data").await?;
            let first = tables.len();
            tables.extend(
                self.table_jobs(&src, db, prepared, &masker, &mappings, first)
                    .await?,
            );
        }
        self.update_job(op, |o| {
            o.total = tables.len() as u64;
            o.tables = tables
                .iter()
                .map(|t| api::TableProgress {
                    database: t.database.clone(),
                    table: format!("{}.{}", t.schema, t.name),
                    rows: 0,
                    bytes: 0,
                    done: false,
                })
                .collect();
        });

        phase("copying masked rows");
        let n_tables = tables.len() as u64;
        let rows: Vec<u64> = futures_util::stream::iter(tables)
            .map(|t| self.copy_table(op, &src, &dst, t))
            .buffer_unordered(jobs.max(1))
            .try_collect()
            .await?;

        for db in &databases {
            phase(&format!("indexes and constraints of database {db}"));
            self.restore_post_data(&src, &dst, db, op, jobs).await?;
            let s = src.connect(db).await?;
            let d = dst.connect(db).await?;
            let seqs = s
                .query(
                    "SELECT quote_ident(schemaname) || '.' || quote_ident(sequencename), last_value \
                     FROM pg_sequences WHERE last_value IS NOT NULL",
                    &[],
                )
                .await
                .context("reading sequence values")?;
            for r in seqs {
                let (name, value): (String, i64) = (r.get(0), r.get(1));
                d.execute(
                    "SELECT setval($1::text::regclass, $2, true)",
                    &[&name, &value],
                )
                .await
                .with_context(|| format!("setting sequence {name}"))?;
            }
            d.batch_execute("ANALYZE")
                .await
                .with_context(|| format!("analyzing database {db:?}"))?;
        }
        Ok((n_tables, rows.iter().sum()))
    }

    /// The copy jobs of database `db`: its tables with rows of their own (partitioned parents
    /// and foreign tables have none), each with its row masker.
    async fn table_jobs(
        &self,
        src: &LocalDb,
        db: &str,
        prepared: &Prepared,
        masker: &Masker,
        mappings: &[Arc<UniqueMapping>],
        first_index: usize,
    ) -> Result<Vec<TableJob>> {
        let client = src.connect(db).await?;
        let rows = client
            .query(
                "SELECT n.nspname::text, c.relname::text, \
                 ARRAY(SELECT a.attname::text FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 \
                       AND NOT a.attisdropped AND a.attgenerated = '' ORDER BY a.attnum) \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
                 AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%' \
                 ORDER BY c.relpages DESC, 1, 2",
                &[],
            )
            .await
            .context("listing tables")?;
        let plan_db = prepared.plan.databases.iter().find(|d| d.name == db);
        let mut out = Vec::new();
        for r in rows {
            let (schema, name, columns): (String, String, Vec<String>) =
                (r.get(0), r.get(1), r.get(2));
            if columns.is_empty() {
                continue;
            }
            let plan_table = plan_db.and_then(|d| {
                d.tables
                    .iter()
                    .find(|t| t.schema == schema && t.name == name)
            });
            let Some(plan_table) = plan_table else {
                // The plan was made from the same schema a moment ago: a table that appeared
                // since has no plan, and is refused rather than copied unmasked.
                return Err(ControlError::Conflict(format!(
                    "table {schema}.{name} in database {db:?} appeared while anonymizing; run again"
                )));
            };
            let mut cols = Vec::new();
            for c in &columns {
                let p = plan_table
                    .columns
                    .iter()
                    .find(|p| &p.name == c)
                    .ok_or_else(|| {
                        ControlError::Conflict(format!(
                            "column {c} of {schema}.{name} appeared while anonymizing; run again"
                        ))
                    })?;
                let mask = match (&p.mask, p.domain) {
                    (stemma_anonymize::Mask::Keep, _) => ColumnMask::Keep,
                    (_, Some(d)) => ColumnMask::Domain(
                        mappings
                            .get(d)
                            .cloned()
                            .ok_or_else(|| anyhow!("the plan names a unique domain it lacks"))?,
                    ),
                    (m, None) => ColumnMask::Mask {
                        mask: m.clone(),
                        ty: p.ty.clone(),
                    },
                };
                cols.push((c.clone(), mask));
            }
            out.push(TableJob {
                index: first_index + out.len(),
                database: db.to_string(),
                schema,
                name,
                columns,
                masker: RowMasker::new(masker.clone(), cols),
            });
        }
        Ok(out)
    }

    /// Step 4: the collision-free mapping of every unique domain, from the distinct values of
    /// all its columns (in memory only).
    async fn unique_mappings(
        &self,
        src: &LocalDb,
        prepared: &Prepared,
        masker: &Masker,
    ) -> Result<Vec<Arc<UniqueMapping>>> {
        let mut out = Vec::new();
        let mut clients: HashMap<String, tokio_postgres::Client> = HashMap::new();
        for domain in &prepared.plan.domains {
            let mut values: HashSet<String> = HashSet::new();
            for c in &domain.columns {
                let client = match clients.get(&c.database) {
                    Some(c) => c,
                    None => {
                        let client = src.connect(&c.database).await?;
                        clients.entry(c.database.clone()).or_insert(client)
                    }
                };
                // Streamed, and kept once per distinct value.
                let sql = format!(
                    "COPY (SELECT {col}::text FROM {}.{} WHERE {col} IS NOT NULL) TO STDOUT",
                    quote(&c.schema),
                    quote(&c.table),
                    col = quote(&c.column)
                );
                let stream = client
                    .copy_out(&sql)
                    .await
                    .with_context(|| format!("reading the values of {}", describe(c)))?;
                pin_mut!(stream);
                let mut carry: Vec<u8> = Vec::new();
                while let Some(chunk) = stream.next().await {
                    let chunk =
                        chunk.with_context(|| format!("reading the values of {}", describe(c)))?;
                    carry.extend_from_slice(&chunk);
                    let cut = carry.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
                    for line in carry[..cut]
                        .split(|b| *b == b'\n')
                        .filter(|l| !l.is_empty())
                    {
                        match stemma_anonymize::copy::decode_field(line) {
                            Ok(Some(v)) => {
                                values.insert(v);
                            }
                            Ok(None) => {}
                            Err(_) => {
                                return Err(ControlError::Invalid(format!(
                                    "a value of {} is not valid UTF-8 (value withheld)",
                                    describe(c)
                                )))
                            }
                        }
                    }
                    carry.drain(..cut);
                }
            }
            // CPU work (a candidate per distinct value): off the async runtime.
            let mut mapper =
                UniqueMapper::new(masker.clone(), domain.mask.clone(), domain.ty.clone());
            let first = domain.columns.first().map(describe).unwrap_or_default();
            let mapping = tokio::task::spawn_blocking(move || {
                for v in &values {
                    mapper.observe(v);
                }
                mapper.finish(values.iter().map(String::as_str))
            })
            .await
            .map_err(|e| anyhow!("resolving a unique domain failed: {e}"))?
            .map_err(|e| ControlError::Invalid(format!("unique column {first}: {e}")))?;
            out.push(Arc::new(mapping));
        }
        Ok(out)
    }

    /// Step 5 for one table. Returns its row count.
    async fn copy_table(&self, op: &str, src: &LocalDb, dst: &LocalDb, t: TableJob) -> Result<u64> {
        let what = format!("{}.{} in database {:?}", t.schema, t.name, t.database);
        let s = src.connect(&t.database).await?;
        let d = dst.connect(&t.database).await?;
        let cols: Vec<String> = t.columns.iter().map(|c| quote(c)).collect();
        let rel = format!(
            "{}.{} ({})",
            quote(&t.schema),
            quote(&t.name),
            cols.join(", ")
        );
        let stream = s
            .copy_out(&format!("COPY {rel} TO STDOUT"))
            .await
            .with_context(|| format!("reading {what}"))?;
        let sink = d
            .copy_in::<_, Bytes>(&format!("COPY {rel} FROM STDIN"))
            .await
            .with_context(|| format!("writing {what}"))?;
        pin_mut!(stream, sink);
        let identity = t.masker.is_identity();
        let masker = Arc::new(t.masker);
        // Masking is CPU work: whole batches of rows are masked on blocking threads, two at a
        // time, while this task keeps reading and writing. Batches go out in order.
        let mut inflight = futures_util::stream::FuturesOrdered::new();
        let mut carry: Vec<u8> = Vec::new();
        let (mut rows, mut bytes) = (0u64, 0u64);
        let mask_batch = |batch: Vec<u8>| {
            let masker = masker.clone();
            tokio::task::spawn_blocking(move || {
                let mut out = Vec::with_capacity(batch.len() + batch.len() / 2);
                let mut n = 0u64;
                for line in batch.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                    masker.mask_row(line, &mut out)?;
                    n += 1;
                }
                Ok::<_, stemma_anonymize::CopyError>((out, n))
            })
        };
        let mut ended = false;
        while !ended || !carry.is_empty() || !inflight.is_empty() {
            if !ended {
                match stream.next().await {
                    Some(chunk) => {
                        let chunk = chunk.with_context(|| format!("reading {what}"))?;
                        bytes += chunk.len() as u64;
                        carry.extend_from_slice(&chunk);
                    }
                    None => ended = true,
                }
            }
            // A batch is whole rows: up to the last newline.
            let ready = carry.len() >= FLUSH_BYTES || (ended && !carry.is_empty());
            if ready {
                let cut = match carry.iter().rposition(|b| *b == b'\n') {
                    Some(i) => i + 1,
                    None if ended => {
                        return Err(
                            anyhow!("the copy of {what} ended in the middle of a row").into()
                        )
                    }
                    None => continue,
                };
                let rest = carry.split_off(cut);
                let batch = std::mem::replace(&mut carry, rest);
                if identity {
                    rows += batch.iter().filter(|b| **b == b'\n').count() as u64;
                    sink.send(Bytes::from(batch))
                        .await
                        .with_context(|| format!("writing {what}"))?;
                } else {
                    inflight.push_back(mask_batch(batch));
                }
            }
            let drain = inflight.len() >= 2 || (ended && carry.is_empty() && !inflight.is_empty());
            if drain {
                if let Some(done) = inflight.next().await {
                    let (out, n) = done
                        .map_err(|e| anyhow!("a masking thread failed: {e}"))?
                        .map_err(|e| ControlError::Invalid(format!("{what}: {e}")))?;
                    rows += n;
                    sink.send(Bytes::from(out))
                        .await
                        .with_context(|| format!("writing {what}"))?;
                }
            }
            if ready || drain {
                self.update_job(op, |o| {
                    if let Some(p) = o.tables.get_mut(t.index) {
                        p.rows = rows;
                        p.bytes = bytes;
                    }
                });
            }
        }
        sink.as_mut()
            .finish()
            .await
            .with_context(|| format!("finishing the copy of {what}"))?;
        self.update_job(op, |o| {
            o.done += 1;
            if let Some(p) = o.tables.get_mut(t.index) {
                p.rows = rows;
                p.bytes = bytes;
                p.done = true;
            }
        });
        Ok(rows)
    }

    /// Runs a libpq tool against `db` and returns its standard output.
    async fn capture(
        &self,
        db: &LocalDb,
        dbname: &str,
        tool: &str,
        args: &[&str],
    ) -> Result<String> {
        let mut cmd = tokio::process::Command::new(self.supervisor.install().bin(tool));
        db.env(&mut cmd, dbname);
        let out = cmd
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .dies_with_parent()
            .output()
            .await
            .with_context(|| format!("running {tool}"))?;
        if !out.status.success() {
            return Err(anyhow!(
                "{tool} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )
            .into());
        }
        String::from_utf8(out.stdout)
            .map_err(|_| anyhow!("{tool} printed something that is not UTF-8").into())
    }

    /// Runs SQL through psql against `db`, failing on errors other than "already exists".
    async fn feed_psql(&self, db: &LocalDb, dbname: &str, sql: Vec<u8>, what: &str) -> Result<()> {
        let mut cmd = tokio::process::Command::new(self.supervisor.install().bin("psql"));
        db.env(&mut cmd, dbname);
        let mut child = cmd
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=0"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .dies_with_parent()
            .spawn()
            .context("running psql")?;
        let mut stdin = child
            .stdin
            .take()
            .ok_or_else(|| anyhow!("no stdin for psql"))?;
        let mut stderr = child
            .stderr
            .take()
            .ok_or_else(|| anyhow!("no stderr from psql"))?;
        let write = async move {
            use tokio::io::AsyncWriteExt;
            stdin.write_all(&sql).await?;
            stdin.shutdown().await
        };
        let mut errors = String::new();
        let (w, r) = tokio::join!(write, stderr.read_to_string(&mut errors));
        w.context("feeding psql")?;
        r.context("reading psql's errors")?;
        let status = child.wait().await.context("waiting for psql")?;
        check_sql_errors(&errors, what, status.success())
    }

    /// Indexes, constraints and triggers of `db`, built `jobs` at a time: `pg_dump -Fc
    /// --section=post-data` into the scratch directory (definitions only: no row passes
    /// through it), then `pg_restore -j`.
    async fn restore_post_data(
        &self,
        src: &LocalDb,
        dst: &LocalDb,
        db: &str,
        op: &str,
        jobs: usize,
    ) -> Result<()> {
        let file = self
            .cfg
            .scratch_dir()
            .join(format!("{op}-{:08x}.post-data", rand::random::<u32>()));
        let file_arg = file.display().to_string();
        let result = async {
            self.capture(
                src,
                db,
                "pg_dump",
                &[
                    "-Fc",
                    "--section=post-data",
                    "--no-publications",
                    "--no-subscriptions",
                    "-f",
                    &file_arg,
                ],
            )
            .await?;
            let mut cmd = tokio::process::Command::new(self.supervisor.install().bin("pg_restore"));
            dst.env(&mut cmd, db);
            let out = cmd
                .args(["-j", &jobs.max(1).to_string(), "-d", db, &file_arg])
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .dies_with_parent()
                .output()
                .await
                .context("running pg_restore")?;
            let stderr = String::from_utf8_lossy(&out.stderr);
            // pg_restore goes on after an error and fails at the end: objects that exist
            // already are fine, anything else is not.
            check_sql_errors(
                &stderr,
                &format!("the indexes and constraints of database {db:?}"),
                out.status.success() || !stderr.contains("ERROR:") || {
                    stderr
                        .lines()
                        .filter(|l| l.contains("ERROR:"))
                        .all(|l| l.contains("already exists"))
                },
            )
        }
        .await;
        if let Err(e) = tokio::fs::remove_file(&file).await {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(error = %e, "removing the post-data dump");
            }
        }
        result
    }

    /// `pg_dump --section=SECTION` of `db` in the parent, piped into psql on the new compute.
    async fn pipe_dump(&self, src: &LocalDb, dst: &LocalDb, db: &str, section: &str) -> Result<()> {
        let mut dump = tokio::process::Command::new(self.supervisor.install().bin("pg_dump"));
        src.env(&mut dump, db);
        let mut dump = dump
            .args([
                &format!("--section={section}"),
                "--no-publications",
                "--no-subscriptions",
                "--no-blobs",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .dies_with_parent()
            .spawn()
            .context("running pg_dump")?;
        let out = dump
            .stdout
            .take()
            .ok_or_else(|| anyhow!("no stdout from pg_dump"))?;
        let mut dump_err = dump
            .stderr
            .take()
            .ok_or_else(|| anyhow!("no stderr from pg_dump"))?;
        let out: Stdio = out
            .try_into()
            .map_err(|e| anyhow!("connecting pg_dump to psql: {e}"))?;
        let mut psql = tokio::process::Command::new(self.supervisor.install().bin("psql"));
        dst.env(&mut psql, db);
        let mut psql = psql
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=0"])
            .stdin(out)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .dies_with_parent()
            .spawn()
            .context("running psql")?;
        let mut psql_err = psql
            .stderr
            .take()
            .ok_or_else(|| anyhow!("no stderr from psql"))?;
        let (mut e1, mut e2) = (String::new(), String::new());
        let (r1, r2) = tokio::join!(
            dump_err.read_to_string(&mut e1),
            psql_err.read_to_string(&mut e2)
        );
        r1.context("reading pg_dump's errors")?;
        r2.context("reading psql's errors")?;
        let dumped = dump.wait().await.context("waiting for pg_dump")?;
        let restored = psql.wait().await.context("waiting for psql")?;
        if !dumped.success() {
            return Err(anyhow!(
                "pg_dump of database {db:?} failed ({dumped}): {}",
                e1.trim()
            )
            .into());
        }
        check_sql_errors(
            &e2,
            &format!("the {section} schema of database {db:?}"),
            restored.success(),
        )
    }
}

fn busy_key(branch_id: i64) -> String {
    format!("#anonymizing-{branch_id}")
}

fn describe(c: &ColumnRef) -> String {
    format!(
        "{}.{}.{} in database {:?}",
        c.schema, c.table, c.column, c.database
    )
}

fn new_operation(id: &str) -> api::Operation {
    api::Operation {
        id: id.to_string(),
        kind: "anonymize".into(),
        state: api::OperationState::Running,
        phase: "validating".into(),
        done: 0,
        total: 0,
        error: None,
        branch: None,
        tables: Vec::new(),
    }
}

/// psql's errors: objects that already exist (from `initdb`) are fine, anything else fails
/// the run. psql's messages name objects, never row values (no rows pass through it).
fn check_sql_errors(stderr: &str, what: &str, ok: bool) -> Result<()> {
    let serious: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("ERROR:"))
        .filter(|l| !l.contains("already exists"))
        .collect();
    if !serious.is_empty() || !ok {
        return Err(anyhow!(
            "loading {what} failed:\n{}",
            serious
                .iter()
                .take(12)
                .copied()
                .collect::<Vec<_>>()
                .join("\n")
        )
        .into());
    }
    Ok(())
}
