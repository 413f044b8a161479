//! Pool-wide settings, kept in the metadata store so that the CLI and every mount daemon share
//! them: the default copy count and the limits of the health monitor and the repair.

use std::time::Duration;

use crate::core::store::Store;
use crate::error::{Error, ErrorKind, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Copies of a new image when `image add` is not given `--copies`.
    pub copies: u32,
    /// Copies the repair writes at once.
    pub repair_jobs: u32,
    /// Bytes per second the repair may read and write in all, 0 for no limit.
    pub repair_bandwidth: u64,
    /// How often the health monitor probes every disk.
    pub probe_interval: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            copies: 1,
            repair_jobs: 2,
            repair_bandwidth: 0,
            probe_interval: Duration::from_secs(10),
        }
    }
}

/// The slowest repair bandwidth that may be set (other than 0, no limit): below it, restoring a
/// lost copy of an ordinary image would take days.
pub const MIN_REPAIR_BANDWIDTH: u64 = 1 << 20;
/// Repair jobs at once: beyond this, copies only compete for the same disks.
pub const MAX_REPAIR_JOBS: u32 = 64;
/// The probe interval's bounds: probes more often than every second load the disks for nothing;
/// less often than every 10 minutes, a dead disk or one that came back waits too long to be seen.
pub const MIN_PROBE_INTERVAL: Duration = Duration::from_secs(1);
pub const MAX_PROBE_INTERVAL: Duration = Duration::from_secs(600);

pub struct Key {
    pub name: &'static str,
    pub help: &'static str,
}

pub const KEYS: [Key; 4] = [
    Key {
        name: "copies",
        help: "copies of a new image when `image add` has no --copies",
    },
    Key {
        name: "repair-jobs",
        help: "copies the repair writes at once",
    },
    Key {
        name: "repair-bandwidth",
        help: "bytes per second the repair may copy, e.g. 200MiB; 0: no limit, else at least 1MiB",
    },
    Key {
        name: "probe-interval",
        help: "how often every disk is probed, from 1s to 10m, e.g. 10s",
    },
];

fn unknown(key: &str) -> Error {
    let keys: Vec<&str> = KEYS.iter().map(|k| k.name).collect();
    Error::refused(
        ErrorKind::InvalidInput,
        format!(
            "no setting named '{key}': the settings are {}",
            keys.join(", ")
        ),
    )
}

impl Settings {
    pub(in crate::core) fn load(store: &Store) -> Result<Settings> {
        let mut settings = Settings::default();
        for key in &KEYS {
            if let Some(value) = store.setting(key.name)? {
                // A value that no longer parses (written by hand) falls back to the default.
                if let Err(e) = settings.apply(key.name, &value) {
                    tracing::warn!("ignoring setting {}: {e}", key.name);
                }
            }
        }
        Ok(settings)
    }

    /// Checks and records `key = value`. `usable_disks` are the pool's disks in service: a
    /// default of more copies than that would make every plain `image add` fail.
    pub(in crate::core) fn set(
        store: &Store,
        key: &str,
        value: &str,
        usable_disks: u32,
    ) -> Result<Settings> {
        let mut settings = Settings::load(store)?;
        settings.apply(key, value)?;
        let max_copies = usable_disks.max(1);
        if key == "copies" && settings.copies > max_copies {
            return Err(Error::refused(
                ErrorKind::InvalidInput,
                format!(
                    "invalid value {:?} for copies: the pool has {usable_disks} healthy disk(s), so give a whole number from 1 to {max_copies} (add disks with `imgpool disk add` for more)",
                    value.trim()
                ),
            ));
        }
        store.set_setting(key, Some(value.trim()))?;
        Ok(settings)
    }

    fn apply(&mut self, key: &str, value: &str) -> Result<()> {
        let value = value.trim();
        let bad = |why: &str| {
            Error::refused(
                ErrorKind::InvalidInput,
                format!("invalid value {value:?} for {key}: {why}"),
            )
        };
        match key {
            "copies" => {
                self.copies = value
                    .parse()
                    .ok()
                    .filter(|&n: &u32| n >= 1)
                    .ok_or_else(|| bad("give a whole number of at least 1"))?
            }
            "repair-jobs" => {
                self.repair_jobs = value
                    .parse()
                    .ok()
                    .filter(|n: &u32| (1..=MAX_REPAIR_JOBS).contains(n))
                    .ok_or_else(|| {
                        bad(&format!("give a whole number from 1 to {MAX_REPAIR_JOBS}"))
                    })?
            }
            "repair-bandwidth" => {
                let rate = crate::format::units::parse_size(value.trim_end_matches("/s"))
                    .map_err(|e| bad(&e))?;
                if rate != 0 && rate < MIN_REPAIR_BANDWIDTH {
                    return Err(bad(&format!(
                        "give 0 (no limit) or at least {}MiB/s, e.g. 200MiB",
                        MIN_REPAIR_BANDWIDTH >> 20
                    )));
                }
                self.repair_bandwidth = rate
            }
            "probe-interval" => {
                self.probe_interval = humantime::parse_duration(value)
                    .ok()
                    .filter(|d| (MIN_PROBE_INTERVAL..=MAX_PROBE_INTERVAL).contains(d))
                    .ok_or_else(|| {
                        bad(&format!(
                            "give a duration from {} to {}, e.g. 10s",
                            humantime::format_duration(MIN_PROBE_INTERVAL),
                            humantime::format_duration(MAX_PROBE_INTERVAL)
                        ))
                    })?
            }
            _ => return Err(unknown(key)),
        }
        Ok(())
    }

    /// Each setting's name and current value, as `config list` shows them.
    pub fn values(&self) -> Vec<(&'static str, String)> {
        vec![
            ("copies", self.copies.to_string()),
            ("repair-jobs", self.repair_jobs.to_string()),
            (
                "repair-bandwidth",
                match self.repair_bandwidth {
                    0 => "0".to_string(),
                    n => format!("{}/s", crate::format::units::bytes(n)),
                },
            ),
            (
                "probe-interval",
                humantime::format_duration(self.probe_interval).to_string(),
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked_stored_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(Settings::load(&store).unwrap(), Settings::default());
        Settings::set(&store, "copies", "2", 3).unwrap();
        Settings::set(&store, "repair-bandwidth", "100MiB/s", 3).unwrap();
        Settings::set(&store, "probe-interval", "2s", 3).unwrap();
        let loaded = Settings::load(&store).unwrap();
        assert_eq!(loaded.copies, 2);
        assert_eq!(loaded.repair_bandwidth, 100 << 20);
        assert_eq!(loaded.probe_interval, Duration::from_secs(2));
        for (key, value, range) in [
            ("copies", "0", "at least 1"),
            ("copies", "4", "from 1 to 3"),
            ("copies", "99", "from 1 to 3"),
            ("repair-jobs", "many", "from 1 to 64"),
            ("repair-jobs", "65", "from 1 to 64"),
            ("repair-bandwidth", "1", "at least 1MiB/s"),
            ("repair-bandwidth", "1023KiB", "at least 1MiB/s"),
            ("probe-interval", "1ms", "from 1s to 10m"),
            ("probe-interval", "11m", "from 1s to 10m"),
            ("probe-interval", "1day", "from 1s to 10m"),
            ("colour", "blue", "the settings are"),
        ] {
            let refused = Settings::set(&store, key, value, 3).unwrap_err();
            assert_eq!(refused.kind(), ErrorKind::InvalidInput, "{key}={value}");
            assert!(
                refused.to_string().contains(range),
                "{key}={value}: {refused}"
            );
        }
        assert_eq!(Settings::load(&store).unwrap(), loaded);
        // The bounds themselves are accepted, and 0 is no limit.
        for (key, value) in [
            ("copies", "3"),
            ("repair-jobs", "64"),
            ("repair-bandwidth", "1MiB"),
            ("repair-bandwidth", "0"),
            ("probe-interval", "1s"),
            ("probe-interval", "10m"),
        ] {
            Settings::set(&store, key, value, 3).unwrap();
        }
    }
}
