//! The VMM's control loop: executes API commands and reacts to the guest stopping itself or
//! to SIGINT/SIGTERM.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use serde_json::{json, Value};

use crate::api::{error_reply, ok_reply, ApiRequest, ErrorClass};
use crate::vmm::Vmm;

/// Why the control loop ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// `quit` was requested.
    Quit,
    /// SIGINT or SIGTERM.
    Signal,
    /// The guest stopped itself; the reason.
    GuestStopped(String),
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

/// The commands of the API, for `help` texts and errors.
pub const COMMANDS: &[&str] = &["status", "pause", "resume", "snapshot", "memory-digest", "quit"];

fn path_arg(args: &Value, name: &str) -> Result<PathBuf, String> {
    match args.get(name) {
        Some(Value::String(s)) if !s.is_empty() => Ok(PathBuf::from(s)),
        Some(_) => Err(format!("argument \"{name}\" must be a non-empty string")),
        None => Err(format!("missing argument \"{name}\"")),
    }
}

/// Executes one command. Returns the reply and whether the VMM must quit.
pub fn dispatch(vmm: &mut Vmm, command: &str, args: &Value) -> (Value, bool) {
    let generic = |e: String| error_reply(ErrorClass::GenericError, e);
    let reply = match command {
        "status" => ok_reply(serde_json::to_value(vmm.status()).unwrap_or(Value::Null)),
        "pause" => vmm.pause().map(|_| ok_reply(json!({}))).unwrap_or_else(|e| generic(e.to_string())),
        "resume" => vmm.resume().map(|_| ok_reply(json!({}))).unwrap_or_else(|e| generic(e.to_string())),
        "snapshot" => match path_arg(args, "path") {
            Err(e) => generic(e),
            Ok(dir) => match vmm.snapshot(&dir) {
                Ok(stats) => ok_reply(serde_json::to_value(stats).unwrap_or(Value::Null)),
                Err(e) => generic(e.to_string()),
            },
        },
        "memory-digest" => {
            let per_page = match args.get("pages") {
                None => Ok(None),
                Some(_) => path_arg(args, "pages").map(Some),
            };
            match per_page {
                Err(e) => generic(e),
                Ok(p) => match vmm.memory_digest(p.as_deref()) {
                    Ok(d) => ok_reply(serde_json::to_value(d).unwrap_or(Value::Null)),
                    Err(e) => generic(e.to_string()),
                },
            }
        }
        "quit" => return (ok_reply(json!({})), true),
        other => error_reply(
            ErrorClass::CommandNotFound,
            format!("unknown command \"{other}\" (commands: {})", COMMANDS.join(", ")),
        ),
    };
    (reply, false)
}

/// Serves API requests and watches the guest until `quit`, a signal, or the guest stopping.
pub fn run(vmm: &mut Vmm, requests: Receiver<ApiRequest>) -> Exit {
    loop {
        if TERMINATE.load(Ordering::SeqCst) {
            return Exit::Signal;
        }
        if let Some(reason) = vmm.poll_stopped() {
            return Exit::GuestStopped(reason);
        }
        match requests.recv_timeout(Duration::from_millis(100)) {
            Ok(req) => {
                let (reply, quit) = dispatch(vmm, &req.command, &req.arguments);
                let _ = req.reply.send(reply);
                if quit {
                    return Exit::Quit;
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            // No API: nothing but signals and the guest can end the loop.
            Err(RecvTimeoutError::Disconnected) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}
