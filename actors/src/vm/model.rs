//! The persisted shape of a VM, and the rules of its state machine.
//!
//! ```text
//!            start                 guest up                stop
//! created ─────────▶ starting ─────────────▶ running ─────────────▶ stopping
//!    ▲                  │  │                   │  │                    │
//!    │           failed │  │ stop/kill         │  │ kill / vmm exited  │ exited / timeout→kill
//!    │                  ▼  ▼                   ▼  ▼                    ▼
//!    │               error   ───────────▶ stopped ◀──────────────────────
//!    │                 │ start               │ start
//!    └─────────────────┴─────────────────────┘ (back to starting)
//! ```
//! Pause and resume (vCPUs frozen in memory, the VMM process kept):
//!
//! ```text
//!            pause               (pause of a paused VM: a no-op success)
//! running ◀─────────▶ paused ──── stop: resumed, then shut down as from running
//!            resume              kill / delete --force / vmm exited: as from running
//! ```
//!
//! `suspend` saves a running VM to disk and ends its VMM (running → suspended, no
//! process); `start` of a suspended VM restores it (suspended → starting → running), and a
//! restore that fails leaves it suspended with its saved state. `stop` of a suspended VM
//! discards the saved state (→ stopped: its next start is a cold boot).
//!
//! Delete is allowed from created, stopped, suspended and error (the saved state goes with
//! the VM's directory); a starting/running/paused/stopping VM needs `force` (it is killed
//! first). `set` of vcpu/memory/disk only while not running.

use serde::{Deserialize, Serialize};

use banger_api::{VmSpec, VmState, VmmKind};

/// A VM as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub id: String,
    pub name: String,
    pub image: String,
    pub kernel: String,
    pub vmm: VmmKind,
    pub spec: VmSpec,
    pub nat: bool,
    pub state: VmState,
    pub error: Option<String>,
    pub created_at: u64,
    pub started_at: Option<u64>,
    pub cmdline: Option<String>,
    /// The VMM's processes while it runs; used to re-adopt it after a daemon restart.
    pub runtime: Option<Runtime>,
    /// The VM's IPv4 lease (see `net::lease`); it lives and dies with the record.
    #[serde(default)]
    pub ip: Option<String>,
    /// Published ports (see `vm::publish`); records older than the field have none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<super::publish::Publish>,
    /// The uid a jailed Firecracker of this VM runs as, its own from `[firecracker]
    /// vm_uids` (see `vmm::firecracker::allocate_uid`); like the lease it lives and dies
    /// with the record. None for QEMU VMs (and Firecracker records older than the field
    /// until their next start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// The egress policy (see `net::egress`); `nat` is kept equal to its `nat()`. Records
    /// older than the field have `subnet`, read as `all` when `nat` (see [`Self::egress`]).
    #[serde(default, skip_serializing_if = "is_subnet")]
    pub egress: banger_api::Egress,
    /// Cut off from the other VMs on the bridge (`--isolate`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub isolate: bool,
    /// The VM's deadline (`--ttl`), armed by its actor; cleared when it fires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<banger_api::Expiry>,
    /// The VMM process of a launch under way, (pid, start time), stored as soon as the
    /// driver has spawned it and before it is configured, until `runtime` holds it or it
    /// is gone. The launch's intent is the state `starting`, stored before the spawn: the
    /// VM's id names its directory and its jail, where the start-up census
    /// (`vm::orphans`) looks for a process whose pid was never stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spawned: Option<(i32, u64)>,
    /// The VM's named snapshots, oldest first (see `vm::snapshot`): each a directory under
    /// the VM's, gone with it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<SnapshotRecord>,
    /// Set on a VM made from another VM's saved state (`vm fork`): its guest is that VM's
    /// until it takes its own identity, which its next restore does through the agent
    /// before its tap joins the bridge (see `vm::fork`); cleared once it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone_of: Option<CloneOf>,
    /// The warm snapshot (its id) this VM's first start restores from, instead of booting
    /// (see `vm::warm`); set with `clone_of`, cleared once it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm: Option<String>,
    /// This VM exists to be saved as a warm snapshot (`image warm`): its tap never joins
    /// the bridge, it gets no `file_sync`, and it is deleted once saved (or, cut short by
    /// a daemon's death, at the next start).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub warm_maker: bool,
}

/// The VM a clone's guest was when it was saved: its name, and the address the guest
/// still has (which it gives up for the clone's own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneOf {
    pub vm: String,
    /// `<addr>/<prefix>`, when the source had a network.
    pub address: Option<String>,
}

/// A named snapshot of a VM as stored: what `vm rollback` checks before it restores one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// 12 hex digits, its directory's name.
    pub id: String,
    pub name: String,
    pub created_at: u64,
    pub vmm: VmmKind,
    /// The VMM's `--version` line when it was taken.
    pub vmm_version: String,
    /// `<name>@<registered_at>` of the VM's image and kernel.
    pub image: String,
    pub kernel: String,
    pub spec: VmSpec,
    /// Each file (its path under the snapshot's directory) with its length: a snapshot
    /// whose files are gone or truncated is refused before anything is changed.
    pub files: Vec<(String, u64)>,
}

fn is_subnet(e: &banger_api::Egress) -> bool {
    *e == banger_api::Egress::Subnet
}

impl VmRecord {
    /// The VM's egress policy in force (`--nat` from before the field is `all`).
    pub fn egress(&self) -> banger_api::Egress {
        match (&self.egress, self.nat) {
            (banger_api::Egress::Subnet, true) => banger_api::Egress::All,
            (e, _) => e.clone(),
        }
    }
}

/// Host processes and sockets of a running VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Runtime {
    /// The VMM (firecracker, or qemu).
    pub pid: i32,
    /// Its start time in clock ticks since boot (/proc/<pid>/stat field 22): with the pid,
    /// it identifies the process even if the pid is reused later.
    pub start_time: u64,
    /// Helper processes of the VM (QEMU's agent proxy), same identity rule.
    pub helpers: Vec<(i32, u64)>,
    /// The VMM control socket (Firecracker API, or QMP).
    pub control_socket: String,
    /// The hybrid vsock Unix socket (`CONNECT <port>\n`).
    pub vsock_socket: String,
    /// How the VMM is confined, for `vm show` (Firecracker: jailed and its cgroup, or
    /// unjailed and why). None for QEMU and for records older than this field.
    #[serde(default)]
    pub isolation: Option<String>,
}

/// An operation a caller asks of a VM, for [`check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Start,
    Stop,
    Kill,
    Delete { force: bool },
    Set,
    Pause,
    Resume,
    Suspend,
}

/// What a pause or resume asked in this state is: the VMM's work, or nothing to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Ask the VMM.
    Do,
    /// Already there: answer the VM as it is (like `kill -STOP` twice, not docker's
    /// "already paused" error, so scripts can pause a set of VMs without checking each).
    AlreadyThere,
}

/// Why an operation is refused in the current state (a conflict for the caller).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// Whether `op` is allowed in `state`; the message says what to do instead.
pub fn check(name: &str, state: VmState, op: Op) -> Result<(), Refused> {
    use VmState::*;
    let refuse = |m: String| Err(Refused(m));
    match (op, state) {
        (Op::Start, Created | Stopped | Error | Suspended) => Ok(()),
        (Op::Start, Running) => refuse(format!("vm {name} is already running")),
        (Op::Start, Starting) => refuse(format!("vm {name} is already starting")),
        (Op::Start, Paused) => refuse(banger_api::paused_refusal(name)),
        (Op::Start, Stopping) => refuse(format!(
            "vm {name} is stopping; wait for it, or `banger vm kill {name}`"
        )),
        (Op::Stop, Starting | Running | Paused | Stopping | Suspended) => Ok(()),
        (Op::Stop, _) => refuse(format!("vm {name} is not running ({})", state.as_str())),
        (Op::Kill, Starting | Running | Paused | Stopping) => Ok(()),
        (Op::Kill, _) => refuse(format!("vm {name} is not running ({})", state.as_str())),
        (Op::Delete { .. }, Created | Stopped | Error | Suspended) => Ok(()),
        (Op::Delete { force: true }, _) => Ok(()),
        (Op::Delete { force: false }, _) => refuse(format!(
            "vm {name} is {}; stop it first, or delete it with --force",
            state.as_str()
        )),
        (Op::Set, Created | Stopped | Error) => Ok(()),
        (Op::Set, Suspended) => refuse(format!(
            "vm {name} is suspended (its saved memory is for its current size); start it, or `banger vm stop {name}` to discard the saved state"
        )),
        (Op::Set, _) => refuse(format!(
            "vm {name} is {}; stop it to change its size",
            state.as_str()
        )),
        (Op::Suspend, Running) => Ok(()),
        (Op::Suspend, Suspended) => refuse(format!("vm {name} is already suspended")),
        (Op::Suspend, _) => refuse(format!(
            "vm {name} is {}; only a running vm can be suspended",
            state.as_str()
        )),
        (Op::Pause | Op::Resume, _) => transition(name, state, op).map(drop),
    }
}

/// Whether a pause or resume in `state` is the VMM's work or a no-op, or refused.
pub fn transition(name: &str, state: VmState, op: Op) -> Result<Transition, Refused> {
    use VmState::*;
    let refuse = |m: String| Err(Refused(m));
    match (op, state) {
        (Op::Pause, Running) | (Op::Resume, Paused) => Ok(Transition::Do),
        (Op::Pause, Paused) | (Op::Resume, Running) => Ok(Transition::AlreadyThere),
        (Op::Pause | Op::Resume, Starting) => refuse(format!(
            "vm {name} is starting; wait until it runs (`banger vm start {name}` waits for it)"
        )),
        (Op::Pause | Op::Resume, _) => refuse(format!(
            "vm {name} is not running ({}); start it with `banger vm start {name}`",
            state.as_str()
        )),
        _ => unreachable!("transition is asked only of pause and resume"),
    }
}

/// Whether a VM in this state has (or may have) a VMM process.
pub fn is_active(state: VmState) -> bool {
    matches!(
        state,
        VmState::Starting | VmState::Running | VmState::Paused | VmState::Stopping
    )
}

/// VM names: `[a-z0-9][a-z0-9-]{0,62}`, so `<name>.vm` is a valid DNS label.
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid vm name {name:?}: use 1-63 of a-z, 0-9 and '-', not starting or ending with '-'"
        ))
    }
}

/// A new VM id: 12 lowercase hex digits (fits `bg-<id>` tap names in IFNAMSIZ).
pub fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

/// A generated name: `<adjective>-<noun>`, like docker's, from the id's bits.
pub fn generated_name(id: &str) -> String {
    const ADJ: &[&str] = &[
        "brave", "calm", "eager", "fancy", "gentle", "happy", "jolly", "keen", "lucky", "merry",
        "nimble", "proud", "quick", "silly", "swift", "witty",
    ];
    const NOUN: &[&str] = &[
        "otter", "falcon", "badger", "lynx", "heron", "marten", "puffin", "stoat", "wren", "bison",
        "gecko", "ibex", "koala", "lemur", "newt", "orca",
    ];
    let n = u64::from_str_radix(id.get(..8).unwrap_or("0"), 16).unwrap_or(0);
    format!(
        "{}-{}-{}",
        ADJ[(n % 16) as usize],
        NOUN[((n >> 4) % 16) as usize],
        id.get(..4).unwrap_or("0000")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use VmState::*;

    const ALL: [VmState; 8] = [
        Created, Starting, Running, Paused, Stopping, Stopped, Error, Suspended,
    ];

    #[test]
    fn start_only_from_rest() {
        for s in ALL {
            assert_eq!(
                check("t", s, Op::Start).is_ok(),
                matches!(s, Created | Stopped | Error | Suspended),
                "{s:?}"
            );
        }
        assert!(
            check("t", Running, Op::Start)
                .unwrap_err()
                .0
                .contains("already running")
        );
    }

    #[test]
    fn stop_and_kill_only_when_active() {
        for s in ALL {
            // Stop of a suspended VM discards its saved state.
            assert_eq!(
                check("t", s, Op::Stop).is_ok(),
                is_active(s) || s == Suspended,
                "{s:?}"
            );
            assert_eq!(check("t", s, Op::Kill).is_ok(), is_active(s), "{s:?}");
        }
    }

    #[test]
    fn delete_of_an_active_vm_needs_force() {
        for s in ALL {
            assert_eq!(
                check("t", s, Op::Delete { force: false }).is_ok(),
                !is_active(s),
                "{s:?}"
            );
            assert!(check("t", s, Op::Delete { force: true }).is_ok());
        }
        let msg = check("t", Running, Op::Delete { force: false })
            .unwrap_err()
            .0;
        assert!(msg.contains("--force"), "{msg}");
    }

    #[test]
    fn set_only_while_not_running() {
        for s in ALL {
            assert_eq!(
                check("t", s, Op::Set).is_ok(),
                !is_active(s) && s != Suspended,
                "{s:?}"
            );
        }
    }

    #[test]
    fn pause_only_a_running_vm_and_resume_only_a_paused_one() {
        for s in ALL {
            let pause = transition("t", s, Op::Pause);
            let resume = transition("t", s, Op::Resume);
            match s {
                Running => {
                    assert_eq!(pause, Ok(Transition::Do));
                    assert_eq!(resume, Ok(Transition::AlreadyThere));
                }
                Paused => {
                    assert_eq!(pause, Ok(Transition::AlreadyThere));
                    assert_eq!(resume, Ok(Transition::Do));
                }
                _ => {
                    assert!(pause.is_err() && resume.is_err(), "{s:?}");
                    assert!(check("t", s, Op::Pause).is_err(), "{s:?}");
                }
            }
        }
        let msg = transition("t", Stopped, Op::Pause).unwrap_err().0;
        assert!(msg.contains("not running (stopped)"), "{msg}");
        // A paused VM is told how to get it back, not to start it.
        let msg = check("t", Paused, Op::Start).unwrap_err().0;
        assert_eq!(msg, "vm t is paused; `banger vm resume t`");
    }

    #[test]
    fn suspend_only_while_running() {
        for s in ALL {
            assert_eq!(check("t", s, Op::Suspend).is_ok(), s == Running, "{s:?}");
        }
        assert!(!is_active(Suspended), "a suspended vm has no VMM process");
    }

    #[test]
    fn names() {
        for ok in ["a", "dev", "my-vm-2", &"x".repeat(63)] {
            validate_name(ok).unwrap();
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", "../x", &"x".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        let id = new_id();
        assert_eq!(id.len(), 12);
        validate_name(&generated_name(&id)).unwrap();
    }
}
