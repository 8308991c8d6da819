//! A SQL session of the control plane on a compute's Unix socket, for the few things the
//! control plane asks PostgreSQL itself (online backups, checkpoints before a branch point).

use tokio_postgres::{Client, NoTls};

use crate::{ComputeError, Result};

/// Where and as whom to connect: the compute's socket directory and port, and a superuser.
#[derive(Debug, Clone, Copy)]
pub struct SessionTarget<'a> {
    pub socket_dir: &'a std::path::Path,
    pub port: u16,
    pub user: &'a str,
    pub password: &'a str,
}

/// An open session. Dropping it closes the connection.
pub(crate) struct Session {
    pub(crate) client: Client,
    connection: tokio::task::JoinHandle<()>,
}

impl Session {
    /// Connects to the `postgres` database; `purpose` names the session in errors, logs and
    /// `pg_stat_activity.application_name`.
    pub(crate) async fn connect(target: SessionTarget<'_>, purpose: &'static str) -> Result<Self> {
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(target.socket_dir)
            .port(target.port)
            .user(target.user)
            .password(target.password)
            .dbname("postgres")
            .application_name(purpose);
        let (client, connection) =
            config
                .connect(NoTls)
                .await
                .map_err(|source| ComputeError::Postgres {
                    context: format!(
                        "connecting to the compute on port {} as {} ({purpose})",
                        target.port, target.user
                    ),
                    source,
                })?;
        let connection = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, purpose, "compute session ended");
            }
        });
        Ok(Session { client, connection })
    }

    /// Closes the session and waits for the connection to end.
    pub(crate) async fn close(self) {
        drop(self.client);
        let _ = self.connection.await;
    }
}

/// Maps a PostgreSQL error to one that says what was being done.
pub(crate) fn pg(context: &'static str) -> impl Fn(tokio_postgres::Error) -> ComputeError {
    move |source| ComputeError::Postgres {
        context: context.to_string(),
        source,
    }
}
