//! The VMM's control loop: the one thread that owns the [`Vmm`]. It executes API commands,
//! runs calls from the migration thread (pause, dirty log, state), and reacts to the guest
//! stopping itself, to SIGINT/SIGTERM, and to the end of an outgoing migration.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::time::Duration;

use serde_json::{json, Value};

use crate::api::{error_reply, ok_reply, ApiRequest, ErrorClass};
use crate::migration::Outgoing;
use crate::vmm::Vmm;
use migrate::precopy::Status;

/// Why the control loop ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// `quit` was requested.
    Quit,
    /// SIGINT or SIGTERM.
    Signal,
    /// The guest stopped itself; the reason.
    GuestStopped(String),
    /// The guest was migrated away and runs at the destination.
    Migrated,
}

/// A message to the control loop.
pub enum ControlMsg {
    /// An API request.
    Api(ApiRequest),
    /// Run a closure on the VMM (from the migration thread).
    Call(Box<dyn FnOnce(&mut Vmm) + Send>),
    /// The outgoing migration ended: `true` when the guest runs at the destination.
    MigrationDone(bool),
}

impl From<ApiRequest> for ControlMsg {
    fn from(r: ApiRequest) -> ControlMsg {
        ControlMsg::Api(r)
    }
}

/// Runs closures on the VMM from another thread, through the control loop.
#[derive(Clone)]
pub struct VmmCaller {
    tx: Sender<ControlMsg>,
}

/// The VMM's control loop has stopped (the VMM is exiting).
#[derive(Debug, thiserror::Error)]
#[error("the VMM control loop is gone")]
pub struct ControlLoopGone;

impl VmmCaller {
    /// A caller sending to `tx`.
    pub fn new(tx: Sender<ControlMsg>) -> VmmCaller {
        VmmCaller { tx }
    }

    /// Sends a message to the control loop.
    pub fn send(&self, msg: ControlMsg) -> Result<(), ControlLoopGone> {
        self.tx.send(msg).map_err(|_| ControlLoopGone)
    }

    /// Runs `f` on the VMM and returns its result.
    pub fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Vmm) -> R + Send + 'static,
    ) -> Result<R, ControlLoopGone> {
        let (rtx, rrx) = channel();
        self.send(ControlMsg::Call(Box::new(move |vmm| {
            let _ = rtx.send(f(vmm));
        })))?;
        rrx.recv().map_err(|_| ControlLoopGone)
    }
}

static TERMINATE: AtomicBool = AtomicBool::new(false);

/// Makes SIGINT and SIGTERM end the control loop cleanly (socket removed, vCPUs stopped).
pub fn install_signal_handlers() {
    extern "C" fn on_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
        TERMINATE.store(true, Ordering::SeqCst);
    }
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let _ = vmm_sys_util::signal::register_signal_handler(sig, on_signal);
    }
}

/// Whether SIGINT or SIGTERM arrived (or `quit` while waiting for an incoming migration).
pub fn terminating() -> bool {
    TERMINATE.load(Ordering::SeqCst)
}

/// The reply to API command `command` while there is no VM yet because an incoming migration
/// is awaited or received; `true` with it when the VMM should end (`quit`).
fn waiting_reply(command: &str) -> (Value, bool) {
    let generic = |d: String| error_reply(ErrorClass::GenericError, d);
    match Command::parse(command) {
        None => (error_reply(ErrorClass::CommandNotFound, format!("unknown command \"{command}\"")), false),
        Some(Command::Status) => (ok_reply(json!({"state": "inmigrate", "running": false})), false),
        Some(Command::QueryMigrate) => (ok_reply(json!({"status": "setup", "incoming": true})), false),
        Some(Command::Quit) => (ok_reply(json!({})), true),
        Some(c) => (generic(format!("{}: no VM yet, an incoming migration is awaited", c.name())), false),
    }
}

/// Serves the API while an incoming migration is awaited or received, before there is a VM
/// to control. While no source has connected, every request is answered ([`waiting_reply`]).
/// Once one has ([`WaitingApi::connected`]), `quit` is still answered, and cancels the
/// migration as SIGTERM does (the source keeps its guest), while every other request is held
/// for the control loop, so that whoever asks during the migration sees the VM it brings.
/// [`finish`] hands the channel back, the held requests first in it.
///
/// [`finish`]: WaitingApi::finish
pub struct WaitingApi {
    connected: std::sync::Arc<AtomicBool>,
    done: std::sync::Arc<AtomicBool>,
    tx: Sender<ControlMsg>,
    thread: std::thread::JoinHandle<(Receiver<ControlMsg>, Vec<ControlMsg>)>,
}

impl WaitingApi {
    /// Starts serving requests from `rx` (`tx` is its sender, to give held requests back).
    pub fn start(rx: Receiver<ControlMsg>, tx: Sender<ControlMsg>) -> std::io::Result<WaitingApi> {
        let connected = std::sync::Arc::new(AtomicBool::new(false));
        let done = std::sync::Arc::new(AtomicBool::new(false));
        let (c, d) = (connected.clone(), done.clone());
        let thread = std::thread::Builder::new().name("api-waiting".into()).spawn(move || {
            let mut held = Vec::new();
            while !d.load(Ordering::SeqCst) {
                match rx.recv_timeout(Duration::from_millis(20)) {
                    Ok(ControlMsg::Api(req)) if !c.load(Ordering::SeqCst) || req.command == Command::Quit.name() => {
                        let (reply, quit) = waiting_reply(&req.command);
                        let _ = req.reply.send(reply);
                        if quit {
                            TERMINATE.store(true, Ordering::SeqCst);
                        }
                    }
                    Ok(msg) => held.push(msg),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            (rx, held)
        })?;
        Ok(WaitingApi { connected, done, tx, thread })
    }

    /// A source connected: from now on only `quit` is answered.
    pub fn connected(&self) {
        self.connected.store(true, Ordering::SeqCst);
    }

    /// Stops serving; the channel, for the control loop, with the held requests first.
    pub fn finish(self) -> Receiver<ControlMsg> {
        self.done.store(true, Ordering::SeqCst);
        let (rx, held) = self.thread.join().expect("the waiting API thread panicked");
        for msg in held {
            // The receiver is `rx`, alive here: the send cannot fail.
            let _ = self.tx.send(msg);
        }
        rx
    }
}

/// The commands of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Command {
    /// `status`: the VM's state and counters.
    Status,
    /// `pause`: stops the vCPUs.
    Pause,
    /// `resume`: starts them again.
    Resume,
    /// `snapshot` `{path}`: writes the VM to a directory.
    Snapshot,
    /// `memory-digest` `{pages?}`: SHA-256 of guest memory.
    MemoryDigest,
    /// `migrate` (see [`migrate::args::MigrateArgs`]).
    Migrate,
    /// `query-migrate`: the migration's progress or result.
    QueryMigrate,
    /// `migrate_cancel`.
    MigrateCancel,
    /// `set-peer-corrupt` `{on}`: a test hook, this VMM's peer server corrupts what it serves.
    SetPeerCorrupt,
    /// `quit`.
    Quit,
}

impl Command {
    /// Every command.
    pub const ALL: [Command; 10] = [
        Command::Status,
        Command::Pause,
        Command::Resume,
        Command::Snapshot,
        Command::MemoryDigest,
        Command::Migrate,
        Command::QueryMigrate,
        Command::MigrateCancel,
        Command::SetPeerCorrupt,
        Command::Quit,
    ];

    /// The command's name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            Command::Status => "status",
            Command::Pause => "pause",
            Command::Resume => "resume",
            Command::Snapshot => "snapshot",
            Command::MemoryDigest => "memory-digest",
            Command::Migrate => "migrate",
            Command::QueryMigrate => "query-migrate",
            Command::MigrateCancel => "migrate_cancel",
            Command::SetPeerCorrupt => "set-peer-corrupt",
            Command::Quit => "quit",
        }
    }

    /// The command named `name`.
    pub fn parse(name: &str) -> Option<Command> {
        Command::ALL.into_iter().find(|c| c.name() == name)
    }
}

/// A command's argument that is missing or not what the command takes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
enum ArgError {
    /// Not given.
    #[error("missing argument \"{0}\"")]
    Missing(&'static str),
    /// Given, but not a path.
    #[error("argument \"{0}\" must be a non-empty string")]
    NotAPath(&'static str),
}

fn path_arg(args: &Value, name: &'static str) -> Result<PathBuf, ArgError> {
    match args.get(name) {
        Some(Value::String(s)) if !s.is_empty() => Ok(PathBuf::from(s)),
        Some(_) => Err(ArgError::NotAPath(name)),
        None => Err(ArgError::Missing(name)),
    }
}

/// The VMM and what the control loop keeps beside it.
pub struct Controller {
    vmm: Vmm,
    tx: Sender<ControlMsg>,
    rx: Receiver<ControlMsg>,
    migration: Option<Outgoing>,
    incoming: Option<crate::migration::IncomingStats>,
    site: Option<migrate::shrinker::SiteIndex>,
    /// How migrations leave (None: this VMM was started without --cluster-key or --plain-tcp).
    transport: Option<indexd::tls::Transport>,
}

impl Controller {
    /// A controller for `vmm`, receiving on a fresh channel (see [`Controller::sender`]).
    pub fn new(vmm: Vmm) -> Controller {
        let (tx, rx) = channel();
        Controller::with_channel(vmm, tx, rx)
    }

    /// A controller for `vmm` serving a channel made beforehand (the API may start first).
    pub fn with_channel(vmm: Vmm, tx: Sender<ControlMsg>, rx: Receiver<ControlMsg>) -> Controller {
        Controller { vmm, tx, rx, migration: None, incoming: None, site: None, transport: None }
    }

    /// How outgoing migrations travel; none refuses them.
    pub fn set_transport(&mut self, transport: Option<indexd::tls::Transport>) {
        self.transport = transport;
    }

    /// Where API servers and helpers send their messages.
    pub fn sender(&self) -> Sender<ControlMsg> {
        self.tx.clone()
    }

    /// Records how this VM arrived (shown by `query-migrate` on the destination), and keeps
    /// its site-index membership (peers may still fetch its content) for as long as it runs.
    pub fn set_incoming(&mut self, stats: crate::migration::IncomingStats, site: Option<migrate::shrinker::SiteIndex>) {
        self.incoming = Some(stats);
        self.site = site;
    }

    /// The VMM.
    pub fn vmm(&mut self) -> &mut Vmm {
        &mut self.vmm
    }

    /// Executes one API command. Returns the reply and whether the VMM must quit.
    pub fn dispatch(&mut self, command: &str, args: &Value) -> (Value, bool) {
        let Some(command) = Command::parse(command) else {
            let names: Vec<&str> = Command::ALL.iter().map(|c| c.name()).collect();
            let e = format!("unknown command \"{command}\" (commands: {})", names.join(", "));
            return (error_reply(ErrorClass::CommandNotFound, e), false);
        };
        let generic = |e: String| error_reply(ErrorClass::GenericError, e);
        let migrated = self.migration.as_ref().is_some_and(|m| m.info().status == Status::Completed);
        let reply = match command {
            Command::Migrate | Command::Resume | Command::Snapshot if migrated => {
                generic("the guest was migrated and runs at the destination".into())
            }
            Command::Status => {
                let mut v = serde_json::to_value(self.vmm.status()).unwrap_or(Value::Null);
                if let Some(o) = v.as_object_mut() {
                    // How this VMM migrates, so that an orchestrator can check it before a move.
                    o.insert("transport".into(), json!(self.transport.as_ref().map(|t| t.name())));
                    o.insert("cluster_key".into(), json!(self.transport.as_ref().and_then(|t| t.fingerprint())));
                }
                ok_reply(v)
            }
            Command::Pause => self.vmm.pause().map(|_| ok_reply(json!({}))).unwrap_or_else(|e| generic(e.to_string())),
            Command::Resume => {
                self.vmm.resume().map(|_| ok_reply(json!({}))).unwrap_or_else(|e| generic(e.to_string()))
            }
            Command::Snapshot => match path_arg(args, "path") {
                Err(e) => generic(e.to_string()),
                Ok(dir) => match self.vmm.snapshot(&dir) {
                    Ok(stats) => ok_reply(serde_json::to_value(stats).unwrap_or(Value::Null)),
                    Err(e) => generic(e.to_string()),
                },
            },
            Command::MemoryDigest => {
                let per_page = match args.get("pages") {
                    None => Ok(None),
                    Some(_) => path_arg(args, "pages").map(Some),
                };
                match per_page {
                    Err(e) => generic(e.to_string()),
                    Ok(p) => match self.vmm.memory_digest(p.as_deref()) {
                        Ok(d) => ok_reply(serde_json::to_value(d).unwrap_or(Value::Null)),
                        Err(e) => generic(e.to_string()),
                    },
                }
            }
            Command::SetPeerCorrupt => {
                // Test hook: this VMM's peer server corrupts every chunk it serves.
                let on = args.get("on").and_then(Value::as_bool).unwrap_or(true);
                match &self.site {
                    Some(_) if !crate::test_hooks::ENABLED => generic(
                        "set-peer-corrupt is a test hook: this shrink-vmm was built without the test-hooks feature"
                            .into(),
                    ),
                    Some(s) => {
                        s.set_corrupt(on);
                        ok_reply(json!({}))
                    }
                    None => generic("this VMM serves no peers".into()),
                }
            }
            Command::Migrate => {
                if self.migration.as_ref().is_some_and(|m| m.running()) {
                    generic("a migration is already in progress".into())
                } else if let Some(transport) = &self.transport {
                    match Outgoing::start(&self.vmm, args, transport, VmmCaller::new(self.tx.clone())) {
                        Ok(m) => {
                            self.migration = Some(m);
                            ok_reply(json!({}))
                        }
                        Err(e) => generic(e.to_string()),
                    }
                } else {
                    generic(crate::migration::NO_TRANSPORT.into())
                }
            }
            Command::QueryMigrate => match (&self.migration, &self.incoming) {
                (Some(m), _) => ok_reply(m.info_json()),
                (None, Some(i)) => {
                    // The site's counters as of now (it keeps serving peers).
                    let incoming = migrate::stats::IncomingStats {
                        site: self.site.as_ref().map(|s| s.snapshot_stats()).or_else(|| i.site.clone()),
                        ..i.clone()
                    };
                    let q = migrate::stats::DestinationQuery { status: Status::Completed, incoming };
                    ok_reply(serde_json::to_value(q).unwrap_or(Value::Null))
                }
                (None, None) => ok_reply(json!({})),
            },
            Command::MigrateCancel => {
                if let Some(m) = &self.migration {
                    m.cancel();
                }
                ok_reply(json!({}))
            }
            Command::Quit => return (ok_reply(json!({})), true),
        };
        (reply, false)
    }

    /// Serves messages and watches the guest until `quit`, a signal, the guest stopping, or the
    /// guest leaving for another host.
    pub fn run(&mut self) -> Exit {
        // After a completed migration the source lingers briefly (paused, as QEMU's
        // "postmigrate") so that whoever drives it can read the final statistics.
        let mut migrated_at: Option<std::time::Instant> = None;
        loop {
            if terminating() {
                return Exit::Signal;
            }
            if migrated_at.is_some_and(|t| t.elapsed() >= Duration::from_secs(1)) {
                return Exit::Migrated;
            }
            if let Some(reason) = self.vmm.poll_stopped() {
                return Exit::GuestStopped(reason);
            }
            match self.rx.recv_timeout(Duration::from_millis(100)) {
                Ok(ControlMsg::Api(req)) => {
                    let (reply, quit) = self.dispatch(&req.command, &req.arguments);
                    let _ = req.reply.send(reply);
                    if quit {
                        return Exit::Quit;
                    }
                    if migrated_at.is_some() && Command::parse(&req.command) == Some(Command::QueryMigrate) {
                        return Exit::Migrated;
                    }
                }
                Ok(ControlMsg::Call(f)) => f(&mut self.vmm),
                Ok(ControlMsg::MigrationDone(true)) => migrated_at = Some(std::time::Instant::now()),
                Ok(ControlMsg::MigrationDone(false)) => {
                    if let Some(m) = &self.migration {
                        let info = m.info();
                        eprintln!(
                            "shrink-vmm: migration {:?}: {}; the guest keeps running here",
                            info.status,
                            info.error.unwrap_or_default()
                        );
                    }
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {}
            }
        }
    }

    /// Stops everything (the migration thread first, then the vCPUs).
    pub fn shutdown(&mut self) {
        // Leave the site index first: this host no longer holds the guest's content.
        self.site = None;
        if let Some(m) = self.migration.take() {
            m.cancel();
            // Let the migration thread finish its calls before the loop stops serving them.
            while m.running() {
                match self.rx.recv_timeout(Duration::from_millis(10)) {
                    Ok(ControlMsg::Call(f)) => f(&mut self.vmm),
                    Ok(ControlMsg::Api(req)) => {
                        let _ = req.reply.send(error_reply(ErrorClass::GenericError, "the VMM is shutting down"));
                    }
                    _ => {}
                }
            }
        }
        self.vmm.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vmm_awaiting_its_migration_answers_status_query_migrate_and_quit() {
        assert_eq!(waiting_reply("status").0["return"]["state"], "inmigrate");
        assert_eq!(waiting_reply("query-migrate").0["return"]["status"], "setup");
        assert_eq!(waiting_reply("quit"), (ok_reply(json!({})), true));
        let (pause, quit) = waiting_reply("pause");
        assert!(!quit);
        assert!(pause["error"]["desc"].as_str().unwrap().contains("no VM yet"), "{pause}");
        assert_eq!(waiting_reply("no-such").0["error"]["class"], "CommandNotFound");
    }

    #[test]
    fn every_command_has_one_name_that_parses_back() {
        let names: std::collections::HashSet<&str> = Command::ALL.iter().map(|c| c.name()).collect();
        assert_eq!(names.len(), Command::ALL.len());
        for c in Command::ALL {
            assert_eq!(Command::parse(c.name()), Some(c));
        }
        assert_eq!(Command::parse("reboot-the-moon"), None);
    }
}
