//! The commands that change one volume: what `imgpool snapshot`, `volume rollback` and `volume
//! resize` do, in the command itself when no mount has the volume open, or in the daemon that
//! has it. Each
//! request is decided and applied under the volume's state lock: a batch is checked whole (an
//! unknown name refuses it all) against the snapshots as they are when it applies.

use serde::{Deserialize, Serialize};

use super::{Snapshot, Volume};
use crate::error::{Error, ErrorKind, Result};
use crate::format::volume::VolumeFiles;

/// Which snapshots a deletion takes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Selection {
    Names(Vec<String>),
    /// From `first` to `last`, both included, in creation order.
    Range {
        first: String,
        last: String,
    },
    /// Created before this time (Unix seconds).
    OlderThan(i64),
    /// All but the newest `n`.
    KeepLast(usize),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Request {
    Create {
        name: String,
        guid: String,
        created: i64,
    },
    List,
    Delete {
        selection: Selection,
        dry_run: bool,
    },
    Rollback {
        name: String,
        destroy_newer: bool,
    },
    /// Grow the volume to `size` bytes.
    Resize {
        size: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub name: String,
    pub guid: String,
    pub created: i64,
    pub size: u64,
    /// Bytes only this snapshot holds (listings only).
    #[serde(default)]
    pub unique_bytes: Option<u64>,
}

/// What a request did: the snapshots created, listed, deleted (or that would be) or destroyed
/// by a rollback; and the volume's size after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub snapshots: Vec<SnapshotInfo>,
    pub size: u64,
}

fn info(s: &Snapshot) -> SnapshotInfo {
    SnapshotInfo {
        name: s.name.clone(),
        guid: s.guid.clone(),
        created: s.created,
        size: s.size,
        unique_bytes: None,
    }
}

fn unknown(volume: &str, name: &str) -> Error {
    Error::refused(
        ErrorKind::NotFound,
        format!("volume '{volume}' has no snapshot '{name}': `imgpool snapshot list {volume}` lists them; nothing was deleted"),
    )
}

/// Which of `all` (in creation order) a selection takes; an unknown name refuses it all.
pub fn select<'a>(
    volume: &str,
    all: &'a [Snapshot],
    selection: &Selection,
) -> Result<Vec<&'a Snapshot>> {
    // By name in one pass: a batch of 100,000 names against as many snapshots is not squared.
    let positions: std::collections::HashMap<&str, usize> = all
        .iter()
        .enumerate()
        .map(|(at, s)| (s.name.as_str(), at))
        .collect();
    let find = |name: &str| positions.get(name).copied();
    Ok(match selection {
        Selection::Names(names) => {
            let mut taken = std::collections::HashSet::new();
            let mut chosen = Vec::new();
            for name in names {
                let at = find(name).ok_or_else(|| unknown(volume, name))?;
                if taken.insert(at) {
                    chosen.push(&all[at]);
                }
            }
            chosen
        }
        Selection::Range { first, last } => {
            let a = find(first).ok_or_else(|| unknown(volume, first))?;
            let b = find(last).ok_or_else(|| unknown(volume, last))?;
            if a > b {
                return Err(Error::refused(
                    ErrorKind::InvalidInput,
                    format!("'{first}' is newer than '{last}': a range goes from the older to the newer snapshot"),
                ));
            }
            all[a..=b].iter().collect()
        }
        Selection::OlderThan(time) => all.iter().filter(|s| s.created < *time).collect(),
        Selection::KeepLast(n) => all.iter().take(all.len().saturating_sub(*n)).collect(),
    })
}

/// Whether a request only reads: it is answered from the index, whoever writes the volume.
pub fn reads_only(request: &Request) -> bool {
    matches!(
        request,
        Request::List | Request::Delete { dry_run: true, .. }
    )
}

/// Answers a request that only reads (`reads_only`) from the volume's files, without opening it.
pub fn answer_from_files(files: &VolumeFiles, name: &str, request: &Request) -> Result<Outcome> {
    let io = |e: std::io::Error| Error::io(format!("volume '{name}'"), e);
    let (size, listed) = super::list_snapshots(files).map_err(io)?;
    let snapshots = match request {
        Request::Delete { selection, .. } => {
            let all: Vec<Snapshot> = listed.iter().map(|(s, _)| s.clone()).collect();
            select(name, &all, selection)?
                .into_iter()
                .map(info)
                .collect()
        }
        _ => listed
            .iter()
            .map(|(s, unique)| SnapshotInfo {
                unique_bytes: Some(*unique),
                ..info(s)
            })
            .collect(),
    };
    Ok(Outcome { snapshots, size })
}

/// A deletion refused because a snapshot it takes is being read (`Volume::open_snapshot`).
fn being_read(volume: &str, e: std::io::Error, what: &str) -> Error {
    Error::refused(ErrorKind::InUse, format!("volume '{volume}': {e}; {what}"))
}

/// Applies a request to `volume` (named `name` in messages).
pub fn apply(volume: &Volume, name: &str, request: &Request) -> Result<Outcome> {
    let io = |e: std::io::Error| Error::io(format!("volume '{name}'"), e);
    let refused_or_io = |e: std::io::Error, what: &str| {
        if e.kind() == std::io::ErrorKind::ResourceBusy {
            being_read(name, e, what)
        } else {
            io(e)
        }
    };
    let snapshots = match request {
        Request::Create {
            name: snapshot,
            guid,
            created,
        } => {
            if volume.find_snapshot(snapshot).map_err(io)?.is_some() {
                return Err(Error::refused(
                    ErrorKind::AlreadyExists,
                    format!(
                        "volume '{name}' has a snapshot '{snapshot}' already: pick another name"
                    ),
                ));
            }
            let taken = volume.snapshot(snapshot, guid, *created).map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    Error::refused(
                        ErrorKind::AlreadyExists,
                        format!("volume '{name}' has a snapshot '{snapshot}' already: pick another name"),
                    )
                } else {
                    io(e)
                }
            })?;
            vec![info(&taken)]
        }
        Request::List => volume
            .snapshots_with_unique_bytes()
            .map_err(io)?
            .into_iter()
            .map(|(s, unique)| SnapshotInfo {
                unique_bytes: Some(unique),
                ..info(&s)
            })
            .collect(),
        Request::Delete { selection, dry_run } => {
            let all = volume.snapshots().map_err(io)?;
            let chosen = select(name, &all, selection)?;
            let epochs: Vec<u64> = chosen.iter().map(|s| s.epoch).collect();
            if *dry_run {
                // A dry run says what the deletion would say.
                volume
                    .refuse_if_read(&epochs)
                    .map_err(|e| refused_or_io(e, "nothing would be deleted"))?;
            } else {
                volume
                    .delete_snapshots(&epochs)
                    .map_err(|e| refused_or_io(e, "nothing was deleted"))?;
            }
            chosen.into_iter().map(info).collect()
        }
        Request::Rollback {
            name: snapshot,
            destroy_newer,
        } => {
            let all = volume.snapshots().map_err(io)?;
            let at = all
                .iter()
                .position(|s| s.name == *snapshot)
                .ok_or_else(|| unknown(name, snapshot))?;
            let newer = &all[at + 1..];
            if !newer.is_empty() && !destroy_newer {
                return Err(Error::refused(
                    ErrorKind::Conflict,
                    format!(
                        "volume '{name}' has {} snapshot(s) newer than '{snapshot}' ({}): add --destroy-newer to delete them with the rollback",
                        newer.len(),
                        newer.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
            let epochs: Vec<u64> = newer.iter().map(|s| s.epoch).collect();
            volume
                .rollback(&all[at], &epochs)
                .map_err(|e| refused_or_io(e, "the volume was not rolled back"))?;
            newer.iter().map(info).collect()
        }
        Request::Resize { size } => {
            let now = volume.size();
            if *size < now {
                return Err(Error::refused(
                    ErrorKind::InvalidInput,
                    format!(
                        "volume '{name}' is {now} bytes and cannot shrink: a volume only grows"
                    ),
                ));
            }
            volume.resize(*size).map_err(io)?;
            Vec::new()
        }
    };
    Ok(Outcome {
        snapshots,
        size: volume.size(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshots(names: &[&str]) -> Vec<Snapshot> {
        names
            .iter()
            .enumerate()
            .map(|(i, n)| Snapshot {
                epoch: i as u64 + 1,
                name: n.to_string(),
                guid: String::new(),
                created: 100 * (i as i64 + 1),
                size: 0,
            })
            .collect()
    }

    fn names(chosen: Result<Vec<&Snapshot>>) -> Vec<String> {
        chosen.unwrap().iter().map(|s| s.name.clone()).collect()
    }

    #[test]
    fn selections_take_what_they_name_and_an_unknown_name_refuses_all() {
        let all = snapshots(&["a", "b", "c", "d"]);
        let pick = |s: Selection| select("v", &all, &s);
        assert_eq!(
            names(pick(Selection::Names(vec![
                "c".into(),
                "a".into(),
                "c".into()
            ]))),
            ["c", "a"]
        );
        assert_eq!(
            names(pick(Selection::Range {
                first: "b".into(),
                last: "c".into()
            })),
            ["b", "c"]
        );
        assert_eq!(names(pick(Selection::OlderThan(250))), ["a", "b"]);
        assert_eq!(names(pick(Selection::KeepLast(3))), ["a"]);
        assert!(names(pick(Selection::KeepLast(9))).is_empty());
        assert!(pick(Selection::Names(vec!["a".into(), "x".into()])).is_err());
        assert!(pick(Selection::Range {
            first: "c".into(),
            last: "b".into()
        })
        .is_err());
        assert!(pick(Selection::Range {
            first: "a".into(),
            last: "x".into()
        })
        .is_err());
    }
}
