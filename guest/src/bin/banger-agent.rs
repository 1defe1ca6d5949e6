//! banger-agent: the guest side of `vm exec`, `vm ports`, `vm stats` and graceful
//! shutdown. Listens on AF_VSOCK port [`AGENT_PORT`](banger_guest::proto::AGENT_PORT); one
//! thread per connection. Started (and restarted) by banger-init.
#![allow(clippy::print_stderr)]

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};

use banger_guest::agent::{self, Conn};
use banger_guest::proto::AGENT_PORT;
use nix::sys::socket::{
    AddressFamily, Backlog, Shutdown, SockFlag, SockType, VsockAddr, accept, bind, listen, socket,
};

/// A vsock connection.
struct Vsock(std::fs::File);

impl Read for Vsock {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Vsock {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Conn for Vsock {
    fn try_clone_conn(&self) -> std::io::Result<Self> {
        self.0.try_clone().map(Vsock)
    }
    fn shutdown_conn(&self) {
        let _ = nix::sys::socket::shutdown(
            std::os::fd::AsRawFd::as_raw_fd(&self.0.as_fd()),
            Shutdown::Both,
        );
    }
}

/// Take ownership of a descriptor accept(2) just returned.
#[allow(unsafe_code)]
fn own(fd: std::os::fd::RawFd) -> OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: `fd` was returned by a successful accept(2) a moment ago; nothing else holds
    // or closes it, so this OwnedFd is its only owner.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn main() {
    const VMADDR_CID_ANY: u32 = u32::MAX;
    let listener: OwnedFd = match socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    ) {
        Ok(fd) => fd,
        Err(e) => {
            eprintln!("banger-agent: no vsock ({e}); is the virtio vsock transport loaded?");
            std::process::exit(1);
        }
    };
    if let Err(e) = bind(
        std::os::fd::AsRawFd::as_raw_fd(&listener),
        &VsockAddr::new(VMADDR_CID_ANY, AGENT_PORT),
    )
    .and_then(|()| listen(&listener, Backlog::new(64).expect("backlog")))
    {
        eprintln!("banger-agent: cannot listen on vsock port {AGENT_PORT}: {e}");
        std::process::exit(1);
    }
    eprintln!(
        "banger-agent: {} listening on vsock port {AGENT_PORT}",
        agent::software()
    );
    loop {
        match accept(std::os::fd::AsRawFd::as_raw_fd(&listener)) {
            Ok(fd) => {
                let conn = Vsock(std::fs::File::from(own(fd)));
                std::thread::spawn(move || {
                    if let Err(e) = agent::serve(conn) {
                        eprintln!("banger-agent: connection: {e}");
                    }
                });
            }
            Err(e) => {
                eprintln!("banger-agent: accept: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
}
