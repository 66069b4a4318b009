//! Shrinker's decisions at the destination, as pure functions (no I/O, no clock of their own):
//! what the site index must learn when a chunk changes ([`index_changes`], [`split_updates`]),
//! which holder of a digest-only chunk to ask, in which round ([`first_holders`],
//! [`need_all_holders`], [`untried`], [`next_round`], at most [`HOLDER_ROUNDS`] rounds), whether
//! a peer's answer is the chunk asked for ([`is_chunk`]), and how long the destination waits for
//! its site before it pulls what is missing from the source ([`site_wait`]).
//!
//! [`super::site::SiteIndex`] and `precopy/sink.rs` (`wait_for_site`) do the I/O around them.

use std::collections::HashMap;
use std::time::Duration;

use indexd::hash::{self, Algo};

use super::keys::index_key;

/// How many rounds of holders a digest-only chunk gets per [`super::site::SiteIndex::resolve`]:
/// a random holder, then (after a failure, or when the random one was this VMM) the others, one
/// a round.
pub(crate) const HOLDER_ROUNDS: usize = 3;

/// What the site index must learn when a chunk changes: `old` is the digest it held before and
/// whether no chunk of this guest holds that digest any more, `new` what it holds now (`None`:
/// content that is not indexed). Per key, whether this VMM holds it, in the order they apply
/// (at most two; no allocation but the keys').
pub(crate) fn index_changes(old: Option<(&[u8], bool)>, new: Option<&[u8]>) -> impl Iterator<Item = (Vec<u8>, bool)> {
    let register = new.filter(|&d| old.is_none_or(|(o, _)| o != d)).map(|d| (index_key(d), true));
    let unregister = old.filter(|&(_, gone)| gone).map(|(od, _)| (index_key(od), false));
    [register, unregister].into_iter().flatten()
}

/// Pending index updates as the `SADD` and the `SREM` lists of `member`.
pub(crate) type Updates = (Vec<(Vec<u8>, String)>, Vec<(Vec<u8>, String)>);

/// Splits pending index updates (per key, whether `member` holds it) into `SADD`s and `SREM`s.
pub(crate) fn split_updates(pending: impl IntoIterator<Item = (Vec<u8>, bool)>, member: &str) -> Updates {
    let (mut sadd, mut srem) = (Vec::new(), Vec::new());
    for (k, holds) in pending {
        if holds {
            sadd.push((k, member.to_owned()));
        } else {
            srem.push((k, member.to_owned()));
        }
    }
    (sadd, srem)
}

/// The first holder to ask for each digest: the random one `SRANDMEMBER` named, unless it is
/// this VMM (`me`) or there is none.
pub(crate) fn first_holders(random: Vec<Option<String>>, me: &str) -> Vec<Vec<String>> {
    random.into_iter().map(|h| h.filter(|m| m != me).into_iter().collect()).collect()
}

/// The digests (by position) that need every holder listed: not resolved, nobody left to ask.
pub(crate) fn need_all_holders(candidates: &[Vec<String>], done: &[bool]) -> Vec<usize> {
    (0..candidates.len()).filter(|&i| !done[i] && candidates[i].is_empty()).collect()
}

/// The holders still worth asking among `members`: neither this VMM nor one asked already.
pub(crate) fn untried(members: Vec<String>, me: &str, tried: &[String]) -> Vec<String> {
    members.into_iter().filter(|m| m != me && !tried.contains(m)).collect()
}

/// One round: every unresolved digest with a candidate left goes to its next candidate (which
/// is then tried); returns the digests (by position) to ask each holder for.
pub(crate) fn next_round(
    candidates: &mut [Vec<String>],
    done: &[bool],
    tried: &mut [Vec<String>],
) -> HashMap<String, Vec<usize>> {
    let mut by_peer: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, c) in candidates.iter_mut().enumerate() {
        if !done[i] && !c.is_empty() {
            let peer = c.remove(0);
            tried[i].push(peer.clone());
            by_peer.entry(peer).or_default().push(i);
        }
    }
    by_peer
}

/// Whether a peer's answer is the chunk asked for: one chunk long, hashing to its digest.
pub(crate) fn is_chunk(algo: Algo, chunk: usize, bytes: &[u8], digest: &[u8]) -> bool {
    bytes.len() == chunk && hash::verify(algo, bytes, digest)
}

/// What the destination does after another look at its waiting list (digest-only chunks whose
/// content was not found at the site yet), see [`site_wait`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SiteWait {
    /// Nothing waits any more: stop waiting, nothing to pull.
    Resolved,
    /// Stop waiting: what still waits is pulled from the source (when pulling is on).
    Pull,
    /// The site delivered some since the last look: restart the clock, look again shortly.
    Progress,
    /// Nothing delivered, but not for long yet: look again shortly.
    Wait,
}

/// The wait for the site, progress-based: after a look that left `pending` chunks waiting,
/// where the last progress left `left` and was `since_progress` ago, with `wait` allowed
/// without progress. A zero `wait` is one look and no waiting (the guest is paused).
pub(crate) fn site_wait(wait: Duration, left: usize, pending: usize, since_progress: Duration) -> SiteWait {
    if pending == 0 {
        SiteWait::Resolved
    } else if wait.is_zero() {
        SiteWait::Pull
    } else if pending < left {
        SiteWait::Progress
    } else if since_progress >= wait {
        SiteWait::Pull
    } else {
        SiteWait::Wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNK: usize = 4096;
    const ALGO: Algo = Algo::Sha256;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    fn key(digest: &[u8]) -> Vec<u8> {
        index_key(digest)
    }

    fn changes(old: Option<(&[u8], bool)>, new: Option<&[u8]>) -> Vec<(Vec<u8>, bool)> {
        index_changes(old, new).collect()
    }

    #[test]
    fn index_changes_register_new_content_and_drop_the_last_copy_of_the_old() {
        let (a, b) = (b"aaaa".as_slice(), b"bbbb".as_slice());
        assert_eq!(changes(None, Some(a)), vec![(key(a), true)], "a chunk written for the first time");
        assert_eq!(changes(Some((a, false)), Some(a)), vec![], "the same content again: nothing to say");
        assert_eq!(
            changes(Some((a, false)), Some(b)),
            vec![(key(b), true)],
            "overwritten, the old content still in another chunk: only the new one is registered"
        );
        assert_eq!(
            changes(Some((a, true)), Some(b)),
            vec![(key(b), true), (key(a), false)],
            "overwritten, the last copy of the old content gone: SADD the new, SREM the old"
        );
        assert_eq!(
            changes(Some((a, true)), None),
            vec![(key(a), false)],
            "the last copy overwritten with content that is not indexed (a uniform chunk)"
        );
        assert_eq!(changes(Some((a, false)), None), vec![], "another copy is left");
        assert_eq!(changes(None, None), vec![], "uniform over never-written");
    }

    #[test]
    fn pending_updates_split_into_sadd_and_srem_of_this_member() {
        let (sadd, srem) = split_updates(vec![(b"k1".to_vec(), true), (b"k2".to_vec(), false)], "10.0.0.1:7100");
        assert_eq!(sadd, vec![(b"k1".to_vec(), "10.0.0.1:7100".to_owned())]);
        assert_eq!(srem, vec![(b"k2".to_vec(), "10.0.0.1:7100".to_owned())]);
        let (sadd, srem) = split_updates(Vec::new(), "m");
        assert!(sadd.is_empty() && srem.is_empty());
    }

    #[test]
    fn the_random_holder_is_asked_first_unless_it_is_this_vmm() {
        let first = first_holders(vec![Some("p1".into()), Some("me".into()), None], "me");
        assert_eq!(first, vec![s(&["p1"]), vec![], vec![]]);
        // Without a candidate and unresolved: every holder is listed; resolved ones are not.
        assert_eq!(need_all_holders(&first, &[false, false, true]), vec![1]);
        assert_eq!(need_all_holders(&first, &[false, false, false]), vec![1, 2]);
    }

    #[test]
    fn later_rounds_ask_the_holders_not_tried_yet_never_this_vmm() {
        let members = s(&["p1", "me", "p2", "p3"]);
        assert_eq!(untried(members.clone(), "me", &s(&["p1"])), s(&["p2", "p3"]));
        assert_eq!(untried(members, "me", &s(&["p1", "p2", "p3"])), Vec::<String>::new());
    }

    #[test]
    fn a_round_sends_each_open_digest_to_its_next_candidate_grouped_by_holder() {
        let mut candidates = vec![s(&["p1", "p2"]), s(&["p1"]), s(&["p2"]), vec![], s(&["p1"])];
        let done = [false, false, false, false, true];
        let mut tried = vec![Vec::new(); 5];
        let round = next_round(&mut candidates, &done, &mut tried);
        let mut got: Vec<(String, Vec<usize>)> = round.into_iter().collect();
        got.sort();
        assert_eq!(got, vec![("p1".to_owned(), vec![0, 1]), ("p2".to_owned(), vec![2])]);
        assert_eq!(tried, vec![s(&["p1"]), s(&["p1"]), s(&["p2"]), vec![], vec![]]);
        // What is left for the next round: p2 for digest 0; nobody for 1, 2, 3.
        assert_eq!(candidates[0], s(&["p2"]));
        assert_eq!(need_all_holders(&candidates, &done), vec![1, 2, 3]);
        // Digest 0 failed at p1: the next round asks p2, once.
        let round = next_round(&mut candidates, &[false, true, true, true, true], &mut tried);
        assert_eq!(round.into_iter().collect::<Vec<_>>(), vec![("p2".to_owned(), vec![0])]);
        assert_eq!(tried[0], s(&["p1", "p2"]));
        // Nobody left anywhere: no round at all.
        assert!(next_round(&mut candidates, &done, &mut tried).is_empty());
    }

    #[test]
    fn only_a_chunk_of_the_right_length_and_digest_is_accepted() {
        let data = vec![7u8; CHUNK];
        let d = hash::digest(ALGO, &data);
        assert!(is_chunk(ALGO, CHUNK, &data, &d));
        let mut flipped = data.clone();
        flipped[0] ^= 0xff;
        assert!(!is_chunk(ALGO, CHUNK, &flipped, &d), "corrupt answer");
        assert!(!is_chunk(ALGO, CHUNK, &data[..CHUNK - 1], &hash::digest(ALGO, &data[..CHUNK - 1])), "short");
    }

    #[test]
    fn the_destination_waits_while_the_site_makes_progress_and_pulls_what_stalls() {
        let ms = Duration::from_millis;
        let wait = ms(500);
        // Everything found: nothing to wait for, nothing to pull (also with no wait at all).
        assert_eq!(site_wait(wait, 10, 0, ms(0)), SiteWait::Resolved);
        assert_eq!(site_wait(Duration::ZERO, 10, 0, ms(0)), SiteWait::Resolved);
        // No wait allowed (the guest is paused): one look, then pull, even with progress.
        assert_eq!(site_wait(Duration::ZERO, 10, 10, ms(0)), SiteWait::Pull);
        assert_eq!(site_wait(Duration::ZERO, 10, 3, ms(0)), SiteWait::Pull);
        // Some delivered since the last progress: the clock restarts, however long it has been.
        assert_eq!(site_wait(wait, 10, 9, ms(0)), SiteWait::Progress);
        assert_eq!(site_wait(wait, 10, 9, ms(10_000)), SiteWait::Progress);
        // Nothing delivered: wait up to `wait`, then pull.
        assert_eq!(site_wait(wait, 10, 10, ms(499)), SiteWait::Wait);
        assert_eq!(site_wait(wait, 10, 10, ms(500)), SiteWait::Pull, "at the limit");
        assert_eq!(site_wait(wait, 10, 10, ms(501)), SiteWait::Pull);
    }
}
