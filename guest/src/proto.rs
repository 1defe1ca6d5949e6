//! The host↔agent wire protocol, spoken over the VM's vsock (through the hybrid vsock Unix
//! socket on the host: `CONNECT <port>\n` → `OK …\n`, then this protocol).
//!
//! Framing: `u32` big-endian length of what follows, one type byte, the payload. Control
//! messages carry JSON; stream data is raw bytes. A frame longer than [`MAX_FRAME`] is
//! refused from its header, before anything is allocated; a truncated frame is an error,
//! never a hang on a closed connection; an unknown type is reported by number.
//!
//! Session: the host sends `Hello`, the agent answers `Hello` with its own version (or an
//! `Error` naming both versions, and closes); then one `Request` per connection. `exec`
//! then streams: host→guest `Stdin`/`StdinEof`/`Signal`/`Resize`, guest→host
//! `Stdout`/`Stderr`, and finally `Exit`. Every other request gets one `Response` (or
//! `Error`).

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

/// Version of the protocol. A host refuses an agent of another version, and vice versa.
pub const PROTOCOL_VERSION: u32 = 1;
/// The vsock port the agent listens on.
pub const AGENT_PORT: u32 = 10_789;
/// Largest frame body (type byte + payload).
pub const MAX_FRAME: usize = 1 << 20;

/// Frame types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Hello = 0x01,
    Request = 0x02,
    Response = 0x03,
    Stdin = 0x10,
    StdinEof = 0x11,
    Stdout = 0x12,
    Stderr = 0x13,
    Exit = 0x14,
    Signal = 0x15,
    Resize = 0x16,
    Error = 0x7f,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            0x01 => Kind::Hello,
            0x02 => Kind::Request,
            0x03 => Kind::Response,
            0x10 => Kind::Stdin,
            0x11 => Kind::StdinEof,
            0x12 => Kind::Stdout,
            0x13 => Kind::Stderr,
            0x14 => Kind::Exit,
            0x15 => Kind::Signal,
            0x16 => Kind::Resize,
            0x7f => Kind::Error,
            _ => return None,
        })
    }
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub payload: Vec<u8>,
}

/// Errors of the protocol.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("the connection closed")]
    Closed,
    #[error("the connection closed in the middle of a frame ({got} of {want} bytes)")]
    Truncated { got: usize, want: usize },
    #[error("a frame of {0} bytes is over the limit of {MAX_FRAME}")]
    TooLarge(usize),
    #[error("an empty frame")]
    Empty,
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    #[error("expected a {expected:?} frame, got {got:?}")]
    Unexpected { expected: Kind, got: Kind },
    #[error("bad {kind:?} payload: {message}")]
    BadPayload { kind: Kind, message: String },
    #[error(
        "protocol version mismatch: this side speaks {ours}, the other {theirs}; update the image's banger-agent (or banger) so they match"
    )]
    Version { ours: u32, theirs: u32 },
    #[error("the other side reported: {0}")]
    Remote(String),
    #[error("i/o")]
    Io(#[from] std::io::Error),
}

/// Parse a frame header (the 4 length bytes): the body length, checked against the limit.
pub fn body_len(header: [u8; 4]) -> Result<usize, ProtoError> {
    let len = u32::from_be_bytes(header) as usize;
    if len == 0 {
        return Err(ProtoError::Empty);
    }
    if len > MAX_FRAME {
        return Err(ProtoError::TooLarge(len));
    }
    Ok(len)
}

/// Decode a frame body (type byte + payload).
pub fn decode_body(mut body: Vec<u8>) -> Result<Frame, ProtoError> {
    let kind = Kind::from_u8(body[0]).ok_or(ProtoError::UnknownType(body[0]))?;
    body.remove(0);
    Ok(Frame {
        kind,
        payload: body,
    })
}

/// Encode a frame.
pub fn encode(kind: Kind, payload: &[u8]) -> Result<Vec<u8>, ProtoError> {
    let len = payload.len() + 1;
    if len > MAX_FRAME {
        return Err(ProtoError::TooLarge(len));
    }
    let mut out = Vec::with_capacity(len + 4);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    out.push(kind as u8);
    out.extend_from_slice(payload);
    Ok(out)
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<usize, std::io::Error> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Read one frame (blocking).
pub fn read_frame(r: &mut impl Read) -> Result<Frame, ProtoError> {
    let mut header = [0u8; 4];
    match read_full(r, &mut header)? {
        0 => return Err(ProtoError::Closed),
        4 => {}
        got => return Err(ProtoError::Truncated { got, want: 4 }),
    }
    let len = body_len(header)?;
    let mut body = vec![0u8; len];
    let got = read_full(r, &mut body)?;
    if got < len {
        return Err(ProtoError::Truncated { got, want: len });
    }
    decode_body(body)
}

/// Write one frame (blocking).
pub fn write_frame(w: &mut impl Write, kind: Kind, payload: &[u8]) -> Result<(), ProtoError> {
    w.write_all(&encode(kind, payload)?)?;
    w.flush()?;
    Ok(())
}

/// Write a JSON control frame.
pub fn write_json<T: Serialize>(
    w: &mut impl Write,
    kind: Kind,
    value: &T,
) -> Result<(), ProtoError> {
    let payload = serde_json::to_vec(value).expect("protocol types serialise");
    write_frame(w, kind, &payload)
}

/// Decode a JSON payload, expecting `kind`. An `Error` frame becomes [`ProtoError::Remote`].
pub fn expect_json<T: for<'de> Deserialize<'de>>(
    frame: &Frame,
    kind: Kind,
) -> Result<T, ProtoError> {
    if frame.kind == Kind::Error {
        let e: ErrorMsg = serde_json::from_slice(&frame.payload).unwrap_or(ErrorMsg {
            message: String::from_utf8_lossy(&frame.payload).into_owned(),
        });
        return Err(ProtoError::Remote(e.message));
    }
    if frame.kind != kind {
        return Err(ProtoError::Unexpected {
            expected: kind,
            got: frame.kind,
        });
    }
    serde_json::from_slice(&frame.payload).map_err(|e| ProtoError::BadPayload {
        kind,
        message: e.to_string(),
    })
}

/// `Hello`, both ways.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
    /// `banger-agent 0.1.0` or `banger 0.1.0`.
    pub software: String,
}

/// `Error`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorMsg {
    pub message: String,
}

/// What the host asks of the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Health,
    Exec(ExecRequest),
    Ports,
    Stats,
    /// The guest's ssh host public keys.
    HostKeys,
    /// Sync and power off (or reboot) the guest.
    Shutdown {
        reboot: bool,
    },
    /// Write a file: the host sends its bytes as `Stdin` frames, then `StdinEof`; the
    /// agent writes a temporary file and renames it into place, then answers `Written`.
    FilePut {
        path: String,
        mode: Option<u32>,
    },
    /// Read a file: `FileInfo`, then its bytes as `Stdout` frames, then `Exit` (code 0).
    FileGet {
        path: String,
    },
    /// Unpack a tar stream (sent like `FilePut`) into `dir`, which is created if needed;
    /// entries that would land outside `dir` are refused. Answers `Written`.
    TarIn {
        dir: String,
    },
    /// Pack `dir` as a tar stream: `Stdout` frames, then `Exit` (code 0). Hard links are
    /// packed as links to the first name seen. The other fields were added within protocol
    /// version 1, default off and are left out of the request when off, so a host talks to
    /// an older agent as before; an older agent refuses a request that sets them (unknown
    /// field), which the host reports.
    TarOut {
        dir: String,
        /// Absolute paths whose contents are left out; the directory itself is packed (like
        /// a mount point), so the tree keeps its shape.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        exclude: Vec<String>,
        /// Do not descend into a directory on another filesystem than `dir` (`tar
        /// --one-file-system`): such a directory is packed empty.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        one_file_system: bool,
        /// Pack extended attributes as PAX `SCHILY.xattr.*` records.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        xattrs: bool,
    },
    /// Open a TCP connection to `127.0.0.1:port` in the guest (sshd for `banger vm ssh`).
    /// Answers `Connected` (or `Error`), after which the connection carries raw bytes both
    /// ways, unframed, until either side closes. Added within protocol version 1: an agent
    /// that predates it answers `Error` (unknown op), which the host reports.
    TcpConnect {
        port: u16,
    },
    /// Wait until the guest has finished booting, at most `timeout_secs`: banger-init has
    /// handed over to the image's init, and systemd (when that is the init) has finished
    /// its start-up jobs (`systemctl is-system-running --wait`). The agent answers as soon
    /// as banger-init has started it, well before the image's services run, so `vm run`
    /// asks this before running a command. Answers `Boot`. Added within protocol version 1:
    /// an older agent answers `Error` (unknown op), which the host takes as "booted".
    Boot {
        timeout_secs: u32,
    },
    /// The guest was just restored from saved state (`vm start` of a suspended VM): step
    /// the wall clock to the host's (`unix_nanos`, nanoseconds since the epoch when the
    /// host sent this) and mix `entropy` (host random bytes) into the kernel's pool, then
    /// reseed its CRNG (RNDADDENTROPY + RNDRESEEDCRNG: microvm has no VMGenID, so the
    /// kernel cannot tell it was restored). Answers `Restored`. Added within protocol
    /// version 1: an older agent answers `Error` (unknown op), which the host logs.
    Restored {
        unix_nanos: u64,
        entropy: Vec<u8>,
    },
    /// Become another machine: a VM restored from another VM's saved state (a fork, a
    /// create from a snapshot) runs that VM's guest, so before its network is attached it
    /// takes its own identity (see [`crate::agent::identity`]): hostname `name` (and
    /// `/etc/hostname`, its `/etc/hosts` line), a fresh `/etc/machine-id`, a new ssh host
    /// key (sshd reloads it), and with `net` its NIC re-addressed. Sent after `Restored`,
    /// so the machine id comes from a reseeded RNG. Answers `Identity`. Added within
    /// protocol version 1: an older agent answers `Error` (unknown op), and the host then
    /// refuses to run the clone. `host_key`: the new ed25519 host key, made by the host
    /// (an `ssh-keygen` in an emulated guest costs a large part of a warm start); the agent
    /// makes one itself without it.
    Identity {
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        net: Option<IdentityNet>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        host_key: Option<HostKey>,
    },
}

/// An ssh host key pair in OpenSSH's formats (`ssh_host_ed25519_key` and its `.pub`).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostKey {
    pub private: String,
    pub public: String,
}

impl std::fmt::Debug for HostKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostKey")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

/// The network half of `Identity`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityNet {
    /// The NIC's new MAC, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// `<addr>/<prefix>` the guest has now (the source VM's), removed; and the new one.
    pub old_address: Option<String>,
    pub address: String,
    pub gateway: Option<std::net::Ipv4Addr>,
    pub dns: Option<std::net::Ipv4Addr>,
}

/// Where banger-init says which init runs the guest once it has set up (in the guest's
/// `/run`): [`BOOT_INIT_SYSTEMD`], [`BOOT_INIT_BANGER`], or `other <path>`.
pub const BOOT_INIT_MARKER: &str = "/run/banger/init";
/// [`BOOT_INIT_MARKER`] when banger-init has exec'd systemd.
pub const BOOT_INIT_SYSTEMD: &str = "systemd";
/// [`BOOT_INIT_MARKER`] when banger-init stays PID 1 (an image without an init).
pub const BOOT_INIT_BANGER: &str = "banger-init";

/// How far the guest's boot is (`Response::Boot`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootState {
    /// `systemd`, `banger-init` (no init of the image's own), or the path of another init.
    pub init: String,
    /// systemd's system state (`running`, `degraded`, `starting`, ...); `running` for
    /// banger-init; `unknown` for another init; `starting` when the wait timed out.
    pub state: String,
    /// Failed units, when `degraded`.
    #[serde(default)]
    pub failed: Vec<String>,
}

impl BootState {
    /// Boot has finished (whether or not every unit started).
    pub fn finished(&self) -> bool {
        matches!(self.state.as_str(), "running" | "degraded" | "unknown")
    }
}

/// `exec`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    #[serde(default)]
    pub cwd: Option<String>,
    /// Run under a pseudo-terminal (stdout and stderr merged, as on a terminal).
    #[serde(default)]
    pub tty: bool,
    #[serde(default)]
    pub rows: u16,
    #[serde(default)]
    pub cols: u16,
}

/// `Exit`: how an exec ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

/// `Signal` (host → guest during exec).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignalMsg {
    pub signal: i32,
}

/// `Resize` (host → guest during a tty exec).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResizeMsg {
    pub rows: u16,
    pub cols: u16,
}

/// A listening socket in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Port {
    /// `tcp`, `tcp6`, `udp`, `udp6`.
    pub proto: String,
    pub address: String,
    pub port: u16,
    pub pid: Option<i32>,
    pub process: Option<String>,
}

/// Guest figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestStats {
    pub load: [f64; 3],
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    pub root_total_bytes: u64,
    pub root_free_bytes: u64,
    pub work_total_bytes: u64,
    pub work_free_bytes: u64,
    pub uptime_secs: u64,
    pub processes: u32,
}

/// Answers to the non-streaming requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Response {
    Health {
        software: String,
        uptime_secs: u64,
    },
    Ports {
        ports: Vec<Port>,
    },
    Stats {
        stats: GuestStats,
    },
    HostKeys {
        keys: Vec<String>,
    },
    ShuttingDown,
    Written {
        bytes: u64,
    },
    FileInfo {
        size: u64,
        mode: u32,
    },
    Connected,
    Boot {
        boot: BootState,
    },
    /// How far the clock was stepped (guest time after minus before, in ms) and whether
    /// the entropy was credited and the CRNG reseeded.
    Restored {
        clock_step_ms: i64,
        reseeded: bool,
    },
    /// The identity taken: the new machine id and ssh host public keys.
    Identity {
        machine_id: String,
        host_keys: Vec<String>,
    },
}

/// The host side of the handshake on a connected stream.
pub fn client_hello(s: &mut (impl Read + Write), software: &str) -> Result<Hello, ProtoError> {
    write_json(
        s,
        Kind::Hello,
        &Hello {
            version: PROTOCOL_VERSION,
            software: software.into(),
        },
    )?;
    let theirs: Hello = expect_json(&read_frame(s)?, Kind::Hello)?;
    if theirs.version != PROTOCOL_VERSION {
        return Err(ProtoError::Version {
            ours: PROTOCOL_VERSION,
            theirs: theirs.version,
        });
    }
    Ok(theirs)
}

/// The agent side of the handshake: answers, or reports a mismatch and fails.
pub fn server_hello(s: &mut (impl Read + Write), software: &str) -> Result<Hello, ProtoError> {
    let theirs: Hello = expect_json(&read_frame(s)?, Kind::Hello)?;
    if theirs.version != PROTOCOL_VERSION {
        let err = ProtoError::Version {
            ours: PROTOCOL_VERSION,
            theirs: theirs.version,
        };
        let _ = write_json(
            s,
            Kind::Error,
            &ErrorMsg {
                message: err.to_string(),
            },
        );
        return Err(err);
    }
    write_json(
        s,
        Kind::Hello,
        &Hello {
            version: PROTOCOL_VERSION,
            software: software.into(),
        },
    )?;
    Ok(theirs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn tcp_connect_has_a_stable_wire_form() {
        let req = Request::TcpConnect { port: 22 };
        let json = serde_json::to_string(&req).unwrap();
        assert_eq!(json, r#"{"op":"tcp_connect","port":22}"#);
        assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), req);
        assert_eq!(
            serde_json::to_string(&Response::Connected).unwrap(),
            r#"{"op":"connected"}"#
        );
        // A port out of range is refused, not truncated.
        assert!(serde_json::from_str::<Request>(r#"{"op":"tcp_connect","port":70000}"#).is_err());
    }

    #[test]
    fn tar_out_options_are_left_out_when_off_and_optional_when_read() {
        // What a host of before the options sends, and what a host sends with them off:
        // the same bytes, so an older agent understands it.
        let plain = r#"{"op":"tar_out","dir":"/root/repo"}"#;
        let req = Request::TarOut {
            dir: "/root/repo".into(),
            exclude: Vec::new(),
            one_file_system: false,
            xattrs: false,
        };
        assert_eq!(serde_json::to_string(&req).unwrap(), plain);
        assert_eq!(serde_json::from_str::<Request>(plain).unwrap(), req);
        let full = Request::TarOut {
            dir: "/".into(),
            exclude: vec!["/proc".into()],
            one_file_system: true,
            xattrs: true,
        };
        let json = serde_json::to_string(&full).unwrap();
        assert_eq!(
            json,
            r#"{"op":"tar_out","dir":"/","exclude":["/proc"],"one_file_system":true,"xattrs":true}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), full);
    }

    #[test]
    fn frames_round_trip() {
        let mut buf = Vec::new();
        write_frame(&mut buf, Kind::Stdout, b"hello").unwrap();
        write_json(
            &mut buf,
            Kind::Request,
            &Request::Exec(ExecRequest {
                argv: vec!["true".into()],
                ..Default::default()
            }),
        )
        .unwrap();
        let mut r = Cursor::new(buf);
        assert_eq!(
            read_frame(&mut r).unwrap(),
            Frame {
                kind: Kind::Stdout,
                payload: b"hello".to_vec()
            }
        );
        let req: Request = expect_json(&read_frame(&mut r).unwrap(), Kind::Request).unwrap();
        assert!(matches!(req, Request::Exec(e) if e.argv == ["true"]));
        assert!(matches!(read_frame(&mut r), Err(ProtoError::Closed)));
    }

    #[test]
    fn truncated_frames_are_errors_not_hangs() {
        let full = encode(Kind::Stdout, b"0123456789").unwrap();
        for cut in [1, 3, 5, full.len() - 1] {
            let err = read_frame(&mut Cursor::new(full[..cut].to_vec())).unwrap_err();
            assert!(
                matches!(err, ProtoError::Truncated { .. }),
                "cut at {cut}: {err}"
            );
        }
    }

    #[test]
    fn oversized_frames_are_refused_from_the_header() {
        let mut bytes = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
        bytes.push(Kind::Stdout as u8);
        // Nothing else follows: a reader that allocated and waited would fail differently.
        assert!(
            matches!(read_frame(&mut Cursor::new(bytes)), Err(ProtoError::TooLarge(n)) if n == MAX_FRAME + 1)
        );
        assert!(matches!(
            encode(Kind::Stdout, &vec![0; MAX_FRAME]),
            Err(ProtoError::TooLarge(_))
        ));
        assert!(matches!(
            read_frame(&mut Cursor::new(vec![0, 0, 0, 0])),
            Err(ProtoError::Empty)
        ));
    }

    #[test]
    fn unknown_types_and_bad_payloads_are_named() {
        let mut bytes = 2u32.to_be_bytes().to_vec();
        bytes.extend([0x55, b'x']);
        let err = read_frame(&mut Cursor::new(bytes)).unwrap_err();
        assert_eq!(err.to_string(), "unknown frame type 0x55");
        let f = Frame {
            kind: Kind::Request,
            payload: br#"{"op":"format_disk"}"#.to_vec(),
        };
        assert!(matches!(
            expect_json::<Request>(&f, Kind::Request),
            Err(ProtoError::BadPayload { .. })
        ));
        let f = Frame {
            kind: Kind::Stdout,
            payload: vec![],
        };
        assert!(matches!(
            expect_json::<Request>(&f, Kind::Request),
            Err(ProtoError::Unexpected { .. })
        ));
        let f = Frame {
            kind: Kind::Error,
            payload: br#"{"message":"no such file"}"#.to_vec(),
        };
        assert!(
            matches!(expect_json::<Request>(&f, Kind::Request), Err(ProtoError::Remote(m)) if m == "no such file")
        );
    }

    #[test]
    fn handshake_and_version_mismatch_on_both_sides() {
        use std::os::unix::net::UnixStream;
        let (mut host, mut agent) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            server_hello(&mut agent, "banger-agent test").map(|h| h.software)
        });
        assert_eq!(
            client_hello(&mut host, "banger test").unwrap().software,
            "banger-agent test"
        );
        assert_eq!(t.join().unwrap().unwrap(), "banger test");

        // A host from the future: the agent says so and closes; the host reads the reason.
        let (mut host, mut agent) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || server_hello(&mut agent, "agent"));
        write_json(
            &mut host,
            Kind::Hello,
            &Hello {
                version: PROTOCOL_VERSION + 1,
                software: "future".into(),
            },
        )
        .unwrap();
        let reply = read_frame(&mut host).unwrap();
        let err = expect_json::<Hello>(&reply, Kind::Hello).unwrap_err();
        assert!(err.to_string().contains("version mismatch"), "{err}");
        assert!(matches!(t.join().unwrap(), Err(ProtoError::Version { .. })));

        // An agent from the past: the host refuses it with both versions named.
        let (mut host, mut agent) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            let _ = read_frame(&mut agent);
            write_json(
                &mut agent,
                Kind::Hello,
                &Hello {
                    version: 0,
                    software: "old".into(),
                },
            )
            .unwrap();
        });
        let err = client_hello(&mut host, "banger").unwrap_err();
        assert!(
            matches!(
                err,
                ProtoError::Version {
                    ours: PROTOCOL_VERSION,
                    theirs: 0
                }
            ),
            "{err}"
        );
        t.join().unwrap();
    }
}
