//! Reading the kernel's mount table (`/proc/self/mountinfo`): which directories are mount points,
//! which bind mounts share a filesystem with a given mount, and which pool and daemon an imgpool
//! mount belongs to (its source, `MountSource`).

use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// The kernel's id of this mount (of this bind, for a bind mount); freed ids are reused.
    pub id: u64,
    /// `major:minor` of the mounted filesystem; bind mounts of one filesystem share it.
    pub device: String,
    /// The directory of the filesystem that is mounted here (`/disks/d1` for a bind of a view).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    pub fs_type: String,
    /// What was mounted (the `mount` command's first argument); bind mounts keep their
    /// filesystem's.
    pub source: String,
}

impl MountEntry {
    /// Whether this is a bind of a directory inside a filesystem rather than its root.
    pub fn is_bind(&self) -> bool {
        self.root != Path::new("/")
    }
}

/// The source an imgpool mount carries in the mount table, and every bind of it with it:
/// `imgpool:<pool uuid>:<mount row id>`. It tells which pool a mount belongs to and which daemon
/// made it, without asking the mount itself (which hangs or fails when its daemon is gone).
/// Mounts made before it existed carry plain `imgpool`, which names neither.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSource {
    pub pool: String,
    pub mount_id: i64,
}

const SOURCE_PREFIX: &str = "imgpool:";

impl MountSource {
    pub fn parse(source: &str) -> Option<MountSource> {
        let (pool, mount_id) = source.strip_prefix(SOURCE_PREFIX)?.rsplit_once(':')?;
        Some(MountSource {
            pool: pool.to_string(),
            mount_id: mount_id.parse().ok()?,
        })
    }
}

impl std::fmt::Display for MountSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{SOURCE_PREFIX}{}:{}", self.pool, self.mount_id)
    }
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
                id: fields.first()?.parse().ok()?,
                device: fields.get(2)?.to_string(),
                root: PathBuf::from(unescape(fields.get(3)?)),
                mount_point: PathBuf::from(unescape(fields.get(4)?)),
                fs_type: fields.get(dash + 1)?.to_string(),
                source: unescape(fields.get(dash + 2)?),
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
98 22 0:52 / /tmp/a\\040b/mnt ro,nosuid,nodev,relatime shared:60 - fuse.imgpool imgpool:5f0c-4e:7 ro,user_id=0
99 22 0:52 /disks/d1 /data/d1/backing-images ro,nosuid shared:60 - fuse.imgpool imgpool:5f0c-4e:7 ro,user_id=0
";

    #[test]
    fn parses_devices_paths_types_and_escapes() {
        let table = parse(SAMPLE);
        assert_eq!(table.len(), 3);
        assert_eq!(table[1].mount_point, PathBuf::from("/tmp/a b/mnt"));
        assert_eq!(table[1].fs_type, "fuse.imgpool");
        assert_eq!(table[2].device, table[1].device);
        assert_eq!(table[2].root, PathBuf::from("/disks/d1"));
        assert_eq!(table[2].id, 99);
        assert!(table[2].is_bind() && !table[1].is_bind());
        assert_eq!(table[0].source, "/dev/vda");
        assert_eq!(table[2].source, table[1].source);
        assert_eq!(
            mount_at(&table, Path::new("/data/d1/backing-images"))
                .unwrap()
                .device,
            "0:52"
        );
        assert!(mount_at(&table, Path::new("/data/d1")).is_none());
    }

    #[test]
    fn a_mount_source_names_its_pool_and_mount() {
        let source = MountSource {
            pool: "5f0c-4e".into(),
            mount_id: 7,
        };
        assert_eq!(source.to_string(), "imgpool:5f0c-4e:7");
        assert_eq!(MountSource::parse("imgpool:5f0c-4e:7"), Some(source));
        for other in [
            "imgpool",
            "imgpool:5f0c",
            "imgpool:5f0c:x",
            "/dev/vda",
            "tmpfs",
        ] {
            assert_eq!(MountSource::parse(other), None, "{other}");
        }
    }

    #[test]
    fn unescape_leaves_ordinary_text_alone() {
        assert_eq!(unescape("plain"), "plain");
        assert_eq!(unescape("tab\\011x"), "tab\tx");
        assert_eq!(unescape("trailing\\"), "trailing\\");
        assert_eq!(unescape("short\\04"), "short\\04");
    }
}
