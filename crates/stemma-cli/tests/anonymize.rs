//! Anonymized branches: `anonymize suggest` on the Chinook sample.

mod common;

use common::*;

#[test]
fn suggest_flags_chinook_pii_without_printing_values() {
    let env = Env::new();
    env.up();
    load_chinook(&env, "main");
    let rules = env.ok(&["anonymize", "suggest", "main"]);
    for needle in [
        "table = \"public.customer\"",
        "column = \"email\"",
        "mask = \"email\"",
        "column = \"first_name\"",
        "column = \"phone\"",
        "column = \"billing_address\"",
    ] {
        assert!(rules.contains(needle), "{needle} missing from:\n{rules}");
    }
    // Sampled values inform the suggestion but never appear in it.
    let sample = env.sql("main", "select 1");
    assert_eq!(sample, "1");
    let chinook = env.ok(&["connection-string", "main", "--database", "chinook"]);
    let email = psql(
        chinook.trim(),
        "select email from customer order by customer_id limit 1",
    );
    assert!(!email.is_empty());
    assert!(!rules.contains(&email), "a raw value leaked into the rules");
}
