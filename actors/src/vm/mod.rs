//! VMs: the persisted model and its state machine, disks, the kernel command line, host
//! processes, and the VmActor that owns one VM.

pub mod actor;
pub mod cmdline;
pub mod disks;
pub mod fork;
pub mod model;
pub mod orphans;
pub mod proc;
pub mod publish;
pub mod snapshot;
pub mod spec;
pub mod sshkey;
pub mod warm;
pub mod watch;
