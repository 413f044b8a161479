//! Names of images, disks and holders: what the pool accepts and why.
//!
//! Image and disk names become path components in the mount (`images/<name>`,
//! `disks/<disk>/<name>-<uuid>`), so they must be valid single components there.

use crate::error::{Error, Result};

/// Linux's NAME_MAX: the longest single path component.
pub const NAME_MAX: usize = 255;
/// `-` plus a hyphenated UUID: what Longhorn's layout appends to an image name.
const UUID_SUFFIX_LEN: usize = 37;
/// The longest image name whose `<name>-<uuid>` directory still fits in NAME_MAX.
pub const IMAGE_NAME_MAX: usize = NAME_MAX - UUID_SUFFIX_LEN;
/// Holders are opaque strings (replica ids); the bound only keeps the store sane.
pub const HOLDER_MAX: usize = 1024;

pub fn check_image_name(name: &str) -> Result<()> {
    check_component("image", name, IMAGE_NAME_MAX)
}

/// A snapshot name: an image name without `@` (it ends the volume's name in `VOLUME@SNAP`) or
/// `%` (it separates a range).
pub fn check_snapshot_name(name: &str) -> Result<()> {
    check_image_name(name)?;
    if name.contains(['@', '%']) {
        return Err(Error::InvalidName {
            what: "snapshot",
            name: name.to_string(),
            reason: "it contains '@' or '%', which `VOLUME@FIRST%LAST` uses".to_string(),
        });
    }
    Ok(())
}

pub fn check_disk_name(name: &str) -> Result<()> {
    check_component("disk", name, NAME_MAX)
}

pub fn check_holder(holder: &str) -> Result<()> {
    let reason = if holder.is_empty() {
        Some("it is empty".to_string())
    } else if holder.contains('\0') {
        Some("it contains a NUL byte".to_string())
    } else if holder.chars().any(char::is_control) {
        // A newline or an escape sequence in a holder would forge lines or colours in every
        // listing that shows it.
        Some("it contains a control character".to_string())
    } else if holder.len() > HOLDER_MAX {
        Some(format!(
            "it is {} bytes long, the limit is {HOLDER_MAX}",
            holder.len()
        ))
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::InvalidName {
            what: "holder",
            name: holder.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

fn check_component(what: &'static str, name: &str, max: usize) -> Result<()> {
    let reason = if name.is_empty() {
        Some("it is empty".to_string())
    } else if name.contains('/') {
        Some("it contains '/'".to_string())
    } else if name.contains('\0') {
        Some("it contains a NUL byte".to_string())
    } else if name.contains("..") {
        Some("it contains '..'".to_string())
    } else if name == "." {
        Some("'.' names the current directory".to_string())
    } else if name.starts_with('-') {
        Some("it starts with '-', which commands would read as an option".to_string())
    } else if name.chars().any(char::is_control) {
        Some("it contains a control character".to_string())
    } else if name.len() > max {
        Some(format!(
            "it is {} bytes long, the limit is {max}",
            name.len()
        ))
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::InvalidName {
            what,
            name: name.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for name in [
            "ubuntu-24.04",
            "img_1",
            "a",
            "golden.qcow2",
            "x".repeat(218).as_str(),
        ] {
            check_image_name(name).unwrap();
        }
        check_disk_name(&"d".repeat(255)).unwrap();
    }

    #[test]
    fn rejects_names_that_are_not_one_path_component() {
        let bad = [
            "",
            ".",
            "..",
            "a/b",
            "/abs",
            "a..b",
            "nul\0byte",
            "-rf",
            "tab\there",
        ];
        for name in bad {
            assert!(check_image_name(name).is_err(), "{name:?} accepted");
            assert!(check_disk_name(name).is_err(), "{name:?} accepted");
        }
    }

    #[test]
    fn length_limits_leave_room_for_the_uuid_suffix() {
        assert!(check_image_name(&"x".repeat(IMAGE_NAME_MAX + 1)).is_err());
        assert!(check_image_name(&"x".repeat(256)).is_err());
        assert!(check_disk_name(&"x".repeat(256)).is_err());
        let message = check_image_name(&"x".repeat(300)).unwrap_err().to_string();
        assert!(message.contains("300 bytes"), "{message}");
    }

    #[test]
    fn holders_are_free_form_but_bounded() {
        check_holder("pvc-1234/replica-a:disk 3").unwrap();
        assert!(check_holder("").is_err());
        assert!(check_holder("a\0b").is_err());
        for control in [
            "a\nb",
            "tab\there",
            "esc\u{1b}[31m",
            "del\u{7f}",
            "c1\u{85}",
        ] {
            let refused = check_holder(control).unwrap_err().to_string();
            assert!(refused.contains("control character"), "{refused}");
        }
        assert!(check_holder(&"h".repeat(HOLDER_MAX + 1)).is_err());
    }
}
