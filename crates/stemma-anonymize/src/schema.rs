//! What masking needs to know about a database (tables, column types, unique constraints,
//! foreign keys), and the check of a rules file against it.

use std::collections::HashMap;
use std::fmt;

use thiserror::Error;

use crate::mask::check_type;
use crate::plan::default_mask_for;
use crate::rules::{Mask, Rule, Rules, Unlisted};
use crate::types::ColumnType;
use crate::unique::can_be_unique;

/// Every database of the branch being anonymized.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Schema {
    pub databases: Vec<Database>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Database {
    pub name: String,
    pub tables: Vec<Table>,
    pub foreign_keys: Vec<ForeignKey>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    pub schema: String,
    pub name: String,
    pub columns: Vec<Column>,
    /// Primary key and unique constraints (and unique indexes).
    pub unique: Vec<UniqueConstraint>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub name: String,
    pub ty: ColumnType,
    pub nullable: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UniqueConstraint {
    pub name: String,
    pub columns: Vec<String>,
    pub primary: bool,
}

/// `from` columns reference `to` columns, pairwise.
#[derive(Debug, Clone, PartialEq)]
pub struct ForeignKey {
    pub name: String,
    pub from_schema: String,
    pub from_table: String,
    pub from_columns: Vec<String>,
    pub to_schema: String,
    pub to_table: String,
    pub to_columns: Vec<String>,
}

impl ForeignKey {
    fn describe(&self) -> String {
        format!(
            "{} ({}.{}({}) -> {}.{}({}))",
            self.name,
            self.from_schema,
            self.from_table,
            self.from_columns.join(", "),
            self.to_schema,
            self.to_table,
            self.to_columns.join(", ")
        )
    }
}

/// One column anywhere in the branch: `db:schema.table.column`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ColumnRef {
    pub database: String,
    pub schema: String,
    pub table: String,
    pub column: String,
}

impl ColumnRef {
    pub fn new(database: &str, schema: &str, table: &str, column: &str) -> Self {
        Self {
            database: database.into(),
            schema: schema.into(),
            table: table.into(),
            column: column.into(),
        }
    }
}

impl fmt::Display for ColumnRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}.{}.{}",
            self.database, self.schema, self.table, self.column
        )
    }
}

impl Table {
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// The unique constraints this column belongs to.
    pub fn unique_of<'a>(&'a self, column: &'a str) -> impl Iterator<Item = &'a UniqueConstraint> {
        self.unique
            .iter()
            .filter(move |u| u.columns.iter().any(|c| c == column))
    }
}

impl Database {
    pub fn table(&self, schema: &str, name: &str) -> Option<&Table> {
        self.tables
            .iter()
            .find(|t| t.schema == schema && t.name == name)
    }
}

/// One reason a rules file does not fit a schema. Each names the rule's line when a rule is at
/// fault.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Problem {
    #[error("line {line}: rule for {target} matches no column (unknown table or column)")]
    NoMatch { line: usize, target: String },
    #[error("line {line}: mask `{mask}` cannot be used on {column} ({ty}): {reason}")]
    IncompatibleType {
        line: usize,
        column: ColumnRef,
        mask: String,
        ty: String,
        reason: String,
    },
    #[error("line {line}: mask `null` on {column}, which is NOT NULL")]
    NullOnNotNull { line: usize, column: ColumnRef },
    #[error(
        "line {line}: mask `{mask}` on {column} cannot keep unique constraint {constraint} \
         (it maps different values to the same one); use hash or a fake kind"
    )]
    NotInjective {
        line: usize,
        column: ColumnRef,
        mask: String,
        constraint: String,
    },
    #[error(
        "{lines}rules would break foreign key {key}: {from} is masked with {from_mask} but \
         {to} with {to_mask}; both sides need the same mask so joins keep their rows"
    )]
    ForeignKey {
        /// `line N: ` / `lines N, M: ` prefix, empty when neither side has a rule.
        lines: String,
        key: String,
        from: ColumnRef,
        from_mask: String,
        to: ColumnRef,
        to_mask: String,
    },
}

/// All problems of a rules file against a schema (never empty).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("the masking rules do not fit the schema:\n{}", .0.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
pub struct Problems(pub Vec<Problem>);

/// The mask a column gets: its most specific rule's, else what `unlisted` implies.
pub(crate) fn effective_mask<'r>(
    rules: &'r Rules,
    db: &Database,
    table: &Table,
    col: &Column,
) -> (Option<&'r Rule>, Mask) {
    match rules.rule_for(&db.name, &table.schema, &table.name, &col.name) {
        Some(r) => (Some(r), r.mask.clone()),
        None => (
            None,
            match rules.options.unlisted {
                Unlisted::Mask => default_mask_for(db, table, col),
                Unlisted::Keep | Unlisted::Fail => Mask::Keep,
            },
        ),
    }
}

/// Checks a rules file against the branch's schema before anything runs, and reports every
/// problem at once:
///
/// - a rule that matches no column (unknown database, table or column, or a wildcard that
///   matches nothing);
/// - a mask that cannot produce the column's type or fit its length;
/// - `null` on a NOT NULL column;
/// - a mask on a primary-key/unique column that cannot stay injective;
/// - a foreign key whose two sides would be masked differently (named in the error).
pub fn validate_against_schema(rules: &Rules, schema: &Schema) -> Result<(), Problems> {
    let mut problems = Vec::new();
    let mut matched: HashMap<usize, bool> = HashMap::new();
    for db in &schema.databases {
        for table in &db.tables {
            for col in &table.columns {
                let (rule, mask) = effective_mask(rules, db, table, col);
                let Some(rule) = rule else { continue };
                matched.insert(rule.line, true);
                let column = ColumnRef::new(&db.name, &table.schema, &table.name, &col.name);
                if let Err(e) = check_type(&mask, &col.ty) {
                    problems.push(Problem::IncompatibleType {
                        line: rule.line,
                        column: column.clone(),
                        mask: mask.to_string(),
                        ty: col.ty.to_string(),
                        reason: e.to_string(),
                    });
                }
                if let Mask::Json { paths } = &mask {
                    // Leaves are text inside the document: check the sub-masks against text.
                    for p in paths {
                        if let Err(e) = check_type(&p.mask, &ColumnType::text()) {
                            problems.push(Problem::IncompatibleType {
                                line: rule.line,
                                column: column.clone(),
                                mask: format!("json path {}", p.path.source),
                                ty: col.ty.to_string(),
                                reason: e.to_string(),
                            });
                        }
                    }
                }
                if mask == Mask::Null && !col.nullable {
                    problems.push(Problem::NullOnNotNull {
                        line: rule.line,
                        column: column.clone(),
                    });
                }
                if mask != Mask::Keep && !can_be_unique(mask.kind()) {
                    if let Some(u) = table.unique_of(&col.name).next() {
                        problems.push(Problem::NotInjective {
                            line: rule.line,
                            column: column.clone(),
                            mask: mask.to_string(),
                            constraint: u.name.clone(),
                        });
                    }
                }
            }
        }
        for fk in &db.foreign_keys {
            let (Some(from_t), Some(to_t)) = (
                db.table(&fk.from_schema, &fk.from_table),
                db.table(&fk.to_schema, &fk.to_table),
            ) else {
                continue;
            };
            for (fc, tc) in fk.from_columns.iter().zip(&fk.to_columns) {
                let (Some(fcol), Some(tcol)) = (from_t.column(fc), to_t.column(tc)) else {
                    continue;
                };
                let (fr, fm) = effective_mask(rules, db, from_t, fcol);
                let (tr, tm) = effective_mask(rules, db, to_t, tcol);
                if fm != tm {
                    let lines: Vec<String> = [fr, tr]
                        .iter()
                        .flatten()
                        .map(|r| r.line.to_string())
                        .collect();
                    let lines = match lines.len() {
                        0 => String::new(),
                        1 => format!("line {}: ", lines[0]),
                        _ => format!("lines {}: ", lines.join(", ")),
                    };
                    problems.push(Problem::ForeignKey {
                        lines,
                        key: fk.describe(),
                        from: ColumnRef::new(&db.name, &fk.from_schema, &fk.from_table, fc),
                        from_mask: fm.to_string(),
                        to: ColumnRef::new(&db.name, &fk.to_schema, &fk.to_table, tc),
                        to_mask: tm.to_string(),
                    });
                }
            }
        }
    }
    for r in &rules.rules {
        if !matched.contains_key(&r.line) {
            problems.push(Problem::NoMatch {
                line: r.line,
                target: r.target(),
            });
        }
    }
    problems.sort_by_key(problem_line);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Problems(problems))
    }
}

fn problem_line(p: &Problem) -> usize {
    match p {
        Problem::NoMatch { line, .. }
        | Problem::IncompatibleType { line, .. }
        | Problem::NullOnNotNull { line, .. }
        | Problem::NotInjective { line, .. } => *line,
        Problem::ForeignKey { .. } => usize::MAX,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn col(name: &str, ty: &str, nullable: bool) -> Column {
        Column {
            name: name.into(),
            ty: ColumnType::parse(ty),
            nullable,
        }
    }

    fn pk(table: &str, cols: &[&str]) -> UniqueConstraint {
        UniqueConstraint {
            name: format!("{table}_pkey"),
            columns: cols.iter().map(|c| c.to_string()).collect(),
            primary: true,
        }
    }

    /// The Chinook tables that hold personal data, as the sample database declares them.
    pub(crate) fn chinook() -> Schema {
        let customer = Table {
            schema: "public".into(),
            name: "customer".into(),
            columns: vec![
                col("customer_id", "INT", false),
                col("first_name", "VARCHAR(40)", false),
                col("last_name", "VARCHAR(20)", false),
                col("company", "VARCHAR(80)", true),
                col("address", "VARCHAR(70)", true),
                col("city", "VARCHAR(40)", true),
                col("state", "VARCHAR(40)", true),
                col("country", "VARCHAR(40)", true),
                col("postal_code", "VARCHAR(10)", true),
                col("phone", "VARCHAR(24)", true),
                col("fax", "VARCHAR(24)", true),
                col("email", "VARCHAR(60)", false),
                col("support_rep_id", "INT", true),
            ],
            unique: vec![pk("customer", &["customer_id"])],
        };
        let employee = Table {
            schema: "public".into(),
            name: "employee".into(),
            columns: vec![
                col("employee_id", "INT", false),
                col("last_name", "VARCHAR(20)", false),
                col("first_name", "VARCHAR(20)", false),
                col("title", "VARCHAR(30)", true),
                col("reports_to", "INT", true),
                col("birth_date", "TIMESTAMP", true),
                col("hire_date", "TIMESTAMP", true),
                col("address", "VARCHAR(70)", true),
                col("city", "VARCHAR(40)", true),
                col("postal_code", "VARCHAR(10)", true),
                col("phone", "VARCHAR(24)", true),
                col("email", "VARCHAR(60)", true),
            ],
            unique: vec![pk("employee", &["employee_id"])],
        };
        let invoice = Table {
            schema: "public".into(),
            name: "invoice".into(),
            columns: vec![
                col("invoice_id", "INT", false),
                col("customer_id", "INT", false),
                col("invoice_date", "TIMESTAMP", false),
                col("billing_address", "VARCHAR(70)", true),
                col("billing_city", "VARCHAR(40)", true),
                col("billing_country", "VARCHAR(40)", true),
                col("billing_postal_code", "VARCHAR(10)", true),
                col("total", "NUMERIC(10,2)", false),
            ],
            unique: vec![pk("invoice", &["invoice_id"])],
        };
        let track = Table {
            schema: "public".into(),
            name: "track".into(),
            columns: vec![
                col("track_id", "INT", false),
                col("name", "VARCHAR(200)", false),
                col("composer", "VARCHAR(220)", true),
                col("unit_price", "NUMERIC(10,2)", false),
            ],
            unique: vec![pk("track", &["track_id"])],
        };
        let fk = |name: &str, ft: &str, fc: &str, tt: &str, tc: &str| ForeignKey {
            name: name.into(),
            from_schema: "public".into(),
            from_table: ft.into(),
            from_columns: vec![fc.into()],
            to_schema: "public".into(),
            to_table: tt.into(),
            to_columns: vec![tc.into()],
        };
        Schema {
            databases: vec![Database {
                name: "chinook".into(),
                tables: vec![customer, employee, invoice, track],
                foreign_keys: vec![
                    fk(
                        "invoice_customer_id_fkey",
                        "invoice",
                        "customer_id",
                        "customer",
                        "customer_id",
                    ),
                    fk(
                        "customer_support_rep_id_fkey",
                        "customer",
                        "support_rep_id",
                        "employee",
                        "employee_id",
                    ),
                    fk(
                        "employee_reports_to_fkey",
                        "employee",
                        "reports_to",
                        "employee",
                        "employee_id",
                    ),
                ],
            }],
        }
    }

    fn rules(src: &str) -> Rules {
        Rules::parse(src).unwrap()
    }

    #[test]
    fn good_rules_pass() {
        let r = rules(
            "[[rule]]\ntable = \"public.customer\"\ncolumn = \"email\"\nmask = \"email\"\n\
             [[rule]]\ntable = \"public.*\"\ncolumn = \"phone\"\nmask = \"phone\"\n\
             [[rule]]\ntable = \"*.customer\"\ncolumn = \"customer_id\"\nmask = \"hash\"\n\
             [[rule]]\ntable = \"public.invoice\"\ncolumn = \"customer_id\"\nmask = \"hash\"\n",
        );
        validate_against_schema(&r, &chinook()).unwrap();
    }

    #[test]
    fn foreign_key_mismatch_names_the_key() {
        let r = rules(
            "[[rule]]\ntable = \"public.customer\"\ncolumn = \"customer_id\"\nmask = \"hash\"\n",
        );
        let e = validate_against_schema(&r, &chinook()).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("invoice_customer_id_fkey"), "{msg}");
        assert!(msg.contains("line 1:"), "{msg}");
        assert!(
            msg.contains("chinook:public.invoice.customer_id is masked with keep"),
            "{msg}"
        );
        // Different options on the two sides are a mismatch too.
        let r = rules(
            "[[rule]]\ntable = \"public.customer\"\ncolumn = \"customer_id\"\nmask = \"number_noise\"\nratio = 0.1\n\
             [[rule]]\ntable = \"public.invoice\"\ncolumn = \"customer_id\"\nmask = \"number_noise\"\nratio = 0.2\n",
        );
        let msg = validate_against_schema(&r, &chinook())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("lines 6, 1:"), "{msg}");
    }

    #[test]
    fn unknown_tables_and_columns_are_refused_with_lines() {
        let r = rules(
            "[[rule]]\ntable = \"public.customers\"\ncolumn = \"email\"\nmask = \"email\"\n\n\
             [[rule]]\ntable = \"public.customer\"\ncolumn = \"e_mail\"\nmask = \"email\"\n\
             [[rule]]\ndatabase = \"shop\"\ntable = \"public.customer\"\ncolumn = \"email\"\nmask = \"email\"\n",
        );
        let e = validate_against_schema(&r, &chinook()).unwrap_err();
        assert_eq!(e.0.len(), 3, "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("line 1: rule for *.public.customers.email")
                || msg.contains("line 1: rule for public.customers.email"),
            "{msg}"
        );
        assert!(msg.contains("line 6:"), "{msg}");
        assert!(
            msg.contains("line 10: rule for shop:public.customer.email"),
            "{msg}"
        );
    }

    #[test]
    fn masks_that_cannot_produce_the_type_are_refused() {
        let r = rules(
            "[[rule]]\ntable = \"public.customer\"\ncolumn = \"support_rep_id\"\nmask = \"email\"\n\
             [[rule]]\ntable = \"public.customer\"\ncolumn = \"postal_code\"\nmask = \"email\"\n\
             [[rule]]\ntable = \"public.employee\"\ncolumn = \"support_rep_id\"\nmask = \"keep\"\n\
             [[rule]]\ntable = \"public.customer\"\ncolumn = \"email\"\nmask = \"null\"\n\
             [[rule]]\ntable = \"public.invoice\"\ncolumn = \"invoice_id\"\nmask = \"constant\"\nvalue = 1\n\
             [[rule]]\ntable = \"public.invoice\"\ncolumn = \"total\"\nmask = \"constant\"\nvalue = \"abc\"\n",
        );
        let e = validate_against_schema(&r, &chinook()).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("line 1: mask `email` cannot be used on chinook:public.customer.support_rep_id (INT)"), "{msg}");
        assert!(
            msg.contains("line 5:")
                && msg.contains("needs at least 13 characters but the column allows 10"),
            "{msg}"
        );
        assert!(
            msg.contains("line 9: rule for public.employee.support_rep_id matches no column"),
            "{msg}"
        );
        assert!(
            msg.contains(
                "line 13: mask `null` on chinook:public.customer.email, which is NOT NULL"
            ),
            "{msg}"
        );
        assert!(
            msg.contains("line 17:") && msg.contains("invoice_pkey"),
            "{msg}"
        );
        assert!(
            msg.contains("line 22:") && msg.contains("constant"),
            "{msg}"
        );
    }
}
