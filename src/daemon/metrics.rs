//! Prometheus metrics of a mount daemon: every metric is defined here (names, help, units), read
//! at each scrape and encoded in the Prometheus text format by `prometheus-client`. They are
//! served at `GET /metrics` on the control socket (`control`), and on a plain TCP listener when
//! `imgpool mount --metrics-address ADDR` asks for one (`MetricsListener`). The list, with what
//! each means: `docs/metrics.md`.
//!
//! A scrape never waits on a FUSE request: the request counters are atomics (`fs::ops`), the read
//! statistics too, and the pool's state (disks, images, volumes) is read from the store through
//! the scrape's own connection, in the scraping thread.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use parking_lot::Mutex;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::core::pool::Pool;
use crate::core::repair::RepairCounters;
use crate::daemon::http::{self, ReadError};
use crate::error::{IoContext, Result};
use crate::fs::namespace::PoolFs;
use crate::fs::ops::{errno_name, OpStats};
use crate::fs::stats::BindStatus;
use crate::fs::IoMode;

/// The content type of the Prometheus text format.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Disk states, as `imgpool disk list` shows them; one 0/1 series each.
const DISK_STATES: [&str; 6] = [
    "healthy",
    "evicting",
    "read-only",
    "failed",
    "missing",
    "wrong-label",
];
const IMAGE_STATES: [&str; 3] = ["ready", "degraded", "failed"];
const VOLUME_STATES: [&str; 2] = ["ready", "failed"];

/// What the metrics are read from: the daemon's parts, and a store connection of their own.
pub struct Metrics {
    pub fs: Arc<PoolFs>,
    pub ops: Arc<OpStats>,
    pub repair: Arc<RepairCounters>,
    pub io_mode_requested: IoMode,
    pub passthrough: Arc<AtomicBool>,
    pub binds: Arc<Mutex<Vec<BindStatus>>>,
    pub state_dir: PathBuf,
    /// Opened at the first scrape; scrapes take turns on it (the FUSE threads' connection is
    /// never used here).
    pool: Mutex<Option<Pool>>,
}

type Labels = Vec<(&'static str, String)>;

enum Value {
    Gauge(f64),
    Counter(u64),
    /// Sum, count and `(upper bound, count)` of each bucket, not cumulative (the encoder sums).
    Histogram(f64, u64, Vec<(f64, u64)>),
}

/// One metric: its descriptor and series.
struct Family {
    name: &'static str,
    help: &'static str,
    unit: Option<Unit>,
    kind: MetricType,
    series: Vec<(Labels, Value)>,
}

/// The metrics as read at one scrape, encoded by `prometheus-client`.
#[derive(Default)]
struct Scrape {
    families: Vec<Family>,
}

impl std::fmt::Debug for Scrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Scrape({} families)", self.families.len())
    }
}

impl Scrape {
    fn add(
        &mut self,
        name: &'static str,
        help: &'static str,
        unit: Option<Unit>,
        kind: MetricType,
        series: Vec<(Labels, Value)>,
    ) {
        self.families.push(Family {
            name,
            help,
            unit,
            kind,
            series,
        });
    }

    fn gauge(&mut self, name: &'static str, help: &'static str, unit: Option<Unit>, v: f64) {
        self.add(
            name,
            help,
            unit,
            MetricType::Gauge,
            vec![(Vec::new(), Value::Gauge(v))],
        );
    }

    fn counter(&mut self, name: &'static str, help: &'static str, unit: Option<Unit>, v: u64) {
        self.add(
            name,
            help,
            unit,
            MetricType::Counter,
            vec![(Vec::new(), Value::Counter(v))],
        );
    }

    fn gauges(
        &mut self,
        name: &'static str,
        help: &'static str,
        unit: Option<Unit>,
        series: impl IntoIterator<Item = (Labels, f64)>,
    ) {
        let series = series
            .into_iter()
            .map(|(l, v)| (l, Value::Gauge(v)))
            .collect();
        self.add(name, help, unit, MetricType::Gauge, series);
    }

    fn counters(
        &mut self,
        name: &'static str,
        help: &'static str,
        unit: Option<Unit>,
        series: impl IntoIterator<Item = (Labels, u64)>,
    ) {
        let series = series
            .into_iter()
            .map(|(l, v)| (l, Value::Counter(v)))
            .collect();
        self.add(name, help, unit, MetricType::Counter, series);
    }
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::result::Result<(), std::fmt::Error> {
        for family in &self.families {
            let mut metric = encoder.encode_descriptor(
                family.name,
                family.help,
                family.unit.as_ref(),
                family.kind,
            )?;
            for (labels, value) in &family.series {
                let mut series = metric.encode_family(labels)?;
                match value {
                    Value::Gauge(v) => series.encode_gauge(v)?,
                    Value::Counter(v) => series.encode_counter::<NoLabelSet, _, u64>(v, None)?,
                    Value::Histogram(sum, count, buckets) => {
                        series.encode_histogram::<NoLabelSet>(*sum, *count, buckets, None)?
                    }
                }
            }
        }
        Ok(())
    }
}

/// A 0/1 series per state, the one that holds 1.
fn states(
    labels: &Labels,
    all: &'static [&'static str],
    current: &str,
) -> impl Iterator<Item = (Labels, f64)> {
    let labels = labels.clone();
    let current = current.to_string();
    all.iter().map(move |state| {
        let mut l = labels.clone();
        l.push(("state", state.to_string()));
        (l, if *state == current { 1.0 } else { 0.0 })
    })
}

fn label(key: &'static str, value: impl Into<String>) -> Labels {
    vec![(key, value.into())]
}

impl Metrics {
    pub fn new(
        fs: Arc<PoolFs>,
        ops: Arc<OpStats>,
        repair: Arc<RepairCounters>,
        io_mode_requested: IoMode,
        passthrough: Arc<AtomicBool>,
        binds: Arc<Mutex<Vec<BindStatus>>>,
    ) -> Metrics {
        let state_dir = fs.pool().state_dir().to_path_buf();
        Metrics {
            fs,
            ops,
            repair,
            io_mode_requested,
            passthrough,
            binds,
            state_dir,
            pool: Mutex::new(None),
        }
    }

    /// Every metric, in the Prometheus text format.
    pub fn render(&self) -> String {
        let started = Instant::now();
        let mut scrape = Scrape::default();
        scrape.add(
            "imgpool_build_info",
            "The imgpool version serving this mount (always 1).",
            None,
            MetricType::Gauge,
            vec![(
                label("version", env!("CARGO_PKG_VERSION")),
                Value::Gauge(1.0),
            )],
        );
        self.mount_metrics(&mut scrape);
        self.request_metrics(&mut scrape);
        self.read_metrics(&mut scrape);
        self.repair_metrics(&mut scrape);
        let readable = {
            let mut pool = self.pool.lock();
            if pool.is_none() {
                match Pool::open(&self.state_dir) {
                    Ok(opened) => *pool = Some(opened),
                    Err(e) => tracing::warn!("metrics: cannot open the store: {e}"),
                }
            }
            match pool.as_ref().map(|pool| pool_metrics(pool, &mut scrape)) {
                Some(Ok(())) => true,
                Some(Err(e)) => {
                    tracing::warn!("metrics: cannot read the pool's state: {e}");
                    false
                }
                None => false,
            }
        };
        scrape.gauge(
            "imgpool_store_readable",
            "1 if this scrape read the pool's disks, images and volumes from the store, 0 if it could not (those metrics are missing then; the daemon's log says why).",
            None,
            if readable { 1.0 } else { 0.0 },
        );
        scrape.gauge(
            "imgpool_scrape_duration_seconds",
            "How long the daemon took to read the metrics of this scrape.",
            None,
            started.elapsed().as_secs_f64(),
        );
        let mut registry = Registry::default();
        registry.register_collector(Box::new(scrape));
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
            .expect("writing to a String does not fail");
        out
    }

    fn mount_metrics(&self, scrape: &mut Scrape) {
        let mode = if self.passthrough.load(Ordering::Relaxed) {
            "passthrough"
        } else {
            "cached"
        };
        let requested = match self.io_mode_requested {
            IoMode::Cached => "cached",
            IoMode::Passthrough => "passthrough",
        };
        scrape.gauges(
            "imgpool_mount_io_mode",
            "The mount's io mode in effect (1) and not (0); passthrough falls back to cached when the kernel refuses it.",
            None,
            ["cached", "passthrough"].iter().map(|m| {
                (
                    vec![("mode", m.to_string()), ("requested", requested.to_string())],
                    if *m == mode { 1.0 } else { 0.0 },
                )
            }),
        );
        let binds = self.binds.lock().clone();
        scrape.gauges(
            "imgpool_bind_mounted",
            "1 while the disk's view is bind-mounted at <disk>/backing-images, 0 while it could not be (the daemon retries; `imgpool status` says why). One series per disk in service.",
            None,
            binds.iter().map(|b| {
                (
                    vec![
                        ("disk", b.disk.clone()),
                        ("target", b.target.display().to_string()),
                    ],
                    if b.problem.is_none() { 1.0 } else { 0.0 },
                )
            }),
        );
    }

    fn request_metrics(&self, scrape: &mut Scrape) {
        let ops = self.ops.snapshot();
        scrape.counters(
            "imgpool_fuse_requests",
            "FUSE requests answered, by operation (`other`: requests that always fail with EROFS, such as mkdir or rename).",
            None,
            ops.iter().map(|o| (label("op", o.op.name()), o.count)),
        );
        scrape.counters(
            "imgpool_fuse_request_errors",
            "FUSE requests answered with an error, by operation and errno name.",
            None,
            ops.iter().flat_map(|o| {
                o.errors.iter().map(move |&(errno, n)| {
                    (
                        vec![
                            ("op", o.op.name().to_string()),
                            ("errno", errno_name(errno)),
                        ],
                        n,
                    )
                })
            }),
        );
        scrape.add(
            "imgpool_fuse_request_duration_seconds",
            "Time from the daemon's receipt of a FUSE request to its reply, by operation.",
            None,
            MetricType::Histogram,
            ops.iter()
                .map(|o| {
                    (
                        label("op", o.op.name()),
                        Value::Histogram(o.seconds, o.count, o.buckets.clone()),
                    )
                })
                .collect(),
        );
    }

    fn repair_metrics(&self, scrape: &mut Scrape) {
        let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        scrape.counters(
            "imgpool_repair_read_bytes",
            "Bytes this daemon's repair read, by work: copy (from a good copy or the source, to make a new copy) and verify (a copy read back against its image's checksum). Holes are not read. A repair run by `imgpool repair` in another process is not counted.",
            None,
            [
                (label("work", "copy"), load(&self.repair.copied_bytes)),
                (label("work", "verify"), load(&self.repair.verified_bytes)),
            ],
        );
        scrape.counter(
            "imgpool_repair_rounds",
            "Repair rounds of this daemon that did something (copied, verified, deleted or cleaned up).",
            None,
            load(&self.repair.rounds),
        );
    }

    fn read_metrics(&self, scrape: &mut Scrape) {
        let read = self.fs.read_stats();
        let cache = &read.cache;
        scrape.counter(
            "imgpool_read_served_bytes",
            "Bytes returned by FUSE READ requests of images and backing.cfg files (in passthrough mode the kernel reads images itself, and they do not count).",
            None,
            read.bytes_served,
        );
        scrape.counters(
            "imgpool_disk_read_bytes",
            "Bytes read from copy files, by disk, for requests and readahead together.",
            None,
            read.disk_read_bytes
                .iter()
                .map(|(disk, n)| (label("disk", disk.clone()), *n)),
        );
        scrape.counter(
            "imgpool_readahead_bytes",
            "Bytes read from disks ahead of sequential readers (also in imgpool_disk_read_bytes_total).",
            None,
            read.readahead_bytes,
        );
        scrape.counter(
            "imgpool_copy_read_errors",
            "Chunk reads from a copy that failed with an I/O error (the chunk was then read from another copy, if any).",
            None,
            read.copy_read_errors,
        );
        scrape.counter(
            "imgpool_chunk_verify_failures",
            "Chunks read from a copy that did not match their BLAKE3 digest; never cached or served.",
            None,
            read.corrupt_chunks,
        );
        scrape.counter(
            "imgpool_failovers",
            "Chunks a request read from another copy than the image's preferred one, after a failed or corrupt read.",
            None,
            read.failovers,
        );
        // Every disk read from has its series, at 0 until its first fault.
        let mut faults = read.faults_by_disk.clone();
        for disk in read.disk_read_bytes.keys() {
            faults.entry(disk.clone()).or_default();
        }
        let by_disk = |count: fn(&crate::fs::read::DiskFaults) -> u64| {
            faults
                .iter()
                .map(move |(disk, faults)| (label("disk", disk.clone()), count(faults)))
                .collect::<Vec<_>>()
        };
        scrape.counters(
            "imgpool_disk_copy_read_errors",
            "imgpool_copy_read_errors_total by the disk whose copy failed the read.",
            None,
            by_disk(|f| f.copy_read_errors),
        );
        scrape.counters(
            "imgpool_disk_chunk_verify_failures",
            "imgpool_chunk_verify_failures_total by the disk whose copy read wrong.",
            None,
            by_disk(|f| f.corrupt_chunks),
        );
        scrape.counters(
            "imgpool_disk_failovers",
            "imgpool_failovers_total by the disk whose copy served the chunk instead.",
            None,
            by_disk(|f| f.failovers),
        );
        scrape.counter(
            "imgpool_cache_hits",
            "Chunk cache lookups that found the chunk.",
            None,
            cache.hits,
        );
        scrape.counter(
            "imgpool_cache_readahead_hits",
            "Cache hits that were the first read of a chunk loaded by readahead (also in imgpool_cache_hits_total).",
            None,
            cache.readahead_hits,
        );
        scrape.counter(
            "imgpool_cache_misses",
            "Chunk cache lookups that did not find the chunk (read from disk, or waited for a read in flight).",
            None,
            cache.misses,
        );
        scrape.counter(
            "imgpool_cache_joined",
            "Cache misses that waited for a read already in flight instead of reading the disk again (also in imgpool_cache_misses_total).",
            None,
            cache.joined,
        );
        scrape.counter(
            "imgpool_cache_evictions",
            "Chunks dropped from the cache because their shard was over its share of the capacity.",
            None,
            cache.evictions,
        );
        scrape.counter(
            "imgpool_cache_handed_to_page_cache",
            "Chunks dropped from the cache because the kernel's page cache holds all their pages.",
            None,
            cache.handed_to_page_cache,
        );
        scrape.gauge(
            "imgpool_cache_capacity",
            "The chunk cache's bound (--cache-size, rounded down to whole chunks per shard).",
            Some(Unit::Bytes),
            cache.capacity_bytes as f64,
        );
        scrape.gauge(
            "imgpool_cache_used",
            "Image bytes held in the chunk cache now.",
            Some(Unit::Bytes),
            cache.bytes_cached as f64,
        );
    }
}

/// Disks, images and volumes, read from the store.
fn pool_metrics(pool: &Pool, scrape: &mut Scrape) -> Result<()> {
    scrape.gauges(
        "imgpool_repair_queue",
        "What the repair's next round would do now, by work: copies to create, to verify, to remove (0 when the pool meets its policy).",
        None,
        crate::core::repair::queue(pool)?
            .into_iter()
            .map(|(work, n)| (label("work", work), n as f64)),
    );
    let disks = pool.disk_status()?;
    let images = pool.images()?;
    let volumes = pool.volumes()?;
    scrape.gauges(
        "imgpool_disk_capacity",
        "Size of the disk's filesystem (missing while the disk cannot be read).",
        Some(Unit::Bytes),
        disks.iter().filter_map(|d| {
            let r = d.resources.as_ref()?;
            Some((label("disk", d.disk.name.clone()), r.capacity as f64))
        }),
    );
    scrape.gauges(
        "imgpool_disk_free",
        "Free space on the disk's filesystem, read within the last 30 s.",
        Some(Unit::Bytes),
        disks.iter().filter_map(|d| {
            let r = d.resources.as_ref()?;
            Some((label("disk", d.disk.name.clone()), r.free as f64))
        }),
    );
    scrape.gauges(
        "imgpool_disk_state",
        "The disk's state (1) and the states it is not in (0), as `imgpool disk list` shows it.",
        None,
        disks
            .iter()
            .flat_map(|d| states(&label("disk", d.disk.name.clone()), &DISK_STATES, d.state())),
    );
    scrape.gauges(
        "imgpool_disk_copies",
        "Copies of images the disk holds.",
        None,
        disks
            .iter()
            .map(|d| (label("disk", d.disk.name.clone()), d.images as f64)),
    );
    scrape.gauge(
        "imgpool_images",
        "Images in the pool (ready to serve, whatever their copies' health).",
        None,
        images.len() as f64,
    );
    scrape.gauge(
        "imgpool_images_sha512_pending",
        "Images whose SHA-512 is not computed yet (exports, until the daemon's background thread or `imgpool image checksum` computes it).",
        None,
        images.iter().filter(|i| i.image.sha512.is_none()).count() as f64,
    );
    let image = |i: &crate::core::pool::ImageInfo| label("image", i.image.name.clone());
    scrape.gauges(
        "imgpool_image_size",
        "The image's size.",
        Some(Unit::Bytes),
        images.iter().map(|i| (image(i), i.image.size as f64)),
    );
    scrape.gauges(
        "imgpool_image_copies_wanted",
        "Copies the image's policy asks for.",
        None,
        images
            .iter()
            .map(|i| (image(i), i.image.copies_wanted as f64)),
    );
    scrape.gauges(
        "imgpool_image_copies_healthy",
        "The image's copies that count toward its policy.",
        None,
        images.iter().map(|i| (image(i), i.healthy_copies() as f64)),
    );
    scrape.gauges(
        "imgpool_image_state",
        "The image's state (1) and the states it is not in (0): ready (its policy met), degraded (fewer healthy copies than wanted), failed (no copy serves: reads fail).",
        None,
        images
            .iter()
            .flat_map(|i| states(&image(i), &IMAGE_STATES, i.state().as_str())),
    );
    scrape.gauges(
        "imgpool_image_holders",
        "Holders (references) of the image; an image with holders is not removed.",
        None,
        images.iter().map(|i| (image(i), i.holders.len() as f64)),
    );
    scrape.gauges(
        "imgpool_image_open_files",
        "Files of the image open through the pool's live mounts.",
        None,
        images.iter().map(|i| (image(i), i.open_handles as f64)),
    );
    scrape.gauge(
        "imgpool_volumes",
        "Volumes in the pool.",
        None,
        volumes.len() as f64,
    );
    let volume = |v: &crate::core::pool::VolumeInfo| label("volume", v.volume.name.clone());
    scrape.gauges(
        "imgpool_volume_size",
        "The volume's size as its readers see it.",
        Some(Unit::Bytes),
        volumes.iter().map(|v| (volume(v), v.volume.size as f64)),
    );
    scrape.gauges(
        "imgpool_volume_allocated",
        "Bytes the volume's data file takes on its disk.",
        Some(Unit::Bytes),
        volumes.iter().map(|v| (volume(v), v.allocated as f64)),
    );
    scrape.gauges(
        "imgpool_volume_snapshots",
        "The volume's snapshots.",
        None,
        volumes.iter().map(|v| (volume(v), v.snapshots as f64)),
    );
    scrape.gauges(
        "imgpool_volume_reclaim_pending",
        "Bytes of deleted snapshots the volume's reclaim has yet to give back to its disk.",
        Some(Unit::Bytes),
        volumes
            .iter()
            .map(|v| (volume(v), v.reclaim_bytes.unwrap_or(0) as f64)),
    );
    scrape.gauges(
        "imgpool_volume_state",
        "The volume's state (1) and the states it is not in (0): failed while its disk is out of service.",
        None,
        volumes
            .iter()
            .flat_map(|v| states(&volume(v), &VOLUME_STATES, v.state())),
    );
    Ok(())
}

/// `--metrics-address`: a plain HTTP listener that answers `GET /metrics` only, one connection
/// at a time (a scrape is quick; a client that sends nothing is cut off after
/// `control::REQUEST_TIMEOUT`).
pub struct MetricsListener {
    address: SocketAddr,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsListener {
    pub fn bind(address: SocketAddr) -> Result<(TcpListener, SocketAddr)> {
        let listener =
            TcpListener::bind(address).ctx(|| format!("cannot listen for metrics on {address}"))?;
        let bound = listener
            .local_addr()
            .ctx(|| format!("cannot listen for metrics on {address}"))?;
        Ok((listener, bound))
    }

    /// Starts answering on `listener`, in a thread of its own.
    pub fn serve(
        listener: TcpListener,
        metrics: Arc<Metrics>,
        timeout: std::time::Duration,
    ) -> Result<MetricsListener> {
        let address = listener
            .local_addr()
            .ctx(|| "cannot read the metrics listener's address".into())?;
        let stopping = Arc::new(AtomicBool::new(false));
        let stop = stopping.clone();
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    match stream {
                        Ok(stream) => answer_tcp(&stream, &metrics, timeout),
                        Err(e) => {
                            tracing::warn!("metrics listener: cannot accept a connection: {e}");
                            std::thread::sleep(std::time::Duration::from_millis(100));
                        }
                    }
                }
            })
            .ctx(|| "cannot start the metrics listener's thread".into())?;
        Ok(MetricsListener {
            address,
            stopping,
            thread: Some(thread),
        })
    }
}

impl Drop for MetricsListener {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Relaxed);
        // A connection of our own wakes the accept.
        let mut wake = self.address;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        if TcpStream::connect(wake).is_ok() {
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

fn answer_tcp(stream: &TcpStream, metrics: &Metrics, timeout: std::time::Duration) {
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    let response = match http::read_request(stream, Instant::now() + timeout) {
        Ok(request) if request.path != "/metrics" => {
            http::encode_response(404, &[], br#"{"error":"only /metrics is served here"}"#)
        }
        Ok(request) if request.method != "GET" => http::encode_response(
            405,
            &["Allow: GET".to_string()],
            br#"{"error":"/metrics takes GET"}"#,
        ),
        Ok(_) => http::encode_response_as(200, &[], CONTENT_TYPE, metrics.render().as_bytes()),
        Err(ReadError::Closed) => return,
        Err(ReadError::Io(e)) => {
            tracing::debug!("metrics listener: reading from {peer}: {e}");
            return;
        }
        Err(e) => {
            tracing::debug!("metrics listener: bad request from {peer}: {e}");
            http::encode_response(400, &[], br#"{"error":"bad request"}"#)
        }
    };
    if let Err(e) = http::send_all(stream, &response, Instant::now() + timeout) {
        tracing::debug!("metrics listener: cannot answer {peer}: {e}");
    }
}
