//! Rows in PostgreSQL's `COPY ... TO STDOUT` text format, masked one at a time.
//!
//! The copier streams each table from the parent with `COPY t (cols) TO STDOUT` and into the
//! anonymized branch with `COPY t (cols) FROM STDIN`, passing every row through a
//! [`RowMasker`] in memory: raw rows never reach a file. Kept columns are passed through as
//! the exact bytes PostgreSQL sent, so an unmasked table costs a split and a join per row;
//! masked columns are decoded, masked and encoded again.
//!
//! The format (PostgreSQL's documentation, "COPY", "Text Format"): one row per line ending in
//! `\n`, fields separated by a tab, `\N` for NULL, and backslash escapes `\b \f \n \r \t \v \\`,
//! `\` followed by one to three octal digits, `\x` followed by one or two hex digits, and `\`
//! followed by any other character standing for that character.
//!
//! We wrote this by hand rather than use a CSV crate: COPY's text format is not CSV (no
//! quoting, backslash escapes, `\N`), and it is forty lines.

use std::sync::Arc;

use crate::error::MaskError;
use crate::mask::Masker;
use crate::rules::Mask;
use crate::types::ColumnType;
use crate::unique::UniqueMapping;

/// A row could not be read. Holds no part of the row.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CopyError {
    #[error("a row has {found} fields where the table has {expected} columns")]
    FieldCount { found: usize, expected: usize },
    #[error("a value of column {column} is not valid UTF-8 (value withheld)")]
    NotUtf8 { column: String },
    #[error("column {column}: {source}")]
    Mask { column: String, source: MaskError },
}

/// A field that is not valid UTF-8 once unescaped. Holds no part of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotUtf8;

/// Decodes one field. `None` is SQL NULL.
pub fn decode_field(raw: &[u8]) -> Result<Option<String>, NotUtf8> {
    if raw == b"\\N" {
        return Ok(None);
    }
    if !raw.contains(&b'\\') {
        return String::from_utf8(raw.to_vec())
            .map(Some)
            .map_err(|_| NotUtf8);
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if b != b'\\' || i + 1 == raw.len() {
            out.push(b);
            i += 1;
            continue;
        }
        let c = raw[i + 1];
        i += 2;
        match c {
            b'b' => out.push(0x08),
            b'f' => out.push(0x0c),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(0x0b),
            b'0'..=b'7' => {
                let mut v = u32::from(c - b'0');
                let mut n = 1;
                while n < 3 && i < raw.len() && (b'0'..=b'7').contains(&raw[i]) {
                    v = v * 8 + u32::from(raw[i] - b'0');
                    i += 1;
                    n += 1;
                }
                out.push((v & 0xff) as u8);
            }
            b'x' if i < raw.len() && raw[i].is_ascii_hexdigit() => {
                let mut v = 0u32;
                let mut n = 0;
                while n < 2 && i < raw.len() && raw[i].is_ascii_hexdigit() {
                    v = v * 16 + (raw[i] as char).to_digit(16).unwrap_or(0);
                    i += 1;
                    n += 1;
                }
                out.push(v as u8);
            }
            other => out.push(other),
        }
    }
    String::from_utf8(out).map(Some).map_err(|_| NotUtf8)
}

/// Appends one field, escaped; `None` is written as `\N`.
pub fn encode_field(value: Option<&str>, out: &mut Vec<u8>) {
    let Some(v) = value else {
        out.extend_from_slice(b"\\N");
        return;
    };
    for &b in v.as_bytes() {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            0x0b => out.extend_from_slice(b"\\v"),
            _ => out.push(b),
        }
    }
}

/// How one column of a table is written.
#[derive(Debug, Clone)]
pub enum ColumnMask {
    /// The parent's bytes, untouched.
    Keep,
    /// A mask of the column's type.
    Mask { mask: Mask, ty: ColumnType },
    /// The collision-free mapping of the column's unique domain.
    Domain(Arc<UniqueMapping>),
}

/// Masks whole rows of one table.
#[derive(Debug, Clone)]
pub struct RowMasker {
    masker: Masker,
    names: Vec<String>,
    columns: Vec<ColumnMask>,
}

impl RowMasker {
    /// `columns` pairs each column of the COPY column list, in order, with its mask.
    pub fn new(masker: Masker, columns: Vec<(String, ColumnMask)>) -> Self {
        let (names, columns) = columns.into_iter().unzip();
        Self {
            masker,
            names,
            columns,
        }
    }

    /// Whether every column is kept, so rows can be passed through without looking at them.
    pub fn is_identity(&self) -> bool {
        self.columns.iter().all(|c| matches!(c, ColumnMask::Keep))
    }

    /// Masks one row (`line` without its trailing newline) and appends it, with a newline,
    /// to `out`. On error, `out` may hold part of the row: the caller abandons the copy.
    pub fn mask_row(&self, line: &[u8], out: &mut Vec<u8>) -> Result<(), CopyError> {
        let mut fields = 0;
        for (i, raw) in line.split(|b| *b == b'\t').enumerate() {
            fields += 1;
            let Some(col) = self.columns.get(i) else {
                continue;
            };
            if i > 0 {
                out.push(b'\t');
            }
            let masked = match col {
                ColumnMask::Keep => {
                    out.extend_from_slice(raw);
                    continue;
                }
                ColumnMask::Mask { mask, ty } => {
                    let value = self.decode(i, raw)?;
                    self.masker.mask(mask, ty, value.as_deref())
                }
                ColumnMask::Domain(mapping) => {
                    let value = self.decode(i, raw)?;
                    mapping.mask(value.as_deref())
                }
            };
            let masked = masked.map_err(|source| CopyError::Mask {
                column: self.names[i].clone(),
                source,
            })?;
            encode_field(masked.as_deref(), out);
        }
        if fields != self.columns.len() {
            return Err(CopyError::FieldCount {
                found: fields,
                expected: self.columns.len(),
            });
        }
        out.push(b'\n');
        Ok(())
    }

    fn decode(&self, i: usize, raw: &[u8]) -> Result<Option<String>, CopyError> {
        decode_field(raw).map_err(|NotUtf8| CopyError::NotUtf8 {
            column: self.names[i].clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::SecretKey;
    use crate::rules::Locale;
    use proptest::prelude::*;

    fn masker() -> Masker {
        Masker::new(SecretKey::from_bytes([3; 32]), Locale::En)
    }

    #[test]
    fn escapes_decode() {
        assert_eq!(decode_field(b"\\N"), Ok(None));
        assert_eq!(decode_field(b"plain"), Ok(Some("plain".into())));
        assert_eq!(
            decode_field(b"a\\tb\\nc\\\\d\\101\\x41\\q"),
            Ok(Some("a\tb\nc\\dAAq".into()))
        );
        assert_eq!(decode_field(b"\\\\N"), Ok(Some("\\N".into())));
        assert_eq!(decode_field(b"\xff"), Err(NotUtf8));
    }

    proptest! {
        #[test]
        fn encode_then_decode_is_identity(s in any::<Option<String>>()) {
            let mut out = Vec::new();
            encode_field(s.as_deref(), &mut out);
            prop_assert!(!out.contains(&b'\t') && !out.contains(&b'\n'));
            prop_assert_eq!(decode_field(&out), Ok(s));
        }
    }

    #[test]
    fn rows_keep_and_mask_columns() {
        let rm = RowMasker::new(
            masker(),
            vec![
                ("id".into(), ColumnMask::Keep),
                (
                    "email".into(),
                    ColumnMask::Mask {
                        mask: Mask::Email,
                        ty: ColumnType::parse("text"),
                    },
                ),
                (
                    "note".into(),
                    ColumnMask::Mask {
                        mask: Mask::Null,
                        ty: ColumnType::parse("text"),
                    },
                ),
            ],
        );
        assert!(!rm.is_identity());
        let mut out = Vec::new();
        rm.mask_row(b"7\talice@example.com\tcall\\tme", &mut out)
            .unwrap();
        rm.mask_row(b"8\t\\N\t\\N", &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let rows: Vec<&str> = text.lines().collect();
        let first: Vec<&str> = rows[0].split('\t').collect();
        assert_eq!(first[0], "7");
        assert!(first[1].contains('@') && first[1] != "alice@example.com");
        assert_eq!(first[2], "\\N");
        assert_eq!(rows[1], "8\t\\N\t\\N");
    }

    #[test]
    fn a_short_row_is_refused_without_its_values() {
        let rm = RowMasker::new(
            masker(),
            vec![
                ("a".into(), ColumnMask::Keep),
                ("b".into(), ColumnMask::Keep),
            ],
        );
        let e = rm.mask_row(b"secret-value", &mut Vec::new()).unwrap_err();
        assert_eq!(
            e,
            CopyError::FieldCount {
                found: 1,
                expected: 2
            }
        );
        assert!(!e.to_string().contains("secret"));
    }
}
