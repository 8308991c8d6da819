//! Collision-free masking for unique columns (and the foreign keys that point at them).
//!
//! ## The problem
//!
//! A mask maps many inputs onto a smaller space: there are a few thousand fake first names, so
//! masking a unique `first_name` (or an email whose fake local part repeats) would produce
//! duplicates and the restore would fail on the unique index. Retrying "until it is free" while
//! streaming fixes collisions but makes the output depend on row order, and a foreign key in
//! another table, masked in another order, would get a different mapping and break its join.
//!
//! ## The approach: deterministic candidates, resolved canonically in two passes
//!
//! 1. Each input `x` has a sequence of candidates `c(x, 0), c(x, 1), ...`: attempt `a` seeds the
//!    generator with `HMAC(key, kind ‖ a ‖ x)`; from attempt [`SUFFIX_AFTER`](crate::mask) on,
//!    candidates also carry a suffix keyed by the input that grows every few attempts, so the
//!    candidate space always outgrows the column.
//! 2. **Observe** ([`UniqueMapper::observe`]): pass over every value of the *domain*, meaning the
//!    unique column together with every column joined to it by foreign keys. Only a 128-bit
//!    keyed digest of each distinct input is kept (no raw value, and no spill to disk).
//! 3. **Resolve** ([`UniqueMapper::finish`]): inputs are visited in the order of their digests,
//!    and each takes its first candidate not already taken. The order depends on the *set* of
//!    values and the key only, never on row or table order, so the result is deterministic.
//!    Almost every input keeps attempt 0; only the exceptions (input digest → attempt) are
//!    stored in the resulting [`UniqueMapping`].
//! 4. **Mask** ([`UniqueMapping::mask`]): `c(x, exceptions.get(x) or 0)`, the same function in
//!    every table of the domain, so foreign keys keep their joins and the unique column gets
//!    pairwise-distinct values: the map is injective by construction over the observed set.
//!
//! Taken outputs are remembered as 64-bit fingerprints. A fingerprint collision between two
//! different outputs only costs an unneeded retry (still deterministic), never a duplicate,
//! because equal outputs always have equal fingerprints. Distinct inputs are told apart by
//! 128-bit keyed digests; two inputs sharing one (probability around 2^-128 per pair) would be
//! treated as one.
//!
//! A composite unique constraint is satisfied when each masked column of it is injective, which
//! this gives; masks that cannot be injective (`null`, `constant`, `partial`, `json`) are
//! refused on unique columns by [`crate::schema::validate_against_schema`].

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};

use hmac::Mac;

use crate::error::MaskError;
use crate::mask::Masker;
use crate::rules::{Mask, MaskKind};
use crate::types::ColumnType;

/// How many candidates an input may try before the run fails for this column.
pub const MAX_ATTEMPTS: u32 = 64;

/// Whether a mask kind can be made injective over a column's values.
pub fn can_be_unique(kind: MaskKind) -> bool {
    !matches!(
        kind,
        MaskKind::Null | MaskKind::Constant | MaskKind::Partial | MaskKind::Json
    )
}

/// Pass 1 over a unique domain: collects the distinct inputs (as keyed digests).
#[derive(Debug)]
pub struct UniqueMapper {
    masker: Masker,
    mask: Mask,
    ty: ColumnType,
    inputs: HashSet<u128>,
}

impl UniqueMapper {
    /// `ty` must be the domain's common type (the smallest length limit among its columns, as
    /// the plan computes it), so that every column produces the very same values.
    pub fn new(masker: Masker, mask: Mask, ty: ColumnType) -> Self {
        Self {
            masker,
            mask,
            ty,
            inputs: HashSet::new(),
        }
    }

    /// Records one value of any column of the domain. NULLs need not be observed.
    pub fn observe(&mut self, value: &str) {
        let d = digest(&self.masker, value);
        self.inputs.insert(d);
    }

    /// How many distinct values were observed.
    pub fn distinct(&self) -> usize {
        self.inputs.len()
    }

    /// Resolves collisions. Needs the raw values again to compute candidates, so the caller
    /// passes them back in any order (typically a second `SELECT DISTINCT` stream); values
    /// never observed are ignored and every observed value must be given once.
    pub fn finish<'a>(
        self,
        values: impl IntoIterator<Item = &'a str>,
    ) -> Result<UniqueMapping, MaskError> {
        // Pair each observed digest with its value, then visit in digest order: the order
        // depends on the set of values and the key, not on how the rows were streamed.
        let mut by_digest: Vec<(u128, &'a str)> = Vec::with_capacity(self.inputs.len());
        let mut seen = HashSet::with_capacity(self.inputs.len());
        for v in values {
            let d = digest(&self.masker, v);
            if self.inputs.contains(&d) && seen.insert(d) {
                by_digest.push((d, v));
            }
        }
        by_digest.sort_unstable_by_key(|(d, _)| *d);
        // Every input's first candidate is a pure function of it: computed on all cores
        // first; the resolution below stays sequential (and so deterministic).
        let first = self.first_candidates(&by_digest);
        let mut taken: HashSet<u64> = HashSet::with_capacity(by_digest.len());
        let mut exceptions = HashMap::new();
        for ((d, v), first) in by_digest.into_iter().zip(first) {
            let mut attempt = 0;
            loop {
                let fp = if attempt == 0 {
                    first.clone()?
                } else {
                    let out = self.masker.mask_attempt(&self.mask, &self.ty, v, attempt)?;
                    fingerprint(out.as_deref())
                };
                if taken.insert(fp) {
                    if attempt > 0 {
                        exceptions.insert(d, attempt);
                    }
                    break;
                }
                attempt += 1;
                if attempt >= MAX_ATTEMPTS {
                    return Err(MaskError::UniqueExhausted {
                        kind: self.mask.kind().name(),
                        attempts: MAX_ATTEMPTS,
                    });
                }
            }
        }
        Ok(UniqueMapping {
            masker: self.masker,
            mask: self.mask,
            ty: self.ty,
            exceptions,
        })
    }
}

impl UniqueMapper {
    /// The fingerprint of each input's attempt-0 candidate, in `inputs`' order.
    fn first_candidates(&self, inputs: &[(u128, &str)]) -> Vec<Result<u64, MaskError>> {
        let one = |v: &str| {
            self.masker
                .mask_attempt(&self.mask, &self.ty, v, 0)
                .map(|o| fingerprint(o.as_deref()))
        };
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(8);
        if threads < 2 || inputs.len() < 4096 {
            return inputs.iter().map(|(_, v)| one(v)).collect();
        }
        let chunk = inputs.len().div_ceil(threads);
        std::thread::scope(|scope| {
            let handles: Vec<_> = inputs
                .chunks(chunk)
                .map(|part| {
                    scope.spawn(move || part.iter().map(|(_, v)| one(v)).collect::<Vec<_>>())
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| match h.join() {
                    Ok(v) => v,
                    // A panicking mask is a bug; surface it where the caller looks.
                    Err(_) => vec![Err(MaskError::UniqueExhausted {
                        kind: self.mask.kind().name(),
                        attempts: 0,
                    })],
                })
                .collect()
        })
    }
}

/// Pass 2: the collision-free mapping of one unique domain.
#[derive(Debug, Clone)]
pub struct UniqueMapping {
    masker: Masker,
    mask: Mask,
    ty: ColumnType,
    exceptions: HashMap<u128, u32>,
}

impl UniqueMapping {
    /// Masks a value of any column of the domain. NULL stays NULL.
    pub fn mask(&self, value: Option<&str>) -> Result<Option<String>, MaskError> {
        let Some(v) = value else { return Ok(None) };
        let attempt = if self.exceptions.is_empty() {
            0
        } else {
            self.exceptions
                .get(&digest(&self.masker, v))
                .copied()
                .unwrap_or(0)
        };
        self.masker.mask_attempt(&self.mask, &self.ty, v, attempt)
    }

    /// How many inputs needed another candidate than their first.
    pub fn exceptions(&self) -> usize {
        self.exceptions.len()
    }
}

/// A keyed 128-bit digest of an input: identifies distinct values without keeping them.
fn digest(masker: &Masker, value: &str) -> u128 {
    let mut mac = masker.keyed_mac();
    mac.update(b"stemma-anonymize/unique\0");
    mac.update(value.as_bytes());
    let out = mac.finalize().into_bytes();
    let mut b = [0u8; 16];
    b.copy_from_slice(&out[..16]);
    u128::from_be_bytes(b)
}

fn fingerprint(out: Option<&str>) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    out.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::SecretKey;
    use crate::rules::Locale;

    fn masker() -> Masker {
        Masker::new(SecretKey::from_bytes([7; 32]), Locale::En)
    }

    fn map_all(mask: Mask, ty: &str, inputs: &[String]) -> (UniqueMapping, Vec<String>) {
        let mut m = UniqueMapper::new(masker(), mask, ColumnType::parse(ty));
        for v in inputs {
            m.observe(v);
        }
        let mapping = m.finish(inputs.iter().map(String::as_str)).unwrap();
        let outs = inputs
            .iter()
            .map(|v| mapping.mask(Some(v)).unwrap().unwrap())
            .collect();
        (mapping, outs)
    }

    fn assert_distinct(outs: &[String]) {
        let set: HashSet<&String> = outs.iter().collect();
        assert_eq!(set.len(), outs.len(), "collisions in unique outputs");
    }

    #[test]
    fn first_names_over_100k_inputs_do_not_collide() {
        let inputs: Vec<String> = (0..100_000).map(|i| format!("person-{i}")).collect();
        let (mapping, outs) = map_all(Mask::FirstName, "varchar(40)", &inputs);
        assert_distinct(&outs);
        assert!(outs.iter().all(|o| o.chars().count() <= 40));
        // Most values still need a suffix (there are only ~3000 fake first names), yet the
        // first few thousand look entirely real.
        assert!(outs.iter().any(|o| o.chars().all(char::is_alphabetic)));
        assert!(mapping.exceptions() > 0);
    }

    #[test]
    fn emails_over_100k_inputs_do_not_collide_and_parse() {
        let inputs: Vec<String> = (0..100_000).map(|i| format!("u{i}@corp.test")).collect();
        let (_, outs) = map_all(Mask::Email, "varchar(60)", &inputs);
        assert_distinct(&outs);
        for o in &outs {
            let (local, domain) = o.split_once('@').unwrap();
            assert!(!local.is_empty() && domain.starts_with("example."), "{o}");
        }
    }

    #[test]
    fn hash_into_smallint_stays_unique_within_range() {
        let inputs: Vec<String> = (0..20_000).map(|i| i.to_string()).collect();
        let (_, outs) = map_all(Mask::Hash, "smallint", &inputs);
        assert_distinct(&outs);
        assert!(outs.iter().all(|o| o.parse::<i16>().is_ok_and(|v| v > 0)));
    }

    #[test]
    fn mapping_does_not_depend_on_order() {
        let inputs: Vec<String> = (0..5_000).map(|i| format!("n{i}")).collect();
        let (_, a) = map_all(Mask::LastName, "varchar(20)", &inputs);
        let mut reversed = inputs.clone();
        reversed.reverse();
        let (mapping, _) = map_all(Mask::LastName, "varchar(20)", &reversed);
        for (i, v) in inputs.iter().enumerate() {
            assert_eq!(mapping.mask(Some(v)).unwrap().unwrap(), a[i]);
        }
    }

    #[test]
    fn exhaustion_is_reported_without_values() {
        // Distinct texts of one number: 1% noise on a smallint rounds every candidate back to
        // 1, so no second distinct output exists.
        let inputs = ["1", "01", "001"];
        let mut m = UniqueMapper::new(
            masker(),
            Mask::NumberNoise { ratio: 0.01 },
            ColumnType::parse("smallint"),
        );
        for v in inputs {
            m.observe(v);
        }
        assert_eq!(m.distinct(), 3);
        let e = m.finish(inputs).unwrap_err();
        assert!(matches!(e, MaskError::UniqueExhausted { .. }), "{e}");
        assert!(!e.to_string().contains("01"), "{e}");
    }
}
