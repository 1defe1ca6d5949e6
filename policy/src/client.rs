//! bangerd's side of the helper: spawn it (`<exe> __helper <config>` with a socketpair as
//! its stdin, an empty environment) and call it.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::helper::{Envelope, HELPER_ARG, Message, WORKER_TIMEOUT};
use crate::request::{Confinement, HelperConfig, Reply, Request};
use crate::wire::{read_frame, write_frame};

/// Errors talking to the helper.
#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    #[error("cannot start the privileged helper")]
    Spawn(#[source] std::io::Error),
    #[error("the privileged helper did not start: {0}")]
    Startup(String),
    #[error(
        "the privileged helper is gone ({0}); restart bangerd (`sudo systemctl restart bangerd`)"
    )]
    Gone(String),
    #[error("the privileged helper sent something unexpected: {0}")]
    Protocol(String),
}

/// A running helper.
#[derive(Debug)]
pub struct Helper {
    child: Child,
    sock: UnixStream,
    next_id: u64,
    confinement: Confinement,
}

impl Helper {
    /// Start the helper: `cmd` is the program (bangerd, possibly behind a wrapper such
    /// as `ip netns exec`); this adds `__helper <config>`, clears the environment and
    /// hands it its socket as stdin. Waits for its hello.
    pub fn spawn(mut cmd: Command, cfg: &HelperConfig) -> Result<Helper, HelperError> {
        let (ours, theirs) = UnixStream::pair().map_err(HelperError::Spawn)?;
        let config = serde_json::to_string(cfg).expect("config serialises");
        let child = cmd
            .arg(HELPER_ARG)
            .arg(config)
            .env_clear()
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            .spawn()
            .map_err(HelperError::Spawn)?;
        let mut helper = Helper {
            child,
            sock: ours,
            next_id: 1,
            confinement: Confinement {
                uid: u32::MAX,
                seccomp_mode: 0,
                no_new_privs: false,
                caps_effective: Vec::new(),
                caps_bounding: Vec::new(),
                landlock: String::new(),
            },
        };
        let _ = helper.sock.set_read_timeout(Some(Duration::from_secs(10)));
        match read_frame::<Message>(&mut helper.sock) {
            Ok(Some(Message::Hello { confinement })) => helper.confinement = confinement,
            Ok(Some(Message::Fatal { reason })) => {
                let _ = helper.child.wait();
                return Err(HelperError::Startup(reason));
            }
            other => {
                let _ = helper.child.kill();
                let _ = helper.child.wait();
                return Err(HelperError::Startup(format!("no hello ({other:?})")));
            }
        }
        let _ = helper
            .sock
            .set_read_timeout(Some(WORKER_TIMEOUT + Duration::from_secs(5)));
        Ok(helper)
    }

    /// The confinement the helper reported at start.
    pub fn confinement(&self) -> &Confinement {
        &self.confinement
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the helper process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Send one request and wait for its answer.
    pub fn call(&mut self, request: &Request) -> Result<Reply, HelperError> {
        let id = self.next_id;
        self.next_id += 1;
        let env = Envelope {
            id,
            request: request.clone(),
        };
        if let Err(e) = write_frame(&mut self.sock, &env) {
            return Err(self.gone(e));
        }
        loop {
            match read_frame::<Message>(&mut self.sock) {
                Ok(Some(Message::Answer { id: got, reply })) if got == id => return Ok(reply),
                // An answer to an earlier, abandoned request: skip it.
                Ok(Some(Message::Answer { .. })) => continue,
                Ok(Some(other)) => return Err(HelperError::Protocol(format!("{other:?}"))),
                Ok(None) => return Err(self.gone(std::io::ErrorKind::UnexpectedEof.into())),
                Err(e) => return Err(self.gone(e)),
            }
        }
    }

    fn gone(&mut self, e: std::io::Error) -> HelperError {
        let status = match self.child.try_wait() {
            Ok(Some(s)) => s.to_string(),
            _ => e.to_string(),
        };
        HelperError::Gone(status)
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        // Closing the socket ends the helper's loop; reap it so no zombie stays.
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        let _ = self.child.wait();
    }
}
