//! Where the log goes and at what level: journald when systemd gave the process the journal as
//! its stderr, otherwise text lines on stderr, or one JSON object a line when asked. The level
//! starts as `IMGPOOL_LOG` (default `info`) and can be changed while the daemon runs
//! (`imgpool log-level`, over the control socket).

use std::io::IsTerminal;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use tracing_subscriber::layer::{Layered, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

use crate::error::{Error, ErrorKind, Result};

/// The environment variable with the starting level (an `EnvFilter` directive list).
pub const LEVEL_ENV: &str = "IMGPOOL_LOG";
const DEFAULT_LEVEL: &str = "info";
/// What a command other than a mount daemon shows on stderr, besides its output.
const COMMAND_LEVEL: &str = "warn";
/// journald's socket for structured entries (sd_journal_sendv), and the name entries carry:
/// `journalctl -t imgpool` shows the daemon's and the commands' lines.
const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";
const SYSLOG_IDENTIFIER: &str = "imgpool";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Journald when stderr is the journal (a systemd service), else text.
    Auto,
    /// `LEVEL target: message field=value ...` on stderr.
    Text,
    /// One JSON object a line on stderr, the event's fields at the top level.
    Json,
}

/// What changes the level of the running process; set once by `init`.
struct Level {
    handle: reload::Handle<EnvFilter, Registry>,
    /// The directives in force, as given (EnvFilter does not give them back verbatim).
    current: Mutex<String>,
}

static LEVEL: OnceLock<Level> = OnceLock::new();

/// The registry under the level filter, which every output layer sits on.
type Filtered = Layered<reload::Layer<EnvFilter, Registry>, Registry>;

/// Installs the process's logger. Call once, first thing.
///
/// A mount daemon logs at `IMGPOOL_LOG` (default info), changeable at run time, to the journal
/// under systemd and otherwise to stderr (which `imgpool mount` points at its log file).
/// Any other command prints its results itself: its stderr gets only warnings and errors (unless
/// `IMGPOOL_LOG` says otherwise), while the state changes it makes (a disk failed by hand, a
/// gc, snapshots deleted) go to the journal when the node has one, at info.
pub fn init(format: LogFormat, daemon: bool) {
    let env = std::env::var(LEVEL_ENV)
        .ok()
        .filter(|spec| parse_level(spec).is_ok());
    if !daemon {
        let stderr = text(std::io::stderr().is_terminal()).with_filter(
            parse_level(env.as_deref().unwrap_or(COMMAND_LEVEL)).expect("the level parses"),
        );
        let journal = Path::new(JOURNAL_SOCKET)
            .exists()
            .then(|| tracing_journald::layer().ok())
            .flatten()
            .map(|journald| {
                journald
                    .with_syslog_identifier(SYSLOG_IDENTIFIER.into())
                    .with_filter(parse_level(DEFAULT_LEVEL).expect("the level parses"))
            });
        tracing_subscriber::registry()
            .with(stderr)
            .with(journal)
            .init();
        return;
    }
    let start = env.unwrap_or_else(|| DEFAULT_LEVEL.to_string());
    let filter = parse_level(&start).expect("the starting level parses");
    let (filter, handle) = reload::Layer::new(filter);
    let output: Box<dyn Layer<Filtered> + Send + Sync> = match format {
        LogFormat::Json => Box::new(
            tracing_subscriber::fmt::layer()
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(false)
                .with_writer(std::io::stderr),
        ),
        LogFormat::Auto if stderr_is_journal() => match tracing_journald::layer() {
            Ok(journald) => Box::new(journald.with_syslog_identifier(SYSLOG_IDENTIFIER.into())),
            Err(_) => Box::new(text(false)),
        },
        LogFormat::Auto | LogFormat::Text => Box::new(text(std::io::stderr().is_terminal())),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(output)
        .init();
    let _ = LEVEL.set(Level {
        handle,
        current: Mutex::new(start),
    });
}

/// Text lines on stderr: `TIME LEVEL target: message field=value ...`.
fn text<S>(ansi: bool) -> impl Layer<S> + Send + Sync
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
}

/// Whether stderr is the stream systemd connected to the journal: `JOURNAL_STREAM` holds its
/// `device:inode`, and the variable alone is not enough, since a child whose stderr was
/// redirected inherits it (systemd.exec(5), "JOURNAL_STREAM").
fn stderr_is_journal() -> bool {
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(stderr) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    stream == format!("{}:{}", stderr.dev(), stderr.ino())
}

/// A level: `error`, `warn`, `info`, `debug`, `trace`, `off`, or a directive list
/// (`info,imgpool::core::repair=debug`).
pub fn parse_level(spec: &str) -> Result<EnvFilter> {
    let invalid = |why: String| {
        Error::refused(
            ErrorKind::InvalidInput,
            format!(
                "'{spec}' is not a log level: {why} (give error, warn, info, debug, trace, off, or \
                 directives such as info,imgpool::core::repair=debug)"
            ),
        )
    };
    if spec.trim().is_empty() {
        return Err(invalid("it is empty".into()));
    }
    // EnvFilter takes an unknown word as a target name to log at every level; a level that is
    // misspelt must be refused instead.
    for directive in spec.split(',') {
        let level = directive.rsplit('=').next().unwrap_or_default().trim();
        let bare = !directive.contains('=') && !directive.contains('[');
        if bare
            && !["error", "warn", "info", "debug", "trace", "off"]
                .contains(&level.to_ascii_lowercase().as_str())
        {
            return Err(invalid(format!("'{level}' is no level")));
        }
    }
    EnvFilter::builder()
        .parse(spec)
        .map_err(|e| invalid(e.to_string()))
}

/// The level in force.
pub fn current_level() -> Option<String> {
    LEVEL
        .get()
        .map(|level| level.current.lock().unwrap().clone())
}

/// Changes the level of this process from now on.
pub fn set_level(spec: &str) -> Result<()> {
    let filter = parse_level(spec)?;
    let Some(level) = LEVEL.get() else {
        return Err(Error::refused(
            ErrorKind::Internal,
            "this process has no logger whose level can change",
        ));
    };
    let mut current = level.current.lock().unwrap();
    // Said under the old level: a change to a quieter level is still recorded.
    tracing::info!(
        event = "log_level",
        level = spec,
        before = %current,
        "the log level changes from {current} to {spec}"
    );
    level.handle.reload(filter).map_err(|e| {
        Error::refused(
            ErrorKind::Internal,
            format!("cannot change the log level: {e}"),
        )
    })?;
    *current = spec.to_string();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_directives_parse_and_misspelt_levels_do_not() {
        for good in ["info", "DEBUG", "off", "warn,imgpool::core::repair=trace"] {
            assert!(parse_level(good).is_ok(), "{good}");
        }
        for bad in ["", "verbose", "infoo", "imgpool=loud"] {
            let e = parse_level(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad}");
            assert!(!e.to_string().contains('\n'), "{e}");
        }
    }
}
