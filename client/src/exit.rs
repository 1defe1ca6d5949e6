//! Exit statuses of `banger`, and the CLI's error type.
//!
//! | status | meaning |
//! |-------:|---------|
//! | 0 | success |
//! | 1 | the operation failed (the message says why) |
//! | 2 | usage error (bad flags or arguments) |
//! | 3 | the daemon is not running and could not be reached or started |
//! | 4 | the named object does not exist |
//! | 5 | permission denied |
//! | 6 | conflict: exists already, or in the wrong state |
//! | 141 | stdout was closed by its reader (`banger ps \| head -1`): nothing is said |
//!
//! `banger vm run -- cmd` and `banger vm exec` exit with the command's own status.

use banger_api::codes;
use jsonrpsee::core::client::Error as RpcClientError;

pub const OK: u8 = 0;
pub const FAILURE: u8 = 1;
pub const USAGE: u8 = 2;
pub const UNAVAILABLE: u8 = 3;
pub const NOT_FOUND: u8 = 4;
pub const PERMISSION: u8 = 5;
pub const CONFLICT: u8 = 6;
/// 128 + SIGPIPE: what a shell reports for a writer whose reader went away.
pub const BROKEN_PIPE: u8 = 141;

/// Errors of the CLI.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("bangerd is not running (socket {socket})")]
    NotRunning { socket: String },
    #[error("cannot reach bangerd at {socket}: {message}")]
    Connect { socket: String, message: String },
    /// The kernel refused to let us open the socket (its mode and group decide).
    #[error("permission denied: this user may not use bangerd's socket {socket}")]
    SocketDenied { socket: String },
    /// `log`: where to read more, when it wrote a log (not when it stopped before that,
    /// e.g. on a config it refused: then `message` is its own last word).
    #[error("bangerd failed to start: {message}")]
    StartFailed {
        message: String,
        log: Option<String>,
    },
    #[error("{message}")]
    Rpc { code: i32, message: String },
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Permission(String),
    #[error("{0}")]
    Other(String),
}

impl CliError {
    /// The process exit status for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::NotRunning { .. }
            | CliError::Connect { .. }
            | CliError::StartFailed { .. } => UNAVAILABLE,
            CliError::Rpc { code, .. } => match *code {
                codes::NOT_FOUND => NOT_FOUND,
                codes::PERMISSION_DENIED => PERMISSION,
                codes::CONFLICT => CONFLICT,
                codes::INVALID_ARGUMENT | codes::INVALID_PARAMS => USAGE,
                codes::SHUTTING_DOWN => UNAVAILABLE,
                _ => FAILURE,
            },
            CliError::Usage(_) => USAGE,
            CliError::Permission(_) | CliError::SocketDenied { .. } => PERMISSION,
            CliError::Other(_) => FAILURE,
        }
    }

    /// What to do next, when we know.
    pub fn hint(&self) -> Option<String> {
        match self {
            CliError::NotRunning { .. } => {
                Some("start it with `banger daemon start` (other commands start it for you)".into())
            }
            CliError::SocketDenied { .. } => Some(
                "its owner, root and members of its group (`banger` for the system service) may use it: `sudo usermod -aG banger $USER`, then log in again".into(),
            ),
            CliError::StartFailed { log: Some(log), .. } => {
                Some(format!("see the daemon log: {log}"))
            }
            CliError::Connect { .. } => Some(
                "check `banger daemon status`; a stale socket is replaced when bangerd starts"
                    .into(),
            ),
            _ => None,
        }
    }
}

impl From<RpcClientError> for CliError {
    fn from(e: RpcClientError) -> Self {
        match e {
            RpcClientError::Call(obj) => CliError::Rpc {
                code: obj.code(),
                message: obj.message().to_owned(),
            },
            RpcClientError::RestartNeeded(reason) => CliError::Connect {
                socket: "the daemon socket".into(),
                message: format!("the connection was closed: {reason}"),
            },
            other => CliError::Other(other.to_string()),
        }
    }
}
