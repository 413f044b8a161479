//! Reading the kernel's mount table (`/proc/self/mountinfo`): which directories are mount points,
//! and which bind mounts share a filesystem with a given mount.

use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// `major:minor` of the mounted filesystem; bind mounts of one filesystem share it.
    pub device: String,
    /// The directory of the filesystem that is mounted here (`/disks/d1` for a bind of a view).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    pub fs_type: String,
}

pub fn read() -> Result<Vec<MountEntry>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .ctx(|| "cannot read /proc/self/mountinfo".to_string())?;
    Ok(parse(&text))
}

/// Parses mountinfo lines: `id parent major:minor root mount_point options [optional...] - type
/// source super_options`.
pub fn parse(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let dash = fields.iter().position(|f| *f == "-")?;
            Some(MountEntry {
                device: fields.get(2)?.to_string(),
                root: PathBuf::from(unescape(fields.get(3)?)),
                mount_point: PathBuf::from(unescape(fields.get(4)?)),
                fs_type: fields.get(dash + 1)?.to_string(),
            })
        })
        .collect()
}

/// The kernel writes space, tab, newline and backslash in paths as `\ooo` octal escapes.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            let octal = field
                .get(i + 1..i + 4)
                .and_then(|d| u8::from_str_radix(d, 8).ok());
            if let Some(value) = octal {
                out.push(value);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The topmost mount at exactly `path`, if `path` is a mount point.
pub fn mount_at<'a>(table: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    table.iter().rev().find(|m| m.mount_point == path)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 253:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
98 22 0:52 / /tmp/a\\040b/mnt ro,nosuid,nodev,relatime shared:60 - fuse.imgpool imgpool ro,user_id=0
99 22 0:52 /disks/d1 /data/d1/backing-images ro,nosuid shared:60 - fuse.imgpool imgpool ro,user_id=0
";

    #[test]
    fn parses_devices_paths_types_and_escapes() {
        let table = parse(SAMPLE);
        assert_eq!(table.len(), 3);
        assert_eq!(table[1].mount_point, PathBuf::from("/tmp/a b/mnt"));
        assert_eq!(table[1].fs_type, "fuse.imgpool");
        assert_eq!(table[2].device, table[1].device);
        assert_eq!(table[2].root, PathBuf::from("/disks/d1"));
        assert_eq!(
            mount_at(&table, Path::new("/data/d1/backing-images"))
                .unwrap()
                .device,
            "0:52"
        );
        assert!(mount_at(&table, Path::new("/data/d1")).is_none());
    }

    #[test]
    fn unescape_leaves_ordinary_text_alone() {
        assert_eq!(unescape("plain"), "plain");
        assert_eq!(unescape("tab\\011x"), "tab\tx");
        assert_eq!(unescape("trailing\\"), "trailing\\");
        assert_eq!(unescape("short\\04"), "short\\04");
    }
}
