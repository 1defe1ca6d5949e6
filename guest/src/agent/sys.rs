//! What the agent reads from the guest: /proc for ports, load, memory, uptime; statvfs for
//! disks; /etc/ssh for host keys. And how it shuts the guest down.

use std::collections::HashMap;

use crate::proto::{GuestStats, Port};

pub fn uptime_secs() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map(|f| f as u64)
        .unwrap_or(0)
}

/// Socket inode → (pid, command name), from /proc/*/fd.
fn socket_owners() -> HashMap<u64, (i32, String)> {
    let mut out = HashMap::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let comm = std::fs::read_to_string(p.path().join("comm"))
            .map(|c| c.trim().to_owned())
            .unwrap_or_default();
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path())
                && let Some(inode) = target
                    .to_string_lossy()
                    .strip_prefix("socket:[")
                    .and_then(|r| r.strip_suffix(']'))
                    .and_then(|n| n.parse().ok())
            {
                out.entry(inode).or_insert((pid, comm.clone()));
            }
        }
    }
    out
}

/// Decode `0100007F:1F90` (IPv4) or the 32-hex-digit IPv6 form.
fn decode_addr(hex: &str) -> Option<(String, u16)> {
    let (addr, port) = hex.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match addr.len() {
        8 => {
            let n = u32::from_str_radix(addr, 16).ok()?;
            std::net::Ipv4Addr::from(n.to_le_bytes()).to_string()
        }
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in (0..4).map(|i| &addr[i * 8..i * 8 + 8]).enumerate() {
                let word = u32::from_str_radix(chunk, 16).ok()?;
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word.to_le_bytes());
            }
            std::net::Ipv6Addr::from(bytes).to_string()
        }
        _ => return None,
    };
    Some((ip, port))
}

/// Parse one /proc/net table: listening TCP (state 0A) or bound UDP (state 07) sockets.
pub fn parse_net_table(text: &str, proto: &str) -> Vec<(String, u16, u64)> {
    let listening = if proto.starts_with("tcp") { "0A" } else { "07" };
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.get(3)? != &listening {
                return None;
            }
            let (ip, port) = decode_addr(f.get(1)?)?;
            let inode = f.get(9)?.parse().ok()?;
            Some((ip, port, inode))
        })
        .collect()
}

/// Listening TCP and UDP sockets, with their processes.
pub fn listening_ports() -> Vec<Port> {
    let mut sockets = Vec::new();
    for proto in ["tcp", "tcp6", "udp", "udp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/net/{proto}")) else {
            continue;
        };
        for s in parse_net_table(&text, proto) {
            sockets.push((proto, s));
        }
    }
    // Owners after the tables: a socket listed above already has its fd, so a listener
    // that appeared between the two reads is not left without its process.
    let owners = socket_owners();
    let mut out = Vec::new();
    for (proto, (address, port, inode)) in sockets {
        let owner = owners.get(&inode);
        out.push(Port {
            proto: proto.into(),
            address,
            port,
            pid: owner.map(|o| o.0),
            process: owner.map(|o| o.1.clone()),
        });
    }
    out.sort_by(|a, b| (a.port, &a.proto).cmp(&(b.port, &b.proto)));
    out
}

fn meminfo(key: &str, text: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| {
            v.trim_start_matches(':')
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

fn disk(path: &str) -> (u64, u64) {
    nix::sys::statvfs::statvfs(path)
        .map(|s| {
            let f = s.fragment_size();
            (s.blocks() * f, s.blocks_available() * f)
        })
        .unwrap_or((0, 0))
}

pub fn stats() -> GuestStats {
    let load: Vec<f64> = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .filter_map(|x| x.parse().ok())
        .collect();
    let mem = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let (root_total, root_free) = disk("/");
    let (work_total, work_free) = disk("/root");
    let processes = std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .bytes()
                        .all(|b| b.is_ascii_digit())
                })
                .count() as u32
        })
        .unwrap_or(0);
    GuestStats {
        load: [
            load.first().copied().unwrap_or(0.0),
            load.get(1).copied().unwrap_or(0.0),
            load.get(2).copied().unwrap_or(0.0),
        ],
        memory_total_bytes: meminfo("MemTotal", &mem),
        memory_available_bytes: meminfo("MemAvailable", &mem),
        root_total_bytes: root_total,
        root_free_bytes: root_free,
        work_total_bytes: work_total,
        work_free_bytes: work_free,
        uptime_secs: uptime_secs(),
        processes,
    }
}

/// The guest's ssh host public keys (`/etc/ssh/ssh_host_*_key.pub`).
pub fn host_keys() -> Vec<String> {
    let mut keys: Vec<String> = std::fs::read_dir("/etc/ssh")
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    n.starts_with("ssh_host_") && n.ends_with("_key.pub")
                })
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .map(|k| k.trim().to_owned())
                .collect()
        })
        .unwrap_or_default();
    keys.sort();
    keys
}

/// Ask PID 1 to power off (or reboot): under systemd, `systemctl poweroff`/`reboot` (not
/// SIGINT, whose ctrl-alt-del.target an image may mask); banger-init takes SIGTERM and
/// SIGINT (and reboots for both: see banger-init). The daemon asks for a reboot under
/// Firecracker, which exits on a guest reboot but not on a power-off.
pub fn shutdown(reboot: bool) {
    nix::unistd::sync();
    let init_is_systemd =
        std::fs::read_to_string("/proc/1/comm").is_ok_and(|c| c.trim() == "systemd");
    let pid1 = nix::unistd::Pid::from_raw(1);
    if init_is_systemd {
        let verb = if reboot { "reboot" } else { "poweroff" };
        let _ = std::process::Command::new("systemctl").arg(verb).status();
    } else if reboot {
        let _ = nix::sys::signal::kill(pid1, nix::sys::signal::Signal::SIGINT);
    } else {
        let _ = nix::sys::signal::kill(pid1, nix::sys::signal::Signal::SIGTERM);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_tables() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1\n   1: 0100007F:1F91 0100007F:9999 01 00000000:00000000 00:00000000 00000000     0        0 12346 1\n";
        assert_eq!(
            parse_net_table(tcp, "tcp"),
            vec![("127.0.0.1".into(), 8080, 12345)]
        );
        let tcp6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 00000000000000000000000000000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 777 1\n";
        assert_eq!(parse_net_table(tcp6, "tcp6"), vec![("::".into(), 22, 777)]);
        let udp = "  sl  local_address rem_address   st\n  1: 00000000:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 99 2\n";
        assert_eq!(
            parse_net_table(udp, "udp"),
            vec![("0.0.0.0".into(), 53, 99)]
        );
    }
}

/// `Restored`: step CLOCK_REALTIME to `unix_nanos` and feed `entropy` to the kernel's
/// pool, crediting it, then reseed the CRNG.
pub fn restored(unix_nanos: u64, entropy: &[u8]) -> Result<crate::proto::Response, String> {
    use nix::time::{ClockId, clock_gettime, clock_settime};
    let to = nix::sys::time::TimeSpec::new(
        (unix_nanos / 1_000_000_000) as i64,
        (unix_nanos % 1_000_000_000) as i64,
    );
    let before = clock_gettime(ClockId::CLOCK_REALTIME).map_err(|e| format!("clock: {e}"))?;
    clock_settime(ClockId::CLOCK_REALTIME, to).map_err(|e| format!("setting the clock: {e}"))?;
    let step = to - before;
    let clock_step_ms = step.tv_sec() * 1000 + step.tv_nsec() / 1_000_000;
    let reseeded = add_entropy(entropy)
        .map_err(|e| format!("adding entropy: {e}"))
        .is_ok_and(|()| reseed().is_ok());
    Ok(crate::proto::Response::Restored {
        clock_step_ms,
        reseeded,
    })
}

/// At most this many bytes of host entropy are taken.
const ENTROPY_MAX: usize = 256;

/// `struct rand_pool_info` of `<linux/random.h>` with its buffer inline.
#[repr(C)]
struct RandPoolInfo {
    entropy_count: i32,
    buf_size: i32,
    buf: [u8; ENTROPY_MAX],
}

// RNDADDENTROPY is `_IOW('R', 0x03, int[2])`, RNDRESEEDCRNG `_IO('R', 0x07)`.
nix::ioctl_write_ptr_bad!(
    rnd_add_entropy,
    nix::request_code_write!(b'R', 0x03, 2 * std::mem::size_of::<i32>()),
    RandPoolInfo
);
nix::ioctl_none!(rnd_reseed_crng, b'R', 0x07);

#[allow(unsafe_code)]
fn add_entropy(bytes: &[u8]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let n = bytes.len().min(ENTROPY_MAX);
    let mut info = RandPoolInfo {
        entropy_count: (n * 8) as i32,
        buf_size: n as i32,
        buf: [0; ENTROPY_MAX],
    };
    info.buf[..n].copy_from_slice(&bytes[..n]);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    // SAFETY: `f` is open for the call; `info` is a valid rand_pool_info whose buffer
    // holds `buf_size` bytes, which the kernel only reads.
    unsafe { rnd_add_entropy(f.as_raw_fd(), &info) }?;
    Ok(())
}

#[allow(unsafe_code)]
fn reseed() -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    // SAFETY: `f` is open for the call; RNDRESEEDCRNG takes no argument.
    unsafe { rnd_reseed_crng(f.as_raw_fd()) }?;
    Ok(())
}
