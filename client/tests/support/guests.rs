//! Shared by the real-guest test binaries (`vm_qemu`, `pull_boot_qemu`, `image_build`):
//! a machine-wide limit on how many TCG guests boot at once, and a record of how long each
//! guest took to answer.
//!
//! **Why a limit.** Under TCG every guest vCPU is a host thread that runs flat out while it
//! boots. `cargo test` runs several tests of one binary at once (`--test-threads`), and a
//! developer may run two test binaries or two worktrees side by side; with more guests
//! than cores each boot stretches until the waits in the tests (the agent timeout, console
//! lines) are measured in minutes and a loaded machine turns them into flakes. So a test
//! takes a **guest slot** before its daemon boots anything, and holds it until it ends.
//!
//! Slots are `flock`ed files under the rig directory (`$BANGER_RIG_DIR/guest-slots/`), so
//! the limit holds across test binaries and processes, and the kernel releases a slot when
//! its holder dies (a panicking or killed test never leaks one). The count is
//! `BANGER_TEST_GUESTS`, default: the number of host CPUs (one TCG vCPU per core). A test
//! that boots two guests at once takes two slots in one go (all or none, so two such tests
//! can never deadlock each holding one).
//!
//! **Why a record.** `guest_wait` appends `<test> <what> <seconds>` to
//! `$BANGER_RIG_DIR/guest-waits.log`, so `scripts/flaky.sh` can report the slowest guest wait
//! of a run next to the timeout it is measured against: the margin, not a guess.

#![allow(dead_code)] // each test binary uses the part it needs

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;

use nix::fcntl::{Flock, FlockArg};
use std::time::{Duration, Instant};

fn rig_dir() -> PathBuf {
    std::env::var_os("BANGER_RIG_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/cache/banger-rig".into())
}

/// How many guests may boot at once on this machine.
pub fn slot_count() -> usize {
    std::env::var("BANGER_TEST_GUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
}

/// Held guest slots; dropping it (or the process dying) frees them.
#[derive(Debug)]
pub struct Slots {
    _locks: Vec<Flock<File>>,
    /// How long the test waited for its slots.
    pub waited: Duration,
}

/// Take `n` guest slots (all at once), waiting as long as it takes: the tests ahead are
/// bounded by their own timeouts.
pub fn acquire(n: usize) -> Slots {
    let total = slot_count();
    let n = n.min(total);
    let dir = rig_dir().join("guest-slots");
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    let t0 = Instant::now();
    loop {
        let mut held = Vec::new();
        for i in 0..total {
            let path = dir.join(format!("slot-{i}"));
            let f = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
            if let Ok(lock) = Flock::lock(f, FlockArg::LockExclusiveNonblock) {
                held.push(lock);
                if held.len() == n {
                    return Slots {
                        _locks: held,
                        waited: t0.elapsed(),
                    };
                }
            }
        }
        // Not enough free: let go of what we hold (no hold-and-wait) and look again.
        drop(held);
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Record that `what` (a guest boot, a console line) took `took` in test `test`.
pub fn guest_wait(test: &str, what: &str, took: Duration) {
    let path = rig_dir().join("guest-waits.log");
    if let Ok(mut f) = File::options().create(true).append(true).open(&path) {
        let what = what.replace(char::is_whitespace, "_");
        let _ = writeln!(f, "{test} {what} {:.1}", took.as_secs_f64());
    }
}

/// The name of the running test (cargo names test threads after their tests).
pub fn test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("main")
        .rsplit("::")
        .next()
        .unwrap_or("main")
        .to_owned()
}
