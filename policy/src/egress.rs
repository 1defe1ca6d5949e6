//! The egress requests' data and checks (kept apart from [`crate::request`] so the helper's
//! other requests and this feature change independently).
//!
//! A VM's egress filter lives in banger's own table of the `bridge` family
//! (`bridge banger`; the NAT rules are in `ip banger`), on the VM's own tap only:
//! - base chain `egress` (hook prerouting): `iifname "bg-<vm>" jump vm-<vm>`, tagged with
//!   the VM id, when the VM's traffic is filtered;
//! - chain `vm-<vm>`: what the VM may send (its own lease as the source, DNS to the bridge
//!   resolver, …, see [`crate::ops::egress`]), everything else counted and dropped;
//! - set `d-<vm>` (IPv4 addresses with timeouts): what the bridge resolver vouched for;
//! - counter `drop-<vm>`: the packets dropped;
//! - sets `r-<vm>` (address . protocol . port, TCP and UDP) and `ro-<vm>` (address .
//!   protocol, the rest): the flows the filter refused lately, each with a packet counter,
//!   added by the packet path and kept [`REFUSED_KEEP_SECS`] after a flow's last packet,
//!   at most [`REFUSED_MAX`] each (a full set records no new flow; the drop does not
//!   depend on it);
//! - base chain `isolate` (hook forward, which sees only VM-to-VM frames): the VM's tap
//!   in and out dropped, tagged, when the VM is isolated.
//!
//! The helper derives every name from the VM id; nothing but addresses, prefixes and ports
//! comes from the request.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::request::{HelperConfig, Refusal, vm_id};

/// Most networks or ports one VM's filter may hold.
pub const MAX_RULES: usize = 1024;
/// Most addresses one vouch may carry.
pub const MAX_VOUCH: usize = 256;
/// Longest time an answer may keep an address reachable (a day).
pub const MAX_TTL: u32 = 86_400;
/// How long a refused flow is remembered after its last packet (an hour).
pub const REFUSED_KEEP_SECS: u32 = 3600;
/// Most refused flows remembered per VM in each of its two sets (so that an answer of
/// both fits one helper frame).
pub const REFUSED_MAX: u32 = 256;

/// A flow the VM's filter refused lately (`egress_refused`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedFlow {
    /// Where the VM sent it.
    pub addr: Ipv4Addr,
    /// The IP protocol, by name where nft has one (`tcp`, `udp`, `icmp`), else its number.
    pub proto: String,
    /// The destination port (TCP and UDP).
    pub port: Option<u16>,
    /// Packets refused (since the flow was first remembered).
    pub packets: u64,
    /// Seconds since its last refused packet.
    pub last_secs: u32,
}

/// What a VM's filter lets through, besides its ARP and DNS to the bridge resolver.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressFilter {
    /// Filter the VM's traffic at all; false: only `isolate` applies.
    pub restrict: bool,
    /// The bridge subnet (the host's bridge address, the other VMs).
    pub subnet: bool,
    /// IPv4 networks (address, prefix length).
    #[serde(default)]
    pub nets: Vec<(Ipv4Addr, u8)>,
    /// An address and a port, TCP or UDP.
    #[serde(default)]
    pub ports: Vec<(Ipv4Addr, u16)>,
    /// Addresses the bridge resolver vouches for (the `d-<vm>` set).
    #[serde(default)]
    pub domains: bool,
    /// Cut off from the other VMs on the bridge.
    #[serde(default)]
    pub isolate: bool,
}

/// `ip` is a VM address of banger's subnet (not the network, broadcast or gateway).
pub fn vm_address(cfg: &HelperConfig, ip: Ipv4Addr) -> Result<(), Refusal> {
    let host = u32::from(ip);
    let net = u32::from(cfg.network());
    let last = net | (u32::MAX >> cfg.prefix);
    if host <= net || host >= last || ip == cfg.gateway {
        return Err(Refusal(format!(
            "{ip} is not a VM address in {}/{}",
            cfg.network(),
            cfg.prefix
        )));
    }
    Ok(())
}

/// Check an `egress_set`.
pub fn validate_set(
    cfg: &HelperConfig,
    vm: &str,
    ip: Ipv4Addr,
    filter: &EgressFilter,
) -> Result<(), Refusal> {
    vm_id(vm)?;
    vm_address(cfg, ip)?;
    if filter.nets.len() + filter.ports.len() > MAX_RULES {
        return Err(Refusal(format!(
            "{} rules are more than the {MAX_RULES} a VM may have",
            filter.nets.len() + filter.ports.len()
        )));
    }
    for (addr, prefix) in &filter.nets {
        let mask = u32::MAX
            .checked_shl(32 - u32::from((*prefix).min(32)))
            .unwrap_or(0);
        if *prefix > 32 || u32::from(*addr) & !mask != 0 {
            return Err(Refusal(format!("{addr}/{prefix} is not a network")));
        }
    }
    if let Some((addr, _)) = filter.ports.iter().find(|(_, p)| *p == 0) {
        return Err(Refusal(format!("{addr}:0 names no port")));
    }
    if !filter.restrict && (filter.subnet || !filter.nets.is_empty() || !filter.ports.is_empty()) {
        return Err(Refusal(
            "an unrestricted filter carries no rules".to_owned(),
        ));
    }
    Ok(())
}

/// Check an `egress_vouch`: unicast addresses outside loopback, with bounded TTLs.
pub fn validate_vouch(vm: &str, addrs: &[(Ipv4Addr, u32)]) -> Result<(), Refusal> {
    vm_id(vm)?;
    if addrs.is_empty() || addrs.len() > MAX_VOUCH {
        return Err(Refusal(format!(
            "{} addresses: a vouch carries 1 to {MAX_VOUCH}",
            addrs.len()
        )));
    }
    for (addr, ttl) in addrs {
        if addr.is_unspecified() || addr.is_broadcast() || addr.is_multicast() || addr.is_loopback()
        {
            return Err(Refusal(format!("{addr} is not an address a VM may reach")));
        }
        if !(1..=MAX_TTL).contains(ttl) {
            return Err(Refusal(format!("a TTL of {ttl} s is not 1 to {MAX_TTL}")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> HelperConfig {
        crate::request::tests::config(std::path::Path::new("/var/lib/banger"))
    }

    #[test]
    fn a_filter_is_for_a_vm_lease_with_real_networks_and_ports() {
        let vm = "0123456789ab";
        let ip = Ipv4Addr::new(172, 30, 0, 5);
        let ok = EgressFilter {
            restrict: true,
            subnet: true,
            nets: vec![([10, 0, 0, 0].into(), 8)],
            ports: vec![([192, 0, 2, 1].into(), 443)],
            domains: true,
            isolate: true,
        };
        assert_eq!(validate_set(&cfg(), vm, ip, &ok), Ok(()));
        let refused = |vm: &str, ip: [u8; 4], f: &EgressFilter| {
            validate_set(&cfg(), vm, ip.into(), f).unwrap_err().0
        };
        assert!(refused("../x", [172, 30, 0, 5], &ok).contains("not a banger vm id"));
        assert!(refused(vm, [172, 30, 0, 1], &ok).contains("not a VM address"));
        assert!(refused(vm, [10, 0, 0, 5], &ok).contains("not a VM address"));
        let mut bad = ok.clone();
        bad.nets = vec![([10, 1, 0, 0].into(), 8)];
        assert!(refused(vm, [172, 30, 0, 5], &bad).contains("not a network"));
        bad.nets = vec![([10, 0, 0, 0].into(), 33)];
        assert!(refused(vm, [172, 30, 0, 5], &bad).contains("not a network"));
        let mut bad = ok.clone();
        bad.ports = vec![([10, 0, 0, 1].into(), 0)];
        assert!(refused(vm, [172, 30, 0, 5], &bad).contains("names no port"));
        let mut bad = ok.clone();
        bad.restrict = false;
        assert!(refused(vm, [172, 30, 0, 5], &bad).contains("unrestricted"));
    }

    #[test]
    fn vouches_carry_unicast_addresses_and_bounded_ttls() {
        let vm = "0123456789ab";
        assert_eq!(validate_vouch(vm, &[([192, 0, 2, 1].into(), 30)]), Ok(()));
        for (addr, ttl) in [
            ([0, 0, 0, 0], 30),
            ([255, 255, 255, 255], 30),
            ([224, 0, 0, 1], 30),
            ([127, 0, 0, 1], 30),
            ([192, 0, 2, 1], 0),
            ([192, 0, 2, 1], MAX_TTL + 1),
        ] {
            assert!(
                validate_vouch(vm, &[(addr.into(), ttl)]).is_err(),
                "{addr:?} {ttl}"
            );
        }
        assert!(validate_vouch(vm, &[]).is_err());
        assert!(validate_vouch("nope", &[([192, 0, 2, 1].into(), 30)]).is_err());
    }
}
