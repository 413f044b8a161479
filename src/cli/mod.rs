//! The `imgpool` command line: argument parsing and output. Each command is a thin call into the
//! pool core (or the mount daemon); this module only formats what comes back. What concerns a
//! running daemon (its statistics, its cache, waking it after a change) goes through its control
//! socket (`client`).

mod client;
mod copy;
mod export;
pub mod logs;
mod output;
mod recv;
mod send;

use std::collections::{HashMap, HashSet};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};

use crate::core::fsck;
use crate::core::health::Monitor;
use crate::core::owner::WorkLock;
use crate::core::pool::{CopyInfo, DiskStatus, ImageInfo, Pool, VolumeInfo};
use crate::core::recover;
use crate::core::repair;
use crate::core::settings;
use crate::core::store::CopyState;
use crate::core::volume::requests;
use crate::daemon::control;
use crate::daemon::mount::{self, MountConfig, MAX_READ_AHEAD, MAX_THREADS};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::format::clock::{now, timestamp};
use crate::format::units::{bytes, parse_size};
use crate::fs::cache::MIN_CACHE_SIZE;
use crate::fs::read::{default_cache_size, physical_memory};
use crate::fs::stats::MountStats;
use crate::fs::IoMode;

#[derive(Parser, Debug)]
#[command(
    name = "imgpool",
    version,
    about = "A node-wide pool of read-only backing images, served through one FUSE mount",
    after_help = "Exit status: 0 on success, 1 when the command failed (the message says why), 2 on a usage error."
)]
pub struct Cli {
    /// Where the pool's metadata lives.
    #[arg(
        long,
        env = "IMGPOOL_STATE_DIR",
        default_value = "/var/lib/imgpool",
        global = true
    )]
    pub state_dir: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create an empty pool in the state directory.
    Init {
        #[arg(long)]
        json: bool,
    },
    /// Register and list disks.
    #[command(subcommand)]
    Disk(DiskCommand),
    /// Import, list, show and remove images.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Create, list, grow and remove thin writable volumes over images.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Receive a stream of `imgpool send` from standard input into a volume.
    Recv(recv::RecvArgs),
    /// Take, list and delete snapshots of volumes.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Record which holders (replicas) use an image; held images cannot be removed.
    #[command(subcommand)]
    Ref(RefCommand),
    /// Remove images that are not open and have had no holder for longer than the grace period
    /// (counted from the last holder's release, or from the import).
    Gc {
        /// How long an image must have been unreferenced, e.g. 30s, 10m, 1h, 2d.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        grace: Duration,
        /// Only list what would be removed.
        #[arg(long)]
        dry_run: bool,
        /// Allow gc again after `fsck --repair` rebuilt the store, once every holder has been
        /// registered again with `imgpool ref add`.
        #[arg(long)]
        release_hold: bool,
        #[arg(long)]
        json: bool,
    },
    /// Mount the pool at MOUNTPOINT (needs root).
    Mount(MountArgs),
    /// Unmount the pool at MOUNTPOINT and the per-disk bind mounts (needs root).
    Umount {
        mountpoint: PathBuf,
        /// Detach even while files are open; readers keep their open files until they close them.
        #[arg(long)]
        lazy: bool,
        #[arg(long)]
        json: bool,
    },
    /// The pool's health at a glance.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Restore every image's copies to its policy now: verify returning copies, replace failed
    /// ones, move copies off evicting disks (a running mount daemon does this in the background).
    Repair {
        #[arg(long)]
        json: bool,
    },
    /// Read every copy (of IMAGE, or of all images) and check it against the image's SHA-512
    /// and chunk digests; bad copies are replaced.
    Scrub {
        image: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Check the metadata store against the disks and report every difference.
    Fsck(FsckArgs),
    /// Act on the chunk caches of the running mount daemons.
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Show or change the pool's settings.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print the shell completion script for SHELL (bash, zsh, fish, ...).
    Completions { shell: clap_complete::Shell },
    /// Write the manual pages (imgpool.1 and one per subcommand) into DIR.
    Manpages {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Show or change the log level of the running mount daemons (needs root).
    LogLevel(logs::LogLevelArgs),
    /// Copy a volume with its snapshots to another pool or node, or bring a copy up to date
    /// (--refresh), through `send` and `recv` (over ssh for HOST:VOLUME).
    Copy(copy::CopyArgs),
    /// Write a volume's snapshots to standard output as a stream, for `imgpool recv`: whole,
    /// or only what changed since an older snapshot the receiver has.
    Send(send::SendArgs),
}

#[derive(Args, Debug)]
pub struct FsckArgs {
    /// Fix what can be fixed: remove leftovers, re-verify or replace copies; with no metadata
    /// store, rebuild it from the disks' labels and copy records.
    #[arg(long)]
    pub repair: bool,
    /// A disk directory to rebuild from (repeatable; by default every mounted filesystem whose
    /// root carries an imgpool label is found).
    #[arg(long = "disk", value_name = "PATH")]
    pub disks: Vec<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum CacheCommand {
    /// Empty the chunk cache of every running mount of the pool, or of one (needs root: it goes
    /// through the daemons' control sockets). Counters are not reset.
    Drop {
        /// Only the mount at this path.
        #[arg(long)]
        mountpoint: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// List the settings and their values.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Change a setting: copies, repair-jobs, repair-bandwidth, probe-interval.
    Set {
        key: String,
        value: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum DiskCommand {
    /// Register a disk: a directory, normally the mount point of its own filesystem.
    Add {
        name: String,
        path: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// List the disks with their state, capacity, free space and images held.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Take a disk out of service: its copies stop serving and are re-created on other disks.
    Fail {
        name: String,
        /// Why, for `status` and the log.
        #[arg(long)]
        reason: Option<String>,
        /// Fail it even when it holds an image's last serving copy (that image's reads then
        /// fail until the disk returns).
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
    /// Return a failed or evicting disk to service; its copies are verified before they serve.
    Online {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Move every copy off a disk (it keeps serving meanwhile), so that it can be removed.
    Evict {
        name: String,
        /// Evict it even when an image's last copy on it has no other disk to go to now.
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
    /// Forget a disk; refused while it holds the only good copy of an image.
    Rm {
        name: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Import an image: a raw or qcow2 file (told apart by content; a qcow2 is flattened
    /// through its backing chain), a Longhorn replica directory, or a volume of the pool.
    /// Holes stay holes.
    Add {
        name: String,
        #[arg(required_unless_present_any = ["from_longhorn_replica", "from_volume"])]
        file: Option<PathBuf>,
        /// Build the image from this Longhorn replica directory (volume.meta, volume-head-*.img,
        /// volume-snap-*.img, their .meta files, the backing file), offline.
        #[arg(long, value_name = "DIR", conflicts_with_all = ["file", "from_volume"])]
        from_longhorn_replica: Option<PathBuf>,
        /// With --from-longhorn-replica: the replica as of this snapshot (default: its head).
        #[arg(long, value_name = "SNAP", requires = "from_longhorn_replica")]
        snapshot: Option<String>,
        /// With --from-longhorn-replica: the backing file to use instead of the one
        /// volume.meta records (a replica copied from another node).
        #[arg(long, value_name = "PATH", requires = "from_longhorn_replica")]
        backing_file: Option<PathBuf>,
        /// Make the image of a volume as it is now, or at a snapshot (VOLUME@SNAP): its base
        /// image and what it wrote, merged; holes and zero blocks are not stored. An
        /// interrupted export of a snapshot resumes where it stopped; one of the live volume
        /// starts over (the volume changed meanwhile): export a snapshot to make it resumable.
        #[arg(long, value_name = "VOLUME[@SNAP]", conflicts_with = "file")]
        from_volume: Option<String>,
        /// On how many distinct disks to store the image (default: the pool's `copies`
        /// setting, 1 unless changed with `imgpool config set copies N`).
        #[arg(long)]
        copies: Option<u32>,
        #[arg(long)]
        json: bool,
    },
    /// List the images in the pool.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one image: uuid, size, sha512, copies and their disks, holders, state.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Print an image's SHA-512, computing it first if it is not known yet: an exported
    /// image's is computed after the export returns, by the mount daemon in the background.
    Checksum {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove an image; refused while it has holders or open files.
    Rm {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Change an image's copy policy; the repair adds or removes copies to match.
    Set {
        name: String,
        #[arg(long)]
        copies: u32,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum VolumeCommand {
    /// Create a thin volume: blocks it never wrote read from IMAGE (or as zeros).
    Create {
        name: String,
        /// The base image (the volume is one of its holders).
        #[arg(long)]
        image: Option<String>,
        /// Size in bytes or with a unit (10GiB); a multiple of 4096, at least the image's size
        /// (the default).
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// The disk to keep it on (default: the healthy disk with the most free space).
        #[arg(long)]
        disk: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// List the volumes.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one volume: uuid, size, base image, disk, state, bytes written, snapshots.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Grow a volume to SIZE (a volume never shrinks).
    Resize {
        name: String,
        #[arg(value_parser = parse_size)]
        size: u64,
        #[arg(long)]
        json: bool,
    },
    /// Make the volume's content a snapshot's again (refused while the volume is open).
    Rollback {
        /// VOLUME@SNAP
        target: String,
        /// Delete the snapshots newer than SNAP with the rollback.
        #[arg(long)]
        destroy_newer: bool,
        #[arg(long)]
        json: bool,
    },
    /// Remove a volume and its data; with snapshots only with --recursive.
    Rm {
        name: String,
        /// Remove its snapshots with it.
        #[arg(long)]
        recursive: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Snapshot VOLUME as SNAP: every write that returned before, none that starts after.
    Create {
        /// VOLUME@SNAP
        target: String,
        #[arg(long)]
        json: bool,
    },
    /// List a volume's snapshots, oldest first.
    List {
        volume: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete snapshots of one volume in one step: VOLUME@SNAP..., a range VOLUME@FIRST%LAST,
    /// or VOLUME with --older-than or --keep-last; their space is reclaimed afterwards.
    Rm {
        targets: Vec<String>,
        /// With VOLUME: the snapshots older than this, e.g. 7d, 12h.
        #[arg(long, value_parser = humantime::parse_duration)]
        older_than: Option<Duration>,
        /// With VOLUME: all but the newest N.
        #[arg(long)]
        keep_last: Option<usize>,
        /// Read VOLUME@SNAP lines from FILE (- for standard input).
        #[arg(long)]
        from_file: Option<PathBuf>,
        /// List what would be deleted, and delete nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum RefCommand {
    /// Record that HOLDER uses IMAGE.
    Add {
        image: String,
        holder: String,
        #[arg(long)]
        json: bool,
    },
    /// Drop HOLDER's reference to IMAGE.
    Rm {
        image: String,
        holder: String,
        #[arg(long)]
        json: bool,
    },
    /// List holders, of all images or of one.
    List {
        image: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
pub struct MountArgs {
    pub mountpoint: PathBuf,
    /// Stay in the foreground instead of returning once the mount is ready.
    #[arg(long)]
    pub foreground: bool,
    /// Do not bind-mount each disk's view at <disk path>/backing-images.
    #[arg(long)]
    pub no_bind: bool,
    /// Threads serving FUSE requests (1 to 256).
    #[arg(long, default_value_t = 4, value_parser = parse_threads)]
    pub threads: usize,
    /// Where the background daemon writes its log (default: <state dir>/mount.log).
    #[arg(long)]
    pub log_file: Option<PathBuf>,
    /// Memory for the chunk cache, e.g. 512MiB or 2G (binary units; at least 4 MiB, at most the
    /// machine's memory). Default: an eighth of the machine's memory, between 256 MiB and 4 GiB.
    #[arg(long, value_parser = parse_cache_size)]
    pub cache_size: Option<u64>,
    /// cached: reads go through the daemon's cache; passthrough: the kernel reads the copy
    /// files itself (Linux >= 6.9; falls back to cached when the kernel refuses).
    #[arg(long, value_enum, default_value = "cached")]
    pub io_mode: IoModeArg,
    /// The kernel's readahead window on the mount, e.g. 8MiB (0 to 256 MiB). 8 MiB keeps eight
    /// 1 MiB requests of a sequential reader in flight, served by the FUSE threads side by side.
    #[arg(long, default_value = "8MiB", value_parser = parse_read_ahead)]
    pub read_ahead: u64,
    /// Also serve Prometheus metrics over plain HTTP at ADDR (e.g. 127.0.0.1:9412), at
    /// `GET /metrics` only. Off by default: the control socket serves them to root.
    #[arg(long, value_name = "ADDR")]
    pub metrics_address: Option<std::net::SocketAddr>,
    /// How the daemon writes its log: auto is journald under systemd, text elsewhere.
    #[arg(long, value_enum, default_value_t)]
    pub log_format: logs::LogFormatArg,
    #[arg(long)]
    pub json: bool,
}

/// `--io-mode`: the command line's name for each `IoMode`.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum IoModeArg {
    Cached,
    Passthrough,
}

impl From<IoModeArg> for IoMode {
    fn from(arg: IoModeArg) -> IoMode {
        match arg {
            IoModeArg::Cached => IoMode::Cached,
            IoModeArg::Passthrough => IoMode::Passthrough,
        }
    }
}

fn parse_cache_size(text: &str) -> std::result::Result<u64, String> {
    let size = parse_size(text)?;
    let memory = physical_memory();
    if size < MIN_CACHE_SIZE {
        return Err(format!(
            "{text} is below the smallest cache, {}",
            bytes(MIN_CACHE_SIZE)
        ));
    }
    if size > memory {
        return Err(format!(
            "{text} is more than this machine's memory: give from {} to {}",
            bytes(MIN_CACHE_SIZE),
            bytes(memory)
        ));
    }
    Ok(size)
}

fn parse_threads(text: &str) -> std::result::Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_THREADS).contains(&n) => Ok(n),
        _ => Err(format!(
            "{text} is not a number of threads from 1 to {MAX_THREADS}"
        )),
    }
}

fn parse_read_ahead(text: &str) -> std::result::Result<u64, String> {
    let size = parse_size(text)?;
    if size > MAX_READ_AHEAD {
        return Err(format!(
            "{text} is more than the largest readahead window: give from 0 to {}",
            bytes(MAX_READ_AHEAD)
        ));
    }
    Ok(size)
}

impl Command {
    /// Whether the command changes the pool, so that running daemons are woken after it.
    fn changes_pool(&self) -> bool {
        match self {
            Command::Disk(cmd) => !matches!(cmd, DiskCommand::List { .. }),
            Command::Image(cmd) => matches!(
                cmd,
                ImageCommand::Add { .. } | ImageCommand::Rm { .. } | ImageCommand::Set { .. }
            ),
            Command::Volume(cmd) => {
                !matches!(cmd, VolumeCommand::List { .. } | VolumeCommand::Show { .. })
            }
            Command::Snapshot(cmd) => matches!(
                cmd,
                SnapshotCommand::Create { .. } | SnapshotCommand::Rm { dry_run: false, .. }
            ),
            Command::Ref(cmd) => !matches!(cmd, RefCommand::List { .. }),
            Command::Recv(args) => !args.resume_token,
            Command::Gc { dry_run, .. } => !dry_run,
            Command::Repair { .. } | Command::Scrub { .. } => true,
            Command::Fsck(args) => args.repair,
            Command::Config(cmd) => matches!(cmd, ConfigCommand::Set { .. }),
            Command::Copy(args) => !args.dry_run,
            Command::Init { .. }
            | Command::Mount(_)
            | Command::Umount { .. }
            | Command::Status { .. }
            | Command::Cache(_)
            | Command::Completions { .. }
            | Command::Manpages { .. }
            | Command::LogLevel(_) => false,
            Command::Send(args) => args.of_live_volume(),
        }
    }
}

pub fn run(cli: Cli) -> Result<()> {
    let state_dir = cli.state_dir.as_path();
    let changes_pool = cli.command.changes_pool();
    let result = dispatch(state_dir, cli.command);
    // Also after a failure: a repair that could not restore everything may have done a part.
    if changes_pool {
        client::wake_all(state_dir);
    }
    result
}

fn dispatch(state_dir: &Path, command: Command) -> Result<()> {
    match command {
        Command::Init { json } => {
            let pool = Pool::init(state_dir)?;
            output::result(
                json,
                json!({ "uuid": pool.uuid(), "state_dir": pool.state_dir() }),
                format!(
                    "created pool {} in {}",
                    pool.uuid(),
                    pool.state_dir().display()
                ),
            );
            Ok(())
        }
        Command::Disk(cmd) => disk(state_dir, cmd),
        Command::Image(cmd) => image(state_dir, cmd),
        Command::Volume(cmd) => volume(state_dir, cmd),
        Command::Recv(args) => recv::run(state_dir, args),
        Command::Snapshot(cmd) => snapshot(state_dir, cmd),
        Command::Ref(cmd) => reference(state_dir, cmd),
        Command::Gc {
            grace,
            dry_run,
            release_hold,
            json,
        } => {
            let pool = if dry_run {
                Pool::open(state_dir)?
            } else {
                open_to_change(state_dir)?
            };
            let release = release_hold && pool.gc_hold()?.is_some();
            let removed = if release && dry_run {
                // A dry run changes nothing: the hold stays, and what gc would remove once it
                // is released is listed.
                pool.collectable(grace)?
            } else {
                if release {
                    pool.release_gc_hold()?;
                }
                pool.gc(grace, dry_run)?
            };
            if json {
                print_json(&json!({
                    "removed": removed, "dry_run": dry_run, "released_hold": release,
                }));
                return Ok(());
            }
            match (release, dry_run) {
                (true, true) => println!("would allow gc again (a dry run: gc stays held)"),
                (true, false) => println!("gc is allowed again"),
                (false, _) if release_hold => println!("gc is not held"),
                (false, _) => {}
            }
            if removed.is_empty() {
                println!("nothing to collect");
            } else {
                let verb = if dry_run { "would remove" } else { "removed" };
                for name in removed {
                    println!("{verb} {name}");
                }
            }
            Ok(())
        }
        Command::Mount(args) => {
            require_root("imgpool mount")?;
            let started = mount::mount(
                state_dir,
                &MountConfig {
                    mountpoint: args.mountpoint,
                    bind: !args.no_bind,
                    threads: args.threads,
                    log_file: args.log_file,
                    cache_size: args.cache_size.unwrap_or_else(default_cache_size),
                    io_mode: args.io_mode.into(),
                    read_ahead: args.read_ahead,
                    metrics_address: args.metrics_address,
                    log_format: args.log_format.into(),
                },
                args.foreground,
            )?;
            if let Some(daemon) = started {
                output::result(
                    args.json,
                    json!({ "mountpoint": daemon.mountpoint, "pid": daemon.pid, "log": daemon.log }),
                    format!(
                        "mounted the pool at {} (daemon pid {}, log {})",
                        daemon.mountpoint.display(),
                        daemon.pid,
                        daemon.log.display()
                    ),
                );
            }
            Ok(())
        }
        Command::Umount {
            mountpoint,
            lazy,
            json,
        } => {
            require_root("imgpool umount")?;
            let unmounted = mount::umount(state_dir, &mountpoint, lazy)?;
            output::result(
                json,
                json!({ "unmounted": unmounted }),
                format!("unmounted {}", unmounted.display()),
            );
            Ok(())
        }
        Command::Status { json } => status(state_dir, json),
        Command::Repair { json } => repair_cmd(state_dir, json),
        Command::Scrub { image, json } => scrub_cmd(state_dir, image.as_deref(), json),
        Command::Fsck(args) => fsck_cmd(state_dir, args),
        Command::Cache(cmd) => cache_cmd(state_dir, cmd),
        Command::Completions { shell } => {
            let mut cli = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cli, "imgpool", &mut std::io::stdout());
            Ok(())
        }
        Command::Manpages { dir, json } => {
            let written = write_manpages(&dir)?;
            output::result(
                json,
                json!({ "dir": dir, "pages": written }),
                format!("wrote {written} manual pages in {}", dir.display()),
            );
            Ok(())
        }
        Command::Config(cmd) => config_cmd(state_dir, cmd),
        Command::LogLevel(args) => logs::log_level(state_dir, args),
        Command::Copy(args) => copy::copy(state_dir, args),
        Command::Send(args) => send::run(state_dir, args),
    }
}

/// Opens the pool for a command that changes it, after cleaning up whatever dead processes
/// left (`recover`). Listings open it with `Pool::open` alone: they only read.
fn open_to_change(state_dir: &Path) -> Result<Pool> {
    let pool = Pool::open(state_dir)?;
    recover::recover(&pool)?;
    Ok(pool)
}

/// The open files of each volume that a mount daemon holds, as its daemon counts them (a loop
/// device or a VM holding the file counts as one). Best effort: a daemon that does not answer
/// leaves its volumes out.
fn volume_open_files(
    state_dir: &Path,
    pool: &Pool,
    volumes: &[VolumeInfo],
) -> HashMap<String, usize> {
    let pids: HashSet<u32> = volumes.iter().filter_map(|v| v.open_by).collect();
    if pids.is_empty() {
        return HashMap::new();
    }
    let Ok(mounts) = pool.live_mounts() else {
        return HashMap::new();
    };
    mounts
        .iter()
        .filter(|m| pids.contains(&m.pid))
        .filter_map(|m| client::stats(state_dir, m.id).ok())
        .flat_map(|stats| stats.volume_open_files)
        .collect()
}

/// What is wrong with a volume, and what to do, if anything is.
fn volume_problem(v: &VolumeInfo) -> Option<String> {
    (v.state() == "failed").then(|| format!(
        "its disk '{}' is out of service, so its reads and writes return EIO; it has one copy, on that disk: bring the disk back (`imgpool disk list` says why it is out)",
        v.disk
    ))
}

fn volume_json(v: &VolumeInfo, open_files: usize) -> Value {
    json!({
        "name": v.volume.name,
        "uuid": v.volume.uuid,
        "size": v.volume.size,
        "image": v.image,
        "disk": v.disk,
        "state": v.state(),
        "problem": volume_problem(v),
        "allocated_bytes": v.allocated,
        "snapshots": v.snapshots,
        "reclaim_pending_bytes": v.reclaim_bytes,
        "open_by_pid": v.open_by,
        "open_files": open_files,
        "created": timestamp(v.volume.created),
    })
}

fn print_volume(v: &VolumeInfo, open_files: usize) {
    println!("name:      {}", v.volume.name);
    println!("uuid:      {}", v.volume.uuid);
    println!("size:      {} ({})", v.volume.size, bytes(v.volume.size));
    println!("image:     {}", v.image.as_deref().unwrap_or("-"));
    println!("disk:      {}", v.disk);
    println!("state:     {}", v.state());
    if let Some(problem) = volume_problem(v) {
        println!("problem:   {problem}");
    }
    println!("allocated: {}", bytes(v.allocated));
    println!("snapshots: {}", v.snapshots);
    if let Some(pending) = v.reclaim_bytes.filter(|&b| b > 0) {
        println!(
            "reclaim:   {} of deleted snapshots still to give back",
            bytes(pending)
        );
    }
    match v.open_by {
        Some(pid) => {
            println!("open:      {open_files} file(s), through the mount daemon (pid {pid})")
        }
        None => println!("open:      no"),
    }
    println!("created:   {}", timestamp(v.volume.created));
}

/// Writes `imgpool.1` and a page per subcommand, nested ones included
/// (`imgpool-volume-create.1`), into `dir`; returns how many.
fn write_manpages(dir: &Path) -> Result<usize> {
    fn write(dir: &Path, command: &clap::Command, name: &str) -> Result<usize> {
        let mut page = Vec::new();
        let command = command.clone().name(name.to_string());
        clap_mangen::Man::new(command.clone())
            .render(&mut page)
            .ctx(|| format!("cannot render the manual page of {name}"))?;
        let path = dir.join(format!("{name}.1"));
        std::fs::write(&path, page).ctx(|| format!("cannot write {}", path.display()))?;
        let mut count = 1;
        for sub in command.get_subcommands().filter(|s| s.get_name() != "help") {
            count += write(dir, sub, &format!("{name}-{}", sub.get_name()))?;
        }
        Ok(count)
    }
    std::fs::create_dir_all(dir).ctx(|| format!("cannot create {}", dir.display()))?;
    let mut cli = <Cli as clap::CommandFactory>::command();
    cli.build();
    write(dir, &cli, "imgpool")
}

/// `VOLUME@SNAP`, split at its last `@` (a snapshot name has none).
fn volume_and_snapshot(target: &str) -> Result<(&str, &str)> {
    match target.rsplit_once('@') {
        Some((volume, snap)) if !volume.is_empty() && !snap.is_empty() => Ok((volume, snap)),
        _ => Err(Error::refused(
            ErrorKind::InvalidInput,
            format!("'{target}' is not VOLUME@SNAPSHOT"),
        )),
    }
}

/// The store's row follows the size the volume's index has after a request.
fn record_size(pool: &Pool, volume: &str, outcome: requests::Outcome) -> Result<requests::Outcome> {
    pool.record_volume_size(volume, outcome.size)?;
    Ok(outcome)
}

/// A volume request, where it can be done: here when no mount has the volume open, else by
/// the daemon that has it (asked again here if it closed it meanwhile).
pub(super) fn snapshot_request(
    pool: &Pool,
    state_dir: &Path,
    volume: &str,
    request: &requests::Request,
) -> Result<requests::Outcome> {
    // Another command holding the volume (a snapshot, a reclaim) is waited for; its work is
    // one transaction and a reclaim, seconds at most.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        let pid = match pool.snapshot_request(volume, request)? {
            Ok(outcome) => return record_size(pool, volume, outcome),
            Err(pid) => pid,
        };
        let mount = pool.live_mounts()?.into_iter().find(|m| m.pid == pid);
        if let Some(mount) = mount {
            match client::volume_request(state_dir, mount.id, volume, request) {
                Ok(Some(done)) => return record_size(pool, volume, done?),
                // It closed the volume meanwhile: here, then.
                Ok(None) | Err(client::CallError::NotRunning) => {}
                Err(e) => {
                    return Err(Error::refused(
                        ErrorKind::Busy,
                        format!("volume '{volume}' is open through the mount at {}, whose daemon did not take the request: {e}", mount.mountpoint.display()),
                    ))
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(Error::refused(
        ErrorKind::Busy,
        format!("volume '{volume}' stayed held for a minute by another process that is not a mount of this pool: retry when it is done"),
    ))
}

fn snapshot_json(s: &requests::SnapshotInfo) -> Value {
    json!({
        "name": s.name,
        "guid": s.guid,
        "created": timestamp(s.created),
        "created_unix": s.created,
        "size": s.size,
        "unique_bytes": s.unique_bytes,
    })
}

fn snapshot(state_dir: &Path, cmd: SnapshotCommand) -> Result<()> {
    let pool = match cmd {
        SnapshotCommand::List { .. } | SnapshotCommand::Rm { dry_run: true, .. } => {
            Pool::open(state_dir)?
        }
        _ => open_to_change(state_dir)?,
    };
    match cmd {
        SnapshotCommand::Create { target, json } => {
            let (volume, snap) = volume_and_snapshot(&target)?;
            crate::core::pool::check_user_snapshot_name(snap)?;
            let request = requests::Request::Create {
                name: snap.to_string(),
                guid: uuid::Uuid::new_v4().to_string(),
                created: now(),
            };
            let outcome = snapshot_request(&pool, state_dir, volume, &request)?;
            if json {
                print_json(&snapshot_json(&outcome.snapshots[0]));
            } else {
                println!("snapshot '{volume}@{snap}' taken");
            }
        }
        SnapshotCommand::List { volume, json } => {
            let outcome = snapshot_request(&pool, state_dir, &volume, &requests::Request::List)?;
            if json {
                print_json(&Value::Array(
                    outcome.snapshots.iter().map(snapshot_json).collect(),
                ));
            } else {
                let rows = outcome
                    .snapshots
                    .iter()
                    .map(|s| {
                        vec![
                            s.name.clone(),
                            timestamp(s.created),
                            bytes(s.size),
                            bytes(s.unique_bytes.unwrap_or(0)),
                        ]
                    })
                    .collect();
                table(&["NAME", "CREATED", "SIZE", "UNIQUE"], rows);
            }
        }
        SnapshotCommand::Rm {
            targets,
            older_than,
            keep_last,
            from_file,
            dry_run,
            json,
        } => {
            let (volume, selection) =
                snapshot_selection(targets, older_than, keep_last, from_file.as_deref())?;
            let request = requests::Request::Delete { selection, dry_run };
            // Done here, the deletion reclaims the space before it returns.
            let working = (!dry_run).then(|| {
                output::spinner(format!(
                    "deleting snapshots of '{volume}' and reclaiming their space"
                ))
            });
            let outcome = snapshot_request(&pool, state_dir, &volume, &request)?;
            output::done(working.flatten());
            let names: Vec<&str> = outcome.snapshots.iter().map(|s| s.name.as_str()).collect();
            if json {
                print_json(&json!({ "volume": volume, "dry_run": dry_run, "deleted": names }));
            } else if dry_run {
                println!(
                    "would delete {} snapshot(s) of '{volume}': {}",
                    names.len(),
                    names.join(", ")
                );
            } else {
                println!("deleted {} snapshot(s) of '{volume}'", names.len());
            }
        }
    }
    Ok(())
}

/// The volume and snapshots `snapshot rm` names: all of one volume.
fn snapshot_selection(
    mut targets: Vec<String>,
    older_than: Option<Duration>,
    keep_last: Option<usize>,
    from_file: Option<&Path>,
) -> Result<(String, requests::Selection)> {
    let bad = |message: String| Error::refused(ErrorKind::InvalidInput, message);
    if let Some(file) = from_file {
        let text = if file == Path::new("-") {
            std::io::read_to_string(std::io::stdin()).ctx(|| "cannot read standard input".into())?
        } else {
            std::fs::read_to_string(file).ctx(|| format!("cannot read {}", file.display()))?
        };
        targets.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from),
        );
    }
    let policy = match (older_than, keep_last) {
        (Some(age), None) => Some(requests::Selection::OlderThan(now() - age.as_secs() as i64)),
        (None, Some(n)) => Some(requests::Selection::KeepLast(n)),
        (None, None) => None,
        (Some(_), Some(_)) => return Err(bad("give --older-than or --keep-last, not both".into())),
    };
    if let Some(policy) = policy {
        return match targets.as_slice() {
            [volume] if !volume.contains('@') => Ok((volume.clone(), policy)),
            _ => Err(bad(
                "--older-than and --keep-last take one VOLUME, without @SNAPSHOT".into(),
            )),
        };
    }
    let mut volume: Option<String> = None;
    let mut names = Vec::new();
    for target in &targets {
        let (v, snap) = volume_and_snapshot(target)?;
        if volume.as_deref().is_some_and(|seen| seen != v) {
            return Err(bad(format!(
                "one command deletes snapshots of one volume; '{target}' is of another"
            )));
        }
        volume = Some(v.to_string());
        if let Some((first, last)) = snap.split_once('%') {
            if targets.len() > 1 {
                return Err(bad("a range VOLUME@FIRST%LAST goes alone".into()));
            }
            let range = requests::Selection::Range {
                first: first.to_string(),
                last: last.to_string(),
            };
            return Ok((v.to_string(), range));
        }
        names.push(snap.to_string());
    }
    match volume {
        Some(volume) => Ok((volume, requests::Selection::Names(names))),
        None => Err(bad("name the snapshots: VOLUME@SNAP, VOLUME@FIRST%LAST, or VOLUME with --older-than or --keep-last".into())),
    }
}

fn volume(state_dir: &Path, cmd: VolumeCommand) -> Result<()> {
    let pool = match cmd {
        VolumeCommand::List { .. } | VolumeCommand::Show { .. } => Pool::open(state_dir)?,
        _ => open_to_change(state_dir)?,
    };
    match cmd {
        VolumeCommand::Create {
            name,
            image,
            size,
            disk,
            json,
        } => {
            let created = pool.create_volume(&name, image.as_deref(), size, disk.as_deref())?;
            if json {
                print_json(&volume_json(&created, 0));
            } else {
                print_volume(&created, 0);
            }
        }
        VolumeCommand::List { json } => {
            let volumes = pool.volumes()?;
            let open_files = volume_open_files(state_dir, &pool, &volumes);
            let open_files_of =
                |v: &VolumeInfo| open_files.get(&v.volume.name).copied().unwrap_or(0);
            if json {
                print_json(&Value::Array(
                    volumes
                        .iter()
                        .map(|v| volume_json(v, open_files_of(v)))
                        .collect(),
                ));
            } else {
                let rows = volumes
                    .iter()
                    .map(|v| {
                        vec![
                            v.volume.name.clone(),
                            bytes(v.volume.size),
                            v.image.clone().unwrap_or_else(|| "-".into()),
                            v.disk.clone(),
                            bytes(v.allocated),
                            v.snapshots.to_string(),
                            open_files_of(v).to_string(),
                            v.state().to_string(),
                        ]
                    })
                    .collect();
                table(
                    &[
                        "NAME",
                        "SIZE",
                        "IMAGE",
                        "DISK",
                        "ALLOCATED",
                        "SNAPSHOTS",
                        "OPEN",
                        "STATE",
                    ],
                    rows,
                );
            }
        }
        VolumeCommand::Show { name, json } => {
            let info = pool.volume_with_reclaim(&name)?;
            let open_files = volume_open_files(state_dir, &pool, std::slice::from_ref(&info))
                .get(&name)
                .copied()
                .unwrap_or(0);
            if json {
                print_json(&volume_json(&info, open_files));
            } else {
                print_volume(&info, open_files);
            }
        }
        VolumeCommand::Resize { name, size, json } => {
            pool.check_volume_size(size)?;
            let outcome =
                snapshot_request(&pool, state_dir, &name, &requests::Request::Resize { size })?;
            output::result(
                json,
                json!({ "volume": name, "size": outcome.size }),
                format!(
                    "volume '{name}' is now {} ({})",
                    outcome.size,
                    bytes(outcome.size)
                ),
            );
        }
        VolumeCommand::Rollback {
            target,
            destroy_newer,
            json,
        } => {
            let (volume, snap) = volume_and_snapshot(&target)?;
            let request = requests::Request::Rollback {
                name: snap.to_string(),
                destroy_newer,
            };
            let outcome = snapshot_request(&pool, state_dir, volume, &request)?;
            let deleted: Vec<&str> = outcome.snapshots.iter().map(|s| s.name.as_str()).collect();
            output::result(
                json,
                json!({ "volume": volume, "snapshot": snap, "deleted": deleted }),
                std::iter::once(format!("volume '{volume}' is at snapshot '{snap}' again"))
                    .chain(
                        deleted
                            .iter()
                            .map(|s| format!("deleted the newer snapshot '{s}'")),
                    )
                    .collect::<Vec<_>>()
                    .join("\n"),
            );
        }
        VolumeCommand::Rm {
            name,
            recursive,
            json,
        } => {
            let working = output::spinner(format!("removing volume '{name}'"));
            pool.remove_volume(&name, recursive)?;
            output::done(working);
            output::result(
                json,
                json!({ "removed": name }),
                format!("removed volume '{name}'"),
            );
        }
    }
    Ok(())
}

fn disk(state_dir: &Path, cmd: DiskCommand) -> Result<()> {
    let pool = match cmd {
        DiskCommand::List { .. } => Pool::open(state_dir)?,
        _ => open_to_change(state_dir)?,
    };
    match cmd {
        DiskCommand::Add { name, path, json } => {
            let disk = pool.add_disk(&name, &path)?;
            output::result(
                json,
                json!({ "name": disk.name, "path": disk.path, "uuid": disk.uuid }),
                format!("added disk {} at {}", disk.name, disk.path.display()),
            );
        }
        DiskCommand::List { json } => {
            let disks = pool.disk_status()?;
            if json {
                print_json(&Value::Array(disks.iter().map(disk_json).collect()));
            } else {
                let rows = disks
                    .iter()
                    .map(|d| {
                        let r = d.resources.as_ref();
                        vec![
                            d.disk.name.clone(),
                            d.disk.path.display().to_string(),
                            d.state().to_string(),
                            r.map_or("-".into(), |r| bytes(r.capacity)),
                            r.map_or("-".into(), |r| bytes(r.free)),
                            r.map_or("-".into(), |r| r.fs_type.clone()),
                            d.images.to_string(),
                        ]
                    })
                    .collect();
                table(
                    &["NAME", "PATH", "STATE", "CAPACITY", "FREE", "FS", "IMAGES"],
                    rows,
                );
                for d in &disks {
                    for note in d.problem().into_iter().chain(d.full_note()) {
                        println!("disk {}: {note}", d.disk.name);
                    }
                }
            }
        }
        DiskCommand::Fail {
            name,
            reason,
            force,
            json,
        } => {
            let disk = pool.fail_disk(&name, reason.as_deref(), force)?;
            output::result(
                json,
                json!({ "disk": name, "state": "failed", "reason": disk.reason }),
                format!("disk {name} is failed: its copies no longer serve and are re-created on other disks by the mount daemon, or now with `imgpool repair`"),
            );
        }
        DiskCommand::Online { name, json } => {
            let unverified = pool.online_disk(&name)?;
            output::result(
                json,
                json!({ "disk": name, "state": "healthy", "copies_to_verify": unverified }),
                format!("disk {name} is back in service; {unverified} copies on it are verified before they serve (by the mount daemon, or now with `imgpool repair`)"),
            );
        }
        DiskCommand::Evict { name, force, json } => {
            let copies = pool.evict_disk(&name, force)?;
            output::result(
                json,
                json!({ "disk": name, "state": "evicting", "copies_to_move": copies }),
                format!("disk {name} is evicting: {copies} copies move to other disks (by the mount daemon, or now with `imgpool repair`); then `imgpool disk rm {name}`"),
            );
        }
        DiskCommand::Rm { name, json } => {
            pool.remove_disk(&name)?;
            output::result(
                json,
                json!({ "removed": name }),
                format!("removed disk {name}"),
            );
        }
    }
    Ok(())
}

fn disk_json(d: &DiskStatus) -> Value {
    let r = d.resources.as_ref();
    json!({
        "name": d.disk.name,
        "path": d.disk.path,
        "uuid": d.disk.uuid,
        "state": d.state(),
        "problem": d.problem(),
        "capacity_bytes": r.map(|r| r.capacity),
        "free_bytes": r.map(|r| r.free),
        "full": d.is_full(),
        "filesystem": r.map(|r| r.fs_type.clone()),
        "images": d.images,
    })
}

fn image(state_dir: &Path, cmd: ImageCommand) -> Result<()> {
    let pool = match cmd {
        ImageCommand::List { .. } | ImageCommand::Show { .. } => Pool::open(state_dir)?,
        _ => open_to_change(state_dir)?,
    };
    match cmd {
        ImageCommand::Add {
            name,
            file,
            from_volume,
            from_longhorn_replica,
            snapshot,
            backing_file,
            copies,
            json,
        } => {
            let bar = progress_bar();
            let mut progress = |done, total| {
                if let Some(bar) = &bar {
                    bar.set_length(total);
                    bar.set_position(done);
                }
            };
            let imported = match (file, from_longhorn_replica, from_volume) {
                (_, _, Some(target)) => export::parse_target(&target).and_then(|(volume, snap)| {
                    let export = export::Export {
                        pool: &pool,
                        state_dir,
                        name: &name,
                        volume,
                        copies,
                    };
                    export.run(snap, &mut progress)
                }),
                (_, Some(dir), None) => pool.add_longhorn_replica(
                    &name,
                    &dir,
                    snapshot.as_deref(),
                    backing_file.as_deref(),
                    copies,
                    &mut progress,
                ),
                (Some(file), None, None) => pool.add_image(&name, &file, copies, &mut progress),
                (None, None, None) => {
                    unreachable!("clap requires FILE, --from-longhorn-replica or --from-volume")
                }
            };
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            let imported = imported?;
            if json {
                print_json(&json!({
                    "name": imported.name,
                    "uuid": imported.uuid,
                    "size": imported.size,
                    "sha512": imported.sha512,
                    "disks": imported.disks,
                    "resumed_at": imported.resumed_at,
                }));
            } else {
                if imported.resumed_at > 0 {
                    println!(
                        "resumed: an interrupted export of the same snapshot had stored the first {}",
                        bytes(imported.resumed_at)
                    );
                }
                println!("name:   {}", imported.name);
                println!("uuid:   {}", imported.uuid);
                println!("size:   {} ({})", imported.size, bytes(imported.size));
                println!(
                    "sha512: {}",
                    sha512_or_pending(&imported.sha512, &imported.name)
                );
                println!("disks:  {}", imported.disks.join(", "));
            }
        }
        ImageCommand::List { json } => {
            let images = pool.images()?;
            if json {
                print_json(&Value::Array(images.iter().map(image_json).collect()));
            } else {
                let rows = images
                    .iter()
                    .map(|i| {
                        vec![
                            i.image.name.clone(),
                            i.image.uuid.clone(),
                            bytes(i.image.size),
                            format!("{}/{}", i.healthy_copies(), i.image.copies_wanted),
                            i.holders.len().to_string(),
                            i.state().to_string(),
                        ]
                    })
                    .collect();
                table(
                    &["NAME", "UUID", "SIZE", "COPIES", "HOLDERS", "STATE"],
                    rows,
                );
            }
        }
        ImageCommand::Show { name, json } => {
            let info = pool.image(&name)?;
            if json {
                print_json(&image_json(&info));
            } else {
                let i = &info.image;
                println!("name:         {}", i.name);
                println!("uuid:         {}", i.uuid);
                println!("size:         {} ({})", i.size, bytes(i.size));
                println!("stored:       {} per copy", bytes(i.real_size));
                println!("sha512:       {}", sha512_or_pending(&i.sha512, &i.name));
                println!("state:        {}", info.state());
                if let Some(problem) = info.problem() {
                    println!("problem:      {problem}");
                }
                println!(
                    "copies:       {} healthy of {} wanted",
                    info.healthy_copies(),
                    i.copies_wanted
                );
                for c in &info.copies {
                    let mut note = copy_note(c).to_string();
                    if let Some(reason) = &c.reason {
                        note = format!("{note}: {reason}");
                    }
                    println!("  {}: {} ({note})", c.disk, c.path.display());
                }
                println!("holders:      {}", list_or_none(&info.holders));
                println!("open files:   {}", info.open_handles);
                println!("imported:     {}", timestamp(i.created));
                if let Some(source) = &i.source {
                    println!("source:       {source}");
                }
            }
        }
        ImageCommand::Checksum { name, json } => {
            let image = pool.image(&name)?.image;
            let bar = progress_bar();
            if let Some(bar) = &bar {
                bar.set_length(image.size);
            }
            let sha512 = pool.complete_sha512(&image, &mut |done| {
                if let Some(bar) = &bar {
                    bar.set_position(done);
                }
                Ok(())
            });
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            let sha512 = sha512?;
            output::result(
                json,
                json!({ "name": name, "sha512": sha512 }),
                format!("{sha512}  {name}"),
            );
        }
        ImageCommand::Rm { name, json } => {
            pool.remove_image(&name)?;
            output::result(json, json!({ "removed": name }), format!("removed {name}"));
        }
        ImageCommand::Set { name, copies, json } => {
            let info = pool.set_copies(&name, copies)?;
            output::result(
                json,
                image_json(&info),
                format!(
                    "{name} wants {copies} copies and has {} healthy; the mount daemon adds or removes copies to match, or run `imgpool repair`",
                    info.healthy_copies()
                ),
            );
        }
    }
    Ok(())
}

/// An image's SHA-512 as `image add` and `image show` print it.
fn sha512_or_pending(sha512: &Option<String>, name: &str) -> String {
    match sha512 {
        Some(sha512) => sha512.clone(),
        None => format!(
            "pending (the mount daemon computes it; `imgpool image checksum {name}` does now)"
        ),
    }
}

/// How `image show` describes a copy.
fn copy_note(c: &CopyInfo) -> &'static str {
    match (c.state, c.serving, c.counts) {
        (_, true, true) => "serving",
        (CopyState::Damaged, true, _) => "damaged: serving its good chunks until it is replaced",
        (_, true, false) => "serving, on an evicting disk",
        (CopyState::Ready | CopyState::Damaged, false, _) => {
            "not serving: its disk is out of service"
        }
        (state, false, _) => state.as_str(),
    }
}

fn image_json(info: &ImageInfo) -> Value {
    let i = &info.image;
    json!({
        "name": i.name,
        "uuid": i.uuid,
        "size": i.size,
        "stored_bytes": i.real_size,
        "sha512": i.sha512,
        "state": info.state().as_str(),
        "copies_wanted": i.copies_wanted,
        "problem": info.problem(),
        "healthy_copies": info.healthy_copies(),
        "copies": info.copies.iter().map(|c| json!({
            "disk": c.disk, "path": c.path, "state": c.state.as_str(), "serving": c.serving,
            "counts": c.counts, "reason": c.reason,
        })).collect::<Vec<_>>(),
        "holders": info.holders,
        "open_handles": info.open_handles,
        "created": timestamp(i.created),
        "unreferenced_since": i.unreferenced_since.map(timestamp),
        "source": i.source,
    })
}

fn reference(state_dir: &Path, cmd: RefCommand) -> Result<()> {
    let pool = match cmd {
        RefCommand::List { .. } => Pool::open(state_dir)?,
        _ => open_to_change(state_dir)?,
    };
    match cmd {
        RefCommand::Add {
            image,
            holder,
            json,
        } => {
            let added = pool.add_ref(&image, &holder)?;
            output::result(
                json,
                json!({ "image": image, "holder": holder, "added": added }),
                if added {
                    format!("{holder} now holds {image}")
                } else {
                    format!("{holder} already holds {image}")
                },
            );
        }
        RefCommand::Rm {
            image,
            holder,
            json,
        } => {
            pool.remove_ref(&image, &holder)?;
            output::result(
                json,
                json!({ "image": image, "holder": holder, "removed": true }),
                format!("{holder} no longer holds {image}"),
            );
        }
        RefCommand::List { image, json } => {
            let refs = pool.refs(image.as_deref())?;
            if json {
                print_json(&Value::Array(
                    refs.iter()
                        .map(|r| json!({ "image": r.image, "holder": r.holder, "since": timestamp(r.added) }))
                        .collect(),
                ));
            } else {
                let rows = refs
                    .iter()
                    .map(|r| vec![r.image.clone(), r.holder.clone(), timestamp(r.added)])
                    .collect();
                table(&["IMAGE", "HOLDER", "SINCE"], rows);
            }
        }
    }
    Ok(())
}

fn status(state_dir: &Path, json_out: bool) -> Result<()> {
    let pool = Pool::open(state_dir)?;
    let disks = pool.disk_status()?;
    let images = pool.images()?;
    let mounts = pool.live_mounts()?;
    let dead_mounts = pool.dead_mounts()?;
    let mut problems: Vec<String> = disks
        .iter()
        .flat_map(|d| {
            d.problem()
                .into_iter()
                .chain(d.full_note())
                .map(|p| format!("disk {}: {p}", d.disk.name))
        })
        .collect();
    problems.extend(dead_mounts.iter().map(|m| {
        let path = m.mount_point.display();
        if m.is_bind() {
            format!("bind {path}: its mount daemon died, so every read of it fails ('Transport endpoint is not connected'): `imgpool mount` cleans it up as it mounts the pool again")
        } else {
            format!("mount {path}: its daemon died, so every read of it and of its binds fails ('Transport endpoint is not connected'): `imgpool mount {path}` cleans it up and mounts the pool again (or `imgpool umount {path}`)")
        }
    }));
    problems.extend(images.iter().filter_map(|i| {
        i.problem()
            .map(|p| format!("image {} {}: {p}", i.image.name, i.state()))
    }));
    problems.extend(pool.volumes()?.iter().filter_map(|v| {
        volume_problem(v).map(|p| format!("volume {} failed: {p}", v.volume.name))
    }));
    if let Some(hold) = pool.gc_hold()? {
        problems.push(format!("gc: {hold}"));
    }
    // Each running daemon's statistics, asked on its control socket.
    let stats: Vec<std::result::Result<MountStats, client::CallError>> = mounts
        .iter()
        .map(|m| client::stats(pool.state_dir(), m.id))
        .collect();
    for (m, bind) in mounts.iter().zip(&stats).flat_map(|(m, stats)| {
        let binds = stats
            .as_ref()
            .map(|s| s.binds.as_slice())
            .unwrap_or_default();
        binds.iter().map(move |b| (m, b))
    }) {
        if let Some(why) = &bind.problem {
            problems.push(format!(
                "disk {}: its view in {} is not bound at {}, so replicas on that disk do not find their images there: {why}",
                bind.disk,
                m.mountpoint.display(),
                bind.target.display()
            ));
        }
    }
    let copying: Vec<String> = images
        .iter()
        .flat_map(|i| {
            i.copies
                .iter()
                .filter(|c| c.state == CopyState::Copying)
                .map(move |c| format!("copying '{}' to '{}'", i.image.name, c.disk))
        })
        .collect();
    let health = if problems.is_empty() {
        "ok"
    } else {
        "degraded"
    };
    let healthy_disks = disks.iter().filter(|d| d.problem().is_none()).count();
    let logical: u64 = images.iter().map(|i| i.image.size).sum();
    let stored: u64 = images
        .iter()
        .map(|i| i.image.real_size * i.healthy_copies() as u64)
        .sum();
    let holders: usize = images.iter().map(|i| i.holders.len()).sum();
    let volumes = pool.volumes()?;
    let volume_bytes: u64 = volumes.iter().map(|v| v.allocated).sum();
    let snapshots: usize = volumes.iter().map(|v| v.snapshots).sum();
    let reclaim: u64 = volumes.iter().filter_map(|v| v.reclaim_bytes).sum();
    if json_out {
        print_json(&json!({
            "pool": pool.uuid(),
            "state_dir": pool.state_dir(),
            "health": health,
            "problems": problems,
            "repairing": copying,
            "disks": { "total": disks.len(), "healthy": healthy_disks,
                       "list": disks.iter().map(disk_json).collect::<Vec<_>>() },
            "images": { "total": images.len(), "logical_bytes": logical, "stored_bytes": stored,
                        "holders": holders },
            "volumes": { "total": volumes.len(), "allocated_bytes": volume_bytes,
                         "snapshots": snapshots, "reclaim_pending_bytes": reclaim },
            "dead_mounts": dead_mounts.iter().map(|m| json!({
                "path": m.mount_point, "bind": m.is_bind(),
            })).collect::<Vec<_>>(),
            "mounts": mounts.iter().zip(&stats).map(|(m, stats)| json!({
                "id": m.id, "mountpoint": m.mountpoint, "pid": m.pid,
                "since": timestamp(m.started),
                "control_socket": control::socket_path(pool.state_dir(), m.id),
                "stats": stats.as_ref().ok(),
                "stats_error": stats.as_ref().err().map(|e| e.to_string()),
            })).collect::<Vec<_>>(),
        }));
    } else {
        println!("pool:    {} ({})", pool.uuid(), pool.state_dir().display());
        println!("health:  {health}");
        for p in &problems {
            println!("  {p}");
        }
        for c in &copying {
            println!("repair:  {c}");
        }
        println!(
            "disks:   {} registered, {healthy_disks} healthy",
            disks.len()
        );
        println!(
            "images:  {} ({} logical, {} stored), {holders} holder(s)",
            images.len(),
            bytes(logical),
            bytes(stored)
        );
        println!(
            "volumes: {} ({} allocated), {snapshots} snapshot(s){}",
            volumes.len(),
            bytes(volume_bytes),
            if reclaim > 0 {
                format!(", {} of deleted snapshots still to reclaim", bytes(reclaim))
            } else {
                String::new()
            }
        );
        if mounts.is_empty() {
            println!("mounts:  none");
        }
        for (m, stats) in mounts.iter().zip(&stats) {
            println!(
                "mount:   {} (daemon pid {}, since {})",
                m.mountpoint.display(),
                m.pid,
                timestamp(m.started)
            );
            match stats {
                Ok(stats) => print_mount_stats(stats),
                Err(e) => println!("  stats:   not answering: {e}"),
            }
        }
    }
    Ok(())
}

/// Progress bars for the repair's copies and verifications, when stderr is a terminal.
struct Bars(indicatif::MultiProgress);

impl repair::Reporter for Bars {
    fn task(&self, label: String, total: u64) -> Box<dyn Fn(u64) + Send + '_> {
        let bar = self.0.add(
            indicatif::ProgressBar::new(total)
                .with_style(
                    indicatif::ProgressStyle::with_template(
                        "{msg:30} {bar:30} {bytes}/{total_bytes} {bytes_per_sec}",
                    )
                    .expect("static template"),
                )
                .with_message(label)
                .with_finish(indicatif::ProgressFinish::AndClear),
        );
        Box::new(move |done| bar.set_position(done))
    }
}

fn reporter() -> Box<dyn repair::Reporter> {
    if std::io::stderr().is_terminal() {
        Box::new(Bars(indicatif::MultiProgress::new()))
    } else {
        Box::new(output::Quiet)
    }
}

/// Takes the repair lock, telling the operator when another process (a mount daemon's repair)
/// has it.
fn repair_lock(pool: &Pool) -> Result<WorkLock> {
    let path = pool.repair_lock_path();
    if let Some(lock) = WorkLock::try_acquire(&path)? {
        return Ok(lock);
    }
    eprintln!(
        "waiting for the repair running in another process (a mount daemon) to finish its round"
    );
    WorkLock::acquire(&path)
}

/// Probes every disk, then repairs; prints what was done.
fn run_repair(state_dir: &Path, pool: &Pool, json_out: bool) -> Result<repair::Report> {
    let _lock = repair_lock(pool)?;
    Monitor::new(Pool::open(state_dir)?).probe_all()?;
    let report = repair::repair(pool, &*reporter(), &AtomicBool::new(false))?;
    if !json_out {
        for line in &report.done {
            println!("{line}");
        }
    }
    Ok(report)
}

fn repair_cmd(state_dir: &Path, json_out: bool) -> Result<()> {
    // The repair round starts with recovery, and reports what it cleaned up.
    let pool = Pool::open(state_dir)?;
    let report = run_repair(state_dir, &pool, json_out)?;
    if json_out {
        print_json(&json!({ "done": report.done, "problems": report.problems }));
    } else if report.done.is_empty() && report.problems.is_empty() {
        println!("nothing to repair: every image has its copies");
    }
    unrepaired(&report)
}

/// A repair that left images short of their policy fails the command, each reason printed.
fn unrepaired(report: &repair::Report) -> Result<()> {
    match report.problems.len() {
        0 => Ok(()),
        n => {
            // One reason is the error's own line; several are printed above it.
            if n > 1 {
                for problem in &report.problems {
                    eprintln!("{problem}");
                }
            }
            Err(Error::Unrestored(report.problems.clone()))
        }
    }
}

fn scrub_cmd(state_dir: &Path, image: Option<&str>, json_out: bool) -> Result<()> {
    let pool = open_to_change(state_dir)?;
    let scrubbed = {
        let _lock = repair_lock(&pool)?;
        repair::scrub(&pool, image, &*reporter())?
    };
    if !json_out {
        for line in &scrubbed.verified {
            println!("good: {line}");
        }
        for line in &scrubbed.bad {
            println!("BAD:  {line}");
        }
        for line in &scrubbed.skipped {
            println!("skipped: {line}");
        }
    }
    let repaired = if scrubbed.bad.is_empty() {
        repair::Report::default()
    } else {
        run_repair(state_dir, &pool, json_out)?
    };
    if json_out {
        print_json(&json!({
            "verified": scrubbed.verified, "bad": scrubbed.bad, "skipped": scrubbed.skipped,
            "repaired": repaired.done, "problems": repaired.problems,
        }));
    } else {
        println!(
            "scrub: {} good, {} bad, {} skipped",
            scrubbed.verified.len(),
            scrubbed.bad.len(),
            scrubbed.skipped.len()
        );
    }
    unrepaired(&repaired)
}

fn fsck_cmd(state_dir: &Path, args: FsckArgs) -> Result<()> {
    let pool = match fsck::examine(state_dir)? {
        fsck::StoreCondition::Missing if args.repair => {
            let found = fsck::rebuild(state_dir, &args.disks)?;
            return rebuilt(state_dir, None, found, args.json);
        }
        fsck::StoreCondition::Missing => {
            return Err(Error::refused(
                ErrorKind::NotFound,
                format!(
                    "no metadata store in {}: `imgpool fsck --repair` rebuilds it from the disks",
                    state_dir.display()
                ),
            ))
        }
        fsck::StoreCondition::Damaged(_) if args.repair => {
            let (aside, found) =
                fsck::replace_store(state_dir, fsck::SetAside::Damaged, &args.disks)?;
            return rebuilt(state_dir, Some(aside), found, args.json);
        }
        fsck::StoreCondition::Damaged(e) => return Err(e),
        fsck::StoreCondition::Usable(pool) => pool,
    };
    if let Some(lost) = fsck::lost_pool(&pool, &args.disks)? {
        let disks: Vec<String> = lost.disks.iter().map(|d| d.display().to_string()).collect();
        if args.repair && !args.disks.is_empty() {
            drop(pool);
            let (aside, found) =
                fsck::replace_store(state_dir, fsck::SetAside::Empty, &args.disks)?;
            return rebuilt(state_dir, Some(aside), found, args.json);
        }
        // Found by looking at every mount: the pool may live on with a store elsewhere, so
        // only disks named by the operator are taken over.
        return Err(Error::refused(
            ErrorKind::Corrupt,
            format!(
                "this pool is empty, and {} carries the label of pool {}: if that pool's store was lost (and `imgpool init` made this one), `imgpool fsck --repair --disk PATH` (each of its disks) sets this empty store aside and rebuilds that pool's store from its disks",
                disks.join(", "),
                lost.pool_uuid
            ),
        ));
    }
    if args.repair {
        recover::recover(&pool)?;
    }
    let findings = fsck::check(&pool, args.repair)?;
    if args.json {
        print_json(&json!({
            "clean": findings.is_empty(),
            "repaired": args.repair,
            "findings": findings.iter().map(|f| json!({"problem": f.problem, "fix": f.fix})).collect::<Vec<_>>(),
        }));
    } else {
        for f in &findings {
            let verb = if args.repair { "fixed" } else { "fix" };
            println!("{}\n  {verb}: {}", f.problem, f.fix);
        }
    }
    if findings.is_empty() {
        if !args.json {
            println!("clean: the store and the disks agree");
        }
        return Ok(());
    }
    if args.repair {
        let report = run_repair(state_dir, &pool, args.json)?;
        return unrepaired(&report);
    }
    Err(Error::refused(
        ErrorKind::Corrupt,
        format!(
            "{} difference(s) between the store and the disks: `imgpool fsck --repair` fixes them",
            findings.len()
        ),
    ))
}

/// After `fsck --repair` rebuilt the store from the disks: what it found, then the repair that
/// verifies every copy found.
fn rebuilt(
    state_dir: &Path,
    aside: Option<PathBuf>,
    found: Vec<String>,
    json_out: bool,
) -> Result<()> {
    if let Some(aside) = &aside {
        println!("set the old store aside as {}", aside.display());
    }
    for line in found {
        println!("rebuilt: {line}");
    }
    let pool = Pool::open(state_dir)?;
    let report = run_repair(state_dir, &pool, json_out)?;
    println!("gc is held until the holders are registered again (`imgpool ref add`), then `imgpool gc --release-hold`");
    unrepaired(&report)
}

/// `imgpool cache drop`: asks each running daemon (or the one serving `--mountpoint`) on its
/// control socket to empty its chunk cache.
fn cache_cmd(state_dir: &Path, cmd: CacheCommand) -> Result<()> {
    let CacheCommand::Drop { mountpoint, json } = cmd;
    let sockets = match control::sockets(state_dir) {
        Ok(sockets) => sockets,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if !state_dir.join(crate::core::store::DB_FILE).exists() {
                return Err(Error::NoPool(state_dir.to_path_buf()));
            }
            Vec::new()
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(Error::refused(
                ErrorKind::Permission,
                format!(
                    "permission denied: only root may use the mount daemons' control sockets in {}",
                    control::dir(state_dir).display()
                ),
            ))
        }
        Err(e) => {
            return Err(Error::io(
                format!("cannot list {}", control::dir(state_dir).display()),
                e,
            ))
        }
    };
    // A dead mount cannot be resolved: take the path as given then.
    let wanted = mountpoint.map(|p| {
        std::fs::canonicalize(&p)
            .or_else(|_| std::path::absolute(&p))
            .unwrap_or(p)
    });
    let mut dropped = Vec::new();
    let mut failures = Vec::new();
    for (_, socket) in &sockets {
        let answer = wanted
            .as_ref()
            .map_or(Ok(true), |wanted| {
                client::call(socket, "GET", "/v1/health")
                    .map(|health| health["mountpoint"].as_str() == wanted.to_str())
            })
            .and_then(|serves_it| match serves_it {
                true => client::call(socket, "POST", "/v1/cache/drop").map(Some),
                false => Ok(None),
            });
        match answer {
            Ok(Some(done)) => dropped.push(done),
            Ok(None) | Err(client::CallError::NotRunning) => {}
            Err(client::CallError::Denied(message)) => {
                return Err(Error::refused(ErrorKind::Permission, message))
            }
            Err(client::CallError::Failed(message)) => failures.push(message),
        }
    }
    if json {
        print_json(&json!({ "dropped": dropped, "failed": failures }));
    } else {
        for done in &dropped {
            println!(
                "emptied the chunk cache of {}: {} chunk(s), {}",
                done["mountpoint"].as_str().unwrap_or("?"),
                done["dropped_chunks"],
                bytes(done["dropped_bytes"].as_u64().unwrap_or(0))
            );
        }
    }
    match (failures.len(), &wanted) {
        (0, Some(wanted)) if dropped.is_empty() => Err(Error::refused(
            ErrorKind::NotFound,
            format!(
                "no running mount of this pool at {}: `imgpool status` lists the pool's mounts",
                wanted.display()
            ),
        )),
        (0, None) if dropped.is_empty() => {
            if !json {
                println!("no running mount of the pool: no cache to empty");
            }
            Ok(())
        }
        (0, _) => Ok(()),
        // A daemon that did not answer in time, or answered an error.
        (1, _) => Err(Error::refused(ErrorKind::Internal, failures.remove(0))),
        (n, _) => {
            for failure in &failures {
                eprintln!("{failure}");
            }
            Err(Error::refused(
                ErrorKind::Internal,
                format!("{n} mount daemons did not empty their cache (reasons above)"),
            ))
        }
    }
}

fn config_cmd(state_dir: &Path, cmd: ConfigCommand) -> Result<()> {
    let pool = match cmd {
        ConfigCommand::List { .. } => Pool::open(state_dir)?,
        ConfigCommand::Set { .. } => open_to_change(state_dir)?,
    };
    match cmd {
        ConfigCommand::List { json: json_out } => {
            let settings = pool.settings()?;
            if json_out {
                // Numbers in base units, for scripts: bytes per second and seconds.
                let interval = settings.probe_interval;
                let seconds = if interval.subsec_nanos() == 0 {
                    json!(interval.as_secs())
                } else {
                    json!(interval.as_secs_f64())
                };
                print_json(&json!({
                    "copies": settings.copies,
                    "repair-jobs": settings.repair_jobs,
                    "repair-bandwidth": settings.repair_bandwidth,
                    "probe-interval": seconds,
                }));
            } else {
                let values = settings.values();
                let rows = values
                    .into_iter()
                    .zip(settings::KEYS.iter())
                    .map(|((k, v), key)| vec![k.to_string(), v, key.help.to_string()])
                    .collect();
                table(&["KEY", "VALUE", "MEANING"], rows);
            }
        }
        ConfigCommand::Set { key, value, json } => {
            pool.set_setting(&key, &value)?;
            output::result(
                json,
                json!({ "key": key, "value": value.trim() }),
                format!("{key} = {}", value.trim()),
            );
        }
    }
    Ok(())
}

fn progress_bar() -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("static template"),
    );
    Some(bar)
}

fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("JSON values serialise")
    );
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}

fn print_mount_stats(stats: &MountStats) {
    let mode = match (stats.io_mode, stats.io_mode_requested) {
        (IoMode::Cached, IoMode::Passthrough) => "cached (passthrough refused: see the log)",
        (IoMode::Cached, _) => "cached",
        (IoMode::Passthrough, _) => "passthrough (reads bypass the daemon)",
    };
    let read = &stats.read;
    let cache = &read.cache;
    let lookups = cache.hits + cache.misses;
    let percent = |n: u64| {
        if lookups == 0 {
            0.0
        } else {
            n as f64 * 100.0 / lookups as f64
        }
    };
    println!("  io mode: {mode}");
    println!(
        "  cache:   {} of {} in {} chunk(s) of {}",
        bytes(cache.bytes_cached),
        bytes(cache.capacity_bytes),
        cache.chunks_cached,
        bytes(cache.chunk_size)
    );
    println!(
        "           hits {} ({:.1}%, {} from readahead), misses {} ({} waited on another read)",
        cache.hits,
        percent(cache.hits),
        cache.readahead_hits,
        cache.misses,
        cache.joined
    );
    println!(
        "           evictions {}, handed to the page cache {}, read ahead {}",
        cache.evictions,
        cache.handed_to_page_cache,
        bytes(read.readahead_bytes)
    );
    let disks: Vec<String> = read
        .disk_read_bytes
        .iter()
        .map(|(disk, n)| format!("{disk} {}", bytes(*n)))
        .collect();
    println!(
        "  reads:   {} request(s), {} served; from disks: {}",
        read.requests,
        bytes(read.bytes_served),
        if disks.is_empty() {
            "none".to_string()
        } else {
            disks.join(", ")
        }
    );
    println!(
        "  faults:  {} read error(s), {} corrupt chunk(s), {} chunk(s) served from another copy",
        read.copy_read_errors, read.corrupt_chunks, read.failovers
    );
}

fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row);
    }
}

/// Refuses commands that need root, with a message that says so.
pub fn require_root(what: &'static str) -> Result<()> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(Error::NotRoot(what))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_size_has_a_floor() {
        assert!(parse_cache_size("1M")
            .unwrap_err()
            .contains("smallest cache"));
        assert_eq!(parse_cache_size("4MiB"), Ok(MIN_CACHE_SIZE));
    }

    #[test]
    fn numeric_mount_options_are_bounded() {
        assert_eq!(parse_threads("1"), Ok(1));
        assert_eq!(parse_threads("256"), Ok(MAX_THREADS));
        for bad in ["0", "257", "100000", "-1", "four"] {
            assert!(
                parse_threads(bad).unwrap_err().contains("1 to 256"),
                "{bad}"
            );
        }
        assert!(parse_cache_size("1024T").unwrap_err().contains("memory"));
        assert_eq!(parse_read_ahead("0"), Ok(0));
        assert_eq!(parse_read_ahead("256MiB"), Ok(MAX_READ_AHEAD));
        assert!(parse_read_ahead("257MiB")
            .unwrap_err()
            .contains("from 0 to"));
    }

    #[test]
    fn every_command_has_help() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
