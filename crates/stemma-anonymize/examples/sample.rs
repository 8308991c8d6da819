//! Prints one masked value per kind (handy to eyeball realism): `cargo run -p stemma-anonymize --example sample`.
use stemma_anonymize::{ColumnType, Locale, Mask, Masker, SecretKey};

fn main() {
    let m = Masker::new(SecretKey::from_bytes([1; 32]), Locale::En);
    let cases = [
        (Mask::Email, "varchar(60)", "jane.doe@corp.test"),
        (Mask::FullName, "varchar(40)", "Jane Doe"),
        (Mask::Phone, "varchar(24)", "+1 555 0100"),
        (Mask::StreetAddress, "varchar(70)", "1 Main St"),
        (Mask::City, "varchar(40)", "Springfield"),
        (Mask::PostalCode, "varchar(10)", "12345"),
        (Mask::Company, "varchar(80)", "Acme"),
        (Mask::Ip, "inet", "10.0.0.1"),
        (
            Mask::Text,
            "text",
            "Called the customer about the late delivery; she was fine.",
        ),
        (
            Mask::DateShift { max_days: 365 },
            "timestamp",
            "1962-02-18 00:00:00",
        ),
        (Mask::Hash, "uuid", "x"),
    ];
    for (mask, ty, v) in cases {
        let out = m.mask(&mask, &ColumnType::parse(ty), Some(v));
        match out {
            Ok(o) => println!("{mask:>16} {ty:>12}: {}", o.unwrap_or_default()),
            Err(e) => println!("{mask:>16} {ty:>12}: error {e}"),
        }
    }
}
