//! The mount daemon's lifecycle: start (in the foreground, or detached with a readiness
//! handshake), the per-disk bind mounts, following changes made by CLI commands, the control
//! socket (`control`), and a clean stop on `imgpool umount`, SIGTERM or SIGINT.

use std::fs::OpenOptions;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuser::{Config, INodeNo, Notifier, Session, SessionACL};
use nix::mount::{umount2, MntFlags, MsFlags};
use nix::sys::signal::{SigSet, Signal};
use parking_lot::Mutex;

use crate::core::owner::{self, Owner, OwnerLock, WorkLock};
use crate::core::pool::Pool;
use crate::core::{health, repair};
use crate::daemon::control::{self, ControlSocket, Wake};
use crate::daemon::logging::LogFormat;
use crate::daemon::metrics::{Metrics, MetricsListener};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::format::mountinfo::{self, MountEntry, MountSource};
use crate::fs::fuse::FuseAdapter;
use crate::fs::namespace::{BindWanted, PoolFs, DISKS_DIR};
use crate::fs::ops::OpStats;
use crate::fs::read::ReadPath;
use crate::fs::stats::BindStatus;
use crate::fs::IoMode;

/// Where each disk's view is bind-mounted, relative to the disk: Longhorn's directory.
pub const BIND_DIR: &str = "backing-images";
pub const FS_TYPE: &str = "fuse.imgpool";
/// How often the daemon looks for changes made by other commands (a command that changed the
/// pool also wakes it through the control socket).
const REFRESH_INTERVAL: Duration = Duration::from_millis(200);
/// Where daemons before the control socket published their statistics; removed at start.
const OLD_STATS_DIR: &str = "stats";
/// Set in a detached daemon's environment: report readiness on stdout.
const NOTIFY_ENV: &str = "IMGPOOL_NOTIFY_READY";
const READY: &str = "ready";
/// How long `imgpool mount` waits for the daemon; its slowest honest step is a store busy with
/// other commands (30 s timeout).
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// The most FUSE threads a mount may have (`--threads`). Each thread holds its own `/dev/fuse`
/// descriptor and a request buffer; 256 is far more than a node's cores can keep busy and is
/// tested to mount and serve, while 100000 hung the mount until kill -9.
pub const MAX_THREADS: usize = 256;
/// The largest kernel readahead window (`--read-ahead`): the kernel splits it into requests of
/// at most 1 MiB anyway, and a larger window only reads data nobody asked for.
pub const MAX_READ_AHEAD: u64 = 256 << 20;

#[derive(Debug, Clone)]
pub struct MountConfig {
    pub mountpoint: PathBuf,
    pub bind: bool,
    pub threads: usize,
    pub log_file: Option<PathBuf>,
    pub cache_size: u64,
    pub io_mode: IoMode,
    /// The kernel's readahead window on the mount, in bytes.
    pub read_ahead: u64,
    /// Where to serve `GET /metrics` over TCP too (`--metrics-address`); none by default.
    pub metrics_address: Option<std::net::SocketAddr>,
    /// How the daemon writes its log (`--log-format`).
    pub log_format: LogFormat,
}

/// A detached daemon whose mount is ready.
#[derive(Debug, Clone)]
pub struct Started {
    pub mountpoint: PathBuf,
    pub pid: u32,
    pub log: PathBuf,
}

/// `imgpool mount`: in the foreground, serve until stopped (`None`); otherwise start a detached
/// daemon and return once its mount is ready (or with its error).
pub fn mount(state_dir: &Path, config: &MountConfig, foreground: bool) -> Result<Option<Started>> {
    let state_dir = &std::path::absolute(state_dir)
        .ctx(|| format!("cannot resolve {}", state_dir.display()))?;
    {
        // Inside or around a disk or the state directory, the mount would hide them. A dead
        // mount point cannot be resolved; its absolute path is checked then.
        let absolute = std::path::absolute(&config.mountpoint)
            .ctx(|| format!("cannot resolve {}", config.mountpoint.display()))?;
        let resolved = std::fs::canonicalize(&absolute).unwrap_or(absolute);
        Pool::open(state_dir)?.check_mount_point(&resolved)?;
    }
    if !foreground {
        // Fail here, with the real message, rather than in a daemon nobody watches. The daemon
        // checks again, under the pool's mount lock: two mounts started at once both pass here.
        let pool = Pool::open(state_dir)?;
        let config = MountConfig {
            mountpoint: check_mountpoint(&config.mountpoint, &pool.dead_mounts()?)?,
            ..config.clone()
        };
        return spawn_daemon(state_dir, &config).map(Some);
    }
    let notify = std::env::var_os(NOTIFY_ENV).is_some();
    let result = run_daemon(state_dir, config, notify);
    if notify {
        if let Err(e) = &result {
            // The parent relays this line, with its kind, as its own error.
            tell_parent(&format!("error: {}", e.to_relay()));
        }
    }
    result.map(|()| None)
}

/// One line of the readiness handshake to the `imgpool mount` that started this daemon: its
/// stdout is a pipe that process reads (not a terminal: the daemon prints nothing to a user).
fn tell_parent(line: &str) {
    let mut pipe = io::stdout().lock();
    let _ = writeln!(pipe, "{line}").and_then(|()| pipe.flush());
}

/// The mount point as an absolute path, once it is known to be a directory where nothing is
/// mounted, or where only one of `dead` (this pool's mounts whose daemon died, which the daemon
/// unmounts before it mounts) is.
fn check_mountpoint(path: &Path, dead: &[MountEntry]) -> Result<PathBuf> {
    let cannot = |why: String| {
        Error::refused(
            ErrorKind::InvalidInput,
            format!("cannot mount at {}: {why}", path.display()),
        )
    };
    let daemon_died = || {
        Error::refused(
            ErrorKind::Conflict,
            format!(
                "{} is a mount whose daemon died: run `imgpool umount {}` first",
                path.display(),
                path.display()
            ),
        )
    };
    let absolute =
        std::path::absolute(path).ctx(|| format!("cannot resolve {}", path.display()))?;
    let ours_and_dead =
        |e: &io::Error| is_dead_fuse_mount(e) && dead.iter().any(|m| m.mount_point == absolute);
    let canonical = match std::fs::canonicalize(path) {
        Ok(canonical) => canonical,
        Err(e) if ours_and_dead(&e) => return Ok(absolute),
        Err(e) if is_dead_fuse_mount(&e) => return Err(daemon_died()),
        Err(e) => return Err(cannot(format!("{e}; create the directory first"))),
    };
    match std::fs::metadata(&canonical) {
        Err(e) if ours_and_dead(&e) => return Ok(canonical),
        Err(e) if is_dead_fuse_mount(&e) => return Err(daemon_died()),
        Err(e) => return Err(cannot(e.to_string())),
        Ok(meta) if !meta.is_dir() => return Err(cannot("not a directory".into())),
        Ok(_) => {}
    }
    let table = mountinfo::read()?;
    if let Some(existing) = mountinfo::mount_at(&table, &canonical).filter(|m| !dead.contains(m)) {
        return Err(Error::refused(
            ErrorKind::Conflict,
            format!(
                "{} is already a mount point ({}): unmount it first, or pick another directory",
                canonical.display(),
                existing.fs_type
            ),
        ));
    }
    Ok(canonical)
}

/// A FUSE mount whose daemon is gone answers ENOTCONN; a request that was in flight when the
/// kernel aborted the connection answers ECONNABORTED instead.
fn is_dead_fuse_mount(error: &std::io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::ENOTCONN) | Some(libc::ECONNABORTED)
    )
}

fn spawn_daemon(state_dir: &Path, config: &MountConfig) -> Result<Started> {
    let exe = std::env::current_exe().ctx(|| "cannot find the imgpool executable".into())?;
    let log_path = config
        .log_file
        .clone()
        .unwrap_or_else(|| state_dir.join("mount.log"));
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .ctx(|| format!("cannot open log file {}", log_path.display()))?;
    let mut command = Command::new(exe);
    command
        .arg("--state-dir")
        .arg(state_dir)
        .arg("mount")
        .arg(&config.mountpoint)
        .arg("--foreground")
        .arg("--threads")
        .arg(config.threads.to_string())
        .arg("--cache-size")
        .arg(config.cache_size.to_string())
        .arg("--io-mode")
        .arg(match config.io_mode {
            IoMode::Cached => "cached",
            IoMode::Passthrough => "passthrough",
        })
        .arg("--read-ahead")
        .arg(config.read_ahead.to_string())
        .env(NOTIFY_ENV, "1")
        // Readiness goes to us on the pipe; systemd's socket is for a daemon it started itself.
        .env_remove("NOTIFY_SOCKET")
        // A daemon must not keep the caller's working directory (and its filesystem) busy.
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log);
    if !config.bind {
        command.arg("--no-bind");
    }
    if let Some(address) = config.metrics_address {
        command.arg("--metrics-address").arg(address.to_string());
    }
    command.arg("--log-format").arg(match config.log_format {
        LogFormat::Auto => "auto",
        LogFormat::Text => "text",
        LogFormat::Json => "json",
    });
    // SAFETY: setsid is async-signal-safe; it detaches the daemon from our terminal and session
    // so that the shell's Ctrl-C or hangup does not reach it. (`pre_exec` has no safe form.)
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .ctx(|| "cannot start the mount daemon".into())?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let read = BufReader::new(stdout).read_line(&mut line).map(|_| line);
        let _ = tx.send(read);
    });
    let line = match rx.recv_timeout(READY_TIMEOUT) {
        Ok(read) => read.ctx(|| "cannot read from the mount daemon".into())?,
        Err(_) => {
            // Our own child: stop it rather than leave a half-started daemon behind.
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::refused(
                ErrorKind::Internal,
                format!(
                    "the mount daemon did not report ready within {} s and was stopped: see {}; if {} is still mounted, run `imgpool umount --lazy {}`",
                    READY_TIMEOUT.as_secs(),
                    log_path.display(),
                    config.mountpoint.display(),
                    config.mountpoint.display()
                ),
            ));
        }
    };
    let line = line.trim_end();
    if line == READY {
        return Ok(Started {
            mountpoint: config.mountpoint.clone(),
            pid: child.id(),
            log: log_path,
        });
    }
    let status = child
        .wait()
        .ctx(|| "cannot wait for the mount daemon".into())?;
    Err(match line.strip_prefix("error: ") {
        Some(message) => Error::from_relay(message),
        None => Error::refused(
            ErrorKind::Internal,
            format!(
                "the mount daemon stopped ({status}) before the mount was ready: see {}",
                log_path.display()
            ),
        ),
    })
}

enum Event {
    Signal(Signal),
    SessionEnded(io::Result<()>),
}

/// Bind mounts of the disks' views, made and unmade by the daemon.
struct BindMounts {
    mountpoint: PathBuf,
    /// The source of our mount, which our binds carry too: what tells them from other mounts
    /// at the same paths.
    source: String,
    active: Mutex<Option<Vec<Bound>>>,
    /// Targets that could not be bound, so that a retry every refresh logs the reason once.
    failed: Mutex<Vec<PathBuf>>,
    /// Each in-service disk's bind as the last pass left it, for `imgpool status`.
    report: Arc<Mutex<Vec<BindStatus>>>,
}

/// A bind this daemon made.
struct Bound {
    target: PathBuf,
    /// The inode of the view bound there: it carries the disk's id.
    ino: u64,
    /// The last pass found it gone. It is made again only if the next pass finds it gone too:
    /// `imgpool umount` unmounts the binds just before the mount, and a bind made again in
    /// between would outlive the mount.
    gone: bool,
}

impl BindMounts {
    /// Keeps every in-service disk's view bound at `<disk>/backing-images`, checked against the
    /// mount table (never with a stat through the mount, which waits for a FUSE thread that a
    /// hung disk may hold) on each pass. A bind that is gone (its filesystem was unmounted and
    /// mounted again, or someone unmounted it) is made again once the disk's label is there; a
    /// bind that shows a view no longer there (the disk removed and added again) is replaced. The binds of disks
    /// whose filesystem failed or went away, and of disks removed from the pool, are released
    /// (detached: open files keep working), so that nothing of the daemon's keeps that
    /// filesystem busy. A disk that cannot be bound does not keep the others from being bound;
    /// the first new failure is returned.
    fn sync(&self, fs: &PoolFs) -> Result<()> {
        let mut active = self.active.lock();
        let Some(active) = active.as_mut() else {
            return Ok(()); // stopping
        };
        let table = mountinfo::read()?;
        let Some(device) = mountinfo::mount_at(&table, &self.mountpoint).map(|m| m.device.clone())
        else {
            return Ok(()); // the mount itself is going away
        };
        let views = fs.disk_binds();
        active.retain(|bound| {
            let keep = views
                .iter()
                .any(|v| v.path.join(BIND_DIR) == bound.target && v.wanted != BindWanted::Released);
            if !keep {
                release(&table, &device, &bound.target);
            }
            keep
        });
        let mut report = Vec::new();
        let mut first_error = None;
        for view in views.iter().filter(|v| v.wanted == BindWanted::Bound) {
            let target = view.path.join(BIND_DIR);
            let made = active.iter().position(|b| b.target == target);
            let ours = |m: &&mountinfo::MountEntry| m.fs_type == FS_TYPE && m.device == device;
            let result = match mountinfo::mount_at(&table, &target) {
                Some(m)
                    if ours(&m)
                        && m.root == Path::new("/").join(DISKS_DIR).join(&view.name)
                        && made.is_some_and(|i| active[i].ino == view.ino) =>
                {
                    if let Some(i) = made {
                        active[i].gone = false;
                    }
                    Ok(())
                }
                None if made.is_some_and(|i| !active[i].gone) => {
                    if let Some(i) = made {
                        active[i].gone = true;
                    }
                    continue;
                }
                // Nothing is bound onto the directory of a filesystem that is not mounted (the
                // catalog may not know yet); the disk's own state says what is wrong.
                _ if !fs.carries_label(&view.name) => continue,
                found => {
                    let source = self.mountpoint.join(DISKS_DIR).join(&view.name);
                    let bound = match found {
                        // A bind of an earlier disk of that name, or of this view made by hand.
                        Some(m) if ours(&m) => umount2(&target, MntFlags::MNT_DETACH)
                            .map_err(io::Error::from)
                            .and_then(|()| bind(&source, &target)),
                        _ => bind(&source, &target),
                    };
                    if bound.is_ok() {
                        match made {
                            Some(i) => {
                                active.remove(i);
                                tracing::warn!(
                                    "bound {} at {} again: the bind was gone (its filesystem mounted again, or unmounted by hand) or showed a disk since removed",
                                    source.display(),
                                    target.display()
                                );
                            }
                            None => tracing::info!(
                                event = "bound",
                                disk = view.name.as_str(),
                                path = &*target.to_string_lossy(),
                                "bound {} at {}",
                                source.display(),
                                target.display()
                            ),
                        }
                        active.push(Bound {
                            target: target.clone(),
                            ino: view.ino,
                            gone: false,
                        });
                    }
                    bound
                }
            };
            let problem = match result {
                Ok(()) => {
                    self.failed.lock().retain(|t| t != &target);
                    None
                }
                Err(e) => {
                    let problem = e.to_string();
                    let mut failed = self.failed.lock();
                    if !failed.contains(&target) && first_error.is_none() {
                        failed.push(target.clone());
                        first_error = Some(Error::BindMount {
                            disk: view.name.clone(),
                            target: target.clone(),
                            source: e,
                        });
                    }
                    Some(problem)
                }
            };
            report.push(BindStatus {
                disk: view.name.clone(),
                target,
                problem,
            });
        }
        *self.report.lock() = report;
        first_error.map_or(Ok(()), Err)
    }

    /// Unmounts every bind mount and refuses new ones.
    fn stop(&self, lazy: bool) {
        let Some(active) = self.active.lock().take() else {
            return;
        };
        for Bound { target, .. } in active.iter().rev() {
            // Not ours any more: unmounted already, by `imgpool umount` or by hand.
            if let Err(e) = unmount_if(target, lazy, |top| top.source == self.source) {
                tracing::warn!("cannot unmount {}: {e}", target.display())
            }
        }
    }
}

/// Detaches this mount's bind at `target`, if it is there (a filesystem unmounted from under
/// it took it along).
fn release(table: &[mountinfo::MountEntry], device: &str, target: &Path) {
    let ours = mountinfo::mount_at(table, target).is_some_and(|m| m.device == device);
    if !ours {
        return;
    }
    match umount2(target, MntFlags::MNT_DETACH) {
        Ok(()) => tracing::info!(
            event = "unbound",
            path = &*target.to_string_lossy(),
            "released the bind at {}: its disk left service, and nothing of the daemon's keeps its filesystem busy",
            target.display()
        ),
        Err(e) => tracing::warn!("cannot release the bind at {}: {e}", target.display()),
    }
}

fn bind(source: &Path, target: &Path) -> io::Result<()> {
    std::fs::create_dir_all(target)?;
    let table = mountinfo::read().map_err(|e| io::Error::other(e.to_string()))?;
    if let Some(existing) = mountinfo::mount_at(&table, target) {
        // A bind left by a daemon that was killed: its connection is dead, so stat fails.
        if existing.fs_type == FS_TYPE && std::fs::metadata(target).is_err() {
            umount2(target, MntFlags::MNT_DETACH)?;
        } else {
            return Err(io::Error::other(format!(
                "{} is already a mount point ({}); unmount it, or mount with --no-bind",
                target.display(),
                existing.fs_type
            )));
        }
    }
    bind_read_only(source, target).map_err(io::Error::from)
}

/// Binds `source` at `target`, read-only: a disk's view holds only images, while the mount
/// itself is writable for its volumes.
fn bind_read_only(source: &Path, target: &Path) -> nix::Result<()> {
    nix::mount::mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )?;
    nix::mount::mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .inspect_err(|_| {
        let _ = umount2(target, MntFlags::MNT_DETACH);
    })
}

/// Unmounts the topmost mount at `path` if `meant` says it is the one meant to go; whatever else
/// is mounted there (a mount of another pool, or of another daemon of this one) is left alone.
/// `Ok(false)`: the mount meant is not there.
fn unmount_if(path: &Path, lazy: bool, meant: impl Fn(&MountEntry) -> bool) -> io::Result<bool> {
    let table = mountinfo::read().map_err(|e| io::Error::other(e.to_string()))?;
    match mountinfo::mount_at(&table, path) {
        Some(top) if meant(top) => unmount(path, lazy).map(|()| true),
        _ => Ok(false),
    }
}

fn unmount(path: &Path, lazy: bool) -> io::Result<()> {
    let flags = if lazy {
        MntFlags::MNT_DETACH
    } else {
        MntFlags::empty()
    };
    umount2(path, flags).map_err(io::Error::from)
}

fn run_daemon(state_dir: &Path, config: &MountConfig, notify: bool) -> Result<()> {
    // Block the stop signals before any thread exists: every thread inherits the mask, and the
    // signal thread takes them with sigwait.
    let mut signals = SigSet::empty();
    // SIGUSR1 emptied the chunk cache before `imgpool cache drop`: it is taken (and only logged)
    // so that an old script sending it does not kill the daemon.
    for signal in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGUSR1,
    ] {
        signals.add(signal);
    }
    signals
        .thread_block()
        .map_err(io::Error::from)
        .ctx(|| "cannot block signals".into())?;
    // `main` restores SIGPIPE's default for the CLI, where it ends `imgpool ... | head` quietly.
    // The daemon must not die of it: the `imgpool mount` reading its readiness line may be gone,
    // and a write to its pipe then fails with EPIPE instead.
    let mut pipe = SigSet::empty();
    pipe.add(Signal::SIGPIPE);
    pipe.thread_block()
        .map_err(io::Error::from)
        .ctx(|| "cannot block SIGPIPE".into())?;

    let pool = Pool::open(state_dir)?;
    // What dead processes left (a killed daemon's mount row among them) is cleaned up at start;
    // then each round of the repair thread does it again.
    crate::core::recover::recover(&pool)?;
    pool.relax_durability()?;
    // Held until the mount and its binds are in place (see `serve`): the mount point checked
    // free stays free until this daemon has mounted there.
    let mounting = WorkLock::acquire(&pool.mount_lock_path())?;
    unmount_dead_mounts(&pool);
    let config = &MountConfig {
        mountpoint: check_mountpoint(&config.mountpoint, &[])?,
        ..config.clone()
    };
    let token = format!("mount-{}", uuid::Uuid::new_v4());
    let lock = OwnerLock::acquire(state_dir, &token)?;
    let mount_id = pool.register_mount(&config.mountpoint, std::process::id(), &token)?;
    let source = pool.mount_source(mount_id).to_string();
    let socket = ControlSocket::bind(state_dir, mount_id)?;
    // Bound before the mount, so that an address in use fails the start, not a later scrape.
    let metrics_listener = match config.metrics_address {
        Some(address) => {
            let (listener, bound) = MetricsListener::bind(address)?;
            tracing::info!("serving metrics at http://{bound}/metrics");
            Some(listener)
        }
        None => None,
    };
    control::sweep(state_dir, || {
        Ok(pool.live_mounts()?.iter().map(|m| m.id).collect())
    });
    let _ = std::fs::remove_dir_all(state_dir.join(OLD_STATS_DIR));
    let fs = Arc::new(PoolFs::new(
        pool,
        mount_id,
        ReadPath::new(config.cache_size),
    )?);
    let background = Arc::new(AtomicBool::new(false));
    let repair_counters = Arc::new(repair::RepairCounters::default());
    let wake_repair = start_health_and_repair(state_dir, &fs, &background, &repair_counters)?;
    let result = serve(
        fs.clone(),
        config,
        Mounting {
            lock: mounting,
            source,
        },
        signals,
        notify,
        socket,
        metrics_listener,
        (wake_repair, repair_counters),
    );
    // A copy the repair is writing is abandoned; the next start cleans it up and redoes it.
    background.store(true, Ordering::Relaxed);
    let _ = fs.pool().unregister_mount(mount_id);
    lock.release();
    result
}

/// Unmounts what daemons of this pool that died left mounted (their mounts and binds answer
/// ENOTCONN to everyone), so that this daemon can mount and bind where they were. Detached: a
/// replica may still hold a file open there, which no longer reads anyway.
fn unmount_dead_mounts(pool: &Pool) {
    let dead = match pool.dead_mounts() {
        Ok(dead) => dead,
        Err(e) => {
            tracing::warn!("cannot look for mounts left by dead daemons: {e}");
            return;
        }
    };
    for entry in dead {
        let path = &entry.mount_point;
        match unmount_if(path, true, |top| top == &entry) {
            Ok(true) => tracing::info!(
                "unmounted {}, left by a mount daemon that died",
                path.display()
            ),
            Ok(false) => {}
            Err(e) => tracing::warn!(
                "cannot unmount {}, left by a mount daemon that died: {e}",
                path.display()
            ),
        }
    }
}

/// The pool's mount lock and the source our mount will carry, while the mount is being made.
struct Mounting {
    lock: WorkLock,
    source: String,
}

/// The health monitor (probes, and faults from the read path), the repair, and the SHA-512s
/// of exported images (computed after their export), each in its own thread with its own
/// connection to the store. Returns a way to wake the repair.
fn start_health_and_repair(
    state_dir: &Path,
    fs: &PoolFs,
    stop: &Arc<AtomicBool>,
    counters: &Arc<repair::RepairCounters>,
) -> Result<mpsc::Sender<()>> {
    let (faults, fault_events) = mpsc::channel();
    fs.report_faults_to(faults);
    let (wake_repair, wake_events) = mpsc::channel();
    let monitor_pool = Pool::open(state_dir)?;
    let repair_pool = Pool::open(state_dir)?;
    let monitor_stop = stop.clone();
    let monitor_wakes_repair = wake_repair.clone();
    std::thread::Builder::new()
        .name("health".into())
        .spawn(move || {
            health::watch(
                monitor_pool,
                &fault_events,
                &monitor_wakes_repair,
                &monitor_stop,
            )
        })
        .ctx(|| "cannot start the health monitor".into())?;
    let repair_stop = stop.clone();
    let counters = counters.clone();
    std::thread::Builder::new()
        .name("repair".into())
        .spawn(move || {
            repair::run_in_background(repair_pool, &wake_events, &repair_stop, &counters)
        })
        .ctx(|| "cannot start the repair thread".into())?;
    let checksum_pool = Pool::open(state_dir)?;
    let checksum_stop = stop.clone();
    std::thread::Builder::new()
        .name("checksums".into())
        .spawn(move || {
            lower_this_threads_priority();
            checksum_pool.complete_sha512s_in_background(&checksum_stop)
        })
        .ctx(|| "cannot start the checksum thread".into())?;
    Ok(wake_repair)
}

/// Background hashing yields the CPU to the read path: the thread's nice value goes to 10.
#[allow(unsafe_code)]
fn lower_this_threads_priority() {
    // SAFETY: gettid has no preconditions; setpriority on our own thread id only reads its
    // arguments.
    let failed = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10) };
    if failed != 0 {
        tracing::warn!(
            "cannot lower the checksum thread's priority: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Tells systemd, when it started us with `Type=notify` (`NOTIFY_SOCKET` is set; otherwise
/// nothing is sent).
fn tell_systemd(states: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("cannot notify systemd: {e}");
    }
}

/// The one-line `STATUS=` of a daemon that is serving.
fn status_summary(mountpoint: &Path, binds: &[BindStatus], bind: bool) -> String {
    let bound = binds.iter().filter(|b| b.problem.is_none()).count();
    let binds = if !bind {
        "no bind mounts (--no-bind)".to_string()
    } else if bound == binds.len() {
        format!("{bound} disk view(s) bound")
    } else {
        format!(
            "{bound} of {} disk view(s) bound (`imgpool status` says why)",
            binds.len()
        )
    };
    format!("serving the pool at {}; {binds}", mountpoint.display())
}

#[allow(clippy::too_many_arguments)]
fn serve(
    fs: Arc<PoolFs>,
    config: &MountConfig,
    mounting: Mounting,
    signals: SigSet,
    notify: bool,
    socket: ControlSocket,
    metrics_listener: Option<std::net::TcpListener>,
    (wake_repair, repair_counters): (mpsc::Sender<()>, Arc<repair::RepairCounters>),
) -> Result<()> {
    let mountpoint = &config.mountpoint;
    let mut options = Config::default();
    options.n_threads = Some(config.threads);
    options.clone_fd = true;
    let passthrough = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(OpStats::default());
    let adapter = FuseAdapter::new(fs.clone(), config.io_mode, passthrough.clone(), ops.clone());
    let device = mount_fuse(mountpoint, &mounting.source)
        .ctx(|| format!("cannot mount FUSE at {}", mountpoint.display()))?;
    // Replicas run as other users than the daemon.
    let session = match Session::from_fd(adapter, device, SessionACL::All, options) {
        Ok(session) => session,
        Err(e) => {
            let _ = unmount_if(mountpoint, true, |top| top.source == mounting.source);
            return Err(e).ctx(|| format!("cannot start FUSE at {}", mountpoint.display()));
        }
    };
    let notifier = session.notifier();
    if let Err(e) = set_read_ahead(mountpoint, config.read_ahead) {
        tracing::warn!("cannot set the mount's readahead: {e}");
    }

    let (events, next_event) = mpsc::channel();
    let session_events = events.clone();
    let session_thread = std::thread::Builder::new()
        .name("fuse-session".into())
        .spawn(move || {
            let _ = session_events.send(Event::SessionEnded(session.run()));
        })
        .ctx(|| "cannot start the FUSE session".into())?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            if let Ok(signal) = signals.wait() {
                if events.send(Event::Signal(signal)).is_err() {
                    return;
                }
            }
        })
        .ctx(|| "cannot start the signal thread".into())?;

    let binds = Arc::new(BindMounts {
        mountpoint: mountpoint.clone(),
        source: mounting.source.clone(),
        active: Mutex::new(Some(Vec::new())),
        failed: Mutex::new(Vec::new()),
        report: Arc::default(),
    });
    if config.bind {
        if let Err(e) = binds.sync(&fs) {
            stop(&binds, mountpoint, true);
            let _ = session_thread.join();
            return Err(e);
        }
    }
    drop(mounting.lock);

    let stopping = Arc::new(AtomicBool::new(false));
    let (wake_refresh, wakes) = mpsc::channel::<Wake>();
    let refresher = {
        let (fs, binds, stopping) = (fs.clone(), binds.clone(), stopping.clone());
        let bind = config.bind;
        std::thread::Builder::new()
            .name("refresh".into())
            .spawn(move || {
                follow_changes(&fs, &notifier, bind.then_some(&*binds), &stopping, &wakes)
            })
            .ctx(|| "cannot start the refresh thread".into())?
    };
    let socket_path = socket.path().to_path_buf();
    let metrics = Arc::new(Metrics::new(
        fs.clone(),
        ops,
        repair_counters,
        config.io_mode,
        passthrough.clone(),
        binds.report.clone(),
    ));
    let served = socket
        .serve(control::Context {
            fs: fs.clone(),
            mountpoint: mountpoint.clone(),
            io_mode_requested: config.io_mode,
            passthrough,
            refresh: wake_refresh,
            repair: wake_repair,
            binds: binds.report.clone(),
            metrics: metrics.clone(),
        })
        .and_then(|control| {
            let listener = match metrics_listener {
                Some(listener) => Some(MetricsListener::serve(
                    listener,
                    metrics,
                    control::REQUEST_TIMEOUT,
                )?),
                None => None,
            };
            Ok((control, listener))
        });
    let (control, metrics_listener) = match served {
        Ok(served) => served,
        Err(e) => {
            stopping.store(true, Ordering::Relaxed);
            stop(&binds, mountpoint, true);
            let _ = refresher.join();
            let _ = session_thread.join();
            return Err(e);
        }
    };

    tracing::info!(
        event = "mounted",
        mountpoint = &*mountpoint.to_string_lossy(),
        mount_id = fs.mount_id(),
        pid = std::process::id(),
        "serving the pool at {} (control socket {})",
        mountpoint.display(),
        socket_path.display()
    );
    // systemd (`Type=notify`): ready at the same point as the handshake with `imgpool mount`.
    let summary = status_summary(mountpoint, &binds.report.lock(), config.bind);
    tell_systemd(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&summary),
    ]);
    if notify {
        tell_parent(READY);
        // Nobody reads our stdout any more: point it at /dev/null so a late print cannot fail.
        if let Ok(null) = std::fs::File::open("/dev/null") {
            if let Err(e) = nix::unistd::dup2_stdout(&null) {
                tracing::debug!("cannot point stdout at /dev/null: {e}");
            }
        }
    }

    let outcome = loop {
        match next_event.recv() {
            Ok(Event::Signal(Signal::SIGUSR1)) => {
                tracing::warn!(
                    "SIGUSR1 no longer empties the chunk cache: use `imgpool cache drop`"
                );
            }
            Ok(Event::Signal(signal)) => {
                tracing::info!(
                    event = "stopping",
                    signal = %signal,
                    mountpoint = &*mountpoint.to_string_lossy(),
                    "{signal}: unmounting {}",
                    mountpoint.display()
                );
                let status = format!("stopping ({signal}): unmounting {}", mountpoint.display());
                tell_systemd(&[
                    sd_notify::NotifyState::Stopping,
                    sd_notify::NotifyState::Status(&status),
                ]);
                stopping.store(true, Ordering::Relaxed);
                stop(&binds, mountpoint, true);
            }
            Ok(Event::SessionEnded(result)) => break result,
            Err(_) => break Ok(()),
        }
    };
    stopping.store(true, Ordering::Relaxed);
    drop(metrics_listener);
    drop(control);
    binds.stop(true);
    let _ = refresher.join();
    let _ = session_thread.join();
    tracing::info!(
        event = "unmounted",
        mountpoint = &*mountpoint.to_string_lossy(),
        mount_id = fs.mount_id(),
        "unmounted {}",
        mountpoint.display()
    );
    // A mount detached while files were open (a stop with files open, `umount --lazy`) ends
    // when the last one closes: the kernel then aborts the connection, and the session ends
    // with ECONNABORTED. That is the normal end once the mount is gone; an abort of a mount
    // still in place (through /sys/fs/fuse/connections) is a failure.
    let outcome = match outcome {
        Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) && !still_mounted(&binds.source) => {
            Ok(())
        }
        outcome => outcome,
    };
    outcome.ctx(|| format!("FUSE session at {} failed", mountpoint.display()))
}

/// Whether a mount carrying `source` (ours, or one of our binds) is still in the mount table.
fn still_mounted(source: &str) -> bool {
    mountinfo::read().map_or(true, |table| table.iter().any(|m| m.source == source))
}

/// Mounts a FUSE filesystem at `mountpoint` with `source`, for a session on the returned
/// `/dev/fuse` descriptor. Made here rather than by fuser's `Session::new`, which unmounts its
/// mount point by path when the session ends: by then that path is unmounted already (a warning
/// in the log at every clean stop) or, worse, holds another mount.
///
/// Options: `nodev,nosuid,noatime`; read-write for the volumes (every other write answers
/// `EROFS` in `fs::fuse`); no `default_permissions`, since on a writable mount the kernel would
/// let root pass `access(W_OK)` on the read-only images, so the adapter decides access;
/// `allow_other` (replicas run as other users than the daemon); the subtype makes the type
/// `fuse.imgpool` in the mount table.
fn mount_fuse(mountpoint: &Path, source: &str) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    let device = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")?;
    let root_mode = std::fs::metadata(mountpoint)?.mode();
    let data = format!(
        "fd={},rootmode={root_mode:o},user_id={},group_id={},allow_other,subtype=imgpool",
        device.as_raw_fd(),
        nix::unistd::getuid(),
        nix::unistd::getgid()
    );
    nix::mount::mount(
        Some(source),
        mountpoint,
        Some("fuse"),
        MsFlags::MS_NODEV | MsFlags::MS_NOSUID | MsFlags::MS_NOATIME,
        Some(data.as_str()),
    )?;
    Ok(device.into())
}

/// Sets the kernel's readahead window for the mount: its own backing device, named by the
/// mount's device number, read from the mount table (a stat would wait on our own session).
/// The kernel starts FUSE mounts at 128 KiB whatever the daemon asks at init.
fn set_read_ahead(mountpoint: &Path, bytes: u64) -> Result<()> {
    let table = mountinfo::read()?;
    let Some(entry) = mountinfo::mount_at(&table, mountpoint) else {
        return Err(Error::refused(
            ErrorKind::NotFound,
            format!("{} is not mounted", mountpoint.display()),
        ));
    };
    let path = format!("/sys/class/bdi/{}/read_ahead_kb", entry.device);
    std::fs::write(&path, format!("{}\n", bytes / 1024)).ctx(|| format!("cannot write {path}"))
}

/// Unmounts the binds, then the mount. A busy mount is detached: open files keep working until
/// they are closed, and the session ends then.
fn stop(binds: &BindMounts, mountpoint: &Path, lazy_if_busy: bool) {
    binds.stop(lazy_if_busy);
    let ours = |top: &MountEntry| top.source == binds.source;
    match unmount_if(mountpoint, false, ours) {
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) && lazy_if_busy => {
            tracing::warn!("{} is busy: detaching it", mountpoint.display());
            let _ = unmount_if(mountpoint, true, ours);
        }
        Err(e) => tracing::warn!("cannot unmount {}: {e}", mountpoint.display()),
        Ok(_) => {}
    }
}

/// Polls the store for changes by other commands, and looks at once when woken through the
/// control socket; tells the kernel to forget removed names and binds the views of new disks.
fn follow_changes(
    fs: &PoolFs,
    notifier: &Notifier,
    binds: Option<&BindMounts>,
    stopping: &AtomicBool,
    wakes: &mpsc::Receiver<Wake>,
) {
    while !stopping.load(Ordering::Relaxed) {
        let mut woken = Vec::new();
        match wakes.recv_timeout(REFRESH_INTERVAL) {
            Ok(wake) => woken.push(wake),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => std::thread::sleep(REFRESH_INTERVAL),
        }
        // Wakes that came together are answered by one reload.
        woken.extend(wakes.try_iter());
        match fs.refresh() {
            Ok(gone) => {
                for name in gone {
                    // ENOENT here only means the kernel had not cached the name.
                    let _ = notifier.inval_entry(INodeNo(name.parent), &name.name);
                }
            }
            Err(e) => tracing::warn!("cannot refresh the catalog: {e}"),
        }
        if let Some(binds) = binds {
            if let Err(e) = binds.sync(fs) {
                tracing::warn!("{e}");
            }
        }
        for wake in woken {
            let _ = wake.try_send(());
        }
    }
}

/// `imgpool umount`: the bind mounts first (they keep the filesystem alive), then the mount;
/// then wait for the daemon to finish. Returns the mount point unmounted. Only a mount of this
/// pool, and only a whole mount: a bind is unmounted alone only when its mount is gone.
pub fn umount(state_dir: &Path, mountpoint: &Path, lazy: bool) -> Result<PathBuf> {
    let pool = Pool::open(state_dir)?;
    // A mount whose daemon died cannot be stat'ed, so fall back to the path as given.
    let mountpoint = std::fs::canonicalize(mountpoint)
        .or_else(|_| std::path::absolute(mountpoint))
        .ctx(|| format!("cannot resolve {}", mountpoint.display()))?;
    let table = mountinfo::read()?;
    let entry = mountinfo::mount_at(&table, &mountpoint)
        .filter(|m| m.fs_type == FS_TYPE)
        .ok_or_else(|| {
            Error::refused(
                ErrorKind::NotFound,
                format!(
                    "{} is not an imgpool mount: `imgpool status` lists the pool's mounts",
                    mountpoint.display()
                ),
            )
        })?;
    if pool.owns_mount(entry) == Some(false) {
        let owner = MountSource::parse(&entry.source).map(|s| s.pool);
        return Err(Error::refused(
            ErrorKind::InvalidInput,
            format!(
                "{} is a mount of another pool ({}), not of the pool in {}: run `imgpool --state-dir <that pool's state directory> umount {}`",
                mountpoint.display(),
                owner.unwrap_or_default(),
                pool.state_dir().display(),
                mountpoint.display()
            ),
        ));
    }
    let same_mount = |m: &&MountEntry| m.device == entry.device && m.source == entry.source;
    if entry.is_bind() {
        if let Some(whole) = table.iter().filter(same_mount).find(|m| !m.is_bind()) {
            let disk = entry.root.file_name().unwrap_or_default().to_string_lossy();
            return Err(Error::refused(
                ErrorKind::InvalidInput,
                format!(
                    "{} is the bind mount of disk '{disk}' of the pool mounted at {}, and goes with it: `imgpool umount {}` unmounts the pool and every bind",
                    mountpoint.display(),
                    whole.mount_point.display(),
                    whole.mount_point.display()
                ),
            ));
        }
    }
    // A bind whose mount is gone (its daemon died) goes alone; a mount takes its binds first.
    let binds: Vec<&MountEntry> = if entry.is_bind() {
        Vec::new()
    } else {
        table
            .iter()
            .rev()
            .filter(same_mount)
            .filter(|m| m.id != entry.id)
            .collect()
    };
    let unmount_meant = |meant: &MountEntry| {
        unmount_if(&meant.mount_point, lazy, |top| top.id == meant.id)
            .map_err(|e| busy_error(&meant.mount_point, e))
    };
    let mut unmounted = Vec::new();
    let result = binds
        .iter()
        .try_for_each(|bind| {
            if unmount_meant(bind)? {
                unmounted.push(*bind);
            }
            Ok(())
        })
        .and_then(|()| unmount_meant(entry).map(drop));
    if let Err(e) = result {
        // Leave the mount as it was: replicas on the disks already unbound keep their path.
        for bind in unmounted {
            let source = mountpoint.join(bind.root.strip_prefix("/").unwrap_or(&bind.root));
            if let Err(err) = bind_read_only(&source, &bind.mount_point) {
                tracing::error!("cannot restore {}: {err}", bind.mount_point.display());
            }
        }
        return Err(e);
    }
    // The daemon ends with the last of its mount and binds.
    if table.iter().filter(same_mount).count() == binds.len() + 1 {
        let mount_id = MountSource::parse(&entry.source).map(|s| s.mount_id);
        wait_for_daemon(&pool, mount_id, &mountpoint);
    }
    Ok(mountpoint)
}

fn busy_error(path: &Path, e: io::Error) -> Error {
    if e.raw_os_error() == Some(libc::EBUSY) {
        Error::refused(
            ErrorKind::InUse,
            format!(
                "{} is busy: files are open through it (`fuser -vm {}` lists them); close them and retry, or use --lazy",
                path.display(),
                path.display()
            ),
        )
    } else {
        Error::io(format!("cannot unmount {}", path.display()), e)
    }
}

/// Waits (a bounded time) for the daemon serving the mount recorded as `mount_id` to exit (the
/// one at `mountpoint`, for a mount that does not name its row), so that when `umount` returns
/// its state (open handles, the mount row) is settled.
fn wait_for_daemon(pool: &Pool, mount_id: Option<i64>, mountpoint: &Path) {
    let state_dir = pool.state_dir();
    let Ok(mounts) = pool.mounts() else {
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let served = mounts.iter().filter(|m| match mount_id {
        Some(id) => m.id == id,
        None => m.mountpoint == mountpoint,
    });
    for mount in served {
        while Instant::now() < deadline {
            match owner::check(state_dir, &mount.owner) {
                Owner::Alive => std::thread::sleep(Duration::from_millis(20)),
                dead => {
                    dead.finish();
                    break;
                }
            }
        }
    }
}
