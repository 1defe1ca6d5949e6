//! Shell completion that knows the daemon's names, the way `docker`, `gh` and `kubectl`
//! complete (cobra's hidden `__complete` command): the script `banger completion bash`
//! (or `zsh`, `fish`) prints is a few lines that call `banger __complete <words…>` with the words
//! typed so far (the last one being the word under the cursor) and offer what it prints,
//! one candidate a line. The candidates come from the clap tree itself (subcommands,
//! flags, possible values) and, where a VM, image or kernel is named, from the daemon:
//! `vm start <TAB>` offers the VMs, `--image <TAB>` the images, `kernel rm <TAB>` the
//! kernels.
//!
//! It is fast and silent when the daemon is not running: it only connects (never starts
//! one), gives up after [`DAEMON_WAIT`], and prints no error, ever (a failure is no
//! candidates, exit 0). Hidden commands (`internal`, `__ssh-proxy`, `__complete`) are
//! never offered. When nothing is printed, the bash script falls back to file names (as
//! for `vm run PATH` or `image register NAME ROOTFS`).
//!
//! zsh's script does the same through `compadd` (falling back to `_files`).
//! Snapshot names (`vm rollback`, `vm snapshot show|rm`) are every VM's: the candidates do not
//! depend on the VM named earlier on the line; `vm create --from-snapshot` gets every
//! snapshot as `<vm>/<snapshot>`.

use std::time::Duration;

use clap::CommandFactory;

use crate::cli::Cli;
use crate::connect::Target;

/// The longest a completion waits for the daemon.
pub const DAEMON_WAIT: Duration = Duration::from_millis(500);

/// What a word position takes from the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Names {
    Vms,
    Images,
    Kernels,
    /// The names of the VMs' snapshots (of every VM: the completion does not read which
    /// VM the line names).
    Snapshots,
    /// Every snapshot as `<vm>/<snapshot>` (`vm create --from-snapshot`).
    SnapshotRefs,
    /// The warm snapshots' ids and their images' names (`image warm rm`).
    Warm,
}

/// `banger __complete <words…>`: print the candidates, one a line; never fails.
pub async fn run(words: &[String]) {
    let socket = words
        .windows(2)
        .find(|w| w[0] == "--socket")
        .map(|w| std::path::PathBuf::from(&w[1]))
        .or_else(|| {
            words
                .iter()
                .find_map(|w| w.strip_prefix("--socket="))
                .map(Into::into)
        })
        .or_else(|| std::env::var_os("BANGER_SOCKET").map(Into::into));
    let target = Target::resolve(socket);
    let mut text = String::new();
    for c in candidates(&target, words).await {
        text.push_str(&c);
        text.push('\n');
    }
    crate::render::stdout_bytes(text.as_bytes());
}

/// The candidates for the last of `words` (the words after `banger`).
pub async fn candidates(target: &Target, words: &[String]) -> Vec<String> {
    let (cur, want) = analyse(words);
    let mut out = match want {
        Want::Nothing => Vec::new(),
        Want::Static(v) => v,
        Want::Names(n) => names(target, n).await,
    };
    out.retain(|c| c.starts_with(cur.as_str()));
    out.sort();
    out.dedup();
    out
}

/// The bash script: `complete -o default` falls back to file names when banger offers
/// nothing.
pub const BASH: &str = r#"# bash completion for banger (from `banger completion bash`)
_banger() {
    local IFS=$'\n'
    COMPREPLY=($(banger __complete "${COMP_WORDS[@]:1:COMP_CWORD}" 2>/dev/null))
}
complete -o default -F _banger banger
"#;

/// The zsh script: `#compdef` for a file in `$fpath`, `compdef` when sourced.
pub const ZSH: &str = r#"#compdef banger
# zsh completion for banger (from `banger completion zsh`)
_banger() {
    local -a candidates
    candidates=("${(@f)$(banger __complete "${(@)words[2,CURRENT]}" 2>/dev/null)}")
    if (( ${#candidates} )) && [[ -n ${candidates[1]} ]]; then
        compadd -a candidates
    else
        _files
    fi
}
if [[ ${zsh_eval_context[-1]} == loadautofunc ]]; then
    _banger "$@"
else
    compdef _banger banger
fi
"#;

/// The fish script.
pub const FISH: &str = r#"# fish completion for banger (from `banger completion fish`)
complete -c banger -f -a '(banger __complete (commandline -opc)[2..-1] (commandline -ct) 2>/dev/null)'
"#;

#[derive(Debug, PartialEq, Eq)]
enum Want {
    Nothing,
    Static(Vec<String>),
    Names(Names),
}

/// The word under the cursor and what it takes, from the words before it. Pure.
fn analyse(words: &[String]) -> (String, Want) {
    let mut root = Cli::command();
    // Built: arg defaults (how many values each takes) are set then.
    root.build();
    let (cur, done) = match words.split_last() {
        Some((cur, done)) => (cur.clone(), done),
        None => (String::new(), &[][..]),
    };
    let mut path: Vec<clap::Command> = vec![root];
    let mut positional = 0usize;
    let mut pending: Option<clap::Arg> = None;
    for w in done {
        let cmd = path.last().expect("root").clone();
        if pending.take().is_some() {
            continue;
        }
        if w == "--" {
            // The command for the guest follows: nothing banger can complete.
            return (cur, Want::Nothing);
        }
        if let Some(long) = w.strip_prefix("--") {
            if !long.contains('=')
                && let Some(a) = find_arg(&path, |a| a.get_long() == Some(long))
                && takes_value(&a)
            {
                pending = Some(a);
            }
            continue;
        }
        if let Some(shorts) = w.strip_prefix('-').filter(|s| !s.is_empty()) {
            let last = shorts.chars().last().expect("not empty");
            if shorts.chars().count() == 1
                && let Some(a) = find_arg(&path, |a| a.get_short() == Some(last))
                && takes_value(&a)
            {
                pending = Some(a);
            }
            continue;
        }
        match cmd.find_subcommand(w) {
            Some(sub) if cmd.has_subcommands() => {
                path.push(sub.clone());
                positional = 0;
            }
            _ => positional += 1,
        }
    }
    let cmd = path.last().expect("root");
    if let Some(a) = pending {
        return (cur, values_of(&path, &a));
    }
    if cur.starts_with('-') {
        let mut flags = Vec::new();
        for c in &path {
            for a in c.get_arguments().filter(|a| !a.is_hide_set()) {
                let own = std::ptr::eq(c, cmd);
                if !own && !a.is_global_set() {
                    continue;
                }
                flags.extend(a.get_long().map(|l| format!("--{l}")));
            }
        }
        flags.push("--help".into());
        return (cur, Want::Static(flags));
    }
    if cmd.has_subcommands() {
        let subs = cmd
            .get_subcommands()
            .filter(|s| !s.is_hide_set())
            .map(|s| s.get_name().to_owned())
            .collect();
        return (cur, Want::Static(subs));
    }
    let positionals: Vec<&clap::Arg> = cmd.get_positionals().filter(|a| !a.is_last_set()).collect();
    let arg = positionals.get(positional).or_else(|| {
        positionals
            .last()
            .filter(|a| a.get_num_args().is_some_and(|n| n.max_values() > 1))
    });
    match arg {
        Some(a) => (cur, values_of(&path, a)),
        None => (cur, Want::Nothing),
    }
}

/// The arg of the commands on `path` (the deepest first; globals from any) that `is`.
fn find_arg(path: &[clap::Command], is: impl Fn(&clap::Arg) -> bool) -> Option<clap::Arg> {
    let deepest = path.last()?;
    deepest
        .get_arguments()
        .find(|a| is(a))
        .or_else(|| {
            path.iter()
                .flat_map(|c| c.get_arguments())
                .find(|a| a.is_global_set() && is(a))
        })
        .cloned()
}

fn takes_value(a: &clap::Arg) -> bool {
    a.get_num_args().is_some_and(|n| n.takes_values()) && a.get_action().takes_values()
}

/// What the value of `a` (an option or a positional of the command at the end of `path`)
/// can be.
fn values_of(path: &[clap::Command], a: &clap::Arg) -> Want {
    let possible: Vec<String> = a
        .get_possible_values()
        .into_iter()
        .filter(|v| !v.is_hide_set())
        .map(|v| v.get_name().to_owned())
        .collect();
    if !possible.is_empty() {
        return Want::Static(possible);
    }
    let names: Vec<&str> = path.iter().map(clap::Command::get_name).collect();
    let group = names.get(1).copied().unwrap_or_default();
    let leaf = names.last().copied().unwrap_or_default();
    match a.get_id().as_str() {
        "vm" | "vms" => Want::Names(Names::Vms),
        "image" => Want::Names(Names::Images),
        "kernel" => Want::Names(Names::Kernels),
        "snapshot" | "snapshots" => Want::Names(Names::Snapshots),
        "from_snapshot" => Want::Names(Names::SnapshotRefs),
        "which" if group == "image" => Want::Names(Names::Warm),
        // VmmChoice parses from a string (no clap ValueEnum to list).
        "vmm" => Want::Static(["auto", "firecracker", "qemu"].map(String::from).to_vec()),
        // An existing image's or kernel's name (not a new one: register, pull, import).
        "name" if group == "image" && matches!(leaf, "show" | "delete") => {
            Want::Names(Names::Images)
        }
        "name" if group == "kernel" && matches!(leaf, "show" | "rm") => Want::Names(Names::Kernels),
        _ => Want::Nothing,
    }
}

/// The daemon's names of kind `n`; none when it does not answer within [`DAEMON_WAIT`].
async fn names(target: &Target, n: Names) -> Vec<String> {
    use banger_api::{ImageRpcClient, KernelRpcClient, VmRpcClient};
    tokio::time::timeout(DAEMON_WAIT, async {
        let client = crate::connect::connect(target).await.ok()?;
        Some(match n {
            Names::Vms => VmRpcClient::list(&client)
                .await
                .ok()?
                .into_iter()
                .map(|v| v.name)
                .collect(),
            Names::Images => ImageRpcClient::list(&client)
                .await
                .ok()?
                .into_iter()
                .map(|i| i.name)
                .collect(),
            Names::Kernels => KernelRpcClient::list(&client)
                .await
                .ok()?
                .into_iter()
                .map(|k| k.name)
                .collect(),
            Names::Snapshots => {
                let mut all: Vec<String> = VmRpcClient::snapshot_list(&client, None)
                    .await
                    .ok()?
                    .into_iter()
                    .map(|s| s.name)
                    .collect();
                all.sort();
                all.dedup();
                all
            }
            Names::SnapshotRefs => VmRpcClient::snapshot_list(&client, None)
                .await
                .ok()?
                .into_iter()
                .map(|s| format!("{}/{}", s.vm, s.name))
                .collect(),
            Names::Warm => {
                let mut all: Vec<String> = ImageRpcClient::warm_list(&client)
                    .await
                    .ok()?
                    .into_iter()
                    .flat_map(|w| [w.id.clone(), w.image_name().to_owned()])
                    .collect();
                all.sort();
                all.dedup();
                all
            }
        })
    })
    .await
    .ok()
    .flatten()
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn want(words: &[&str]) -> Want {
        let w: Vec<String> = words.iter().map(|s| s.to_string()).collect();
        analyse(&w).1
    }

    fn offered(words: &[&str]) -> Vec<String> {
        match want(words) {
            Want::Static(v) => v,
            other => panic!("{words:?}: {other:?}"),
        }
    }

    #[test]
    fn positions_ask_for_the_right_names() {
        assert_eq!(want(&["vm", "start", ""]), Want::Names(Names::Vms));
        assert_eq!(want(&["vm", "rm", "-f", "a", ""]), Want::Names(Names::Vms));
        assert_eq!(want(&["vm", "exec", "dev", "--", ""]), Want::Nothing);
        assert_eq!(
            want(&["vm", "create", "--image", ""]),
            Want::Names(Names::Images)
        );
        assert_eq!(
            want(&["--socket", "/s", "vm", "create", "--kernel", "k"]),
            Want::Names(Names::Kernels)
        );
        assert_eq!(want(&["image", "show", ""]), Want::Names(Names::Images));
        assert_eq!(want(&["kernel", "rm", ""]), Want::Names(Names::Kernels));
        assert_eq!(want(&["image", "register", ""]), Want::Nothing);
        assert_eq!(want(&["vm", "logs", "-f", ""]), Want::Names(Names::Vms));
        // The top-level shortcuts, several VMs, and the command after an `exec` VM.
        assert_eq!(want(&["rm", "-f", "a", ""]), Want::Names(Names::Vms));
        assert_eq!(want(&["stop", "a", ""]), Want::Names(Names::Vms));
        assert_eq!(want(&["pause", "a", ""]), Want::Names(Names::Vms));
        assert_eq!(want(&["vm", "resume", ""]), Want::Names(Names::Vms));
        assert_eq!(want(&["suspend", "a", ""]), Want::Names(Names::Vms));
        assert_eq!(want(&["vm", "suspend", ""]), Want::Names(Names::Vms));
        assert_eq!(want(&["vm", "rollback", ""]), Want::Names(Names::Vms));
        assert_eq!(
            want(&["vm", "rollback", "a", ""]),
            Want::Names(Names::Snapshots)
        );
        assert_eq!(
            want(&["vm", "snapshot", "rm", "a", "s1", ""]),
            Want::Names(Names::Snapshots)
        );
        assert_eq!(
            want(&["vm", "snapshot", "show", "a", ""]),
            Want::Names(Names::Snapshots)
        );
        assert_eq!(
            want(&["vm", "snapshot", "create", ""]),
            Want::Names(Names::Vms)
        );
        // A new snapshot's name is the user's.
        assert_eq!(want(&["vm", "snapshot", "create", "a", ""]), Want::Nothing);
        assert_eq!(want(&["vm", "fork", ""]), Want::Names(Names::Vms));
        assert_eq!(want(&["vm", "fork", "a", "--name", ""]), Want::Nothing);
        assert_eq!(
            want(&["vm", "create", "--from-snapshot", ""]),
            Want::Names(Names::SnapshotRefs)
        );
        assert_eq!(want(&["exec", ""]), Want::Names(Names::Vms));
        assert_eq!(want(&["exec", "dev", ""]), Want::Nothing);
        assert_eq!(want(&["logs", "--tail", "3", ""]), Want::Names(Names::Vms));
        assert_eq!(
            want(&["image", "pull", "x", "--kernel", ""]),
            Want::Names(Names::Kernels)
        );
        assert_eq!(want(&["kernel", "rm", ""]), Want::Names(Names::Kernels));
        // Its subcommands first (the image is typed, or completed after a letter).
        assert_eq!(
            want(&["image", "warm", ""]),
            Want::Static(vec!["list".into(), "rm".into()])
        );
        assert_eq!(want(&["image", "warm", "rm", ""]), Want::Names(Names::Warm));
        assert_eq!(
            want(&["image", "warm", "x", "--kernel", ""]),
            Want::Names(Names::Kernels)
        );
    }

    #[test]
    fn commands_flags_and_values_come_from_the_tree_and_hidden_ones_never() {
        let top = offered(&[""]);
        assert!(
            top.contains(&"vm".into()) && top.contains(&"ps".into()),
            "{top:?}"
        );
        for hidden in ["internal", "__ssh-proxy", "__complete"] {
            assert!(
                !top.contains(&hidden.to_owned()),
                "{hidden} offered: {top:?}"
            );
        }
        let flags = offered(&["vm", "create", "--"]);
        assert!(flags.contains(&"--image".into()) && flags.contains(&"--socket".into()));
        assert_eq!(
            offered(&["completion", ""]),
            ["bash", "elvish", "fish", "powershell", "zsh"]
        );
        assert!(offered(&["vm", "create", "--vmm", ""]).contains(&"qemu".into()));
    }
}
