//! VmSupervisor: parent of one VmActor per VM (added with the VM lifecycle). For now it
//! owns no children; its restart policy is already the one VmActors will get:
//! one-for-one, a failed VmActor is restarted with its state rebuilt from the store and
//! the host, a VmActor that stops normally (VM deleted) is not.

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

/// Messages of the VmSupervisor.
#[derive(Debug)]
pub enum VmSupervisorMsg {
    /// Number of VM actors alive.
    Count(RpcReplyPort<usize>),
}

#[derive(Debug, Default)]
pub struct VmSupervisor;

/// State: the live children.
#[derive(Debug, Default)]
pub struct VmSupervisorState {
    children: Vec<ractor::ActorCell>,
}

impl Actor for VmSupervisor {
    type Msg = VmSupervisorMsg;
    type State = VmSupervisorState;
    type Arguments = ();

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        _args: (),
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(VmSupervisorState::default())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            VmSupervisorMsg::Count(reply) => {
                let _ = reply.send(state.children.len());
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorStarted(cell) => state.children.push(cell),
            SupervisionEvent::ActorTerminated(cell, _, _)
            | SupervisionEvent::ActorFailed(cell, _) => {
                // Never stop ourselves because a VM actor ended (ractor's default would).
                state.children.retain(|c| c.get_id() != cell.get_id());
            }
            _ => {}
        }
        Ok(())
    }
}
