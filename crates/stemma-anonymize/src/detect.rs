//! The PII detector and `suggest`: which columns look like personal data, from their names,
//! types and a sample of values, and a proposed rules file.
//!
//! The detector errs on the side of flagging: a false positive costs one `mask = "keep"` line,
//! a false negative leaks data into every developer branch. Flags never carry sampled values,
//! only counts.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;

use crate::mask::check_type;
use crate::rules::Mask;
use crate::schema::{Column, ColumnRef, Database, Schema, Table};
use crate::types::TypeKind;
use crate::unique::can_be_unique;

/// What kind of personal data a column seems to hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PiiCategory {
    Email,
    FirstName,
    LastName,
    FullName,
    Username,
    Phone,
    StreetAddress,
    City,
    PostalCode,
    Company,
    BirthDate,
    NationalId,
    CardNumber,
    Ip,
    /// Free text that contains any of the above.
    FreeText,
}

impl PiiCategory {
    pub fn name(self) -> &'static str {
        match self {
            Self::Email => "email",
            Self::FirstName => "first name",
            Self::LastName => "last name",
            Self::FullName => "full name",
            Self::Username => "username",
            Self::Phone => "phone",
            Self::StreetAddress => "street address",
            Self::City => "city",
            Self::PostalCode => "postal code",
            Self::Company => "company",
            Self::BirthDate => "birth date",
            Self::NationalId => "national id",
            Self::CardNumber => "card number",
            Self::Ip => "ip address",
            Self::FreeText => "free text with personal data",
        }
    }

    /// The mask `suggest` proposes for this category.
    pub fn suggested_mask(self) -> Mask {
        match self {
            Self::Email => Mask::Email,
            Self::FirstName => Mask::FirstName,
            Self::LastName => Mask::LastName,
            Self::FullName => Mask::FullName,
            Self::Username | Self::NationalId => Mask::Hash,
            Self::Phone => Mask::Phone,
            Self::StreetAddress => Mask::StreetAddress,
            Self::City => Mask::City,
            Self::PostalCode => Mask::PostalCode,
            Self::Company => Mask::Company,
            Self::BirthDate => Mask::DateShift { max_days: 365 },
            Self::CardNumber => Mask::Partial {
                keep_first: 0,
                keep_last: 4,
                fill: '*',
            },
            Self::Ip => Mask::Ip,
            Self::FreeText => Mask::Text,
        }
    }
}

impl fmt::Display for PiiCategory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a column was flagged. Counts only: never a sampled value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Evidence {
    ColumnName,
    ColumnType,
    /// `matched` of `sampled` non-null values looked like the category.
    Values {
        matched: usize,
        sampled: usize,
    },
}

impl fmt::Display for Evidence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ColumnName => f.write_str("column name"),
            Self::ColumnType => f.write_str("column type"),
            Self::Values { matched, sampled } => {
                write!(f, "{matched} of {sampled} sampled values")
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flag {
    pub column: ColumnRef,
    pub category: PiiCategory,
    pub evidence: Evidence,
}

/// Sampled values per column (text form, `None` for NULL). Columns without samples are judged
/// by name and type only.
pub type Samples = HashMap<ColumnRef, Vec<Option<String>>>;

/// Flags every column of the schema that looks like personal data.
pub fn detect(schema: &Schema, samples: &Samples) -> Vec<Flag> {
    let mut flags = Vec::new();
    for db in &schema.databases {
        for table in &db.tables {
            for col in &table.columns {
                let cref = ColumnRef::new(&db.name, &table.schema, &table.name, &col.name);
                let values = samples.get(&cref).map(Vec::as_slice).unwrap_or(&[]);
                if let Some((category, evidence)) = detect_column(table, col, values) {
                    flags.push(Flag {
                        column: cref,
                        category,
                        evidence,
                    });
                }
            }
        }
    }
    flags
}

/// Splits `billingPostalCode` / `billing_postal_code` / `BillingPostalCode` into lowercase words.
fn words(name: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut prev_lower = false;
    for c in name.chars() {
        if !c.is_alphanumeric() {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            prev_lower = false;
            continue;
        }
        if c.is_uppercase() && prev_lower && !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
        prev_lower = c.is_lowercase() || c.is_ascii_digit();
        cur.extend(c.to_lowercase());
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

const PERSON_TABLES: &[&str] = &[
    "customer",
    "customers",
    "user",
    "users",
    "person",
    "people",
    "persons",
    "employee",
    "employees",
    "member",
    "members",
    "contact",
    "contacts",
    "patient",
    "patients",
    "client",
    "clients",
    "staff",
    "student",
    "students",
    "account",
    "accounts",
    "author",
    "authors",
    "subscriber",
    "subscribers",
    "applicant",
    "applicants",
    "guest",
    "guests",
];

fn by_name(table: &Table, col: &Column) -> Option<PiiCategory> {
    use PiiCategory::*;
    let w = words(&col.name);
    let has = |s: &str| w.iter().any(|x| x == s);
    let joined = w.join("");
    let text = col.ty.kind == TypeKind::Text;
    if has("email") || has("mail") || joined.contains("email") {
        return Some(Email);
    }
    if has("ip") || joined.contains("ipaddr") || joined == "remoteaddr" {
        return Some(Ip);
    }
    if has("birth") || has("dob") || joined.contains("birthday") || joined.contains("birthdate") {
        return Some(BirthDate);
    }
    if has("ssn")
        || has("sin")
        || has("nino")
        || has("passport")
        || joined.contains("nationalid")
        || joined.contains("socialsecurity")
        || joined.contains("taxid")
        || joined.contains("driverlicense")
        || joined.contains("driverslicense")
        || joined.contains("idnumber")
    {
        return Some(NationalId);
    }
    if (has("card") && (has("number") || has("no") || has("num")))
        || joined.contains("creditcard")
        || joined.contains("ccnumber")
        || has("pan")
    {
        return Some(CardNumber);
    }
    if has("phone")
        || has("mobile")
        || has("fax")
        || has("tel")
        || has("telephone")
        || has("cell")
        || joined.contains("phone")
    {
        return Some(Phone);
    }
    if (has("first") && has("name"))
        || joined.contains("firstname")
        || joined.contains("givenname")
        || has("forename")
        || has("fname")
    {
        return Some(FirstName);
    }
    if (has("last") && has("name"))
        || joined.contains("lastname")
        || joined.contains("surname")
        || joined.contains("familyname")
        || has("lname")
    {
        return Some(LastName);
    }
    if has("username") || has("login") || (has("user") && has("name")) {
        return Some(Username);
    }
    if joined.contains("fullname")
        || joined.contains("contactname")
        || joined.contains("displayname")
        || joined.contains("customername")
        || (joined == "name" && text && PERSON_TABLES.contains(&table.name.as_str()))
    {
        return Some(FullName);
    }
    if (has("postal") || has("zip") || joined.contains("postcode") || joined.contains("zipcode"))
        && !has("country")
    {
        return Some(PostalCode);
    }
    if has("city") || has("town") {
        return Some(City);
    }
    if (has("address") || has("street") || has("addr") || joined.starts_with("addressline"))
        && !has("email")
        && !has("mac")
    {
        return Some(StreetAddress);
    }
    if has("company") || has("employer") || has("organization") || has("organisation") {
        return Some(Company);
    }
    if text
        && (has("note")
            || has("notes")
            || has("comment")
            || has("comments")
            || has("bio")
            || has("message"))
    {
        return Some(FreeText);
    }
    None
}

/// Detects which category a single value looks like.
pub(crate) fn classify_value(v: &str) -> Option<PiiCategory> {
    let v = v.trim();
    if looks_like_email(v) {
        return Some(PiiCategory::Email);
    }
    if looks_like_card(v) {
        return Some(PiiCategory::CardNumber);
    }
    if looks_like_ssn(v) {
        return Some(PiiCategory::NationalId);
    }
    if looks_like_ip(v) {
        return Some(PiiCategory::Ip);
    }
    if looks_like_phone(v) {
        return Some(PiiCategory::Phone);
    }
    None
}

fn looks_like_email(v: &str) -> bool {
    let Some((local, domain)) = v.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && !domain.contains('@')
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !v.contains(char::is_whitespace)
}

/// Luhn's checksum over 13 to 19 digits (spaces and dashes allowed between).
fn looks_like_card(v: &str) -> bool {
    if !v
        .chars()
        .all(|c| c.is_ascii_digit() || c == ' ' || c == '-')
    {
        return false;
    }
    let digits: Vec<u32> = v.chars().filter_map(|c| c.to_digit(10)).collect();
    if !(13..=19).contains(&digits.len()) {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 {
                    x - 9
                } else {
                    x
                }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// US social security number shape `ddd-dd-dddd`.
fn looks_like_ssn(v: &str) -> bool {
    let b = v.as_bytes();
    b.len() == 11
        && b[3] == b'-'
        && b[6] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 3 || i == 6 || c.is_ascii_digit())
}

fn looks_like_ip(v: &str) -> bool {
    let addr = v.split_once('/').map_or(v, |(a, _)| a);
    // A bare integer parses as nothing here, but "1.2.3.4" must have dots to count.
    (addr.contains('.') || addr.contains(':')) && addr.parse::<IpAddr>().is_ok()
}

fn looks_like_phone(v: &str) -> bool {
    let digits = v.chars().filter(char::is_ascii_digit).count();
    (7..=15).contains(&digits)
        && v.chars()
            .all(|c| c.is_ascii_digit() || " +-().x/".contains(c))
        && (v.contains(['+', '(', ' ', '-', '.']) || digits >= 10)
}

/// Scans free text for embedded personal data, word by word.
fn text_contains_pii(v: &str) -> bool {
    let tokens: Vec<&str> = v
        .split(|c: char| c.is_whitespace() || ",;<>\"'".contains(c))
        .map(|t| t.trim_matches(|c: char| ".:!?()[]".contains(c)))
        .filter(|t| !t.is_empty())
        .collect();
    if tokens.iter().any(|t| classify_value(t).is_some()) {
        return true;
    }
    // Phones and card numbers are often written with spaces: try windows of tokens.
    for n in 2..=4 {
        for w in tokens.windows(n) {
            let joined = w.join(" ");
            if looks_like_card(&joined) || (looks_like_phone(&joined) && joined.contains(' ')) {
                return true;
            }
        }
    }
    false
}

fn detect_column(
    table: &Table,
    col: &Column,
    values: &[Option<String>],
) -> Option<(PiiCategory, Evidence)> {
    if let Some(cat) = by_name(table, col) {
        return Some((cat, Evidence::ColumnName));
    }
    if matches!(col.ty.kind, TypeKind::Inet | TypeKind::Cidr) {
        return Some((PiiCategory::Ip, Evidence::ColumnType));
    }
    let present: Vec<&str> = values.iter().flatten().map(String::as_str).collect();
    if present.is_empty()
        || !matches!(
            col.ty.kind,
            TypeKind::Text
                | TypeKind::Json
                | TypeKind::Jsonb
                | TypeKind::Integer(64)
                | TypeKind::Numeric { .. }
        )
    {
        return None;
    }
    let sampled = present.len();
    // Most values of one shape: the column is that category.
    let mut counts: BTreeMap<PiiCategory, usize> = BTreeMap::new();
    for v in &present {
        if let Some(c) = classify_value(v) {
            *counts.entry(c).or_default() += 1;
        }
    }
    if let Some((&cat, &matched)) = counts.iter().max_by_key(|(_, n)| **n) {
        if matched * 2 >= sampled {
            return Some((cat, Evidence::Values { matched, sampled }));
        }
    }
    // Otherwise, free text that embeds any of it (even in one sampled value).
    if matches!(
        col.ty.kind,
        TypeKind::Text | TypeKind::Json | TypeKind::Jsonb
    ) {
        let matched = present.iter().filter(|v| text_contains_pii(v)).count();
        if matched > 0 {
            return Some((PiiCategory::FreeText, Evidence::Values { matched, sampled }));
        }
    }
    None
}

/// Proposes a rules file: one rule per flagged column, with a comment saying why. The output
/// always parses and, on the same schema, passes [`crate::schema::validate_against_schema`]:
/// masks that cannot produce a column's type fall back to one that can, and the columns joined
/// to a flagged column by foreign keys get the same mask.
pub fn suggest(schema: &Schema, samples: &Samples) -> String {
    let flags = detect(schema, samples);
    let mut out = String::new();
    out.push_str(
        "# Masking rules proposed by `stemma anonymize suggest`.\n\
         # Review every rule: the detector judges column names, types and a sample of values.\n\
         # Columns it flags must have a rule (`mask = \"keep\"` to declare one harmless).\n\
         # The contract of this file is in docs/anonymize.md.\n\n\
         [options]\n\
         unlisted = \"keep\"   # \"keep\" | \"fail\" | \"mask\"\n\
         locale = \"en\"\n",
    );
    let multi_db = schema.databases.len() > 1;
    let mut emitted: HashMap<ColumnRef, ()> = HashMap::new();
    for flag in &flags {
        if emitted.contains_key(&flag.column) {
            continue;
        }
        let Some((db, table, col)) = lookup(schema, &flag.column) else {
            continue;
        };
        let mask = fitting_mask(table, col, flag.category.suggested_mask(), flag.category);
        let group = fk_group(db, &flag.column);
        // Every joined column must accept the mask too; if one does not, keep the whole group
        // and say so (a key rarely is personal data; a human must decide).
        let mask = if group.iter().all(|c| {
            lookup(schema, c).is_some_and(|(_, t, col)| {
                check_type(&mask, &col.ty).is_ok()
                    && (t.unique_of(&col.name).next().is_none() || can_be_unique(mask.kind()))
            })
        }) {
            mask
        } else {
            Mask::Keep
        };
        for c in &group {
            if emitted.insert(c.clone(), ()).is_some() {
                continue;
            }
            out.push('\n');
            if c == &flag.column {
                out.push_str(&format!(
                    "# {}.{}.{}: looks like {} ({})\n",
                    c.schema, c.table, c.column, flag.category, flag.evidence
                ));
            } else {
                out.push_str(&format!(
                    "# {}.{}.{}: joined by a foreign key to {}.{}.{}, so it gets the same mask\n",
                    c.schema,
                    c.table,
                    c.column,
                    flag.column.schema,
                    flag.column.table,
                    flag.column.column
                ));
            }
            if mask == Mask::Keep {
                out.push_str("# REVIEW: no mask fits every joined column; kept for now.\n");
            }
            out.push_str("[[rule]]\n");
            if multi_db {
                out.push_str(&format!("database = {}\n", quote(&c.database)));
            }
            out.push_str(&format!(
                "table = {}\ncolumn = {}\n{}\n",
                quote(&format!("{}.{}", c.schema, c.table)),
                quote(&c.column),
                mask.to_toml_fields()
            ));
        }
    }
    if flags.is_empty() {
        out.push_str("\n# No column looks like personal data.\n");
    }
    out
}

fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

fn lookup<'a>(schema: &'a Schema, c: &ColumnRef) -> Option<(&'a Database, &'a Table, &'a Column)> {
    let db = schema.databases.iter().find(|d| d.name == c.database)?;
    let t = db.table(&c.schema, &c.table)?;
    Some((db, t, t.column(&c.column)?))
}

/// The proposed mask if it fits the column, else the best one that does.
fn fitting_mask(table: &Table, col: &Column, preferred: Mask, cat: PiiCategory) -> Mask {
    let unique = table.unique_of(&col.name).next().is_some();
    let ok = |m: &Mask| check_type(m, &col.ty).is_ok() && (!unique || can_be_unique(m.kind()));
    if ok(&preferred) {
        return preferred;
    }
    let fallbacks = [
        // A card number in a unique column cannot be `partial`: hash it.
        Mask::Hash,
        Mask::Partial {
            keep_first: 0,
            keep_last: 0,
            fill: '*',
        },
        match cat {
            PiiCategory::BirthDate => Mask::DateShift { max_days: 365 },
            _ => Mask::Text,
        },
    ];
    fallbacks
        .into_iter()
        .find(|m| ok(m) && (*m != Mask::Text || col.ty.is_text()))
        .unwrap_or(if col.nullable { Mask::Null } else { Mask::Keep })
}

/// The column and every column joined to it by foreign keys (transitively), sorted.
fn fk_group(db: &Database, start: &ColumnRef) -> Vec<ColumnRef> {
    let mut group = vec![start.clone()];
    let mut i = 0;
    while i < group.len() {
        let c = group[i].clone();
        for fk in &db.foreign_keys {
            for (fc, tc) in fk.from_columns.iter().zip(&fk.to_columns) {
                let from = ColumnRef::new(&db.name, &fk.from_schema, &fk.from_table, fc);
                let to = ColumnRef::new(&db.name, &fk.to_schema, &fk.to_table, tc);
                for (a, b) in [(&from, &to), (&to, &from)] {
                    if *a == c && !group.contains(b) {
                        group.push(b.clone());
                    }
                }
            }
        }
        i += 1;
    }
    group
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::Rules;
    use crate::schema::tests::chinook;
    use crate::schema::validate_against_schema;

    fn flag_of(flags: &[Flag], table: &str, column: &str) -> Option<PiiCategory> {
        flags
            .iter()
            .find(|f| f.column.table == table && f.column.column == column)
            .map(|f| f.category)
    }

    #[test]
    fn chinook_columns_are_flagged_by_name() {
        let flags = detect(&chinook(), &Samples::new());
        use PiiCategory::*;
        for (t, c, cat) in [
            ("customer", "first_name", FirstName),
            ("customer", "last_name", LastName),
            ("customer", "email", Email),
            ("customer", "phone", Phone),
            ("customer", "fax", Phone),
            ("customer", "address", StreetAddress),
            ("customer", "city", City),
            ("customer", "postal_code", PostalCode),
            ("customer", "company", Company),
            ("employee", "birth_date", BirthDate),
            ("invoice", "billing_address", StreetAddress),
            ("invoice", "billing_city", City),
            ("invoice", "billing_postal_code", PostalCode),
        ] {
            assert_eq!(flag_of(&flags, t, c), Some(cat), "{t}.{c}");
        }
        for (t, c) in [
            ("customer", "customer_id"),
            ("customer", "country"),
            ("invoice", "total"),
            ("invoice", "billing_country"),
            ("track", "name"),
            ("track", "composer"),
            ("employee", "hire_date"),
        ] {
            assert_eq!(flag_of(&flags, t, c), None, "{t}.{c}");
        }
    }

    #[test]
    fn camel_case_names_split() {
        assert_eq!(words("BillingPostalCode"), ["billing", "postal", "code"]);
        assert_eq!(words("customer_id"), ["customer", "id"]);
        assert_eq!(words("IPAddress"), ["ipaddress"]);
    }

    fn sample_schema(ty: &str) -> Schema {
        let mut s = chinook();
        s.databases[0].tables[3].columns.push(Column {
            name: "misc".into(),
            ty: crate::types::ColumnType::parse(ty),
            nullable: true,
        });
        s
    }

    fn flag_misc(ty: &str, values: &[&str]) -> Option<Flag> {
        let schema = sample_schema(ty);
        let mut samples = Samples::new();
        samples.insert(
            ColumnRef::new("chinook", "public", "track", "misc"),
            values.iter().map(|v| Some(v.to_string())).collect(),
        );
        detect(&schema, &samples)
            .into_iter()
            .find(|f| f.column.column == "misc")
    }

    #[test]
    fn values_reveal_pii_under_innocent_names() {
        let f = flag_misc("text", &["a@b.io", "c.d@e.org", "x"]).unwrap();
        assert_eq!(f.category, PiiCategory::Email);
        assert_eq!(
            f.evidence,
            Evidence::Values {
                matched: 2,
                sampled: 3
            }
        );
        let f = flag_misc("text", &["4111 1111 1111 1111", "5500-0000-0000-0004"]).unwrap();
        assert_eq!(f.category, PiiCategory::CardNumber);
        // Not Luhn-valid: not a card (and too long for a phone).
        assert!(flag_misc("text", &["4111111111111112"]).is_none());
        let f = flag_misc("text", &["078-05-1120"]).unwrap();
        assert_eq!(f.category, PiiCategory::NationalId);
        let f = flag_misc("varchar(40)", &["10.0.0.1", "2001:db8::1"]).unwrap();
        assert_eq!(f.category, PiiCategory::Ip);
        let f = flag_misc("text", &["+1 (555) 010-0199", "555-0100"]).unwrap();
        assert_eq!(f.category, PiiCategory::Phone);
        assert_eq!(flag_misc("inet", &[]).unwrap().category, PiiCategory::Ip);
        let f = flag_misc(
            "text",
            &[
                "Great service, will come back",
                "Call me at +44 20 7946 0958 after six",
                "ok",
            ],
        )
        .unwrap();
        assert_eq!(f.category, PiiCategory::FreeText);
        let f = flag_misc("jsonb", &[r#"{"note": "write to jane@corp.test"}"#]).unwrap();
        assert_eq!(f.category, PiiCategory::FreeText);
        assert!(flag_misc("text", &["Rock", "Jazz", "Metal"]).is_none());
        assert!(flag_misc("text", &["1.5", "2.0"]).is_none());
    }

    #[test]
    fn suggestion_parses_and_validates() {
        let schema = chinook();
        let s = suggest(&schema, &Samples::new());
        let rules = Rules::parse(&s).unwrap_or_else(|e| panic!("{e}\n{s}"));
        validate_against_schema(&rules, &schema).unwrap_or_else(|e| panic!("{e}\n{s}"));
        assert!(
            s.contains("# public.customer.email: looks like email (column name)"),
            "{s}"
        );
        // Postal codes of Chinook are varchar(10): the postal_code kind fits.
        assert!(
            s.contains("column = \"postal_code\"\nmask = \"postal_code\""),
            "{s}"
        );
        assert!(
            s.contains("column = \"birth_date\"\nmask = \"date_shift\""),
            "{s}"
        );
    }

    #[test]
    fn suggestion_keeps_foreign_keys_consistent() {
        // A flagged column that is also a foreign key: both sides get the same mask.
        let mut schema = chinook();
        let db = &mut schema.databases[0];
        for t in &mut db.tables {
            if t.name == "invoice" {
                t.columns.push(Column {
                    name: "customer_email".into(),
                    ty: crate::types::ColumnType::parse("varchar(60)"),
                    nullable: true,
                });
            }
            if t.name == "customer" {
                t.unique.push(crate::schema::UniqueConstraint {
                    name: "customer_email_key".into(),
                    columns: vec!["email".into()],
                    primary: false,
                });
            }
        }
        db.foreign_keys.push(crate::schema::ForeignKey {
            name: "invoice_customer_email_fkey".into(),
            from_schema: "public".into(),
            from_table: "invoice".into(),
            from_columns: vec!["customer_email".into()],
            to_schema: "public".into(),
            to_table: "customer".into(),
            to_columns: vec!["email".into()],
        });
        let s = suggest(&schema, &Samples::new());
        let rules = Rules::parse(&s).unwrap();
        validate_against_schema(&rules, &schema).unwrap_or_else(|e| panic!("{e}\n{s}"));
        assert_eq!(
            rules
                .rule_for("chinook", "public", "invoice", "customer_email")
                .unwrap()
                .mask,
            Mask::Email
        );
    }

    #[test]
    fn flags_carry_no_values() {
        let f = flag_misc("text", &["secret-marker@corp.test"]).unwrap();
        assert!(!format!("{f:?}").contains("secret-marker"));
    }
}
