//! The guest's network, from the kernel command line (`banger.ip=<addr>/<prefix>`,
//! `banger.gw`, `banger.dns`): the Debian kernel has no `ip=` support, so banger-init
//! brings up `lo` and the first ethernet link, adds the address and a default route
//! through rtnetlink (neli), and writes `/etc/resolv.conf`.

use std::io;
use std::net::Ipv4Addr;

use neli::{
    consts::{
        nl::NlmF,
        rtnl::{Ifa, IfaF, Iff, Ifla, RtAddrFamily, RtScope, RtTable, Rta, Rtm, Rtn, Rtprot},
        socket::NlFamily,
    },
    nl::{NlPayload, NlmsghdrBuilder},
    rtnl::{IfaddrmsgBuilder, IfinfomsgBuilder, RtattrBuilder, RtmsgBuilder},
    socket::synchronous::NlSocketHandle,
    types::{Buffer, RtBuffer},
    utils::Groups,
};

/// The network settings of the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
    pub dns: Option<Ipv4Addr>,
}

impl NetConfig {
    /// From the command line; None when it has no `banger.ip`.
    pub fn from_cmdline(cmdline: &str) -> Result<Option<NetConfig>, String> {
        let Some(ip) = super::param(cmdline, "banger.ip") else {
            return Ok(None);
        };
        let (addr, prefix) = ip
            .split_once('/')
            .ok_or_else(|| format!("banger.ip={ip}: expected <address>/<prefix>"))?;
        let address = addr.parse().map_err(|e| format!("banger.ip={ip}: {e}"))?;
        let prefix: u8 = prefix.parse().map_err(|e| format!("banger.ip={ip}: {e}"))?;
        if prefix > 32 {
            return Err(format!("banger.ip={ip}: prefix over 32"));
        }
        let opt = |key: &str| -> Result<Option<Ipv4Addr>, String> {
            super::param(cmdline, key)
                .map(|v| v.parse().map_err(|e| format!("{key}={v}: {e}")))
                .transpose()
        };
        Ok(Some(NetConfig {
            address,
            prefix,
            gateway: opt("banger.gw")?,
            dns: opt("banger.dns")?,
        }))
    }
}

/// The first ethernet-like link (not `lo`), by name: the VM's one NIC.
pub fn first_nic() -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "lo")
        .collect();
    names.sort();
    names.into_iter().next()
}

fn err(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

struct Rtnl {
    sock: NlSocketHandle,
    seq: u32,
}

impl Rtnl {
    fn connect() -> io::Result<Rtnl> {
        Ok(Rtnl {
            sock: NlSocketHandle::connect(NlFamily::Route, None, Groups::empty())
                .map_err(|e| err("netlink", e))?,
            seq: 0,
        })
    }

    fn request<P>(&mut self, what: &str, ty: Rtm, flags: NlmF, payload: P) -> io::Result<()>
    where
        P: neli::Size + neli::ToBytes + std::fmt::Debug,
    {
        self.seq += 1;
        let msg = NlmsghdrBuilder::default()
            .nl_type(ty)
            .nl_flags(flags | NlmF::REQUEST | NlmF::ACK)
            .nl_seq(self.seq)
            .nl_payload(NlPayload::Payload(payload))
            .build()
            .map_err(|e| err(what, e))?;
        self.sock.send(&msg).map_err(|e| err(what, e))?;
        loop {
            let (msgs, _) = self.sock.recv::<Rtm, Buffer>().map_err(|e| err(what, e))?;
            for m in msgs {
                let m = m.map_err(|e| err(what, e))?;
                if *m.nl_seq() != self.seq {
                    continue;
                }
                match m.nl_payload() {
                    NlPayload::Ack(_) => return Ok(()),
                    NlPayload::Err(e) => {
                        let errno = -*e.error();
                        let os = io::Error::from_raw_os_error(errno);
                        return Err(io::Error::new(os.kind(), format!("{what}: {os}")));
                    }
                    _ => {}
                }
            }
        }
    }

    fn up(&mut self, index: u32) -> io::Result<()> {
        let msg = IfinfomsgBuilder::default()
            .ifi_family(RtAddrFamily::Unspecified)
            .ifi_index(index as i32)
            .ifi_flags(Iff::UP)
            .ifi_change(Iff::UP)
            .build()
            .map_err(|e| err("link up", e))?;
        self.request("link up", Rtm::Newlink, NlmF::empty(), msg)
    }

    /// Down: the kernel drops the link's neighbour entries and its routes with it.
    fn down(&mut self, index: u32) -> io::Result<()> {
        let msg = IfinfomsgBuilder::default()
            .ifi_family(RtAddrFamily::Unspecified)
            .ifi_index(index as i32)
            .down()
            .build()
            .map_err(|e| err("link down", e))?;
        self.request("link down", Rtm::Newlink, NlmF::empty(), msg)
    }

    fn set_mac(&mut self, index: u32, mac: [u8; 6]) -> io::Result<()> {
        let what = "set the mac address";
        let mut attrs = RtBuffer::<Ifla, Buffer>::new();
        attrs.push(
            RtattrBuilder::default()
                .rta_type(Ifla::Address)
                .rta_payload(mac)
                .build()
                .map_err(|e| err(what, e))?,
        );
        let msg = IfinfomsgBuilder::default()
            .ifi_family(RtAddrFamily::Unspecified)
            .ifi_index(index as i32)
            .rtattrs(attrs)
            .build()
            .map_err(|e| err(what, e))?;
        self.request(what, Rtm::Newlink, NlmF::empty(), msg)
    }

    fn del_address(&mut self, index: u32, addr: Ipv4Addr, prefix: u8) -> io::Result<()> {
        let what = "remove an address";
        let mut attrs = RtBuffer::<Ifa, Buffer>::new();
        attrs.push(
            RtattrBuilder::default()
                .rta_type(Ifa::Local)
                .rta_payload(addr.octets())
                .build()
                .map_err(|e| err(what, e))?,
        );
        let msg = IfaddrmsgBuilder::default()
            .ifa_family(RtAddrFamily::Inet)
            .ifa_prefixlen(prefix)
            .ifa_flags(IfaF::empty())
            .ifa_scope(RtScope::Universe)
            .ifa_index(index)
            .rtattrs(attrs)
            .build()
            .map_err(|e| err(what, e))?;
        self.request(what, Rtm::Deladdr, NlmF::empty(), msg)
    }

    fn address(&mut self, index: u32, addr: Ipv4Addr, prefix: u8) -> io::Result<()> {
        let what = "add address";
        let mut attrs = RtBuffer::<Ifa, Buffer>::new();
        let broadcast = Ipv4Addr::from(
            u32::from(addr) | (u32::MAX.checked_shr(u32::from(prefix)).unwrap_or(0)),
        );
        for (ty, a) in [
            (Ifa::Local, addr),
            (Ifa::Address, addr),
            (Ifa::Broadcast, broadcast),
        ] {
            attrs.push(
                RtattrBuilder::default()
                    .rta_type(ty)
                    .rta_payload(a.octets())
                    .build()
                    .map_err(|e| err(what, e))?,
            );
        }
        let msg = IfaddrmsgBuilder::default()
            .ifa_family(RtAddrFamily::Inet)
            .ifa_prefixlen(prefix)
            .ifa_flags(IfaF::PERMANENT)
            .ifa_scope(RtScope::Universe)
            .ifa_index(index)
            .rtattrs(attrs)
            .build()
            .map_err(|e| err(what, e))?;
        self.request(what, Rtm::Newaddr, NlmF::CREATE | NlmF::REPLACE, msg)
    }

    fn default_route(&mut self, index: u32, gw: Ipv4Addr) -> io::Result<()> {
        let what = "add default route";
        let mut attrs = RtBuffer::<Rta, Buffer>::new();
        attrs.push(
            RtattrBuilder::default()
                .rta_type(Rta::Gateway)
                .rta_payload(gw.octets())
                .build()
                .map_err(|e| err(what, e))?,
        );
        attrs.push(
            RtattrBuilder::default()
                .rta_type(Rta::Oif)
                .rta_payload(index)
                .build()
                .map_err(|e| err(what, e))?,
        );
        let msg = RtmsgBuilder::default()
            .rtm_family(RtAddrFamily::Inet)
            .rtm_dst_len(0)
            .rtm_src_len(0)
            .rtm_tos(0)
            .rtm_table(RtTable::Main)
            .rtm_protocol(Rtprot::Boot)
            .rtm_scope(RtScope::Universe)
            .rtm_type(Rtn::Unicast)
            .rtattrs(attrs)
            .build()
            .map_err(|e| err(what, e))?;
        self.request(what, Rtm::Newroute, NlmF::CREATE | NlmF::REPLACE, msg)
    }
}

fn index(name: &str) -> io::Result<u32> {
    nix::net::if_::if_nametoindex(name).map_err(|e| err(name, e))
}

/// Bring up `lo` alone: every guest needs it (sshd for `vm ssh` is reached on
/// 127.0.0.1 through the agent), with a network or without.
pub fn loopback_up() -> io::Result<()> {
    Rtnl::connect()?.up(index("lo")?)
}

/// Bring the network up as `cfg` says, on link `nic`.
pub fn configure(cfg: &NetConfig, nic: &str) -> io::Result<()> {
    let mut rtnl = Rtnl::connect()?;
    rtnl.up(index("lo")?)?;
    let i = index(nic)?;
    rtnl.address(i, cfg.address, cfg.prefix)?;
    rtnl.up(i)?;
    if let Some(gw) = cfg.gateway {
        rtnl.default_route(i, gw)?;
    }
    Ok(())
}

/// Move link `nic` from the address `old` (when it has it) to `cfg`'s, with the MAC `mac`:
/// down first, which drops its neighbour entries and routes (nothing learnt for the old
/// address survives), then the MAC and addresses, then up with `cfg`'s route. A restored
/// fork takes its own address this way (see the agent's `Identity`).
pub fn readdress(
    nic: &str,
    old: Option<(Ipv4Addr, u8)>,
    cfg: &NetConfig,
    mac: Option<[u8; 6]>,
) -> io::Result<()> {
    let mut rtnl = Rtnl::connect()?;
    let i = index(nic)?;
    rtnl.down(i)?;
    if let Some(mac) = mac {
        rtnl.set_mac(i, mac)?;
    }
    if let Some((addr, prefix)) = old
        && (addr, prefix) != (cfg.address, cfg.prefix)
    {
        match rtnl.del_address(i, addr, prefix) {
            // Not there (a guest that never took it): nothing to remove.
            Err(e) if e.kind() == io::ErrorKind::AddrNotAvailable => {}
            other => other?,
        }
    }
    rtnl.address(i, cfg.address, cfg.prefix)?;
    rtnl.up(i)?;
    if let Some(gw) = cfg.gateway {
        rtnl.default_route(i, gw)?;
    }
    Ok(())
}

/// A MAC address `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(mac: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = mac.split(':').collect();
    let mut out = [0u8; 6];
    if parts.len() != 6 {
        return Err(format!("{mac}: expected six hex bytes, colon-separated"));
    }
    for (o, p) in out.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(format!("{mac}: {p} is not a hex byte"));
        }
        *o = u8::from_str_radix(p, 16).map_err(|_| format!("{mac}: {p} is not a hex byte"))?;
    }
    Ok(out)
}

/// The resolv.conf banger-init writes.
pub fn resolv_conf(dns: Ipv4Addr) -> String {
    format!(
        "# written by banger-init from the kernel command line (banger.dns)\nnameserver {dns}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_params() {
        let c = "console=ttyS0 banger.ip=172.30.0.5/24 banger.gw=172.30.0.1 banger.dns=172.30.0.1";
        assert_eq!(
            NetConfig::from_cmdline(c).unwrap(),
            Some(NetConfig {
                address: Ipv4Addr::new(172, 30, 0, 5),
                prefix: 24,
                gateway: Some(Ipv4Addr::new(172, 30, 0, 1)),
                dns: Some(Ipv4Addr::new(172, 30, 0, 1)),
            })
        );
        assert_eq!(NetConfig::from_cmdline("console=ttyS0").unwrap(), None);
        assert!(NetConfig::from_cmdline("banger.ip=172.30.0.5").is_err());
        assert!(NetConfig::from_cmdline("banger.ip=1.2.3.4/40").is_err());
        assert!(NetConfig::from_cmdline("banger.ip=1.2.3.4/24 banger.gw=x").is_err());
    }

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("02:bA:00:00:00:0f").unwrap(),
            [2, 0xba, 0, 0, 0, 0x0f]
        );
        for bad in [
            "02:ba:00:00:00",
            "02:ba:00:00:00:0g",
            "002:ba:00:00:00:0f",
            "",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
    }

    /// `ip` run in this thread's network namespace, its output.
    fn ip(args: &str) -> String {
        let out = std::process::Command::new("ip")
            .args(args.split_whitespace())
            .output()
            .unwrap();
        assert!(out.status.success(), "ip {args}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    /// On a real link in a network namespace of its own (this thread's, which `ip` run
    /// from it shares): a fork's readdress leaves the new address, MAC and route, and
    /// nothing of the old (address, route, neighbour entries).
    #[test]
    fn root_readdress_moves_a_link_to_its_new_address_and_forgets_the_old() {
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("needs root");
            // A veth pair (this kernel may lack `dummy`), its far end up for a carrier.
            ip("link add d0 type veth peer name d1");
            ip("link set d1 up");
            ip("addr add 10.9.0.5/24 dev d0");
            ip("link set d0 up");
            ip("route add default via 10.9.0.1 dev d0");
            ip("neigh add 10.9.0.8 lladdr 02:00:00:00:00:08 dev d0 nud reachable");
            let cfg = NetConfig {
                address: Ipv4Addr::new(10, 9, 0, 7),
                prefix: 24,
                gateway: Some(Ipv4Addr::new(10, 9, 0, 1)),
                dns: None,
            };
            let mac = parse_mac("02:ba:00:00:00:07").unwrap();
            readdress(
                "d0",
                Some((Ipv4Addr::new(10, 9, 0, 5), 24)),
                &cfg,
                Some(mac),
            )
            .unwrap();
            let addrs = ip("-4 -o addr show dev d0");
            assert!(addrs.contains("10.9.0.7/24"), "{addrs}");
            assert!(!addrs.contains("10.9.0.5"), "{addrs}");
            let link = ip("-o link show dev d0");
            assert!(link.contains("link/ether 02:ba:00:00:00:07"), "{link}");
            assert!(link.contains(",UP"), "{link}");
            let route = ip("-4 route show default");
            assert!(route.contains("via 10.9.0.1 dev d0"), "{route}");
            // A dynamic entry of the old address is gone with the link's down.
            let neigh = ip("neigh show dev d0");
            assert!(!neigh.contains("10.9.0.8"), "{neigh}");
            // Again from where it is now (a fork of a fork), and an old address it never
            // had (nothing to remove) is fine.
            let cfg2 = NetConfig {
                address: Ipv4Addr::new(10, 9, 0, 11),
                ..cfg
            };
            readdress("d0", Some((Ipv4Addr::new(10, 9, 0, 99), 24)), &cfg2, None).unwrap();
            let addrs = ip("-4 -o addr show dev d0");
            assert!(
                addrs.contains("10.9.0.11/24") && addrs.contains("10.9.0.7/24"),
                "{addrs}"
            );
        })
        .join()
        .unwrap();
    }
}
