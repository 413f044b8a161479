//! `imgpool log-level` and `imgpool mount --log-format`: the log of the running mount daemons.

use std::path::Path;

use clap::Args;
use serde_json::{json, Value};

use super::client::{self, CallError};
use super::{print_json, require_root, table, Cli, Command};
use crate::daemon::control;
use crate::daemon::logging::{self, LogFormat};
use crate::error::{Error, ErrorKind, Result};

#[derive(Args, Debug)]
pub struct LogLevelArgs {
    /// The new level: error, warn, info, debug, trace, off, or directives such as
    /// info,imgpool::core::repair=debug. Without it, print each daemon's level.
    pub level: Option<String>,
    #[arg(long)]
    pub json: bool,
}

/// `--log-format`: how a mount daemon writes its log.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default)]
pub enum LogFormatArg {
    /// To journald when stderr is the journal (under systemd), else text.
    #[default]
    Auto,
    Text,
    /// One JSON object a line, the event's fields at the top level.
    Json,
}

impl From<LogFormatArg> for LogFormat {
    fn from(arg: LogFormatArg) -> LogFormat {
        match arg {
            LogFormatArg::Auto => LogFormat::Auto,
            LogFormatArg::Text => LogFormat::Text,
            LogFormatArg::Json => LogFormat::Json,
        }
    }
}

/// Installs the process's logger: a mount's (the daemon's, and its parent's) in the format it
/// asked for, or a command's.
pub fn init(cli: &Cli) {
    match &cli.command {
        Command::Mount(args) => logging::init(args.log_format.into(), true),
        _ => logging::init(LogFormat::Auto, false),
    }
}

/// Shows or changes the level of every running mount daemon of the pool.
pub fn log_level(state_dir: &Path, args: LogLevelArgs) -> Result<()> {
    require_root("log-level")?;
    // A bad level is refused here, before any daemon is asked.
    if let Some(level) = &args.level {
        logging::parse_level(level)?;
    }
    let sockets = match control::sockets(state_dir) {
        Ok(sockets) => sockets,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            return Err(Error::io(
                "cannot list the mount daemons' control sockets",
                e,
            ))
        }
    };
    let mut answers = Vec::new();
    for (mount_id, socket) in sockets {
        let answer = match &args.level {
            Some(level) => client::set_log_level(&socket, level),
            None => client::call(&socket, "GET", "/v1/log-level"),
        };
        match answer {
            Ok(body) => answers.push((mount_id, body["level"].clone())),
            // A daemon that died leaves its socket until the next mount cleans up.
            Err(CallError::NotRunning) => {}
            Err(e) => {
                return Err(Error::refused(
                    ErrorKind::Internal,
                    format!("mount {mount_id}: {e}"),
                ))
            }
        }
    }
    if answers.is_empty() {
        return Err(Error::refused(
            ErrorKind::NotFound,
            "no mount daemon of this pool is running: the level of a daemon is set when it \
             starts, by IMGPOOL_LOG",
        ));
    }
    if args.json {
        print_json(&Value::Array(
            answers
                .iter()
                .map(|(id, level)| json!({ "mount_id": id, "level": level }))
                .collect(),
        ));
    } else {
        table(
            &["MOUNT", "LEVEL"],
            answers
                .iter()
                .map(|(id, level)| vec![id.to_string(), level.as_str().unwrap_or("-").to_string()])
                .collect(),
        );
    }
    Ok(())
}
