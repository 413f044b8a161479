//! A shared limit on the bytes per second the repair reads, so that restoring copies does not
//! starve the replicas reading the same disks.

use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// A shared limit on the bytes per second the repair reads.
pub struct Throttle {
    rate: u64,
    state: Mutex<(Instant, u64)>,
}

impl Throttle {
    /// `rate` bytes per second; 0 for no limit.
    pub fn new(rate: u64) -> Throttle {
        Throttle {
            rate,
            state: Mutex::new((Instant::now(), 0)),
        }
    }

    /// Accounts for `bytes` and sleeps as long as the work is ahead of the rate.
    pub fn consume(&self, bytes: u64) {
        if self.rate == 0 || bytes == 0 {
            return;
        }
        let due = {
            let mut state = self.state.lock();
            // An idle spell does not earn a burst: the budget restarts after a second of rest.
            let earned = state.0 + Duration::from_secs_f64(state.1 as f64 / self.rate as f64);
            if earned + Duration::from_secs(1) < Instant::now() {
                *state = (Instant::now(), 0);
            }
            state.1 += bytes;
            state.0 + Duration::from_secs_f64(state.1 as f64 / self.rate as f64)
        };
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_throttle_holds_work_to_its_rate() {
        let throttle = Throttle::new(10 << 20);
        let started = Instant::now();
        for _ in 0..20 {
            throttle.consume(100 << 10);
        }
        // 2 MB at 10 MB/s cannot take less than 0.2 s (the first 100 KiB is free).
        assert!(started.elapsed() >= Duration::from_millis(180));
        let unlimited = Throttle::new(0);
        let started = Instant::now();
        unlimited.consume(1 << 40);
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
