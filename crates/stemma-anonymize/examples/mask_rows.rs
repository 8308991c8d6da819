//! How fast rows are masked, one thread, against passing them through unchanged.
//!
//!     cargo run --release -p stemma-anonymize --example mask_rows [ROWS]
//!
//! Rows look like `bench/anonymize.sh`'s: a unique email, a name, a city, a free-text note,
//! an amount, a date; the email, name, city and note are masked.

use std::time::Instant;

use stemma_anonymize::{ColumnMask, ColumnType, Locale, Mask, Masker, RowMasker, SecretKey};

fn main() {
    let rows: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(200_000);
    let text: Vec<u8> = (1..=rows)
        .flat_map(|g| {
            format!(
                "{g}\tuser{g}@example.org\tPerson {g}\tLisbon\tCustomer {g} asked about invoice {} and the delivery of order {}; call back in the morning.\t{}.50\t2019-03-0{}\n",
                g * 7,
                g * 13,
                g % 1000,
                1 + g % 9
            )
            .into_bytes()
        })
        .collect();
    let masker = Masker::new(SecretKey::from_bytes([9; 32]), Locale::En);
    let col = |m: Mask| ColumnMask::Mask {
        mask: m,
        ty: ColumnType::parse("text"),
    };
    let columns = vec![
        ("id".to_string(), ColumnMask::Keep),
        ("email".to_string(), col(Mask::Email)),
        ("full_name".to_string(), col(Mask::FullName)),
        ("city".to_string(), col(Mask::City)),
        ("notes".to_string(), col(Mask::Text)),
        ("amount".to_string(), ColumnMask::Keep),
        ("signed_up".to_string(), ColumnMask::Keep),
    ];
    let keep = RowMasker::new(
        masker.clone(),
        columns
            .iter()
            .map(|(n, _)| (n.clone(), ColumnMask::Keep))
            .collect(),
    );
    let masked = RowMasker::new(masker.clone(), columns.clone());
    for (label, rm) in [("pass-through", &keep), ("masked", &masked)] {
        let mut out = Vec::with_capacity(text.len() * 2);
        let t = Instant::now();
        for line in text.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            rm.mask_row(line, &mut out).expect("mask");
        }
        let s = t.elapsed().as_secs_f64();
        println!(
            "{label:14} {rows} rows in {s:.3} s: {:.0} rows/s, {:.1} µs/row",
            rows as f64 / s,
            s * 1e6 / rows as f64
        );
    }
    // Per mask kind, on the column values alone.
    for (name, mask) in [
        ("email", Mask::Email),
        ("full_name", Mask::FullName),
        ("city", Mask::City),
        ("text", Mask::Text),
        ("hash", Mask::Hash),
    ] {
        let ty = ColumnType::parse("text");
        let n = rows.min(100_000);
        let t = Instant::now();
        for g in 0..n {
            let v =
                format!("Customer {g} asked about invoice and the delivery of order; call back.");
            let _ = masker.mask(&mask, &ty, Some(&v)).expect("mask");
        }
        println!(
            "  {name:10} {:.2} µs/value",
            t.elapsed().as_secs_f64() * 1e6 / n as f64
        );
    }
}
