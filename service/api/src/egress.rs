//! Egress policy of a VM (`--egress none|all|allow=RULE,…`), as the user writes it.
//!
//! - `subnet` (the default, what a VM without `--nat` always had): banger adds no rule; the
//!   guest reaches the bridge subnet (the host's bridge address, the other VMs) and nothing
//!   is masqueraded, so nothing outside answers.
//! - `all` (what `--nat` means): masquerade, nothing filtered.
//! - `none`: nothing but DNS to the bridge resolver (which then refuses every name outside
//!   `.vm`) and TCP replies to connections the host opened to the guest.
//! - `allow=RULE,…`: masquerade, and only what a rule allows, on top of the subnet (which
//!   stays reachable unless the VM is `--isolate`d) and DNS to the bridge resolver. DNS to
//!   any other server is dropped, even to an allowed address. A rule is one of
//!   - a CIDR or a single address: `10.0.0.0/8`, `192.0.2.7`;
//!   - an address and a port, `192.0.2.7:443` (TCP and UDP to that port only);
//!   - a domain, `example.org` (that name only) or `*.example.org` (any name below it, not
//!     `example.org` itself): the bridge resolver answers these names and no others, and the
//!     addresses in its answers become reachable for the record's TTL.
//!
//! Rules are checked when the VM is created or set; a bad one is refused with the rule
//! named. The same parser is used by the CLI and the daemon.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// One allow rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EgressRule {
    /// An IPv4 network (a single address is a /32).
    Cidr { addr: Ipv4Addr, prefix: u8 },
    /// One address and port, TCP or UDP.
    HostPort { addr: Ipv4Addr, port: u16 },
    /// A domain name, lower case, without the trailing dot; `wildcard`: names below it.
    Domain { name: String, wildcard: bool },
}

/// A VM's egress policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub enum Egress {
    /// The subnet only, no NAT, no rule (the default).
    #[default]
    Subnet,
    /// DNS to the bridge resolver only.
    None,
    /// Masquerade, nothing filtered (`--nat`).
    All,
    /// Masquerade, and only the subnet, the bridge resolver and these rules.
    Allow(Vec<EgressRule>),
}

impl Egress {
    /// Whether the VM's traffic is masqueraded out of the subnet.
    pub fn nat(&self) -> bool {
        matches!(self, Egress::All | Egress::Allow(_))
    }

    /// Whether banger filters the VM's traffic (and so counts what it drops).
    pub fn filtered(&self) -> bool {
        matches!(self, Egress::None | Egress::Allow(_))
    }

    /// The domain rules (empty unless `allow=` names some).
    pub fn domains(&self) -> impl Iterator<Item = (&str, bool)> {
        let rules: &[EgressRule] = match self {
            Egress::Allow(r) => r,
            _ => &[],
        };
        rules.iter().filter_map(|r| match r {
            EgressRule::Domain { name, wildcard } => Some((name.as_str(), *wildcard)),
            _ => None,
        })
    }

    /// Whether the bridge resolver answers `name` (any case, trailing dot or not) for a VM
    /// with this policy. `.vm` names are answered whatever the policy; see [`dns_allows`].
    pub fn resolves(&self, name: &str) -> bool {
        match self {
            Egress::Subnet | Egress::All => true,
            Egress::None => false,
            Egress::Allow(_) => {
                let name = normalise(name);
                self.domains()
                    .any(|(d, wildcard)| domain_matches(d, wildcard, &name))
            }
        }
    }
}

/// `name` lower case without its trailing dot.
fn normalise(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Whether a (normalised) `name` matches the domain rule `domain` (`*.` stripped when
/// `wildcard`).
pub fn domain_matches(domain: &str, wildcard: bool, name: &str) -> bool {
    if wildcard {
        name.len() > domain.len() + 1
            && name.ends_with(domain)
            && name.as_bytes()[name.len() - domain.len() - 1] == b'.'
    } else {
        name == domain
    }
}

/// Whether the resolver answers `name` for `egress`: `.vm` always, the rest per policy.
pub fn dns_allows(egress: &Egress, name: &str) -> bool {
    let n = normalise(name);
    n == "vm" || n.ends_with(".vm") || egress.resolves(&n)
}

fn bad(rule: &str, why: impl fmt::Display) -> String {
    format!("bad egress rule {rule:?}: {why}")
}

fn parse_v4(rule: &str, text: &str) -> Result<Ipv4Addr, String> {
    text.parse::<Ipv4Addr>()
        .map_err(|_| bad(rule, format!("{text:?} is not an IPv4 address")))
}

fn parse_domain(rule: &str) -> Result<EgressRule, String> {
    let (wildcard, name) = match rule.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, rule),
    };
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    if name.is_empty() {
        return Err(bad(rule, "empty domain"));
    }
    if name.contains('*') {
        return Err(bad(
            rule,
            "a wildcard only as the whole first label (*.example.org)",
        ));
    }
    if name.len() > 253 {
        return Err(bad(rule, "a domain is at most 253 characters"));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(bad(rule, "empty label"));
        }
        if label.len() > 63 {
            return Err(bad(rule, format!("label {label:?} is over 63 characters")));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            || label.starts_with('-')
            || label.ends_with('-')
        {
            return Err(bad(
                rule,
                format!("label {label:?} is not a host name label"),
            ));
        }
    }
    if name.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(bad(rule, "not an IPv4 address, and not a domain"));
    }
    Ok(EgressRule::Domain { name, wildcard })
}

impl FromStr for EgressRule {
    type Err = String;

    fn from_str(rule: &str) -> Result<Self, String> {
        let rule = rule.trim();
        if rule.is_empty() {
            return Err(bad(rule, "empty domain"));
        }
        if let Some((addr, prefix)) = rule.split_once('/') {
            let addr = parse_v4(rule, addr)?;
            let prefix = prefix
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= 32)
                .ok_or_else(|| bad(rule, format!("prefix /{prefix} is not 0-32")))?;
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            if u32::from(addr) & !mask != 0 {
                return Err(bad(
                    rule,
                    format!(
                        "host bits set; the network is {}/{prefix}",
                        Ipv4Addr::from(u32::from(addr) & mask)
                    ),
                ));
            }
            return Ok(EgressRule::Cidr { addr, prefix });
        }
        if let Some((host, port)) = rule.rsplit_once(':') {
            let addr = parse_v4(rule, host)?;
            let port = port
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad(rule, format!("port {port:?} is not 1-65535")))?;
            return Ok(EgressRule::HostPort { addr, port });
        }
        let looks_numeric = rule.bytes().all(|b| b.is_ascii_digit() || b == b'.');
        if looks_numeric {
            let addr = parse_v4(rule, rule)?;
            return Ok(EgressRule::Cidr { addr, prefix: 32 });
        }
        parse_domain(rule)
    }
}

impl fmt::Display for EgressRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EgressRule::Cidr { addr, prefix: 32 } => write!(f, "{addr}"),
            EgressRule::Cidr { addr, prefix } => write!(f, "{addr}/{prefix}"),
            EgressRule::HostPort { addr, port } => write!(f, "{addr}:{port}"),
            EgressRule::Domain { name, wildcard } => {
                write!(f, "{}{name}", if *wildcard { "*." } else { "" })
            }
        }
    }
}

impl FromStr for Egress {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "subnet" => Ok(Egress::Subnet),
            "none" => Ok(Egress::None),
            "all" => Ok(Egress::All),
            other => {
                let Some(rules) = other.strip_prefix("allow=") else {
                    return Err(format!(
                        "bad egress policy {other:?}: use none, all, subnet or allow=RULE,… (a CIDR, ADDRESS:PORT or a domain such as example.org or *.example.org)"
                    ));
                };
                let rules = rules
                    .split(',')
                    .map(EgressRule::from_str)
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Egress::Allow(rules))
            }
        }
    }
}

impl fmt::Display for Egress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Egress::Subnet => f.write_str("subnet"),
            Egress::None => f.write_str("none"),
            Egress::All => f.write_str("all"),
            Egress::Allow(rules) => {
                f.write_str("allow=")?;
                for (i, r) in rules.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{r}")?;
                }
                Ok(())
            }
        }
    }
}

// On the wire and in the store as the text the user writes.
impl Serialize for Egress {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Egress {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse_and_print_back() {
        for text in [
            "none",
            "all",
            "subnet",
            "allow=10.0.0.0/8,192.0.2.7:443,example.org,*.example.org,192.0.2.9",
        ] {
            let e: Egress = text.parse().unwrap();
            assert_eq!(e.to_string(), text);
            let json = serde_json::to_string(&e).unwrap();
            assert_eq!(serde_json::from_str::<Egress>(&json).unwrap(), e);
        }
        assert_eq!(
            "allow=Example.ORG.".parse::<Egress>().unwrap().to_string(),
            "allow=example.org"
        );
    }

    #[test]
    fn bad_rules_are_named() {
        for (text, why) in [
            (
                "allow=300.1.1.1/8",
                "\"300.1.1.1/8\": \"300.1.1.1\" is not an IPv4",
            ),
            ("allow=10.1.0.0/8", "host bits set"),
            ("allow=10.0.0.0/33", "prefix /33"),
            ("allow=", "empty domain"),
            ("allow=a.org,,b.org", "empty domain"),
            ("allow=*.", "\"*.\": empty domain"),
            ("allow=foo.*.org", "\"foo.*.org\": a wildcard only"),
            ("allow=**.org", "a wildcard only"),
            ("allow=a..org", "empty label"),
            ("allow=1.2.3.4:0", "port \"0\""),
            ("allow=host.org:80", "\"host.org\" is not an IPv4"),
            ("allow=300.1.1.1", "is not an IPv4"),
            ("allow=ex ample.org", "not a host name label"),
            ("some", "bad egress policy"),
        ] {
            let e = text.parse::<Egress>().unwrap_err();
            assert!(e.contains(why), "{text}: {e}");
        }
    }

    #[test]
    fn names_match_exactly_or_below_a_wildcard() {
        let e: Egress = "allow=allowed.test,*.svc.example".parse().unwrap();
        for yes in [
            "allowed.test",
            "ALLOWED.test.",
            "a.svc.example",
            "a.b.svc.example",
        ] {
            assert!(e.resolves(yes), "{yes}");
        }
        for no in [
            "denied.test",
            "x.allowed.test",
            "svc.example",
            "xsvc.example",
            "allowed.test.evil",
        ] {
            assert!(!e.resolves(no), "{no}");
        }
        assert!(dns_allows(&Egress::None, "web.vm."));
        assert!(!dns_allows(&Egress::None, "example.org"));
        assert!(dns_allows(&Egress::All, "example.org"));
        assert!(Egress::All.nat() && e.nat() && !Egress::None.nat());
        assert!(e.filtered() && Egress::None.filtered() && !Egress::All.filtered());
    }
}
