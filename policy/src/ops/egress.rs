//! Egress filters and isolation in `bridge banger` (layout in [`crate::egress`]), applied
//! as nft JSON through the `nftables` crate (`nft -j -f -`), each change one nft
//! transaction: a VM's filter is replaced without a moment in which it is open.
//!
//! The bridge family sees each frame with the port it came in on, so the rules match the
//! VM's own tap (`iifname "bg-<vm>"`) and its own lease (`ip saddr`): a VM can neither
//! slip out through another port nor pass for another VM. There is no connection tracking
//! on the bridge (this kernel has no `nf_conntrack_bridge`), so the filter is stateless:
//! what the guest *sends* is checked; TCP segments other than a connection's first SYN may
//! go to the host's bridge address (replies to connections the host opened).

use std::io;
use std::net::Ipv4Addr;
use std::path::Path;

use nftables::helper;
use serde_json::{Value, json};

use crate::egress::{EgressFilter, REFUSED_KEEP_SECS, REFUSED_MAX, RefusedFlow};
use crate::{NFT_TABLE, TAP_PREFIX};

const FAMILY: &str = "bridge";
const EGRESS: &str = "egress";
const ISOLATE: &str = "isolate";

fn tag(vm: &str) -> String {
    format!("banger vm:{vm}")
}
fn chain(vm: &str) -> String {
    format!("vm-{vm}")
}
/// The set of addresses the resolver vouched for.
pub fn set_name(vm: &str) -> String {
    format!("d-{vm}")
}
/// The dropped-packet counter.
pub fn counter_name(vm: &str) -> String {
    format!("drop-{vm}")
}
/// The refused TCP and UDP flows (address . protocol . port).
pub fn refused_name(vm: &str) -> String {
    format!("r-{vm}")
}
/// The refused packets of other protocols (address . protocol).
pub fn refused_other_name(vm: &str) -> String {
    format!("ro-{vm}")
}

fn err(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

/// Egress operations with the `nft` at `nft`, for banger's subnet.
#[derive(Debug)]
pub struct Egress<'a> {
    pub nft: &'a Path,
    pub gateway: Ipv4Addr,
    pub network: Ipv4Addr,
    pub prefix: u8,
}

fn matches(op: &str, left: Value, right: Value) -> Value {
    json!({"match": {"op": op, "left": left, "right": right}})
}
fn payload(protocol: &str, field: &str) -> Value {
    json!({"payload": {"protocol": protocol, "field": field}})
}
fn meta(key: &str) -> Value {
    json!({"meta": {"key": key}})
}
fn daddr_is(right: Value) -> Value {
    matches("==", payload("ip", "daddr"), right)
}
fn prefix(addr: Ipv4Addr, len: u8) -> Value {
    if len == 32 {
        json!(addr.to_string())
    } else {
        json!({"prefix": {"addr": addr.to_string(), "len": len}})
    }
}
fn tcp_or_udp_port(port: u16) -> [Value; 2] {
    [
        matches("==", meta("l4proto"), json!({"set": ["tcp", "udp"]})),
        matches("==", payload("th", "dport"), json!(port)),
    ]
}
fn accept() -> Value {
    json!({"accept": null})
}
fn drop() -> Value {
    json!({"drop": null})
}

/// What banger's bridge table holds, read back with `nft -j -a list table bridge banger`.
#[derive(Debug, Default)]
struct Listing {
    exists: bool,
    /// (chain, handle, comment) of every rule with a comment.
    tagged: Vec<(String, u64, String)>,
    chains: Vec<String>,
    sets: Vec<String>,
    counters: Vec<String>,
}

impl Listing {
    fn has_objects_of_others(&self, vm: &str) -> bool {
        let mine = [
            chain(vm),
            set_name(vm),
            counter_name(vm),
            refused_name(vm),
            refused_other_name(vm),
        ];
        self.chains
            .iter()
            .filter(|c| *c != EGRESS && *c != ISOLATE)
            .chain(&self.sets)
            .chain(&self.counters)
            .any(|n| !mine.contains(n))
    }
}

impl Egress<'_> {
    fn list(&self) -> io::Result<Listing> {
        let out = helper::get_current_ruleset_raw(
            Some(self.nft),
            ["-a", "list", "table", FAMILY, NFT_TABLE],
        );
        let text = match out {
            Ok(t) => t,
            Err(helper::NftablesError::NftFailed { stderr, .. })
                if stderr.contains("No such file or directory") =>
            {
                return Ok(Listing::default());
            }
            Err(e) => return Err(err("list banger's bridge table", e)),
        };
        let v: Value = serde_json::from_str(&text).map_err(|e| err("nft's listing", e))?;
        let mut l = Listing {
            exists: true,
            ..Listing::default()
        };
        for o in v["nftables"].as_array().into_iter().flatten() {
            let name = |k: &str| o[k]["name"].as_str().map(str::to_owned);
            if let Some(r) = o.get("rule") {
                if let (Some(c), Some(h), Some(t)) = (
                    r["chain"].as_str(),
                    r["handle"].as_u64(),
                    r["comment"].as_str(),
                ) {
                    l.tagged.push((c.to_owned(), h, t.to_owned()));
                }
            } else if let Some(n) = name("chain") {
                l.chains.push(n);
            } else if let Some(n) = name("set") {
                l.sets.push(n);
            } else if let Some(n) = name("counter") {
                l.counters.push(n);
            }
        }
        Ok(l)
    }

    fn apply(&self, what: &str, cmds: Vec<Value>) -> io::Result<()> {
        let payload = json!({ "nftables": cmds }).to_string();
        helper::apply_ruleset_raw(&payload, Some(self.nft), [""; 0])
            .map(|_| ())
            .map_err(|e| match e {
                // What nft said is the useful part.
                helper::NftablesError::NftFailed { ref stderr, .. }
                    if !stderr.trim().is_empty() =>
                {
                    err(what, format!("{e}: {}", stderr.trim()))
                }
                e => err(what, e),
            })
    }

    fn table() -> Value {
        json!({"table": {"family": FAMILY, "name": NFT_TABLE}})
    }

    fn rule(chain: &str, expr: Vec<Value>, comment: Option<&str>) -> Value {
        let mut r =
            json!({"rule": {"family": FAMILY, "table": NFT_TABLE, "chain": chain, "expr": expr}});
        if let Some(c) = comment {
            r["rule"]["comment"] = json!(c);
        }
        json!({ "add": r })
    }

    /// The rules of `vm-<vm>`, in order.
    fn filter_rules(&self, vm: &str, ip: Ipv4Addr, f: &EgressFilter) -> Vec<Vec<Value>> {
        let gw = json!(self.gateway.to_string());
        // What `when` matches is refused: remembered in the refused sets, each in a rule of
        // its own (a set that is full breaks its rule, which must not skip the drop), then
        // counted and dropped.
        let refuse = |when: Vec<Value>| -> Vec<Vec<Value>> {
            let l4 = json!({"set": ["tcp", "udp"]});
            let remember = |op: &str, name: String, key: Vec<Value>| {
                [
                    when.clone(),
                    vec![
                        matches(op, meta("l4proto"), l4.clone()),
                        json!({"set": {"op": "update", "elem": {"concat": key},
                            "set": format!("@{name}")}}),
                    ],
                ]
                .concat()
            };
            vec![
                remember(
                    "==",
                    refused_name(vm),
                    vec![
                        payload("ip", "daddr"),
                        meta("l4proto"),
                        payload("th", "dport"),
                    ],
                ),
                remember(
                    "!=",
                    refused_other_name(vm),
                    vec![payload("ip", "daddr"), meta("l4proto")],
                ),
                [when, vec![json!({"counter": counter_name(vm)}), drop()]].concat(),
            ]
        };
        let mut rules = vec![
            // The guests have no IPv6 route through the host; dropped quietly (router
            // solicitations would fill the counter).
            vec![matches("==", meta("protocol"), json!("ip6")), drop()],
            // ARP and the like.
            vec![matches("!=", meta("protocol"), json!("ip")), accept()],
        ];
        // Only the VM's own lease.
        rules.extend(refuse(vec![matches(
            "!=",
            payload("ip", "saddr"),
            json!(ip.to_string()),
        )]));
        // DNS to the bridge resolver, and to no other server.
        rules.push(
            [
                vec![daddr_is(gw.clone())],
                tcp_or_udp_port(53).to_vec(),
                vec![accept()],
            ]
            .concat(),
        );
        rules.extend(refuse(tcp_or_udp_port(53).to_vec()));
        // Replies to connections the host opened, and pings of the bridge.
        rules.push(vec![
            daddr_is(gw.clone()),
            matches(
                "!=",
                json!({"&": [payload("tcp", "flags"), ["syn", "ack"]]}),
                json!("syn"),
            ),
            accept(),
        ]);
        rules.push(vec![
            daddr_is(gw),
            matches("==", payload("icmp", "type"), json!("echo-request")),
            accept(),
        ]);
        if f.subnet {
            rules.push(vec![daddr_is(prefix(self.network, self.prefix)), accept()]);
        }
        for (addr, len) in &f.nets {
            rules.push(vec![daddr_is(prefix(*addr, *len)), accept()]);
        }
        for (addr, port) in &f.ports {
            rules.push(
                [
                    vec![daddr_is(json!(addr.to_string()))],
                    tcp_or_udp_port(*port).to_vec(),
                    vec![accept()],
                ]
                .concat(),
            );
        }
        if f.domains {
            rules.push(vec![
                daddr_is(json!(format!("@{}", set_name(vm)))),
                accept(),
            ]);
        }
        rules.extend(refuse(Vec::new()));
        rules
    }

    /// Give `vm` (lease `ip`) exactly `filter`, in one transaction.
    pub fn set(&self, vm: &str, ip: Ipv4Addr, filter: &EgressFilter) -> io::Result<()> {
        if !filter.restrict && !filter.isolate {
            return self.remove(vm);
        }
        let l = self.list()?;
        let (tap, tag, chain_name) = (format!("{TAP_PREFIX}{vm}"), tag(vm), chain(vm));
        let base = |name: &str, hook: &str| {
            json!({"add": {"chain": {"family": FAMILY, "table": NFT_TABLE, "name": name,
                "type": "filter", "hook": hook, "prio": -200, "policy": "accept"}}})
        };
        let mut cmds = vec![
            json!({ "add": Self::table() }),
            base(EGRESS, "prerouting"),
            base(ISOLATE, "forward"),
            json!({"add": {"counter": {"family": FAMILY, "table": NFT_TABLE, "name": counter_name(vm)}}}),
            json!({"add": {"set": {"family": FAMILY, "table": NFT_TABLE, "name": set_name(vm),
                "type": "ipv4_addr", "flags": ["timeout"]}}}),
        ];
        let refused = |name: String, key: Vec<&str>| {
            json!({"add": {"set": {"family": FAMILY, "table": NFT_TABLE, "name": name,
                "type": key, "flags": ["timeout"], "timeout": REFUSED_KEEP_SECS,
                "size": REFUSED_MAX, "stmt": [{"counter": null}]}}})
        };
        // Added once: a set the filter's rules update is flagged dynamic by the kernel, and
        // adding it again without that flag fails (nft 1.0.6's JSON takes no `dynamic`).
        // Kept across filter changes, so what was refused stays listed.
        for (name, key) in [
            (
                refused_name(vm),
                vec!["ipv4_addr", "inet_proto", "inet_service"],
            ),
            (refused_other_name(vm), vec!["ipv4_addr", "inet_proto"]),
        ] {
            if !l.sets.contains(&name) {
                cmds.push(refused(name, key));
            }
        }
        for (c, handle, t) in &l.tagged {
            if *t == tag {
                cmds.push(json!({"delete": {"rule": {"family": FAMILY, "table": NFT_TABLE, "chain": c, "handle": handle}}}));
            }
        }
        let had_chain = l.chains.contains(&chain_name);
        if filter.restrict {
            let c = json!({"chain": {"family": FAMILY, "table": NFT_TABLE, "name": chain_name}});
            cmds.push(json!({ "add": c.clone() }));
            cmds.push(json!({ "flush": c }));
            for expr in self.filter_rules(vm, ip, filter) {
                cmds.push(Self::rule(&chain_name, expr, None));
            }
            cmds.push(Self::rule(
                EGRESS,
                vec![
                    matches("==", meta("iifname"), json!(tap)),
                    json!({"jump": {"target": chain_name}}),
                ],
                Some(&tag),
            ));
        } else if had_chain {
            cmds.push(json!({"delete": {"chain": {"family": FAMILY, "table": NFT_TABLE, "name": chain_name}}}));
        }
        if filter.isolate {
            for key in ["iifname", "oifname"] {
                cmds.push(Self::rule(
                    ISOLATE,
                    vec![
                        matches("==", meta(key), json!(tap)),
                        json!({"counter": counter_name(vm)}),
                        drop(),
                    ],
                    Some(&tag),
                ));
            }
        }
        self.apply(&format!("set the egress filter of vm {vm}"), cmds)
    }

    /// Remove everything of `vm`'s; the table goes when nothing of another VM is left.
    pub fn remove(&self, vm: &str) -> io::Result<()> {
        let l = self.list()?;
        if !l.exists {
            return Ok(());
        }
        if !l.has_objects_of_others(vm) {
            return self.apply(
                "delete banger's bridge table",
                vec![json!({ "delete": Self::table() })],
            );
        }
        let tag = tag(vm);
        let mut cmds = Vec::new();
        for (c, handle, t) in &l.tagged {
            if *t == tag {
                cmds.push(json!({"delete": {"rule": {"family": FAMILY, "table": NFT_TABLE, "chain": c, "handle": handle}}}));
            }
        }
        let obj = |kind: &str, name: String| json!({"delete": {kind: {"family": FAMILY, "table": NFT_TABLE, "name": name}}});
        if l.chains.contains(&chain(vm)) {
            cmds.push(obj("chain", chain(vm)));
        }
        if l.sets.contains(&set_name(vm)) {
            cmds.push(obj("set", set_name(vm)));
        }
        if l.counters.contains(&counter_name(vm)) {
            cmds.push(obj("counter", counter_name(vm)));
        }
        for name in [refused_name(vm), refused_other_name(vm)] {
            if l.sets.contains(&name) {
                cmds.push(obj("set", name));
            }
        }
        if cmds.is_empty() {
            return Ok(());
        }
        self.apply(&format!("remove the egress filter of vm {vm}"), cmds)
    }

    /// Elements of `vm`'s set (address → present).
    fn elements(&self, vm: &str) -> io::Result<Vec<String>> {
        let name = set_name(vm);
        let text = helper::get_current_ruleset_raw(
            Some(self.nft),
            ["list", "set", FAMILY, NFT_TABLE, name.as_str()],
        )
        .map_err(|e| err(&format!("vm {vm} has no egress set"), e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| err("nft's listing", e))?;
        let mut out = Vec::new();
        for o in v["nftables"].as_array().into_iter().flatten() {
            for e in o["set"]["elem"].as_array().into_iter().flatten() {
                let val = e["elem"]["val"].as_str().or(e.as_str());
                out.extend(val.map(str::to_owned));
            }
        }
        Ok(out)
    }

    /// Make `addrs` reachable for `vm`, each for its TTL (replacing an older timeout).
    pub fn vouch(&self, vm: &str, addrs: &[(Ipv4Addr, u32)]) -> io::Result<()> {
        let present = self.elements(vm)?;
        // One element per address, with the longest TTL asked for it.
        let mut ttls = std::collections::BTreeMap::new();
        for (a, ttl) in addrs {
            let t = ttls.entry(*a).or_insert(*ttl);
            *t = (*t).max(*ttl);
        }
        let set = |elems: Vec<Value>| json!({"element": {"family": FAMILY, "table": NFT_TABLE, "name": set_name(vm), "elem": elems}});
        let mut cmds = Vec::new();
        let again: Vec<Value> = ttls
            .keys()
            .map(|a| a.to_string())
            .filter(|a| present.contains(a))
            .map(Value::String)
            .collect();
        if !again.is_empty() {
            cmds.push(json!({ "delete": set(again) }));
        }
        let elems: Vec<Value> = ttls
            .iter()
            .map(|(a, ttl)| json!({"elem": {"val": a.to_string(), "timeout": ttl}}))
            .collect();
        cmds.push(json!({ "add": set(elems) }));
        self.apply(&format!("vouch for addresses of vm {vm}"), cmds)
    }

    /// Packets dropped for `vm` (None: it has no counter).
    pub fn counter(&self, vm: &str) -> io::Result<Option<u64>> {
        let name = counter_name(vm);
        let out = helper::get_current_ruleset_raw(
            Some(self.nft),
            ["list", "counter", FAMILY, NFT_TABLE, name.as_str()],
        );
        let text = match out {
            Ok(t) => t,
            Err(helper::NftablesError::NftFailed { .. }) => return Ok(None),
            Err(e) => return Err(err("read the egress counter", e)),
        };
        let v: Value = serde_json::from_str(&text).map_err(|e| err("nft's listing", e))?;
        Ok(v["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .find_map(|o| o["counter"]["packets"].as_u64()))
    }

    /// The flows `vm`'s filter refused lately, the latest first (none: it has no filter,
    /// or one from before the refused sets).
    pub fn refused(&self, vm: &str) -> io::Result<Vec<RefusedFlow>> {
        let mut flows = Vec::new();
        for name in [refused_name(vm), refused_other_name(vm)] {
            let out = helper::get_current_ruleset_raw(
                Some(self.nft),
                ["list", "set", FAMILY, NFT_TABLE, name.as_str()],
            );
            let text = match out {
                Ok(t) => t,
                Err(helper::NftablesError::NftFailed { .. }) => continue,
                Err(e) => return Err(err("read the refused flows", e)),
            };
            let v: Value = serde_json::from_str(&text).map_err(|e| err("nft's listing", e))?;
            for o in v["nftables"].as_array().into_iter().flatten() {
                let keep = o["set"]["timeout"]
                    .as_u64()
                    .unwrap_or(REFUSED_KEEP_SECS.into());
                for e in o["set"]["elem"].as_array().into_iter().flatten() {
                    flows.extend(refused_flow(&e["elem"], keep));
                }
            }
        }
        flows.sort_by_key(|f| f.last_secs);
        Ok(flows)
    }
}

/// One element of a refused set as nft lists it: `{"val": {"concat": [addr, proto(,
/// port)]}, "expires": s, "counter": {"packets": n, ..}}`, in a set whose timeout is
/// `keep` (each refused packet resets an element's expiry to it).
fn refused_flow(elem: &Value, keep: u64) -> Option<RefusedFlow> {
    let key = elem["val"]["concat"].as_array()?;
    let addr = key.first()?.as_str()?.parse().ok()?;
    let proto = match key.get(1)? {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => return None,
    };
    let port = key
        .get(2)
        .and_then(Value::as_u64)
        .and_then(|p| u16::try_from(p).ok());
    let expires = elem["expires"].as_u64().unwrap_or(0);
    Some(RefusedFlow {
        addr,
        proto,
        port,
        packets: elem["counter"]["packets"].as_u64().unwrap_or(0),
        last_secs: u32::try_from(keep.saturating_sub(expires)).unwrap_or(u32::MAX),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_elements_as_nft_lists_them() {
        let tcp = json!({"val": {"concat": ["198.51.100.9", "tcp", 443]}, "expires": 3590,
            "counter": {"packets": 3, "bytes": 180}});
        assert_eq!(
            refused_flow(&tcp, 3600),
            Some(RefusedFlow {
                addr: [198, 51, 100, 9].into(),
                proto: "tcp".into(),
                port: Some(443),
                packets: 3,
                last_secs: 10,
            })
        );
        let other = json!({"val": {"concat": ["192.0.2.1", 47]}, "expires": 3600,
            "counter": {"packets": 1, "bytes": 60}});
        let f = refused_flow(&other, 3600).unwrap();
        assert_eq!((f.proto.as_str(), f.port, f.last_secs), ("47", None, 0));
        assert_eq!(refused_flow(&json!({"val": "10.0.0.1"}), 3600), None);
    }
}
