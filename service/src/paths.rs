//! Where bangerd keeps its files.
//!
//! | what        | user daemon (XDG)                         | system service       |
//! |-------------|-------------------------------------------|----------------------|
//! | config      | `$XDG_CONFIG_HOME/banger/config.toml`     | `/etc/banger/config.toml` |
//! | data, store | `$XDG_DATA_HOME/banger` (`banger.redb`)   | `/var/lib/banger`    |
//! | logs        | `$XDG_STATE_HOME/banger/bangerd.log`      | `/var/log/banger/bangerd.log` |
//! | cache       | `$XDG_CACHE_HOME/banger`                  | `/var/cache/banger`  |
//! | socket      | `$XDG_RUNTIME_DIR/banger/bangerd.sock`    | `/run/banger/bangerd.sock` |
//!
//! The XDG defaults apply when the variables are unset (`~/.config`, `~/.local/share`,
//! `~/.local/state`, `~/.cache`); without `XDG_RUNTIME_DIR` the socket lives in
//! `/tmp/banger-<uid>/` (created 0700 and checked to be ours). The config file may move
//! the data, log and cache directories; the socket location is part of the contract with
//! the CLI (see `banger_api::socket`), so only `--socket` moves it.

use std::path::{Path, PathBuf};

use banger_api::DaemonMode;

use crate::config::Config;

/// Resolved paths of one daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    pub mode: DaemonMode,
    pub data_dir: PathBuf,
    pub log_dir: PathBuf,
    pub cache_dir: PathBuf,
    pub socket: PathBuf,
}

/// Errors resolving paths.
#[derive(Debug, thiserror::Error)]
pub enum PathsError {
    #[error("cannot find the home directory: set HOME or the XDG_* variables")]
    NoHome,
    #[error("cannot create {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The default config file for a mode.
pub fn config_file(mode: DaemonMode, env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    match mode {
        DaemonMode::System => Some(PathBuf::from("/etc/banger/config.toml")),
        DaemonMode::User => xdg(env, "XDG_CONFIG_HOME", ".config")
            .ok()
            .map(|d| d.join("banger/config.toml")),
    }
}

fn xdg(
    env: &dyn Fn(&str) -> Option<String>,
    var: &str,
    fallback: &str,
) -> Result<PathBuf, PathsError> {
    if let Some(v) = env(var).filter(|v| Path::new(v).is_absolute()) {
        return Ok(PathBuf::from(v));
    }
    let home = env("HOME")
        .filter(|h| !h.is_empty())
        .ok_or(PathsError::NoHome)?;
    Ok(Path::new(&home).join(fallback))
}

impl Paths {
    /// Resolve the paths for `mode` from the environment and the config.
    pub fn resolve(
        mode: DaemonMode,
        config: &Config,
        socket_override: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Paths, PathsError> {
        let (data, log, cache) = match mode {
            DaemonMode::System => (
                PathBuf::from("/var/lib/banger"),
                PathBuf::from("/var/log/banger"),
                PathBuf::from("/var/cache/banger"),
            ),
            DaemonMode::User => (
                xdg(env, "XDG_DATA_HOME", ".local/share")?.join("banger"),
                xdg(env, "XDG_STATE_HOME", ".local/state")?.join("banger"),
                xdg(env, "XDG_CACHE_HOME", ".cache")?.join("banger"),
            ),
        };
        let socket = match socket_override {
            Some(s) => s.to_owned(),
            None => match mode {
                DaemonMode::System => PathBuf::from(banger_api::socket::SYSTEM_SOCKET),
                DaemonMode::User => {
                    banger_api::socket::user_socket(env, nix::unistd::getuid().as_raw())
                }
            },
        };
        Ok(Paths {
            mode,
            data_dir: config.data_dir.clone().unwrap_or(data),
            log_dir: config.log_dir.clone().unwrap_or(log),
            cache_dir: config.cache_dir.clone().unwrap_or(cache),
            socket,
        })
    }

    pub fn store_file(&self) -> PathBuf {
        self.data_dir.join("banger.redb")
    }

    pub fn lock_file(&self) -> PathBuf {
        self.data_dir.join("bangerd.lock")
    }

    pub fn log_file(&self) -> PathBuf {
        self.log_dir.join("bangerd.log")
    }

    /// Create the directories (the socket's parent 0700 for a user daemon, 0755 for the
    /// system service, whose socket is itself 0660).
    pub fn create_dirs(&self) -> Result<(), PathsError> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        for dir in [&self.data_dir, &self.log_dir, &self.cache_dir] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(dir)
                .map_err(|source| PathsError::Create {
                    path: dir.clone(),
                    source,
                })?;
        }
        if let Some(parent) = self.socket.parent() {
            let existed = parent.exists();
            let mode = match self.mode {
                DaemonMode::User => 0o700,
                DaemonMode::System => 0o755,
            };
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(mode)
                .create(parent)
                .map_err(|source| PathsError::Create {
                    path: parent.to_owned(),
                    source,
                })?;
            if !existed {
                std::fs::set_permissions(parent, std::fs::Permissions::from_mode(mode)).map_err(
                    |source| PathsError::Create {
                        path: parent.to_owned(),
                        source,
                    },
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn user_paths_follow_xdg() {
        let e = env(&[
            ("HOME", "/home/u"),
            ("XDG_DATA_HOME", "/d"),
            ("XDG_RUNTIME_DIR", "/run/user/1000"),
        ]);
        let p = Paths::resolve(DaemonMode::User, &Config::default(), None, &e).unwrap();
        assert_eq!(p.data_dir, PathBuf::from("/d/banger"));
        assert_eq!(p.log_dir, PathBuf::from("/home/u/.local/state/banger"));
        assert_eq!(p.cache_dir, PathBuf::from("/home/u/.cache/banger"));
        assert_eq!(
            p.socket,
            PathBuf::from("/run/user/1000/banger/bangerd.sock")
        );
        assert_eq!(p.store_file(), PathBuf::from("/d/banger/banger.redb"));
    }

    #[test]
    fn relative_xdg_values_are_ignored_as_the_spec_says() {
        let e = env(&[("HOME", "/home/u"), ("XDG_DATA_HOME", "rel")]);
        let p = Paths::resolve(DaemonMode::User, &Config::default(), None, &e).unwrap();
        assert_eq!(p.data_dir, PathBuf::from("/home/u/.local/share/banger"));
    }

    #[test]
    fn system_paths_and_config_overrides() {
        let cfg = Config {
            data_dir: Some("/srv/banger".into()),
            ..Config::default()
        };
        let p = Paths::resolve(DaemonMode::System, &cfg, None, &env(&[])).unwrap();
        assert_eq!(p.data_dir, PathBuf::from("/srv/banger"));
        assert_eq!(p.log_dir, PathBuf::from("/var/log/banger"));
        assert_eq!(p.socket, PathBuf::from("/run/banger/bangerd.sock"));
    }

    #[test]
    fn no_home_is_a_clear_error() {
        let err =
            Paths::resolve(DaemonMode::User, &Config::default(), None, &env(&[])).unwrap_err();
        assert!(err.to_string().contains("HOME"), "{err}");
    }
}
