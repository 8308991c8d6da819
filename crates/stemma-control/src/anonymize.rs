//! Anonymized branches: reading a branch's schema and samples for `anonymize suggest`.
//! (Masking rows into a new root branch is the next step of this module.)

use std::collections::HashMap;

use anyhow::{anyhow, Context};
use stemma_anonymize::{
    ColumnRef, ColumnType, Database, ForeignKey, Samples, Schema, Table, UniqueConstraint,
};
use tokio_postgres::NoTls;

use crate::engine::{Engine, COMPUTE_SOCKET_PORT};
use crate::{ControlError, Result};

/// Rows sampled per table for the PII detector. Samples stay in memory, are never logged,
/// and are dropped when the suggestion is made.
const SAMPLE_ROWS: i64 = 50;

fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

impl Engine {
    /// Proposes masking rules (TOML) for a branch from its columns' names, types and a
    /// sample of their values.
    pub async fn anonymize_suggest(&self, name: &str) -> Result<String> {
        let b = self
            .meta
            .branch(name)?
            .ok_or_else(|| ControlError::NotFound(format!("branch {name:?} does not exist")))?;
        let socket = self
            .wake(&Self::compute_key(&b))
            .await
            .map_err(|r| ControlError::Conflict(r.message))?;
        let dir = socket
            .parent()
            .ok_or_else(|| anyhow!("socket path without a directory"))?
            .to_path_buf();
        let connect = |db: String| {
            let mut cfg = tokio_postgres::Config::new();
            cfg.host_path(&dir)
                .port(COMPUTE_SOCKET_PORT)
                .user(&b.db_user)
                .password(&b.db_password)
                .dbname(&db)
                .application_name("stemma-anonymize");
            async move {
                let (client, conn) = cfg
                    .connect(NoTls)
                    .await
                    .with_context(|| format!("connecting to database {db:?}"))?;
                tokio::spawn(conn);
                Ok::<_, anyhow::Error>(client)
            }
        };
        let admin = connect("postgres".into()).await?;
        let databases: Vec<String> = admin
            .query(
                "SELECT datname FROM pg_database WHERE NOT datistemplate AND datallowconn ORDER BY 1",
                &[],
            )
            .await
            .context("listing databases")?
            .iter()
            .map(|r| r.get(0))
            .collect();
        drop(admin);
        let mut schema = Schema {
            databases: Vec::new(),
        };
        let mut samples: Samples = HashMap::new();
        for db in databases {
            let client = connect(db.clone()).await?;
            let db_schema = introspect(&client, &db).await?;
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
                // A table we may not read yields no samples, not a failure: names and types
                // still inform the suggestion.
                let Ok(rows) = client.query(&sql, &[]).await else {
                    continue;
                };
                for (i, c) in t.columns.iter().enumerate() {
                    let values: Vec<Option<String>> = rows.iter().map(|r| r.get(i)).collect();
                    samples.insert(ColumnRef::new(&db, &t.schema, &t.name, &c.name), values);
                }
            }
            if !db_schema.tables.is_empty() {
                schema.databases.push(db_schema);
            }
        }
        Ok(stemma_anonymize::suggest(&schema, &samples))
    }
}

/// The tables, columns, unique constraints and foreign keys of one database.
async fn introspect(client: &tokio_postgres::Client, db: &str) -> Result<Database> {
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
