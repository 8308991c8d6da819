//! Anonymized branches, part one: reaching a branch's databases from inside the daemon, and
//! reading their schema and samples (for `anonymize suggest` and for planning a masking run).
//! Part two, building the branch, is in [`crate::masking`].

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{anyhow, Context};
use stemma_anonymize::{
    ColumnRef, ColumnType, Database, ForeignKey, Samples, Schema, Table, UniqueConstraint,
};
use tokio_postgres::NoTls;

use crate::engine::{Engine, COMPUTE_SOCKET_PORT};
use crate::metadata::BranchRow;
use crate::{ControlError, Result};

/// Rows sampled per table for the PII detector. Samples stay in memory, are never logged,
/// and are dropped when the suggestion (or the plan) is made.
const SAMPLE_ROWS: i64 = 50;

pub(crate) fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// A compute reached through its Unix socket, as its superuser: how the daemon itself reads
/// and writes branches (never through the proxy, never over TCP).
#[derive(Debug, Clone)]
pub(crate) struct LocalDb {
    pub socket_dir: PathBuf,
    pub port: u16,
    pub user: String,
    pub password: String,
}

impl LocalDb {
    pub async fn connect(&self, db: &str) -> anyhow::Result<tokio_postgres::Client> {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host_path(&self.socket_dir)
            .port(self.port)
            .user(&self.user)
            .password(&self.password)
            .dbname(db)
            .application_name("stemma-anonymize");
        let (client, conn) = cfg
            .connect(NoTls)
            .await
            .with_context(|| format!("connecting to database {db:?}"))?;
        tokio::spawn(conn);
        Ok(client)
    }

    /// Points a libpq tool at database `db` through the environment, so that the password
    /// never appears on a command line.
    pub fn env(&self, cmd: &mut tokio::process::Command, db: &str) {
        cmd.env("PGHOST", &self.socket_dir)
            .env("PGPORT", self.port.to_string())
            .env("PGUSER", &self.user)
            .env("PGPASSWORD", &self.password)
            .env("PGDATABASE", db)
            .env("PGAPPNAME", "stemma-anonymize")
            .env_remove("PGSERVICE")
            .env_remove("PGSSLMODE");
    }

    /// The databases one can connect to, `postgres` first.
    pub async fn databases(&self) -> anyhow::Result<Vec<String>> {
        let admin = self.connect("postgres").await?;
        let rows = admin
            .query(
                "SELECT datname FROM pg_database WHERE NOT datistemplate AND datallowconn \
                 ORDER BY datname <> 'postgres', datname",
                &[],
            )
            .await
            .context("listing databases")?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// The schema of every database, and (when `sample`) a few values of every column.
    pub async fn schema(&self, sample: bool) -> anyhow::Result<(Schema, Samples)> {
        let mut schema = Schema {
            databases: Vec::new(),
        };
        let mut samples: Samples = HashMap::new();
        for db in self.databases().await? {
            let client = self.connect(&db).await?;
            let db_schema = introspect(&client, &db).await?;
            if sample {
                for t in &db_schema.tables {
                    if t.columns.is_empty() {
                        continue;
                    }
                    let cols: Vec<String> = t
                        .columns
                        .iter()
                        .map(|c| format!("{}::text", quote(&c.name)))
                        .collect();
                    let sql = format!(
                        "SELECT {} FROM {}.{} LIMIT {SAMPLE_ROWS}",
                        cols.join(", "),
                        quote(&t.schema),
                        quote(&t.name)
                    );
                    // A table we may not read yields no samples, not a failure: names and
                    // types still inform the detector.
                    let Ok(rows) = client.query(&sql, &[]).await else {
                        continue;
                    };
                    for (i, c) in t.columns.iter().enumerate() {
                        let values: Vec<Option<String>> = rows.iter().map(|r| r.get(i)).collect();
                        samples.insert(ColumnRef::new(&db, &t.schema, &t.name, &c.name), values);
                    }
                }
            }
            if !db_schema.tables.is_empty() {
                schema.databases.push(db_schema);
            }
        }
        Ok((schema, samples))
    }
}

impl Engine {
    /// Wakes branch `b`'s compute and returns how to reach it.
    pub(crate) async fn local_db(&self, b: &BranchRow) -> Result<LocalDb> {
        let socket = self
            .wake(&Self::compute_key(b))
            .await
            .map_err(|r| ControlError::Conflict(r.message))?
            .socket;
        let dir = socket
            .parent()
            .ok_or_else(|| anyhow!("socket path without a directory"))?
            .to_path_buf();
        Ok(LocalDb {
            socket_dir: dir,
            port: COMPUTE_SOCKET_PORT,
            user: b.db_user.clone(),
            password: b.db_password.clone(),
        })
    }

    /// Proposes masking rules (TOML) for a branch from its columns' names, types and a
    /// sample of their values.
    pub async fn anonymize_suggest(&self, name: &str) -> Result<String> {
        let b = self
            .meta
            .branch(name)?
            .ok_or_else(|| ControlError::NotFound(format!("branch {name:?} does not exist")))?;
        let db = self.local_db(&b).await?;
        let (schema, samples) = db.schema(true).await?;
        Ok(stemma_anonymize::suggest(&schema, &samples))
    }
}

/// The tables, columns, unique constraints and foreign keys of one database.
pub(crate) async fn introspect(client: &tokio_postgres::Client, db: &str) -> Result<Database> {
    let user_ns = "n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'";
    let rows = client
        .query(
            &format!(
                "SELECT n.nspname, c.relname, a.attname, format_type(a.atttypid, a.atttypmod), NOT a.attnotnull \
                 FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped AND {user_ns} \
                 ORDER BY n.nspname, c.relname, a.attnum"
            ),
            &[],
        )
        .await
        .context("reading columns")?;
    let mut tables: Vec<Table> = Vec::new();
    for r in rows {
        let (schema, table): (String, String) = (r.get(0), r.get(1));
        if tables
            .last()
            .is_none_or(|t| t.schema != schema || t.name != table)
        {
            tables.push(Table {
                schema: schema.clone(),
                name: table.clone(),
                columns: Vec::new(),
                unique: Vec::new(),
            });
        }
        if let Some(t) = tables.last_mut() {
            t.columns.push(stemma_anonymize::Column {
                name: r.get(2),
                ty: ColumnType::parse(&r.get::<_, String>(3)),
                nullable: r.get(4),
            });
        }
    }
    let cols_of = |key: &str, rel: &str| {
        format!(
            "ARRAY(SELECT a.attname::text FROM unnest({key}) WITH ORDINALITY k(num, ord) \
             JOIN pg_attribute a ON a.attrelid = {rel} AND a.attnum = k.num ORDER BY k.ord)"
        )
    };
    let rows = client
        .query(
            &format!(
                "SELECT n.nspname, c.relname, con.conname::text, con.contype = 'p', {} \
                 FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE con.contype IN ('p', 'u') AND {user_ns}",
                cols_of("con.conkey", "con.conrelid")
            ),
            &[],
        )
        .await
        .context("reading unique constraints")?;
    for r in rows {
        let (schema, table): (String, String) = (r.get(0), r.get(1));
        if let Some(t) = tables
            .iter_mut()
            .find(|t| t.schema == schema && t.name == table)
        {
            t.unique.push(UniqueConstraint {
                name: r.get(2),
                primary: r.get(3),
                columns: r.get(4),
            });
        }
    }
    let rows = client
        .query(
            &format!(
                "SELECT con.conname::text, n.nspname, c.relname, {}, fn.nspname, fc.relname, {} \
                 FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
                 JOIN pg_class fc ON fc.oid = con.confrelid JOIN pg_namespace fn ON fn.oid = fc.relnamespace \
                 WHERE con.contype = 'f' AND {user_ns}",
                cols_of("con.conkey", "con.conrelid"),
                cols_of("con.confkey", "con.confrelid")
            ),
            &[],
        )
        .await
        .context("reading foreign keys")?;
    let foreign_keys = rows
        .iter()
        .map(|r| ForeignKey {
            name: r.get(0),
            from_schema: r.get(1),
            from_table: r.get(2),
            from_columns: r.get(3),
            to_schema: r.get(4),
            to_table: r.get(5),
            to_columns: r.get(6),
        })
        .collect();
    Ok(Database {
        name: db.to_string(),
        tables,
        foreign_keys,
    })
}
