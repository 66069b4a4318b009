//! Fault injection for the integration tests, read from `SHRINK_TEST_*` environment variables
//! and the `set-peer-corrupt` API command. Compiled in only with the `test-hooks` cargo
//! feature, which `make test` enables and release builds do not: without it every hook is off,
//! and a `SHRINK_TEST_*` variable that is set anyway is reported as ignored, so a test run on the
//! wrong build fails saying why.

use std::time::Duration;

/// Whether this build has the hooks.
pub const ENABLED: bool = cfg!(feature = "test-hooks");

/// The variable's value, when the hooks are built in; otherwise `None`, with a warning if it is
/// set.
fn var(name: &str) -> Option<String> {
    let v = std::env::var(name).ok()?;
    if !ENABLED {
        tracing::warn!("{name} is set but this shrink-vmm was built without the test-hooks feature: ignored");
        return None;
    }
    Some(v)
}

/// `SHRINK_TEST_CORRUPT_PEER=NAME[,NAME…]|*`: the peer server of VM `name` corrupts what it serves.
pub fn corrupt_peer(name: &str) -> bool {
    var("SHRINK_TEST_CORRUPT_PEER").is_some_and(|v| v == "*" || v.split(',').any(|n| n == name))
}

/// `SHRINK_TEST_STALL_BEFORE_VERDICT_MS=N`: the destination holds its verdict this long after
/// everything arrived (so a test can kill it while the source waits paused).
pub fn stall_before_verdict() -> Option<Duration> {
    var("SHRINK_TEST_STALL_BEFORE_VERDICT_MS").and_then(|v| v.parse().ok()).map(Duration::from_millis)
}

/// `SHRINK_TEST_NO_PULL`: the destination never pulls from the source (to see a migration fail
/// when every other source of content is down).
pub fn no_pull() -> bool {
    var("SHRINK_TEST_NO_PULL").is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_hooks_are_off() {
        // The variables are not set in unit tests.
        assert!(!corrupt_peer("vm0"));
        assert_eq!(stall_before_verdict(), None);
        assert!(!no_pull());
    }
}
