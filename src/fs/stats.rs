//! What a mount reports for `imgpool status`: its io mode and read statistics. The daemon
//! answers them on its control socket (`GET /v1/stats`), read live at each request. Fields,
//! units and definitions: `docs/statistics.md`.

use serde::{Deserialize, Serialize};

use crate::fs::read::ReadStats;
use crate::fs::IoMode;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MountStats {
    pub mount_id: i64,
    /// Seconds since the epoch when the daemon read these figures.
    pub updated: i64,
    pub io_mode_requested: IoMode,
    /// What the kernel agreed to: passthrough falls back to cached when refused.
    pub io_mode: IoMode,
    pub read: ReadStats,
    /// Each in-service disk's bind mount as the daemon last checked it (none with `--no-bind`).
    #[serde(default)]
    pub binds: Vec<BindStatus>,
    /// Open files of each volume this mount has open.
    #[serde(default)]
    pub volume_open_files: std::collections::BTreeMap<String, usize>,
}

/// One disk's view bound at `<disk>/backing-images`, or why it is not.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BindStatus {
    pub disk: String,
    pub target: std::path::PathBuf,
    /// `None` while the view is bound there.
    pub problem: Option<String>,
}
