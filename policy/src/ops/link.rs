//! Links and addresses through rtnetlink (neli): the bridge, its address, a tap's master,
//! up, delete. Taps themselves need the TUNSETIFF ioctl ([`super::tap`]).

use std::io;
use std::net::Ipv4Addr;

use neli::{
    consts::{
        nl::NlmF,
        rtnl::{Ifa, IfaF, Iff, Ifla, IflaInfo, RtAddrFamily, RtScope, Rtm},
        socket::NlFamily,
    },
    nl::{NlPayload, Nlmsghdr, NlmsghdrBuilder},
    rtnl::{Ifaddrmsg, IfaddrmsgBuilder, Ifinfomsg, IfinfomsgBuilder, RtattrBuilder},
    socket::synchronous::NlSocketHandle,
    types::{Buffer, RtBuffer},
    utils::Groups,
};

/// An rtnetlink connection.
pub struct Rtnl {
    sock: NlSocketHandle,
    seq: u32,
}

impl std::fmt::Debug for Rtnl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rtnl").field("seq", &self.seq).finish()
    }
}

fn other(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

/// The index of a link, if it exists.
pub fn index(name: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(name).ok()
}

impl Rtnl {
    pub fn connect() -> io::Result<Rtnl> {
        let sock = NlSocketHandle::connect(NlFamily::Route, None, Groups::empty())
            .map_err(|e| other("netlink connect", e))?;
        Ok(Rtnl { sock, seq: 0 })
    }

    /// Send one request asking for an ACK and wait for it; a netlink error comes back as
    /// the errno it carries.
    fn request<P>(&mut self, what: &str, ty: Rtm, flags: NlmF, payload: P) -> io::Result<()>
    where
        P: neli::Size + neli::ToBytes + std::fmt::Debug,
    {
        self.seq += 1;
        let msg: Nlmsghdr<Rtm, P> = NlmsghdrBuilder::default()
            .nl_type(ty)
            .nl_flags(flags | NlmF::REQUEST | NlmF::ACK)
            .nl_seq(self.seq)
            .nl_payload(NlPayload::Payload(payload))
            .build()
            .map_err(|e| other(what, e))?;
        self.sock.send(&msg).map_err(|e| other(what, e))?;
        loop {
            let (msgs, _) = self
                .sock
                .recv::<Rtm, Buffer>()
                .map_err(|e| other(what, e))?;
            for m in msgs {
                let m = m.map_err(|e| other(what, e))?;
                if *m.nl_seq() != self.seq {
                    continue;
                }
                match m.nl_payload() {
                    NlPayload::Ack(_) => return Ok(()),
                    NlPayload::Err(e) => {
                        let errno = -*e.error();
                        return Err(io::Error::new(
                            io::Error::from_raw_os_error(errno).kind(),
                            format!("{what}: {}", io::Error::from_raw_os_error(errno)),
                        ));
                    }
                    _ => {}
                }
            }
        }
    }

    fn link_msg(
        &mut self,
        what: &str,
        ty: Rtm,
        flags: NlmF,
        msg: IfinfomsgBuilder,
    ) -> io::Result<()> {
        let msg: Ifinfomsg = msg
            .ifi_family(RtAddrFamily::Unspecified)
            .build()
            .map_err(|e| other(what, e))?;
        self.request(what, ty, flags, msg)
    }

    /// Create a bridge named `name` (EEXIST when it exists).
    pub fn create_bridge(&mut self, name: &str) -> io::Result<()> {
        let what = format!("create bridge {name}");
        let mut attrs = RtBuffer::<Ifla, Buffer>::new();
        attrs.push(
            RtattrBuilder::default()
                .rta_type(Ifla::Ifname)
                .rta_payload(name)
                .build()
                .map_err(|e| other(&what, e))?,
        );
        let mut info = RtBuffer::<IflaInfo, Buffer>::new();
        info.push(
            RtattrBuilder::default()
                .rta_type(IflaInfo::Kind)
                .rta_payload("bridge")
                .build()
                .map_err(|e| other(&what, e))?,
        );
        attrs.push(
            RtattrBuilder::default()
                .rta_type(Ifla::Linkinfo)
                .rta_payload(info)
                .build()
                .map_err(|e| other(&what, e))?,
        );
        self.link_msg(
            &what,
            Rtm::Newlink,
            NlmF::CREATE | NlmF::EXCL,
            IfinfomsgBuilder::default().rtattrs(attrs),
        )
    }

    /// Add `addr/prefix` to a link (EEXIST when it has it).
    pub fn add_address(&mut self, index: u32, addr: Ipv4Addr, prefix: u8) -> io::Result<()> {
        let what = format!("add address {addr}/{prefix}");
        let mut attrs = RtBuffer::<Ifa, Buffer>::new();
        for ty in [Ifa::Local, Ifa::Address] {
            attrs.push(
                RtattrBuilder::default()
                    .rta_type(ty)
                    .rta_payload(addr.octets())
                    .build()
                    .map_err(|e| other(&what, e))?,
            );
        }
        let broadcast = Ipv4Addr::from(u32::from(addr) | (u32::MAX >> prefix));
        attrs.push(
            RtattrBuilder::default()
                .rta_type(Ifa::Broadcast)
                .rta_payload(broadcast.octets())
                .build()
                .map_err(|e| other(&what, e))?,
        );
        let msg: Ifaddrmsg = IfaddrmsgBuilder::default()
            .ifa_family(RtAddrFamily::Inet)
            .ifa_prefixlen(prefix)
            .ifa_flags(IfaF::PERMANENT)
            .ifa_scope(RtScope::Universe)
            .ifa_index(index)
            .rtattrs(attrs)
            .build()
            .map_err(|e| other(&what, e))?;
        self.request(&what, Rtm::Newaddr, NlmF::CREATE | NlmF::EXCL, msg)
    }

    /// Bring a link up.
    pub fn set_up(&mut self, index: u32) -> io::Result<()> {
        self.link_msg(
            "set link up",
            Rtm::Newlink,
            NlmF::empty(),
            IfinfomsgBuilder::default()
                .ifi_index(index as i32)
                .ifi_flags(Iff::UP)
                .ifi_change(Iff::UP),
        )
    }

    /// Make `master` the master of link `index` (attach a port to a bridge).
    pub fn set_master(&mut self, index: u32, master: u32) -> io::Result<()> {
        let what = "attach to bridge";
        let mut attrs = RtBuffer::<Ifla, Buffer>::new();
        attrs.push(
            RtattrBuilder::default()
                .rta_type(Ifla::Master)
                .rta_payload(master)
                .build()
                .map_err(|e| other(what, e))?,
        );
        self.link_msg(
            what,
            Rtm::Newlink,
            NlmF::empty(),
            IfinfomsgBuilder::default()
                .ifi_index(index as i32)
                .rtattrs(attrs),
        )
    }

    /// Delete a link.
    pub fn delete(&mut self, index: u32) -> io::Result<()> {
        self.link_msg(
            "delete link",
            Rtm::Dellink,
            NlmF::empty(),
            IfinfomsgBuilder::default().ifi_index(index as i32),
        )
    }
}
