//! Published ports: a host address spliced to a guest port (`--publish`, `vm port …`).
//!
//! The spec is `[HOSTIP:]HOSTPORT:GUESTPORT[/tcp]`, as docker's `-p` reads it:
//! - `HOSTIP` defaults to `127.0.0.1`, so nothing is reachable from other hosts unless the
//!   user names an address (`0.0.0.0:8080:80`); an IPv6 address goes in brackets
//!   (`[::1]:8080:80`).
//! - `HOSTPORT` 0 lets the daemon pick a free port when it binds (`vm port list` shows it).
//! - `GUESTPORT` is a TCP port on the guest's 127.0.0.1 or any address (the agent connects
//!   to `127.0.0.1:GUESTPORT` inside the guest), 1-65535.
//! - Only `tcp` is supported; `/udp` is refused, saying so.
//!
//! This parser is shared by the CLI (refusing a bad spec before anything is asked of the
//! daemon) and the daemon (`vm.port_rm` takes the user's text), so both read a spec the
//! same way.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The host address a spec without one gets.
pub const DEFAULT_HOST_IP: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// The transport of a published port (only TCP today).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortProto {
    #[default]
    Tcp,
}

impl PortProto {
    pub fn as_str(self) -> &'static str {
        match self {
            PortProto::Tcp => "tcp",
        }
    }
}

/// One published port as asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortSpec {
    pub host_ip: IpAddr,
    /// 0: any free port, chosen when the daemon binds it.
    pub host_port: u16,
    pub guest_port: u16,
    #[serde(default)]
    pub proto: PortProto,
}

/// How the spec is written, for error messages.
const SYNTAX: &str = "use [HOSTIP:]HOSTPORT:GUESTPORT[/tcp], e.g. 8080:80 or 0.0.0.0:0:8000";

fn bad(spec: &str, why: impl fmt::Display) -> String {
    format!("bad port spec {spec:?}: {why}; {SYNTAX}")
}

fn port(spec: &str, what: &str, text: &str, zero_ok: bool) -> Result<u16, String> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad(
            spec,
            format!("the {what} port {text:?} is not a number"),
        ));
    }
    match text.parse::<u16>() {
        Ok(0) if !zero_ok => Err(bad(spec, format!("the {what} port must be 1-65535"))),
        Ok(p) => Ok(p),
        Err(_) => Err(bad(
            spec,
            format!(
                "the {what} port {text} is out of range ({}-65535)",
                if zero_ok { 0 } else { 1 }
            ),
        )),
    }
}

impl FromStr for PortSpec {
    type Err = String;

    fn from_str(spec: &str) -> Result<Self, String> {
        let (rest, proto) = match spec.rsplit_once('/') {
            Some((rest, p)) => match p.to_ascii_lowercase().as_str() {
                "tcp" => (rest, PortProto::Tcp),
                "udp" | "sctp" => {
                    return Err(bad(
                        spec,
                        format!("only tcp ports can be published for now, not {p}"),
                    ));
                }
                _ => return Err(bad(spec, format!("unknown protocol {p:?}"))),
            },
            None => (spec, PortProto::Tcp),
        };
        let (host_ip, ports) = if let Some(v6) = rest.strip_prefix('[') {
            let (addr, ports) = v6
                .split_once("]:")
                .ok_or_else(|| bad(spec, "an IPv6 address in brackets must be followed by :"))?;
            let ip: std::net::Ipv6Addr = addr
                .parse()
                .map_err(|_| bad(spec, format!("{addr:?} is not an IPv6 address")))?;
            (IpAddr::V6(ip), ports)
        } else {
            match rest.matches(':').count() {
                0 => return Err(bad(spec, "it needs a host port and a guest port")),
                1 => (DEFAULT_HOST_IP, rest),
                2 => {
                    let (addr, ports) = rest.split_once(':').expect("two colons");
                    let ip: Ipv4Addr = addr
                        .parse()
                        .map_err(|_| bad(spec, format!("{addr:?} is not an IPv4 address")))?;
                    (IpAddr::V4(ip), ports)
                }
                _ => {
                    return Err(bad(
                        spec,
                        "too many ':' (an IPv6 host address goes in brackets: [::1]:8080:80)",
                    ));
                }
            }
        };
        let (host, guest) = ports
            .split_once(':')
            .ok_or_else(|| bad(spec, "it needs a host port and a guest port"))?;
        Ok(PortSpec {
            host_ip,
            host_port: port(spec, "host", host, true)?,
            guest_port: port(spec, "guest", guest, false)?,
            proto,
        })
    }
}

/// `127.0.0.1:8080` / `[::1]:8080`.
fn host_addr(ip: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}

impl fmt::Display for PortSpec {
    /// The canonical form: `127.0.0.1:8080:80/tcp`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}/{}",
            host_addr(self.host_ip, self.host_port),
            self.guest_port,
            self.proto.as_str()
        )
    }
}

impl PortSpec {
    /// Whether two specs would listen on the same host address (a fixed port; 0 never
    /// clashes). Two specs on one port clash when either address is the wildcard.
    pub fn clashes_with(&self, other: &PortSpec) -> bool {
        self.host_port != 0
            && self.host_port == other.host_port
            && (self.host_ip == other.host_ip
                || self.host_ip.is_unspecified()
                || other.host_ip.is_unspecified())
    }
}

/// A published port as the daemon reports it (`vm port list`, `vm show`, `ps`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedPort {
    #[serde(flatten)]
    pub spec: PortSpec,
    /// The host port listening now (the one picked for `host_port` 0); absent while the
    /// VM is not running, or when binding failed when a restarted daemon re-adopted it.
    #[serde(default)]
    pub bound_port: Option<u16>,
}

impl PublishedPort {
    /// `127.0.0.1:41234->8000/tcp` (docker's form), with `0` (or the asked port) while not
    /// bound.
    pub fn arrow(&self) -> String {
        let port = self.bound_port.unwrap_or(self.spec.host_port);
        format!(
            "{}->{}/{}",
            host_addr(self.spec.host_ip, port),
            self.spec.guest_port,
            self.spec.proto.as_str()
        )
    }
}

/// What `vm port rm` names: a host port (the asked one, or the one bound for 0), or a
/// whole spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortRef {
    HostPort(u16),
    Spec(PortSpec),
}

impl FromStr for PortRef {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            return match s.parse::<u16>() {
                Ok(p) if p > 0 => Ok(PortRef::HostPort(p)),
                _ => Err(format!(
                    "bad host port {s:?}: use 1-65535, or a whole spec ({SYNTAX})"
                )),
            };
        }
        s.parse().map(PortRef::Spec)
    }
}

impl PortRef {
    pub fn matches(&self, p: &PublishedPort) -> bool {
        match self {
            PortRef::HostPort(n) => p.spec.host_port == *n || p.bound_port == Some(*n),
            PortRef::Spec(s) => p.spec == *s,
        }
    }
}

impl fmt::Display for PortRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortRef::HostPort(p) => write!(f, "{p}"),
            PortRef::Spec(s) => write!(f, "{s}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> PortSpec {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn specs_read_like_dockers() {
        let s = spec("8080:80");
        assert_eq!(
            s,
            PortSpec {
                host_ip: DEFAULT_HOST_IP,
                host_port: 8080,
                guest_port: 80,
                proto: PortProto::Tcp
            }
        );
        assert_eq!(s.to_string(), "127.0.0.1:8080:80/tcp");
        assert_eq!(spec("0:8000").host_port, 0);
        assert_eq!(spec("0.0.0.0:8080:80/tcp").host_ip.to_string(), "0.0.0.0");
        assert_eq!(spec("10.1.2.3:1:65535/TCP").guest_port, 65535);
        let v6 = spec("[::1]:8080:80");
        assert_eq!(v6.host_ip.to_string(), "::1");
        assert_eq!(v6.to_string(), "[::1]:8080:80/tcp");
        // The canonical form reads back as itself.
        for s in ["127.0.0.1:8080:80/tcp", "[::1]:0:22/tcp"] {
            assert_eq!(spec(s).to_string(), s);
        }
    }

    #[test]
    fn bad_specs_are_refused_with_the_spec_named_and_why() {
        for (bad, why) in [
            ("70000:80", "host port 70000 is out of range"),
            ("80:70000", "guest port 70000 is out of range"),
            ("8080:0", "guest port must be 1-65535"),
            ("abc", "needs a host port and a guest port"),
            ("abc:80", "host port \"abc\" is not a number"),
            ("1.2.3:80:80", "\"1.2.3\" is not an IPv4 address"),
            (
                "8080:80/udp",
                "only tcp ports can be published for now, not udp",
            ),
            ("8080:80/quic", "unknown protocol"),
            ("", "needs a host port"),
            (":80", "host port \"\" is not a number"),
            ("-1:80", "not a number"),
            ("::1:80:80", "IPv6 host address goes in brackets"),
            ("[::1:80:80", "must be followed by :"),
            ("[1.2.3.4]:80:80", "not an IPv6 address"),
            ("1:2:3:4", "too many ':'"),
        ] {
            let e = bad.parse::<PortSpec>().unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{bad}: {e}");
            assert!(e.contains(why), "{bad}: {e}");
            assert!(e.contains("[HOSTIP:]HOSTPORT:GUESTPORT"), "{bad}: {e}");
        }
    }

    #[test]
    fn wire_form_is_plain_json_and_published_ports_flatten() {
        let s = spec("0:8000");
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(
            json,
            r#"{"host_ip":"127.0.0.1","host_port":0,"guest_port":8000,"proto":"tcp"}"#
        );
        assert_eq!(serde_json::from_str::<PortSpec>(&json).unwrap(), s);
        // A request without proto means tcp; udp is not a thing on the wire either.
        let bare = r#"{"host_ip":"127.0.0.1","host_port":1,"guest_port":2}"#;
        assert_eq!(
            serde_json::from_str::<PortSpec>(bare).unwrap().proto,
            PortProto::Tcp
        );
        assert!(
            serde_json::from_str::<PortSpec>(
                r#"{"host_ip":"127.0.0.1","host_port":1,"guest_port":2,"proto":"udp"}"#
            )
            .is_err()
        );
        let p = PublishedPort {
            spec: s,
            bound_port: Some(41234),
        };
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            r#"{"host_ip":"127.0.0.1","host_port":0,"guest_port":8000,"proto":"tcp","bound_port":41234}"#
        );
        assert_eq!(p.arrow(), "127.0.0.1:41234->8000/tcp");
    }

    #[test]
    fn port_refs_name_a_host_port_or_a_spec() {
        let p = PublishedPort {
            spec: spec("0:8000"),
            bound_port: Some(41234),
        };
        assert!("41234".parse::<PortRef>().unwrap().matches(&p));
        assert!("0:8000".parse::<PortRef>().unwrap().matches(&p));
        assert!(!"8000".parse::<PortRef>().unwrap().matches(&p));
        assert!(!"1:8000".parse::<PortRef>().unwrap().matches(&p));
        assert!(
            "0".parse::<PortRef>()
                .unwrap_err()
                .contains("bad host port")
        );
        assert!("99999".parse::<PortRef>().is_err());
        assert!("x".parse::<PortRef>().unwrap_err().contains("\"x\""));
    }

    #[test]
    fn clashes_are_same_port_on_the_same_or_a_wildcard_address() {
        let a = spec("8080:80");
        assert!(a.clashes_with(&spec("8080:81")));
        assert!(a.clashes_with(&spec("0.0.0.0:8080:81")));
        assert!(!a.clashes_with(&spec("10.0.0.1:8080:81")));
        assert!(!a.clashes_with(&spec("8081:80")));
        assert!(!spec("0:80").clashes_with(&spec("0:80")));
    }
}
