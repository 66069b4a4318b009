//! The thread of an active virtio device: an epoll loop over the device's event sources
//! (queue notifications, a tap) plus a control eventfd for pause, resume and stop.
//!
//! Pausing is synchronous: [`Worker::pause`] returns only once the worker has finished what it
//! was doing and stopped watching its sources, so no device write reaches guest memory until
//! [`Worker::resume`], which first lets the handler catch up on everything that arrived.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// What a device worker does with its events.
pub trait Handler: Send + 'static {
    /// The file descriptors to watch, each with whether to watch it edge-triggered; events are
    /// reported by index into this list.
    fn sources(&self) -> Vec<(RawFd, bool)>;
    /// An event on source `index`.
    fn handle(&mut self, index: usize);
    /// Processes everything pending on every source (after a resume).
    fn process_all(&mut self);
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Command {
    Run,
    Pause,
    Stop,
}

struct Control {
    state: Mutex<(Command, u64, u64)>, // (command, requested sequence, acknowledged sequence)
    acked: Condvar,
    event: EventFd,
}

/// A running device worker.
pub struct Worker {
    control: Arc<Control>,
    thread: Option<JoinHandle<()>>,
}

const CONTROL: u64 = u64::MAX;

impl Worker {
    /// Starts `handler` on a thread named `name`.
    pub fn spawn<H: Handler>(name: &str, mut handler: H) -> std::io::Result<Worker> {
        let control = Arc::new(Control {
            state: Mutex::new((Command::Run, 0, 0)),
            acked: Condvar::new(),
            event: EventFd::new(EFD_NONBLOCK)?,
        });
        let epoll = Epoll::new()?;
        let sources = handler.sources();
        let watch = move |epoll: &Epoll, add: bool| -> std::io::Result<()> {
            for (i, (fd, edge)) in sources.iter().enumerate() {
                let set = if *edge { EventSet::IN | EventSet::EDGE_TRIGGERED } else { EventSet::IN };
                let op = if add { ControlOperation::Add } else { ControlOperation::Delete };
                epoll.ctl(op, *fd, EpollEvent::new(set, i as u64))?;
            }
            Ok(())
        };
        watch(&epoll, true)?;
        epoll.ctl(ControlOperation::Add, control.event.as_raw_fd(), EpollEvent::new(EventSet::IN, CONTROL))?;
        let ctl = control.clone();
        let thread = std::thread::Builder::new().name(name.to_owned()).spawn(move || {
            let mut events = vec![EpollEvent::default(); 16];
            let mut paused = false;
            loop {
                let n = match epoll.wait(-1, &mut events) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::error!("device worker epoll: {e}");
                        return;
                    }
                };
                for ev in &events[..n] {
                    if ev.data() != CONTROL {
                        if !paused {
                            handler.handle(ev.data() as usize);
                        }
                        continue;
                    }
                    let _ = ctl.event.read();
                    let mut st = ctl.state.lock().expect("worker control poisoned");
                    let (cmd, seq, _) = *st;
                    match cmd {
                        Command::Stop => {
                            st.2 = seq;
                            ctl.acked.notify_all();
                            return;
                        }
                        Command::Pause if !paused => {
                            // Stop watching the sources: a readable tap would otherwise spin.
                            if let Err(e) = watch(&epoll, false) {
                                tracing::error!("device worker pause: {e}");
                            }
                            paused = true;
                        }
                        Command::Run if paused => {
                            if let Err(e) = watch(&epoll, true) {
                                tracing::error!("device worker resume: {e}");
                            }
                            paused = false;
                            drop(st);
                            handler.process_all();
                            st = ctl.state.lock().expect("worker control poisoned");
                        }
                        _ => {}
                    }
                    st.2 = seq;
                    ctl.acked.notify_all();
                }
            }
        })?;
        Ok(Worker { control, thread: Some(thread) })
    }

    fn command(&self, cmd: Command) {
        let mut st = self.control.state.lock().expect("worker control poisoned");
        st.0 = cmd;
        st.1 += 1;
        let want = st.1;
        if self.control.event.write(1).is_err() {
            return;
        }
        while st.2 < want {
            if self.thread.as_ref().is_none_or(|t| t.is_finished()) {
                return;
            }
            let (s, _) = self
                .control
                .acked
                .wait_timeout(st, std::time::Duration::from_millis(100))
                .expect("worker control poisoned");
            st = s;
        }
    }

    /// Stops processing; returns once the worker is idle.
    pub fn pause(&self) {
        self.command(Command::Pause);
    }

    /// Resumes processing.
    pub fn resume(&self) {
        self.command(Command::Run);
    }

    /// Ends the thread.
    pub fn stop(&mut self) {
        self.command(Command::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Counter {
        evt: EventFd,
        seen: Arc<AtomicUsize>,
        catch_ups: Arc<AtomicUsize>,
    }

    impl Handler for Counter {
        fn sources(&self) -> Vec<(RawFd, bool)> {
            vec![(self.evt.as_raw_fd(), false)]
        }
        fn handle(&mut self, _: usize) {
            let n = self.evt.read().unwrap_or(0);
            self.seen.fetch_add(n as usize, Ordering::SeqCst);
        }
        fn process_all(&mut self) {
            self.catch_ups.fetch_add(1, Ordering::SeqCst);
            self.handle(0);
        }
    }

    #[test]
    fn paused_workers_do_nothing_until_resumed() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        let catch_ups = Arc::new(AtomicUsize::new(0));
        let mut w = Worker::spawn(
            "test",
            Counter { evt: evt.try_clone().unwrap(), seen: seen.clone(), catch_ups: catch_ups.clone() },
        )
        .unwrap();
        evt.write(2).unwrap();
        while seen.load(Ordering::SeqCst) < 2 {
            std::thread::yield_now();
        }
        w.pause();
        evt.write(5).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(seen.load(Ordering::SeqCst), 2, "paused worker handled an event");
        w.resume();
        assert_eq!(catch_ups.load(Ordering::SeqCst), 1);
        assert_eq!(seen.load(Ordering::SeqCst), 7, "resume catches up");
        w.stop();
    }
}
