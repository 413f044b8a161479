//! The mount daemon: mounting the pool, the per-disk bind mounts, following changes made by other
//! commands, the background workers (health, repair), the control socket that commands use to
//! reach it (`control`, over the HTTP framing in `http`), Prometheus metrics (`metrics`),
//! readiness for systemd (`Type=notify`), the log's output and level (`logging`) and a clean stop.

pub mod control;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod mount;
