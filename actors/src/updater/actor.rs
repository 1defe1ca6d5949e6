//! UpdaterActor: the daemon's side of `banger update`.
//!
//! The download, verification, staging and swap run in the `banger update` process (see
//! the module docs of [`super`]: they must outlive the daemon's restart); before it
//! touches anything, that process asks this actor for the **update gate**: the actor
//! lists the VMs whose operation is in flight (starting, stopping, or busy: a VM whose
//! actor did not answer `vm list` is listed from the store as busy, and counts; so does a
//! VM the daemon has not re-adopted yet since it started, listed as `adopting`) and
//! refuses while there are any, unless forced. (It is also where a future daemon-side scheduler of
//! update checks would live.)
//!
//! Restart policy: one-for-one under the root, state rebuilt empty (nothing in it is
//! needed across a restart).

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use banger_api::{VmInfo, VmState};

use crate::vm::actor::VmError;
use crate::vm_supervisor::VmSupervisorMsg;

/// Errors of the gate.
#[derive(Debug, thiserror::Error)]
pub enum UpdaterError {
    #[error(
        "a VM operation is in flight ({0}); wait for it to finish, or pass --force to update anyway"
    )]
    Busy(String),
    #[error("cannot list the VMs")]
    Vms(#[source] VmError),
    #[error("the vm-supervisor actor did not answer")]
    Call,
}

/// Messages of the UpdaterActor.
#[derive(Debug)]
pub enum UpdaterMsg {
    /// May an update to `version` proceed now? Answers the VMs that were in flight
    /// (empty unless `force`).
    Gate {
        version: String,
        force: bool,
        reply: RpcReplyPort<Result<Vec<String>, UpdaterError>>,
    },
}

#[derive(Debug, Default)]
pub struct UpdaterActor;

/// Where the actor finds the live VM supervisor (the root's slot).
pub type VmsSlot = std::sync::Arc<std::sync::RwLock<Option<ActorRef<VmSupervisorMsg>>>>;

#[derive(Debug)]
pub struct UpdaterState {
    vms: VmsSlot,
    /// The last update granted (version), for the log.
    last_gate: Option<String>,
}

/// VMs whose operation is in flight: starting, stopping, busy (its actor did not answer
/// `vm list`, so whatever it is doing may be an operation) or adopting (its re-adoption
/// after the daemon's start is under way: an update now would cut it).
pub fn in_flight(vms: &[VmInfo]) -> Vec<String> {
    vms.iter()
        .filter(|v| {
            v.busy || v.adopting || matches!(v.state, VmState::Starting | VmState::Stopping)
        })
        .map(|v| match (v.busy, v.adopting) {
            (true, _) => format!("{} busy (last stored state {})", v.name, v.state.as_str()),
            (false, true) => format!(
                "{} adopting (last stored state {})",
                v.name,
                v.state.as_str()
            ),
            (false, false) => format!("{} {}", v.name, v.state.as_str()),
        })
        .collect()
}

impl Actor for UpdaterActor {
    type Msg = UpdaterMsg;
    type State = UpdaterState;
    type Arguments = VmsSlot;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        vms: VmsSlot,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(UpdaterState {
            vms,
            last_gate: None,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            UpdaterMsg::Gate {
                version,
                force,
                reply,
            } => {
                let result = async {
                    let vms = state.vms.read().expect("tree lock").clone();
                    let vms = match vms {
                        Some(vms) => ractor::call!(vms, VmSupervisorMsg::List)
                            .map_err(|_| UpdaterError::Call)?
                            .map_err(UpdaterError::Vms)?,
                        None => Vec::new(),
                    };
                    let busy = in_flight(&vms);
                    if !busy.is_empty() && !force {
                        return Err(UpdaterError::Busy(busy.join(", ")));
                    }
                    Ok(busy)
                }
                .await;
                if let Ok(busy) = &result {
                    tracing::info!(%version, force, in_flight = ?busy, "update gate granted");
                    state.last_gate = Some(version);
                }
                let _ = reply.send(result);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_vms_are_in_flight_whatever_their_stored_state() {
        let vm = |name: &str, state, busy| VmInfo {
            id: name.into(),
            name: name.into(),
            state,
            error: None,
            vmm: banger_api::VmmKind::Qemu,
            spec: banger_api::VmSpec {
                vcpu: 1,
                memory_mib: 256,
                disk_bytes: 1 << 30,
            },
            image: "i".into(),
            kernel: "k".into(),
            nat: false,
            created_at: 1,
            started_at: None,
            pid: None,
            dir: "/d".into(),
            console_log: "/d/c".into(),
            cmdline: None,
            vsock_socket: None,
            ip: None,
            isolation: None,
            busy,
            clone_of: None,
            adopting: false,
            published: Vec::new(),
            egress: Default::default(),
            isolate: false,
            expires: None,
            saved_bytes: None,
            snapshots: Vec::new(),
            egress_dropped: None,
            dns_refused: None,
        };
        let vms = [
            vm("a", VmState::Running, false),
            vm("b", VmState::Starting, false),
            vm("c", VmState::Running, true),
            vm("d", VmState::Stopped, false),
        ];
        assert_eq!(
            in_flight(&vms),
            ["b starting", "c busy (last stored state running)"]
        );
    }
}
