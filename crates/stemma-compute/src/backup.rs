//! Online backups: how a running compute is cloned consistently by file-copying drivers.
//!
//! The procedure is PostgreSQL's documented low-level base backup ("Making a Base Backup Using
//! the Low Level API"): `pg_backup_start`, copy the data files, `pg_backup_stop`, then copy the
//! WAL and write the returned backup label into the copy. Starting the copy then replays the
//! WAL from the backup's checkpoint to past the backup's end, which makes it consistent.
//!
//! The low-level API does not keep WAL from being recycled while the files are copied, so the
//! same session first creates a *temporary* physical replication slot that reserves WAL from
//! the current redo point; it disappears with the session.

use crate::session::{pg, Session, SessionTarget};
use crate::Result;

/// The files that make a copy taken during a backup recoverable.
#[derive(Debug, Clone)]
pub struct BackupFiles {
    pub backup_label: String,
    /// Empty when the cluster has no tablespaces.
    pub tablespace_map: String,
}

/// An online backup in progress on one compute. Dropping it without [`OnlineBackup::stop`]
/// closes the session, which aborts the backup and drops the slot.
pub struct OnlineBackup {
    session: Session,
    server_version: i32,
}

impl OnlineBackup {
    /// Connects to the compute's Unix socket and starts a backup with a fast checkpoint.
    pub async fn start(target: SessionTarget<'_>, label: &str) -> Result<Self> {
        let session = Session::connect(target, "stemma-clone").await?;
        let client = &session.client;
        let row = client
            .query_one("SELECT current_setting('server_version_num')::int", &[])
            .await
            .map_err(pg("reading the server version"))?;
        let server_version: i32 = row.get(0);
        let slot = format!("stemma_clone_{:016x}", rand::random::<u64>());
        client
            .execute(
                "SELECT pg_create_physical_replication_slot($1, true, true)",
                &[&slot],
            )
            .await
            .map_err(pg("reserving WAL with a temporary replication slot"))?;
        let start = if server_version >= 150000 {
            "SELECT pg_backup_start($1, true)"
        } else {
            "SELECT pg_start_backup($1, true, false)"
        };
        client
            .execute(start, &[&label])
            .await
            .map_err(pg("starting the online backup"))?;
        Ok(OnlineBackup {
            session,
            server_version,
        })
    }

    /// Ends the backup and returns the label to write into the copy. Call it after the data
    /// files are copied and before the WAL is.
    pub async fn stop(self) -> Result<BackupFiles> {
        let stop = if self.server_version >= 150000 {
            "SELECT labelfile, spcmapfile FROM pg_backup_stop(false)"
        } else {
            "SELECT labelfile, spcmapfile FROM pg_stop_backup(false, false)"
        };
        let row = self
            .session
            .client
            .query_one(stop, &[])
            .await
            .map_err(pg("stopping the online backup"))?;
        let files = BackupFiles {
            backup_label: row.get::<_, Option<String>>(0).unwrap_or_default(),
            tablespace_map: row.get::<_, Option<String>>(1).unwrap_or_default(),
        };
        self.session.close().await;
        Ok(files)
    }
}
