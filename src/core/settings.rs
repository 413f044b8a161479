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
        help: "bytes per second the repair may copy, e.g. 200MiB (0: no limit)",
    },
    Key {
        name: "probe-interval",
        help: "how often every disk is probed, e.g. 10s",
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

    /// Checks and records `key = value`.
    pub(in crate::core) fn set(store: &Store, key: &str, value: &str) -> Result<Settings> {
        let mut settings = Settings::load(store)?;
        settings.apply(key, value)?;
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
                    .filter(|n: &u32| (1..=64).contains(n))
                    .ok_or_else(|| bad("give a whole number from 1 to 64"))?
            }
            "repair-bandwidth" => {
                self.repair_bandwidth =
                    crate::format::units::parse_size(value.trim_end_matches("/s"))
                        .map_err(|e| bad(&e))?
            }
            "probe-interval" => {
                self.probe_interval = humantime::parse_duration(value)
                    .ok()
                    .filter(|d| *d >= Duration::from_secs(1))
                    .ok_or_else(|| bad("give a duration of at least 1s, e.g. 10s"))?
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
        Settings::set(&store, "copies", "2").unwrap();
        Settings::set(&store, "repair-bandwidth", "100MiB/s").unwrap();
        Settings::set(&store, "probe-interval", "2s").unwrap();
        let loaded = Settings::load(&store).unwrap();
        assert_eq!(loaded.copies, 2);
        assert_eq!(loaded.repair_bandwidth, 100 << 20);
        assert_eq!(loaded.probe_interval, Duration::from_secs(2));
        for (key, value) in [
            ("copies", "0"),
            ("repair-jobs", "many"),
            ("probe-interval", "1ms"),
            ("colour", "blue"),
        ] {
            assert!(Settings::set(&store, key, value).is_err(), "{key}={value}");
        }
        assert_eq!(Settings::load(&store).unwrap(), loaded);
    }
}
