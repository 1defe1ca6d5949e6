//! NAT for VMs created with `--nat`: one masquerade rule per VM in banger's own nftables
//! table (`ip banger`, chain `postrouting`), tagged with the VM id in its comment, applied
//! through the `nftables` crate (`nft -j`). The table exists only while some VM has NAT,
//! and IPv4 forwarding is switched on only while it does (and back off if banger was the
//! one to switch it on).

use std::borrow::Cow;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use nftables::{
    batch::Batch,
    expr::{Expression, NamedExpression, Payload, PayloadField, Prefix},
    helper,
    schema::{Chain, NfCmd, NfListObject, NfObject, Rule, Table},
    stmt::{Match, Operator, Statement},
    types::{NfChainPolicy, NfChainType, NfFamily, NfHook},
};

use crate::NFT_TABLE;

const CHAIN: &str = "postrouting";
const FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

fn comment(vm: &str) -> String {
    format!("banger vm:{vm}")
}

fn err(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

/// NAT operations with the `nft` at `nft`; `marker` records that banger switched IPv4
/// forwarding on.
#[derive(Debug)]
pub struct Nat<'a> {
    pub nft: &'a Path,
    pub marker: PathBuf,
}

fn ip_field(field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: "ip".into(),
            field: field.into(),
        },
    )))
}

impl Nat<'_> {
    /// (comment, handle) of every rule in banger's table; empty when there is no table.
    fn rules(&self) -> io::Result<Vec<(String, u32)>> {
        let listed = helper::get_current_ruleset_with_args(
            Some(self.nft),
            ["-a", "list", "table", "ip", NFT_TABLE],
        );
        let set = match listed {
            Ok(set) => set,
            Err(helper::NftablesError::NftFailed { stderr, .. })
                if stderr.contains("No such file or directory") =>
            {
                return Ok(Vec::new());
            }
            Err(e) => return Err(err("list banger's nft table", e)),
        };
        Ok(set
            .objects
            .iter()
            .filter_map(|o| match o {
                NfObject::ListObject(NfListObject::Rule(r)) => {
                    Some((r.comment.as_deref()?.to_owned(), r.handle?))
                }
                _ => None,
            })
            .collect())
    }

    fn apply(&self, what: &str, batch: Batch<'_>) -> io::Result<()> {
        helper::apply_ruleset_with_args(&batch.to_nftables(), Some(self.nft), [""; 0])
            .map_err(|e| err(what, e))
    }

    /// Masquerade `ip`'s traffic to anywhere outside `subnet`.
    pub fn add(&self, vm: &str, ip: Ipv4Addr, network: Ipv4Addr, prefix: u8) -> io::Result<()> {
        let tag = comment(vm);
        if self.rules()?.iter().any(|(c, _)| *c == tag) {
            return self.forwarding_on();
        }
        let mut batch = Batch::new();
        batch.add(NfListObject::Table(Table {
            family: NfFamily::IP,
            name: NFT_TABLE.into(),
            handle: None,
        }));
        batch.add(NfListObject::Chain(Chain {
            family: NfFamily::IP,
            table: NFT_TABLE.into(),
            name: CHAIN.into(),
            _type: Some(NfChainType::NAT),
            hook: Some(NfHook::Postrouting),
            prio: Some(100),
            policy: Some(NfChainPolicy::Accept),
            ..Chain::default()
        }));
        let expr = vec![
            Statement::Match(Match {
                left: ip_field("saddr"),
                right: Expression::String(Cow::Owned(ip.to_string())),
                op: Operator::EQ,
            }),
            Statement::Match(Match {
                left: ip_field("daddr"),
                right: Expression::Named(NamedExpression::Prefix(Prefix {
                    addr: Box::new(Expression::String(Cow::Owned(network.to_string()))),
                    len: u32::from(prefix),
                })),
                op: Operator::NEQ,
            }),
            Statement::Masquerade(None),
        ];
        batch.add(NfListObject::Rule(Rule {
            family: NfFamily::IP,
            table: NFT_TABLE.into(),
            chain: CHAIN.into(),
            expr: expr.into(),
            comment: Some(tag.into()),
            ..Rule::default()
        }));
        self.apply(&format!("add NAT for {ip}"), batch)?;
        self.forwarding_on()
    }

    /// Remove `vm`'s rule; the table goes with the last one.
    pub fn remove(&self, vm: &str) -> io::Result<()> {
        let rules = self.rules()?;
        let tag = comment(vm);
        let (mine, others): (Vec<_>, Vec<_>) = rules.into_iter().partition(|(c, _)| *c == tag);
        if others.is_empty() {
            if !mine.is_empty() || self.marker.exists() {
                let mut batch = Batch::new();
                if !mine.is_empty() {
                    batch.delete(NfListObject::Table(Table {
                        family: NfFamily::IP,
                        name: NFT_TABLE.into(),
                        handle: None,
                    }));
                    self.apply("delete banger's nft table", batch)?;
                }
                self.forwarding_restore()?;
            }
            return Ok(());
        }
        for (_, handle) in mine {
            let mut batch = Batch::new();
            batch.add_cmd(NfCmd::Delete(NfListObject::Rule(Rule {
                family: NfFamily::IP,
                table: NFT_TABLE.into(),
                chain: CHAIN.into(),
                handle: Some(handle),
                ..Rule::default()
            })));
            self.apply(&format!("delete NAT rule of vm {vm}"), batch)?;
        }
        Ok(())
    }

    fn forwarding_on(&self) -> io::Result<()> {
        let now = std::fs::read_to_string(FORWARD).map_err(|e| err(FORWARD, e))?;
        if now.trim() == "1" {
            return Ok(());
        }
        std::fs::write(&self.marker, b"banger enabled net.ipv4.ip_forward\n")
            .map_err(|e| err(&self.marker.display().to_string(), e))?;
        std::fs::write(FORWARD, b"1").map_err(|e| err(FORWARD, e))
    }

    fn forwarding_restore(&self) -> io::Result<()> {
        if self.marker.exists() {
            std::fs::write(FORWARD, b"0").map_err(|e| err(FORWARD, e))?;
            let _ = std::fs::remove_file(&self.marker);
        }
        Ok(())
    }
}
