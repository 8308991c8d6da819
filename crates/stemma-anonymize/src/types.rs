//! PostgreSQL column types, as far as masking cares: what shape of text a value has and how
//! long it may be.

use std::fmt;

/// The family of a column's type. Values always travel as PostgreSQL's text representation
/// (what `COPY ... TO STDOUT` prints), so the family says which text a mask may emit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TypeKind {
    /// `text`, `varchar(n)`, `char(n)`, `citext`, `name`: any string.
    Text,
    /// `smallint`, `integer`, `bigint` (the number is the width in bits).
    Integer(u8),
    /// `numeric(p, s)` / `decimal`: `precision` and `scale` when declared.
    Numeric {
        precision: Option<u32>,
        scale: Option<u32>,
    },
    /// `real`, `double precision`.
    Float,
    /// `date`.
    Date,
    /// `timestamp [without time zone]`.
    Timestamp,
    /// `timestamptz` / `timestamp with time zone`.
    TimestampTz,
    /// `inet`.
    Inet,
    /// `cidr` (host bits must be zero).
    Cidr,
    /// `json`.
    Json,
    /// `jsonb`.
    Jsonb,
    /// `uuid`.
    Uuid,
    /// `boolean`.
    Boolean,
    /// `bytea` (text form `\x` + hex).
    Bytea,
    /// Anything else (arrays, enums, geometry, ...): only `keep`, `null` and `constant` apply.
    Other,
}

/// A column's type as masking needs it: the family and, for strings, the length limit in
/// characters (PostgreSQL counts characters, not bytes).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ColumnType {
    pub kind: TypeKind,
    /// `Some(n)` for `varchar(n)` / `char(n)`; `None` when unlimited.
    pub max_len: Option<usize>,
    /// The type's name as given, for messages (`character varying(20)`).
    pub name: String,
}

impl ColumnType {
    /// An unlimited `text` column.
    pub fn text() -> Self {
        Self::parse("text")
    }

    /// Builds a type from its SQL spelling, as `format_type()` or a `CREATE TABLE` writes it:
    /// `character varying(20)`, `VARCHAR(20)`, `int4`, `timestamp with time zone`, `numeric(10,2)`,
    /// `text[]`. Never fails: an unknown name becomes [`TypeKind::Other`].
    pub fn parse(sql: &str) -> Self {
        let name = sql.trim().to_string();
        let lower = name.to_ascii_lowercase();
        // An array of anything is opaque to masks (they work on scalars).
        if lower.ends_with("[]") || lower.starts_with('_') {
            return Self {
                kind: TypeKind::Other,
                max_len: None,
                name,
            };
        }
        let (base, args) = match lower.find('(') {
            Some(open) => {
                let close = lower.rfind(')').unwrap_or(lower.len());
                let args: Vec<u32> = lower
                    .get(open + 1..close)
                    .unwrap_or("")
                    .split(',')
                    .filter_map(|a| a.trim().parse().ok())
                    .collect();
                // `timestamp(3) with time zone`: the suffix after `)` still matters.
                let rest = lower.get(close + 1..).unwrap_or("").trim();
                let base = format!("{} {}", lower[..open].trim(), rest);
                (base.trim().to_string(), args)
            }
            None => (lower.clone(), Vec::new()),
        };
        let kind = match base.as_str() {
            "text" | "varchar" | "character varying" | "char" | "character" | "bpchar"
            | "citext" | "name" => TypeKind::Text,
            "smallint" | "int2" | "smallserial" | "serial2" => TypeKind::Integer(16),
            "integer" | "int" | "int4" | "serial" | "serial4" => TypeKind::Integer(32),
            "bigint" | "int8" | "bigserial" | "serial8" => TypeKind::Integer(64),
            "numeric" | "decimal" => TypeKind::Numeric {
                precision: args.first().copied(),
                scale: args.get(1).copied().or(args.first().map(|_| 0)),
            },
            "real" | "float4" | "double precision" | "float8" | "float" => TypeKind::Float,
            "date" => TypeKind::Date,
            "timestamp" | "timestamp without time zone" => TypeKind::Timestamp,
            "timestamptz" | "timestamp with time zone" => TypeKind::TimestampTz,
            "inet" => TypeKind::Inet,
            "cidr" => TypeKind::Cidr,
            "json" => TypeKind::Json,
            "jsonb" => TypeKind::Jsonb,
            "uuid" => TypeKind::Uuid,
            "boolean" | "bool" => TypeKind::Boolean,
            "bytea" => TypeKind::Bytea,
            _ => TypeKind::Other,
        };
        let max_len = match kind {
            // `char` without a length is char(1) in PostgreSQL.
            TypeKind::Text if args.is_empty() && matches!(base.as_str(), "char" | "character") => {
                Some(1)
            }
            TypeKind::Text => args.first().map(|&n| n as usize),
            _ => None,
        };
        Self {
            kind,
            max_len,
            name,
        }
    }

    /// Whether values are free strings (where fake names, emails, prose... may go).
    pub fn is_text(&self) -> bool {
        self.kind == TypeKind::Text
    }

    /// The same type with a tighter length limit (used to give every column of a foreign key
    /// the smallest limit among them, so both sides produce the very same values).
    pub fn with_max_len(&self, max_len: Option<usize>) -> Self {
        Self {
            max_len,
            ..self.clone()
        }
    }
}

impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_common_spellings() {
        let t = ColumnType::parse("character varying(20)");
        assert_eq!((t.kind, t.max_len), (TypeKind::Text, Some(20)));
        assert_eq!(ColumnType::parse("VARCHAR(60)").max_len, Some(60));
        assert_eq!(ColumnType::parse("text").max_len, None);
        assert_eq!(ColumnType::parse("char").max_len, Some(1));
        assert_eq!(ColumnType::parse("INT").kind, TypeKind::Integer(32));
        assert_eq!(ColumnType::parse("int8").kind, TypeKind::Integer(64));
        assert_eq!(
            ColumnType::parse("numeric(10,2)").kind,
            TypeKind::Numeric {
                precision: Some(10),
                scale: Some(2)
            }
        );
        assert_eq!(
            ColumnType::parse("timestamp(3) with time zone").kind,
            TypeKind::TimestampTz
        );
        assert_eq!(ColumnType::parse("TIMESTAMP").kind, TypeKind::Timestamp);
        assert_eq!(ColumnType::parse("jsonb").kind, TypeKind::Jsonb);
        assert_eq!(ColumnType::parse("text[]").kind, TypeKind::Other);
        assert_eq!(ColumnType::parse("geometry").kind, TypeKind::Other);
    }
}
