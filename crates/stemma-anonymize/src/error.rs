//! Errors. **None of them carries a row value**: they name lines, columns, kinds and types,
//! never the data being masked, because error messages end up in logs, API responses and CI
//! output that people without access to production read. `tests::no_raw_values_in_errors`
//! (in `mask.rs`) checks it for every kind.

use thiserror::Error;

/// An invalid rules file. `line` is 1-based.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("line {line}: {message}")]
pub struct RulesError {
    pub line: usize,
    pub message: String,
}

/// A value could not be masked. Deliberately holds no part of the value.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MaskError {
    /// The value does not have the shape the mask needs (e.g. `date_shift` on a value that is
    /// not a date). The value itself is withheld.
    #[error("mask `{kind}` cannot read this value as {expected} (value withheld)")]
    InvalidValue {
        kind: &'static str,
        expected: &'static str,
    },
    /// The mask cannot produce the column's type at all.
    #[error("mask `{kind}` cannot produce values of type {ty}")]
    UnsupportedType { kind: &'static str, ty: String },
    /// The column's length limit is too small for any value of this kind.
    #[error("mask `{kind}` needs at least {needed} characters but the column allows {max_len}")]
    TooShort {
        kind: &'static str,
        needed: usize,
        max_len: usize,
    },
    /// No collision-free value was found for a unique column within the retry budget (the
    /// length limit or the value space of the kind is too small for this many distinct values).
    #[error(
        "mask `{kind}` found no collision-free value after {attempts} attempts for a unique column \
         (length limit or value space too small for the number of distinct values)"
    )]
    UniqueExhausted { kind: &'static str, attempts: u32 },
}
