//! banger's own ssh key, and putting it into guests.
//!
//! The key is ed25519, made with the system `ssh-keygen` the first time a VM needs it
//! (so by the daemon after it dropped to its owner, who can then read it), at
//! `<data_dir>/ssh/id_ed25519` unless the config's `ssh_key_path` names another one (an
//! existing key there is used as it is).
//!
//! Decision: the public key reaches the guest through the agent right after it first
//! answers on every start (not with debugfs into the work disk before boot: the daemon may
//! run unprivileged and debugfs cannot set root ownership cleanly there, and the agent is
//! already needed for `vm exec`). `/root/.ssh/authorized_keys` is on the work disk; the
//! key is appended only when missing, so keys the user added stay.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use banger_guest::host::{self, HostError};
use banger_guest::proto::{ProtoError, Request};

/// Errors making or installing the key.
#[derive(Debug, thiserror::Error)]
pub enum SshKeyError {
    #[error("cannot create {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run ssh-keygen (install openssh-client)")]
    Spawn(#[source] std::io::Error),
    #[error("ssh-keygen failed for {path}: {stderr}")]
    Keygen { path: PathBuf, stderr: String },
    #[error("cannot read the public key {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write /root/.ssh/authorized_keys in the guest")]
    Agent(#[source] HostError),
}

/// The daemon's ssh key (the private key's path; `.pub` beside it).
#[derive(Debug)]
pub struct SshKey {
    path: PathBuf,
    public: Mutex<Option<String>>,
}

impl SshKey {
    pub fn new(path: PathBuf) -> SshKey {
        SshKey {
            path,
            public: Mutex::new(None),
        }
    }

    /// The private key's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The public key line, generating the pair on first use (blocking: call it from
    /// `spawn_blocking`).
    pub fn public_key(&self) -> Result<String, SshKeyError> {
        let mut cached = self.public.lock().expect("ssh key lock");
        if let Some(k) = cached.as_ref() {
            return Ok(k.clone());
        }
        let pub_path = PathBuf::from(format!("{}.pub", self.path.display()));
        if !self.path.exists() {
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir).map_err(|source| SshKeyError::Dir {
                    path: dir.to_owned(),
                    source,
                })?;
            }
            let out = std::process::Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", "banger", "-f"])
                .arg(&self.path)
                .stdin(std::process::Stdio::null())
                .output()
                .map_err(SshKeyError::Spawn)?;
            if !out.status.success() {
                return Err(SshKeyError::Keygen {
                    path: self.path.clone(),
                    stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                });
            }
        }
        let text = std::fs::read_to_string(&pub_path).map_err(|source| SshKeyError::Read {
            path: pub_path,
            source,
        })?;
        let line = text.trim().to_owned();
        *cached = Some(line.clone());
        Ok(line)
    }
}

/// A new ed25519 ssh host key pair for a restored guest that takes its own identity (the
/// host's `ssh-keygen`: one in an emulated guest takes hundreds of milliseconds), commented
/// `root@<name>`. None when it cannot be made: the guest's agent then makes its own.
pub async fn host_key_pair(name: &str) -> Option<banger_guest::proto::HostKey> {
    let dir = tempfile::tempdir().ok()?;
    let key = dir.path().join("key");
    let out = tokio::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C"])
        .arg(format!("root@{name}"))
        .arg("-f")
        .arg(&key)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .inspect_err(|e| tracing::warn!(error = %e, "ssh-keygen for a guest's host key"))
        .ok()?;
    if !out.status.success() {
        tracing::warn!(stderr = %String::from_utf8_lossy(&out.stderr).trim(), "ssh-keygen for a guest's host key failed");
        return None;
    }
    Some(banger_guest::proto::HostKey {
        private: std::fs::read_to_string(&key).ok()?,
        public: std::fs::read_to_string(key.with_extension("pub")).ok()?,
    })
}

/// `authorized_keys` with `key` added when it is not there yet.
pub fn with_key(existing: &str, key: &str) -> Option<String> {
    let blob = |l: &str| l.split_whitespace().nth(1).map(str::to_owned);
    let ours = blob(key);
    if existing
        .lines()
        .any(|l| blob(l).is_some() && blob(l) == ours)
    {
        return None;
    }
    let mut out = existing.to_owned();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(key);
    out.push('\n');
    Some(out)
}

/// Make sure the guest's `/root/.ssh/authorized_keys` holds `key` (0700 dir, 0600 file).
pub async fn install(sock: &Path, key: &str) -> Result<(), SshKeyError> {
    let mut existing = Vec::new();
    match host::get_file(sock, "/root/.ssh/authorized_keys", &mut existing).await {
        Ok(_) => {}
        Err(HostError::Proto(ProtoError::Remote(_))) => existing.clear(),
        Err(e) => return Err(SshKeyError::Agent(e)),
    }
    let Some(text) = with_key(&String::from_utf8_lossy(&existing), key) else {
        return Ok(());
    };
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o700);
    h.set_size(0);
    b.append_data(&mut h, ".ssh", std::io::empty())
        .expect("in memory");
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o600);
    h.set_size(text.len() as u64);
    b.append_data(&mut h, ".ssh/authorized_keys", text.as_bytes())
        .expect("in memory");
    let tarball = b.into_inner().expect("in memory");
    tokio::time::timeout(
        Duration::from_secs(30),
        host::upload(
            sock,
            &Request::TarIn {
                dir: "/root".into(),
            },
            tarball.as_slice(),
        ),
    )
    .await
    .map_err(|_| SshKeyError::Agent(HostError::Timeout))?
    .map_err(SshKeyError::Agent)?;
    Ok(())
}

/// A `[[file_sync]]` entry, validated by the config: `guest` is relative to /root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSync {
    pub host: PathBuf,
    pub guest: String,
    pub mode: Option<u32>,
}

/// The tar of the entries that exist on the host (directories recursively), and what was
/// skipped and why.
pub fn file_sync_tar(entries: &[FileSync]) -> (Vec<u8>, Vec<(String, String)>) {
    let mut skipped = Vec::new();
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(true);
    for f in entries {
        let what = f.host.display().to_string();
        let meta = match std::fs::metadata(&f.host) {
            Ok(m) => m,
            Err(e) => {
                skipped.push((what, format!("skipped: {e}")));
                continue;
            }
        };
        let r = if meta.is_dir() {
            b.append_dir_all(&f.guest, &f.host)
        } else {
            match std::fs::read(&f.host) {
                Ok(bytes) => {
                    use std::os::unix::fs::PermissionsExt;
                    let mut h = tar::Header::new_gnu();
                    h.set_metadata(&meta);
                    h.set_mode(f.mode.unwrap_or(meta.permissions().mode() & 0o7777));
                    h.set_uid(0);
                    h.set_gid(0);
                    h.set_size(bytes.len() as u64);
                    b.append_data(&mut h, &f.guest, bytes.as_slice())
                }
                Err(e) => Err(e),
            }
        };
        if let Err(e) = r {
            skipped.push((what, format!("skipped: {e}")));
        }
    }
    (b.into_inner().unwrap_or_default(), skipped)
}

/// Copy `entries` into the guest's /root; returns the problems (none is fatal).
pub async fn sync_files(sock: &Path, entries: Vec<FileSync>) -> Vec<(String, String)> {
    let (tarball, mut problems) =
        match tokio::task::spawn_blocking(move || file_sync_tar(&entries)).await {
            Ok(r) => r,
            Err(e) => return vec![("file_sync".into(), e.to_string())],
        };
    let sent = tokio::time::timeout(
        Duration::from_secs(120),
        host::upload(
            sock,
            &Request::TarIn {
                dir: "/root".into(),
            },
            tarball.as_slice(),
        ),
    )
    .await;
    match sent {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => problems.push(("file_sync".into(), e.to_string())),
        Err(_) => problems.push(("file_sync".into(), "timed out".into())),
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_added_once_and_other_keys_stay() {
        let k = "ssh-ed25519 AAAAkey banger";
        assert_eq!(with_key("", k).unwrap(), format!("{k}\n"));
        let other = "ssh-rsa AAAAother me@laptop";
        assert_eq!(with_key(other, k).unwrap(), format!("{other}\n{k}\n"));
        assert!(with_key(&format!("{other}\nssh-ed25519 AAAAkey renamed\n"), k).is_none());
    }

    #[test]
    fn file_sync_tars_files_with_their_mode_and_dirs_and_skips_missing_ones() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("gitconfig"), "[user]\n").unwrap();
        std::fs::create_dir(dir.path().join("conf")).unwrap();
        std::fs::write(dir.path().join("conf/a"), "a").unwrap();
        let entries = vec![
            FileSync {
                host: dir.path().join("gitconfig"),
                guest: ".gitconfig".into(),
                mode: Some(0o600),
            },
            FileSync {
                host: dir.path().join("conf"),
                guest: ".config/app".into(),
                mode: None,
            },
            FileSync {
                host: dir.path().join("missing"),
                guest: "x".into(),
                mode: None,
            },
        ];
        let (tarball, skipped) = file_sync_tar(&entries);
        assert_eq!(skipped.len(), 1);
        assert!(skipped[0].0.ends_with("missing"));
        let mut a = tar::Archive::new(tarball.as_slice());
        let got: Vec<(String, u32)> = a
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.path().unwrap().display().to_string(),
                    e.header().mode().unwrap(),
                )
            })
            .collect();
        assert!(got.contains(&(".gitconfig".into(), 0o600)), "{got:?}");
        assert!(got.iter().any(|(p, _)| p == ".config/app/a"), "{got:?}");
    }

    #[test]
    fn a_key_is_made_on_first_use_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let key = SshKey::new(dir.path().join("ssh/id_ed25519"));
        let first = key.public_key().unwrap();
        assert!(first.starts_with("ssh-ed25519 "), "{first}");
        let again = SshKey::new(dir.path().join("ssh/id_ed25519"));
        assert_eq!(again.public_key().unwrap(), first);
    }
}
