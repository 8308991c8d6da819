//! The masking plan: the mask of every column of the branch, once the rules, `unlisted` and
//! the detector's flags are combined. This is what the copier executes.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use thiserror::Error;

use crate::detect::{Flag, PiiCategory};
use crate::rules::{JsonPath, JsonPathMask, Mask, Rules, Unlisted};
use crate::schema::{
    effective_mask, validate_against_schema, Column, ColumnRef, Database, Problems, Schema, Table,
};
use crate::types::{ColumnType, TypeKind};

/// Where a column's mask came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskSource {
    Rule {
        line: usize,
    },
    /// No rule: `unlisted = "keep"` or `"mask"` decided.
    Unlisted,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ColumnPlan {
    pub name: String,
    /// The type masks must produce. For a column joined by foreign keys, the length limit is
    /// the smallest among the joined columns, so that every side produces identical values.
    pub ty: ColumnType,
    pub mask: Mask,
    pub source: MaskSource,
    /// Index into [`Plan::domains`] when the column must be masked through a
    /// [`crate::unique::UniqueMapping`] (unique, or joined to a unique column).
    pub domain: Option<usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TablePlan {
    pub schema: String,
    pub name: String,
    pub columns: Vec<ColumnPlan>,
}

impl TablePlan {
    /// Whether every column is kept (the table's rows can be copied as they are).
    pub fn is_unchanged(&self) -> bool {
        self.columns.iter().all(|c| c.mask == Mask::Keep)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct DatabasePlan {
    pub name: String,
    pub tables: Vec<TablePlan>,
}

/// A set of columns (a unique column and everything joined to it by foreign keys) masked with
/// one collision-free mapping. The copier observes every value of every member first, then
/// masks them all with the resulting [`crate::unique::UniqueMapping`].
#[derive(Debug, Clone, PartialEq)]
pub struct UniqueDomain {
    pub mask: Mask,
    pub ty: ColumnType,
    pub columns: Vec<ColumnRef>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub databases: Vec<DatabasePlan>,
    pub domains: Vec<UniqueDomain>,
}

impl Plan {
    pub fn column(&self, c: &ColumnRef) -> Option<&ColumnPlan> {
        self.databases
            .iter()
            .find(|d| d.name == c.database)?
            .tables
            .iter()
            .find(|t| t.schema == c.schema && t.name == c.table)?
            .columns
            .iter()
            .find(|col| col.name == c.column)
    }
}

/// Why the plan refuses to run.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum PlanError {
    #[error(transparent)]
    Invalid(#[from] Problems),
    #[error("{}", describe_uncovered(.flagged, .unlisted))]
    Uncovered {
        /// Columns the detector flags as personal data that no rule covers.
        flagged: Vec<(ColumnRef, PiiCategory)>,
        /// With `unlisted = "fail"`: columns without a rule.
        unlisted: Vec<ColumnRef>,
    },
}

fn describe_uncovered(flagged: &[(ColumnRef, PiiCategory)], unlisted: &[ColumnRef]) -> String {
    let mut s = String::new();
    if !flagged.is_empty() {
        s.push_str(
            "these columns look like personal data and no rule covers them \
             (add a rule; `mask = \"keep\"` if they really are not):\n",
        );
        for (c, cat) in flagged {
            s.push_str(&format!("  {c} ({cat})\n"));
        }
    }
    if !unlisted.is_empty() {
        s.push_str("`unlisted = \"fail\"` and these columns have no rule:\n");
        for c in unlisted {
            s.push_str(&format!("  {c}\n"));
        }
    }
    s.trim_end().to_string()
}

/// The mask `unlisted = "mask"` gives a column, from its type. Key columns (in a primary key,
/// a unique constraint or a foreign key) that are numbers or uuids are kept: they are synthetic
/// identifiers, and a detector-flagged one still needs a rule. Key text columns get `hash`
/// (injective); other columns a fake of their type.
pub fn default_mask_for(db: &Database, table: &Table, col: &Column) -> Mask {
    let is_key = table.unique_of(&col.name).next().is_some()
        || db.foreign_keys.iter().any(|fk| {
            (fk.from_schema == table.schema
                && fk.from_table == table.name
                && fk.from_columns.contains(&col.name))
                || (fk.to_schema == table.schema
                    && fk.to_table == table.name
                    && fk.to_columns.contains(&col.name))
        });
    let null_or_keep = if col.nullable { Mask::Null } else { Mask::Keep };
    match col.ty.kind {
        TypeKind::Text if is_key => {
            if col
                .ty
                .max_len
                .is_none_or(|m| m >= crate::mask::HASH_MIN_LEN)
            {
                Mask::Hash
            } else {
                Mask::Keep
            }
        }
        TypeKind::Text => Mask::Text,
        TypeKind::Integer(_) | TypeKind::Numeric { .. } | TypeKind::Uuid if is_key => Mask::Keep,
        TypeKind::Integer(_) | TypeKind::Numeric { .. } | TypeKind::Float => {
            Mask::NumberNoise { ratio: 0.1 }
        }
        TypeKind::Date | TypeKind::Timestamp | TypeKind::TimestampTz => {
            Mask::DateShift { max_days: 365 }
        }
        TypeKind::Inet | TypeKind::Cidr => Mask::Ip,
        TypeKind::Json | TypeKind::Jsonb => Mask::Json {
            paths: vec![JsonPathMask {
                path: JsonPath {
                    segments: Vec::new(),
                    source: "$".into(),
                },
                mask: Mask::Text,
            }],
        },
        TypeKind::Uuid | TypeKind::Bytea => Mask::Hash,
        TypeKind::Boolean => Mask::Keep,
        TypeKind::Other => null_or_keep,
    }
}

/// Combines rules, schema and detector flags into the plan, or refuses:
///
/// - the rules must pass [`validate_against_schema`];
/// - whatever `unlisted` says, a flagged column that no rule covers stops the run (a rule with
///   `mask = "keep"` is how a user says "not personal data");
/// - with `unlisted = "fail"`, every column needs a rule.
pub fn plan(rules: &Rules, schema: &Schema, flags: &[Flag]) -> Result<Plan, PlanError> {
    validate_against_schema(rules, schema)?;
    let flagged: HashMap<&ColumnRef, PiiCategory> =
        flags.iter().map(|f| (&f.column, f.category)).collect();
    let mut uncovered_flagged = Vec::new();
    let mut uncovered = Vec::new();

    // Union-find over foreign-key column pairs: joined columns share one mapping and limit.
    let mut ids: HashMap<ColumnRef, usize> = HashMap::new();
    let mut parent: Vec<usize> = Vec::new();
    let mut id_of = |c: ColumnRef, parent: &mut Vec<usize>| -> usize {
        *ids.entry(c).or_insert_with(|| {
            parent.push(parent.len());
            parent.len() - 1
        })
    };
    fn find(parent: &mut [usize], mut x: usize) -> usize {
        while parent[x] != x {
            parent[x] = parent[parent[x]];
            x = parent[x];
        }
        x
    }
    for db in &schema.databases {
        for table in &db.tables {
            for col in &table.columns {
                id_of(
                    ColumnRef::new(&db.name, &table.schema, &table.name, &col.name),
                    &mut parent,
                );
            }
        }
        for fk in &db.foreign_keys {
            for (fc, tc) in fk.from_columns.iter().zip(&fk.to_columns) {
                let a = id_of(
                    ColumnRef::new(&db.name, &fk.from_schema, &fk.from_table, fc),
                    &mut parent,
                );
                let b = id_of(
                    ColumnRef::new(&db.name, &fk.to_schema, &fk.to_table, tc),
                    &mut parent,
                );
                let (ra, rb) = (find(&mut parent, a), find(&mut parent, b));
                parent[ra] = rb;
            }
        }
    }

    // First pass: masks, per-component length limit and uniqueness.
    struct Component {
        max_len: Option<usize>,
        unique: bool,
        members: Vec<ColumnRef>,
    }
    let mut components: BTreeMap<usize, Component> = BTreeMap::new();
    let mut entries = Vec::new();
    for db in &schema.databases {
        let mut tables = Vec::new();
        for table in &db.tables {
            let mut cols = Vec::new();
            for col in &table.columns {
                let cref = ColumnRef::new(&db.name, &table.schema, &table.name, &col.name);
                let (rule, mask) = effective_mask(rules, db, table, col);
                if rule.is_none() {
                    if let Some(cat) = flagged.get(&cref) {
                        uncovered_flagged.push((cref.clone(), *cat));
                    }
                    if rules.options.unlisted == Unlisted::Fail {
                        uncovered.push(cref.clone());
                    }
                }
                let root = find(&mut parent, ids[&cref]);
                let comp = components.entry(root).or_insert(Component {
                    max_len: None,
                    unique: false,
                    members: Vec::new(),
                });
                comp.max_len = match (comp.max_len, col.ty.max_len) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                comp.unique |= table.unique_of(&col.name).next().is_some();
                comp.members.push(cref.clone());
                cols.push((col, mask, rule.map(|r| r.line), root));
            }
            tables.push((table, cols));
        }
        entries.push((db, tables));
    }
    if !uncovered_flagged.is_empty() || !uncovered.is_empty() {
        return Err(PlanError::Uncovered {
            flagged: uncovered_flagged,
            unlisted: uncovered,
        });
    }

    let mut domains = Vec::new();
    let mut domain_of_root: HashMap<usize, usize> = HashMap::new();
    let mut databases = Vec::new();
    for (db, tables) in entries {
        let mut tplans = Vec::new();
        for (table, cols) in tables {
            let mut cplans = Vec::new();
            for (col, mask, line, root) in cols {
                let comp = &components[&root];
                let ty = col.ty.with_max_len(comp.max_len.or(col.ty.max_len));
                let domain = if comp.unique && mask != Mask::Keep {
                    Some(*domain_of_root.entry(root).or_insert_with(|| {
                        domains.push(UniqueDomain {
                            mask: mask.clone(),
                            ty: ty.clone(),
                            columns: comp.members.clone(),
                        });
                        domains.len() - 1
                    }))
                } else {
                    None
                };
                cplans.push(ColumnPlan {
                    name: col.name.clone(),
                    ty,
                    mask,
                    source: line.map_or(MaskSource::Unlisted, |line| MaskSource::Rule { line }),
                    domain,
                });
            }
            tplans.push(TablePlan {
                schema: table.schema.clone(),
                name: table.name.clone(),
                columns: cplans,
            });
        }
        databases.push(DatabasePlan {
            name: db.name.clone(),
            tables: tplans,
        });
    }
    Ok(Plan { databases, domains })
}

impl fmt::Display for MaskSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Rule { line } => write!(f, "rule at line {line}"),
            Self::Unlisted => f.write_str("unlisted"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::{detect, Samples};
    use crate::schema::tests::chinook;

    fn parse(src: &str) -> Rules {
        Rules::parse(src).unwrap()
    }

    #[test]
    fn flagged_columns_without_rules_stop_the_run() {
        let schema = chinook();
        let flags = detect(&schema, &Samples::new());
        let e = plan(&parse("[options]\nunlisted = \"keep\"\n"), &schema, &flags).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("chinook:public.customer.email (email)"),
            "{msg}"
        );
        assert!(
            msg.contains("chinook:public.invoice.billing_address"),
            "{msg}"
        );
        // Even `unlisted = "mask"` does not waive it: new PII must be looked at.
        let e = plan(&parse("[options]\nunlisted = \"mask\"\n"), &schema, &flags).unwrap_err();
        assert!(matches!(e, PlanError::Uncovered { .. }));
    }

    #[test]
    fn explicit_keep_waives_a_flag_and_suggest_output_plans() {
        let schema = chinook();
        let flags = detect(&schema, &Samples::new());
        let suggested = crate::detect::suggest(&schema, &Samples::new());
        let rules = parse(&suggested);
        let p = plan(&rules, &schema, &flags).unwrap();
        let email = p
            .column(&ColumnRef::new("chinook", "public", "customer", "email"))
            .unwrap();
        assert_eq!(email.mask, Mask::Email);
        assert!(matches!(email.source, MaskSource::Rule { .. }));
        let track = &p.databases[0]
            .tables
            .iter()
            .find(|t| t.name == "track")
            .unwrap();
        assert!(track.is_unchanged());
    }

    #[test]
    fn unlisted_fail_lists_columns_without_rules() {
        let schema = chinook();
        let e = plan(&parse("[options]\nunlisted = \"fail\"\n"), &schema, &[]).unwrap_err();
        let PlanError::Uncovered { unlisted, .. } = e else {
            panic!()
        };
        assert!(unlisted.contains(&ColumnRef::new("chinook", "public", "track", "name")));
    }

    #[test]
    fn unlisted_mask_masks_by_type_and_keeps_keys() {
        let schema = chinook();
        let p = plan(&parse("[options]\nunlisted = \"mask\"\n"), &schema, &[]).unwrap();
        let get = |t: &str, c: &str| {
            p.column(&ColumnRef::new("chinook", "public", t, c))
                .unwrap()
                .mask
                .clone()
        };
        assert_eq!(get("customer", "customer_id"), Mask::Keep);
        assert_eq!(get("invoice", "customer_id"), Mask::Keep);
        assert_eq!(get("track", "name"), Mask::Text);
        assert_eq!(get("invoice", "total"), Mask::NumberNoise { ratio: 0.1 });
        assert_eq!(
            get("employee", "birth_date"),
            Mask::DateShift { max_days: 365 }
        );
    }

    #[test]
    fn foreign_key_components_share_a_domain_and_the_smallest_limit() {
        let mut schema = chinook();
        // Make the join a text key of different widths on each side.
        let db = &mut schema.databases[0];
        for t in &mut db.tables {
            for c in &mut t.columns {
                if c.name == "customer_id" {
                    c.ty = ColumnType::parse(if t.name == "customer" {
                        "varchar(40)"
                    } else {
                        "varchar(30)"
                    });
                }
            }
        }
        let rules =
            parse("[[rule]]\ntable = \"public.*\"\ncolumn = \"customer_id\"\nmask = \"hash\"\n");
        let p = plan(&rules, &schema, &[]).unwrap();
        let a = p
            .column(&ColumnRef::new(
                "chinook",
                "public",
                "customer",
                "customer_id",
            ))
            .unwrap();
        let b = p
            .column(&ColumnRef::new(
                "chinook",
                "public",
                "invoice",
                "customer_id",
            ))
            .unwrap();
        assert_eq!(a.domain, b.domain);
        assert!(a.domain.is_some());
        assert_eq!(a.ty.max_len, Some(30));
        assert_eq!(b.ty.max_len, Some(30));
        assert_eq!(p.domains[a.domain.unwrap()].columns.len(), 2);
    }
}
