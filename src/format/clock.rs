//! Wall-clock time as the store and the disks' records keep it: whole seconds since the epoch.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Seconds since the epoch; 0 on a clock set before 1970.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A stored time as RFC 3339, to the second, in UTC.
pub fn timestamp(secs: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}
