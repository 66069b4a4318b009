//! A blocking client for the VMM control API (QMP-style JSON, one object per line).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde_json::{json, Value};

/// The name of the statistics command ([`ApiClient::query_migrate`]).
pub const QUERY_MIGRATE: &str = "query-migrate";

/// The VMM refused a command: its QMP-style error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{desc}")]
pub struct CommandError {
    /// The error class (`GenericError`, `CommandNotFound`, …; `MalformedReply` when the reply
    /// was neither a return nor an error).
    pub class: String,
    /// What went wrong, as the VMM said it.
    pub desc: String,
}

/// `query-migrate` did not give an answer of the type asked for.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The API could not be reached (or the VMM went away).
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The VMM refused the command.
    #[error(transparent)]
    Refused(CommandError),
    /// The answer is not what this version expects.
    #[error(transparent)]
    Answer(serde_json::Error),
}

/// A blocking client for the API (used by tests, `shrink-migrate` and scripts).
pub struct ApiClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl ApiClient {
    /// Connects to a VMM's API socket.
    pub fn connect(path: &Path) -> std::io::Result<ApiClient> {
        let s = UnixStream::connect(path)?;
        Ok(ApiClient { writer: s.try_clone()?, reader: BufReader::new(s) })
    }

    /// Sends a raw line and reads the reply line.
    pub fn raw(&mut self, line: &str) -> std::io::Result<Value> {
        self.writer.write_all(line.as_bytes())?;
        self.writer.write_all(b"\n")?;
        let mut reply = String::new();
        if self.reader.read_line(&mut reply)? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "API connection closed"));
        }
        serde_json::from_str(&reply).map_err(std::io::Error::other)
    }

    /// Executes a command: an I/O error when the API cannot be reached, else `Ok(return
    /// value)` or the VMM's [`CommandError`].
    pub fn execute(&mut self, command: &str, arguments: Value) -> std::io::Result<Result<Value, CommandError>> {
        let reply = self.raw(&json!({"execute": command, "arguments": arguments}).to_string())?;
        let text = |e: &Value, k: &str, default: &str| e.get(k).and_then(Value::as_str).unwrap_or(default).to_owned();
        Ok(match (reply.get("return"), reply.get("error")) {
            (Some(v), _) => Ok(v.clone()),
            (_, Some(e)) => {
                Err(CommandError { class: text(e, "class", "GenericError"), desc: text(e, "desc", "error") })
            }
            _ => Err(CommandError { class: "MalformedReply".into(), desc: format!("malformed reply {reply}") }),
        })
    }

    /// `query-migrate`, its answer as `T` (a [`crate::stats::SourceQuery`] at a source, a
    /// [`crate::stats::DestinationQuery`] at a destination whose guest runs).
    pub fn query_migrate<T: DeserializeOwned>(&mut self) -> Result<T, QueryError> {
        let v = self.execute(QUERY_MIGRATE, json!({}))?.map_err(QueryError::Refused)?;
        serde_json::from_value(v).map_err(QueryError::Answer)
    }
}
