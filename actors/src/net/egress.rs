//! Egress policy and isolation of a VM, on the host: the helper's filter from a VM's
//! policy ([`filter`]), and the resolver's [`Vouch`] through the helper ([`HelperVouch`]).
//!
//! Between VMs, the default stays what it always was: every VM reaches every other VM on
//! the bridge (a sandbox's dev servers are often meant for its neighbours, and `<vm>.vm`
//! names exist for that). `--isolate` cuts one VM off from all others, both ways, while it
//! keeps the host's bridge address (DNS, replies to the host) and the published-port path
//! (which runs over vsock, not the bridge).

use std::net::Ipv4Addr;
use std::sync::Arc;

use banger_api::{Egress, EgressRule};
use banger_policy::egress::EgressFilter;

use super::dns::{Vouch, VouchFuture};
use super::host::{HelperMsg, Slot};

/// The helper's filter for a VM with `egress` (and `isolate`).
pub fn filter(egress: &Egress, isolate: bool) -> EgressFilter {
    let mut f = EgressFilter {
        isolate,
        ..EgressFilter::default()
    };
    match egress {
        Egress::Subnet | Egress::All => {}
        Egress::None => f.restrict = true,
        Egress::Allow(rules) => {
            f.restrict = true;
            f.subnet = true;
            for r in rules {
                match r {
                    EgressRule::Cidr { addr, prefix } => f.nets.push((*addr, *prefix)),
                    EgressRule::HostPort { addr, port } => f.ports.push((*addr, *port)),
                    EgressRule::Domain { .. } => f.domains = true,
                }
            }
        }
    }
    f
}

/// Whether a VM with this policy needs anything in banger's bridge table.
pub fn needs_rules(egress: &Egress, isolate: bool) -> bool {
    egress.filtered() || isolate
}

/// Vouches through the privileged helper (`egress_vouch`).
#[derive(Debug, Clone)]
pub struct HelperVouch {
    pub helper: Slot<HelperMsg>,
}

impl Vouch for HelperVouch {
    fn vouch(&self, vm: &str, addrs: Vec<(Ipv4Addr, u32)>) -> VouchFuture {
        let (helper, vm) = (Arc::clone(&self.helper), vm.to_owned());
        Box::pin(async move {
            super::host::helper_call(&helper, banger_policy::Request::EgressVouch { vm, addrs })
                .await
                .map_err(|e| e.to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_become_filters() {
        assert!(!needs_rules(&Egress::Subnet, false));
        assert!(!needs_rules(&Egress::All, false));
        assert!(needs_rules(&Egress::All, true));
        let f = filter(&Egress::None, false);
        assert!(f.restrict && !f.subnet && !f.domains);
        let e: Egress = "allow=10.0.0.0/8,192.0.2.1:443,example.org"
            .parse()
            .unwrap();
        let f = filter(&e, true);
        assert!(f.restrict && f.subnet && f.domains && f.isolate);
        assert_eq!(f.nets, vec![([10, 0, 0, 0].into(), 8)]);
        assert_eq!(f.ports, vec![([192, 0, 2, 1].into(), 443)]);
    }
}
