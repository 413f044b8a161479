//! An ssh server of the test's own, standing for the link to another node: `sshd` on
//! 127.0.0.1 at a free port, with a host key and a client key generated in a temporary
//! directory, its own configuration (keys only, root allowed by key, no PAM) and its log in a
//! file. Dropping it kills that sshd (by its PID) and reaps it; `cut` kills its connections,
//! as a network cut does, and leaves the processes they ran to notice.

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{poll, process_alive};

pub struct Sshd {
    child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub client_key: PathBuf,
}

/// Where sshd is: on PATH, or in /usr/sbin (a user's PATH may lack it). sshd re-executes
/// itself for each connection, so it must be started by an absolute path.
fn sshd_binary() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join("sshd"))
        .find(|p| p.is_file())
        .expect("sshd is missing: run scripts/deps.sh (package openssh-server)")
}

fn keygen(path: &Path) {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "imgpool-test", "-f"])
        .arg(path)
        .output()
        .expect("ssh-keygen is missing: run scripts/deps.sh (package openssh-client)");
    assert!(
        out.status.success(),
        "ssh-keygen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Sshd {
    pub fn start() -> Sshd {
        match Sshd::start_with(false) {
            Ok(sshd) => sshd,
            // Without PAM, sshd refuses an account whose password is locked ('!' in
            // /etc/shadow, as some images have root's), even for a key; PAM's account check
            // does not look at the password.
            Err(why) if why.contains("account is locked") => {
                Sshd::start_with(true).unwrap_or_else(|why| panic!("{why}"))
            }
            Err(why) => panic!("{why}"),
        }
    }

    fn start_with(use_pam: bool) -> Result<Sshd, String> {
        let dir = tempfile::Builder::new()
            .prefix("imgpool-sshd.")
            .tempdir()
            .unwrap();
        let host_key = dir.path().join("host_key");
        let client_key = dir.path().join("client_key");
        keygen(&host_key);
        keygen(&client_key);
        fs::copy(
            dir.path().join("client_key.pub"),
            dir.path().join("authorized_keys"),
        )
        .unwrap();
        // sshd refuses to start without its privilege separation directory, which the
        // package's service unit would create at boot.
        fs::create_dir_all("/run/sshd").unwrap();
        // A free port: the kernel picks one, which is released just before sshd binds it.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = dir.path().join("sshd_config");
        fs::write(
            &config,
            format!(
                "Port {port}\n\
                 ListenAddress 127.0.0.1\n\
                 HostKey {}\n\
                 AuthorizedKeysFile {}\n\
                 PermitRootLogin prohibit-password\n\
                 PubkeyAuthentication yes\n\
                 PasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\n\
                 StrictModes no\n\
                 UsePAM {}\n\
                 PidFile none\n\
                 LogLevel INFO\n",
                host_key.display(),
                dir.path().join("authorized_keys").display(),
                if use_pam { "yes" } else { "no" },
            ),
        )
        .unwrap();
        let log = fs::File::create(dir.path().join("sshd.log")).unwrap();
        let child = Command::new(sshd_binary())
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut sshd = Sshd {
            child: Some(child),
            port,
            dir,
            client_key,
        };
        let listening = poll(Duration::from_secs(10), Duration::from_millis(20), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok() || !process_alive(sshd.pid())
        });
        assert!(
            listening && process_alive(sshd.pid()),
            "sshd did not start: {}",
            sshd.log()
        );
        // One command through it, so that a failing setup shows here and not in a copy.
        let out = Command::new("ssh")
            .args(sshd.ssh_args())
            .args(["localhost", "true"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        if !out.status.success() {
            let why = format!(
                "ssh through the test's sshd fails: {}; sshd log: {}",
                String::from_utf8_lossy(&out.stderr),
                sshd.log()
            );
            sshd.stop();
            return Err(why);
        }
        Ok(sshd)
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    /// The ssh options that reach this server without asking anything.
    pub fn ssh_args(&self) -> Vec<String> {
        [
            "-p",
            &self.port.to_string(),
            "-i",
            self.client_key.to_str().unwrap(),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// `--rsh` for `imgpool copy`.
    pub fn rsh(&self) -> String {
        format!("ssh {}", self.ssh_args().join(" "))
    }

    /// Kills (SIGKILL) every sshd process serving a connection, that is every sshd below the
    /// listening one: the connections drop as in a network cut, and the commands they ran see
    /// their input end and their output closed. Returns how many were killed.
    pub fn cut(&self) -> usize {
        let mut killed = 0;
        let mut todo = vec![self.pid()];
        while let Some(pid) = todo.pop() {
            for child in children_of(pid) {
                todo.push(child);
                let comm = fs::read_to_string(format!("/proc/{child}/comm")).unwrap_or_default();
                if comm.trim().starts_with("sshd") {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(child),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    killed += 1;
                }
            }
        }
        killed
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        // The connections first (their processes are not the listener's to reap), then it.
        self.cut();
        self.stop();
    }
}

/// The direct children of `pid`, from every thread's `children` list.
pub fn children_of(pid: i32) -> Vec<i32> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect()
}
