//! `imgpool recv VOLUME`: applies a stream of `imgpool send` from standard input
//! (docs/send-receive.md). `imgpool copy` runs it as a child process, here or over ssh: its
//! arguments, its output and its exit status are that contract.

use std::io::IsTerminal;
use std::path::Path;

use clap::Args;
use serde_json::json;

use super::open_to_change;
use crate::core::pool::{Pool, ReceiveOptions, ReceiveProgress, Received};
use crate::error::{Error, ErrorKind, Result};
use crate::format::units::bytes;

#[derive(Args, Debug)]
pub struct RecvArgs {
    /// The volume to receive into: a new one (a whole stream), or the one the stream was made
    /// from (an incremental stream).
    pub volume: String,
    /// Discard the volume's snapshots newer than the stream's base snapshot, and its writes
    /// since, when it has changed since; with a whole stream onto an existing volume, replace
    /// that volume (swapped in only once the stream has arrived whole).
    #[arg(long, conflicts_with_all = ["resume_token", "abort"])]
    pub force: bool,
    /// Keep what was received when the stream fails, to go on later (`--resume-token`).
    #[arg(long, conflicts_with_all = ["resume_token", "abort"])]
    pub resumable: bool,
    /// Print the token that resumes the volume's partial receive (`imgpool send --resume`).
    #[arg(long, conflicts_with = "abort")]
    pub resume_token: bool,
    /// Drop the volume's partial receive: remove the volume it was making, or roll the volume
    /// back to where the stream started.
    #[arg(long)]
    pub abort: bool,
    /// Print what was received as one JSON object.
    #[arg(long, conflicts_with = "resume_token")]
    pub json: bool,
}

pub fn run(state_dir: &Path, args: RecvArgs) -> Result<()> {
    let volume = args.volume.as_str();
    if args.resume_token {
        let token = Pool::open(state_dir)?.receive_resume_token(volume)?;
        println!("{}", token.encode());
        return Ok(());
    }
    let pool = open_to_change(state_dir)?;
    if args.abort {
        let done = pool.receive_abort(volume)?;
        super::output::result(
            args.json,
            json!({ "volume": volume, "aborted": true }),
            done,
        );
        return Ok(());
    }
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        return Err(Error::refused(
            ErrorKind::InvalidInput,
            "standard input is a terminal: pipe a stream into it (`imgpool send ... | imgpool recv VOLUME`)",
        ));
    }
    // A pipe of 1 MiB instead of 64 KiB: the sender writes records of up to 1 MiB, and with
    // the default each one crossed in sixteen hand-offs between the two processes, the sender
    // blocked on a full pipe while this side waited for records (a full send | recv of 2 GiB
    // from a cold cache: 4.0 to 4.6 s, against 3.5 to 3.7 s with 1 MiB). Widened here, not by
    // `send`, so that a sender into a reader that goes away still finds out before its end.
    // Best effort: a file is no pipe, and a smaller fs.pipe-max-size keeps the default.
    let _ = nix::fcntl::fcntl(
        std::os::fd::AsFd::as_fd(&stdin),
        nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20),
    );
    // Standard input's own small buffer only: a larger one would copy every byte of the
    // stream once more, where a data record's payload is read straight into its buffer.
    let input = stdin;
    let options = ReceiveOptions {
        force: args.force,
        resumable: args.resumable,
    };
    let bar = progress_bar();
    let received = pool.receive_read_ahead(volume, input, options, &mut |p: &ReceiveProgress| {
        if let Some(bar) = &bar {
            bar.set_position(p.bytes);
            bar.set_message(match p.snapshot {
                0 => "base image".to_string(),
                n => format!("snapshot {n} of {}", p.snapshots),
            });
        }
    });
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let received = received?;
    super::output::result(args.json, received_json(&received), summary(&received));
    Ok(())
}

/// The bytes read, their rate and the snapshot being received, on standard error when it is a
/// terminal (the stream's length is not known: no bar to fill).
fn progress_bar() -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {msg}: {binary_bytes} read, {binary_bytes_per_sec} {elapsed}",
        )
        .expect("static template"),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(100));
    Some(bar)
}

fn received_json(r: &Received) -> serde_json::Value {
    json!({
        "volume": r.volume,
        "created": r.created,
        "snapshots": r.snapshots,
        "bytes": r.bytes,
        "imported_image": r.imported_image,
        "discarded": { "snapshots": r.discarded_snapshots, "writes": r.discarded_writes },
        "resumed": r.resumed,
        "replaced": r.replaced,
    })
}

fn summary(r: &Received) -> String {
    let mut lines = vec![format!(
        "{} volume '{}': {} snapshot(s){}, {} read",
        if r.created {
            "created"
        } else if r.replaced {
            "replaced"
        } else {
            "received into"
        },
        r.volume,
        r.snapshots.len(),
        if r.snapshots.is_empty() {
            String::new()
        } else {
            format!(" ({})", r.snapshots.join(", "))
        },
        bytes(r.bytes)
    )];
    if let Some(image) = &r.imported_image {
        lines.push(format!("imported its base image as '{image}'"));
    }
    if !r.discarded_snapshots.is_empty() {
        lines.push(format!(
            "discarded (--force): snapshots {}",
            r.discarded_snapshots.join(", ")
        ));
    }
    if r.replaced {
        lines.push("discarded (--force): the content of the volume it replaced".to_string());
    } else if r.discarded_writes {
        lines.push("discarded (--force): the writes since its newest snapshot".to_string());
    }
    lines.join("\n")
}
