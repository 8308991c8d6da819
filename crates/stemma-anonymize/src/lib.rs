//! Stemma's masking library: the pure-logic core of anonymized branches (issue 8).
//!
//! It knows nothing about HTTP, metadata or processes. The copier that builds an anonymized
//! branch uses it in this order:
//!
//! 1. [`Rules::parse`] the rules file (errors name the line);
//! 2. describe the parent's databases as a [`Schema`], sample a few values per column and run
//!    [`detect()`] (or [`suggest()`] to propose a rules file);
//! 3. [`plan()`] the run: it validates the rules against the schema
//!    ([`validate_against_schema`]), applies `unlisted`, refuses flagged columns that no rule
//!    covers, and groups the columns that need a collision-free mapping into
//!    [`UniqueDomain`]s;
//! 4. for each unique domain, feed every value to a [`UniqueMapper`] and resolve it into a
//!    [`UniqueMapping`];
//! 5. stream each table's rows, masking each column with [`Masker::mask`] (or the domain's
//!    [`UniqueMapping::mask`]), in PostgreSQL's text representation.
//!
//! Every mask is a deterministic function of a secret key and the input value (see
//! [`mask`]), so one value gets the same output in every table, every database and every run.
//! No error or flag carries a row value.
//!
//! The rules file contract is documented in `docs/anonymize.md`.

mod error;

pub mod copy;
pub mod detect;
pub mod mask;
pub mod plan;
pub mod rules;
pub mod schema;
pub mod types;
pub mod unique;

pub use copy::{ColumnMask, CopyError, RowMasker};
pub use detect::{detect, suggest, Evidence, Flag, PiiCategory, Samples};
pub use error::{MaskError, RulesError};
pub use mask::{check_type, Masker, SecretKey};
pub use plan::{
    plan, ColumnPlan, DatabasePlan, MaskSource, Plan, PlanError, TablePlan, UniqueDomain,
};
pub use rules::{Locale, Mask, MaskKind, Options, Rule, Rules, Unlisted};
pub use schema::{
    validate_against_schema, Column, ColumnRef, Database, ForeignKey, Problem, Problems, Schema,
    Table, UniqueConstraint,
};
pub use types::{ColumnType, TypeKind};
pub use unique::{UniqueMapper, UniqueMapping};
