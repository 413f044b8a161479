//! Statistics a mount daemon publishes for `imgpool status`: one JSON file per mount in
//! `<state dir>/stats/`, rewritten every second (temporary name, then rename, so a reader
//! never sees half a file). They are ephemeral: no fsync, and a daemon removes its file when
//! it stops. Fields, units and definitions: `docs/statistics.md`.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fs::read::ReadStats;
use crate::fs::IoMode;

const STATS_DIR: &str = "stats";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MountStats {
    pub mount_id: i64,
    /// Seconds since the epoch when the daemon wrote this.
    pub updated: i64,
    pub io_mode_requested: IoMode,
    /// What the kernel agreed to: passthrough falls back to cached when refused.
    pub io_mode: IoMode,
    pub read: ReadStats,
}

fn path(state_dir: &Path, mount_id: i64) -> PathBuf {
    state_dir
        .join(STATS_DIR)
        .join(format!("mount-{mount_id}.json"))
}

pub fn publish(state_dir: &Path, stats: &MountStats) -> io::Result<()> {
    let dir = state_dir.join(STATS_DIR);
    std::fs::create_dir_all(&dir)?;
    let target = path(state_dir, stats.mount_id);
    let staging = dir.join(format!(".mount-{}.json.new", stats.mount_id));
    std::fs::write(&staging, serde_json::to_vec_pretty(stats)?)?;
    std::fs::rename(&staging, &target)
}

/// The last statistics of a mount, if its daemon published any.
pub fn load(state_dir: &Path, mount_id: i64) -> Option<MountStats> {
    let bytes = std::fs::read(path(state_dir, mount_id)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

pub fn remove(state_dir: &Path, mount_id: i64) {
    let _ = std::fs::remove_file(path(state_dir, mount_id));
}

/// Removes the files of mounts that are gone (a daemon killed with -9 leaves its file).
pub fn sweep(state_dir: &Path, live_mounts: &[i64]) {
    let Ok(entries) = std::fs::read_dir(state_dir.join(STATS_DIR)) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let id = name
            .to_str()
            .and_then(|n| n.trim_start_matches('.').strip_prefix("mount-"))
            .and_then(|n| n.split('.').next())
            .and_then(|n| n.parse::<i64>().ok());
        if id.is_none_or(|id| !live_mounts.contains(&id)) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(mount_id: i64, hits: u64) -> MountStats {
        let mut read = ReadStats::default();
        read.cache.hits = hits;
        MountStats {
            mount_id,
            updated: crate::format::clock::now(),
            io_mode_requested: IoMode::Passthrough,
            io_mode: IoMode::Cached,
            read,
        }
    }

    #[test]
    fn published_stats_read_back_and_gone_mounts_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        publish(dir.path(), &stats(1, 5)).unwrap();
        publish(dir.path(), &stats(1, 7)).unwrap();
        publish(dir.path(), &stats(2, 9)).unwrap();
        let one = load(dir.path(), 1).unwrap();
        assert_eq!(one.read.cache.hits, 7);
        assert_eq!(one.io_mode, IoMode::Cached);
        sweep(dir.path(), &[2]);
        assert!(load(dir.path(), 1).is_none());
        assert_eq!(load(dir.path(), 2).unwrap().read.cache.hits, 9);
        remove(dir.path(), 2);
        assert!(load(dir.path(), 2).is_none());
        assert!(load(dir.path(), 3).is_none());
    }
}
