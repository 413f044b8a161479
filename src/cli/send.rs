//! `imgpool send`: a volume's snapshots to standard output as a stream (`docs/send-receive.md`).
//! Standard output is the stream, so everything else (the progress bar, the `--json` summary)
//! goes to standard error.
//!
//! `send VOLUME` sends the live volume: a temporary snapshot `copy-tmp-<id>`, owned by this
//! process (an owner lock), is taken, sent as the package's last snapshot, and deleted when the
//! send ends, also when it fails: a reader that went away (SIGPIPE is ignored here, so the write
//! fails with EPIPE) and SIGINT, SIGTERM or SIGHUP (the write in progress fails) come to the
//! same cleanup. A `kill -9` leaves the snapshot to the next start (`recover`) or the next send
//! of the volume.

use std::io::{self, IsTerminal, Write};
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{json, Value};

use crate::core::owner::OwnerLock;
use crate::core::pool::{send_token, Pool, SendSpec, COPY_TEMPORARY_SNAPSHOT};
use crate::core::volume::requests::{Request, Selection};
use crate::core::volume::send::{SendProgress, Sent};
use crate::error::{Error, ErrorKind, Result};
use crate::format::stream::{Header, ResumeToken};
use crate::format::units::bytes;

#[derive(Args, Debug)]
pub struct SendArgs {
    /// The volume at a snapshot, or the volume as it is now (a temporary snapshot is taken,
    /// sent and deleted).
    #[arg(
        value_name = "VOLUME[@SNAP]",
        required_unless_present = "resume",
        conflicts_with = "resume"
    )]
    pub target: Option<String>,
    /// Send the changes since this older snapshot, which the receiver has.
    #[arg(long, value_name = "SNAP", conflicts_with = "resume")]
    pub from: Option<String>,
    /// Send every snapshot after --from (or from the volume's first, which goes whole) up to
    /// SNAP, each received as a snapshot.
    #[arg(long, conflicts_with = "resume")]
    pub from_all: bool,
    /// Carry the base image too, for a receiving pool that does not have it.
    #[arg(long, conflicts_with = "resume")]
    pub with_image: bool,
    /// Send the rest of an interrupted package: the token `imgpool recv --resume-token`
    /// printed on the receiving side.
    #[arg(long, value_name = "TOKEN")]
    pub resume: Option<String>,
    /// One summary object on standard error when done (standard output is the stream).
    #[arg(long)]
    pub json: bool,
}

impl SendArgs {
    /// Whether the send takes (and deletes) a temporary snapshot.
    pub fn of_live_volume(&self) -> bool {
        self.resume.is_none() && self.target.as_deref().is_some_and(|t| !t.contains('@'))
    }
}

/// Set by SIGINT, SIGTERM or SIGHUP during a send of the live volume: the next write fails, and
/// the send deletes its temporary snapshot.
static STOPPED: AtomicBool = AtomicBool::new(false);

extern "C" fn stop(_: libc::c_int) {
    STOPPED.store(true, Ordering::SeqCst);
}

/// A reader that goes away is a failed write (EPIPE), not death by SIGPIPE. With `stop` (a send
/// that has a temporary snapshot to delete), a stop signal interrupts a write that waits (no
/// SA_RESTART) and fails the next; otherwise it ends the process as usual (nothing to clean).
fn handle_signals(stop_signals: bool) -> Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let ignore = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
    let stopping = SigAction::new(SigHandler::Handler(stop), SaFlags::empty(), SigSet::empty());
    #[allow(unsafe_code)]
    let set = |signal, action: &SigAction| {
        // SAFETY: the handler only stores to an atomic.
        unsafe { sigaction(signal, action) }
            .map(drop)
            .map_err(|e| Error::io("cannot set the send's signal handlers", e.into()))
    };
    set(Signal::SIGPIPE, &ignore)?;
    if stop_signals {
        for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
            set(signal, &stopping)?;
        }
    }
    Ok(())
}

/// Standard output, unbuffered by Rust's line buffering, failing once a stop signal came.
struct Output(std::fs::File);

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let stopped = || io::Error::other("the send was stopped by a signal");
        if STOPPED.load(Ordering::SeqCst) {
            return Err(stopped());
        }
        match self.0.write(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted && STOPPED.load(Ordering::SeqCst) => {
                Err(stopped())
            }
            other => other,
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

pub fn run(state_dir: &Path, args: SendArgs) -> Result<()> {
    let stdout = io::stdout();
    if stdout.is_terminal() {
        return Err(Error::refused(
            ErrorKind::InvalidInput,
            "standard output is a terminal: `imgpool send` writes a binary stream; pipe it into `imgpool recv VOLUME`, or into a file",
        ));
    }
    let out = stdout
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| Error::io("cannot use standard output", e))?;
    let out = io::BufWriter::with_capacity(1 << 20, Output(out.into()));
    handle_signals(false)?;
    let pool = Pool::open(state_dir)?;
    let started = Instant::now();

    if let Some(token) = &args.resume {
        let token = ResumeToken::decode(token)
            .map_err(|why| Error::refused(ErrorKind::InvalidInput, why))?;
        let sent = stream(&pool, &SendSpec::Resume(&token), out)?;
        report(&args, &sent, None, started);
        return Ok(());
    }
    let target = args
        .target
        .as_deref()
        .expect("clap requires VOLUME or --resume");
    let (volume, snapshot) = super::export::parse_target(target)?;
    remove_abandoned_snapshots(&pool, state_dir, volume);
    let spec = |snapshot, temporary| SendSpec::Package {
        volume,
        snapshot,
        temporary,
        from: args.from.as_deref(),
        from_all: args.from_all,
        with_image: args.with_image,
    };
    if let Some(snapshot) = snapshot {
        let sent = stream(&pool, &spec(snapshot, false), out)?;
        report(&args, &sent, None, started);
        return Ok(());
    }

    // The live volume: its own temporary snapshot, deleted whatever happens.
    pool.check_send(volume, args.from.as_deref())?;
    handle_signals(true)?;
    let id = uuid::Uuid::new_v4().to_string();
    let owner = OwnerLock::acquire(state_dir, &send_token(&id))?;
    let temporary = format!("{COPY_TEMPORARY_SNAPSHOT}{id}");
    let created = super::snapshot_request(
        &pool,
        state_dir,
        volume,
        &Request::Create {
            name: temporary.clone(),
            guid: uuid::Uuid::new_v4().to_string(),
            created: crate::format::clock::now(),
        },
    );
    if let Err(e) = created {
        owner.release();
        return Err(e);
    }
    let sent = stream(&pool, &spec(&temporary, true), out);
    let removed = delete_temporary(&pool, state_dir, volume, &temporary);
    // Let go also when the deletion failed: the snapshot is then abandoned, and the next start
    // or send deletes it.
    owner.release();
    if let (Err(_), Err(e)) = (&sent, &removed) {
        tracing::warn!(
            volume,
            snapshot = temporary,
            "cannot delete the temporary snapshot: {e}"
        );
    }
    let sent = sent?;
    removed?;
    report(&args, &sent, Some(&temporary), started);
    Ok(())
}

/// What was sent: the package's header, and the counts.
struct Done {
    header: Header,
    sent: Sent,
    through_mount: bool,
}

fn stream(pool: &Pool, spec: &SendSpec, out: impl Write) -> Result<Done> {
    let prepared = pool.prepare_send(spec)?;
    let header = prepared.header().clone();
    let through_mount = prepared.through_mount();
    let bar = progress_bar();
    let sent = prepared.run(out, &mut |p: &SendProgress| {
        if let Some(bar) = &bar {
            bar.set_length(p.granules);
            bar.set_position(p.granule);
            bar.set_message(match p.snapshot {
                0 => format!("base image, {} sent", bytes(p.bytes)),
                n => format!("snapshot {n} of {}, {} sent", p.snapshots, bytes(p.bytes)),
            });
        }
    });
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(Done {
        header,
        sent: sent?,
        through_mount,
    })
}

fn progress_bar() -> Option<indicatif::ProgressBar> {
    if !io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {percent:>3}% {msg} eta {eta}")
            .expect("static template"),
    );
    Some(bar)
}

/// The summary, on standard error: the `--json` object, or a line for a person at a terminal.
fn report(args: &SendArgs, done: &Done, temporary: Option<&str>, started: Instant) {
    let header = &done.header;
    let sent = &done.sent;
    let names: Vec<&str> = header.snapshots.iter().map(|s| s.name.as_str()).collect();
    if args.json {
        let summary: Value = json!({
            "volume": header.volume,
            "volume_uuid": header.volume_uuid,
            "package": header.package,
            "from": header.from.as_ref().map(|f| f.name.as_str()),
            "snapshots": names,
            "from_all": header.from_all,
            "temporary_snapshot": temporary,
            "with_image": header.with_image,
            "resumed_at": header.resume,
            "snapshots_sent": sent.snapshots_sent,
            "bytes": sent.bytes,
            "data_bytes": sent.data_bytes,
            "zero_bytes": sent.zero_bytes,
            "image_bytes": sent.image_bytes,
            "through_mount": done.through_mount,
            "seconds": started.elapsed().as_secs_f64(),
        });
        eprintln!(
            "{}",
            serde_json::to_string(&summary).expect("JSON values serialise")
        );
    } else if io::stderr().is_terminal() {
        let what = match temporary {
            Some(_) => "the live volume".to_string(),
            None => format!("{} snapshot(s)", sent.snapshots_sent),
        };
        eprintln!(
            "sent {what} of volume '{}': {} in {:.1} s",
            header.volume,
            bytes(sent.bytes),
            started.elapsed().as_secs_f64()
        );
    }
}

/// Deletes the send's temporary snapshot. A mount daemon hears of the snapshot file's last
/// close a moment after it: until then it refuses the deletion (the snapshot is open).
fn delete_temporary(pool: &Pool, state_dir: &Path, volume: &str, snapshot: &str) -> Result<()> {
    let request = Request::Delete {
        selection: Selection::Names(vec![snapshot.to_string()]),
        dry_run: false,
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match super::snapshot_request(pool, state_dir, volume, &request) {
            Err(e) if e.kind() == ErrorKind::InUse && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            done => return done.map(drop),
        }
    }
}

/// Deletes the temporary snapshots of sends and exports of `volume` whose process died. Best
/// effort: the send goes on without it (the next start retries).
fn remove_abandoned_snapshots(pool: &Pool, state_dir: &Path, volume: &str) {
    let abandoned = match pool.abandoned_temporary_snapshots(Some(volume)) {
        Ok(abandoned) => abandoned,
        Err(e) => {
            tracing::warn!(volume, "cannot look for abandoned temporary snapshots: {e}");
            return;
        }
    };
    for (volume, snapshot) in abandoned {
        tracing::info!(
            volume,
            snapshot,
            "deleting the temporary snapshot of a send or export that died"
        );
        if let Err(e) = delete_temporary(pool, state_dir, &volume, &snapshot) {
            tracing::warn!(volume, snapshot, "cannot delete it: {e}");
        }
    }
}
