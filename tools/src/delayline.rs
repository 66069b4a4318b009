//! A WAN delay line in user space: `netem` is not in this kernel, so the testbed's WAN gets its
//! propagation delay from `shrink-testbed delay-line`, which joins the two border routers.
//!
//! ```text
//!  <n>-art wan0 ══ tbf/htb ══ wa  <n>-wan  wb ══ tbf/htb ══ wan0 <n>-brt
//!                              └─ delay line ─┘
//! ```
//!
//! The routers keep their `tbf` rate and `htb` priorities on `wan0` (egress), so frames enter
//! the line already paced at the link rate, vnetd's tunnel first; the line holds each frame for
//! the one-way delay and sends it on out of the other side. Two `AF_PACKET` sockets, one thread
//! per direction. Memory is bounded: a direction holds at most `limit_bytes` (beyond that a
//! frame is dropped, as a full router queue would); the testbed sizes it at twice the link
//! rate × the delay.
//!
//! [`DelayQueue`] is the pure part (FIFO: one delay for every frame keeps due times in order).

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Errors of the delay line.
#[derive(Debug, thiserror::Error)]
pub enum DelayLineError {
    /// A socket call failed.
    #[error("{what} on {iface}: {source}")]
    Io {
        /// The call.
        what: &'static str,
        /// The interface.
        iface: String,
        /// Cause.
        source: std::io::Error,
    },
    /// An interface name that cannot be one.
    #[error("interface name '{0}' is invalid")]
    BadName(String),
}

/// Frames held for a fixed delay, in arrival order, within a byte limit.
#[derive(Debug)]
pub struct DelayQueue {
    delay: Duration,
    limit_bytes: usize,
    queued_bytes: usize,
    frames: VecDeque<(Instant, Vec<u8>)>,
}

impl DelayQueue {
    /// An empty queue holding each frame for `delay`, at most `limit_bytes` at a time.
    pub fn new(delay: Duration, limit_bytes: usize) -> DelayQueue {
        DelayQueue { delay, limit_bytes, queued_bytes: 0, frames: VecDeque::new() }
    }

    /// Queues `frame`, arrived at `now`, until `now + delay`; false (the frame is dropped) if it
    /// does not fit.
    pub fn push(&mut self, now: Instant, frame: Vec<u8>) -> bool {
        if self.queued_bytes + frame.len() > self.limit_bytes {
            return false;
        }
        self.queued_bytes += frame.len();
        self.frames.push_back((now + self.delay, frame));
        true
    }

    /// When the next frame is due, if any is queued.
    pub fn next_due(&self) -> Option<Instant> {
        self.frames.front().map(|f| f.0)
    }

    /// The oldest frame, if it is due at `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<Vec<u8>> {
        if self.next_due()? > now {
            return None;
        }
        let (_, frame) = self.frames.pop_front()?;
        self.queued_bytes -= frame.len();
        Some(frame)
    }

    /// Bytes queued now.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }
}

/// Counters of one direction.
#[derive(Debug, Default)]
pub struct Counters {
    /// Frames sent on after their delay.
    pub forwarded: AtomicU64,
    /// Frames dropped (queue full, or the send failed).
    pub dropped: AtomicU64,
}

/// A raw socket on interface `iface`, receiving every frame but the ones it sends itself.
fn packet_socket(iface: &str) -> Result<OwnedFd, DelayLineError> {
    let io = |what| {
        let iface = iface.to_owned();
        move |source| DelayLineError::Io { what, iface, source }
    };
    let name = std::ffi::CString::new(iface).map_err(|_| DelayLineError::BadName(iface.to_owned()))?;
    // SAFETY: `name` is a NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(io("if_nametoindex")(std::io::Error::last_os_error()));
    }
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2); the result is checked before it is owned.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(proto)) };
    if raw < 0 {
        return Err(io("socket(AF_PACKET)")(std::io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid start.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = index as i32;
    // SAFETY: `addr` is a valid sockaddr_ll of the size given.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io("bind")(std::io::Error::last_os_error()));
    }
    set_option(&fd, libc::PACKET_IGNORE_OUTGOING, &1 as &libc::c_int).map_err(io("PACKET_IGNORE_OUTGOING"))?;
    // Frames for the other router's MAC must be seen too.
    // SAFETY: packet_mreq is plain data; all-zero is a valid start.
    let mut mreq: libc::packet_mreq = unsafe { std::mem::zeroed() };
    mreq.mr_ifindex = index as i32;
    mreq.mr_type = libc::PACKET_MR_PROMISC as u16;
    set_option(&fd, libc::PACKET_ADD_MEMBERSHIP, &mreq).map_err(io("PACKET_ADD_MEMBERSHIP"))?;
    Ok(fd)
}

/// `setsockopt(SOL_PACKET, option, value)`.
fn set_option<T>(fd: &OwnedFd, option: libc::c_int, value: &T) -> std::io::Result<()> {
    // SAFETY: `value` points to a T of the size given, alive for the call.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            option,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Waits until `fd` is readable or `timeout` has passed (nanosecond resolution).
fn wait_readable(fd: &OwnedFd, timeout: Option<Duration>) {
    let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let ts = timeout.map(|t| libc::timespec { tv_sec: t.as_secs() as libc::time_t, tv_nsec: t.subsec_nanos().into() });
    let tsp = ts.as_ref().map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: one valid pollfd, a timespec that outlives the call (or null), no signal mask.
    unsafe { libc::ppoll(&mut pfd, 1, tsp, std::ptr::null()) };
}

/// One direction: frames read on `from` go out on `to` after `delay`.
fn forward(from: &OwnedFd, to: &OwnedFd, delay: Duration, limit_bytes: usize, counters: &Counters) -> ! {
    let mut q = DelayQueue::new(delay, limit_bytes);
    let mut buf = vec![0u8; 65536];
    loop {
        let now = Instant::now();
        wait_readable(from, q.next_due().map(|d| d.saturating_duration_since(now)));
        let now = Instant::now();
        loop {
            // SAFETY: `buf` is writable for its length.
            let n = unsafe { libc::recv(from.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
            if n <= 0 {
                break;
            }
            if !q.push(now, buf[..n as usize].to_vec()) {
                counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        let now = Instant::now();
        while let Some(frame) = q.pop_due(now) {
            // SAFETY: `frame` is readable for its length.
            let n = unsafe { libc::send(to.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            let counter = if n == frame.len() as isize { &counters.forwarded } else { &counters.dropped };
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Runs the delay line between interfaces `a` and `b` for good (until killed).
pub fn run(a: &str, b: &str, delay: Duration, limit_bytes: usize) -> Result<(), DelayLineError> {
    // Timers as precise as the kernel allows: the default 50 µs slack would be jitter.
    // SAFETY: prctl(PR_SET_TIMERSLACK) with an integer argument; affects this thread and the
    // threads it creates.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
    let (fa, fb) = (Arc::new(packet_socket(a)?), Arc::new(packet_socket(b)?));
    let (ab, ba) = (Arc::new(Counters::default()), Arc::new(Counters::default()));
    let spawn = |from: Arc<OwnedFd>, to: Arc<OwnedFd>, c: Arc<Counters>, name: String| {
        std::thread::Builder::new()
            .name(name)
            .spawn(move || forward(&from, &to, delay, limit_bytes, &c))
            .map_err(|source| DelayLineError::Io { what: "spawning a thread", iface: a.to_owned(), source })
    };
    spawn(fa.clone(), fb.clone(), ab.clone(), format!("{a}->{b}"))?;
    spawn(fb, fa, ba.clone(), format!("{b}->{a}"))?;
    loop {
        std::thread::sleep(Duration::from_secs(10));
        let l = |c: &Counters| (c.forwarded.load(Ordering::Relaxed), c.dropped.load(Ordering::Relaxed));
        let ((f1, d1), (f2, d2)) = (l(&ab), l(&ba));
        eprintln!("{a}->{b}: {f1} frames, {d1} dropped; {b}->{a}: {f2} frames, {d2} dropped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_leave_in_order_after_the_delay() {
        let t0 = Instant::now();
        let d = Duration::from_millis(50);
        let mut q = DelayQueue::new(d, 10_000);
        assert!(q.push(t0, vec![1; 100]));
        assert!(q.push(t0 + Duration::from_millis(10), vec![2; 200]));
        assert_eq!(q.next_due(), Some(t0 + d));
        assert_eq!(q.pop_due(t0 + Duration::from_millis(49)), None, "not before its delay");
        assert_eq!(q.pop_due(t0 + d), Some(vec![1; 100]));
        assert_eq!(q.pop_due(t0 + d), None, "the second is due 10 ms later");
        assert_eq!(q.queued_bytes(), 200);
        assert_eq!(q.pop_due(t0 + Duration::from_millis(60)), Some(vec![2; 200]));
        assert_eq!((q.queued_bytes(), q.next_due()), (0, None));
    }

    #[test]
    fn a_full_queue_drops_and_counts_and_frees_as_it_drains() {
        let t0 = Instant::now();
        let mut q = DelayQueue::new(Duration::from_millis(1), 1000);
        assert!(q.push(t0, vec![0; 600]));
        assert!(!q.push(t0, vec![0; 600]), "over the limit");
        assert!(q.push(t0, vec![0; 400]), "exactly to the limit");
        assert_eq!(q.queued_bytes(), 1000);
        assert!(q.pop_due(t0 + Duration::from_millis(1)).is_some());
        assert!(q.push(t0, vec![0; 600]), "room again");
    }

    #[test]
    fn no_delay_passes_frames_at_once() {
        let t0 = Instant::now();
        let mut q = DelayQueue::new(Duration::ZERO, 100);
        q.push(t0, vec![7]);
        assert_eq!(q.pop_due(t0), Some(vec![7]));
    }
}
