//! The daemon's configuration and the file through which the CLI finds a running daemon.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where the API listens unless told otherwise: loopback only.
pub const DEFAULT_API_LISTEN: &str = "127.0.0.1:7540";
/// The shared proxy port, where `options=branch=NAME` chooses the branch.
pub const DEFAULT_PROXY_LISTEN: &str = "127.0.0.1:55431";
/// The first port handed to branches.
pub const DEFAULT_PORT_BASE: u16 = 55432;
/// See [`Config::checkpoint_before_branch`]: at most about half a second of replay on this
/// kind of machine (docs/pagestore.md).
pub const DEFAULT_CHECKPOINT_BEFORE_BRANCH: u64 = 64 << 20;

#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub api_listen: SocketAddr,
    /// `copy`, `pagestore`, or `auto` (the pagestore where FUSE works, else copy; an existing
    /// data directory keeps its driver).
    pub storage: String,
    /// Why the data directory has its driver (set by the daemon at start).
    pub storage_reason: Option<String>,
    pub port_base: u16,
    /// The OS user computes run as when the daemon is root (default `postgres`).
    pub compute_user: Option<String>,
    /// Overrides the PostgreSQL installation (`STEMMA_PG_BIN`).
    pub pg_bin: Option<PathBuf>,
    /// The root branch created on first start.
    pub root_branch: String,
    /// How often the daemon deletes expired branches.
    pub expiry_interval: std::time::Duration,
    /// The shared proxy port.
    pub proxy_listen: SocketAddr,
    /// Idle time after which a compute is suspended, unless its branch says otherwise.
    pub suspend_timeout: std::time::Duration,
    /// At most this many computes run at once.
    pub max_computes: usize,
    /// A crash-consistent branch of a running parent that has written more WAL than this
    /// since its last checkpoint is taken after a checkpoint of the parent, so that the branch
    /// has little to replay when it starts; 0 never checkpoints.
    pub checkpoint_before_branch: u64,
    /// The pagestore's retention window, when given (`--retention`); kept in the metadata,
    /// so that a later start without it keeps the window (7 days when never given).
    pub retention: Option<std::time::Duration>,
    /// A certificate chain and key (PEM) for TLS on the proxy's ports.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// The project's `stemma.toml` (defaults when there is none).
    pub project: crate::ProjectConfig,
}

impl Config {
    pub fn new(data_dir: PathBuf) -> Self {
        Config {
            data_dir,
            api_listen: DEFAULT_API_LISTEN
                .parse()
                .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 7540))),
            storage: "auto".into(),
            storage_reason: None,
            port_base: DEFAULT_PORT_BASE,
            compute_user: None,
            pg_bin: None,
            root_branch: "main".into(),
            // Expired branches go within 30 seconds of expiry.
            expiry_interval: std::time::Duration::from_secs(10),
            proxy_listen: DEFAULT_PROXY_LISTEN
                .parse()
                .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 55431))),
            suspend_timeout: std::time::Duration::from_secs(300),
            max_computes: 32,
            checkpoint_before_branch: DEFAULT_CHECKPOINT_BEFORE_BRANCH,
            retention: None,
            tls: None,
            project: crate::ProjectConfig::default(),
        }
    }

    pub fn metadata_path(&self) -> PathBuf {
        self.data_dir.join("metadata.db")
    }
    pub fn token_path(&self) -> PathBuf {
        token_path(&self.data_dir)
    }
    pub fn info_path(&self) -> PathBuf {
        info_path(&self.data_dir)
    }
    pub fn timelines_dir(&self) -> PathBuf {
        self.data_dir.join("timelines")
    }
    pub fn logs_dir(&self) -> PathBuf {
        self.data_dir.join("logs")
    }
    pub fn scratch_dir(&self) -> PathBuf {
        self.data_dir.join("scratch")
    }
}

/// The API token file in a data directory (mode 0600).
pub fn token_path(data_dir: &Path) -> PathBuf {
    data_dir.join("api-token")
}

/// The file a running daemon writes so that the CLI can find it.
pub fn info_path(data_dir: &Path) -> PathBuf {
    data_dir.join("daemon.json")
}

/// Contents of `daemon.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DaemonInfo {
    pub pid: u32,
    pub api_url: String,
    pub started_at: chrono::DateTime<chrono::Utc>,
}

impl DaemonInfo {
    pub fn read(data_dir: &Path) -> Option<DaemonInfo> {
        let text = std::fs::read_to_string(info_path(data_dir)).ok()?;
        serde_json::from_str(&text).ok()
    }
}
