//! Copies of images on disks: the one rule for which copy is good, and every change of a copy's
//! state. This module is the only code that inserts, changes or deletes a copy row; the store
//! runs its statements inside the store's write transactions, so that a check and the change it
//! allows cannot be separated by another process's change.
//!
//! One deletion happens elsewhere, by design: deleting an image's row deletes its copy rows with
//! it (`ON DELETE CASCADE`), which the image's removal does only after the copies' files are
//! gone, and an import does when it undoes its own reservation.
//!
//! The state machine (`decide`) is a pure function, shared with the repair planner's model test:
//!
//! ```text
//!   (no row) --StartCopy--> copying --Committed--> ready <--Verified-- unverified, damaged
//!   (no row) --Found------> unverified     ready, damaged --Suspect, DiskReturned--> unverified
//!   ready, unverified, damaged --Faulted--> failed, or damaged when no other good copy exists
//!   ready, unverified, damaged --Missing--> failed (its file is gone: nothing is left to serve)
//!   (Suspect of the last good copy: damaged, so that the image stays readable)
//!   any but copying --Remove--> removing (only while enough good copies remain without it,
//!                               and never the last serving copy)
//!   any --Forget--> removing (`disk rm`; not a copy that may hold the last good data)
//!   copying, removing --Abandoned--> removing (its writer is gone)
//!   removing, copying --Deleted--> (no row)
//! ```

use rusqlite::{params, Connection, OptionalExtension};

use crate::core::state::{CopyState, DiskState, ImageState};

/// A copy as the rule sees it: its state, its disk's state, and whether the disk carries its
/// label now (a live observation the store does not hold).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyView {
    pub state: CopyState,
    pub disk: DiskState,
    pub reachable: bool,
}

impl CopyView {
    /// Whether the copy serves reads: ready, or damaged (the last good copy: every chunk read is
    /// checked, so its good chunks are still served), on a reachable disk in service.
    pub fn serves(self) -> bool {
        matches!(self.state, CopyState::Ready | CopyState::Damaged)
            && self.disk != DiskState::Failed
            && self.reachable
    }

    /// Whether the copy is good: verified and undamaged, on a reachable disk in service. Good
    /// copies are the sources of new copies, and no change leaves an image without one that had
    /// one. `GOOD_SQL` is the same rule in the store (without the reachability, which only a
    /// look at the disk can tell).
    pub fn is_good(self) -> bool {
        self.state == CopyState::Ready && self.disk != DiskState::Failed && self.reachable
    }

    /// Whether the copy counts toward the image's copy policy: good, on a disk that is not being
    /// evicted. `COUNTING_SQL` is the same rule in the store.
    pub fn counts(self) -> bool {
        self.is_good() && self.disk == DiskState::Healthy
    }
}

/// `CopyView::is_good` over `copies c JOIN disks d`.
pub const GOOD_SQL: &str = "c.state = 'ready' AND d.state != 'failed'";
/// `CopyView::counts` over `copies c JOIN disks d`.
pub const COUNTING_SQL: &str = "c.state = 'ready' AND d.state = 'healthy'";
/// `CopyView::serves` over `copies c JOIN disks d`.
pub const SERVING_SQL: &str = "c.state IN ('ready', 'damaged') AND d.state != 'failed'";

/// Something that happens to a copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event<'a> {
    /// An import reserves a copy of its image: the image row is `importing`, so nothing serves
    /// the copy until the import commits, after every copy was written and checked.
    Reserved,
    /// The repair starts writing a copy: never served until `Committed`.
    StartCopy,
    /// The copy's data is durable and matched the image's checksums while it was written.
    Committed,
    /// `fsck` found a copy on a disk that the store did not list.
    Found,
    /// A whole read of the copy matched the image's SHA-512 and chunk digests.
    Verified,
    /// The copy is no longer trusted (fsck found its digest file damaged): verified before it
    /// serves again, unless it is the image's last good copy, which keeps serving as `damaged`
    /// (every chunk is checked as it is read) until a scrub or the repair settles it.
    Suspect(&'a str),
    /// Its disk returns from being out of service: whatever it holds is verified before it
    /// serves (the copy did not serve while the disk was out).
    DiskReturned,
    /// A read error or a chunk that does not match its digest, on a disk that passed its probe.
    Faulted(&'a str),
    /// The copy's data file is gone from a disk that carries its label (deleted behind the
    /// pool's back). Unlike a fault, even the last good copy fails: no chunk of it is left to
    /// serve, and the image's state must say so. Ignored for an image that is not `ready`
    /// (checked in the transaction): a removal deletes the files before the rows.
    Missing(&'a str),
    /// Removal, allowed only while at least `keep` good copies remain without this one
    /// (counting copies on evicting disks with `count_evicting`). A copy being written is left
    /// to its writer.
    Remove { keep: u32, count_evicting: bool },
    /// `disk rm`: the copy goes with its disk, unless it may hold the last good data of a ready
    /// image (ready, damaged or unverified, with no other good copy).
    Forget { image_ready: bool },
    /// Recovery takes over a copy that a repair no longer running was writing or removing (the
    /// caller holds the repair lock).
    Abandoned,
    /// The copy's files are gone (or never finished): the row goes.
    Deleted,
}

/// What an event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Now(CopyState),
    Deleted,
    /// The event does not apply to the copy's state (or the copy is gone, or it would leave too
    /// few good copies): nothing changed.
    Unchanged,
}

/// The image's other copies (on other disks) that are good and that count, as the rule sees
/// them when the event is applied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Others {
    pub good: u32,
    pub counting: u32,
    /// Serving (ready or damaged, on a disk in service): what keeps the image readable.
    pub serving: u32,
}

/// The state machine: what `event` does to a copy now in state `from` (`None`: no row).
pub fn decide(from: Option<CopyState>, event: Event, others: Others) -> Outcome {
    use CopyState::*;
    match (from, event) {
        (None, Event::Reserved) => Outcome::Now(Ready),
        (None, Event::StartCopy) => Outcome::Now(Copying),
        (None, Event::Found) => Outcome::Now(Unverified),
        (Some(Copying), Event::Committed) => Outcome::Now(Ready),
        (Some(Ready | Unverified | Damaged), Event::Verified) => Outcome::Now(Ready),
        (Some(Ready | Damaged), Event::Suspect(_)) if others.good > 0 => Outcome::Now(Unverified),
        (Some(Ready), Event::Suspect(_)) => Outcome::Now(Damaged),
        (Some(Ready | Damaged), Event::DiskReturned) => Outcome::Now(Unverified),
        (Some(Ready | Unverified | Damaged), Event::Missing(_)) => Outcome::Now(Failed),
        (Some(Ready | Unverified | Damaged), Event::Faulted(_)) => {
            if others.good > 0 {
                Outcome::Now(Failed)
            } else {
                Outcome::Now(Damaged)
            }
        }
        (
            Some(Ready | Damaged | Unverified | Failed),
            Event::Remove {
                keep,
                count_evicting,
            },
        ) => {
            let remaining = if count_evicting {
                others.good
            } else {
                others.counting
            };
            // Never the copy that keeps the image readable, whatever the plan said.
            let last_serving = matches!(from, Some(Ready | Damaged)) && others.serving == 0;
            if remaining >= keep && !last_serving {
                Outcome::Now(Removing)
            } else {
                Outcome::Unchanged
            }
        }
        (Some(Ready | Damaged | Unverified), Event::Forget { image_ready: true })
            if others.good == 0 =>
        {
            Outcome::Unchanged
        }
        (Some(_), Event::Forget { .. }) => Outcome::Now(Removing),
        (Some(Copying | Removing), Event::Abandoned) => Outcome::Now(Removing),
        (Some(Removing | Copying), Event::Deleted) => Outcome::Deleted,
        _ => Outcome::Unchanged,
    }
}

/// Applies `event` to the copy of `image_id` on `disk_id`. Call it inside a write transaction:
/// the copy's state and the image's other copies are read and changed in it. Copies on the
/// `unreachable` disks (found without their label just now) do not count as the image's other
/// good copies, whatever the store says of their disks.
pub(crate) fn apply(
    tx: &Connection,
    image_id: i64,
    disk_id: i64,
    event: Event,
    now: i64,
    unreachable: &[i64],
) -> rusqlite::Result<Outcome> {
    let from: Option<CopyState> = tx
        .query_row(
            "SELECT state FROM copies WHERE image_id = ?1 AND disk_id = ?2",
            params![image_id, disk_id],
            |r| r.get(0),
        )
        .optional()?;
    if matches!(event, Event::Missing(_)) && !image_is_ready(tx, image_id)? {
        // An image being removed loses its files on purpose, before its copy rows go.
        return Ok(Outcome::Unchanged);
    }
    let others = others(tx, image_id, disk_id, unreachable)?;
    let outcome = decide(from, event, others);
    let reason = match event {
        Event::Suspect(reason) | Event::Faulted(reason) | Event::Missing(reason) => Some(reason),
        Event::DiskReturned => Some("its disk was out of service"),
        _ => None,
    };
    match (from, outcome) {
        (_, Outcome::Unchanged) => {}
        (None, Outcome::Now(state)) => {
            tx.execute(
                "INSERT INTO copies (image_id, disk_id, state, reason, since)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![image_id, disk_id, state, reason, now],
            )?;
        }
        (Some(_), Outcome::Now(state)) => {
            tx.execute(
                "UPDATE copies SET state = ?3, reason = ?4, since = ?5
                 WHERE image_id = ?1 AND disk_id = ?2",
                params![image_id, disk_id, state, reason, now],
            )?;
        }
        (_, Outcome::Deleted) => {
            tx.execute(
                "DELETE FROM copies WHERE image_id = ?1 AND disk_id = ?2",
                params![image_id, disk_id],
            )?;
        }
    }
    Ok(outcome)
}

/// A failed disk returns to service: its copies that served are no longer trusted.
pub(crate) fn disk_returned(tx: &Connection, disk_id: i64, now: i64) -> rusqlite::Result<()> {
    let mut stmt = tx.prepare("SELECT image_id FROM copies WHERE disk_id = ?1")?;
    let images: Vec<i64> = stmt
        .query_map([disk_id], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for image_id in images {
        apply(tx, image_id, disk_id, Event::DiskReturned, now, &[])?;
    }
    Ok(())
}

/// `disk rm`: every copy on the disk is forgotten, in the caller's transaction; returns the
/// names of the ready images whose last good data the disk may hold (then nothing may change:
/// the caller rolls back).
pub(crate) fn forget_disk(
    tx: &Connection,
    disk_id: i64,
    now: i64,
    unreachable: &[i64],
) -> rusqlite::Result<Vec<String>> {
    let mut stmt = tx.prepare(
        "SELECT i.id, i.name, i.state FROM copies c JOIN images i ON i.id = c.image_id
         WHERE c.disk_id = ?1 ORDER BY i.name",
    )?;
    let copies: Vec<(i64, String, ImageState)> = stmt
        .query_map([disk_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut kept = Vec::new();
    for (image_id, name, state) in copies {
        let event = Event::Forget {
            image_ready: state == ImageState::Ready,
        };
        if apply(tx, image_id, disk_id, event, now, unreachable)? == Outcome::Unchanged {
            kept.push(name);
        }
    }
    Ok(kept)
}

/// Names of the ready images whose only good copy is on this disk: failing the disk would leave
/// them with none.
pub(crate) fn sole_good_on(conn: &Connection, disk_id: i64) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT i.name FROM copies c JOIN disks d ON d.id = c.disk_id
         JOIN images i ON i.id = c.image_id
         WHERE i.state = 'ready' AND {GOOD_SQL}
         GROUP BY c.image_id HAVING COUNT(*) = 1 AND SUM(c.disk_id = ?1) = 1
         ORDER BY i.name"
    ))?;
    let names = stmt.query_map([disk_id], |r| r.get(0))?;
    names.collect()
}

/// Deletes the rows of a disk that is forgotten (each was `Forget`-ed first).
pub(crate) fn delete_on_disk(tx: &Connection, disk_id: i64) -> rusqlite::Result<()> {
    tx.execute(
        "DELETE FROM copies WHERE disk_id = ?1 AND state = 'removing'",
        [disk_id],
    )?;
    Ok(())
}

fn image_is_ready(tx: &Connection, image_id: i64) -> rusqlite::Result<bool> {
    let state: Option<ImageState> = tx
        .query_row("SELECT state FROM images WHERE id = ?1", [image_id], |r| {
            r.get(0)
        })
        .optional()?;
    Ok(state == Some(ImageState::Ready))
}

fn others(
    tx: &Connection,
    image_id: i64,
    disk_id: i64,
    unreachable: &[i64],
) -> rusqlite::Result<Others> {
    let mut stmt = tx.prepare(&format!(
        "SELECT c.disk_id, {GOOD_SQL}, {COUNTING_SQL}, {SERVING_SQL}
         FROM copies c JOIN disks d ON d.id = c.disk_id
         WHERE c.image_id = ?1 AND c.disk_id != ?2"
    ))?;
    let rows = stmt.query_map(params![image_id, disk_id], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, bool>(1)?,
            r.get::<_, bool>(2)?,
            r.get::<_, bool>(3)?,
        ))
    })?;
    let mut others = Others::default();
    for row in rows {
        let (disk, good, counting, serving) = row?;
        if !unreachable.contains(&disk) {
            others.good += good as u32;
            others.counting += counting as u32;
            others.serving += serving as u32;
        }
    }
    Ok(others)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SQL rules and the Rust predicates agree on every state of a copy and its disk (on a
    /// reachable disk: reachability is not the store's to know).
    #[test]
    fn the_sql_rules_say_what_the_predicates_say() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE disks (id INTEGER PRIMARY KEY, state TEXT NOT NULL);
             CREATE TABLE copies (image_id INTEGER, disk_id INTEGER, state TEXT, reason TEXT,
                                  since INTEGER, PRIMARY KEY (image_id, disk_id));",
        )
        .unwrap();
        let mut id = 0;
        for disk in DiskState::ALL {
            for copy in CopyState::ALL {
                id += 1;
                conn.execute("INSERT INTO disks VALUES (?1, ?2)", params![id, disk])
                    .unwrap();
                conn.execute(
                    "INSERT INTO copies VALUES (?1, ?1, ?2, NULL, 0)",
                    params![id, copy],
                )
                .unwrap();
                let view = CopyView {
                    state: *copy,
                    disk: *disk,
                    reachable: true,
                };
                for (rule, expected) in [
                    (GOOD_SQL, view.is_good()),
                    (COUNTING_SQL, view.counts()),
                    (SERVING_SQL, view.serves()),
                ] {
                    let matched: bool = conn
                        .query_row(
                            &format!(
                                "SELECT COUNT(*) > 0 FROM copies c JOIN disks d ON d.id = c.disk_id
                                 WHERE c.image_id = ?1 AND {rule}"
                            ),
                            [id],
                            |r| r.get(0),
                        )
                        .unwrap();
                    assert_eq!(matched, expected, "{rule} for {copy} on a {disk} disk");
                }
            }
        }
    }

    #[test]
    fn a_fault_fails_a_copy_unless_it_is_the_last_good_one() {
        let lone = Others::default();
        let backed = Others {
            good: 1,
            counting: 1,
            serving: 1,
        };
        let fault = Event::Faulted("bad chunk");
        assert_eq!(
            decide(Some(CopyState::Ready), fault, backed),
            Outcome::Now(CopyState::Failed)
        );
        assert_eq!(
            decide(Some(CopyState::Ready), fault, lone),
            Outcome::Now(CopyState::Damaged)
        );
        assert_eq!(
            decide(Some(CopyState::Damaged), fault, backed),
            Outcome::Now(CopyState::Failed)
        );
        for settled in [CopyState::Failed, CopyState::Removing, CopyState::Copying] {
            assert_eq!(decide(Some(settled), fault, lone), Outcome::Unchanged);
        }
        assert_eq!(decide(None, fault, lone), Outcome::Unchanged);
    }

    #[test]
    fn a_copy_whose_file_is_gone_fails_even_when_it_is_the_last_one() {
        let missing = Event::Missing("its file is missing");
        for state in [CopyState::Ready, CopyState::Damaged, CopyState::Unverified] {
            assert_eq!(
                decide(Some(state), missing, Others::default()),
                Outcome::Now(CopyState::Failed)
            );
        }
        for settled in [CopyState::Failed, CopyState::Removing, CopyState::Copying] {
            assert_eq!(
                decide(Some(settled), missing, Others::default()),
                Outcome::Unchanged,
                "{settled}: a copy being written or removed has no file yet, or none any more"
            );
        }
    }

    #[test]
    fn a_removal_keeps_the_copies_it_was_told_to_keep() {
        let remove = |keep, count_evicting| Event::Remove {
            keep,
            count_evicting,
        };
        let others = Others {
            good: 2,
            counting: 1,
            serving: 2,
        };
        let ready = Some(CopyState::Ready);
        assert_eq!(
            decide(ready, remove(2, true), others),
            Outcome::Now(CopyState::Removing)
        );
        assert_eq!(decide(ready, remove(2, false), others), Outcome::Unchanged);
        assert_eq!(
            decide(Some(CopyState::Copying), remove(0, true), others),
            Outcome::Unchanged,
            "a copy being written belongs to its writer"
        );
        assert_eq!(
            decide(Some(CopyState::Copying), Event::Deleted, others),
            Outcome::Deleted
        );
        assert_eq!(
            decide(ready, Event::Deleted, others),
            Outcome::Unchanged,
            "a serving copy is removed through `removing`, never deleted at once"
        );
    }

    #[test]
    fn the_last_copy_that_serves_or_may_hold_good_data_is_never_given_up() {
        let lone = Others::default();
        let damaged_elsewhere = Others {
            good: 0,
            counting: 0,
            serving: 1,
        };
        let remove_anyway = Event::Remove {
            keep: 0,
            count_evicting: true,
        };
        for state in [CopyState::Ready, CopyState::Damaged] {
            assert_eq!(decide(Some(state), remove_anyway, lone), Outcome::Unchanged);
            assert_eq!(
                decide(Some(state), remove_anyway, damaged_elsewhere),
                Outcome::Now(CopyState::Removing)
            );
        }
        let forget = Event::Forget { image_ready: true };
        for state in [CopyState::Ready, CopyState::Damaged, CopyState::Unverified] {
            assert_eq!(decide(Some(state), forget, lone), Outcome::Unchanged);
        }
        assert_eq!(
            decide(Some(CopyState::Failed), forget, lone),
            Outcome::Now(CopyState::Removing)
        );
        assert_eq!(
            decide(
                Some(CopyState::Ready),
                Event::Forget { image_ready: false },
                lone
            ),
            Outcome::Now(CopyState::Removing),
            "an image being removed keeps nothing"
        );
        assert_eq!(
            decide(Some(CopyState::Ready), Event::Suspect("digests"), lone),
            Outcome::Now(CopyState::Damaged),
            "the last good copy keeps serving while it is not trusted"
        );
        assert_eq!(
            decide(Some(CopyState::Ready), Event::DiskReturned, lone),
            Outcome::Now(CopyState::Unverified),
            "a copy whose disk was out never serves unverified"
        );
    }

    #[test]
    fn only_verification_or_a_checked_write_makes_a_copy_ready() {
        let any = Others {
            good: 1,
            counting: 1,
            serving: 1,
        };
        let events = [
            Event::Reserved,
            Event::StartCopy,
            Event::Committed,
            Event::Found,
            Event::Verified,
            Event::Suspect("x"),
            Event::DiskReturned,
            Event::Faulted("x"),
            Event::Missing("x"),
            Event::Remove {
                keep: 0,
                count_evicting: true,
            },
            Event::Forget { image_ready: true },
            Event::Abandoned,
            Event::Deleted,
        ];
        let from_states = std::iter::once(None).chain(CopyState::ALL.iter().copied().map(Some));
        for from in from_states {
            for event in events {
                let to = decide(from, event, any);
                if to == Outcome::Now(CopyState::Ready) && from != Some(CopyState::Ready) {
                    assert!(
                        matches!(event, Event::Verified | Event::Committed | Event::Reserved),
                        "{event:?} made a {from:?} copy ready"
                    );
                }
            }
        }
    }
}
