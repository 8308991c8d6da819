//! What the model tests share.

use std::path::Path;

/// Cases per proptest run: `PROPTEST_CASES` (longer runs), 48 by default (CI).
pub fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(48)
}

/// Simulates a power loss after dropping the store: everything after the durable mark may be
/// lost, so cut the last segment somewhere in its unsynced tail, maybe leaving torn garbage.
pub fn power_cut(dir: &Path, mark: stemma_pagestore::DurableMark, cut: u16, junk: bool) {
    let log = dir.join("log");
    // Segments only: a prepared segment is not part of the log (open deletes it).
    let mut segs: Vec<_> = std::fs::read_dir(&log)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segs.sort();
    let last = segs.last().unwrap();
    assert_eq!(
        last,
        &log.join(format!("{:010}.seg", mark.seg)),
        "only the last segment may be unsynced"
    );
    let len = std::fs::metadata(last).unwrap().len();
    let at = mark.len + (len - mark.len) * u64::from(cut) / u64::from(u16::MAX);
    let f = std::fs::OpenOptions::new().write(true).open(last).unwrap();
    f.set_len(at).unwrap();
    if junk {
        use std::os::unix::fs::FileExt;
        let garbage: Vec<u8> = (0..300u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        f.write_all_at(&garbage, at).unwrap();
    }
}
