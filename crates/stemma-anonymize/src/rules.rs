//! The masking rules file (`masking.toml`): parsing and validation of its own shape.
//!
//! The contract is documented in `docs/anonymize.md`. Every error names the line of the
//! offending key or value, taken from the TOML parser's spans, so that a user editing a long
//! file goes straight to the mistake.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;

use serde::Deserialize;
use sha2::Digest;
use toml::Spanned;

use crate::error::RulesError;

// serde's `flatten` would buffer the values and lose their spans, so the option fields are
// repeated in `RawRule` and `RawPath` and moved into this common shape.
macro_rules! take_opts {
    ($r:expr) => {
        RawOpts {
            value: $r.value,
            max_days: $r.max_days,
            ratio: $r.ratio,
            keep_first: $r.keep_first,
            keep_last: $r.keep_last,
            fill: $r.fill,
            paths: $r.paths,
        }
    };
}

/// What happens to a column that no rule names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Unlisted {
    /// Copy it unchanged (the default), except that a column the detector flags as PII stops
    /// the run until a rule covers it.
    #[default]
    Keep,
    /// Every column needs a rule: the plan refuses when one has none.
    Fail,
    /// Mask every unlisted column by its type (see [`crate::plan::default_mask_for`]).
    Mask,
}

/// The language of fake values (names, cities, prose). Emails stay ASCII whatever the locale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Locale {
    #[default]
    En,
    FrFr,
    DeDe,
    ItIt,
    NlNl,
    PtBr,
    PtPt,
    JaJp,
    ZhCn,
    ZhTw,
    ArSa,
    TrTr,
    FaIr,
    CyGb,
}

impl Locale {
    /// Every accepted spelling, for error messages and docs.
    pub const NAMES: &'static [&'static str] = &[
        "en", "fr", "de", "it", "nl", "pt_br", "pt", "ja", "zh_cn", "zh_tw", "ar", "tr", "fa", "cy",
    ];

    /// Accepts `en`, `fr`, `fr_FR`, `fr-FR`, `pt_BR`... (case-insensitive).
    pub fn from_name(name: &str) -> Option<Self> {
        let n = name.trim().to_ascii_lowercase().replace('-', "_");
        Some(match n.as_str() {
            "en" | "en_us" | "en_gb" => Self::En,
            "fr" | "fr_fr" => Self::FrFr,
            "de" | "de_de" => Self::DeDe,
            "it" | "it_it" => Self::ItIt,
            "nl" | "nl_nl" => Self::NlNl,
            "pt_br" => Self::PtBr,
            "pt" | "pt_pt" => Self::PtPt,
            "ja" | "ja_jp" => Self::JaJp,
            "zh_cn" | "zh" => Self::ZhCn,
            "zh_tw" => Self::ZhTw,
            "ar" | "ar_sa" => Self::ArSa,
            "tr" | "tr_tr" => Self::TrTr,
            "fa" | "fa_ir" => Self::FaIr,
            "cy" | "cy_gb" => Self::CyGb,
            _ => return None,
        })
    }
}

/// `[options]`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Options {
    pub unlisted: Unlisted,
    pub locale: Locale,
}

/// The name of a mask kind, without options.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MaskKind {
    Keep,
    Null,
    Constant,
    Hash,
    Email,
    FirstName,
    LastName,
    FullName,
    Phone,
    StreetAddress,
    City,
    PostalCode,
    Company,
    Ip,
    Text,
    DateShift,
    NumberNoise,
    Partial,
    Json,
}

impl MaskKind {
    pub const ALL: &'static [MaskKind] = &[
        Self::Keep,
        Self::Null,
        Self::Constant,
        Self::Hash,
        Self::Email,
        Self::FirstName,
        Self::LastName,
        Self::FullName,
        Self::Phone,
        Self::StreetAddress,
        Self::City,
        Self::PostalCode,
        Self::Company,
        Self::Ip,
        Self::Text,
        Self::DateShift,
        Self::NumberNoise,
        Self::Partial,
        Self::Json,
    ];

    /// The spelling in the rules file.
    pub fn name(self) -> &'static str {
        match self {
            Self::Keep => "keep",
            Self::Null => "null",
            Self::Constant => "constant",
            Self::Hash => "hash",
            Self::Email => "email",
            Self::FirstName => "first_name",
            Self::LastName => "last_name",
            Self::FullName => "full_name",
            Self::Phone => "phone",
            Self::StreetAddress => "street_address",
            Self::City => "city",
            Self::PostalCode => "postal_code",
            Self::Company => "company",
            Self::Ip => "ip",
            Self::Text => "text",
            Self::DateShift => "date_shift",
            Self::NumberNoise => "number_noise",
            Self::Partial => "partial",
            Self::Json => "json",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|k| k.name() == name)
    }

    /// The options this kind accepts (any other option key on its rule is an error).
    fn options(self) -> &'static [&'static str] {
        match self {
            Self::Constant => &["value"],
            Self::DateShift => &["max_days"],
            Self::NumberNoise => &["ratio"],
            Self::Partial => &["keep_first", "keep_last", "fill"],
            Self::Json => &["paths"],
            _ => &[],
        }
    }
}

impl fmt::Display for MaskKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A mask: its kind with its options. Two columns joined by a foreign key must carry equal
/// masks (this type's `==`), so that both sides map every value the same way.
#[derive(Debug, Clone, PartialEq)]
pub enum Mask {
    Keep,
    Null,
    Constant {
        value: String,
    },
    Hash,
    Email,
    FirstName,
    LastName,
    FullName,
    Phone,
    StreetAddress,
    City,
    PostalCode,
    Company,
    Ip,
    Text,
    /// Shift dates by a deterministic, non-zero number of days in `[-max_days, max_days]`.
    DateShift {
        max_days: u32,
    },
    /// Multiply numbers by a deterministic factor in `[1 - ratio, 1 + ratio]`.
    NumberNoise {
        ratio: f64,
    },
    /// Keep the first/last characters, replace the letters and digits between with `fill`.
    Partial {
        keep_first: usize,
        keep_last: usize,
        fill: char,
    },
    /// Mask the given paths inside a JSON document with other (non-json) masks.
    Json {
        paths: Vec<JsonPathMask>,
    },
}

impl Mask {
    pub fn kind(&self) -> MaskKind {
        match self {
            Self::Keep => MaskKind::Keep,
            Self::Null => MaskKind::Null,
            Self::Constant { .. } => MaskKind::Constant,
            Self::Hash => MaskKind::Hash,
            Self::Email => MaskKind::Email,
            Self::FirstName => MaskKind::FirstName,
            Self::LastName => MaskKind::LastName,
            Self::FullName => MaskKind::FullName,
            Self::Phone => MaskKind::Phone,
            Self::StreetAddress => MaskKind::StreetAddress,
            Self::City => MaskKind::City,
            Self::PostalCode => MaskKind::PostalCode,
            Self::Company => MaskKind::Company,
            Self::Ip => MaskKind::Ip,
            Self::Text => MaskKind::Text,
            Self::DateShift { .. } => MaskKind::DateShift,
            Self::NumberNoise { .. } => MaskKind::NumberNoise,
            Self::Partial { .. } => MaskKind::Partial,
            Self::Json { .. } => MaskKind::Json,
        }
    }

    /// The mask as it would be written in a rules file (`kind` plus its options), for
    /// messages and for `suggest`.
    pub fn to_toml_fields(&self) -> String {
        let kind = self.kind().name();
        match self {
            Self::Constant { value } => format!("mask = \"{kind}\"\nvalue = {}", toml_str(value)),
            Self::DateShift { max_days } => format!("mask = \"{kind}\"\nmax_days = {max_days}"),
            Self::NumberNoise { ratio } => format!("mask = \"{kind}\"\nratio = {ratio:?}"),
            Self::Partial {
                keep_first,
                keep_last,
                fill,
            } => format!(
                "mask = \"{kind}\"\nkeep_first = {keep_first}\nkeep_last = {keep_last}\nfill = {}",
                toml_str(&fill.to_string())
            ),
            Self::Json { paths } => {
                let entries: Vec<String> = paths
                    .iter()
                    .map(|p| {
                        let inner = p.mask.to_toml_fields().replace('\n', ", ");
                        format!("  {{ path = {}, {inner} }},", toml_str(&p.path.source))
                    })
                    .collect();
                format!("mask = \"{kind}\"\npaths = [\n{}\n]", entries.join("\n"))
            }
            _ => format!("mask = \"{kind}\""),
        }
    }
}

impl fmt::Display for Mask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::DateShift { max_days } => write!(f, "date_shift(max_days = {max_days})"),
            Self::NumberNoise { ratio } => write!(f, "number_noise(ratio = {ratio})"),
            Self::Partial {
                keep_first,
                keep_last,
                ..
            } => write!(
                f,
                "partial(keep_first = {keep_first}, keep_last = {keep_last})"
            ),
            // The constant is configuration, not row data, but it can be long: name the kind only.
            other => f.write_str(other.kind().name()),
        }
    }
}

fn toml_str(s: &str) -> String {
    // A TOML basic string is a JSON string for everything we emit (escapes are compatible).
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_string())
}

/// One segment of a JSON path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathSegment {
    /// An object member.
    Key(String),
    /// An array element.
    Index(usize),
    /// Every member of an object or element of an array.
    Any,
}

/// A path inside a JSON document: `$.address.city`, `phones[*]`, `items.*.email`, `tags[0]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonPath {
    pub segments: Vec<PathSegment>,
    /// The path as written, for messages.
    pub source: String,
}

impl JsonPath {
    /// Parses the path syntax documented in `docs/anonymize.md`: an optional leading `$`,
    /// keys separated by `.`, `*` for any member, `[N]` / `[*]` for array elements.
    pub fn parse(source: &str) -> Result<Self, String> {
        let mut rest = source.trim();
        if let Some(r) = rest.strip_prefix('$') {
            rest = r.strip_prefix('.').unwrap_or(r);
        }
        let mut segments = Vec::new();
        if !rest.is_empty() {
            for part in rest.split('.') {
                let (key, mut brackets) = match part.find('[') {
                    Some(i) => (&part[..i], &part[i..]),
                    None => (part, ""),
                };
                match key {
                    "" if brackets.is_empty() => {
                        return Err(format!("empty segment in JSON path `{source}`"))
                    }
                    "" => {}
                    "*" => segments.push(PathSegment::Any),
                    k => segments.push(PathSegment::Key(k.to_string())),
                }
                while !brackets.is_empty() {
                    let close = brackets
                        .find(']')
                        .ok_or_else(|| format!("unclosed `[` in JSON path `{source}`"))?;
                    let inner = &brackets[1..close];
                    segments.push(match inner {
                        "*" => PathSegment::Any,
                        n => PathSegment::Index(n.parse().map_err(|_| {
                            format!("`[{n}]` in JSON path `{source}` is neither `[*]` nor `[N]`")
                        })?),
                    });
                    brackets = &brackets[close + 1..];
                    if !brackets.is_empty() && !brackets.starts_with('[') {
                        return Err(format!("unexpected text after `]` in JSON path `{source}`"));
                    }
                }
            }
        }
        Ok(Self {
            segments,
            source: source.to_string(),
        })
    }
}

/// One entry of a `json` mask's `paths`.
#[derive(Debug, Clone, PartialEq)]
pub struct JsonPathMask {
    pub path: JsonPath,
    pub mask: Mask,
}

/// A name pattern: a literal or `*`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NamePattern {
    Any,
    Exact(String),
}

impl NamePattern {
    pub fn matches(&self, name: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Exact(n) => n == name,
        }
    }

    fn is_exact(&self) -> bool {
        matches!(self, Self::Exact(_))
    }
}

impl fmt::Display for NamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("*"),
            Self::Exact(n) => f.write_str(n),
        }
    }
}

/// One `[[rule]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// `None`: every database of the branch.
    pub database: Option<String>,
    pub schema: NamePattern,
    pub table: NamePattern,
    pub column: String,
    pub mask: Mask,
    /// The line of the rule's `[[rule]]` table in the file (1-based), for messages.
    pub line: usize,
}

impl Rule {
    pub fn matches(&self, database: &str, schema: &str, table: &str, column: &str) -> bool {
        self.database.as_deref().is_none_or(|d| d == database)
            && self.schema.matches(schema)
            && self.table.matches(table)
            && self.column == column
    }

    /// Higher is more specific; the most specific matching rule wins. A named database
    /// outranks a named table, which outranks a named schema.
    pub fn specificity(&self) -> u8 {
        (self.database.is_some() as u8) * 4
            + (self.table.is_exact() as u8) * 2
            + self.schema.is_exact() as u8
    }

    /// `public.customer.email` (with `db:` in front when the rule names a database).
    pub fn target(&self) -> String {
        let db = self
            .database
            .as_deref()
            .map(|d| format!("{d}:"))
            .unwrap_or_default();
        format!("{db}{}.{}.{}", self.schema, self.table, self.column)
    }
}

/// A parsed, self-consistent rules file. Whether it fits a database is checked by
/// [`crate::schema::validate_against_schema`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Rules {
    pub options: Options,
    pub rules: Vec<Rule>,
    /// SHA-256 of the file's text, hex: identifies the rules a branch was anonymized with.
    pub digest: String,
}

impl Rules {
    /// Parses and checks a rules file. Errors name the line.
    pub fn parse(source: &str) -> Result<Self, RulesError> {
        let raw: RawFile = toml::from_str(source).map_err(|e| RulesError {
            line: e.span().map(|s| line_of(source, s.start)).unwrap_or(1),
            message: e.message().trim().to_string(),
        })?;
        let mut options = Options::default();
        if let Some(o) = raw.options {
            if let Some(u) = o.unlisted {
                options.unlisted = match u.get_ref().as_str() {
                    "keep" => Unlisted::Keep,
                    "fail" => Unlisted::Fail,
                    "mask" => Unlisted::Mask,
                    other => {
                        return Err(err(
                            source,
                            &u.span(),
                            format!(
                                "`unlisted = \"{other}\"`: expected \"keep\", \"fail\" or \"mask\""
                            ),
                        ))
                    }
                };
            }
            if let Some(l) = o.locale {
                options.locale = Locale::from_name(l.get_ref()).ok_or_else(|| {
                    err(
                        source,
                        &l.span(),
                        format!(
                            "unknown locale `{}`; expected one of {}",
                            l.get_ref(),
                            Locale::NAMES.join(", ")
                        ),
                    )
                })?;
            }
        }
        let mut rules = Vec::with_capacity(raw.rule.len());
        let mut seen: HashMap<(Option<String>, NamePattern, NamePattern, String), usize> =
            HashMap::new();
        for spanned in raw.rule {
            let span = spanned.span();
            let line = line_of(source, span.start);
            let r = spanned.into_inner();
            let (Some(table), Some(column)) = (r.table, r.column) else {
                return Err(RulesError {
                    line,
                    message: "a rule needs `table` and `column`".into(),
                });
            };
            let (schema, table) =
                parse_table(table.get_ref()).map_err(|m| err(source, &table.span(), m))?;
            let column_name = column.get_ref().trim().to_string();
            if column_name.is_empty() || column_name == "*" {
                return Err(err(
                    source,
                    &column.span(),
                    "`column` must name one column (no wildcard)".to_string(),
                ));
            }
            let database = r.database.map(|d| d.into_inner());
            let mask_name = r.mask;
            let opts = take_opts!(r);
            let mask = parse_mask(source, line, &mask_name, &opts, true)?;
            let key = (
                database.clone(),
                schema.clone(),
                table.clone(),
                column_name.clone(),
            );
            if let Some(first) = seen.insert(key, line) {
                return Err(RulesError {
                    line,
                    message: format!("duplicate rule: line {first} already covers this column"),
                });
            }
            rules.push(Rule {
                database,
                schema,
                table,
                column: column_name,
                mask,
                line,
            });
        }
        let digest = sha2::Sha256::digest(source.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(Self {
            options,
            rules,
            digest,
        })
    }

    /// The most specific rule covering a column, if any.
    pub fn rule_for(
        &self,
        database: &str,
        schema: &str,
        table: &str,
        column: &str,
    ) -> Option<&Rule> {
        // Ties cannot happen between distinct rules: equal specificity and a common match means
        // equal patterns, which `parse` refuses as a duplicate.
        self.rules
            .iter()
            .filter(|r| r.matches(database, schema, table, column))
            .max_by_key(|r| r.specificity())
    }
}

fn parse_table(s: &str) -> Result<(NamePattern, NamePattern), String> {
    let s = s.trim();
    let Some((schema, table)) = s.split_once('.') else {
        return Err(format!(
            "table `{s}` must be schema-qualified, e.g. `public.{s}` (`*` allowed)"
        ));
    };
    if schema.is_empty() || table.is_empty() || table.contains('.') {
        return Err(format!("table `{s}` must be `schema.table`"));
    }
    let pat = |p: &str| {
        if p == "*" {
            NamePattern::Any
        } else {
            NamePattern::Exact(p.to_string())
        }
    };
    Ok((pat(schema), pat(table)))
}

/// The 1-based line holding byte `offset`.
pub(crate) fn line_of(source: &str, offset: usize) -> usize {
    let end = offset.min(source.len());
    source.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn err(source: &str, span: &Range<usize>, message: String) -> RulesError {
    RulesError {
        line: line_of(source, span.start),
        message,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    options: Option<RawOptions>,
    #[serde(default)]
    rule: Vec<Spanned<RawRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOptions {
    unlisted: Option<Spanned<String>>,
    locale: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    database: Option<Spanned<String>>,
    table: Option<Spanned<String>>,
    column: Option<Spanned<String>>,
    mask: Option<Spanned<String>>,
    value: Option<Spanned<toml::Value>>,
    max_days: Option<Spanned<toml::Value>>,
    ratio: Option<Spanned<toml::Value>>,
    keep_first: Option<Spanned<toml::Value>>,
    keep_last: Option<Spanned<toml::Value>>,
    fill: Option<Spanned<toml::Value>>,
    paths: Option<Spanned<Vec<Spanned<RawPath>>>>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawPath {
    path: Option<Spanned<String>>,
    mask: Option<Spanned<String>>,
    value: Option<Spanned<toml::Value>>,
    max_days: Option<Spanned<toml::Value>>,
    ratio: Option<Spanned<toml::Value>>,
    keep_first: Option<Spanned<toml::Value>>,
    keep_last: Option<Spanned<toml::Value>>,
    fill: Option<Spanned<toml::Value>>,
    // Present only to refuse it with a clear message (a json mask cannot nest).
    paths: Option<Spanned<Vec<Spanned<RawPath>>>>,
}

/// The per-kind options, typed loosely so that a wrong type gets our message and line.
struct RawOpts {
    value: Option<Spanned<toml::Value>>,
    max_days: Option<Spanned<toml::Value>>,
    ratio: Option<Spanned<toml::Value>>,
    keep_first: Option<Spanned<toml::Value>>,
    keep_last: Option<Spanned<toml::Value>>,
    fill: Option<Spanned<toml::Value>>,
    paths: Option<Spanned<Vec<Spanned<RawPath>>>>,
}

impl RawOpts {
    fn present(&self) -> Vec<(&'static str, Range<usize>)> {
        let mut v = Vec::new();
        let mut add = |name, o: Option<Range<usize>>| {
            if let Some(s) = o {
                v.push((name, s));
            }
        };
        add("value", self.value.as_ref().map(|s| s.span()));
        add("max_days", self.max_days.as_ref().map(|s| s.span()));
        add("ratio", self.ratio.as_ref().map(|s| s.span()));
        add("keep_first", self.keep_first.as_ref().map(|s| s.span()));
        add("keep_last", self.keep_last.as_ref().map(|s| s.span()));
        add("fill", self.fill.as_ref().map(|s| s.span()));
        add("paths", self.paths.as_ref().map(|s| s.span()));
        v
    }
}

fn parse_mask(
    source: &str,
    line: usize,
    mask: &Option<Spanned<String>>,
    opts: &RawOpts,
    allow_json: bool,
) -> Result<Mask, RulesError> {
    let Some(mask) = mask else {
        return Err(RulesError {
            line,
            message: "missing `mask`".into(),
        });
    };
    let kind = MaskKind::from_name(mask.get_ref().trim()).ok_or_else(|| {
        let names: Vec<&str> = MaskKind::ALL.iter().map(|k| k.name()).collect();
        err(
            source,
            &mask.span(),
            format!(
                "unknown mask kind `{}`; expected one of {}",
                mask.get_ref(),
                names.join(", ")
            ),
        )
    })?;
    for (name, span) in opts.present() {
        if !kind.options().contains(&name) {
            return Err(err(
                source,
                &span,
                format!("option `{name}` does not apply to mask `{kind}`"),
            ));
        }
    }
    let mask_line = line_of(source, mask.span().start);
    let missing = |opt: &str| RulesError {
        line: mask_line,
        message: format!("mask `{kind}` needs option `{opt}`"),
    };
    Ok(match kind {
        MaskKind::Keep => Mask::Keep,
        MaskKind::Null => Mask::Null,
        MaskKind::Constant => {
            let v = opts.value.as_ref().ok_or_else(|| missing("value"))?;
            let value = match v.get_ref() {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                toml::Value::Datetime(d) => d.to_string(),
                other => {
                    return Err(err(
                        source,
                        &v.span(),
                        format!(
                            "option `value` must be a string, number or boolean, not {}",
                            other.type_str()
                        ),
                    ))
                }
            };
            Mask::Constant { value }
        }
        MaskKind::Hash => Mask::Hash,
        MaskKind::Email => Mask::Email,
        MaskKind::FirstName => Mask::FirstName,
        MaskKind::LastName => Mask::LastName,
        MaskKind::FullName => Mask::FullName,
        MaskKind::Phone => Mask::Phone,
        MaskKind::StreetAddress => Mask::StreetAddress,
        MaskKind::City => Mask::City,
        MaskKind::PostalCode => Mask::PostalCode,
        MaskKind::Company => Mask::Company,
        MaskKind::Ip => Mask::Ip,
        MaskKind::Text => Mask::Text,
        MaskKind::DateShift => {
            let max_days = match &opts.max_days {
                None => 365,
                Some(v) => int_opt(source, "max_days", v, 1, 36_500)? as u32,
            };
            Mask::DateShift { max_days }
        }
        MaskKind::NumberNoise => {
            let ratio = match &opts.ratio {
                None => 0.1,
                Some(v) => {
                    let r = match v.get_ref() {
                        toml::Value::Float(f) => *f,
                        toml::Value::Integer(i) => *i as f64,
                        other => {
                            return Err(err(
                                source,
                                &v.span(),
                                format!(
                                    "option `ratio` must be a number, not {}",
                                    other.type_str()
                                ),
                            ))
                        }
                    };
                    if !(r > 0.0 && r <= 1.0) {
                        return Err(err(
                            source,
                            &v.span(),
                            "option `ratio` must be in (0, 1]".to_string(),
                        ));
                    }
                    r
                }
            };
            Mask::NumberNoise { ratio }
        }
        MaskKind::Partial => {
            let keep_first = match &opts.keep_first {
                None => 0,
                Some(v) => int_opt(source, "keep_first", v, 0, 1_000)? as usize,
            };
            let keep_last = match &opts.keep_last {
                None => 0,
                Some(v) => int_opt(source, "keep_last", v, 0, 1_000)? as usize,
            };
            if opts.keep_first.is_none() && opts.keep_last.is_none() {
                return Err(missing("keep_first` or `keep_last"));
            }
            let fill = match &opts.fill {
                None => '*',
                Some(v) => match v.get_ref() {
                    toml::Value::String(s) if s.chars().count() == 1 => {
                        s.chars().next().unwrap_or('*')
                    }
                    _ => {
                        return Err(err(
                            source,
                            &v.span(),
                            "option `fill` must be a string of one character".to_string(),
                        ))
                    }
                },
            };
            Mask::Partial {
                keep_first,
                keep_last,
                fill,
            }
        }
        MaskKind::Json => {
            if !allow_json {
                return Err(err(
                    source,
                    &mask.span(),
                    "a `json` mask cannot be nested inside `paths`".to_string(),
                ));
            }
            let paths = opts.paths.as_ref().ok_or_else(|| missing("paths"))?;
            if paths.get_ref().is_empty() {
                return Err(err(
                    source,
                    &paths.span(),
                    "option `paths` must list at least one path".to_string(),
                ));
            }
            let mut out = Vec::new();
            for p in paths.get_ref() {
                let p_line = line_of(source, p.span().start);
                let raw = p.get_ref();
                let inner_opts = RawOpts {
                    value: raw.value.clone(),
                    max_days: raw.max_days.clone(),
                    ratio: raw.ratio.clone(),
                    keep_first: raw.keep_first.clone(),
                    keep_last: raw.keep_last.clone(),
                    fill: raw.fill.clone(),
                    paths: raw.paths.clone(),
                };
                let Some(path) = &raw.path else {
                    return Err(RulesError {
                        line: p_line,
                        message: "each entry of `paths` needs `path`".into(),
                    });
                };
                let parsed =
                    JsonPath::parse(path.get_ref()).map_err(|m| err(source, &path.span(), m))?;
                let inner = parse_mask(source, p_line, &raw.mask, &inner_opts, false)?;
                out.push(JsonPathMask {
                    path: parsed,
                    mask: inner,
                });
            }
            Mask::Json { paths: out }
        }
    })
}

fn int_opt(
    source: &str,
    name: &str,
    v: &Spanned<toml::Value>,
    min: i64,
    max: i64,
) -> Result<i64, RulesError> {
    match v.get_ref() {
        toml::Value::Integer(i) if (min..=max).contains(i) => Ok(*i),
        toml::Value::Integer(_) => Err(err(
            source,
            &v.span(),
            format!("option `{name}` must be between {min} and {max}"),
        )),
        other => Err(err(
            source,
            &v.span(),
            format!(
                "option `{name}` must be an integer, not {}",
                other.type_str()
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
[options]
unlisted = "keep"
locale = "en"

[[rule]]
database = "shop"
table = "public.customer"
column = "email"
mask = "email"

[[rule]]
table = "public.customer"
column = "phone"
mask = "partial"
keep_last = 2

[[rule]]
table = "*.*"
column = "notes"
mask = "text"

[[rule]]
table = "public.customer"
column = "profile"
mask = "json"
paths = [
  { path = "$.email", mask = "email" },
  { path = "addresses[*].city", mask = "city" },
]
"#;

    #[test]
    fn parses_the_issue_example() {
        let r = Rules::parse(EXAMPLE).unwrap();
        assert_eq!(r.options.unlisted, Unlisted::Keep);
        assert_eq!(r.options.locale, Locale::En);
        assert_eq!(r.rules.len(), 4);
        assert_eq!(r.rules[0].database.as_deref(), Some("shop"));
        assert_eq!(r.rules[0].line, 6);
        assert_eq!(r.rules[1].line, 12);
        assert_eq!(
            r.rules[1].mask,
            Mask::Partial {
                keep_first: 0,
                keep_last: 2,
                fill: '*'
            }
        );
        assert_eq!(r.rules[2].schema, NamePattern::Any);
        let Mask::Json { paths } = &r.rules[3].mask else {
            panic!("json expected")
        };
        assert_eq!(paths.len(), 2);
        assert_eq!(
            paths[1].path.segments,
            vec![
                PathSegment::Key("addresses".into()),
                PathSegment::Any,
                PathSegment::Key("city".into())
            ]
        );
        assert_eq!(r.digest.len(), 64);
    }

    fn line_err(src: &str) -> RulesError {
        Rules::parse(src).unwrap_err()
    }

    #[test]
    fn unknown_mask_kind_names_the_line() {
        let e = line_err("[[rule]]\ntable = \"public.t\"\ncolumn = \"c\"\nmask = \"emial\"\n");
        assert_eq!(e.line, 4);
        assert!(e.to_string().starts_with("line 4:"), "{e}");
        assert!(e.message.contains("unknown mask kind `emial`"), "{e}");
    }

    #[test]
    fn wrong_option_type_names_the_line() {
        let e = line_err(
            "[[rule]]\ntable = \"public.t\"\ncolumn = \"d\"\nmask = \"date_shift\"\nmax_days = \"ten\"\n",
        );
        assert_eq!(e.line, 5);
        assert!(e.message.contains("must be an integer"), "{e}");
        let e = line_err(
            "[[rule]]\ntable = \"public.t\"\ncolumn = \"n\"\nmask = \"number_noise\"\n\nratio = true\n",
        );
        assert_eq!(e.line, 6);
    }

    #[test]
    fn missing_option_names_the_line() {
        let e = line_err("\n[[rule]]\ntable = \"public.t\"\ncolumn = \"c\"\nmask = \"constant\"\n");
        assert_eq!(e.line, 5);
        assert!(e.message.contains("needs option `value`"), "{e}");
        let e = line_err("[[rule]]\ntable = \"public.t\"\ncolumn = \"c\"\n");
        assert!(e.message.contains("missing `mask`"), "{e}");
        assert_eq!(e.line, 1);
    }

    #[test]
    fn unknown_keys_are_errors_with_lines() {
        let e = line_err(
            "[[rule]]\ntable = \"public.t\"\ncolumn = \"c\"\nmask = \"hash\"\ncolour = 1\n",
        );
        assert_eq!(e.line, 5, "{e}");
        assert!(e.message.contains("colour"), "{e}");
        let e = line_err("[options]\nunlisted = \"keep\"\nlocal = \"en\"\n");
        assert_eq!(e.line, 3, "{e}");
        let e = line_err("[option]\nunlisted = \"keep\"\n");
        assert_eq!(e.line, 1, "{e}");
    }

    #[test]
    fn option_of_another_kind_is_refused() {
        let e = line_err(
            "[[rule]]\ntable = \"public.t\"\ncolumn = \"c\"\nmask = \"email\"\nmax_days = 3\n",
        );
        assert_eq!(e.line, 5);
        assert!(e.message.contains("does not apply to mask `email`"), "{e}");
    }

    #[test]
    fn bad_values_are_refused() {
        let e = line_err("[options]\nunlisted = \"maybe\"\n");
        assert_eq!(e.line, 2);
        let e = line_err("[options]\nlocale = \"xx\"\n");
        assert!(e.message.contains("unknown locale"), "{e}");
        let e = line_err("[[rule]]\ntable = \"customer\"\ncolumn = \"c\"\nmask = \"hash\"\n");
        assert_eq!(e.line, 2);
        assert!(e.message.contains("schema-qualified"), "{e}");
        let e = line_err("[[rule]]\ntable = \"a.b\"\ncolumn = \"c\"\nmask = \"hash\"\n[[rule]]\ntable = \"a.b\"\ncolumn = \"c\"\nmask = \"null\"\n");
        assert_eq!(e.line, 5);
        assert!(e.message.contains("duplicate rule: line 1"), "{e}");
        let e = line_err("[[rule]]\ntable = \"a.b\"\ncolumn = \"c\"\nmask = \"partial\"\n");
        assert!(e.message.contains("keep_first"), "{e}");
        let e = line_err("syntax error here\n");
        assert_eq!(e.line, 1);
    }

    #[test]
    fn json_path_errors_name_their_line() {
        let src = "[[rule]]\ntable = \"a.b\"\ncolumn = \"doc\"\nmask = \"json\"\npaths = [\n  { path = \"a\", mask = \"email\" },\n  { path = \"b\", mask = \"bogus\" },\n]\n";
        let e = line_err(src);
        assert_eq!(e.line, 7, "{e}");
        let src = "[[rule]]\ntable = \"a.b\"\ncolumn = \"doc\"\nmask = \"json\"\npaths = [\n  { path = \"a[x]\", mask = \"email\" },\n]\n";
        assert_eq!(line_err(src).line, 6);
        let src = "[[rule]]\ntable = \"a.b\"\ncolumn = \"doc\"\nmask = \"json\"\n";
        assert!(line_err(src).message.contains("needs option `paths`"));
        let src = "[[rule]]\ntable = \"a.b\"\ncolumn = \"doc\"\nmask = \"json\"\npaths = [{ path = \"a\", mask = \"json\" }]\n";
        assert!(line_err(src).message.contains("cannot be nested"));
    }

    #[test]
    fn most_specific_rule_wins() {
        let src = "[[rule]]\ntable = \"*.*\"\ncolumn = \"email\"\nmask = \"hash\"\n\
                   [[rule]]\ntable = \"public.customer\"\ncolumn = \"email\"\nmask = \"email\"\n\
                   [[rule]]\ndatabase = \"crm\"\ntable = \"*.customer\"\ncolumn = \"email\"\nmask = \"keep\"\n";
        let r = Rules::parse(src).unwrap();
        assert_eq!(
            r.rule_for("shop", "public", "customer", "email")
                .unwrap()
                .mask,
            Mask::Email
        );
        assert_eq!(
            r.rule_for("shop", "sales", "lead", "email").unwrap().mask,
            Mask::Hash
        );
        assert_eq!(
            r.rule_for("crm", "public", "customer", "email")
                .unwrap()
                .mask,
            Mask::Keep
        );
        assert!(r.rule_for("shop", "public", "customer", "phone").is_none());
    }

    #[test]
    fn to_toml_fields_round_trips() {
        for mask in [
            Mask::Constant {
                value: "x \"y\"".into(),
            },
            Mask::DateShift { max_days: 30 },
            Mask::NumberNoise { ratio: 0.25 },
            Mask::Partial {
                keep_first: 1,
                keep_last: 2,
                fill: '#',
            },
            Mask::Json {
                paths: vec![JsonPathMask {
                    path: JsonPath::parse("$.a[*].b").unwrap(),
                    mask: Mask::Partial {
                        keep_first: 0,
                        keep_last: 4,
                        fill: '*',
                    },
                }],
            },
        ] {
            let src = format!(
                "[[rule]]\ntable = \"a.b\"\ncolumn = \"c\"\n{}\n",
                mask.to_toml_fields()
            );
            assert_eq!(Rules::parse(&src).unwrap().rules[0].mask, mask, "{src}");
        }
    }
}
