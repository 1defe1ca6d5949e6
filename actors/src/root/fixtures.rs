//! Fixtures of the tree's tests.

use std::sync::Arc;
use std::time::Duration;

use super::VmConfig;
use crate::pull::PullConfig;
use crate::vm_supervisor::VmSettings;
use crate::vmm::VmmConfig;

/// A VM config for tests: everything under `dir`, QEMU by default, no default image.
pub(super) fn test_vm_config(dir: &std::path::Path) -> VmConfig {
    use crate::vmm::{
        firecracker::FirecrackerConfig,
        qemu::{Accel, QemuConfig},
    };
    VmConfig {
        data_dir: dir.to_owned(),
        vmm: VmmConfig {
            firecracker: FirecrackerConfig {
                jailer: "jailer".into(),
                firecracker: "firecracker".into(),
                chroot_base: dir.join("jail"),
                vm_uids: banger_policy::UidRange {
                    first: 2_000_000_000,
                    count: 65536,
                },
                socket_gid: None,
            },
            qemu: QemuConfig {
                qemu: "qemu-system-x86_64".into(),
                agent_proxy: "bangerd".into(),
                accel: Accel::Tcg,
            },
        },
        stop_timeout: Duration::from_secs(30),
        extra_cmdline: String::new(),
        tsc_khz: None,
        agent_timeout: Duration::ZERO,
        ssh_key: None,
        file_sync: Vec::new(),
        dns_listen: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0))),
        guest_dns: None,
        settings: VmSettings {
            defaults: Default::default(),
            host: crate::vm::spec::Host::detect(),
            default_vmm: banger_api::VmmChoice::Qemu,
            vmm_probe: Arc::new(crate::vmm::choose::FakeProbe {
                firecracker: false,
                jailer: false,
                kvm: crate::vmm::choose::Kvm::Missing,
                jailing: crate::vmm::choose::Jailing::NoHelper,
            }),
            default_image: None,
            subnet: "172.30.0.0/24".parse().expect("valid subnet"),
            network: false,
            max_fork_count: crate::vm::fork::MAX_FORK_COUNT,
            auto_warm: false,
            adopt_permits: Arc::new(tokio::sync::Semaphore::new(
                crate::vm_supervisor::ADOPT_CONCURRENCY,
            )),
        },
        pull: PullConfig {
            data_dir: dir.to_owned(),
            cache_dir: dir.join("cache"),
            catalogs: Arc::new(
                crate::pull::catalog::Catalogs::embedded()
                    .expect("the embedded catalogs are valid"),
            ),
            insecure_registries: Vec::new(),
            guest_binaries_dir: dir.join("guest"),
            mirror: None,
        },
    }
}

/// A VM record as the store keeps it: created, never started.
pub(super) fn stored_vm(id: &str, name: &str, created_at: u64) -> crate::vm::model::VmRecord {
    crate::vm::model::VmRecord {
        id: id.into(),
        name: name.into(),
        image: "img".into(),
        kernel: "k".into(),
        vmm: banger_api::VmmKind::Qemu,
        spec: banger_api::VmSpec {
            vcpu: 1,
            memory_mib: 256,
            disk_bytes: 1 << 30,
        },
        nat: false,
        state: banger_api::VmState::Created,
        error: None,
        created_at,
        started_at: None,
        cmdline: None,
        runtime: None,
        ip: None,
        publish: Vec::new(),
        egress: Default::default(),
        isolate: false,
        expires: None,
        spawned: None,
        snapshots: Vec::new(),
        clone_of: None,
        warm: None,
        warm_maker: false,
        uid: None,
    }
}
