//! The control API: a Unix socket speaking QMP-style JSON, one object per line, without QMP's
//! greeting and capabilities negotiation.
//!
//! Request: `{"execute": "NAME", "arguments": {...}}` (`arguments` optional).
//! Reply: `{"return": {...}}` or `{"error": {"class": "...", "desc": "..."}}`.
//! A malformed request gets an error reply; the connection stays open.
//!
//! Connections are served by one thread each; commands are executed by the VMM's control
//! loop, one at a time, in arrival order.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Sender};

use serde_json::{json, Value};

/// Errors starting the API server.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket is served by a live process.
    #[error("API socket {0} is in use by another process")]
    InUse(PathBuf),
    /// Binding failed.
    #[error("cannot listen on API socket {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// A parsed command on its way to the control loop.
pub struct ApiRequest {
    /// Command name (`execute`).
    pub command: String,
    /// Arguments (an object, possibly empty).
    pub arguments: Value,
    /// Where the reply goes.
    pub reply: Sender<Value>,
}

/// The error classes of replies (QMP's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Anything that is not an unknown command.
    GenericError,
    /// The command does not exist.
    CommandNotFound,
}

/// Builds an error reply.
pub fn error_reply(class: ErrorClass, desc: impl std::fmt::Display) -> Value {
    let class = match class {
        ErrorClass::GenericError => "GenericError",
        ErrorClass::CommandNotFound => "CommandNotFound",
    };
    json!({"error": {"class": class, "desc": desc.to_string()}})
}

/// Builds a success reply.
pub fn ok_reply(value: Value) -> Value {
    json!({ "return": value })
}

/// Parses one request line: the command and its arguments, or an error reply.
pub fn parse_request(line: &str) -> Result<(String, Value), Value> {
    let generic = |d: String| error_reply(ErrorClass::GenericError, d);
    let v: Value = serde_json::from_str(line).map_err(|e| generic(format!("malformed JSON: {e}")))?;
    let obj = v.as_object().ok_or_else(|| generic("a request must be a JSON object".into()))?;
    let command = obj
        .get("execute")
        .ok_or_else(|| generic("missing \"execute\"".into()))?
        .as_str()
        .ok_or_else(|| generic("\"execute\" must be a string".into()))?
        .to_owned();
    if let Some(k) = obj.keys().find(|k| *k != "execute" && *k != "arguments" && *k != "id") {
        return Err(generic(format!("unknown request member \"{k}\"")));
    }
    let arguments = match obj.get("arguments") {
        None | Some(Value::Null) => json!({}),
        Some(a @ Value::Object(_)) => a.clone(),
        Some(_) => return Err(generic("\"arguments\" must be an object".into())),
    };
    Ok((command, arguments))
}

/// The listening socket; removes the socket file when dropped.
pub struct ApiServer {
    path: PathBuf,
}

impl ApiServer {
    /// Listens on `path` and sends every request to `requests`. A stale socket file (no
    /// process behind it) is replaced; a live one is an error.
    pub fn start<T: From<ApiRequest> + Send + 'static>(
        path: &Path,
        requests: Sender<T>,
    ) -> Result<ApiServer, ApiError> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(ApiError::InUse(path.to_owned()));
            }
            let _ = std::fs::remove_file(path);
        }
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                let _ = std::fs::create_dir_all(dir);
            }
        }
        let listener = UnixListener::bind(path).map_err(|source| ApiError::Bind { path: path.to_owned(), source })?;
        let tx = requests;
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    let tx = tx.clone();
                    let _ =
                        std::thread::Builder::new().name("api-conn".into()).spawn(move || serve_connection(stream, tx));
                }
            })
            .map_err(|source| ApiError::Bind { path: path.to_owned(), source })?;
        Ok(ApiServer { path: path.to_owned() })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve_connection<T: From<ApiRequest>>(stream: UnixStream, requests: Sender<T>) {
    let Ok(mut writer) = stream.try_clone() else { return };
    let reader = BufReader::new(stream);
    for line in reader.split(b'\n') {
        let Ok(line) = line else { return };
        // A request that is not UTF-8 gets an error reply like any malformed one.
        let line = match String::from_utf8(line) {
            Ok(l) => l,
            Err(_) => {
                let mut out = error_reply(ErrorClass::GenericError, "the request is not UTF-8").to_string();
                out.push('\n');
                if writer.write_all(out.as_bytes()).is_err() {
                    return;
                }
                continue;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        let reply = match parse_request(&line) {
            Err(reply) => reply,
            Ok((command, arguments)) => {
                let (rtx, rrx) = channel();
                let req = ApiRequest { command, arguments, reply: rtx };
                if requests.send(T::from(req)).is_err() {
                    return;
                }
                match rrx.recv() {
                    Ok(v) => v,
                    Err(_) => error_reply(ErrorClass::GenericError, "the VMM is shutting down"),
                }
            }
        };
        let mut out = reply.to_string();
        out.push('\n');
        if writer.write_all(out.as_bytes()).is_err() {
            return;
        }
    }
}

pub use migrate::client::ApiClient;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_or_explain() {
        assert_eq!(parse_request(r#"{"execute":"status"}"#).unwrap(), ("status".into(), json!({})));
        let (c, a) = parse_request(r#"{"execute":"snapshot","arguments":{"path":"/x"}}"#).unwrap();
        assert_eq!((c.as_str(), a["path"].as_str()), ("snapshot", Some("/x")));
        for (bad, why) in [
            ("{not json", "malformed JSON"),
            ("[1,2]", "JSON object"),
            (r#"{"arguments":{}}"#, "missing \"execute\""),
            (r#"{"execute":5}"#, "must be a string"),
            (r#"{"execute":"x","arguments":[1]}"#, "must be an object"),
            (r#"{"execute":"x","bogus":1}"#, "unknown request member"),
        ] {
            let e = parse_request(bad).unwrap_err();
            assert_eq!(e["error"]["class"], "GenericError");
            assert!(e["error"]["desc"].as_str().unwrap().contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn server_answers_every_line_and_keeps_the_connection() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let path = dir.as_path().join("api.sock");
        let (tx, rx) = channel::<ApiRequest>();
        let server = ApiServer::start(&path, tx).unwrap();
        std::thread::spawn(move || {
            for req in rx {
                let _ = req.reply.send(ok_reply(json!({"echo": req.command})));
            }
        });
        let mut c = ApiClient::connect(&path).unwrap();
        assert_eq!(c.raw("garbage").unwrap()["error"]["class"], "GenericError");
        assert_eq!(c.execute("ping", json!({})).unwrap().unwrap()["echo"], "ping");
        // Bytes that are not UTF-8: an error reply, and the connection goes on.
        let mut raw = std::os::unix::net::UnixStream::connect(&path).unwrap();
        raw.write_all(b"{\"execute\": \"\xff\xfe\"}\n{\"execute\": \"ping\"}\n").unwrap();
        let mut lines = BufReader::new(raw).lines();
        let first: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        assert!(first["error"]["desc"].as_str().unwrap().contains("not UTF-8"), "{first}");
        let second: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        assert_eq!(second["return"]["echo"], "ping", "{second}");
        assert!(matches!(ApiServer::start(&path, channel::<ApiRequest>().0), Err(ApiError::InUse(_))));
        drop(server);
        assert!(!path.exists());
    }
}
