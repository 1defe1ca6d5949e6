//! Who may talk to the daemon: every connection is checked with SO_PEERCRED when it is
//! accepted. Allowed: root, the daemon's owner, and members of the socket group (`banger`
//! by default, primary or supplementary). Anyone else still gets a JSON-RPC answer — a
//! [`codes::PERMISSION_DENIED`](banger_api::codes::PERMISSION_DENIED) error for every
//! call — never a hang or a silent close. The socket's mode (0660) already keeps others
//! out; this check is the second wall, and the one that holds if the mode is loosened.

use std::future::Future;
use std::sync::Arc;

use jsonrpsee::MethodResponse;
use jsonrpsee::core::middleware::{Batch, BatchEntry, Notification, RpcServiceT};
use jsonrpsee::server::BatchResponseBuilder;
use jsonrpsee::types::{ErrorObject, Request};

use banger_api::codes;

/// The access policy of one daemon.
#[derive(Debug, Clone)]
pub struct Access {
    owner: u32,
    group: Option<(String, u32)>,
}

/// The outcome of checking one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    Denied(Arc<str>),
}

/// The peer's identity as the kernel reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

impl Access {
    /// The policy for a daemon owned by `owner`, with the socket group `group_name` if
    /// that group exists on this host.
    pub fn new(owner: u32, group_name: &str) -> Access {
        let group = nix::unistd::Group::from_name(group_name)
            .ok()
            .flatten()
            .map(|g| (group_name.to_owned(), g.gid.as_raw()));
        Access { owner, group }
    }

    pub fn owner(&self) -> u32 {
        self.owner
    }

    /// The gid of the socket group, if it exists.
    pub fn group_gid(&self) -> Option<u32> {
        self.group.as_ref().map(|(_, gid)| *gid)
    }

    /// Check a peer; `peer` is `None` when the kernel gave no credentials.
    pub fn check(&self, peer: Option<Peer>) -> Verdict {
        let Some(peer) = peer else {
            return Verdict::Denied(
                "permission denied: the connection carries no credentials".into(),
            );
        };
        if peer.uid == 0 || peer.uid == self.owner {
            return Verdict::Allowed;
        }
        if let Some((_, gid)) = &self.group
            && (peer.gid == *gid
                || peer
                    .pid
                    .is_some_and(|pid| supplementary_groups(pid).contains(gid)))
        {
            return Verdict::Allowed;
        }
        let group = self
            .group
            .as_ref()
            .map(|(name, _)| name.as_str())
            .unwrap_or("banger");
        Verdict::Denied(
            format!(
                "permission denied: uid {} may not use this bangerd (allowed: root, the owner uid {}, and members of group `{group}`); ask an administrator to run `sudo usermod -aG {group} $USER`, then log in again",
                peer.uid, self.owner
            )
            .into(),
        )
    }
}

/// Supplementary groups of a process, from `/proc/<pid>/status`.
fn supplementary_groups(pid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                g.split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// RPC middleware of one connection: answers every call of a denied connection with the
/// denial, and refuses parameters sent to a method that takes none (jsonrpsee would
/// silently ignore them, which hides client bugs).
#[derive(Debug, Clone)]
pub struct Gate<S> {
    inner: S,
    verdict: Verdict,
    no_params: &'static [&'static str],
}

impl<S> Gate<S> {
    pub fn new(inner: S, verdict: Verdict, no_params: &'static [&'static str]) -> Gate<S> {
        Gate {
            inner,
            verdict,
            no_params,
        }
    }
}

/// Whether a request carries parameters (absent, `null`, `[]` and `{}` are none).
fn has_params(req: &Request<'_>) -> bool {
    req.params
        .as_ref()
        .is_some_and(|p| !matches!(p.get().trim(), "null" | "[]" | "{}" | ""))
}

fn denial(message: &str) -> ErrorObject<'static> {
    ErrorObject::owned(codes::PERMISSION_DENIED, message.to_owned(), None::<()>)
}

impl<S> RpcServiceT for Gate<S>
where
    S: RpcServiceT<
            MethodResponse = MethodResponse,
            BatchResponse = MethodResponse,
            NotificationResponse = MethodResponse,
        > + Send
        + Sync
        + Clone
        + 'static,
{
    type MethodResponse = MethodResponse;
    type NotificationResponse = MethodResponse;
    type BatchResponse = MethodResponse;

    fn call<'a>(&self, req: Request<'a>) -> impl Future<Output = MethodResponse> + Send + 'a {
        let inner = self.inner.clone();
        let verdict = self.verdict.clone();
        let no_params = self.no_params;
        async move {
            match verdict {
                Verdict::Denied(msg) => MethodResponse::error(req.id.into_owned(), denial(&msg)),
                Verdict::Allowed if no_params.contains(&req.method_name()) && has_params(&req) => {
                    let msg = format!("{} takes no parameters", req.method_name());
                    MethodResponse::error(
                        req.id.into_owned(),
                        ErrorObject::owned(codes::INVALID_PARAMS, msg, None::<()>),
                    )
                }
                Verdict::Allowed => inner.call(req).await,
            }
        }
    }

    fn batch<'a>(&self, batch: Batch<'a>) -> impl Future<Output = MethodResponse> + Send + 'a {
        let inner = self.inner.clone();
        let verdict = self.verdict.clone();
        async move {
            let msg = match verdict {
                Verdict::Allowed => return inner.batch(batch).await,
                Verdict::Denied(msg) => msg,
            };
            let mut out = BatchResponseBuilder::new_with_limit(usize::MAX);
            for entry in batch.into_iter() {
                let rp = match entry {
                    Ok(BatchEntry::Call(req)) => {
                        MethodResponse::error(req.id.into_owned(), denial(&msg))
                    }
                    Ok(BatchEntry::Notification(_)) => continue,
                    Err(err) => {
                        let (err, id) = err.into_parts();
                        MethodResponse::error(id, err)
                    }
                };
                if let Err(too_big) = out.append(rp) {
                    return too_big;
                }
            }
            if out.is_empty() {
                MethodResponse::notification()
            } else {
                MethodResponse::from_batch(out.finish())
            }
        }
    }

    fn notification<'a>(
        &self,
        n: Notification<'a>,
    ) -> impl Future<Output = MethodResponse> + Send + 'a {
        let inner = self.inner.clone();
        let verdict = self.verdict.clone();
        async move {
            match verdict {
                Verdict::Allowed => inner.notification(n).await,
                Verdict::Denied(_) => MethodResponse::notification(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access() -> Access {
        Access {
            owner: 1000,
            group: Some(("banger".into(), 4242)),
        }
    }

    fn peer(uid: u32, gid: u32) -> Option<Peer> {
        Some(Peer {
            uid,
            gid,
            pid: None,
        })
    }

    #[test]
    fn owner_root_and_group_are_allowed() {
        let a = access();
        assert_eq!(a.check(peer(1000, 1000)), Verdict::Allowed);
        assert_eq!(a.check(peer(0, 0)), Verdict::Allowed);
        assert_eq!(a.check(peer(1001, 4242)), Verdict::Allowed);
    }

    #[test]
    fn others_are_denied_with_a_way_forward() {
        let a = access();
        let Verdict::Denied(msg) = a.check(peer(65534, 65534)) else {
            panic!("nobody allowed");
        };
        assert!(
            msg.contains("uid 65534") && msg.contains("usermod"),
            "{msg}"
        );
        assert!(matches!(a.check(None), Verdict::Denied(_)));
    }

    #[test]
    fn supplementary_groups_of_this_process_are_read() {
        // Our own status file has a Groups: line (possibly empty); parsing must not fail.
        let groups = supplementary_groups(std::process::id() as i32);
        let expected = nix::unistd::getgroups().unwrap_or_default();
        for g in expected {
            assert!(groups.contains(&g.as_raw()));
        }
    }
}
