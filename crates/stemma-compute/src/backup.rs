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

use tokio_postgres::NoTls;

use crate::{ComputeError, Result};

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
    client: tokio_postgres::Client,
    connection: tokio::task::JoinHandle<()>,
    server_version: i32,
}

impl OnlineBackup {
    /// Connects to the compute's Unix socket in `socket_dir` and starts a backup with a fast
    /// checkpoint.
    pub async fn start(
        socket_dir: &std::path::Path,
        port: u16,
        user: &str,
        password: &str,
        label: &str,
    ) -> Result<Self> {
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(socket_dir)
            .port(port)
            .user(user)
            .password(password)
            .dbname("postgres")
            .application_name("stemma-clone");
        let (client, connection) =
            config
                .connect(NoTls)
                .await
                .map_err(|source| ComputeError::Postgres {
                    context: format!(
                        "connecting to the compute on port {port} for an online backup"
                    ),
                    source,
                })?;
        let connection = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "online backup session ended");
            }
        });
        let pg = |context: &'static str| {
            move |source| ComputeError::Postgres {
                context: context.to_string(),
                source,
            }
        };
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
            client,
            connection,
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
        let row =
            self.client
                .query_one(stop, &[])
                .await
                .map_err(|source| ComputeError::Postgres {
                    context: "stopping the online backup".into(),
                    source,
                })?;
        let files = BackupFiles {
            backup_label: row.get::<_, Option<String>>(0).unwrap_or_default(),
            tablespace_map: row.get::<_, Option<String>>(1).unwrap_or_default(),
        };
        drop(self.client);
        let _ = self.connection.await;
        Ok(files)
    }
}
