//! How `shrink-migrate` shows running migrations to a person: progress bars on a terminal,
//! otherwise (a log file, a pipe, a service manager) one line per VM every
//! [`LINE_INTERVAL`], and in both a stream whose bytes have not moved for [`STALL_AFTER`]
//! marked as stalled, so that a stuck move can be diagnosed from the output alone.
//!
//! Pure: the caller passes the clock and what the VMMs answered.

use std::time::{Duration, Instant};

/// How often a line per VM is printed without a terminal.
pub const LINE_INTERVAL: Duration = Duration::from_secs(5);

/// A stream that sent nothing for this long is shown as stalled.
pub const STALL_AFTER: Duration = Duration::from_secs(10);

/// What the progress display is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Progress bars (standard error is a terminal).
    Bars,
    /// A line per VM every [`LINE_INTERVAL`] and one when it ends (standard error is not a
    /// terminal).
    Lines,
    /// Nothing.
    Hidden,
}

impl Mode {
    /// Bars on a terminal, lines elsewhere, nothing if the user asked for `quiet`.
    pub fn choose(terminal: bool, quiet: bool) -> Mode {
        match (quiet, terminal) {
            (true, _) => Mode::Hidden,
            (false, true) => Mode::Bars,
            (false, false) => Mode::Lines,
        }
    }
}

/// Follows one stream's sent bytes and tells for how long they have not moved.
#[derive(Debug, Clone)]
pub struct Stall {
    bytes: u64,
    since: Instant,
}

impl Stall {
    /// A stream that starts at `now`.
    pub fn new(now: Instant) -> Stall {
        Stall { bytes: 0, since: now }
    }

    /// The stream has sent `bytes` in all by `now`: how long it has been stalled, if it has
    /// sent nothing for at least [`STALL_AFTER`].
    pub fn observe(&mut self, bytes: u64, now: Instant) -> Option<Duration> {
        if bytes != self.bytes {
            self.bytes = bytes;
            self.since = now;
            return None;
        }
        let still = now.saturating_duration_since(self.since);
        (still >= STALL_AFTER).then_some(still)
    }
}

/// When the next round of lines is due.
#[derive(Debug, Clone)]
pub struct Lines {
    next: Instant,
}

impl Lines {
    /// The first round is due [`LINE_INTERVAL`] after `now`.
    pub fn new(now: Instant) -> Lines {
        Lines { next: now + LINE_INTERVAL }
    }

    /// Whether a round is due at `now` (then the next one is an interval later).
    pub fn due(&mut self, now: Instant) -> bool {
        if now < self.next {
            return false;
        }
        while self.next <= now {
            self.next += LINE_INTERVAL;
        }
        true
    }
}

/// What a running migration reports, for [`describe`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Snapshot<'a> {
    /// `setup`, `active`, ...
    pub status: &'a str,
    /// Dirty passes made.
    pub pass: u64,
    /// Bytes on the stream so far (memory and disks).
    pub sent: u64,
    /// Guest memory, bytes.
    pub total: u64,
    /// Guest memory still to send in this pass, bytes.
    pub remaining: u64,
    /// Chunks sent as digests so far.
    pub deduplicated: u64,
}

impl<'a> Snapshot<'a> {
    /// What a source VMM's `query-migrate` says (memory and disks together).
    pub fn of(info: &'a crate::precopy::MigrationInfo) -> Snapshot<'a> {
        let ram = &info.ram;
        Snapshot {
            status: info.status.as_str(),
            pass: ram.dirty_sync_count,
            sent: ram.transferred + info.disk.as_ref().map_or(0, |d| d.transferred),
            total: ram.total,
            remaining: ram.remaining,
            deduplicated: ram.deduplicated,
        }
    }
}

/// One VM's progress as a line of text, with how long it has been stalled if it is.
pub fn describe(s: &Snapshot, stalled: Option<Duration>) -> String {
    let done = (s.total.saturating_sub(s.remaining) * 100).checked_div(s.total).unwrap_or(0);
    let mut line = format!(
        "{} pass {}, {:.1} MB sent, {done} % of memory, {} deduplicated",
        s.status,
        s.pass,
        s.sent as f64 / 1e6,
        s.deduplicated
    );
    if let Some(d) = stalled {
        line += &format!(", STALLED: nothing sent for {} s", d.as_secs());
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_on_a_terminal_lines_elsewhere_nothing_when_quiet() {
        assert_eq!(Mode::choose(true, false), Mode::Bars);
        assert_eq!(Mode::choose(false, false), Mode::Lines);
        assert_eq!(Mode::choose(true, true), Mode::Hidden);
        assert_eq!(Mode::choose(false, true), Mode::Hidden);
    }

    #[test]
    fn a_stream_is_stalled_once_its_bytes_stop_moving_for_the_stall_time() {
        let t0 = Instant::now();
        let mut s = Stall::new(t0);
        assert_eq!(s.observe(100, t0 + Duration::from_secs(1)), None);
        // Unchanged, but not for long enough.
        assert_eq!(s.observe(100, t0 + Duration::from_secs(1) + STALL_AFTER - Duration::from_millis(1)), None);
        let at = t0 + Duration::from_secs(1) + STALL_AFTER;
        assert_eq!(s.observe(100, at), Some(STALL_AFTER));
        assert_eq!(s.observe(100, at + Duration::from_secs(5)), Some(STALL_AFTER + Duration::from_secs(5)));
        // Moving again: not stalled, and the clock restarts.
        assert_eq!(s.observe(101, at + Duration::from_secs(6)), None);
        assert_eq!(s.observe(101, at + Duration::from_secs(7)), None);
        // A stream that never sends anything stalls from its start.
        let mut silent = Stall::new(t0);
        assert_eq!(silent.observe(0, t0 + STALL_AFTER), Some(STALL_AFTER));
    }

    #[test]
    fn lines_come_every_interval_without_bursts_after_a_late_poll() {
        let t0 = Instant::now();
        let mut l = Lines::new(t0);
        assert!(!l.due(t0));
        assert!(!l.due(t0 + LINE_INTERVAL - Duration::from_millis(1)));
        assert!(l.due(t0 + LINE_INTERVAL));
        assert!(!l.due(t0 + LINE_INTERVAL + Duration::from_millis(1)));
        // A poll three intervals late gives one round, not three.
        assert!(l.due(t0 + LINE_INTERVAL * 5));
        assert!(!l.due(t0 + LINE_INTERVAL * 5 + Duration::from_millis(1)));
        assert!(l.due(t0 + LINE_INTERVAL * 6));
    }

    #[test]
    fn a_line_says_where_the_move_is_and_whether_it_is_stalled() {
        let s =
            Snapshot { status: "active", pass: 2, sent: 45_300_000, total: 1000, remaining: 380, deduplicated: 1234 };
        assert_eq!(describe(&s, None), "active pass 2, 45.3 MB sent, 62 % of memory, 1234 deduplicated");
        assert_eq!(
            describe(&s, Some(Duration::from_millis(12_500))),
            "active pass 2, 45.3 MB sent, 62 % of memory, 1234 deduplicated, STALLED: nothing sent for 12 s"
        );
        assert!(describe(&Snapshot { status: "setup", ..Default::default() }, None).contains("0 % of memory"));
    }
}
