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

use crate::session::{pg, Session, SessionTarget};
use crate::Result;

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
