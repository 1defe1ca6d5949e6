//! banger-agent: the guest side of `vm exec`, `vm ports`, `vm stats` and graceful
//! shutdown. Listens on AF_VSOCK port [`AGENT_PORT`](banger_guest::proto::AGENT_PORT)
//! (Firecracker), and on the virtio-serial port `banger.agent` when the VM has one (QEMU:
//! see [`banger_guest::mux`]); one thread per connection. Started (and restarted) by
//! banger-init.
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

/// How long the agent waits for the `banger.agent` port to appear once the VM has a
/// virtio console device (the host announces its ports just after the driver loads).
const PORT_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Serve the virtio-serial port in a thread of its own when the VM has one.
fn spawn_serial() -> Option<std::thread::JoinHandle<()>> {
    use banger_guest::mux::guest;
    let sys = std::path::Path::new("/sys");
    if !guest::has_console_device(sys) {
        return None;
    }
    let handle = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + PORT_WAIT;
        let port = loop {
            if let Some(p) = guest::find_port(sys, std::path::Path::new("/dev")) {
                break p;
            }
            if std::time::Instant::now() >= deadline {
                eprintln!(
                    "banger-agent: no virtio-serial port named {}",
                    banger_guest::mux::PORT_NAME
                );
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(r) => r,
            Err(e) => {
                eprintln!("banger-agent: {e}");
                return;
            }
        };
        let listen: guest::Listen = std::sync::Arc::new(|port| {
            if port != AGENT_PORT {
                return None;
            }
            let (ours, theirs) = std::os::unix::net::UnixStream::pair().ok()?;
            std::thread::spawn(move || {
                if let Err(e) = agent::serve(ours) {
                    eprintln!("banger-agent: connection: {e}");
                }
            });
            Some(theirs)
        });
        eprintln!(
            "banger-agent: {} listening on {} port {AGENT_PORT}",
            agent::software(),
            port.display()
        );
        if let Err(e) = runtime.block_on(guest::serve_port(&port, listen)) {
            eprintln!("banger-agent: {}: {e}", port.display());
        }
    });
    Some(handle)
}

fn main() {
    // Kept in the binary: the host reads the guest side's revision from an image.
    std::hint::black_box(banger_guest::REVISION_MARK);
    let serial = spawn_serial();
    if let Some(serial) = serial {
        // QEMU: no vsock device, so the port is the only channel.
        let _ = serial.join();
        std::process::exit(1);
    }
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
