//! Fault injection for the integration tests, read from `SHRINK_TEST_*` environment variables
//! (`SHRINK_TEST_STALL_BEFORE_VERDICT_MS`, `SHRINK_TEST_NO_PULL`) and the `set-peer-corrupt` API
//! command. Compiled in only with the `test-hooks` cargo
//! feature, which `make test` enables and release builds do not: without it every hook is off,
//! and a `SHRINK_TEST_*` variable that is set anyway is reported as ignored, so a test run on the
//! wrong build fails saying why.

use std::time::Duration;

/// Whether this build has the hooks.
pub const ENABLED: bool = cfg!(feature = "test-hooks");

/// The variable's value, when the hooks are built in; otherwise `None`, with a warning if it is
/// set.
fn var(name: &str) -> Option<String> {
    gate(name, std::env::var(name).ok(), ENABLED)
}

/// `value` of variable `name` if the hooks are `enabled`; a set variable is reported otherwise.
fn gate(name: &str, value: Option<String>, enabled: bool) -> Option<String> {
    let v = value?;
    if !enabled {
        tracing::warn!("{name} is set but this shrink-vmm was built without the test-hooks feature: ignored");
        return None;
    }
    Some(v)
}

/// `SHRINK_TEST_STALL_BEFORE_VERDICT_MS=N`: the destination holds its verdict this long after
/// everything arrived (so a test can kill it while the source waits paused).
pub fn stall_before_verdict() -> Option<Duration> {
    var("SHRINK_TEST_STALL_BEFORE_VERDICT_MS").and_then(|v| milliseconds(&v))
}

fn milliseconds(v: &str) -> Option<Duration> {
    v.trim().parse().ok().map(Duration::from_millis)
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
    fn a_build_without_the_hooks_ignores_the_variables() {
        assert_eq!(gate("SHRINK_TEST_NO_PULL", Some("1".into()), false), None);
        assert_eq!(gate("SHRINK_TEST_NO_PULL", Some("1".into()), true), Some("1".into()));
        assert_eq!(gate("SHRINK_TEST_NO_PULL", None, true), None);
    }

    #[test]
    fn the_stall_is_given_in_milliseconds() {
        assert_eq!(milliseconds("250"), Some(Duration::from_millis(250)));
        assert_eq!(milliseconds(" 40 "), Some(Duration::from_millis(40)));
        assert_eq!(milliseconds("soon"), None);
    }
}
