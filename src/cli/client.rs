//! The command line's end of the control socket: one HTTP/1.1 request per connection to a
//! running mount daemon (`daemon::control`), with a deadline, never a signal.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::core::volume::requests;
use crate::error::Error;

use crate::daemon::control;
use crate::daemon::http::{self, ReadError};
use crate::fs::stats::MountStats;

/// How long a question to a daemon may take, connection to answer.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Waking a daemon is a courtesy (it also polls the store): a shorter wait.
const WAKE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a daemon gave no answer.
#[derive(Debug)]
pub enum CallError {
    /// Nothing listens on the socket: the daemon is gone (or never made it).
    NotRunning,
    /// The daemon (or the socket's rights) refused us: not root.
    Denied(String),
    /// It did not answer in time, or answered an error.
    Failed(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::NotRunning => f.write_str("no daemon listens on its control socket"),
            CallError::Denied(message) | CallError::Failed(message) => f.write_str(message),
        }
    }
}

/// `METHOD path` on the daemon at `socket`; its JSON answer.
pub fn call(socket: &Path, method: &str, path: &str) -> Result<Value, CallError> {
    call_within(socket, method, path, TIMEOUT)
}

fn call_within(
    socket: &Path,
    method: &str,
    path: &str,
    timeout: Duration,
) -> Result<Value, CallError> {
    let (status, body) = exchange(socket, method, path, b"", timeout)?;
    let message = || {
        body["error"]
            .as_str()
            .map_or_else(|| format!("status {status}"), str::to_string)
    };
    match status {
        200 => Ok(body),
        403 => Err(CallError::Denied(message())),
        status => Err(CallError::Failed(format!(
            "the daemon at {} answered {status}: {}",
            socket.display(),
            message()
        ))),
    }
}

/// One request and its answer, whatever its status.
fn exchange(
    socket: &Path,
    method: &str,
    path: &str,
    request_body: &[u8],
    timeout: Duration,
) -> Result<(u16, Value), CallError> {
    let deadline = Instant::now() + timeout;
    let stream = match UnixStream::connect(socket) {
        Ok(stream) => stream,
        Err(e) => {
            return Err(match e.raw_os_error() {
                Some(libc::ECONNREFUSED) | Some(libc::ENOENT) => CallError::NotRunning,
                Some(libc::EACCES) | Some(libc::EPERM) => CallError::Denied(format!(
                    "permission denied: only root may use {}",
                    socket.display()
                )),
                _ => CallError::Failed(format!("cannot connect to {}: {e}", socket.display())),
            })
        }
    };
    // A daemon that refuses us answers without reading: its answer is still there to read even
    // when sending failed.
    let sent = http::send_all(
        &stream,
        &http::encode_request(method, path, request_body),
        deadline,
    );
    let response = match http::read_response(&stream, deadline) {
        Ok(response) => response,
        Err(e) => {
            let why = match (sent, e) {
                (Err(e), _) => format!("cannot send a request: {e}"),
                (Ok(()), ReadError::TimedOut) => {
                    format!("no answer within {} s", timeout.as_secs())
                }
                (Ok(()), ReadError::Closed) => "it closed the connection without an answer".into(),
                (Ok(()), e) => format!("a bad answer: {e}"),
            };
            return Err(CallError::Failed(format!(
                "the daemon at {} did not answer: {why}",
                socket.display()
            )));
        }
    };
    let body: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
    Ok((response.status, body))
}

/// What the daemon of mount `mount_id` answered to a snapshot request on a volume it has
/// open: the outcome, the request's own error, or `None` when it does not have it open (any
/// more).
pub fn volume_request(
    state_dir: &Path,
    mount_id: i64,
    volume: &str,
    request: &requests::Request,
) -> Result<Option<Result<requests::Outcome, Error>>, CallError> {
    let socket = control::socket_path(state_dir, mount_id);
    let body = serde_json::to_vec(&json!({ "volume": volume, "request": request }))
        .expect("requests serialise");
    // A deletion of many snapshots is one transaction: more time than a question.
    let (status, answer) = exchange(&socket, "POST", "/v1/volumes/requests", &body, TIMEOUT * 12)?;
    let error = || answer["error"].as_str().unwrap_or_default().to_string();
    match status {
        200 => serde_json::from_value(answer.clone())
            .map(|o| Some(Ok(o)))
            .map_err(|e| {
                CallError::Failed(format!(
                    "the daemon answered a snapshot outcome this imgpool cannot read: {e}"
                ))
            }),
        409 => Ok(None),
        422 => Ok(Some(Err(Error::from_relay(&error())))),
        403 => Err(CallError::Denied(error())),
        status => Err(CallError::Failed(format!(
            "the daemon at {} answered {status}: {}",
            socket.display(),
            error()
        ))),
    }
}

/// Sets the log level of the daemon at `socket`; its answer (`{"level": ...}`).
pub fn set_log_level(socket: &Path, level: &str) -> Result<Value, CallError> {
    let body = serde_json::to_vec(&json!({ "level": level })).expect("JSON values serialise");
    let (status, answer) = exchange(socket, "POST", "/v1/log-level", &body, TIMEOUT)?;
    let error = || answer["error"].as_str().unwrap_or_default().to_string();
    match status {
        200 => Ok(answer),
        403 => Err(CallError::Denied(error())),
        _ => Err(CallError::Failed(error())),
    }
}

/// The live statistics of mount `mount_id`.
pub fn stats(state_dir: &Path, mount_id: i64) -> Result<MountStats, CallError> {
    let socket = control::socket_path(state_dir, mount_id);
    let body = call(&socket, "GET", "/v1/stats")?;
    serde_json::from_value(body).map_err(|e| {
        CallError::Failed(format!(
            "the daemon at {} answered statistics this imgpool cannot read: {e}",
            socket.display()
        ))
    })
}

/// Tells every running daemon of the pool that the store changed, so that its mount shows the
/// change now rather than at its next poll. Best effort: a daemon that does not answer still
/// polls the store.
pub fn wake_all(state_dir: &Path) {
    let Ok(sockets) = control::sockets(state_dir) else {
        return;
    };
    for (_, socket) in sockets {
        match call_within(&socket, "POST", "/v1/wake", WAKE_TIMEOUT) {
            Ok(_) | Err(CallError::NotRunning) => {}
            Err(e) => tracing::debug!("could not wake the daemon at {}: {e}", socket.display()),
        }
    }
}
