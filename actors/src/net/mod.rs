//! Guest networking: IPv4 leases and the `.vm` DNS resolver need no privilege.
//! Bridge, taps and NAT go through the privileged helper: [`host`].

pub mod dns;
pub mod egress;
pub mod host;
pub mod lease;
