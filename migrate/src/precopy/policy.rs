//! When the source stops copying and switches over, and what it does to a guest that does not
//! let it: QEMU's convergence policy as pure functions of a pass's numbers. The sender
//! ([`super::Sender`]) measures (bytes sent, time taken, bytes dirtied meanwhile) and acts
//! (sync, pause, throttle, give up); everything it decides in between is here.
//!
//! After each pass, in this order:
//!
//! 1. [`bandwidth`]: the link's rate over every pass so far, capped by `max_bandwidth`, and
//!    [`switch_over_threshold`]: the bytes it carries within the downtime limit;
//! 2. [`after_pass`]: switch over when the bytes still dirty fit under the threshold
//!    ([`can_switch_over`]) — but the first time, let the destination catch up first
//!    ([`Next::Sync`]) and decide again on a fresh dirty log;
//! 3. otherwise, with auto-converge, [`auto_converge`]: a strike for a pass that left more than
//!    half of what it sent dirty again, and a throttle step every second strike;
//! 4. [`out_of_iterations`]: give up after `max_iterations` passes ([`no_convergence`]).

use std::num::NonZeroU64;
use std::time::Duration;

use super::MigrationError;

/// The link's bandwidth, bytes/s: the bytes of every pass so far over the time they took (at
/// least 1 ms). A short pass alone mostly measures how fast socket buffers fill, and would
/// switch over too early. A `cap` ([`super::Params::bandwidth_cap`]) caps it: the link never
/// carries more.
pub(super) fn bandwidth(pass_bytes: u64, pass_time: Duration, cap: Option<NonZeroU64>) -> f64 {
    let measured = pass_bytes as f64 / pass_time.as_secs_f64().max(1e-3);
    match cap {
        Some(cap) => measured.min(cap.get() as f64),
        None => measured,
    }
}

/// The most bytes that may still be dirty at switch-over: what `bandwidth` carries within
/// `downtime_limit`.
pub(super) fn switch_over_threshold(bandwidth: f64, downtime_limit: Duration) -> f64 {
    bandwidth * downtime_limit.as_secs_f64()
}

/// QEMU's switch-over rule: the bytes still dirty can be sent within the downtime limit.
pub(super) fn can_switch_over(dirty_bytes: u64, threshold: f64) -> bool {
    dirty_bytes as f64 <= threshold
}

/// The downtime, seconds, if the guest paused now with `dirty_bytes` still to send (0 while
/// nothing is measured).
pub(super) fn expected_downtime(dirty_bytes: u64, bandwidth: f64) -> f64 {
    if bandwidth > 0.0 {
        dirty_bytes as f64 / bandwidth
    } else {
        0.0
    }
}

/// What the sender does after a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Next {
    /// Pause the guest and send the rest.
    SwitchOver,
    /// The source is ready; is the destination? Wait until it has installed what was sent (the
    /// guest still runs), then decide again on a fresh dirty log: switch over if the rule still
    /// holds, else go on with the next pass.
    Sync,
    /// Another pass (after [`auto_converge`] and [`out_of_iterations`]).
    Continue,
}

/// The decision after a pass that left `dirty_bytes` dirty, against `threshold`
/// ([`switch_over_threshold`]), once the destination was `synced` (at most one sync per
/// migration).
pub(super) fn after_pass(dirty_bytes: u64, threshold: f64, synced: bool) -> Next {
    match (can_switch_over(dirty_bytes, threshold), synced) {
        (false, _) => Next::Continue,
        (true, true) => Next::SwitchOver,
        (true, false) => Next::Sync,
    }
}

/// Auto-converge: the vCPU throttle, and the strikes towards its next step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Throttle {
    /// Percent of time the vCPUs are kept off the CPU.
    pub(super) percent: u8,
    /// Passes that dirtied too much since the last step.
    pub(super) strikes: u32,
}

/// Whether a pass that sent `sent` bytes left more than half of that dirty again (a strike).
pub(super) fn dirtying_too_fast(dirty_bytes: u64, sent: u64) -> bool {
    dirty_bytes as f64 > 0.5 * sent as f64
}

/// QEMU's throttle steps: 20 %, then +10 % per step, at most 99 %.
pub(super) fn next_throttle(percent: u8) -> u8 {
    if percent == 0 {
        20
    } else {
        (percent + 10).min(99)
    }
}

/// Auto-converge after a pass that sent `sent` bytes and left `dirty_bytes` dirty: the new
/// state, and `Some(percent)` when the throttle steps (the sender applies it, also when it
/// stays at 99 %). As QEMU's: two strikes make a step, and a calm pass in between does not
/// reset the count.
pub(super) fn auto_converge(t: Throttle, dirty_bytes: u64, sent: u64) -> (Throttle, Option<u8>) {
    if !dirtying_too_fast(dirty_bytes, sent) {
        return (t, None);
    }
    let strikes = t.strikes + 1;
    if strikes >= 2 {
        let percent = next_throttle(t.percent);
        (Throttle { percent, strikes: 0 }, Some(percent))
    } else {
        (Throttle { strikes, ..t }, None)
    }
}

/// Whether `pass` is the last one `max_iterations` allows without converging.
pub(super) fn out_of_iterations(pass: u32, max_iterations: Option<u32>) -> bool {
    max_iterations.is_some_and(|max| pass >= max)
}

/// The error of giving up after `pass` passes, the last one leaving `dirty_bytes` dirty in
/// `period_secs` against a link of `bandwidth` bytes/s.
pub(super) fn no_convergence(pass: u32, dirty_bytes: u64, period_secs: f64, bandwidth: f64) -> MigrationError {
    MigrationError::NoConvergence {
        iterations: pass,
        dirty_mbps: dirty_bytes as f64 / period_secs / 1e6,
        link_mbps: bandwidth / 1e6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn bandwidth_is_measured_over_all_passes_and_capped() {
        assert_eq!(bandwidth(10_000_000, Duration::from_secs(1), None), 1e7);
        assert_eq!(bandwidth(10_000_000, Duration::from_secs(2), None), 5e6);
        // Over all passes: 10 MB in 3.999 s, then 2 MB in 1 ms (a pass that only filled socket
        // buffers) is 3 MB/s, not 2 GB/s.
        assert_eq!(bandwidth(10_000_000 + 2_000_000, Duration::from_millis(3999) + MS, None), 3e6);
        let cap = |max| super::super::Params { max_bandwidth: Some(max), ..Default::default() }.bandwidth_cap();
        assert_eq!(bandwidth(10_000_000, Duration::from_secs(1), cap(4_000_000)), 4e6);
        assert_eq!(bandwidth(10_000_000, Duration::from_secs(1), cap(40_000_000)), 1e7, "a cap is not a rate");
        assert_eq!(bandwidth(10_000_000, Duration::from_secs(1), cap(0)), 1e7, "0: no cap");
        // Time is counted as at least 1 ms.
        assert_eq!(bandwidth(1000, Duration::ZERO, None), 1e6);
        assert_eq!(bandwidth(1000, Duration::from_micros(10), None), 1e6);
        assert_eq!(bandwidth(0, Duration::ZERO, None), 0.0);
    }

    #[test]
    fn switch_over_when_what_is_dirty_fits_in_the_downtime_limit() {
        let threshold = switch_over_threshold(1e8, Duration::from_millis(300));
        assert_eq!(threshold, 3e7);
        assert!(can_switch_over(30_000_000, threshold), "at the limit");
        assert!(!can_switch_over(30_000_001, threshold));
        assert!(can_switch_over(0, switch_over_threshold(0.0, Duration::from_millis(300))));
        assert!(!can_switch_over(4096, switch_over_threshold(1e9, Duration::from_nanos(1))));
        assert_eq!(expected_downtime(5_000_000, 1e8), 0.05);
        assert_eq!(expected_downtime(5_000_000, 0.0), 0.0);
    }

    #[test]
    fn the_first_time_the_rule_holds_the_destination_catches_up_first() {
        assert_eq!(after_pass(10, 100.0, false), Next::Sync);
        assert_eq!(after_pass(10, 100.0, true), Next::SwitchOver);
        assert_eq!(after_pass(100, 100.0, true), Next::SwitchOver);
        assert_eq!(after_pass(101, 100.0, false), Next::Continue);
        assert_eq!(after_pass(101, 100.0, true), Next::Continue);
    }

    #[test]
    fn auto_converge_steps_every_second_strike() {
        let busy = (900, 1000); // (dirty, sent): more than half dirty again
        let mut t = Throttle::default();
        let mut applied = Vec::new();
        for pass in 1..=6 {
            let (next, step) = auto_converge(t, busy.0, busy.1);
            t = next;
            applied.push((pass, step));
        }
        assert_eq!(
            applied,
            [(1, None), (2, Some(20)), (3, None), (4, Some(30)), (5, None), (6, Some(40))],
            "20 % after pass 2, +10 % every second pass"
        );
        assert_eq!(t, Throttle { percent: 40, strikes: 0 });
    }

    #[test]
    fn a_calm_pass_is_no_strike_and_does_not_reset_the_count() {
        assert!(!dirtying_too_fast(500, 1000), "exactly half is no strike");
        assert!(dirtying_too_fast(501, 1000));
        let (t, step) = auto_converge(Throttle::default(), 600, 1000);
        assert_eq!((t, step), (Throttle { percent: 0, strikes: 1 }, None));
        let (t, step) = auto_converge(t, 100, 1000);
        assert_eq!((t, step), (Throttle { percent: 0, strikes: 1 }, None));
        let (t, step) = auto_converge(t, 600, 1000);
        assert_eq!((t, step), (Throttle { percent: 20, strikes: 0 }, Some(20)));
    }

    #[test]
    fn the_throttle_stops_at_99_percent_and_is_still_applied() {
        let steps: Vec<u8> = std::iter::successors(Some(0u8), |&p| Some(next_throttle(p))).take(12).collect();
        assert_eq!(steps, [0, 20, 30, 40, 50, 60, 70, 80, 90, 99, 99, 99]);
        let (t, step) = auto_converge(Throttle { percent: 99, strikes: 1 }, 2, 2);
        assert_eq!((t, step), (Throttle { percent: 99, strikes: 0 }, Some(99)));
    }

    #[test]
    fn max_iterations_gives_up_with_the_rates_of_the_last_pass() {
        assert!(!out_of_iterations(1_000_000, None));
        assert!(!out_of_iterations(3, Some(4)));
        assert!(out_of_iterations(4, Some(4)));
        assert!(out_of_iterations(5, Some(4)));
        let e = no_convergence(4, 2_000_000, 0.5, 1e7);
        let MigrationError::NoConvergence { iterations, dirty_mbps, link_mbps } = e else { panic!("{e:?}") };
        assert_eq!((iterations, dirty_mbps, link_mbps), (4, 4.0, 10.0));
        assert_eq!(e.to_string(), "did not converge after 4 iterations: 4.0 MB/s dirtied against 10.0 MB/s sent");
    }
}
