//! The mask kinds: deterministic functions of (secret key, kind, input value, attempt).
//!
//! ## Determinism
//!
//! Every random choice comes from a ChaCha20 generator seeded with
//! `HMAC-SHA256(key, "stemma-anonymize/1" ‖ kind ‖ attempt ‖ value)`. The seed depends on neither
//! the table nor the column, so one input value gets the same output wherever it appears (an
//! email in `customer.email`, in `invoice.contact` and inside a jsonb document alike), in every
//! run with the same key; without the key nobody can recompute the mapping (a plain hash of a
//! known email would be reversible by guessing). `attempt` is 0 except when a unique column
//! needs another candidate (see [`crate::unique`]).
//!
//! Values travel in PostgreSQL's text representation (what `COPY` reads and writes); `None` is
//! SQL NULL and every kind maps NULL to NULL.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use chrono::{Duration, NaiveDate};
use fake::rand::rngs::ChaCha20Rng;
use fake::rand::{RngExt, SeedableRng};
use fake::Fake;
use hmac::{KeyInit, Mac};

use crate::error::MaskError;
use crate::rules::{JsonPathMask, Locale, Mask, MaskKind, PathSegment};
use crate::types::{ColumnType, TypeKind};

/// The shortest column an `email` mask fits in: `a@example.com`.
pub const EMAIL_MIN_LEN: usize = 13;
/// The shortest column a `hash` token fits in (shorter tokens collide too easily).
pub const HASH_MIN_LEN: usize = 8;
/// The shortest column a `phone` mask fits in.
pub const PHONE_MIN_LEN: usize = 7;
/// The shortest column a `postal_code` mask fits in.
pub const POSTAL_MIN_LEN: usize = 4;
/// The shortest text column an `ip` mask fits in (`255.255.255.255`).
pub const IP_MIN_LEN: usize = 15;

/// From this attempt on, candidates carry a disambiguating suffix: a kind like `first_name` has
/// only a few thousand values, so retries alone cannot make 100k inputs distinct.
pub(crate) const SUFFIX_AFTER: u32 = 4;

/// The secret that makes masks unguessable. Stemma generates it once per installation and keeps
/// it out of every branch. `Debug` does not print it.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretKey([u8; 32]);

impl SecretKey {
    /// A fresh random key from the operating system's generator.
    pub fn generate() -> Self {
        use fake::rand::Rng;
        let mut k = [0u8; 32];
        fake::rand::rng().fill_bytes(&mut k);
        Self(k)
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Parses the 64-hex-digit form written by [`SecretKey::to_hex`].
    pub fn from_hex(hex: &str) -> Option<Self> {
        let hex = hex.trim();
        if hex.len() != 64 || !hex.is_ascii() {
            return None;
        }
        let mut k = [0u8; 32];
        for (i, b) in k.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Self(k))
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

/// Applies masks. Cheap to clone and share between threads (it holds the key and the locale).
#[derive(Clone)]
pub struct Masker {
    key: SecretKey,
    locale: Locale,
    /// HMAC-SHA256 with the key already absorbed: cloning it skips the two compressions of
    /// the key schedule on every value.
    mac: hmac::Hmac<sha2::Sha256>,
}

impl fmt::Debug for Masker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Masker")
            .field("key", &self.key)
            .field("locale", &self.locale)
            .finish()
    }
}

macro_rules! localized {
    ($locale:expr, $module:ident :: $faker:ident, $rng:expr) => {{
        use fake::faker::$module::raw::$faker;
        use fake::locales::*;
        let s: String = match $locale {
            Locale::En => $faker(EN).fake_with_rng($rng),
            Locale::FrFr => $faker(FR_FR).fake_with_rng($rng),
            Locale::DeDe => $faker(DE_DE).fake_with_rng($rng),
            Locale::ItIt => $faker(IT_IT).fake_with_rng($rng),
            Locale::NlNl => $faker(NL_NL).fake_with_rng($rng),
            Locale::PtBr => $faker(PT_BR).fake_with_rng($rng),
            Locale::PtPt => $faker(PT_PT).fake_with_rng($rng),
            Locale::JaJp => $faker(JA_JP).fake_with_rng($rng),
            Locale::ZhCn => $faker(ZH_CN).fake_with_rng($rng),
            Locale::ZhTw => $faker(ZH_TW).fake_with_rng($rng),
            Locale::ArSa => $faker(AR_SA).fake_with_rng($rng),
            Locale::TrTr => $faker(TR_TR).fake_with_rng($rng),
            Locale::FaIr => $faker(FA_IR).fake_with_rng($rng),
            Locale::CyGb => $faker(CY_GB).fake_with_rng($rng),
        };
        s
    }};
}

impl Masker {
    pub fn new(key: SecretKey, locale: Locale) -> Self {
        let mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(&key.0)
            .expect("HMAC accepts keys of any length");
        Self { key, locale, mac }
    }

    /// A keyed HMAC-SHA256, ready for input.
    pub(crate) fn keyed_mac(&self) -> hmac::Hmac<sha2::Sha256> {
        self.mac.clone()
    }

    pub fn locale(&self) -> Locale {
        self.locale
    }

    /// Masks one value of a column of type `ty`. `None` (NULL) stays NULL.
    ///
    /// For a column in a unique constraint (or joined by a foreign key to one), use
    /// [`crate::unique::UniqueMapper`] instead: it guarantees distinct outputs.
    pub fn mask(
        &self,
        mask: &Mask,
        ty: &ColumnType,
        value: Option<&str>,
    ) -> Result<Option<String>, MaskError> {
        match value {
            None => Ok(None),
            Some(v) => self.mask_attempt(mask, ty, v, 0),
        }
    }

    /// One candidate for `value`; `attempt > 0` gives other candidates (for unique columns).
    pub fn mask_attempt(
        &self,
        mask: &Mask,
        ty: &ColumnType,
        value: &str,
        attempt: u32,
    ) -> Result<Option<String>, MaskError> {
        let kind = mask.kind();
        let seed = self.seed(kind, value, attempt);
        let mut rng = ChaCha20Rng::from_seed(seed);
        let rng = &mut rng;
        let max = ty.max_len;
        let digits_suffix = suffix(&seed, attempt, DIGITS);
        let out = match mask {
            Mask::Keep => value.to_string(),
            Mask::Null => return Ok(None),
            Mask::Constant { value } => {
                if let Some(m) = max.filter(|&m| value.chars().count() > m) {
                    return Err(MaskError::TooShort {
                        kind: kind.name(),
                        needed: value.chars().count(),
                        max_len: m,
                    });
                }
                value.clone()
            }
            Mask::Hash => hash_token(kind, ty, &seed)?,
            Mask::Email => self.email(rng, &suffix(&seed, attempt, ALNUM), max)?,
            Mask::FirstName => {
                text_only(kind, ty)?;
                with_suffix(
                    localized!(self.locale, name::FirstName, rng),
                    &digits_suffix,
                    max,
                )
            }
            Mask::LastName => {
                text_only(kind, ty)?;
                with_suffix(
                    localized!(self.locale, name::LastName, rng),
                    &digits_suffix,
                    max,
                )
            }
            Mask::FullName => {
                text_only(kind, ty)?;
                let first = localized!(self.locale, name::FirstName, rng);
                let last = localized!(self.locale, name::LastName, rng);
                let full = format!("{first} {last}");
                // A short column keeps an initial rather than a cut-off surname.
                let full = match max {
                    Some(m) if full.chars().count() + digits_suffix.len() > m => {
                        let initial: String = first.chars().take(1).collect();
                        format!("{initial}. {last}")
                    }
                    _ => full,
                };
                with_suffix(full, &digits_suffix, max)
            }
            Mask::Phone => {
                text_only(kind, ty)?;
                need(kind, max, PHONE_MIN_LEN)?;
                let p = localized!(self.locale, phone_number::PhoneNumber, rng);
                match max {
                    Some(m) if p.chars().count() > m => {
                        // Too long for the column: plain digits, as many as fit (up to 10).
                        let n = m.min(10);
                        (0..n)
                            .map(|i| {
                                let d: u8 = if i == 0 {
                                    rng.random_range(2..10)
                                } else {
                                    rng.random_range(0..10)
                                };
                                char::from(b'0' + d)
                            })
                            .collect()
                    }
                    _ => p,
                }
            }
            Mask::StreetAddress => {
                text_only(kind, ty)?;
                let number = localized!(self.locale, address::BuildingNumber, rng);
                let street = localized!(self.locale, address::StreetName, rng);
                with_suffix(format!("{number} {street}"), &digits_suffix, max)
            }
            Mask::City => {
                text_only(kind, ty)?;
                with_suffix(
                    localized!(self.locale, address::CityName, rng),
                    &digits_suffix,
                    max,
                )
            }
            Mask::PostalCode => {
                text_only(kind, ty)?;
                need(kind, max, POSTAL_MIN_LEN)?;
                let p = localized!(self.locale, address::PostCode, rng);
                let p = match max {
                    Some(m) if p.chars().count() > m => (0..m.min(5))
                        .map(|_| char::from(b'0' + rng.random_range(0..10u8)))
                        .collect(),
                    _ => p,
                };
                with_suffix(p, &digits_suffix, max)
            }
            Mask::Company => {
                text_only(kind, ty)?;
                with_suffix(
                    localized!(self.locale, company::CompanyName, rng),
                    &digits_suffix,
                    max,
                )
            }
            Mask::Ip => ip(kind, ty, value, rng)?,
            Mask::Text => {
                text_only(kind, ty)?;
                let target = value.chars().count();
                let target = max.map_or(target, |m| target.min(m));
                let prose = self.prose(rng, target);
                if digits_suffix.is_empty() {
                    prose
                } else {
                    with_suffix(prose, &format!(" {digits_suffix}"), max)
                }
            }
            Mask::DateShift { max_days } => date_shift(kind, ty, value, *max_days, rng)?,
            Mask::NumberNoise { ratio } => number_noise(kind, ty, value, *ratio, rng)?,
            Mask::Partial {
                keep_first,
                keep_last,
                fill,
            } => {
                text_only(kind, ty)?;
                fit(&partial(value, *keep_first, *keep_last, *fill), max)
            }
            Mask::Json { paths } => self.json(kind, ty, value, paths, attempt)?,
        };
        Ok(Some(out))
    }

    fn seed(&self, kind: MaskKind, value: &str, attempt: u32) -> [u8; 32] {
        let mut mac = self.keyed_mac();
        mac.update(b"stemma-anonymize/1\0");
        mac.update(kind.name().as_bytes());
        mac.update(b"\0");
        mac.update(&attempt.to_be_bytes());
        mac.update(value.as_bytes());
        let out = mac.finalize().into_bytes();
        let mut seed = [0u8; 32];
        seed.copy_from_slice(&out[..32]);
        seed
    }

    /// `first.last[NN][suffix]@example.{com,net,org}`: ASCII whatever the locale, and under the
    /// domains reserved for examples (RFC 2606) so that no masked address can reach a real
    /// mailbox from a developer's branch.
    fn email(
        &self,
        rng: &mut ChaCha20Rng,
        suffix: &str,
        max: Option<usize>,
    ) -> Result<String, MaskError> {
        need(MaskKind::Email, max, EMAIL_MIN_LEN)?;
        let ascii = |s: String| -> String {
            s.chars()
                .filter(|c| c.is_ascii_alphabetic())
                .map(|c| c.to_ascii_lowercase())
                .collect()
        };
        let first = ascii(localized!(Locale::En, name::FirstName, rng));
        let last = ascii(localized!(Locale::En, name::LastName, rng));
        let mut local = match rng.random_range(0..4u8) {
            0 => format!("{first}{last}"),
            1 => format!("{}{last}", first.chars().next().unwrap_or('x')),
            2 => format!("{first}.{last}{}", rng.random_range(1..100u8)),
            _ => format!("{first}.{last}"),
        };
        let domains = ["example.com", "example.net", "example.org"];
        let domain = domains[rng.random_range(0..domains.len())];
        local.push_str(suffix);
        if let Some(m) = max {
            let room = m.saturating_sub(domain.len() + 1);
            if local.len() > room {
                // Keep the suffix: it is what makes the address unique.
                let keep = room.saturating_sub(suffix.len()).max(1);
                let head: String = local.chars().take(keep).collect();
                let head = head.trim_end_matches('.').to_string();
                local = format!("{head}{suffix}");
                local = local.chars().take(room.max(1)).collect();
            }
        }
        Ok(format!("{local}@{domain}"))
    }

    /// Lorem-ipsum sentences of exactly `target` characters (fewer only when `target` < 1).
    fn prose(&self, rng: &mut ChaCha20Rng, target: usize) -> String {
        if target == 0 {
            return String::new();
        }
        let mut out = String::new();
        let mut sentence_left = 0u32;
        while out.chars().count() < target {
            let word = localized!(self.locale, lorem::Word, rng);
            if sentence_left == 0 {
                if !out.is_empty() {
                    out.push_str(". ");
                }
                let mut c = word.chars();
                if let Some(first) = c.next() {
                    out.extend(first.to_uppercase());
                    out.push_str(c.as_str());
                }
                sentence_left = rng.random_range(4..12);
            } else {
                out.push(' ');
                out.push_str(&word);
                sentence_left -= 1;
            }
        }
        let mut cut: String = out.chars().take(target).collect();
        if target > 3 {
            // End on a full stop when there is room, as prose does.
            cut = cut.chars().take(target - 1).collect::<String>();
            let trimmed = cut.trim_end().to_string();
            cut = format!("{trimmed}.");
            while cut.chars().count() < target {
                cut.insert(cut.len() - 1, 'a');
            }
        }
        cut
    }

    fn json(
        &self,
        kind: MaskKind,
        ty: &ColumnType,
        value: &str,
        paths: &[JsonPathMask],
        attempt: u32,
    ) -> Result<String, MaskError> {
        if !matches!(ty.kind, TypeKind::Json | TypeKind::Jsonb | TypeKind::Text) {
            return Err(unsupported(kind, ty));
        }
        let mut doc: serde_json::Value =
            serde_json::from_str(value).map_err(|_| MaskError::InvalidValue {
                kind: kind.name(),
                expected: "JSON",
            })?;
        for p in paths {
            // `null` and `constant` replace whatever the path reaches, subtree included; the
            // other kinds mask each scalar below it.
            let whole = matches!(p.mask, Mask::Null | Mask::Constant { .. });
            walk(&mut doc, &p.path.segments, whole, &mut |leaf| {
                self.mask_json_leaf(&p.mask, leaf, attempt)
            })?;
        }
        let out = serde_json::to_string(&doc).map_err(|_| MaskError::InvalidValue {
            kind: kind.name(),
            expected: "JSON",
        })?;
        if let Some(m) = ty.max_len.filter(|&m| out.chars().count() > m) {
            return Err(MaskError::TooShort {
                kind: kind.name(),
                needed: out.chars().count(),
                max_len: m,
            });
        }
        Ok(out)
    }

    /// Masks one scalar inside a JSON document, with the same mapping as a column would get.
    fn mask_json_leaf(
        &self,
        mask: &Mask,
        leaf: &mut serde_json::Value,
        attempt: u32,
    ) -> Result<(), MaskError> {
        use serde_json::Value;
        let text = ColumnType::text();
        let new = match (&*leaf, mask) {
            (_, Mask::Keep) | (Value::Null, _) => return Ok(()),
            (_, Mask::Null) => Value::Null,
            (_, Mask::Constant { value }) => Value::String(value.clone()),
            (Value::String(s), m) => match self.mask_attempt(m, &text, s, attempt)? {
                Some(v) => Value::String(v),
                None => Value::Null,
            },
            (Value::Number(n), Mask::NumberNoise { .. }) => {
                let num = ColumnType::parse("numeric");
                let s = self
                    .mask_attempt(mask, &num, &n.to_string(), attempt)?
                    .unwrap_or_default();
                serde_json::from_str::<Value>(&s).unwrap_or(Value::Null)
            }
            // A bool carries no personal data; text-shaped kinds leave it alone.
            (Value::Bool(_), m) if !matches!(m, Mask::Hash | Mask::Constant { .. }) => {
                return Ok(())
            }
            // Numbers and bools under string kinds (a phone stored as a number, say) become
            // masked strings: safer than leaving them.
            (other, m) => {
                let s = match other {
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    _ => return Ok(()),
                };
                match self.mask_attempt(m, &text, &s, attempt)? {
                    Some(v) => Value::String(v),
                    None => Value::Null,
                }
            }
        };
        *leaf = new;
        Ok(())
    }
}

/// Whether `mask` can produce values of `ty` at all, judged from the type alone (before any
/// row is read). [`crate::schema::validate_against_schema`] reports these as rule errors.
pub fn check_type(mask: &Mask, ty: &ColumnType) -> Result<(), MaskError> {
    let kind = mask.kind();
    let max = ty.max_len;
    match mask {
        Mask::Keep | Mask::Null => Ok(()),
        Mask::Constant { value } => check_constant(value, ty),
        Mask::Hash => match ty.kind {
            TypeKind::Text => need(kind, max, HASH_MIN_LEN),
            TypeKind::Uuid | TypeKind::Integer(_) | TypeKind::Numeric { .. } | TypeKind::Bytea => {
                Ok(())
            }
            _ => Err(unsupported(kind, ty)),
        },
        Mask::Email => text_only(kind, ty).and(need(kind, max, EMAIL_MIN_LEN)),
        Mask::Phone => text_only(kind, ty).and(need(kind, max, PHONE_MIN_LEN)),
        Mask::PostalCode => text_only(kind, ty).and(need(kind, max, POSTAL_MIN_LEN)),
        Mask::FirstName
        | Mask::LastName
        | Mask::FullName
        | Mask::StreetAddress
        | Mask::City
        | Mask::Company
        | Mask::Text
        | Mask::Partial { .. } => text_only(kind, ty),
        Mask::Ip => match ty.kind {
            TypeKind::Inet | TypeKind::Cidr => Ok(()),
            TypeKind::Text => need(kind, max, IP_MIN_LEN),
            _ => Err(unsupported(kind, ty)),
        },
        Mask::DateShift { .. } => match ty.kind {
            TypeKind::Date | TypeKind::Timestamp | TypeKind::TimestampTz | TypeKind::Text => Ok(()),
            _ => Err(unsupported(kind, ty)),
        },
        Mask::NumberNoise { .. } => match ty.kind {
            TypeKind::Integer(_) | TypeKind::Numeric { .. } | TypeKind::Float | TypeKind::Text => {
                Ok(())
            }
            _ => Err(unsupported(kind, ty)),
        },
        Mask::Json { .. } => match ty.kind {
            TypeKind::Json | TypeKind::Jsonb => Ok(()),
            TypeKind::Text if max.is_none() => Ok(()),
            _ => Err(unsupported(kind, ty)),
        },
    }
}

fn check_constant(value: &str, ty: &ColumnType) -> Result<(), MaskError> {
    let bad = || MaskError::UnsupportedType {
        kind: "constant",
        ty: ty.name.clone(),
    };
    let ok = match ty.kind {
        TypeKind::Text => {
            if let Some(m) = ty.max_len.filter(|&m| value.chars().count() > m) {
                return Err(MaskError::TooShort {
                    kind: "constant",
                    needed: value.chars().count(),
                    max_len: m,
                });
            }
            true
        }
        TypeKind::Integer(bits) => value
            .trim()
            .parse::<i64>()
            .is_ok_and(|v| int_range(bits).contains(&(v as i128))),
        TypeKind::Numeric { .. } | TypeKind::Float => value.trim().parse::<f64>().is_ok(),
        TypeKind::Date | TypeKind::Timestamp | TypeKind::TimestampTz => split_date(value).is_some(),
        TypeKind::Inet | TypeKind::Cidr => parse_ip(value).is_some(),
        TypeKind::Json | TypeKind::Jsonb => {
            serde_json::from_str::<serde_json::Value>(value).is_ok()
        }
        TypeKind::Uuid => {
            value.len() == 36 && value.chars().filter(|c| c.is_ascii_hexdigit()).count() == 32
        }
        TypeKind::Boolean => matches!(
            value.trim().to_ascii_lowercase().as_str(),
            "t" | "f" | "true" | "false" | "yes" | "no" | "on" | "off" | "1" | "0"
        ),
        TypeKind::Bytea | TypeKind::Other => true,
    };
    if ok {
        Ok(())
    } else {
        Err(bad())
    }
}

const DIGITS: &[u8] = b"0123456789";
const ALNUM: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";

/// The disambiguating suffix of a candidate: empty for the first attempts, then growing by one
/// character every four attempts so that the space of candidates outgrows any column.
fn suffix(seed: &[u8; 32], attempt: u32, alphabet: &[u8]) -> String {
    if attempt < SUFFIX_AFTER {
        return String::new();
    }
    let len = (2 + (attempt - SUFFIX_AFTER) / 4).min(16) as usize;
    seed.iter()
        .take(len)
        .map(|b| char::from(alphabet[*b as usize % alphabet.len()]))
        .collect()
}

/// At most `max` characters, cut at a character boundary without trailing blanks.
pub(crate) fn fit(s: &str, max: Option<usize>) -> String {
    match max {
        Some(m) if s.chars().count() > m => s.chars().take(m).collect::<String>().trim_end().into(),
        _ => s.to_string(),
    }
}

/// `base` shortened so that `base + suffix` fits in `max`.
fn with_suffix(base: String, suffix: &str, max: Option<usize>) -> String {
    if suffix.is_empty() {
        return fit(&base, max);
    }
    let room = max.map(|m| m.saturating_sub(suffix.chars().count()));
    fit(&format!("{}{suffix}", fit(&base, room)), max)
}

fn text_only(kind: MaskKind, ty: &ColumnType) -> Result<(), MaskError> {
    if ty.is_text() {
        Ok(())
    } else {
        Err(unsupported(kind, ty))
    }
}

fn need(kind: MaskKind, max: Option<usize>, needed: usize) -> Result<(), MaskError> {
    match max {
        Some(m) if m < needed => Err(MaskError::TooShort {
            kind: kind.name(),
            needed,
            max_len: m,
        }),
        _ => Ok(()),
    }
}

fn unsupported(kind: MaskKind, ty: &ColumnType) -> MaskError {
    MaskError::UnsupportedType {
        kind: kind.name(),
        ty: ty.name.clone(),
    }
}

fn int_range(bits: u8) -> std::ops::RangeInclusive<i128> {
    match bits {
        16 => i16::MIN as i128..=i16::MAX as i128,
        32 => i32::MIN as i128..=i32::MAX as i128,
        _ => i64::MIN as i128..=i64::MAX as i128,
    }
}

fn hash_token(kind: MaskKind, ty: &ColumnType, seed: &[u8; 32]) -> Result<String, MaskError> {
    let hex: String = seed.iter().map(|b| format!("{b:02x}")).collect();
    let n = u64::from_be_bytes([
        seed[0], seed[1], seed[2], seed[3], seed[4], seed[5], seed[6], seed[7],
    ]);
    Ok(match ty.kind {
        TypeKind::Text => {
            need(kind, ty.max_len, HASH_MIN_LEN)?;
            fit(&hex, ty.max_len)
        }
        TypeKind::Uuid => {
            // Shaped as a version-4 UUID so that tools reading the column see a valid one.
            let mut b = [0u8; 16];
            b.copy_from_slice(&seed[..16]);
            b[6] = (b[6] & 0x0f) | 0x40;
            b[8] = (b[8] & 0x3f) | 0x80;
            let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
            format!(
                "{}-{}-{}-{}-{}",
                &h[..8],
                &h[8..12],
                &h[12..16],
                &h[16..20],
                &h[20..]
            )
        }
        TypeKind::Integer(bits) => {
            // A positive number within the type: ids stay valid keys.
            let max = *int_range(bits).end() as u64;
            (n % max + 1).to_string()
        }
        TypeKind::Numeric { precision, scale } => {
            let int_digits = precision
                .map(|p| p.saturating_sub(scale.unwrap_or(0)))
                .unwrap_or(18)
                .clamp(1, 18);
            (n % 10u64.pow(int_digits)).to_string()
        }
        TypeKind::Bytea => format!("\\x{hex}"),
        _ => return Err(unsupported(kind, ty)),
    })
}

/// Replaces the letters and digits between the kept ends with `fill`; separators stay, so a
/// phone or card number keeps its shape. A value no longer than the kept ends is masked
/// entirely: keeping all of it would reveal it.
fn partial(value: &str, keep_first: usize, keep_last: usize, fill: char) -> String {
    let chars: Vec<char> = value.chars().collect();
    let n = chars.len();
    let whole = n <= keep_first + keep_last;
    chars
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            let kept = !whole && (i < keep_first || i >= n - keep_last);
            if kept || !c.is_alphanumeric() {
                c
            } else {
                fill
            }
        })
        .collect()
}

fn parse_ip(value: &str) -> Option<(IpAddr, Option<u8>)> {
    let v = value.trim();
    let (addr, prefix) = match v.split_once('/') {
        Some((a, p)) => (a, Some(p.parse::<u8>().ok()?)),
        None => (v, None),
    };
    Some((addr.parse().ok()?, prefix))
}

/// An address of the same family; a prefix (`/24`) is kept, and host bits are zeroed for
/// `cidr`. IPv6 addresses land in the documentation range `2001:db8::/32`.
fn ip(
    kind: MaskKind,
    ty: &ColumnType,
    value: &str,
    rng: &mut ChaCha20Rng,
) -> Result<String, MaskError> {
    if !matches!(ty.kind, TypeKind::Inet | TypeKind::Cidr | TypeKind::Text) {
        return Err(unsupported(kind, ty));
    }
    let (addr, prefix) = parse_ip(value).ok_or(MaskError::InvalidValue {
        kind: kind.name(),
        expected: "an IP address",
    })?;
    let cidr = ty.kind == TypeKind::Cidr;
    let out = match addr {
        IpAddr::V4(_) => {
            let mut b: [u8; 4] = rng.random();
            // Stay out of 0/8, 10/8, 127/8 and multicast/reserved space.
            b[0] = 1 + b[0] % 223;
            if matches!(b[0], 10 | 127) {
                b[0] += 1;
            }
            let mut bits = u32::from_be_bytes(b);
            if let (true, Some(p)) = (cidr, prefix) {
                bits &= u32::MAX.checked_shl(32 - u32::from(p.min(32))).unwrap_or(0);
            }
            IpAddr::V4(Ipv4Addr::from(bits))
        }
        IpAddr::V6(_) => {
            let mut b: [u8; 16] = rng.random();
            b[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
            let mut bits = u128::from_be_bytes(b);
            if let (true, Some(p)) = (cidr, prefix) {
                bits &= u128::MAX
                    .checked_shl(128 - u32::from(p.min(128)))
                    .unwrap_or(0);
            }
            IpAddr::V6(Ipv6Addr::from(bits))
        }
    };
    let s = match prefix {
        Some(p) => format!("{out}/{p}"),
        None => out.to_string(),
    };
    if let Some(m) = ty.max_len.filter(|&m| s.chars().count() > m) {
        return Err(MaskError::TooShort {
            kind: kind.name(),
            needed: s.chars().count(),
            max_len: m,
        });
    }
    Ok(s)
}

/// Splits `2024-02-29 10:00:00+01` into the date and the rest (kept verbatim).
fn split_date(value: &str) -> Option<(NaiveDate, &str)> {
    let head = value.get(..10)?;
    let date = NaiveDate::parse_from_str(head, "%Y-%m-%d").ok()?;
    Some((date, &value[10..]))
}

/// Shifts the date part by a non-zero number of days in `[-max_days, max_days]`; the time of
/// day, fractional seconds and zone are kept as written, so every date/timestamp text form that
/// starts with an ISO date works.
fn date_shift(
    kind: MaskKind,
    ty: &ColumnType,
    value: &str,
    max_days: u32,
    rng: &mut ChaCha20Rng,
) -> Result<String, MaskError> {
    if !matches!(
        ty.kind,
        TypeKind::Date | TypeKind::Timestamp | TypeKind::TimestampTz | TypeKind::Text
    ) {
        return Err(unsupported(kind, ty));
    }
    if matches!(value, "infinity" | "-infinity") {
        return Ok(value.to_string());
    }
    let (date, rest) = split_date(value).ok_or(MaskError::InvalidValue {
        kind: kind.name(),
        expected: "a date or timestamp",
    })?;
    let magnitude = i64::from(rng.random_range(1..=max_days.max(1)));
    let days = if rng.random::<bool>() {
        magnitude
    } else {
        -magnitude
    };
    let shifted = date
        .checked_add_signed(Duration::days(days))
        .or_else(|| date.checked_add_signed(Duration::days(-days)))
        .ok_or(MaskError::InvalidValue {
            kind: kind.name(),
            expected: "a date within the representable range",
        })?;
    Ok(fit(
        &format!("{}{rest}", shifted.format("%Y-%m-%d")),
        ty.max_len,
    ))
}

/// Multiplies by a factor in `[1 - ratio, 1 + ratio]`, keeping the input's number of decimals
/// and the column's range.
fn number_noise(
    kind: MaskKind,
    ty: &ColumnType,
    value: &str,
    ratio: f64,
    rng: &mut ChaCha20Rng,
) -> Result<String, MaskError> {
    let v = value.trim();
    if matches!(v, "NaN" | "Infinity" | "-Infinity") {
        return Ok(v.to_string());
    }
    let invalid = MaskError::InvalidValue {
        kind: kind.name(),
        expected: "a number",
    };
    let x: f64 = v.parse().map_err(|_| invalid.clone())?;
    if !x.is_finite() {
        return Err(invalid);
    }
    let factor = 1.0 + ratio * (2.0 * rng.random::<f64>() - 1.0);
    let y = x * factor;
    match ty.kind {
        TypeKind::Integer(bits) => {
            let r = int_range(bits);
            let y = (y.round() as i128).clamp(*r.start(), *r.end());
            Ok(y.to_string())
        }
        TypeKind::Numeric { .. } | TypeKind::Text | TypeKind::Float => {
            let decimals = if ty.kind == TypeKind::Float || v.contains(['e', 'E']) {
                None
            } else {
                Some(v.split_once('.').map_or(0, |(_, f)| f.len()))
            };
            let y = match ty.kind {
                TypeKind::Numeric {
                    precision: Some(p),
                    scale,
                } => {
                    // Stay below 10^(p - s), the largest magnitude numeric(p, s) stores.
                    let s = scale.unwrap_or(0);
                    let limit = 10f64.powi(p.saturating_sub(s) as i32) - 10f64.powi(-(s as i32));
                    y.clamp(-limit, limit)
                }
                _ => y,
            };
            Ok(match decimals {
                Some(d) => format!("{y:.d$}"),
                None => format!("{y}"),
            })
        }
        _ => Err(unsupported(kind, ty)),
    }
}

/// Applies `f` to every scalar reached by `path` (all scalars below it when it ends on an
/// object or array). Missing members are skipped: documents differ from row to row.
fn walk(
    v: &mut serde_json::Value,
    path: &[PathSegment],
    whole: bool,
    f: &mut dyn FnMut(&mut serde_json::Value) -> Result<(), MaskError>,
) -> Result<(), MaskError> {
    use serde_json::Value;
    match path.split_first() {
        None if whole => f(v),
        None => match v {
            Value::Object(m) => m.values_mut().try_for_each(|c| walk(c, path, whole, f)),
            Value::Array(a) => a.iter_mut().try_for_each(|c| walk(c, path, whole, f)),
            scalar => f(scalar),
        },
        Some((seg, rest)) => match (seg, v) {
            (PathSegment::Key(k), Value::Object(m)) => match m.get_mut(k) {
                Some(c) => walk(c, rest, whole, f),
                None => Ok(()),
            },
            (PathSegment::Index(i), Value::Array(a)) => match a.get_mut(*i) {
                Some(c) => walk(c, rest, whole, f),
                None => Ok(()),
            },
            (PathSegment::Any, Value::Object(m)) => {
                m.values_mut().try_for_each(|c| walk(c, rest, whole, f))
            }
            (PathSegment::Any, Value::Array(a)) => {
                a.iter_mut().try_for_each(|c| walk(c, rest, whole, f))
            }
            _ => Ok(()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::JsonPath;

    fn masker() -> Masker {
        Masker::new(SecretKey::from_bytes([42; 32]), Locale::En)
    }

    fn m(mask: &Mask, ty: &str, v: &str) -> String {
        masker()
            .mask(mask, &ColumnType::parse(ty), Some(v))
            .unwrap()
            .unwrap()
    }

    const FAKE_KINDS: &[Mask] = &[
        Mask::Hash,
        Mask::Email,
        Mask::FirstName,
        Mask::LastName,
        Mask::FullName,
        Mask::Phone,
        Mask::StreetAddress,
        Mask::City,
        Mask::PostalCode,
        Mask::Company,
        Mask::Text,
    ];

    #[test]
    fn every_kind_is_deterministic_and_key_dependent() {
        let other = Masker::new(SecretKey::from_bytes([43; 32]), Locale::En);
        for mask in FAKE_KINDS {
            let inputs = ["alice@corp.test", "Bob Smith", "12 Main St, Springfield"];
            let a: Vec<String> = inputs.iter().map(|v| m(mask, "text", v)).collect();
            let b: Vec<String> = inputs.iter().map(|v| m(mask, "text", v)).collect();
            assert_eq!(a, b, "{mask}");
            let c: Vec<String> = inputs
                .iter()
                .map(|v| {
                    other
                        .mask(mask, &ColumnType::text(), Some(v))
                        .unwrap()
                        .unwrap()
                })
                .collect();
            assert_ne!(a, c, "{mask} must depend on the key");
            // Masked, not copied.
            for (i, v) in inputs.iter().enumerate() {
                assert_ne!(&a[i], v, "{mask}");
            }
        }
    }

    #[test]
    fn same_value_same_output_across_column_types_of_one_family() {
        // varchar(60) and text differ only in length limit: a short output is identical.
        assert_eq!(
            m(&Mask::Email, "varchar(60)", "x@y.z"),
            m(&Mask::Email, "text", "x@y.z")
        );
    }

    #[test]
    fn length_limits_hold_for_every_text_kind() {
        for mask in FAKE_KINDS {
            let min = match mask {
                Mask::Email => EMAIL_MIN_LEN,
                Mask::Hash => HASH_MIN_LEN,
                Mask::Phone => PHONE_MIN_LEN,
                Mask::PostalCode => POSTAL_MIN_LEN,
                _ => 1,
            };
            for limit in [min, min + 1, 10.max(min), 20, 40] {
                let ty = format!("varchar({limit})");
                for i in 0..200 {
                    let v = format!("input number {i} with some length to it");
                    let out = m(mask, &ty, &v);
                    assert!(
                        out.chars().count() <= limit,
                        "{mask} gave {} chars for varchar({limit})",
                        out.chars().count()
                    );
                    assert!(!out.is_empty(), "{mask}");
                }
            }
            if min > 1 {
                let e = masker()
                    .mask(
                        mask,
                        &ColumnType::parse(&format!("varchar({})", min - 1)),
                        Some("v"),
                    )
                    .unwrap_err();
                assert!(matches!(e, MaskError::TooShort { .. }), "{mask}: {e}");
            }
        }
    }

    #[test]
    fn emails_look_real_and_are_safe() {
        for i in 0..500 {
            let e = m(&Mask::Email, "varchar(60)", &format!("user{i}@corp.test"));
            let (local, domain) = e.split_once('@').unwrap();
            assert!(!local.is_empty() && local.is_ascii(), "{e}");
            assert!(!local.starts_with('.') && !local.ends_with('.'), "{e}");
            assert!(
                ["example.com", "example.net", "example.org"].contains(&domain),
                "{e}"
            );
            assert!(
                local.chars().all(|c| c.is_ascii_alphanumeric() || c == '.'),
                "{e}"
            );
        }
        let tight = m(&Mask::Email, "varchar(13)", "someone@corp.test");
        assert_eq!(tight.len(), 13, "{tight}");
    }

    #[test]
    fn names_phones_addresses_look_real() {
        let first = m(&Mask::FirstName, "text", "Jane");
        assert!(first.chars().next().unwrap().is_uppercase(), "{first}");
        let full = m(&Mask::FullName, "text", "Jane Doe");
        assert!(full.contains(' '), "{full}");
        for i in 0..100 {
            let p = m(&Mask::Phone, "varchar(24)", &format!("+1 555 {i:04}"));
            assert!(p.chars().filter(char::is_ascii_digit).count() >= 7, "{p}");
            let p = m(&Mask::Phone, "varchar(8)", &format!("{i}"));
            assert!(p.chars().all(|c| c.is_ascii_digit()) && p.len() <= 8, "{p}");
        }
        let addr = m(&Mask::StreetAddress, "varchar(70)", "1 Infinite Loop");
        assert!(addr.chars().next().unwrap().is_ascii_digit(), "{addr}");
        let zip = m(&Mask::PostalCode, "varchar(10)", "94043");
        assert!(zip.chars().any(|c| c.is_ascii_digit()), "{zip}");
        let fr = Masker::new(SecretKey::from_bytes([42; 32]), Locale::FrFr);
        assert!(fr
            .mask(&Mask::City, &ColumnType::text(), Some("Lyon"))
            .unwrap()
            .is_some());
    }

    #[test]
    fn text_keeps_the_length() {
        for len in [0usize, 1, 2, 5, 17, 80, 400] {
            let v: String = "x".repeat(len);
            let out = m(&Mask::Text, "text", &v);
            assert_eq!(out.chars().count(), len, "{out:?}");
        }
        let out = m(&Mask::Text, "varchar(30)", &"y".repeat(100));
        assert_eq!(out.chars().count(), 30);
        assert!(out.ends_with('.') && out.contains(' '), "{out}");
    }

    #[test]
    fn hash_fits_each_type() {
        let h = m(&Mask::Hash, "text", "a");
        assert_eq!(h.len(), 64);
        assert!(h.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(m(&Mask::Hash, "varchar(8)", "a").len(), 8);
        let u = m(&Mask::Hash, "uuid", "a");
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        for ty in ["smallint", "integer", "bigint"] {
            let n: i64 = m(&Mask::Hash, ty, "a").parse().unwrap();
            assert!(n > 0);
        }
        assert!(m(&Mask::Hash, "smallint", "a").parse::<i16>().is_ok());
        assert!(m(&Mask::Hash, "numeric(5,2)", "a").parse::<u32>().unwrap() < 1000);
        assert!(m(&Mask::Hash, "bytea", "\\x00").starts_with("\\x"));
        assert!(check_type(&Mask::Hash, &ColumnType::parse("date")).is_err());
    }

    #[test]
    fn date_shift_keeps_format_and_range() {
        let mask = Mask::DateShift { max_days: 30 };
        for (ty, v) in [
            ("date", "2020-02-29"),
            ("timestamp", "2020-02-29 13:45:01.123456"),
            ("timestamptz", "2020-02-29 13:45:01+05:30"),
            ("text", "2020-02-29T13:45:01Z"),
        ] {
            let out = m(&mask, ty, v);
            assert_eq!(&out[10..], &v[10..], "{out}");
            let d = NaiveDate::parse_from_str(&out[..10], "%Y-%m-%d").unwrap();
            let orig = NaiveDate::parse_from_str(&v[..10], "%Y-%m-%d").unwrap();
            let diff = (d - orig).num_days().abs();
            assert!((1..=30).contains(&diff), "{diff}");
        }
        assert_eq!(m(&mask, "date", "infinity"), "infinity");
        // Deterministic per value: two rows with the same birth date shift alike.
        assert_eq!(
            m(&mask, "date", "1990-01-01"),
            m(&mask, "date", "1990-01-01")
        );
        assert!(check_type(&mask, &ColumnType::parse("integer")).is_err());
    }

    #[test]
    fn number_noise_respects_types() {
        let mask = Mask::NumberNoise { ratio: 0.1 };
        for i in 1..200 {
            let v = (i * 1000).to_string();
            let out: i64 = m(&mask, "integer", &v).parse().unwrap();
            let x = i * 1000;
            assert!(
                (out - x).abs() as f64 <= x as f64 * 0.1 + 1.0,
                "{x} -> {out}"
            );
        }
        assert_eq!(
            m(&mask, "smallint", "32767").parse::<i16>().map(|_| ()),
            Ok(())
        );
        let out = m(&mask, "numeric(10,2)", "1234.50");
        assert_eq!(out.split_once('.').unwrap().1.len(), 2, "{out}");
        let out = m(&Mask::NumberNoise { ratio: 1.0 }, "numeric(4,2)", "99.99");
        assert!(out.parse::<f64>().unwrap() < 100.0, "{out}");
        assert!(m(&mask, "double precision", "1.5e3").parse::<f64>().is_ok());
        assert_eq!(m(&mask, "numeric", "NaN"), "NaN");
    }

    #[test]
    fn partial_keeps_the_ends_and_the_shape() {
        let p = |f, l, v| {
            m(
                &Mask::Partial {
                    keep_first: f,
                    keep_last: l,
                    fill: '*',
                },
                "text",
                v,
            )
        };
        assert_eq!(p(0, 2, "+1 555-0100"), "+* ***-**00");
        assert_eq!(p(1, 4, "4111 1111 1111 1234"), "4*** **** **** 1234");
        // Too short to keep anything without revealing it all.
        assert_eq!(p(2, 2, "abcd"), "****");
    }

    #[test]
    fn ip_keeps_family_and_prefix() {
        let v4 = m(&Mask::Ip, "inet", "192.168.1.7");
        assert!(v4.parse::<Ipv4Addr>().is_ok(), "{v4}");
        assert_ne!(v4, "192.168.1.7");
        let v6 = m(&Mask::Ip, "inet", "fe80::1");
        assert!(
            v6.parse::<Ipv6Addr>().unwrap().segments()[0] == 0x2001,
            "{v6}"
        );
        let net = m(&Mask::Ip, "cidr", "10.1.2.0/24");
        let (a, p) = net.split_once('/').unwrap();
        assert_eq!(p, "24");
        assert!(a.ends_with(".0"), "{net}");
        assert!(m(&Mask::Ip, "varchar(15)", "8.8.8.8").len() <= 15);
    }

    #[test]
    fn constant_null_keep() {
        assert_eq!(
            m(
                &Mask::Constant {
                    value: "REDACTED".into()
                },
                "text",
                "x"
            ),
            "REDACTED"
        );
        assert_eq!(
            masker()
                .mask(&Mask::Null, &ColumnType::text(), Some("x"))
                .unwrap(),
            None
        );
        assert_eq!(m(&Mask::Keep, "text", "same"), "same");
        for mask in FAKE_KINDS {
            assert_eq!(
                masker().mask(mask, &ColumnType::text(), None).unwrap(),
                None
            );
        }
        assert!(check_type(
            &Mask::Constant { value: "x".into() },
            &ColumnType::parse("integer")
        )
        .is_err());
        assert!(check_type(
            &Mask::Constant {
                value: "toolong".into()
            },
            &ColumnType::parse("varchar(3)")
        )
        .is_err());
    }

    #[test]
    fn json_masks_paths_consistently_with_columns() {
        let mask = Mask::Json {
            paths: vec![
                JsonPathMask {
                    path: JsonPath::parse("$.contact.email").unwrap(),
                    mask: Mask::Email,
                },
                JsonPathMask {
                    path: JsonPath::parse("phones[*]").unwrap(),
                    mask: Mask::Phone,
                },
                JsonPathMask {
                    path: JsonPath::parse("tags").unwrap(),
                    mask: Mask::Null,
                },
                JsonPathMask {
                    path: JsonPath::parse("score").unwrap(),
                    mask: Mask::NumberNoise { ratio: 0.5 },
                },
            ],
        };
        let doc = r#"{"contact":{"email":"jane@corp.test","name":"Jane"},"phones":["555-0100","555-0101"],"tags":["a"],"score":10,"missing":1}"#;
        let out = m(&mask, "jsonb", doc);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            v["contact"]["email"].as_str().unwrap(),
            m(&Mask::Email, "text", "jane@corp.test"),
            "an email inside json maps like the same email in a column"
        );
        assert_eq!(v["contact"]["name"], "Jane");
        assert_ne!(v["phones"][0], "555-0100");
        assert!(v["tags"].is_null());
        assert!(v["score"].is_number());
        assert_eq!(v["missing"], 1);
        let e = masker()
            .mask(&mask, &ColumnType::parse("jsonb"), Some("{not json"))
            .unwrap_err();
        assert!(matches!(e, MaskError::InvalidValue { .. }));
    }

    #[test]
    fn no_raw_values_in_errors() {
        const MARK: &str = "PII-MARKER-7731";
        let bad_inputs = [
            format!("{MARK}@@"),
            format!("{{\"a\": \"{MARK}\""),
            format!("{MARK} 2020-13-45"),
            format!("not-a-number-{MARK}"),
        ];
        let json_mask = Mask::Json {
            paths: vec![JsonPathMask {
                path: JsonPath::parse("d").unwrap(),
                mask: Mask::DateShift { max_days: 3 },
            }],
        };
        let cases: Vec<(Mask, &str)> = vec![
            (Mask::Ip, "inet"),
            (Mask::DateShift { max_days: 3 }, "date"),
            (Mask::NumberNoise { ratio: 0.1 }, "integer"),
            (json_mask.clone(), "jsonb"),
            (Mask::Email, "varchar(5)"),
            (Mask::Email, "integer"),
            (
                Mask::Constant {
                    value: "x".repeat(20),
                },
                "varchar(3)",
            ),
        ];
        let mut errors = 0;
        for (mask, ty) in &cases {
            for v in &bad_inputs {
                if let Err(e) = masker().mask(mask, &ColumnType::parse(ty), Some(v)) {
                    errors += 1;
                    assert!(!e.to_string().contains(MARK), "{e}");
                    assert!(!format!("{e:?}").contains(MARK), "{e:?}");
                }
            }
        }
        // A JSON document whose masked leaf is not a date: the error names no part of it.
        let doc = format!("{{\"d\": \"{MARK}\"}}");
        let e = masker()
            .mask(&json_mask, &ColumnType::parse("jsonb"), Some(&doc))
            .unwrap_err();
        assert!(!format!("{e} {e:?}").contains(MARK));
        assert!(errors >= cases.len() * 2, "only {errors} errors");
        // The key does not leak through Debug either.
        assert!(!format!("{:?}", masker()).contains("42"));
    }

    #[test]
    fn secret_key_hex_round_trip() {
        let k = SecretKey::generate();
        assert_eq!(SecretKey::from_hex(&k.to_hex()), Some(k.clone()));
        assert_ne!(SecretKey::generate(), k);
        assert_eq!(SecretKey::from_hex("zz"), None);
    }

    proptest::proptest! {
        #[test]
        fn prop_fake_kinds_fit_and_repeat(v in ".{0,80}", limit in 13usize..80, k in 0usize..11) {
            let mask = &FAKE_KINDS[k];
            let ty = ColumnType::parse(&format!("varchar({limit})"));
            let a = masker().mask(mask, &ty, Some(&v)).unwrap().unwrap();
            let b = masker().mask(mask, &ty, Some(&v)).unwrap().unwrap();
            proptest::prop_assert_eq!(&a, &b);
            proptest::prop_assert!(a.chars().count() <= limit);
        }

        #[test]
        fn prop_partial_preserves_length(v in ".{0,40}", f in 0usize..5, l in 0usize..5) {
            let out = m(&Mask::Partial { keep_first: f, keep_last: l, fill: '*' }, "text", &v);
            proptest::prop_assert_eq!(out.chars().count(), v.chars().count());
        }
    }
}
