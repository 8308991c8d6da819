//! Validation of user input: branch names and durations.

use std::time::Duration;

use crate::ControlError;

/// Longest branch name: PostgreSQL's identifier limit, so a name can also be a database name.
pub const MAX_NAME_LEN: usize = 63;

/// Checks a branch name: lowercase letters, digits, `-`, `_`, `.`, at most one `/` (for
/// `dev/alice`), at most 63 characters, starting with a letter or digit.
pub fn validate_branch_name(name: &str) -> Result<(), ControlError> {
    let invalid = |why: &str| {
        Err(ControlError::Invalid(format!(
            "invalid branch name {name:?}: {why} (use lowercase letters, digits, '-', '_', '.' and at most one '/', up to {MAX_NAME_LEN} characters)"
        )))
    };
    if name.is_empty() {
        return invalid("it is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return invalid("it is too long");
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || "-_./".contains(*c)))
    {
        return invalid(&format!("{c:?} is not allowed"));
    }
    if name.matches('/').count() > 1 {
        return invalid("it has more than one '/'");
    }
    for part in name.split('/') {
        match part.chars().next() {
            None => return invalid("a part around '/' is empty"),
            Some(c) if !c.is_ascii_alphanumeric() => {
                return invalid("each part must start with a letter or digit")
            }
            _ => {}
        }
    }
    Ok(())
}

/// Parses `30s`, `5m`, `12h`, `7d` (and anything else humantime reads, like `1h30m`).
pub fn parse_duration(s: &str) -> Result<Duration, ControlError> {
    let t = s.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(t).map_err(|e| {
        ControlError::Invalid(format!(
            "invalid duration {s:?}: {e} (examples: 30s, 5m, 12h, 7d)"
        ))
    })
}

/// Parses a size as PostgreSQL writes its own (`64MB`, `1GB`, `512kB`, `0`; each unit 1024
/// of the one below), also accepting `MiB`-style units and bytes without a unit. Hand-written:
/// the size crates read `MB` as 10^6, which a PostgreSQL user would not expect.
pub fn parse_size(s: &str) -> Result<u64, ControlError> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let shift = match unit.trim() {
        "" | "B" => 0,
        "kB" | "KB" | "KiB" => 10,
        "MB" | "MiB" => 20,
        "GB" | "GiB" => 30,
        "TB" | "TiB" => 40,
        _ => u32::MAX,
    };
    number
        .parse::<u64>()
        .ok()
        .filter(|_| shift != u32::MAX)
        .and_then(|n| n.checked_mul(1u64 << shift.min(63)))
        .ok_or_else(|| {
            ControlError::Invalid(format!(
                "invalid size {s:?} (examples: 0, 512kB, 64MB, 1GB)"
            ))
        })
}

/// A size in bytes that reads and prints as PostgreSQL writes sizes ([`parse_size`]; printed
/// in the largest unit that divides it), e.g. for command-line options and their defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl std::str::FromStr for Size {
    type Err = ControlError;
    fn from_str(s: &str) -> Result<Self, ControlError> {
        parse_size(s).map(Size)
    }
}

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0;
        let unit = [(40, "TB"), (30, "GB"), (20, "MB"), (10, "kB")]
            .into_iter()
            .find(|(shift, _)| n != 0 && n.is_multiple_of(1u64 << shift));
        match unit {
            Some((shift, unit)) => write!(f, "{}{unit}", n >> shift),
            None => write!(f, "{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_print_as_they_read() {
        for (bytes, text) in [
            (0, "0"),
            (4097, "4097"),
            (512 << 10, "512kB"),
            (64 << 20, "64MB"),
            (3 << 30, "3GB"),
        ] {
            assert_eq!(Size(bytes).to_string(), text);
            assert_eq!(text.parse::<Size>().ok(), Some(Size(bytes)));
        }
    }

    #[test]
    fn sizes_read_as_postgresql_writes_them() {
        assert_eq!(parse_size("0").ok(), Some(0));
        assert_eq!(parse_size("4096").ok(), Some(4096));
        assert_eq!(parse_size("512kB").ok(), Some(512 << 10));
        assert_eq!(parse_size("64MB").ok(), Some(64 << 20));
        assert_eq!(parse_size(" 64 MiB ").ok(), Some(64 << 20));
        assert_eq!(parse_size("1GB").ok(), Some(1 << 30));
        assert_eq!(parse_size("2TiB").ok(), Some(2 << 40));
        for bad in ["", "MB", "64 mb", "-1MB", "1.5GB", "64XB", "99999999999TB"] {
            assert!(parse_size(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn accepts_good_names() {
        for n in [
            "main",
            "dev-alice",
            "dev/alice",
            "pr-123",
            "v1.2_x",
            "a",
            &"a".repeat(63),
        ] {
            validate_branch_name(n).unwrap_or_else(|e| panic!("{n}: {e}"));
        }
    }

    #[test]
    fn rejects_bad_names() {
        for n in [
            "",
            "Main",
            "a b",
            "a/b/c",
            "/a",
            "a/",
            "-a",
            ".hidden",
            "é",
            &"a".repeat(64),
            "a;drop",
        ] {
            assert!(validate_branch_name(n).is_err(), "{n:?} accepted");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("12h").unwrap(), Duration::from_secs(43200));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86400)
        );
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert!(parse_duration("soon").is_err());
    }
}
