//! How a command shows its result and its progress: one JSON document with `--json`, else the
//! text; a spinner or bar on a terminal only, so that a pipe, a log or a script gets nothing but
//! the result.

use std::fmt::Display;
use std::io::IsTerminal;
use std::time::Duration;

use serde_json::Value;

use crate::core::repair;

/// Prints a command's result: `value` with `--json`, else `text`.
pub fn result(json: bool, value: Value, text: impl Display) {
    if json {
        super::print_json(&value);
    } else {
        println!("{text}");
    }
}

/// A spinner with `message` on stderr while work of unknown length runs, if stderr is a
/// terminal; `done` clears it.
pub fn spinner(message: impl Into<String>) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let spinner = indicatif::ProgressBar::new_spinner()
        .with_message(message.into())
        .with_style(
            indicatif::ProgressStyle::with_template("{spinner} {msg} {elapsed}")
                .expect("static template"),
        );
    spinner.enable_steady_tick(Duration::from_millis(100));
    Some(spinner)
}

pub fn done(spinner: Option<indicatif::ProgressBar>) {
    if let Some(spinner) = spinner {
        spinner.finish_and_clear();
    }
}

/// The repair's progress off a terminal: none (its result is printed when it ends, and each
/// action goes to the journal).
pub struct Quiet;

impl repair::Reporter for Quiet {
    fn task(&self, _label: String, _total: u64) -> Box<dyn Fn(u64) + Send + '_> {
        Box::new(|_| {})
    }
}
