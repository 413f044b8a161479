//! The control socket: how commands reach a running mount daemon. Each daemon listens on
//! `<state dir>/control/<mount id>.sock` (the directory 0700, the socket 0600, both root's) and
//! answers HTTP/1.1 with JSON bodies (`http`), one request per connection. The peer's uid is
//! read with `SO_PEERCRED` on every connection: anyone but root gets a 403 and a log line, and
//! nothing is read from them. Each connection has its own thread (at most `MAX_CONNECTIONS` at
//! once) and `REQUEST_TIMEOUT` to send its request, so a slow or broken client holds nothing.
//!
//! Endpoints (all in `ROUTES`):
//! - `GET /v1/health`: the daemon is alive; its mount id, pid and mount point.
//! - `GET /v1/stats`: the mount's statistics (`MountStats`, see `docs/statistics.md`).
//! - `POST /v1/cache/drop`: empty the chunk cache; answers what it held.
//! - `POST /v1/wake`: reload the catalog now (answered once done) and wake the repair.
//! - `POST /v1/volumes/requests`: a volume request (`core::volume::requests::Request`: the
//!   snapshot commands, resize) on a volume this daemon has open, body `{"volume": NAME,
//!   "request": ...}`; 409 when it does not have it open (the command then does it itself). The
//!   names of deleted snapshots leave the kernel's cache before the answer; their space is
//!   reclaimed afterwards in a thread of its own.
//! - `GET /metrics`: Prometheus metrics (`metrics`, see `docs/metrics.md`).

use std::ffi::OsStr;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use serde_json::{json, Value};

use crate::core::volume::requests;
use crate::daemon::http::{self, ReadError, Request};
use crate::daemon::logging;
use crate::daemon::metrics::{self, Metrics};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::format::clock;
use crate::fs::namespace::PoolFs;
use crate::fs::stats::{BindStatus, MountStats};
use crate::fs::IoMode;

/// The directory of the daemons' sockets, in the state directory.
pub const CONTROL_DIR: &str = "control";
/// How long a client has to send its whole request, and the daemon to send its answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more are answered 503 at once.
const MAX_CONNECTIONS: usize = 16;
/// How long `POST /v1/wake` waits for the catalog reload before answering.
const WAKE_WAIT: Duration = Duration::from_secs(1);
/// The longest path a Unix socket address holds (`sun_path` less its NUL).
const MAX_SOCKET_PATH: usize = 107;

pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join(CONTROL_DIR)
}

/// The socket of the daemon serving mount `mount_id`.
pub fn socket_path(state_dir: &Path, mount_id: i64) -> PathBuf {
    dir(state_dir).join(format!("{mount_id}.sock"))
}

/// The mount a file of the control directory belongs to: `<id>.sock`, or `.<id>.new` while a
/// daemon is putting it in place. Other names are not ours.
fn mount_id_of(name: &OsStr) -> Option<i64> {
    let name = name.to_str()?;
    let id = match name.strip_prefix('.') {
        Some(rest) => rest.strip_suffix(".new")?,
        None => name.strip_suffix(".sock")?,
    };
    id.parse().ok()
}

/// The sockets in the control directory, by mount id, in id order.
pub fn sockets(state_dir: &Path) -> io::Result<Vec<(i64, PathBuf)>> {
    let mut found: Vec<(i64, PathBuf)> = std::fs::read_dir(dir(state_dir))?
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| mount_id_of(&e.file_name()).map(|id| (id, e.path())))
        .collect();
    found.sort();
    Ok(found)
}

/// A daemon's wake-up call to its refresh thread, answered once the catalog is reloaded.
pub type Wake = mpsc::SyncSender<()>;

/// What the endpoints act on: the daemon's parts.
pub struct Context {
    pub fs: Arc<PoolFs>,
    pub mountpoint: PathBuf,
    pub io_mode_requested: IoMode,
    /// Whether the kernel agreed to passthrough.
    pub passthrough: Arc<AtomicBool>,
    pub refresh: mpsc::Sender<Wake>,
    pub repair: mpsc::Sender<()>,
    /// The bind mounts as the refresh thread last checked them.
    pub binds: Arc<parking_lot::Mutex<Vec<BindStatus>>>,
    pub metrics: Arc<Metrics>,
}

impl Context {
    pub fn stats(&self) -> MountStats {
        MountStats {
            mount_id: self.fs.mount_id(),
            updated: clock::now(),
            io_mode_requested: self.io_mode_requested,
            io_mode: if self.passthrough.load(Ordering::Relaxed) {
                IoMode::Passthrough
            } else {
                IoMode::Cached
            },
            read: self.fs.read_stats(),
            binds: self.binds.lock().clone(),
            volume_open_files: self.fs.volume_open_files(),
        }
    }
}

/// Who is on the other end of a connection, as the kernel says (`SO_PEERCRED`).
#[derive(Debug, Clone, Copy)]
struct Peer {
    pid: i32,
    uid: u32,
}

/// An answer: status, extra header lines, body (JSON, but for the metrics).
struct Reply {
    status: u16,
    headers: Vec<String>,
    content_type: &'static str,
    body: Vec<u8>,
}

impl Reply {
    fn ok(body: Value) -> Reply {
        Reply::json(200, &body)
    }

    fn json(status: u16, body: &Value) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            content_type: http::JSON,
            body: serde_json::to_vec(body).expect("JSON values serialise"),
        }
    }

    fn error(status: u16, message: impl Into<String>) -> Reply {
        Reply::json(status, &json!({ "error": message.into() }))
    }

    fn encode(&self) -> Vec<u8> {
        http::encode_response_as(self.status, &self.headers, self.content_type, &self.body)
    }
}

type Handler = fn(&Context, Peer, &Request) -> Reply;

/// Every endpoint: method, path, handler. Later endpoints (volumes) go here.
const ROUTES: &[(&str, &str, Handler)] = &[
    ("GET", "/metrics", prometheus),
    ("GET", "/v1/health", health),
    ("GET", "/v1/stats", stats),
    ("POST", "/v1/cache/drop", cache_drop),
    ("POST", "/v1/wake", wake),
    ("POST", "/v1/volumes/requests", volume_request),
    ("GET", "/v1/log-level", log_level),
    ("POST", "/v1/log-level", set_log_level),
];

fn route(context: &Context, peer: Peer, request: &Request) -> Reply {
    match find_route(&request.method, &request.path) {
        Ok(handler) => handler(context, peer, request),
        Err(reply) => reply,
    }
}

/// The handler of a request, or the 404 or 405 that answers it.
fn find_route(method: &str, path: &str) -> std::result::Result<Handler, Reply> {
    let methods: Vec<&str> = ROUTES
        .iter()
        .filter(|(_, p, _)| *p == path)
        .map(|(m, _, _)| *m)
        .collect();
    if methods.is_empty() {
        return Err(Reply::error(404, format!("no endpoint {path}")));
    }
    match ROUTES.iter().find(|(m, p, _)| *p == path && *m == method) {
        Some((_, _, handler)) => Ok(*handler),
        None => {
            let mut reply = Reply::error(405, format!("{path} takes {}", methods.join(", ")));
            reply.headers.push(format!("Allow: {}", methods.join(", ")));
            Err(reply)
        }
    }
}

fn health(context: &Context, _: Peer, _: &Request) -> Reply {
    Reply::ok(json!({
        "status": "ok",
        "mount_id": context.fs.mount_id(),
        "pid": std::process::id(),
        "mountpoint": context.mountpoint,
    }))
}

fn stats(context: &Context, _: Peer, _: &Request) -> Reply {
    Reply::ok(serde_json::to_value(context.stats()).expect("statistics serialise"))
}

fn prometheus(context: &Context, _: Peer, _: &Request) -> Reply {
    Reply {
        status: 200,
        headers: Vec::new(),
        content_type: metrics::CONTENT_TYPE,
        body: context.metrics.render().into_bytes(),
    }
}

fn log_level(_: &Context, _: Peer, _: &Request) -> Reply {
    Reply::ok(json!({ "level": logging::current_level() }))
}

/// `{"level": "debug"}`: the daemon logs at that level from now on.
fn set_log_level(_: &Context, _: Peer, request: &Request) -> Reply {
    #[derive(serde::Deserialize)]
    struct Body {
        level: String,
    }
    let body: Body = match serde_json::from_slice(&request.body) {
        Ok(body) => body,
        Err(e) => return Reply::error(400, format!("a bad log level request: {e}")),
    };
    match logging::set_level(&body.level) {
        Ok(()) => Reply::ok(json!({ "level": logging::current_level() })),
        Err(e) if e.kind() == ErrorKind::InvalidInput => Reply::error(400, e.to_string()),
        Err(e) => Reply::error(500, e.to_string()),
    }
}

fn cache_drop(context: &Context, peer: Peer, _: &Request) -> Reply {
    let before = context.fs.read_stats().cache;
    context.fs.drop_cache();
    tracing::info!(
        "emptied the chunk cache ({} chunk(s), {} bytes), asked by pid {}",
        before.chunks_cached,
        before.bytes_cached,
        peer.pid
    );
    Reply::ok(json!({
        "mountpoint": context.mountpoint,
        "dropped_chunks": before.chunks_cached,
        "dropped_bytes": before.bytes_cached,
    }))
}

fn volume_request(context: &Context, peer: Peer, request: &Request) -> Reply {
    #[derive(serde::Deserialize)]
    struct Body {
        volume: String,
        request: requests::Request,
    }
    let body: Body = match serde_json::from_slice(&request.body) {
        Ok(body) => body,
        Err(e) => return Reply::error(400, format!("a bad snapshot request: {e}")),
    };
    let fs = context.fs.clone();
    let frees_space = matches!(
        body.request,
        requests::Request::Delete { dry_run: false, .. }
    );
    let done = context.fs.with_open_volume(&body.volume, |id, volume| {
        if matches!(body.request, requests::Request::Rollback { .. }) {
            // Its readers would keep pages of the content it had; and a snapshot being read
            // may be one the rollback deletes.
            let read = volume.snapshots_being_read();
            let snapshots = if read.is_empty() {
                String::new()
            } else {
                format!(" (snapshots being read: {})", read.join(", "))
            };
            let refused = Error::refused(
                ErrorKind::InUse,
                format!(
                    "volume '{}' is open through the mount at {}{snapshots}: close it before a rollback",
                    body.volume,
                    context.mountpoint.display()
                ),
            );
            return (Err(refused), false);
        }
        let outcome = requests::apply(volume, &body.volume, &body.request);
        if outcome.is_err() || !frees_space {
            return (outcome, false);
        }
        if let Ok(deleted) = &outcome {
            let names = deleted.snapshots.iter().map(|s| s.name.clone());
            context.fs.forget_snapshots(&body.volume, names);
            log_snapshots_deleted(&body.volume, deleted, peer.pid);
        }
        let volume = volume.clone();
        let name = body.volume.clone();
        let started = Instant::now();
        // Held open until the space is back: its writer lock stays with this daemon.
        let spawned = std::thread::Builder::new()
            .name("reclaim".into())
            .spawn(move || {
                match volume.reclaim_throttled() {
                    Ok(()) => tracing::info!(
                        event = "reclaim_done",
                        volume = name.as_str(),
                        seconds = started.elapsed().as_secs_f64(),
                        "volume '{name}': the space of its deleted snapshots is reclaimed"
                    ),
                    Err(e) => tracing::error!("cannot reclaim the space of volume '{name}': {e}"),
                }
                fs.release_volume(id);
            });
        (outcome, spawned.is_ok())
    });
    if frees_space && matches!(done, Some(Ok(_))) {
        // The deleted names leave the kernel's cache before the command returns.
        wait_for_refresh(context);
    }
    match done {
        None => Reply::error(409, format!("volume '{}' is not open here", body.volume)),
        Some(Ok(outcome)) => Reply::ok(serde_json::to_value(outcome).expect("outcomes serialise")),
        Some(Err(e)) => Reply::error(422, e.to_relay()),
    }
}

/// One line for a deletion of snapshots, however many: their count and the first and last.
fn log_snapshots_deleted(volume: &str, outcome: &requests::Outcome, pid: i32) {
    let count = outcome.snapshots.len();
    let first = outcome.snapshots.first().map_or("", |s| s.name.as_str());
    let last = outcome.snapshots.last().map_or("", |s| s.name.as_str());
    tracing::info!(
        event = "snapshots_deleted",
        volume,
        count,
        first,
        last,
        pid,
        "volume '{volume}': deleted {count} snapshot(s) ({first} to {last}), asked by pid {pid}; \
         their space is reclaimed in the background"
    );
}

fn wake(context: &Context, _: Peer, _: &Request) -> Reply {
    let refreshed = wait_for_refresh(context);
    let _ = context.repair.send(());
    Reply::ok(json!({ "refreshed": refreshed }))
}

/// Has the refresh thread run now; whether it was done within `WAKE_WAIT`.
fn wait_for_refresh(context: &Context) -> bool {
    let (done, finished) = mpsc::sync_channel(1);
    context.refresh.send(done).is_ok() && finished.recv_timeout(WAKE_WAIT).is_ok()
}

/// A bound socket, not yet answering (connections wait in the backlog until `serve`).
pub struct ControlSocket {
    listener: UnixListener,
    file: SocketFile,
}

/// Removes the socket file when the daemon is done with it.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl ControlSocket {
    /// Creates the daemon's socket: under a temporary name, made 0600, then renamed into place,
    /// so that it is never reachable with looser rights and replaces any stale file of its name.
    pub fn bind(state_dir: &Path, mount_id: i64) -> Result<ControlSocket> {
        let dir = dir(state_dir);
        private_dir(&dir)?;
        let path = socket_path(state_dir, mount_id);
        let staging = dir.join(format!(".{mount_id}.new"));
        if path.as_os_str().len() > MAX_SOCKET_PATH || staging.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(Error::refused(ErrorKind::InvalidInput, format!(
                "the control socket {} would be longer than the {MAX_SOCKET_PATH} bytes a Unix socket path may have: use a shorter --state-dir",
                path.display()
            )));
        }
        let _ = std::fs::remove_file(&staging);
        let listener = UnixListener::bind(&staging)
            .ctx(|| format!("cannot create the control socket {}", staging.display()))?;
        let placed = std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o600))
            .and_then(|()| std::fs::rename(&staging, &path));
        if let Err(e) = placed {
            let _ = std::fs::remove_file(&staging);
            return Err(Error::io(
                format!(
                    "cannot put the control socket in place at {}",
                    path.display()
                ),
                e,
            ));
        }
        Ok(ControlSocket {
            listener,
            file: SocketFile(path),
        })
    }

    pub fn path(&self) -> &Path {
        &self.file.0
    }

    /// Starts answering, in a thread of its own.
    pub fn serve(self, context: Context) -> Result<ControlServer> {
        let stopping = Arc::new(AtomicBool::new(false));
        let listener = self.listener;
        let context = Arc::new(context);
        let stop = stopping.clone();
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || accept_loop(&listener, &context, &stop))
            .ctx(|| "cannot start the control socket's thread".into())?;
        Ok(ControlServer {
            file: self.file,
            stopping,
            thread: Some(thread),
        })
    }
}

/// The answering socket; dropping it stops answering and removes the socket.
pub struct ControlServer {
    file: SocketFile,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Relaxed);
        // A connection of our own wakes the accept; without it, the thread ends with the process.
        if UnixStream::connect(&self.file.0).is_ok() {
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

/// The control directory: root's (the daemon's) alone, mode 0700.
fn private_dir(dir: &Path) -> Result<()> {
    let what = || format!("cannot prepare the control directory {}", dir.display());
    match std::fs::symlink_metadata(dir) {
        Ok(meta) if !meta.is_dir() => {
            return Err(Error::refused(
                ErrorKind::Conflict,
                format!(
                    "{} is not a directory: remove it, the mount daemon makes its control directory there",
                    dir.display()
                ),
            ))
        }
        Ok(meta) => {
            let (uid, gid) = (nix::unistd::geteuid(), nix::unistd::getegid());
            if meta.uid() != uid.as_raw() || meta.gid() != gid.as_raw() {
                std::os::unix::fs::chown(dir, Some(uid.as_raw()), Some(gid.as_raw())).ctx(what)?;
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            match std::fs::DirBuilder::new().mode(0o700).create(dir) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                    return Err(Error::io(what(), e))
                }
                _ => {}
            }
        }
        Err(e) => return Err(Error::io(what(), e)),
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).ctx(what)
}

/// Removes the sockets of daemons that are gone (a daemon killed with -9 leaves its socket).
/// The directory is listed before `live` is asked, so a daemon starting meanwhile (its mount row
/// comes before its socket) is never taken for a dead one.
pub fn sweep(state_dir: &Path, live: impl FnOnce() -> Result<Vec<i64>>) {
    let Ok(entries) = std::fs::read_dir(dir(state_dir)) else {
        return;
    };
    let found: Vec<(i64, PathBuf)> = entries
        .flatten()
        .filter_map(|e| mount_id_of(&e.file_name()).map(|id| (id, e.path())))
        .collect();
    let Ok(live) = live() else {
        return;
    };
    for (id, path) in found {
        if !live.contains(&id) && std::fs::remove_file(&path).is_ok() {
            tracing::info!(
                "removed the control socket of a daemon that is gone: {}",
                path.display()
            );
        }
    }
}

/// Decrements the count of connections being served when a connection's thread ends.
struct Active(Arc<AtomicUsize>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn accept_loop(listener: &UnixListener, context: &Arc<Context>, stopping: &AtomicBool) {
    let active = Arc::new(AtomicUsize::new(0));
    for connection in listener.incoming() {
        if stopping.load(Ordering::Relaxed) {
            return;
        }
        let stream = match connection {
            Ok(stream) => stream,
            Err(e) => {
                // Out of descriptors, most likely: do not spin.
                tracing::warn!("control socket: cannot accept a connection: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let peer = match getsockopt(&stream, PeerCredentials) {
            Ok(cred) => Peer {
                pid: cred.pid(),
                uid: cred.uid(),
            },
            Err(e) => {
                tracing::warn!("control socket: cannot tell who connected ({e}): closed");
                continue;
            }
        };
        if peer.uid != 0 {
            tracing::warn!(
                "control socket: refused pid {} uid {}: only root may use it",
                peer.pid,
                peer.uid
            );
            answer(
                &stream,
                peer,
                &Reply::error(
                    403,
                    "permission denied: only root may use a mount daemon's control socket",
                ),
            );
            continue;
        }
        if active.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
            tracing::warn!(
                "control socket: {MAX_CONNECTIONS} connections already open: turned pid {} away",
                peer.pid
            );
            answer(
                &stream,
                peer,
                &Reply::error(503, "too many connections to the mount daemon: retry"),
            );
            continue;
        }
        active.fetch_add(1, Ordering::Relaxed);
        let guard = Active(active.clone());
        let context = context.clone();
        let spawned = std::thread::Builder::new()
            .name("control-conn".into())
            .spawn(move || {
                let _guard = guard;
                serve_connection(&stream, peer, &context);
            });
        if let Err(e) = spawned {
            tracing::warn!(
                "control socket: cannot start a thread for pid {}: {e}",
                peer.pid
            );
        }
    }
}

fn serve_connection(stream: &UnixStream, peer: Peer, context: &Context) {
    let reply = match http::read_request(stream, Instant::now() + REQUEST_TIMEOUT) {
        Ok(request) => {
            tracing::debug!(
                "control socket: {} {} ({} byte body) from pid {}",
                request.method,
                request.path,
                request.body.len(),
                peer.pid
            );
            route(context, peer, &request)
        }
        // A connection that only checks the socket is there.
        Err(ReadError::Closed) => return,
        Err(ReadError::Malformed(why)) => {
            tracing::warn!("control socket: bad request from pid {}: {why}", peer.pid);
            Reply::error(400, why)
        }
        Err(ReadError::TimedOut) => {
            tracing::warn!(
                "control socket: pid {} sent no complete request within {} s: closed",
                peer.pid,
                REQUEST_TIMEOUT.as_secs()
            );
            Reply::error(408, "no complete request in time")
        }
        Err(ReadError::Io(e)) => {
            tracing::debug!("control socket: reading from pid {}: {e}", peer.pid);
            return;
        }
    };
    answer(stream, peer, &reply);
}

fn answer(stream: &UnixStream, peer: Peer, reply: &Reply) {
    if let Err(e) = http::send_all(stream, &reply.encode(), Instant::now() + REQUEST_TIMEOUT) {
        tracing::debug!("control socket: cannot answer pid {}: {e}", peer.pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_names_map_to_mount_ids() {
        assert_eq!(mount_id_of(OsStr::new("12.sock")), Some(12));
        assert_eq!(mount_id_of(OsStr::new(".12.new")), Some(12));
        assert_eq!(mount_id_of(OsStr::new("12.sock.bak")), None);
        assert_eq!(mount_id_of(OsStr::new("notes")), None);
        assert_eq!(
            socket_path(Path::new("/var/lib/imgpool"), 3),
            Path::new("/var/lib/imgpool/control/3.sock")
        );
    }

    #[test]
    fn sweep_removes_only_the_sockets_of_gone_daemons() {
        let state = tempfile::tempdir().unwrap();
        let live = ControlSocket::bind(state.path(), 1).unwrap();
        let gone = ControlSocket::bind(state.path(), 2).unwrap();
        // A daemon killed with -9 leaves its file.
        std::mem::forget(gone.file);
        drop(gone.listener);
        std::fs::write(dir(state.path()).join("notes"), b"").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&dir(state.path())), 0o700);
        assert_eq!(mode(live.path()), 0o600);
        assert!(socket_path(state.path(), 2).exists());

        sweep(state.path(), || Ok(vec![1]));
        assert!(live.path().exists());
        assert!(!socket_path(state.path(), 2).exists());
        assert!(dir(state.path()).join("notes").exists());
        assert_eq!(
            sockets(state.path()).unwrap(),
            vec![(1, socket_path(state.path(), 1))]
        );
        let path = live.path().to_path_buf();
        drop(live);
        assert!(!path.exists());
    }

    #[test]
    fn a_state_directory_too_deep_for_a_socket_address_is_refused_with_the_reason() {
        let base = tempfile::tempdir().unwrap();
        let deep = base.path().join("d".repeat(60)).join("e".repeat(60));
        std::fs::create_dir_all(&deep).unwrap();
        let Err(e) = ControlSocket::bind(&deep, 1) else {
            panic!("a socket path over 107 bytes was accepted");
        };
        assert!(e.to_string().contains("shorter --state-dir"), "{e}");
    }

    #[test]
    fn a_stale_socket_of_the_same_name_is_replaced() {
        let state = tempfile::tempdir().unwrap();
        let first = ControlSocket::bind(state.path(), 7).unwrap();
        std::mem::forget(first.file);
        drop(first.listener);
        assert!(UnixStream::connect(socket_path(state.path(), 7)).is_err());
        let second = ControlSocket::bind(state.path(), 7).unwrap();
        assert!(UnixStream::connect(second.path()).is_ok());
    }

    #[test]
    fn unknown_paths_get_404_and_wrong_methods_405() {
        let status = |method: &str, path: &str| match find_route(method, path) {
            Ok(_) => 200,
            Err(reply) => reply.status,
        };
        assert_eq!(status("GET", "/v1/stats"), 200);
        assert_eq!(status("GET", "/metrics"), 200);
        assert_eq!(status("POST", "/metrics"), 405);
        assert_eq!(status("POST", "/v1/cache/drop"), 200);
        assert_eq!(status("GET", "/v2/nothing"), 404);
        assert_eq!(status("DELETE", "/v1/stats"), 405);
        let Err(reply) = find_route("GET", "/v1/cache/drop") else {
            panic!("GET /v1/cache/drop has no handler");
        };
        assert_eq!(reply.headers, vec!["Allow: POST".to_string()]);
    }
}
