//! What the tree is started with.

use std::time::Duration;

use crate::pull::PullConfig;
use crate::vm_supervisor::VmSettings;
use crate::vmm::VmmConfig;

/// Everything the VM side of the tree needs besides the store.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub data_dir: std::path::PathBuf,
    pub vmm: VmmConfig,
    pub stop_timeout: Duration,
    pub extra_cmdline: String,
    pub tsc_khz: Option<u64>,
    /// See [`crate::vm::actor::VmEnv::agent_timeout`].
    pub agent_timeout: Duration,
    /// banger's ssh key (private key path), installed into guests; None: no ssh.
    pub ssh_key: Option<std::path::PathBuf>,
    /// `[[file_sync]]`: copied into each new VM's /root at its first boot.
    pub file_sync: Vec<crate::vm::sshkey::FileSync>,
    /// Where the `.vm` resolver listens (None: off).
    pub dns_listen: Option<std::net::SocketAddr>,
    /// The guests' resolver on the bridge (bound by bangerd as root), if any.
    pub guest_dns: Option<crate::net::dns::GuestDns>,
    pub settings: VmSettings,
    /// Image and kernel pulls (catalogs, registries, caches).
    pub pull: PullConfig,
}
