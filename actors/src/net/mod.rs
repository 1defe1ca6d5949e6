//! Guest networking that needs no privilege: IPv4 leases and the `.vm` DNS resolver.
//! (Bridge, taps and NAT need the privileged helper and come with it.)

pub mod dns;
pub mod lease;
