//! Running the daemon as a service: systemd readiness (`Type=notify`) against a notify socket
//! the test listens on, the shipped unit checked by `systemd-analyze verify`, and Prometheus
//! metrics scraped under load from the control socket and from `--metrics-address`, checked by
//! `promtool` and against the load.

mod common;

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use common::*;

const MIB: u64 = 1 << 20;
const NOBODY: &str = "65534";

/// Whether a tool the test needs is installed; in CI its absence is a failure (`deps.sh`
/// installs it), elsewhere the test is skipped with the reason.
fn have(tool: &str, test: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{test}: {tool} is not installed, and CI must run it (scripts/deps.sh)");
        }
        eprintln!("SKIPPED {test}: {tool} is not installed");
    }
    found
}

/// A systemd notify socket: a datagram socket the daemon sends `READY=1` and `STATUS=` to.
struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
}

impl NotifySocket {
    fn new(path: PathBuf) -> NotifySocket {
        let socket = UnixDatagram::bind(&path).unwrap();
        NotifySocket { socket, path }
    }

    /// The next message, if one comes within `timeout`.
    fn next(&self, timeout: Duration) -> Option<String> {
        self.socket.set_read_timeout(Some(timeout)).unwrap();
        let mut buf = [0u8; 4096];
        match self.socket.recv(&mut buf) {
            Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(e) => panic!("notify socket: {e}"),
        }
    }
}

/// `imgpool mount --foreground` as systemd starts it: `NOTIFY_SOCKET` set, nobody reading its
/// output. Its log goes to `log`.
fn start_foreground(pool: &TestPool, mountpoint: &Path, notify: &Path, log: &Path) -> ChildGuard {
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let child = pool
        .command(&["mount", mountpoint.to_str().unwrap(), "--foreground"])
        .env("NOTIFY_SOCKET", notify)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    ChildGuard(Some(child))
}

/// Reads all of `path` with O_DIRECT (through the daemon, not the page cache).
fn read_direct(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    let mut out = Vec::new();
    // O_DIRECT wants an aligned buffer: read into a page-aligned mapping.
    let mut buf = memmap2::MmapMut::map_anon(MIB as usize).unwrap();
    loop {
        let n = file.read(&mut buf[..])?;
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&buf[..n]);
    }
}

/// Waits for READY=1 on `notify`; each message before it must not claim readiness. Returns the
/// READY message.
fn wait_ready(notify: &NotifySocket, daemon: &mut ChildGuard, log: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Some(status) = daemon.wait_timeout(Duration::ZERO) {
            panic!(
                "the daemon exited ({status}) before READY: {}",
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        if let Some(message) = notify.next(Duration::from_millis(100)) {
            if message.lines().any(|l| l == "READY=1") {
                return message;
            }
        }
    }
    panic!(
        "no READY=1 within 60 s: {}",
        fs::read_to_string(log).unwrap_or_default()
    );
}

#[test]
fn systemd_ready_comes_only_once_the_mount_and_every_bind_serve_reads() {
    let test = "systemd_ready_comes_only_once_the_mount_and_every_bind_serve_reads";
    if !can_mount(test) {
        return;
    }
    let pool = TestPool::new(3);
    let source = pool.path("source.img");
    random_file(&source, 2 * MIB, 14);
    let expected = fs::read(&source).unwrap();
    let uuid = pool.add_image("golden", &source, 1);
    let mountpoint = pool.path("mnt");
    fs::create_dir(&mountpoint).unwrap();
    let notify = NotifySocket::new(pool.path("notify.sock"));
    let log = pool.path("daemon.log");
    let mut guard = MountGuard {
        state: pool.state.clone(),
        mountpoint: mountpoint.clone(),
        disks: pool.disks.clone(),
        pid: None,
    };

    // Before READY, at least one of the mount and the binds is missing; once it comes, every
    // one of them serves the image's bytes at once.
    let targets = guard.targets();
    let check_served = |when: &str| {
        // The mount table first (quick, so nothing has time to appear meanwhile), then reads.
        for target in &targets {
            assert!(
                is_mount_point(target),
                "{when}: {} is not mounted",
                target.display()
            );
        }
        let through = |path: PathBuf| {
            let read = read_direct(&path)
                .unwrap_or_else(|e| panic!("{when}: reading {} failed: {e}", path.display()));
            assert!(
                read == expected,
                "{when}: {} served wrong bytes",
                path.display()
            );
        };
        through(mountpoint.join("images/golden"));
        for disk in &pool.disks {
            let bound = disk
                .join("backing-images")
                .join(format!("golden-{uuid}/backing"));
            through(bound);
        }
    };
    let mut daemon = start_foreground(&pool, &mountpoint, &notify.path, &log);
    guard.pid = Some(daemon.pid());
    let ready = wait_ready(&notify, &mut daemon, &log);
    check_served("at READY");
    assert!(
        ready
            .lines()
            .any(|l| l.starts_with("STATUS=serving the pool at")
                && l.contains("3 disk view(s) bound")),
        "{ready}"
    );

    // systemd's Restart=on-failure after a crash: the dead mount and binds ("Transport endpoint
    // is not connected") are cleaned up by the next daemon, which is ready only once its own
    // serve reads.
    kill(Pid::from_raw(daemon.pid()), Signal::SIGKILL).unwrap();
    assert!(daemon.wait_timeout(Duration::from_secs(10)).is_some());
    let dead = fs::metadata(mountpoint.join("images"))
        .expect_err("a killed daemon's mount still answered");
    assert_eq!(dead.raw_os_error(), Some(libc::ENOTCONN), "{dead}");
    // Nothing pending from the dead daemon: the next READY is the new daemon's.
    while notify.next(Duration::from_millis(50)).is_some() {}
    let mut daemon = start_foreground(&pool, &mountpoint, &notify.path, &log);
    guard.pid = Some(daemon.pid());
    wait_ready(&notify, &mut daemon, &log);
    check_served("at READY after a crash");

    // systemctl stop with a replica's file open: SIGTERM; STOPPING=1, the binds and the mount
    // leave the mount table at once (detached), the open file keeps reading through the daemon,
    // and the daemon exits successfully once it is closed.
    let bound = pool.disks[1]
        .join("backing-images")
        .join(format!("golden-{uuid}/backing"));
    // Buffered, as most readers are (an O_DIRECT reader ends the session the same way).
    let mut open = fs::File::open(&bound).unwrap();
    kill(Pid::from_raw(daemon.pid()), Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut stopping = None;
    while stopping.is_none() && Instant::now() < deadline {
        stopping = notify
            .next(Duration::from_millis(100))
            .filter(|m| m.lines().any(|l| l == "STOPPING=1"));
    }
    let stopping = stopping.expect("no STOPPING=1 after SIGTERM");
    assert!(stopping.contains("STATUS=stopping"), "{stopping}");
    assert!(
        wait_until(Duration::from_secs(10), || targets
            .iter()
            .all(|t| !is_mount_point(t))),
        "the mount or a bind is still in the mount table after SIGTERM"
    );
    let mut buf = vec![0u8; MIB as usize];
    let n = open.read(&mut buf[..]).unwrap();
    assert!(
        n > 0 && buf[..n] == expected[..n],
        "the open file read wrong bytes"
    );
    assert!(
        daemon.wait_timeout(Duration::from_millis(500)).is_none(),
        "the daemon exited while a file was open"
    );
    drop(open);
    let status = daemon
        .wait_timeout(Duration::from_secs(15))
        .expect("the daemon did not exit after SIGTERM");
    assert!(
        status.success(),
        "{status}: {}",
        fs::read_to_string(&log).unwrap()
    );
    for target in guard.targets() {
        assert!(
            !is_mount_point(&target),
            "{} still mounted",
            target.display()
        );
    }
    guard.pid = None;
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let test = "the_systemd_unit_passes_systemd_analyze_verify";
    if !have("systemd-analyze", test) {
        return;
    }
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/systemd/imgpool.service");
    let text = fs::read_to_string(&unit).unwrap();
    for line in [
        "Type=notify",
        "Restart=on-failure",
        "ExecStart=/usr/local/bin/imgpool mount /var/lib/imgpool/mnt --foreground",
    ] {
        assert!(text.lines().any(|l| l == line), "the unit lacks {line}");
    }
    // verify checks that ExecStart's binary exists: the test's own binary stands in for the
    // installed one.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("imgpool.service");
    fs::write(&copy, text.replace("/usr/local/bin/imgpool", BIN)).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {stderr}");
    // Unknown or unparsable settings are only warnings to verify; none is allowed.
    let own: Vec<&str> = stderr.lines().filter(|l| l.contains("imgpool")).collect();
    assert!(own.is_empty(), "systemd-analyze verify warned: {stderr}");
}

/// One HTTP/1.1 GET over `stream`: status and body.
fn get(mut stream: impl Read + Write, path: &str) -> (u16, String) {
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: imgpool\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

fn scrape_socket(socket: &Path) -> String {
    let (status, body) = get(UnixStream::connect(socket).unwrap(), "/metrics");
    assert_eq!(status, 200, "{body}");
    body
}

/// `name{labels}` -> value, for every sample.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').unwrap();
            (name.to_string(), value.parse().unwrap())
        })
        .collect()
}

fn value(samples: &BTreeMap<String, f64>, name: &str) -> f64 {
    *samples
        .get(name)
        .unwrap_or_else(|| panic!("no sample {name}"))
}

fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out: Output = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn metrics_count_the_load_pass_promtool_and_are_root_only_on_the_socket() {
    let test = "metrics_count_the_load_pass_promtool_and_are_root_only_on_the_socket";
    if !can_mount(test) || !have("promtool", test) {
        return;
    }
    let pool = TestPool::new(3);
    let source = pool.path("source.img");
    random_file(&source, 8 * MIB, 41);
    let uuid = pool.add_image("golden", &source, 2);
    pool.ok(&["ref", "add", "golden", "replica-a"]);
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let mount = pool.mount_with(&["--metrics-address", &address]);
    let status = pool.json(&["status"]);
    let socket = PathBuf::from(status["mounts"][0]["control_socket"].as_str().unwrap());

    let before = samples(&scrape_socket(&socket));
    assert_eq!(value(&before, "imgpool_build_info{version=\"0.1.0\"}"), 1.0);
    for disk in ["d1", "d2"] {
        assert_eq!(
            value(
                &before,
                &format!("imgpool_disk_state{{disk=\"{disk}\",state=\"healthy\"}}")
            ),
            1.0
        );
        assert_eq!(
            value(
                &before,
                &format!("imgpool_disk_state{{disk=\"{disk}\",state=\"failed\"}}")
            ),
            0.0
        );
        assert!(
            value(
                &before,
                &format!("imgpool_disk_capacity_bytes{{disk=\"{disk}\"}}")
            ) > 0.0
        );
        assert!(
            value(
                &before,
                &format!("imgpool_disk_free_bytes{{disk=\"{disk}\"}}")
            ) > 0.0
        );
    }
    assert_eq!(
        value(&before, "imgpool_image_copies_wanted{image=\"golden\"}"),
        2.0
    );
    assert_eq!(
        value(&before, "imgpool_image_copies_healthy{image=\"golden\"}"),
        2.0
    );
    assert_eq!(
        value(
            &before,
            "imgpool_image_state{image=\"golden\",state=\"ready\"}"
        ),
        1.0
    );
    assert_eq!(
        value(&before, "imgpool_image_holders{image=\"golden\"}"),
        1.0
    );
    assert_eq!(
        value(&before, "imgpool_image_size_bytes{image=\"golden\"}"),
        (8 * MIB) as f64
    );
    // A file's SHA-512 is computed as it is imported: none pending.
    assert_eq!(value(&before, "imgpool_images_sha512_pending"), 0.0);
    assert_eq!(value(&before, "imgpool_volumes"), 0.0);

    // The load: O_DIRECT readers through every bound view (each byte through the daemon),
    // scraped all along from both endpoints; fio's random reads beside them when installed.
    let views: Vec<PathBuf> = pool
        .disks
        .iter()
        .map(|d| mount.bound_view(d, "golden", &uuid))
        .collect();
    let fio = Command::new("sh")
        .args(["-c", "command -v fio"])
        .output()
        .is_ok_and(|o| o.status.success());
    let rounds = 4;
    let mut scrapes = Vec::new();
    std::thread::scope(|s| {
        let readers = s.spawn(|| {
            for _ in 0..rounds {
                for view in &views {
                    assert_eq!(read_direct(view).unwrap().len() as u64, 8 * MIB);
                }
            }
        });
        let fio_run = fio.then(|| {
            s.spawn(|| {
                let out = Command::new("fio")
                    .args([
                        "--name=metrics",
                        "--rw=randread",
                        "--bs=4k",
                        "--direct=1",
                        "--ioengine=psync",
                        "--size=8M",
                        "--runtime=2",
                        "--time_based",
                        "--readonly",
                        "--output-format=terse",
                    ])
                    .arg(format!("--filename={}", mount.image("golden").display()))
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "fio: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            })
        });
        while !readers.is_finished() || fio_run.as_ref().is_some_and(|f| !f.is_finished()) {
            scrapes.push(scrape_socket(&socket));
            let (status, body) = get(TcpStream::connect(&address).unwrap(), "/metrics");
            assert_eq!(status, 200);
            scrapes.push(body);
            std::thread::sleep(Duration::from_millis(50));
        }
        readers.join().unwrap();
        if let Some(f) = fio_run {
            f.join().unwrap();
        }
    });
    assert!(!scrapes.is_empty());
    for text in &scrapes {
        promtool_check(text);
    }

    // A name that is not there: one lookup answered ENOENT.
    assert!(fs::metadata(mount.mountpoint.join("images/no-such-image")).is_err());
    let after_text = scrape_socket(&socket);
    promtool_check(&after_text);
    let after = samples(&after_text);
    let delta = |name: &str| value(&after, name) - before.get(name).copied().unwrap_or(0.0);

    let loaded = (rounds as u64 * views.len() as u64 * 8 * MIB) as f64;
    assert!(
        delta("imgpool_read_served_bytes_total") >= loaded,
        "served {} bytes for {loaded} read with O_DIRECT",
        delta("imgpool_read_served_bytes_total")
    );
    let reads = delta("imgpool_fuse_requests_total{op=\"read\"}");
    // The kernel splits an O_DIRECT read into requests of at most 1 MiB.
    assert!(reads >= loaded / MIB as f64, "{reads} read requests");
    assert_eq!(
        value(
            &after,
            "imgpool_fuse_request_duration_seconds_count{op=\"read\"}"
        ),
        value(&after, "imgpool_fuse_requests_total{op=\"read\"}")
    );
    assert_eq!(
        value(
            &after,
            "imgpool_fuse_request_duration_seconds_bucket{op=\"read\",le=\"+Inf\"}"
        ),
        value(&after, "imgpool_fuse_requests_total{op=\"read\"}")
    );
    assert!(
        value(
            &after,
            "imgpool_fuse_request_duration_seconds_sum{op=\"read\"}"
        ) > 0.0
    );
    assert!(delta("imgpool_fuse_requests_total{op=\"open\"}") >= (rounds * views.len()) as f64);
    assert!(delta("imgpool_fuse_request_errors_total{op=\"lookup\",errno=\"ENOENT\"}") >= 1.0);
    // Every chunk looked up at least once; the copy's bytes came from the disks.
    let lookups = delta("imgpool_cache_hits_total") + delta("imgpool_cache_misses_total");
    assert!(
        lookups >= loaded / (64 * 1024) as f64,
        "{lookups} chunk lookups"
    );
    let from_disks: f64 = after
        .iter()
        .filter(|(k, _)| k.starts_with("imgpool_disk_read_bytes_total{"))
        .map(|(_, v)| v)
        .sum();
    assert!(
        from_disks >= (8 * MIB) as f64,
        "{from_disks} bytes read from disks"
    );
    assert_eq!(delta("imgpool_chunk_verify_failures_total"), 0.0);
    assert_eq!(delta("imgpool_failovers_total"), 0.0);
    // Nothing failed: every disk read from has its fault series, at 0; the pool meets its
    // policy: an empty queue.
    let by_disk: Vec<_> = after
        .iter()
        .filter(|(k, _)| k.starts_with("imgpool_disk_failovers_total{"))
        .collect();
    assert!(!by_disk.is_empty(), "no failover series by disk");
    assert!(by_disk.iter().all(|(_, v)| **v == 0.0), "{by_disk:?}");
    for work in ["create", "verify", "remove"] {
        assert_eq!(
            value(&after, &format!("imgpool_repair_queue{{work=\"{work}\"}}")),
            0.0
        );
    }
    // Counters never went down between scrapes of one endpoint.
    let reads_seen: Vec<f64> = scrapes
        .iter()
        .step_by(2)
        .map(|t| value(&samples(t), "imgpool_fuse_requests_total{op=\"read\"}"))
        .collect();
    assert!(
        reads_seen.windows(2).all(|w| w[0] <= w[1]),
        "{reads_seen:?}"
    );

    // The TCP listener serves /metrics only.
    let (status, _) = get(TcpStream::connect(&address).unwrap(), "/v1/stats");
    assert_eq!(status, 404);

    // Only root gets the metrics on the socket: uid 65534 with the rights to reach the socket
    // (CAP_DAC_OVERRIDE) is refused by the daemon itself.
    if have("setpriv", test) && have("python3", test) {
        // The daemon answers a refused peer at once, without reading a byte: the client only
        // reads (a request left unread would turn the daemon's close into a reset). A daemon
        // that served this uid would wait for the request and answer 408 instead.
        let client = "import socket,sys\n\
            s=socket.socket(socket.AF_UNIX)\n\
            s.settimeout(8)\n\
            s.connect(sys.argv[1])\n\
            d=b''\n\
            while True:\n\
            \x20   c=s.recv(65536)\n\
            \x20   if not c: break\n\
            \x20   d+=c\n\
            sys.stdout.write(d.decode())\n";
        let out = Command::new("setpriv")
            .args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups"])
            .args([
                "--inh-caps",
                "+dac_override",
                "--ambient-caps",
                "+dac_override",
            ])
            .args(["python3", "-c", client])
            .arg(&socket)
            .output()
            .unwrap();
        let response = String::from_utf8_lossy(&out.stdout);
        assert!(
            response.starts_with("HTTP/1.1 403"),
            "as uid {NOBODY}: {response}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!response.contains("imgpool_"), "{response}");
    }
    // A third copy wanted: the daemon's repair copies the image's 8 MiB (no holes) and checks
    // the copy, and the metrics say so.
    pool.ok(&["image", "set", "golden", "--copies", "3"]);
    let mut last = String::new();
    let repaired = poll(Duration::from_secs(60), Duration::from_millis(200), || {
        last = scrape_socket(&socket);
        let now = samples(&last);
        now.get("imgpool_image_copies_healthy{image=\"golden\"}") == Some(&3.0)
            && value(&now, "imgpool_repair_read_bytes_total{work=\"copy\"}") >= (8 * MIB) as f64
    });
    assert!(repaired, "no repair seen in the metrics: {last}");
    let now = samples(&last);
    assert!(value(&now, "imgpool_repair_rounds_total") >= 1.0);
    assert_eq!(
        value(
            &now,
            "imgpool_image_state{image=\"golden\",state=\"ready\"}"
        ),
        1.0
    );
    promtool_check(&last);

    mount.unmount();
    // The listener went with the daemon.
    assert!(TcpStream::connect(&address).is_err());
}

/// The daemon's log lines that carry `event="<event>"`.
fn events(log: &Path, event: &str) -> Vec<String> {
    let tag = format!("event=\"{event}\"");
    fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&tag))
        .map(str::to_string)
        .collect()
}

#[test]
fn state_changes_are_one_log_line_each_with_their_fields() {
    let test = "state_changes_are_one_log_line_each_with_their_fields";
    if !can_mount(test) {
        return;
    }
    let pool = TestPool::new(2);
    let source = pool.path("source.img");
    random_file(&source, MIB, 4);
    pool.add_image("golden", &source, 1);
    let mount = pool.mount();
    let log = pool.state.join("mount.log");
    let mounted = events(&log, "mounted");
    assert_eq!(mounted.len(), 1, "{mounted:?}");
    let mnt = format!("mountpoint={:?}", mount.mountpoint);
    assert!(mounted[0].contains(&mnt), "{}", mounted[0]);
    for (i, disk) in ["d1", "d2"].iter().enumerate() {
        let bound = events(&log, "bound");
        let line = bound
            .iter()
            .find(|l| l.contains(&format!("disk=\"{disk}\"")))
            .unwrap_or_else(|| panic!("no bind line for {disk}: {bound:?}"));
        let target = format!("path={:?}", pool.disks[i].join("backing-images"));
        assert!(line.contains(&target), "{line}");
    }
    // Images imported and removed by other commands: one line each, as the daemon sees them.
    // The image in the mount when it started is not an event.
    assert!(events(&log, "image_added").is_empty());
    let uuid = pool.add_image("second", &source, 1);
    pool.ok(&["image", "rm", "second"]);
    let lines = |event: &str| {
        let mut found = Vec::new();
        poll(Duration::from_secs(5), Duration::from_millis(50), || {
            found = events(&log, event);
            !found.is_empty()
        });
        found
    };
    for event in ["image_added", "image_removed"] {
        let found = lines(event);
        assert_eq!(found.len(), 1, "{event}: {found:?}");
        assert!(
            found[0].contains("image=\"second\"") && found[0].contains(&format!("uuid={uuid}")),
            "{}",
            found[0]
        );
    }
    pool.ok(&["volume", "create", "vm1", "--size", "1MiB"]);
    let added = lines("volume_added");
    assert!(
        added.len() == 1 && added[0].contains("volume=\"vm1\""),
        "{added:?}"
    );
    mount.unmount();
    let unmounted = events(&log, "unmounted");
    assert_eq!(unmounted.len(), 1, "{unmounted:?}");
    assert!(unmounted[0].contains(&mnt), "{}", unmounted[0]);
}

/// The longest of O_DIRECT 64 KiB reads of `path` at pseudo-random offsets for `time`, and how
/// many there were.
fn longest_read(path: &Path, size: u64, time: Duration) -> (Duration, u64) {
    use std::os::unix::fs::FileExt;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap();
    let mut buf = memmap2::MmapMut::map_anon(64 * 1024).unwrap();
    let chunks = size / (64 * 1024);
    let (mut longest, mut reads, mut x) = (Duration::ZERO, 0u64, 88172645463325252u64);
    let end = Instant::now() + time;
    while Instant::now() < end {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let started = Instant::now();
        file.read_exact_at(&mut buf[..], (x % chunks) * 64 * 1024)
            .unwrap();
        longest = longest.max(started.elapsed());
        reads += 1;
    }
    (longest, reads)
}

#[test]
fn scrapes_at_100_per_second_while_the_pool_changes_do_not_hold_up_reads() {
    let test = "scrapes_at_100_per_second_while_the_pool_changes_do_not_hold_up_reads";
    if !can_mount(test) {
        return;
    }
    let pool = TestPool::new(2);
    let source = pool.path("source.img");
    random_file(&source, 16 * MIB, 100);
    pool.add_image("golden", &source, 1);
    let small = pool.path("small.img");
    random_file(&small, MIB, 101);
    let mount = pool.mount_with(&["--no-bind"]);
    let status = pool.json(&["status"]);
    let socket = PathBuf::from(status["mounts"][0]["control_socket"].as_str().unwrap());
    let image = mount.image("golden");
    // Warm the cache, then the baseline: reads alone.
    read_direct(&image).unwrap();
    let (baseline, _) = longest_read(&image, 16 * MIB, Duration::from_millis(1500));

    let stop = std::sync::atomic::AtomicBool::new(false);
    let (longest, reads, scrapes, changes) = std::thread::scope(|s| {
        let scraper = s.spawn(|| {
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let started = Instant::now();
                scrape_socket(&socket);
                n += 1;
                std::thread::sleep(Duration::from_millis(10).saturating_sub(started.elapsed()));
            }
            n
        });
        let changer = s.spawn(|| {
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                pool.ok(&["image", "add", "churn", small.to_str().unwrap()]);
                pool.ok(&["image", "rm", "churn"]);
                n += 1;
            }
            n
        });
        let (longest, reads) = longest_read(&image, 16 * MIB, Duration::from_secs(3));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (
            longest,
            reads,
            scraper.join().unwrap(),
            changer.join().unwrap(),
        )
    });
    eprintln!(
        "{test}: longest read {longest:?} over {reads} reads with {scrapes} scrapes and {changes} image add/rm pairs; alone {baseline:?}"
    );
    assert!(scrapes >= 150, "only {scrapes} scrapes in 3 s");
    assert!(changes >= 1, "the pool did not change");
    // A scrape takes no lock a read waits on for longer than a counter read: a read held up
    // by scrapes would wait for whole scrapes, again and again, at 100 a second.
    assert!(
        longest < Duration::from_millis(500).max(baseline * 20),
        "a read took {longest:?} during scrapes (alone: {baseline:?})"
    );
}

/// What a PromQL expression names: metric names, and the label names it matches on or groups
/// by. Strings, ranges (`[5m]`) and Grafana variables inside them are skipped; a name followed
/// by `(` is a function or an aggregation, which must be one PromQL has.
#[derive(Debug, Default)]
struct PromqlNames {
    metrics: Vec<String>,
    /// (metric, label) for each label matcher of a selector.
    matched: Vec<(String, String)>,
    /// Labels of `by (...)` clauses.
    grouped: Vec<String>,
}

fn promql_names(expr: &str) -> PromqlNames {
    const FUNCTIONS: &[&str] = &[
        "rate",
        "irate",
        "increase",
        "sum",
        "max",
        "min",
        "avg",
        "count",
        "histogram_quantile",
        "vector",
        "clamp_min",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let mut names = PromqlNames::default();
    let mut i = 0;
    let ident = |i: &mut usize| {
        let start = *i;
        while *i < chars.len() && (chars[*i].is_ascii_alphanumeric() || "_:".contains(chars[*i])) {
            *i += 1;
        }
        chars[start..*i].iter().collect::<String>()
    };
    let skip_space = |i: &mut usize| {
        while *i < chars.len() && chars[*i] == ' ' {
            *i += 1;
        }
    };
    let mut last_metric = String::new();
    while i < chars.len() {
        let c = chars[i];
        if c == '"' {
            i += 1;
            while chars[i] != '"' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c == '[' {
            while chars[i] != ']' {
                i += 1;
            }
            i += 1;
        } else if c == '{' {
            // Label matchers: `label op "value"`, comma separated.
            i += 1;
            loop {
                skip_space(&mut i);
                if chars[i] == '}' {
                    i += 1;
                    break;
                }
                let label = ident(&mut i);
                assert!(!label.is_empty(), "{expr}: no label name at {i}");
                names.matched.push((last_metric.clone(), label));
                while chars[i] != '"' {
                    i += 1;
                }
                i += 1;
                while chars[i] != '"' {
                    i += if chars[i] == '\\' { 2 } else { 1 };
                }
                i += 1;
                skip_space(&mut i);
                if chars[i] == ',' {
                    i += 1;
                }
            }
        } else if c.is_ascii_digit() || c == '.' {
            while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' {
            let name = ident(&mut i);
            skip_space(&mut i);
            if name == "by" {
                assert_eq!(chars[i], '(', "{expr}: by without a label list");
                let close = i + chars[i..].iter().position(|&c| c == ')').unwrap();
                let list: String = chars[i + 1..close].iter().collect();
                names
                    .grouped
                    .extend(list.split(',').map(|l| l.trim().to_string()));
                i = close + 1;
            } else if i < chars.len()
                && (chars[i] == '('
                    || chars[i..].starts_with(&['b', 'y', ' '])
                    || chars[i..].starts_with(&['b', 'y', '(']))
            {
                // A function call, or an aggregation with its `by` clause next.
                assert!(
                    FUNCTIONS.contains(&name.as_str()),
                    "{expr}: {name}() is not a PromQL function this check knows"
                );
            } else {
                assert!(
                    !["without", "on", "ignoring", "offset"].contains(&name.as_str()),
                    "{expr}: {name} is not handled by this check"
                );
                if !["and", "or", "unless", "bool"].contains(&name.as_str()) {
                    names.metrics.push(name.clone());
                    last_metric = name;
                }
            }
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn promql_names_finds_metrics_labels_and_groupings() {
    let names = promql_names(
        r#"histogram_quantile(0.99, sum by (le, op) (rate(imgpool_x_bucket{instance=~"$i",op="read"}[$__rate_interval]))) / imgpool_y"#,
    );
    assert_eq!(names.metrics, ["imgpool_x_bucket", "imgpool_y"]);
    assert_eq!(
        names.matched,
        [
            ("imgpool_x_bucket".to_string(), "instance".to_string()),
            ("imgpool_x_bucket".to_string(), "op".to_string())
        ]
    );
    assert_eq!(names.grouped, ["le", "op"]);
}

/// Sample names a scrape exports, each with the label names its series carry.
fn exported(text: &str) -> BTreeMap<String, std::collections::BTreeSet<String>> {
    let mut out: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, _) = line.rsplit_once(' ').unwrap();
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        let entry = out.entry(name.to_string()).or_default();
        for pair in labels.trim_end_matches('}').split("\",") {
            if let Some((label, _)) = pair.split_once('=') {
                entry.insert(label.to_string());
            }
        }
    }
    out
}

#[test]
fn the_grafana_dashboard_queries_only_what_a_live_daemon_exports() {
    let test = "the_grafana_dashboard_queries_only_what_a_live_daemon_exports";
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/grafana/imgpool-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();

    // What Grafana's import needs: a schema version, the data source as an input that every
    // panel and query uses, unique panel ids, and panels on its 24-column grid.
    assert!(dashboard["schemaVersion"].as_u64().unwrap() >= 36);
    assert_eq!(dashboard["__inputs"][0]["name"], "DS_PROMETHEUS");
    assert_eq!(dashboard["__inputs"][0]["pluginId"], "prometheus");
    let panels = dashboard["panels"].as_array().unwrap();
    let mut ids = std::collections::BTreeSet::new();
    let mut exprs = Vec::new();
    for panel in panels {
        assert!(ids.insert(panel["id"].as_u64().unwrap()), "{panel}");
        let grid = &panel["gridPos"];
        assert!(
            grid["x"].as_u64().unwrap() + grid["w"].as_u64().unwrap() <= 24,
            "{panel}"
        );
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], "${DS_PROMETHEUS}", "{panel}");
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{panel}");
        for target in targets {
            assert_eq!(target["datasource"]["uid"], "${DS_PROMETHEUS}", "{target}");
            exprs.push(target["expr"].as_str().unwrap().to_string());
        }
    }

    if !can_mount(test) {
        return;
    }
    // A pool where every kind of series exists: disks, an image read through a view, a
    // volume with a snapshot, a repair that copied.
    let pool = TestPool::new(3);
    let source = pool.path("source.img");
    random_file(&source, 4 * MIB, 43);
    let uuid = pool.add_image("golden", &source, 1);
    let mount = pool.mount();
    pool.ok(&["volume", "create", "vm1", "--image", "golden"]);
    pool.ok(&["snapshot", "create", "vm1@first"]);
    pool.ok(&["image", "set", "golden", "--copies", "2"]);
    assert_eq!(
        read_direct(&mount.bound_view(&pool.disks[0], "golden", &uuid))
            .unwrap()
            .len() as u64,
        4 * MIB
    );
    // An error answered (ENOENT), for the errors-by-errno series.
    assert!(fs::metadata(mount.image("no-such-image")).is_err());
    assert!(
        wait_until(Duration::from_secs(60), || {
            pool.json(&["image", "show", "golden"])["healthy_copies"] == 2
        }),
        "the repair did not make the second copy"
    );
    let status = pool.json(&["status"]);
    let socket = PathBuf::from(status["mounts"][0]["control_socket"].as_str().unwrap());
    let scrape = exported(&scrape_socket(&socket));

    for expr in &exprs {
        let names = promql_names(expr);
        assert!(!names.metrics.is_empty(), "{expr} names no metric");
        for metric in &names.metrics {
            assert!(
                scrape.contains_key(metric),
                "{expr}: the daemon exports no {metric}"
            );
        }
        for (metric, label) in &names.matched {
            // `instance` is the label Prometheus adds to every series it scrapes.
            assert!(
                label == "instance" || scrape[metric].contains(label),
                "{expr}: {metric} has no label {label}"
            );
        }
        for label in &names.grouped {
            assert!(
                names.metrics.iter().any(|m| scrape[m].contains(label)),
                "{expr}: groups by {label}, which none of its metrics has"
            );
        }
    }
    mount.unmount();
}

/// The daemon's JSON log lines, from `start` on: each must be one JSON object.
fn json_lines(log: &Path, start: usize) -> Vec<serde_json::Value> {
    fs::read_to_string(log)
        .unwrap()
        .lines()
        .skip(start)
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// Waits (5 s at most) for a JSON log line with `event`, from line `start` on.
fn json_event(log: &Path, start: usize, event: &str) -> serde_json::Value {
    let mut found = None;
    poll(Duration::from_secs(5), Duration::from_millis(50), || {
        found = json_lines(log, start)
            .into_iter()
            .find(|l| l["event"] == event);
        found.is_some()
    });
    found.unwrap_or_else(|| {
        panic!(
            "no {event} line: {}",
            fs::read_to_string(log).unwrap_or_default()
        )
    })
}

fn line_count(log: &Path) -> usize {
    fs::read_to_string(log).unwrap().lines().count()
}

#[test]
fn json_logs_carry_their_fields_and_the_level_changes_at_run_time() {
    let test = "json_logs_carry_their_fields_and_the_level_changes_at_run_time";
    if !can_mount(test) {
        return;
    }
    let pool = TestPool::new(2);
    let source = pool.path("source.img");
    random_file(&source, MIB, 5);
    pool.add_image("golden", &source, 1);
    let mount = pool.mount_with(&["--log-format", "json"]);
    let log = pool.state.join("mount.log");

    // Every line is a JSON object; the state changes carry their fields as JSON values.
    let mounted = json_event(&log, 0, "mounted");
    assert_eq!(mounted["level"], "INFO");
    assert_eq!(mounted["mountpoint"], mount.mountpoint.to_str().unwrap());
    assert!(mounted["mount_id"].is_u64(), "{mounted}");
    let bound: Vec<_> = json_lines(&log, 0)
        .into_iter()
        .filter(|l| l["event"] == "bound")
        .collect();
    assert_eq!(bound.len(), 2, "{bound:?}");
    for (line, disk) in bound.iter().zip(["d1", "d2"]) {
        assert_eq!(line["disk"], disk);
        let path = pool.disks[(disk == "d2") as usize].join("backing-images");
        assert_eq!(line["path"], path.to_str().unwrap());
    }
    let start = line_count(&log);
    let uuid = pool.add_image("second", &source, 1);
    let added = json_event(&log, start, "image_added");
    assert_eq!(
        (&added["image"], &added["uuid"]),
        (&"second".into(), &uuid.as_str().into())
    );
    pool.ok(&["image", "rm", "second"]);
    assert_eq!(json_event(&log, start, "image_removed")["image"], "second");
    // A second copy: the daemon's repair makes it, and says which image went to which disk.
    pool.ok(&["image", "set", "golden", "--copies", "2"]);
    let repaired = json_event(&log, start, "repair_done");
    assert_eq!(
        (&repaired["op"], &repaired["image"]),
        (&"copy".into(), &"golden".into())
    );
    assert!(
        ["d1", "d2"].contains(&repaired["disk"].as_str().unwrap()),
        "{repaired}"
    );

    // Snapshots deleted through the daemon (it has the volume open), and their reclaim.
    pool.ok(&["volume", "create", "vm1", "--size", "1MiB"]);
    assert_eq!(json_event(&log, start, "volume_added")["volume"], "vm1");
    let volume = OpenOptions::new()
        .read(true)
        .write(true)
        .open(mount.mountpoint.join("volumes/vm1"))
        .unwrap();
    for snapshot in ["vm1@a", "vm1@b", "vm1@c"] {
        pool.ok(&["snapshot", "create", snapshot]);
    }
    pool.ok(&["snapshot", "rm", "vm1@a", "vm1@b"]);
    let deleted = json_event(&log, start, "snapshots_deleted");
    assert_eq!(
        (
            &deleted["volume"],
            &deleted["count"],
            &deleted["first"],
            &deleted["last"]
        ),
        (&"vm1".into(), &2.into(), &"a".into(), &"b".into())
    );
    assert_eq!(json_event(&log, start, "reclaim_done")["volume"], "vm1");
    drop(volume);
    // The kernel sends the release of the file after close returns: the daemon lets the volume
    // go a moment later.
    assert!(
        poll(Duration::from_secs(5), Duration::from_millis(50), || pool
            .run(&["volume", "rm", "vm1", "--recursive"])
            .status
            .success()),
        "the daemon kept vm1 open after its last file was closed"
    );
    assert_eq!(json_event(&log, start, "volume_removed")["volume"], "vm1");

    // The level: info at the start, so no debug line yet; debug lines once it is debug.
    assert_eq!(pool.json(&["log-level"])[0]["level"], "info");
    let debug_lines = |start: usize| {
        json_lines(&log, start)
            .into_iter()
            .filter(|l| l["level"] == "DEBUG")
            .count()
    };
    assert_eq!(debug_lines(0), 0);
    let start = line_count(&log);
    assert_eq!(pool.json(&["log-level", "debug"])[0]["level"], "debug");
    let changed = json_event(&log, start, "log_level");
    assert_eq!(
        (&changed["level"], &changed["before"]),
        (&"debug".into(), &"info".into())
    );
    pool.ok(&["status"]); // asks the daemon for its statistics: a debug line of the socket
    assert!(
        poll(
            Duration::from_secs(5),
            Duration::from_millis(50),
            || debug_lines(start) > 0
        ),
        "no debug line after log-level debug"
    );
    // At warn, an image added is no longer an info line.
    pool.ok(&["log-level", "warn"]);
    let start = line_count(&log);
    pool.add_image("third", &source, 1);
    pool.ok(&["status"]);
    std::thread::sleep(Duration::from_millis(500));
    let quiet = json_lines(&log, start);
    assert!(
        quiet
            .iter()
            .all(|l| l["level"] == "WARN" || l["level"] == "ERROR"),
        "{quiet:?}"
    );

    // A bad level: one line, exit 1, no daemon's level changed.
    for bad in ["verbose", "", "imgpool=loud"] {
        let line = pool.fails(&["log-level", bad]);
        assert!(line.contains("not a log level"), "{line}");
    }
    assert_eq!(pool.json(&["log-level"])[0]["level"], "warn");
    // Root only.
    let out = pool
        .command(&["log-level", "debug"])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let line = failed_cleanly("log-level as nobody", &out);
    assert!(line.contains("root"), "{line}");
    assert_eq!(pool.json(&["log-level"])[0]["level"], "warn");
    pool.ok(&["log-level", "info"]);
    mount.unmount();
    assert_eq!(
        json_event(&log, 0, "unmounted")["mount_id"],
        mounted["mount_id"]
    );
}
