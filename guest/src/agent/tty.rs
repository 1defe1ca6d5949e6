//! `exec` on a pseudo-terminal: the command becomes a session leader with the pty's slave
//! as its controlling terminal (so job control, Ctrl-C and `isatty` work), its input and
//! output go through the master, and `Resize` frames set the window size.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use nix::pty::{Winsize, openpty};

use super::Conn;
use crate::proto::{self, ErrorMsg, ExecRequest, Kind, ProtoError, ResizeMsg};

nix::ioctl_write_ptr_bad!(set_winsize, nix::libc::TIOCSWINSZ, Winsize);

fn winsize(rows: u16, cols: u16) -> Winsize {
    Winsize {
        ws_row: if rows == 0 { 24 } else { rows },
        ws_col: if cols == 0 { 80 } else { cols },
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// Set the window size of the pty whose master is `master`.
#[allow(unsafe_code)]
fn resize(master: &OwnedFd, rows: u16, cols: u16) {
    let ws = winsize(rows, cols);
    // SAFETY: `master` is an open pty master for the whole call and `ws` a valid Winsize;
    // TIOCSWINSZ only reads the struct.
    let _ = unsafe { set_winsize(master.as_raw_fd(), &ws) };
}

/// Make the child a session leader whose controlling terminal is `slave` (at `path`).
#[allow(unsafe_code)]
fn controlling_tty(cmd: &mut Command, path: std::path::PathBuf) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and calls only setsid(2), open(2) and
    // close(2), which are async-signal-safe; the path was allocated before the fork, and
    // nix converts short paths on the stack.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            // A session leader acquires its controlling terminal by opening it.
            let fd = nix::fcntl::open(
                &path,
                nix::fcntl::OFlag::O_RDWR,
                nix::sys::stat::Mode::empty(),
            )
            .map_err(std::io::Error::from)?;
            drop(fd);
            Ok(())
        });
    }
}

pub(super) fn exec<C: Conn>(mut conn: C, req: ExecRequest) -> Result<(), ProtoError> {
    let fail =
        |conn: &mut C, message: String| proto::write_json(conn, Kind::Error, &ErrorMsg { message });
    let Some((prog, args)) = req.argv.split_first() else {
        return fail(&mut conn, "exec needs a command".into());
    };
    let pty = match openpty(&winsize(req.rows, req.cols), None) {
        Ok(p) => p,
        Err(e) => return fail(&mut conn, format!("cannot open a pseudo-terminal: {e}")),
    };
    let path = match nix::unistd::ttyname(&pty.slave) {
        Ok(p) => p,
        Err(e) => return fail(&mut conn, format!("cannot name the pseudo-terminal: {e}")),
    };
    let mut cmd = Command::new(prog);
    cmd.args(args);
    if !req.env.iter().any(|(k, _)| k == "TERM") {
        cmd.env("TERM", "xterm-256color");
    }
    cmd.envs(req.env.iter().map(|(k, v)| (k, v)));
    if let Some(cwd) = &req.cwd {
        cmd.current_dir(cwd);
    }
    for (i, stdio) in [0, 1, 2].iter().map(|_| pty.slave.try_clone()).enumerate() {
        let stdio = Stdio::from(stdio?);
        match i {
            0 => cmd.stdin(stdio),
            1 => cmd.stdout(stdio),
            _ => cmd.stderr(stdio),
        };
    }
    controlling_tty(&mut cmd, path);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return fail(&mut conn, format!("cannot run {prog}: {e}")),
    };
    drop(cmd);
    drop(pty.slave);
    let pid = child.id() as i32;
    let master = Arc::new(pty.master);
    let writer = Arc::new(Mutex::new(conn.try_clone_conn()?));

    // Output: the master until the slave side is gone (EIO).
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let out = {
        let mut from = std::fs::File::from(master.try_clone()?);
        let w = Arc::clone(&writer);
        std::thread::spawn(move || {
            let _done = done_tx;
            let mut buf = vec![0u8; 32 * 1024];
            while let Ok(n @ 1..) = from.read(&mut buf) {
                let mut w = w.lock().expect("writer lock");
                if proto::write_frame(&mut *w, Kind::Stdout, &buf[..n]).is_err() {
                    break;
                }
            }
        })
    };
    // Input, resizes and signals from the host.
    let mut reader = conn;
    let reader_conn = reader.try_clone_conn()?;
    let input = {
        let master = Arc::clone(&master);
        let mut to = std::fs::File::from(master.try_clone()?);
        std::thread::spawn(move || {
            while let Ok(frame) = proto::read_frame(&mut reader) {
                match frame.kind {
                    Kind::Stdin => {
                        let _ = to.write_all(&frame.payload);
                    }
                    // End of input on a terminal is ^D.
                    Kind::StdinEof => {
                        let _ = to.write_all(&[4]);
                    }
                    Kind::Resize => {
                        if let Ok(r) = serde_json::from_slice::<ResizeMsg>(&frame.payload) {
                            resize(&master, r.rows, r.cols);
                        }
                    }
                    Kind::Signal => super::forward_signal(&frame.payload, pid),
                    _ => {}
                }
            }
        })
    };
    let status = child.wait()?;
    let _ = out;
    super::finish(status, &done_rx, &writer, &reader_conn, input)
}

#[cfg(test)]
mod tests {
    use super::super::tests_support::{read_all, request};
    use crate::proto::{self, ExecRequest, Kind, Request, ResizeMsg};

    #[test]
    fn a_tty_exec_has_a_controlling_terminal_and_a_size() {
        let req = ExecRequest {
            argv: vec![
                "sh".into(),
                "-c".into(),
                "tty; test -t 0 && echo isatty; stty size; echo $TERM".into(),
            ],
            tty: true,
            rows: 30,
            cols: 100,
            ..Default::default()
        };
        let (out, exit) = read_all(request(&Request::Exec(req)));
        let text = String::from_utf8_lossy(&out);
        assert_eq!(exit.code, Some(0), "{text}");
        assert!(text.contains("/dev/pts/"), "{text}");
        assert!(text.contains("isatty"), "{text}");
        assert!(text.contains("30 100"), "{text}");
        assert!(text.contains("xterm-256color"), "{text}");
    }

    #[test]
    fn a_tty_exec_takes_input_and_resizes() {
        let req = ExecRequest {
            argv: vec![
                "sh".into(),
                "-c".into(),
                "read line; echo got:$line; stty size".into(),
            ],
            tty: true,
            ..Default::default()
        };
        let mut s = request(&Request::Exec(req));
        proto::write_json(
            &mut s,
            Kind::Resize,
            &ResizeMsg {
                rows: 40,
                cols: 120,
            },
        )
        .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
        proto::write_frame(&mut s, Kind::Stdin, b"hello\r").unwrap();
        let (out, exit) = read_all(s);
        let text = String::from_utf8_lossy(&out);
        assert_eq!(exit.code, Some(0), "{text}");
        assert!(text.contains("got:hello"), "{text}");
        assert!(text.contains("40 120"), "{text}");
    }
}
