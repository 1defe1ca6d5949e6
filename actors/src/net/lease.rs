//! Deterministic IPv4 leases. A VM's address is chosen from a hash of its id (so the same
//! VM gets the same address whenever it is re-created with the same id, and addresses are
//! spread), probing forward past addresses in use. The lease lives in the VM's record:
//! it exists exactly as long as the VM does, so deleting a VM releases it and no lease can
//! outlive its VM. The gateway (the bridge) is the subnet's first address.

use std::collections::HashSet;
use std::net::Ipv4Addr;

/// The VM subnet (default 172.30.0.0/24).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    pub network: Ipv4Addr,
    pub prefix: u8,
}

impl std::str::FromStr for Subnet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (ip, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a CIDR subnet like 172.30.0.0/24"))?;
        let ip: Ipv4Addr = ip.parse().map_err(|e| format!("{s:?}: {e}"))?;
        let prefix: u8 = prefix.parse().map_err(|e| format!("{s:?}: {e}"))?;
        if !(16..=29).contains(&prefix) {
            return Err(format!("{s:?}: use a prefix from /16 to /29"));
        }
        let mask = u32::MAX << (32 - prefix);
        if u32::from(ip) & !mask != 0 {
            return Err(format!(
                "{s:?} has host bits set; did you mean {}/{prefix}?",
                Ipv4Addr::from(u32::from(ip) & mask)
            ));
        }
        Ok(Subnet {
            network: ip,
            prefix,
        })
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl Subnet {
    fn size(&self) -> u32 {
        1 << (32 - self.prefix)
    }

    /// The bridge's address: the first host address.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// Addresses VMs may get: all hosts but the gateway (network and broadcast excluded).
    pub fn capacity(&self) -> u32 {
        self.size() - 3
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & (u32::MAX << (32 - self.prefix)) == u32::from(self.network)
    }

    /// Pick the address for VM `id`, avoiding `used`; None when the subnet is full.
    pub fn allocate(&self, id: &str, used: &HashSet<Ipv4Addr>) -> Option<Ipv4Addr> {
        let cap = self.capacity();
        // FNV-1a: stable across builds and platforms (std's hasher is not).
        let h = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        let start = (h % u64::from(cap)) as u32;
        (0..cap)
            .map(|i| Ipv4Addr::from(u32::from(self.network) + 2 + (start + i) % cap))
            .find(|ip| !used.contains(ip))
    }
}

/// The guest's MAC: `06:00:` then the address bytes (locally administered, unicast), the
/// convention Firecracker's docs use, so an address and its MAC are read off each other.
pub fn mac_for(ip: Ipv4Addr) -> String {
    let o = ip.octets();
    format!("06:00:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net() -> Subnet {
        "172.30.0.0/24".parse().unwrap()
    }

    #[test]
    fn parse_and_shape() {
        let n = net();
        assert_eq!(n.gateway(), Ipv4Addr::new(172, 30, 0, 1));
        assert_eq!(n.capacity(), 253);
        assert_eq!(n.to_string(), "172.30.0.0/24");
        assert!(n.contains(Ipv4Addr::new(172, 30, 0, 200)));
        assert!(!n.contains(Ipv4Addr::new(172, 30, 1, 2)));
        for bad in [
            "172.30.0.0",
            "172.30.0.1/24",
            "10.0.0.0/8",
            "x/24",
            "10.0.0.0/31",
        ] {
            assert!(bad.parse::<Subnet>().is_err(), "{bad}");
        }
    }

    #[test]
    fn leases_are_deterministic_unique_and_inside() {
        let n = net();
        let a = n.allocate("0123456789ab", &HashSet::new()).unwrap();
        assert_eq!(
            a,
            n.allocate("0123456789ab", &HashSet::new()).unwrap(),
            "deterministic"
        );
        let mut used = HashSet::new();
        for i in 0..n.capacity() {
            let ip = n.allocate(&format!("vm{i}"), &used).expect("room left");
            assert!(
                n.contains(ip) && ip != n.gateway() && ip.octets()[3] != 0 && ip.octets()[3] != 255
            );
            assert!(used.insert(ip), "{ip} handed out twice");
        }
        assert_eq!(n.allocate("one-more", &used), None, "a full subnet says so");
        assert_eq!(mac_for(Ipv4Addr::new(172, 30, 0, 5)), "06:00:ac:1e:00:05");
    }
}
