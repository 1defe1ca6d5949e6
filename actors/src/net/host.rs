//! Host networking through the privileged helper: [`HelperActor`] (the only path to the
//! helper process), [`NetActor`] (the bridge and one tap per VM) and [`NatActor`]
//! (masquerade rules for VMs with `--nat`). VM actors reach them through [`HostNet`].
//!
//! Without a helper (bangerd was not started as root) every operation fails with
//! [`NetError::Unprivileged`], which says what to do; VMs created with `--no-network`
//! need none of this.
//!
//! Restart policy: these actors keep no state that the host does not also hold (a tap
//! exists or not; NAT rules carry the VM id), so a restarted actor simply carries on.
//! The helper runs every request in a fresh worker, so a crashed operation fails only
//! that request; if the helper process itself is gone, calls fail with
//! [`NetError::Helper`] naming the way out (restart bangerd).

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, RwLock};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use banger_policy::{Confinement, Helper, HelperError, Reply, Request};

/// Errors of host networking.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NetError {
    #[error(
        "{0} needs bangerd's privileged helper, and this bangerd was not started as root: run `sudo banger system install` (or start bangerd as root), or create the VM with --no-network"
    )]
    Unprivileged(String),
    #[error("the privileged helper refused {op}: {reason}")]
    Refused { op: String, reason: String },
    #[error("{op} failed: {reason}")]
    Failed { op: String, reason: String },
    #[error("{op}: {reason}; the next request gets a fresh worker")]
    WorkerDied { op: String, reason: String },
    #[error("{op}: {reason}")]
    Helper { op: String, reason: String },
    #[error("the {0} actor did not answer")]
    Call(&'static str),
}

/// The helper process, shared so the actor can hand it to a blocking task.
pub type SharedHelper = Arc<Mutex<Option<Helper>>>;

#[derive(Debug)]
pub enum HelperMsg {
    Call {
        request: Request,
        reply: RpcReplyPort<Result<Reply, NetError>>,
    },
    Status(RpcReplyPort<Option<Confinement>>),
}

/// The only way to the helper: requests are sent one at a time, from a blocking task.
#[derive(Debug, Default)]
pub struct HelperActor;

impl Actor for HelperActor {
    type Msg = HelperMsg;
    type State = SharedHelper;
    type Arguments = SharedHelper;

    async fn pre_start(
        &self,
        _myself: ActorRef<HelperMsg>,
        helper: SharedHelper,
    ) -> Result<SharedHelper, ActorProcessingErr> {
        Ok(helper)
    }

    async fn handle(
        &self,
        _myself: ActorRef<HelperMsg>,
        msg: HelperMsg,
        helper: &mut SharedHelper,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            HelperMsg::Status(reply) => {
                let c = helper
                    .lock()
                    .expect("helper lock")
                    .as_ref()
                    .map(|h| h.confinement().clone());
                let _ = reply.send(c);
            }
            HelperMsg::Call { request, reply } => {
                let shared = Arc::clone(helper);
                // Awaited here on purpose: the helper serves one request at a time, and
                // this keeps them in order. Each takes milliseconds.
                let result = tokio::task::spawn_blocking(move || call(&shared, &request))
                    .await
                    .expect("helper call does not panic");
                let _ = reply.send(result);
            }
        }
        Ok(())
    }
}

fn call(shared: &SharedHelper, request: &Request) -> Result<Reply, NetError> {
    let op = request.op().to_owned();
    let mut guard = shared.lock().expect("helper lock");
    let Some(helper) = guard.as_mut() else {
        return Err(NetError::Unprivileged(describe(request)));
    };
    match helper.call(request) {
        Ok(
            r @ (Reply::Done
            | Reply::Status(_)
            | Reply::Spawned { .. }
            | Reply::Counter { .. }
            | Reply::RefusedFlows { .. }),
        ) => Ok(r),
        Ok(Reply::Refused { reason }) => Err(NetError::Refused { op, reason }),
        Ok(Reply::Failed { reason }) => Err(NetError::Failed { op, reason }),
        Ok(Reply::WorkerDied { reason }) => Err(NetError::WorkerDied { op, reason }),
        Err(e @ HelperError::Gone(_)) => {
            tracing::error!(error = %e, "the privileged helper is gone");
            Err(NetError::Helper {
                op,
                reason: e.to_string(),
            })
        }
        Err(e) => Err(NetError::Helper {
            op,
            reason: e.to_string(),
        }),
    }
}

fn describe(request: &Request) -> String {
    match request {
        Request::EnsureBridge => "setting up the bridge".into(),
        Request::CreateTap { .. } | Request::AttachTap { .. } => "a VM network (its tap)".into(),
        Request::DeleteTap { .. } => "removing a tap".into(),
        Request::NatAdd { .. } | Request::NatRemove { .. } => "NAT (--nat)".into(),
        Request::SpawnJailer { .. } => "starting Firecracker's jailer".into(),
        Request::EgressSet { .. } | Request::EgressVouch { .. } | Request::EgressRemove { .. } => {
            "an egress policy or --isolate".into()
        }
        other => other.op().replace('_', " "),
    }
}

/// The current reference to an actor, replaced in place when it is restarted.
pub type Slot<M> = Arc<RwLock<Option<ActorRef<M>>>>;

fn live<M>(slot: &Slot<M>) -> Option<ActorRef<M>> {
    slot.read().expect("slot lock").clone()
}

pub(crate) async fn helper_call(slot: &Slot<HelperMsg>, request: Request) -> Result<(), NetError> {
    helper_reply(slot, request).await.map(drop)
}

async fn helper_reply(slot: &Slot<HelperMsg>, request: Request) -> Result<Reply, NetError> {
    let helper = live(slot).ok_or(NetError::Call("helper"))?;
    ractor::call!(helper, |reply| HelperMsg::Call { request, reply })
        .map_err(|_| NetError::Call("helper"))?
}

/// The tap name of a VM.
pub fn tap_name(vm_id: &str) -> String {
    format!("{}{vm_id}", banger_policy::TAP_PREFIX)
}

#[derive(Debug)]
pub enum NetMsg {
    /// Make the VM's tap (owned by `uid`) and, when `bridge`, put it on the bridge;
    /// answers its name.
    Attach {
        vm: String,
        uid: u32,
        bridge: bool,
        reply: RpcReplyPort<Result<String, NetError>>,
    },
    /// Put a tap made without the bridge on it (a clone's, once its guest has its own
    /// address).
    Bridge {
        vm: String,
        reply: RpcReplyPort<Result<(), NetError>>,
    },
    Detach {
        vm: String,
        reply: RpcReplyPort<Result<(), NetError>>,
    },
}

/// Put tap `name` on the bridge (and up), making the bridge again if it went away under
/// us (someone deleted it).
async fn attach_tap(helper: &Slot<HelperMsg>, name: &str) -> Result<(), NetError> {
    let attach = || Request::AttachTap {
        name: name.to_owned(),
    };
    match helper_call(helper, attach()).await {
        Err(NetError::Failed { .. }) => {
            helper_call(helper, Request::EnsureBridge).await?;
            helper_call(helper, attach()).await
        }
        other => other,
    }
}

/// The bridge and the taps.
#[derive(Debug, Default)]
pub struct NetActor;

#[derive(Debug)]
pub struct NetState {
    helper: Slot<HelperMsg>,
    bridge_ready: bool,
}

impl Actor for NetActor {
    type Msg = NetMsg;
    type State = NetState;
    type Arguments = Slot<HelperMsg>;

    async fn pre_start(
        &self,
        _myself: ActorRef<NetMsg>,
        helper: Slot<HelperMsg>,
    ) -> Result<NetState, ActorProcessingErr> {
        Ok(NetState {
            helper,
            bridge_ready: false,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<NetMsg>,
        msg: NetMsg,
        state: &mut NetState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            NetMsg::Attach {
                vm,
                uid,
                bridge,
                reply,
            } => {
                let result = async {
                    if !state.bridge_ready {
                        helper_call(&state.helper, Request::EnsureBridge).await?;
                        state.bridge_ready = true;
                        // Where systemd-resolved runs, route `.vm` to the bridge's resolver
                        // (the helper refuses when resolved is not in use: nothing to do).
                        match helper_call(&state.helper, Request::ResolvedRoute { port: 53 }).await
                        {
                            Ok(()) | Err(NetError::Refused { .. }) => {}
                            Err(e) => {
                                tracing::warn!(error = %e, "routing .vm through systemd-resolved")
                            }
                        }
                    }
                    let name = tap_name(&vm);
                    helper_call(
                        &state.helper,
                        Request::CreateTap {
                            name: name.clone(),
                            uid,
                        },
                    )
                    .await?;
                    if !bridge {
                        return Ok(name);
                    }
                    if let Err(e) = attach_tap(&state.helper, &name).await {
                        let _ = helper_call(&state.helper, Request::DeleteTap { name }).await;
                        return Err(e);
                    }
                    Ok(name)
                }
                .await;
                let _ = reply.send(result);
            }
            NetMsg::Bridge { vm, reply } => {
                let _ = reply.send(attach_tap(&state.helper, &tap_name(&vm)).await);
            }
            NetMsg::Detach { vm, reply } => {
                let r = helper_call(
                    &state.helper,
                    Request::DeleteTap {
                        name: tap_name(&vm),
                    },
                )
                .await;
                let _ = reply.send(r);
            }
        }
        Ok(())
    }
}

#[derive(Debug)]
pub enum NatMsg {
    Set {
        vm: String,
        /// Some: masquerade this address; None: remove the VM's NAT.
        ip: Option<Ipv4Addr>,
        reply: RpcReplyPort<Result<(), NetError>>,
    },
}

/// NAT rules, one per VM with `--nat`.
#[derive(Debug, Default)]
pub struct NatActor;

impl Actor for NatActor {
    type Msg = NatMsg;
    type State = Slot<HelperMsg>;
    type Arguments = Slot<HelperMsg>;

    async fn pre_start(
        &self,
        _myself: ActorRef<NatMsg>,
        helper: Slot<HelperMsg>,
    ) -> Result<Slot<HelperMsg>, ActorProcessingErr> {
        Ok(helper)
    }

    async fn handle(
        &self,
        _myself: ActorRef<NatMsg>,
        msg: NatMsg,
        helper: &mut Slot<HelperMsg>,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            NatMsg::Set { vm, ip, reply } => {
                let request = match ip {
                    Some(ip) => Request::NatAdd { vm, ip },
                    None => Request::NatRemove { vm },
                };
                let _ = reply.send(helper_call(helper, request).await);
            }
        }
        Ok(())
    }
}

/// What a VM actor uses: the live NetActor and NatActor, and the helper for the jailer and
/// for signals its own uid cannot send. `HostNet::default()` has none of them: no helper.
#[derive(Debug, Clone, Default)]
pub struct HostNet {
    pub net: Slot<NetMsg>,
    pub nat: Slot<NatMsg>,
    pub helper: Slot<HelperMsg>,
    /// Running VMs' egress policies, by lease, for the guests' resolver.
    pub egress: super::dns::Policies,
}

impl HostNet {
    /// Give the VM (lease `ip`) its egress filter and isolation, replacing what it had.
    pub async fn egress_set(
        &self,
        vm: &str,
        ip: Ipv4Addr,
        filter: banger_policy::egress::EgressFilter,
    ) -> Result<(), NetError> {
        let request = Request::EgressSet {
            vm: vm.to_owned(),
            ip,
            filter,
        };
        helper_call(&self.helper, request).await
    }

    /// Remove the VM's filter, isolation, set and counter.
    pub async fn egress_remove(&self, vm: &str) -> Result<(), NetError> {
        helper_call(&self.helper, Request::EgressRemove { vm: vm.to_owned() }).await
    }

    /// Packets the VM's filter dropped (None: no filter, or no helper).
    pub async fn egress_dropped(&self, vm: &str) -> Option<u64> {
        match helper_reply(&self.helper, Request::EgressCounter { vm: vm.to_owned() }).await {
            Ok(Reply::Counter { packets }) => packets,
            _ => None,
        }
    }

    /// The flows the VM's filter dropped lately, the latest first (none: no filter).
    pub async fn egress_refused(
        &self,
        vm: &str,
    ) -> Result<Vec<banger_policy::egress::RefusedFlow>, NetError> {
        let op = "egress_refused";
        match helper_reply(&self.helper, Request::EgressRefused { vm: vm.to_owned() }).await? {
            Reply::RefusedFlows { flows } => Ok(flows),
            other => Err(NetError::Failed {
                op: op.into(),
                reason: format!("unexpected answer {other:?}"),
            }),
        }
    }

    /// Make and attach the VM's tap; its name.
    pub async fn attach(&self, vm: &str, uid: u32) -> Result<String, NetError> {
        self.make_tap(vm, uid, true).await
    }

    /// Make the VM's tap, off the bridge: nothing the guest sends reaches another VM until
    /// [`Self::bridge`] (a clone's, until its guest has its own address).
    pub async fn detached(&self, vm: &str, uid: u32) -> Result<String, NetError> {
        self.make_tap(vm, uid, false).await
    }

    async fn make_tap(&self, vm: &str, uid: u32, bridge: bool) -> Result<String, NetError> {
        let net = live(&self.net).ok_or(NetError::Call("net"))?;
        let vm = vm.to_owned();
        ractor::call!(net, |reply| NetMsg::Attach {
            vm,
            uid,
            bridge,
            reply
        })
        .map_err(|_| NetError::Call("net"))?
    }

    /// Put the tap [`Self::detached`] made on the bridge.
    pub async fn bridge(&self, vm: &str) -> Result<(), NetError> {
        let net = live(&self.net).ok_or(NetError::Call("net"))?;
        let vm = vm.to_owned();
        ractor::call!(net, |reply| NetMsg::Bridge { vm, reply })
            .map_err(|_| NetError::Call("net"))?
    }

    /// Remove the VM's tap (absent is fine).
    pub async fn detach(&self, vm: &str) -> Result<(), NetError> {
        let net = live(&self.net).ok_or(NetError::Call("net"))?;
        let vm = vm.to_owned();
        ractor::call!(net, |reply| NetMsg::Detach { vm, reply })
            .map_err(|_| NetError::Call("net"))?
    }

    /// Add (Some) or remove (None) the VM's NAT.
    pub async fn nat(&self, vm: &str, ip: Option<Ipv4Addr>) -> Result<(), NetError> {
        let nat = live(&self.nat).ok_or(NetError::Call("nat"))?;
        let vm = vm.to_owned();
        ractor::call!(nat, |reply| NatMsg::Set { vm, ip, reply })
            .map_err(|_| NetError::Call("nat"))?
    }

    /// The helper's confinement, when there is a helper.
    pub async fn confinement(&self) -> Option<Confinement> {
        let helper = live(&self.helper)?;
        ractor::call!(helper, HelperMsg::Status).ok().flatten()
    }

    /// Whether a privileged helper runs (bangerd was started as root).
    pub async fn privileged(&self) -> bool {
        self.confinement().await.is_some()
    }

    /// Start Firecracker's jailer for VM `vm` through the helper's launcher, output
    /// appended to `console`, its cgroup limited to `vcpu` CPUs and `memory_mib` of guest
    /// RAM: its (pid, start time). Only with a helper: without one, Firecracker runs
    /// unjailed (the jailer needs root), see `vmm::firecracker`.
    pub async fn spawn_jailer(
        &self,
        vm: &str,
        console: &std::path::Path,
        vcpu: u32,
        memory_mib: u32,
        uid: u32,
    ) -> Result<(i32, u64), NetError> {
        let request = Request::SpawnJailer {
            vm: vm.to_owned(),
            console: console.to_owned(),
            vcpu,
            memory_mib,
            uid,
        };
        match helper_reply(&self.helper, request).await? {
            Reply::Spawned { pid, start_time } => Ok((pid, start_time)),
            other => Err(NetError::Helper {
                op: "spawn_jailer".into(),
                reason: format!("unexpected answer {other:?}"),
            }),
        }
    }

    /// Make a jailed Firecracker's vsock socket reachable outside its jail (see
    /// `banger_policy::jail::owner`), once `PUT /vsock` has made it.
    pub async fn expose_vsock(&self, vm: &str) -> Result<(), NetError> {
        helper_call(&self.helper, Request::ExposeVsock { vm: vm.to_owned() }).await
    }

    /// Remove a Firecracker VM's jail and cgroup through the helper (a no-op without one:
    /// the driver removed what its own uid can).
    pub async fn clean_jail(&self, vm: &str) -> Result<(), NetError> {
        if !self.privileged().await {
            return Ok(());
        }
        helper_call(&self.helper, Request::CleanJail { vm: vm.to_owned() }).await
    }

    /// Signal a VM process if it is still the one started at `start`: directly, or through
    /// the helper when this uid may not (a jailer that has not yet become the VM user).
    /// Whether the signal was sent.
    pub async fn signal(&self, pid: i32, start: u64, signal: nix::sys::signal::Signal) -> bool {
        match crate::vm::proc::try_signal(pid, start, signal) {
            Ok(sent) => sent,
            Err(nix::errno::Errno::EPERM) if self.privileged().await => {
                let request = Request::Signal {
                    pid,
                    start_time: start,
                    signal: signal as i32,
                };
                match helper_call(&self.helper, request).await {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(pid, error = %e, "the helper did not signal the VM process");
                        false
                    }
                }
            }
            Err(e) => {
                tracing::warn!(pid, error = %e, "cannot signal the VM process");
                false
            }
        }
    }
}
