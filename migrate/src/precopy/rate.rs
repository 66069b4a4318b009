//! The bandwidth cap (`max_bandwidth`): a leaky bucket in front of the migration stream. Each
//! `Pages` record leaves once the records before it have drained at the capped rate; the
//! arithmetic ([`RateLimiter::admit`]) is pure, the waiting is [`flush_batch`]'s.

use std::io::Write;
use std::num::NonZeroU64;
use std::time::{Duration, Instant};

use super::MigrationError;
use crate::protocol::{PagesBuilder, ProtocolError};

/// A leaky bucket: when the next record may leave.
#[derive(Debug, Clone, Copy)]
pub(super) struct RateLimiter {
    /// Bytes/s; `None` sends as fast as the link goes.
    rate: Option<NonZeroU64>,
    /// When the next byte may leave.
    next_send: Instant,
}

impl RateLimiter {
    /// A bucket draining at `cap` bytes/s ([`super::Params::bandwidth_cap`]; None: no cap),
    /// empty at `now`.
    pub(super) fn new(cap: Option<NonZeroU64>, now: Instant) -> RateLimiter {
        RateLimiter { rate: cap, next_send: now }
    }

    /// A record of `bytes` was written at `now`: how long to wait before the next one may
    /// leave (None: at once). Its bytes drain after those before it, or from `now` if the
    /// bucket ran empty meanwhile.
    pub(super) fn admit(&mut self, bytes: usize, now: Instant) -> Option<Duration> {
        let rate = self.rate?.get();
        self.next_send = self.next_send.max(now) + Duration::from_secs_f64(bytes as f64 / rate as f64);
        if self.next_send > now {
            Some(self.next_send - now)
        } else {
            None
        }
    }
}

/// Writes the current batch as a record (adding its payload to `page_bytes`), keeping the rate
/// under the cap of `limiter`: while the bucket is not empty, the record is pushed out of the
/// buffered writer and the sender sleeps.
pub(super) fn flush_batch<W: Write>(
    builder: &mut PagesBuilder,
    out: &mut W,
    limiter: &mut RateLimiter,
    page_bytes: &mut u64,
) -> Result<(), MigrationError> {
    let n = builder.flush(out)?;
    *page_bytes += n as u64;
    if let Some(wait) = limiter.admit(n, Instant::now()) {
        // The buffered writer must not hold the record back while we wait.
        out.flush().map_err(ProtocolError::from)?;
        std::thread::sleep(wait);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    /// The cap of `max_bandwidth`, as the sender takes it.
    fn cap(max_bandwidth: Option<u64>) -> Option<NonZeroU64> {
        super::super::Params { max_bandwidth, ..Default::default() }.bandwidth_cap()
    }

    #[test]
    fn without_a_cap_nothing_waits() {
        let t0 = Instant::now();
        for max in [None, Some(0)] {
            let mut l = RateLimiter::new(cap(max), t0);
            assert_eq!(l.admit(100 * MIB, t0), None);
            assert_eq!(l.admit(100 * MIB, t0), None);
            assert_eq!(l.next_send, t0);
        }
    }

    #[test]
    fn records_leave_once_the_ones_before_have_drained() {
        let t0 = Instant::now();
        // 4 MiB/s: a 1 MiB record takes 250 ms.
        let mut l = RateLimiter::new(cap(Some(4 * MIB as u64)), t0);
        assert_eq!(l.admit(MIB, t0), Some(Duration::from_millis(250)));
        // Written at once after the wait: due 250 ms after the first.
        let t1 = t0 + Duration::from_millis(250);
        assert_eq!(l.admit(MIB, t1), Some(Duration::from_millis(250)));
        assert_eq!(l.next_send, t0 + Duration::from_millis(500));
        // Written early (no wait was honoured): the debt adds up.
        assert_eq!(l.admit(MIB, t1), Some(Duration::from_millis(500)));
        assert_eq!(l.next_send, t0 + Duration::from_millis(750));
        // An empty record (nothing to flush) waits for what is still in the bucket.
        assert_eq!(l.admit(0, t1), Some(Duration::from_millis(500)));
    }

    #[test]
    fn an_idle_link_does_not_bank_credit() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(cap(Some(4 * MIB as u64)), t0);
        assert_eq!(l.admit(MIB, t0), Some(Duration::from_millis(250)));
        // Ten seconds later, the bucket is empty: this record drains from now, not from the
        // old due time.
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(l.admit(MIB, t1), Some(Duration::from_millis(250)));
        assert_eq!(l.next_send, t1 + Duration::from_millis(250));
        // A record that drained by the time it is written (empty at its due time): no wait.
        let t2 = l.next_send;
        assert_eq!(l.admit(0, t2), None);
    }
}
