//! A checkpoint of a running compute before a branch point, when the branch would otherwise
//! have much of the parent's WAL to replay.
//!
//! A crash-consistent branch of a running compute holds the parent's files as a power loss
//! would have left them, so its first start is PostgreSQL's crash recovery: it replays the WAL
//! from the redo point of the parent's last checkpoint. With PostgreSQL's default checkpoint
//! spacing that can be hundreds of megabytes on a busy parent, seconds of recovery before the
//! branch answers its first query, on any disk. A checkpoint of the parent just before the
//! branch point moves the redo point to "now"; on a parent whose dirty data is bounded by its
//! shared buffers it takes a fraction of a second, and it pauses no one.
//!
//! Asking PostgreSQL how far it is from its last checkpoint costs a session (a backend and a
//! SCRAM exchange, about 7 ms), which would double the time of every branch of a running
//! parent. [`replay_bound`] answers "certainly not far" from the files alone, so the session
//! is only opened for parents that may be over the limit.

use std::path::Path;

use crate::session::{pg, Session, SessionTarget};
use crate::Result;

/// The first `pg_control_version` whose `ControlFileData` has the redo point of the last
/// checkpoint at [`REDO_OFFSET`] (PostgreSQL 11, which removed `prevCheckPoint`).
const CONTROL_VERSION_MIN: u32 = 1100;
/// `ControlFileData`: system_identifier (u64), pg_control_version (u32), catalog_version_no
/// (u32), state (i32, padded), time (i64), checkPoint (u64), then `checkPointCopy`, a
/// `CheckPoint` whose first field is `redo`.
const REDO_OFFSET: usize = 40;

/// An upper bound of the WAL a crash image of the data directory taken now would replay,
/// from its files alone: from the redo point of the last checkpoint (`global/pg_control`) to
/// the end of the newest segment in `pg_wal`. `None` when the files do not say (a control file
/// of a version before 11, no segment). The control file is written in the machine's byte
/// order; segment names are `TTTTTTTTLLLLLLLLSSSSSSSS` (timeline, log, segment in the log).
pub fn replay_bound(data_dir: &Path) -> std::io::Result<Option<u64>> {
    let control = std::fs::read(data_dir.join("global/pg_control"))?;
    let field = |at: usize, len: usize| control.get(at..at + len);
    let version = field(8, 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_ne_bytes);
    let redo = field(REDO_OFFSET, 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_ne_bytes);
    let (Some(version), Some(redo)) = (version, redo) else {
        return Ok(None);
    };
    if version < CONTROL_VERSION_MIN {
        return Ok(None);
    }
    let mut newest: Option<(u64, u64)> = None;
    let mut segment_size = 0u64;
    for entry in std::fs::read_dir(data_dir.join("pg_wal"))? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.len() != 24 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
            continue;
        }
        let hex = |range: std::ops::Range<usize>| u64::from_str_radix(&name[range], 16).ok();
        let (Some(log), Some(seg)) = (hex(8..16), hex(16..24)) else {
            continue;
        };
        if newest.is_none_or(|n| (log, seg) > n) {
            newest = Some((log, seg));
            segment_size = entry.metadata()?.len();
        }
    }
    let Some((log, seg)) = newest else {
        return Ok(None);
    };
    // A segment is as long as the cluster's segment size (`wal_init_zero`, or recycling).
    if !segment_size.is_power_of_two() || segment_size > 1 << 32 {
        return Ok(None);
    }
    let per_log = (1u64 << 32) / segment_size;
    let end = (log * per_log + seg + 1).saturating_mul(segment_size);
    Ok(Some(end.saturating_sub(redo)))
}

/// What [`checkpoint_if_behind`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayDebt {
    /// Bytes of WAL from the redo point of the compute's last checkpoint to its current insert
    /// position: what a crash image taken now would replay. 0 for a compute in recovery.
    pub bytes: u64,
    /// Whether a checkpoint was made because `bytes` was over the limit.
    pub checkpointed: bool,
}

/// Measures the compute's replay debt and, when it is over `limit` bytes, runs `CHECKPOINT`
/// (which needs a superuser or `pg_checkpoint`) and waits for it. A compute in recovery (a
/// standby, or one still starting) is left alone.
pub async fn checkpoint_if_behind(target: SessionTarget<'_>, limit: u64) -> Result<ReplayDebt> {
    let session = Session::connect(target, "stemma-branch-point").await?;
    let row = session
        .client
        .query_one(
            "SELECT CASE WHEN pg_is_in_recovery() THEN 0 \
             ELSE (pg_current_wal_insert_lsn() - redo_lsn)::bigint END \
             FROM pg_control_checkpoint()",
            &[],
        )
        .await
        .map_err(pg("measuring the WAL since the last checkpoint"))?;
    let bytes = u64::try_from(row.get::<_, i64>(0)).unwrap_or(0);
    let checkpointed = bytes > limit;
    if checkpointed {
        session
            .client
            .batch_execute("CHECKPOINT")
            .await
            .map_err(pg("checkpointing before the branch point"))?;
    }
    session.close().await;
    Ok(ReplayDebt {
        bytes,
        checkpointed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB16: u64 = 16 << 20;

    fn data_dir(version: u32, redo: u64, segments: &[(&str, u64)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut control = vec![0u8; 8192];
        control[8..12].copy_from_slice(&version.to_ne_bytes());
        control[REDO_OFFSET..REDO_OFFSET + 8].copy_from_slice(&redo.to_ne_bytes());
        std::fs::create_dir_all(dir.path().join("global")).expect("global");
        std::fs::write(dir.path().join("global/pg_control"), control).expect("pg_control");
        std::fs::create_dir_all(dir.path().join("pg_wal/archive_status")).expect("pg_wal");
        std::fs::write(dir.path().join("pg_wal/00000002.history"), "1\t0/3000000\n")
            .expect("history");
        for (name, len) in segments {
            let f = std::fs::File::create(dir.path().join("pg_wal").join(name)).expect("segment");
            f.set_len(*len).expect("set_len");
        }
        dir
    }

    #[test]
    fn the_bound_runs_from_the_redo_point_to_the_end_of_the_newest_segment() {
        // Redo in segment 3 of log 0, newest segment 5 (on a later timeline).
        let dir = data_dir(
            1300,
            3 * MB16 + 100,
            &[
                ("000000010000000000000003", MB16),
                ("000000010000000000000004", MB16),
                ("000000020000000000000005", MB16),
            ],
        );
        assert_eq!(
            replay_bound(dir.path()).ok().flatten(),
            Some(6 * MB16 - 3 * MB16 - 100)
        );
        // Across a log boundary: 256 segments of 16 MB per log.
        let dir = data_dir(
            1300,
            0x1_0000_0000 - MB16,
            &[
                ("0000000100000000000000FF", MB16),
                ("000000010000000100000000", MB16),
            ],
        );
        assert_eq!(replay_bound(dir.path()).ok().flatten(), Some(2 * MB16));
        // Other segment sizes (initdb --wal-segsize).
        let dir = data_dir(1300, 0, &[("000000010000000000000001", 1 << 20)]);
        assert_eq!(replay_bound(dir.path()).ok().flatten(), Some(2 << 20));
    }

    #[test]
    fn files_that_do_not_say_give_no_bound() {
        let old = data_dir(1002, 0, &[("000000010000000000000001", MB16)]);
        assert_eq!(replay_bound(old.path()).ok().flatten(), None);
        let no_segment = data_dir(1300, 0, &[]);
        assert_eq!(replay_bound(no_segment.path()).ok().flatten(), None);
        let odd_size = data_dir(1300, 0, &[("000000010000000000000001", 1000)]);
        assert_eq!(replay_bound(odd_size.path()).ok().flatten(), None);
        let missing = tempfile::tempdir().expect("tempdir");
        assert!(replay_bound(missing.path()).is_err());
    }
}
