//! `imgpool copy SRC DST`: a volume copied, or kept current (`--refresh`), here or on another
//! node. Both ends are child processes: this same binary for a volume of this pool, `ssh HOST
//! imgpool ...` (or `--rsh CMD HOST ...`) for one on another node. The plan comes from both
//! sides' `snapshot list --json` (`core::copy_plan`); each of its packages is a
//! `send ... | recv ...` whose stream goes through this process, which counts the bytes that
//! cross. Children are killed and reaped on every way out (`Children`); a cut leaves each side
//! as its own command leaves it on failure (docs/send-receive.md, "Refresh copy").

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::{IsTerminal, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::Duration;

use clap::Args;
use serde_json::{json, Value};

use crate::core::copy_plan::{self, Kind, Package, Plan, Refusal, Snapshot};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::format::stream::StreamProgress;
use crate::format::units::bytes;

#[derive(Args, Debug)]
pub struct CopyArgs {
    /// The volume to copy: VOLUME (this pool) or [USER@]HOST:VOLUME (another node).
    pub source: String,
    /// Where to: VOLUME or [USER@]HOST:VOLUME. A name with ':' is always HOST:VOLUME.
    pub target: String,
    /// Bring an existing target up to date: from the newest snapshot both sides have, the
    /// target's newer snapshots and writes since are discarded (listed first), the missing
    /// snapshots sent, then the current state.
    #[arg(long)]
    pub refresh: bool,
    /// Print the plan (what would be sent and what discarded) and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// The command that reaches another node, split at spaces, the host appended after it
    /// (default: ssh), e.g. "ssh -p 2222 -i KEY".
    #[arg(long, value_name = "CMD")]
    pub rsh: Option<String>,
    /// The other node's state directory (default: its imgpool's default).
    #[arg(long, value_name = "DIR")]
    pub remote_state_dir: Option<PathBuf>,
    /// The imgpool command on the other node.
    #[arg(long, value_name = "PATH", default_value = "imgpool")]
    pub remote_imgpool: String,
    /// Print what was copied as one JSON object: the packages, the snapshots sent, the bytes
    /// that crossed, what the target discarded
    #[arg(long)]
    pub json: bool,
}

/// How the ends are started: this binary with this invocation's state dir, or the remote
/// command.
struct Launch {
    exe: PathBuf,
    state_dir: PathBuf,
    rsh: Vec<String>,
    remote_state_dir: Option<PathBuf>,
    remote_imgpool: String,
    /// The control socket of each host's shared connection (`Links`), once open.
    sockets: RefCell<HashMap<String, PathBuf>>,
}

/// The ssh connections of a copy, one per host, shared by all its commands there (OpenSSH's
/// connection sharing: a master `ssh -M -N -S SOCKET HOST` of this process's own, and each
/// command `ssh -S SOCKET HOST ...` through it), when the remote shell is ssh. Without it a
/// small refresh is mostly handshakes: three or four of them, each a few tenths of a second.
/// Dropping it ends the masters (SIGTERM), reaps them and removes the sockets' directory.
struct Links {
    dir: Option<PathBuf>,
    masters: Vec<Child>,
    sockets: HashMap<String, PathBuf>,
}

impl Links {
    fn open(hosts: &[&str], rsh: &[String]) -> Result<Links> {
        let mut links = Links {
            dir: None,
            masters: Vec::new(),
            sockets: HashMap::new(),
        };
        if Path::new(&rsh[0]).file_name() != Some("ssh".as_ref()) {
            return Ok(links);
        }
        for &host in hosts {
            if links.sockets.contains_key(host) {
                continue;
            }
            let dir = match &links.dir {
                Some(dir) => dir.clone(),
                None => {
                    // Private (0700): whoever can reach a control socket runs commands as us.
                    // A socket's path has at most 107 bytes: a long $TMPDIR gives way to /tmp.
                    let tmp = Some(std::env::temp_dir())
                        .filter(|t| t.as_os_str().len() <= 64)
                        .unwrap_or_else(|| PathBuf::from("/tmp"));
                    let dir = tmp.join(format!(
                        "imgpool-copy.{}.{}",
                        std::process::id(),
                        &uuid::Uuid::new_v4().simple().to_string()[..8]
                    ));
                    std::fs::DirBuilder::new()
                        .mode(0o700)
                        .create(&dir)
                        .ctx(|| format!("cannot create {}", dir.display()))?;
                    links.dir = Some(dir.clone());
                    dir
                }
            };
            let socket = dir.join(links.masters.len().to_string());
            let mut master = Command::new(&rsh[0])
                .args(&rsh[1..])
                .args(["-M", "-N", "-o", "ControlPersist=no", "-S"])
                .arg(&socket)
                .arg(host)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .ctx(|| format!("cannot start '{}' (--rsh)", rsh[0]))?;
            let stderr = drain(master.stderr.take().expect("piped"));
            links.masters.push(master);
            let master = links.masters.last_mut().expect("just pushed");
            // The socket appears once the connection is up and authenticated.
            while !socket.exists() {
                if let Some(status) = master.try_wait().ctx(|| "cannot wait for ssh".into())? {
                    let text = stderr.join().unwrap_or_default();
                    let text = String::from_utf8_lossy(&text);
                    let line = match last_line(&text) {
                        "" => format!("ssh exited ({status}) without a message"),
                        line => line.to_string(),
                    };
                    return Err(Error::refused(
                        ErrorKind::Interrupted,
                        format!("cannot reach {host}: {line}"),
                    ));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            links.sockets.insert(host.to_string(), socket);
        }
        Ok(links)
    }
}

impl Drop for Links {
    fn drop(&mut self) {
        for master in &mut self.masters {
            if matches!(master.try_wait(), Ok(None)) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(master.id() as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let _ = wait_or_kill(master, Duration::from_secs(5));
        }
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// One end of the copy: a volume here or on a host.
struct Side<'a> {
    /// As the user wrote it, for messages.
    label: String,
    host: Option<String>,
    volume: String,
    launch: &'a Launch,
    /// Whether a command of this side has run: an ssh failure after is a lost connection,
    /// before it the host cannot be reached.
    reached: Cell<bool>,
}

impl<'a> Side<'a> {
    fn parse(text: &str, launch: &'a Launch) -> Result<Side<'a>> {
        let bad = |why: &str| {
            Error::refused(
                ErrorKind::InvalidInput,
                format!("'{text}' {why}: give VOLUME or [USER@]HOST:VOLUME"),
            )
        };
        let (host, volume) = match text.split_once(':') {
            Some(("", _)) => return Err(bad("has no host before ':'")),
            Some((host, volume)) => (Some(host.to_string()), volume),
            None => (None, text),
        };
        if volume.is_empty() {
            return Err(bad("names no volume"));
        }
        if volume.contains('@') {
            return Err(bad(
                "names a snapshot; a copy takes a volume with all its snapshots",
            ));
        }
        crate::format::names::check_image_name(volume)
            .map_err(|e| bad(&format!("is not a volume name ({e})")))?;
        Ok(Side {
            label: text.to_string(),
            host,
            volume: volume.to_string(),
            launch,
            reached: Cell::new(false),
        })
    }

    /// `imgpool ARGS` on this side: here as this binary with this state dir, there through
    /// the remote shell, every word quoted for it.
    fn command(&self, args: &[String]) -> Command {
        let launch = self.launch;
        match &self.host {
            None => {
                let mut command = Command::new(&launch.exe);
                command.arg("--state-dir").arg(&launch.state_dir).args(args);
                command
            }
            Some(host) => {
                let mut words = vec![launch.remote_imgpool.clone()];
                if let Some(dir) = &launch.remote_state_dir {
                    words.push("--state-dir".into());
                    words.push(dir.to_string_lossy().into_owned());
                }
                words.extend(args.iter().cloned());
                let remote: Vec<String> = words.iter().map(|w| shell_quote(w)).collect();
                let mut command = Command::new(&launch.rsh[0]);
                command.args(&launch.rsh[1..]);
                if let Some(socket) = launch.sockets.borrow().get(host) {
                    command.args(["-o", "ControlMaster=no", "-S"]).arg(socket);
                }
                command.arg(host).arg(remote.join(" "));
                command
            }
        }
    }

    /// Runs `imgpool ARGS --json` here or there to its end; its output as JSON.
    fn query(&self, args: &[&str]) -> Result<Value> {
        let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        args.push("--json".into());
        let out = self
            .command(&args)
            .stdin(Stdio::null())
            .output()
            .ctx(|| format!("cannot start {}", self.starter()))?;
        if !out.status.success() {
            return Err(self.failure(out.status, &out.stderr));
        }
        self.reached.set(true);
        serde_json::from_slice(&out.stdout).map_err(|e| {
            Error::refused(
                ErrorKind::Internal,
                format!(
                    "imgpool {} {}gave output that is not JSON ({e}): is it the same imgpool version?",
                    args.join(" "),
                    self.on()
                ),
            )
        })
    }

    /// What starts this side's processes, for a message when it cannot be started.
    fn starter(&self) -> String {
        match &self.host {
            None => self.launch.exe.display().to_string(),
            Some(_) => format!("'{}' (--rsh)", self.launch.rsh[0]),
        }
    }

    /// "on HOST " for a remote side, "" here.
    fn on(&self) -> String {
        self.host
            .as_deref()
            .map(|h| format!("on {h} "))
            .unwrap_or_default()
    }

    /// Whether a command of this side ended because its connection did (ssh exits 255, or
    /// was killed).
    fn lost_connection(&self, status: ExitStatus) -> bool {
        self.host.is_some() && matches!(status.code(), Some(255) | None)
    }

    /// The error of a command of this side that exited with `status`, from the last line it
    /// wrote on standard error (imgpool's one-line message, or ssh's).
    fn failure(&self, status: ExitStatus, stderr: &[u8]) -> Error {
        let text = String::from_utf8_lossy(stderr);
        let line = match last_line(&text) {
            "" if self.lost_connection(status) => "ssh ended without a message",
            "" => "it ended without a message",
            line => line.strip_prefix("imgpool: ").unwrap_or(line),
        };
        match (&self.host, status.code()) {
            (Some(host), Some(255)) if self.reached.get() => Error::refused(
                ErrorKind::Interrupted,
                format!("the connection to {host} was lost: {line}"),
            ),
            (Some(host), Some(255)) => Error::refused(
                ErrorKind::Interrupted,
                format!("cannot reach {host}: {line}"),
            ),
            (Some(host), Some(127)) => Error::refused(
                ErrorKind::NotFound,
                format!(
                    "'{}' cannot be run on {host}: {line} (give its path with --remote-imgpool)",
                    self.launch.remote_imgpool
                ),
            ),
            (_, Some(_)) => Error::refused(ErrorKind::Conflict, format!("{}{line}", self.on())),
            (Some(host), None) => Error::refused(
                ErrorKind::Interrupted,
                format!(
                    "the connection to {host} was lost: {} was killed ({status})",
                    self.starter()
                ),
            ),
            (_, None) => Error::refused(
                ErrorKind::Interrupted,
                format!("{} was killed ({status})", self.starter()),
            ),
        }
    }

    /// The volume's snapshots as listed (the pool's temporary ones too), oldest first; `None`
    /// when it does not exist.
    fn snapshots(&self, must_exist: bool) -> Result<Option<Vec<Snapshot>>> {
        // One command in the common case; when it fails, a second says whether that is
        // because there is no such volume (a connection less per copy: ssh's handshake is
        // most of a small refresh).
        let listed = match self.query(&["snapshot", "list", &self.volume]) {
            Ok(listed) => listed,
            Err(e) if !must_exist => {
                let volumes = self.query(&["volume", "list"])?;
                let exists = volumes
                    .as_array()
                    .is_some_and(|list| list.iter().any(|v| v["name"] == self.volume.as_str()));
                return if exists { Err(e) } else { Ok(None) };
            }
            Err(e) => return Err(e),
        };
        // An array, or an object with "snapshots".
        let list = listed
            .as_array()
            .or_else(|| listed["snapshots"].as_array())
            .ok_or_else(|| {
                Error::refused(
                    ErrorKind::Internal,
                    format!("{}snapshot list gave no list of snapshots", self.on()),
                )
            })?;
        let snapshots = list
            .iter()
            .filter_map(|s| {
                Some(Snapshot {
                    name: s["name"].as_str()?.to_string(),
                    guid: s["guid"].as_str()?.to_string(),
                })
            })
            .collect();
        Ok(Some(snapshots))
    }
}

/// `word` as one word of a POSIX shell command line.
fn shell_quote(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-./:@%+=,".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

fn last_line(text: &str) -> &str {
    text.lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("")
}

/// The child processes of one package: killed (SIGKILL) and reaped when dropped unless they
/// were waited for, so that no way out of `copy` leaves one behind.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

/// Reads a child's pipe to its end on a thread (a child blocked on a full stderr pipe would
/// stall the stream), keeping the last 64 KiB.
fn drain(mut pipe: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    kept.extend_from_slice(&buf[..n]);
                    if kept.len() > 1 << 16 {
                        kept.drain(..kept.len() - (1 << 16));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        kept
    })
}

/// What one package did.
struct Crossed {
    bytes: u64,
    /// `recv --json`'s summary.
    received: Value,
    /// `send --json`'s summary (its last line on standard error), if it gave one.
    sent: Value,
}

/// The progress of the copy on a terminal: bytes, rate, package and snapshot.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    fn new(shown: bool) -> Progress {
        let bar = (shown && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new_spinner().with_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} {prefix} {msg} {bytes} ({binary_bytes_per_sec}) {elapsed}",
                )
                .expect("static template"),
            );
            bar.enable_steady_tick(Duration::from_millis(100));
            bar
        });
        Progress { bar }
    }
}

/// Why a package did not complete, and what that says of the target.
enum Failed {
    /// Nothing of it was applied: `recv` refused it (its own error, exit status 1), or never
    /// got it.
    NotApplied(Error),
    /// `recv` ended without saying how (killed, its connection lost): it may have got to its
    /// end and applied the package, or not.
    Unknown(Error),
    /// `recv` applied it whole (exit status 0); something failed after its stream ended (the
    /// sender, cleaning up).
    Applied(Error, Box<Crossed>),
}

/// Runs one package: `send` on the source piped through this process to `recv` on the target.
fn run_package(
    source: &Side,
    target: &Side,
    package: &Package,
    progress: &Progress,
    label: String,
) -> std::result::Result<Crossed, Failed> {
    let mut send_args = vec![
        "send".to_string(),
        match &package.to {
            Some(snap) => format!("{}@{snap}", source.volume),
            None => source.volume.clone(),
        },
    ];
    if let Some(from) = &package.from {
        send_args.extend(["--from".to_string(), from.clone()]);
    }
    if package.from_all {
        send_args.push("--from-all".into());
    }
    send_args.push("--json".into());
    let mut recv_args = vec!["recv".to_string(), target.volume.clone()];
    if package.force {
        recv_args.push("--force".into());
    }
    recv_args.push("--json".into());

    let mut children = Children(Vec::with_capacity(2));
    let mut sender = source
        .command(&send_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ctx(|| format!("cannot start {}", source.starter()))
        .map_err(Failed::NotApplied)?;
    let mut stream = sender.stdout.take().expect("piped");
    let send_err = drain(sender.stderr.take().expect("piped"));
    children.0.push(sender);
    let mut receiver = target
        .command(&recv_args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ctx(|| format!("cannot start {}", target.starter()))
        .map_err(Failed::NotApplied)?;
    let mut to = receiver.stdin.take().expect("piped");
    // Pipes of 1 MiB, the relay's read size, rather than the default 64 KiB: sixteen times
    // fewer reads, writes and wake-ups for the bytes that cross. Best effort (a system whose
    // fs.pipe-max-size is smaller keeps the default).
    for pipe in [stream.as_fd(), to.as_fd()] {
        let _ = nix::fcntl::fcntl(pipe, nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20));
    }
    let recv_out = drain(receiver.stdout.take().expect("piped"));
    let recv_err = drain(receiver.stderr.take().expect("piped"));
    children.0.push(receiver);

    if let Some(bar) = &progress.bar {
        bar.set_prefix(label);
        bar.set_message("");
        bar.set_position(0);
        bar.reset_elapsed();
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut crossed = 0u64;
    let mut followed = StreamProgress::default();
    // Why the relay stopped early, if it did.
    let relay_error = loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => break None,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => break Some(format!("reading the stream failed: {e}")),
        };
        if let Err(e) = to.write_all(&buf[..n]) {
            break Some(format!(
                "the receiving side stopped taking the stream ({e})"
            ));
        }
        crossed += n as u64;
        if let Some(bar) = &progress.bar {
            followed.feed(&buf[..n]);
            if followed.snapshots > 0 {
                bar.set_message(format!(
                    "snapshot {} of {}",
                    followed.begun, followed.snapshots
                ));
            }
            bar.set_position(crossed);
        }
    };
    // The end of the stream for the receiver: it applies what it got, or refuses a cut one.
    drop(to);
    // A sender whose reader is gone gets EPIPE and cleans up after itself.
    drop(stream);
    let [sender, receiver] = children.0.as_mut_slice() else {
        unreachable!("two children")
    };
    let receiver_status = receiver
        .wait()
        .ctx(|| "cannot wait for recv".into())
        .map_err(Failed::Unknown)?;
    let sender_status = wait_or_kill(sender, Duration::from_secs(30));
    let send_err = send_err.join().unwrap_or_default();
    let recv_err = recv_err.join().unwrap_or_default();
    let recv_out = recv_out.join().unwrap_or_default();
    // Both reaped: nothing left for the guard.
    children.0.clear();

    if !receiver_status.success() {
        // The first cause first: a lost connection (either side's ssh), then the sender (a
        // cut stream is its effect on the receiver), then the receiver.
        let sender_failed = match &sender_status {
            Ok(status) if !status.success() => Some(*status),
            _ => None,
        };
        let error = match sender_failed {
            Some(status) if !target.lost_connection(receiver_status) => {
                source.failure(status, &send_err)
            }
            _ => target.failure(receiver_status, &recv_err),
        };
        // `recv` exits 1 (or 2, its arguments refused) with its own line when it did not
        // apply the stream; any other end (a signal, a lost connection, a crash) says nothing
        // of how far it got.
        let refused = matches!(receiver_status.code(), Some(1 | 2))
            && !target.lost_connection(receiver_status);
        return Err(if refused {
            Failed::NotApplied(error)
        } else {
            Failed::Unknown(error)
        });
    }
    let crossed = Crossed {
        bytes: crossed,
        received: serde_json::from_slice(&recv_out).unwrap_or(Value::Null),
        sent: serde_json::from_str(last_line(&String::from_utf8_lossy(&send_err)))
            .unwrap_or(Value::Null),
    };
    // The receiver took the stream to its end and applied it: whatever fails now, it has it.
    let after = match (relay_error, sender_status) {
        (Some(error), _) => Error::refused(ErrorKind::Interrupted, error),
        (None, Err(e)) => e,
        (None, Ok(status)) if !status.success() => source.failure(status, &send_err),
        (None, Ok(_)) => return Ok(crossed),
    };
    Err(Failed::Applied(after, Box::new(crossed)))
}

/// Waits for `child` up to `timeout`, then kills it; its status.
fn wait_or_kill(child: &mut Child, timeout: Duration) -> Result<ExitStatus> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().ctx(|| "cannot wait for send".into())? {
            return Ok(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            return child.wait().ctx(|| "cannot wait for send".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The plan in words, one line each (`would` in a dry run).
fn describe(
    plan: &Plan,
    source: &Side,
    target: &Side,
    refresh: bool,
    dry_run: bool,
) -> Vec<String> {
    let mut lines = Vec::new();
    match &plan.kind {
        Kind::Full if refresh => lines.push(format!(
            "{} does not exist, so it has no snapshot in common with {}: a full copy",
            target.label, source.label
        )),
        Kind::Full => lines.push(format!(
            "a full copy of {} to {}",
            source.label, target.label
        )),
        Kind::Refresh { common } => lines.push(format!(
            "a refresh of {} from {}@{common}, the newest snapshot both have",
            target.label, source.label
        )),
        Kind::Replace => {
            // It is swapped in at the end of the first package: a cut of the second leaves
            // it replaced.
            lines.push(match plan.send.last() {
                Some(newest) => format!(
                    "{} shares no snapshot with {}: a full copy replaces it once the copy's snapshots have all arrived (a cut before that leaves it as it is; a cut after, while the current state crosses, leaves it replaced, at {newest})",
                    target.label, source.label
                ),
                None => format!(
                    "{} shares no snapshot with {}: a full copy replaces it once the copy has arrived whole (a cut leaves it as it is)",
                    target.label, source.label
                ),
            });
            if plan.send.is_empty() {
                lines.push(format!(
                    "{} has no snapshot: a refresh starts from one both sides have, so each copies it whole until it has one",
                    source.label
                ));
            }
        }
    }
    let will = if dry_run { "would" } else { "will" };
    let why = match plan.kind {
        Kind::Replace => "the target is replaced",
        _ => "newer than the common snapshot, on the target only",
    };
    for name in &plan.discard {
        let temporary = if copy_plan::is_temporary(name) {
            " (a temporary snapshot of a command there, or of one that died)"
        } else {
            ""
        };
        lines.push(format!(
            "{will} delete {}@{name}: {why}{temporary}",
            target.label
        ));
    }
    match &plan.kind {
        Kind::Refresh { common } => lines.push(format!(
            "{will} discard any writes to {} since {common}",
            target.label
        )),
        Kind::Replace => lines.push(format!(
            "{will} discard the current content of {}",
            target.label
        )),
        Kind::Full => {}
    }
    let snapshots = if plan.send.is_empty() {
        "no snapshot".to_string()
    } else {
        format!("{} snapshot(s) ({})", plan.send.len(), plan.send.join(", "))
    };
    lines.push(format!(
        "{will} send {snapshots}, then the current state of {}",
        source.label
    ));
    lines
}

/// How the target is when package `index` was not applied, for the error line.
fn left_before(plan: &Plan, index: usize, target: &Side) -> String {
    if index > 0 {
        return left_after(plan, index - 1, target);
    }
    match &plan.kind {
        Kind::Full => format!("{} was not created", target.label),
        Kind::Replace => format!("{} is as it was (not replaced)", target.label),
        Kind::Refresh { common } => format!(
            "{} keeps its snapshots up to {common} ({} unless the receive got to discard them)",
            target.label,
            if plan.discard.is_empty() {
                "and its content".to_string()
            } else {
                format!("and {}", plan.discard.join(", "))
            }
        ),
    }
}

/// How the target is once package `index` was applied, for the error line of a failure after.
fn left_after(plan: &Plan, index: usize, target: &Side) -> String {
    let replaced = if plan.kind == Kind::Replace {
        " is replaced: it"
    } else {
        ""
    };
    match plan.send.last() {
        Some(newest) if index + 1 < plan.packages.len() => format!(
            "{}{replaced} has every snapshot up to {newest} and is at {newest}: `imgpool copy --refresh` sends the rest",
            target.label
        ),
        _ => format!("{}{replaced} has the whole copy", target.label),
    }
}

/// The error line of a copy whose package `index` (`label`) failed.
fn failure_line(
    plan: &Plan,
    index: usize,
    label: &str,
    failed: &Failed,
    source: &Side,
    target: &Side,
) -> String {
    let copy = format!("copy of {} to {}", source.label, target.label);
    match failed {
        Failed::NotApplied(e) => format!(
            "{copy} failed in {label}: {e}; {}",
            left_before(plan, index, target)
        ),
        Failed::Unknown(e) => format!(
            "{copy} failed in {label}: {e}; whether the receive got to its end is not known: if not, {}; if so, {}",
            left_before(plan, index, target),
            left_after(plan, index, target)
        ),
        Failed::Applied(e, _) => format!(
            "{copy} failed after {label} arrived whole and was applied: {e}; {}",
            left_after(plan, index, target)
        ),
    }
}

pub fn copy(state_dir: &Path, args: CopyArgs) -> Result<()> {
    let rsh: Vec<String> = match &args.rsh {
        Some(cmd) => cmd.split_whitespace().map(String::from).collect(),
        None => vec!["ssh".into()],
    };
    if rsh.is_empty() {
        return Err(Error::refused(
            ErrorKind::InvalidInput,
            "--rsh is empty: give the command that reaches another node, e.g. \"ssh -p 2222\"",
        ));
    }
    let launch = Launch {
        exe: std::env::current_exe().ctx(|| "cannot find this imgpool binary".into())?,
        state_dir: state_dir.to_path_buf(),
        rsh,
        remote_state_dir: args.remote_state_dir.clone(),
        remote_imgpool: args.remote_imgpool.clone(),
        sockets: RefCell::new(HashMap::new()),
    };
    let source = Side::parse(&args.source, &launch)?;
    let target = Side::parse(&args.target, &launch)?;
    if source.host == target.host && source.volume == target.volume {
        return Err(Error::refused(
            ErrorKind::InvalidInput,
            format!("{} and {} are the same volume", source.label, target.label),
        ));
    }
    let hosts: Vec<&str> = [&source, &target]
        .iter()
        .filter_map(|side| side.host.as_deref())
        .collect();
    let links = Links::open(&hosts, &launch.rsh)?;
    for side in [&source, &target] {
        if side
            .host
            .as_ref()
            .is_some_and(|h| links.sockets.contains_key(h))
        {
            side.reached.set(true);
        }
    }
    launch.sockets.replace(links.sockets.clone());
    let source_snapshots = source.snapshots(true)?.unwrap_or_default();
    let target_snapshots = target.snapshots(false)?;
    if target_snapshots.is_none() {
        // A name `recv` would refuse to make: refused here, before anything runs.
        crate::core::pool::check_user_volume_name(&target.volume).map_err(|e| {
            Error::refused(ErrorKind::InvalidInput, format!("{}: {e}", target.label))
        })?;
    }
    let plan = copy_plan::plan(&source_snapshots, target_snapshots.as_deref(), args.refresh)
        .map_err(|refusal| refused(refusal, &source, &target))?;
    let lines = describe(&plan, &source, &target, args.refresh, args.dry_run);
    let mut summary = json!({
        "source": source.label,
        "target": target.label,
        "kind": match plan.kind {
            Kind::Full => "full",
            Kind::Refresh { .. } => "incremental",
            Kind::Replace => "replace",
        },
        "common": match &plan.kind { Kind::Refresh { common } => Some(common), _ => None },
        "discarded": plan.discard,
        "snapshots": plan.send,
        "dry_run": args.dry_run,
    });
    if !args.json {
        for line in &lines {
            println!("{line}");
        }
    }
    if args.dry_run {
        if args.json {
            super::print_json(&summary);
        } else {
            println!("a dry run: nothing changed");
        }
        return Ok(());
    }

    // A receiver that dies must not kill this process with SIGPIPE (imgpool's default): with
    // the signal blocked in this thread, the one that relays, the write fails with EPIPE and
    // the copy stops in order. Children start with an empty mask (`Command` resets it).
    let mut sigpipe = nix::sys::signal::SigSet::empty();
    sigpipe.add(nix::sys::signal::Signal::SIGPIPE);
    sigpipe
        .thread_block()
        .map_err(|e| Error::io("cannot block SIGPIPE", e.into()))?;
    let progress = Progress::new(!args.json);
    let count = plan.packages.len();
    let mut total = 0u64;
    let mut packages = Vec::new();
    let mut discarded: Vec<String> = Vec::new();
    for (index, package) in plan.packages.iter().enumerate() {
        let what = match &package.to {
            Some(_) => format!("{} snapshot(s)", plan.send.len()),
            None => "the current state".to_string(),
        };
        let label = format!("package {} of {count} ({what})", index + 1);
        if package.force {
            // `recv --force` discards what the target has past the common snapshot when it
            // runs: looked at again just before, so that only what was listed goes (a
            // snapshot taken there in the instant between is `recv`'s to report, and is).
            let now = target.snapshots(true)?;
            if now != target_snapshots {
                return Err(Error::refused(
                    ErrorKind::Conflict,
                    format!(
                        "{} changed since the plan was made (its snapshots are now: {}): nothing was discarded; run the copy again to plan it anew",
                        target.label,
                        now.unwrap_or_default()
                            .iter()
                            .map(|s| s.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        }
        let ran = run_package(&source, &target, package, &progress, label.clone());
        // What an applied package did is told, also when something failed after it.
        let applied = match &ran {
            Ok(crossed) => Some(crossed),
            Err(Failed::Applied(_, crossed)) => Some(&**crossed),
            Err(_) => None,
        };
        if let Some(crossed) = applied {
            total += crossed.bytes;
            // What `recv --force` discarded, as it reports it: the plan's list, unless the
            // target took a snapshot after the plan was made.
            let gone: Vec<String> = crossed.received["discarded"]["snapshots"]
                .as_array()
                .map(|list| {
                    list.iter()
                        .filter_map(|n| n.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            if !args.json {
                let mut lines = vec![format!("{label}: {} crossed", bytes(crossed.bytes))];
                for name in &gone {
                    lines.push(if plan.discard.contains(name) {
                        format!("deleted {}@{name}", target.label)
                    } else {
                        format!(
                            "deleted {}@{name}, which the target took after the plan was made",
                            target.label
                        )
                    });
                }
                for line in lines {
                    match &progress.bar {
                        // On standard output like the rest, the bar on standard error set
                        // aside meanwhile.
                        Some(bar) => bar.suspend(|| println!("{line}")),
                        None => println!("{line}"),
                    }
                }
            }
            discarded.extend(gone);
            packages.push(json!({
                "to": package.to, "from": package.from, "from_all": package.from_all,
                "force": package.force, "bytes": crossed.bytes,
                "sent": crossed.sent, "received": crossed.received,
            }));
        }
        if let Err(failed) = &ran {
            if let Some(bar) = &progress.bar {
                bar.finish_and_clear();
            }
            let (Failed::NotApplied(e) | Failed::Unknown(e) | Failed::Applied(e, _)) = failed;
            return Err(Error::refused(
                e.kind(),
                failure_line(&plan, index, &label, failed, &source, &target),
            ));
        }
    }
    if let Some(bar) = &progress.bar {
        bar.finish_and_clear();
    }
    if args.json {
        // The temporary snapshot is `send`'s, named in its summary of the last package.
        let temporary = packages
            .last()
            .and_then(|p| p["sent"]["temporary_snapshot"].as_str().map(String::from));
        summary["bytes"] = json!(total);
        summary["discarded"] = json!(discarded);
        summary["temporary_snapshot"] = json!(temporary);
        summary["packages"] = Value::Array(packages);
        super::print_json(&summary);
    } else {
        println!(
            "copied {} to {}: {} snapshot(s) and the current state, {} crossed",
            source.label,
            target.label,
            plan.send.len(),
            bytes(total)
        );
    }
    Ok(())
}

fn refused(refusal: Refusal, source: &Side, target: &Side) -> Error {
    let message = match refusal {
        Refusal::TargetExists => format!(
            "{} exists already: give --refresh to bring it up to date from {} (--dry-run shows what that sends and discards)",
            target.label, source.label
        ),
    };
    Error::refused(ErrorKind::Conflict, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_quoted_for_the_remote_shell() {
        assert_eq!(shell_quote("imgpool"), "imgpool");
        assert_eq!(shell_quote("/var/lib/imgpool"), "/var/lib/imgpool");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("$(rm -rf /)"), "'$(rm -rf /)'");
        assert_eq!(shell_quote(""), "''");
    }

    fn launch() -> Launch {
        Launch {
            exe: "/bin/imgpool".into(),
            state_dir: "/s".into(),
            rsh: vec!["ssh".into()],
            remote_state_dir: None,
            remote_imgpool: "imgpool".into(),
            sockets: RefCell::new(HashMap::new()),
        }
    }

    fn snap(name: &str, guid: &str) -> Snapshot {
        Snapshot {
            name: name.into(),
            guid: guid.into(),
        }
    }

    /// A replacing copy says what a cut leaves: the target as it was until its snapshots have
    /// all arrived, replaced after (the swap ends the first package), and it lists the
    /// target's temporary snapshots among what goes.
    #[test]
    fn the_plan_of_a_replacement_says_when_a_cut_leaves_it_replaced() {
        let launch = launch();
        let (source, target) = (
            Side::parse("v", &launch).unwrap(),
            Side::parse("node2:v", &launch).unwrap(),
        );
        let target_has = [snap("mine", "g9"), snap("copy-tmp-x", "g8")];
        let plan = copy_plan::plan(&[snap("a", "g1")], Some(&target_has), true).unwrap();
        let lines = describe(&plan, &source, &target, true, false);
        assert!(
            lines[0]
                .contains("a cut after, while the current state crosses, leaves it replaced, at a"),
            "{lines:?}"
        );
        assert!(
            lines.contains(&"will delete node2:v@copy-tmp-x: the target is replaced (a temporary snapshot of a command there, or of one that died)".to_string()),
            "{lines:?}"
        );
        let plan = copy_plan::plan(&[], Some(&target_has), true).unwrap();
        let lines = describe(&plan, &source, &target, true, false);
        assert!(
            lines[0].ends_with("(a cut leaves it as it is)"),
            "{lines:?}"
        );
    }

    /// The error line of a failed copy tells the target as it is: a package applied before
    /// something else failed left it replaced, never "as it was"; a receive that ended without
    /// saying may have got to its end.
    #[test]
    fn a_failed_copy_says_the_target_was_replaced_once_it_was() {
        let launch = launch();
        let (source, target) = (
            Side::parse("v", &launch).unwrap(),
            Side::parse("node2:w", &launch).unwrap(),
        );
        let plan = copy_plan::plan(&[snap("a", "g1")], Some(&[snap("mine", "g9")]), true).unwrap();
        let error = || Error::refused(ErrorKind::Conflict, "send failed");
        let crossed = || Crossed {
            bytes: 1,
            received: Value::Null,
            sent: Value::Null,
        };
        let line = |index, failed: Failed| {
            failure_line(&plan, index, "package", &failed, &source, &target)
        };
        let applied = line(0, Failed::Applied(error(), Box::new(crossed())));
        assert!(
            applied.contains("node2:w is replaced: it has every snapshot up to a and is at a")
                && !applied.contains("as it was"),
            "{applied}"
        );
        let refused = line(0, Failed::NotApplied(error()));
        assert!(
            refused.ends_with("node2:w is as it was (not replaced)"),
            "{refused}"
        );
        let unknown = line(0, Failed::Unknown(error()));
        assert!(
            unknown.contains("not known")
                && unknown.contains("as it was")
                && unknown.contains("is replaced"),
            "{unknown}"
        );
        let last = line(1, Failed::Applied(error(), Box::new(crossed())));
        assert!(
            last.ends_with("node2:w is replaced: it has the whole copy"),
            "{last}"
        );
        let second = line(1, Failed::NotApplied(error()));
        assert!(
            second.contains("is replaced: it has every snapshot up to a"),
            "{second}"
        );
    }

    #[test]
    fn sides_are_a_volume_or_a_host_and_a_volume() {
        let launch = launch();
        let here = Side::parse("vol", &launch).unwrap();
        assert_eq!((here.host, here.volume.as_str()), (None, "vol"));
        let there = Side::parse("root@node2:vol", &launch).unwrap();
        assert_eq!(there.host.as_deref(), Some("root@node2"));
        assert_eq!(there.volume, "vol");
        for bad in [":vol", "node2:", "vol@snap", "node2:vol@snap", "node2:a/b"] {
            assert!(Side::parse(bad, &launch).is_err(), "{bad}");
        }
    }
}
