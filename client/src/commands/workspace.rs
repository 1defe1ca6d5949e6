//! `banger vm workspace prepare|export`, also used by `banger vm run <path>`.
//!
//! Decisions (the issue is silent on them):
//! - **What is shipped.** A tar stream built on the host and unpacked by the agent's
//!   `TarIn` into `/root/repo`: the files `git ls-files -co --exclude-standard` lists
//!   (tracked + untracked-not-ignored; `--full-copy`: the whole directory, ignored files
//!   and submodules included; `--from REF`: the tree of REF, from `git archive`), plus the
//!   repo's `.git` directory as it is, so the guest has a real repo. A directory that is
//!   not a git repo is shipped whole. A linked worktree (whose `.git` is a file) is refused
//!   unless `--full-copy`.
//! - **The shipped ref.** With `--from REF` it is REF. Otherwise it is HEAD when the
//!   working tree is clean; when it is not, the shipped state is snapshotted as a commit
//!   (parent HEAD, written with a temporary index into the host repo's object store, no
//!   ref moved) so that export shows only what changed *in the guest*. Its id is written
//!   to `/root/repo/.git/banger-base`. `--branch NAME` makes the guest's HEAD a new branch
//!   at that ref; `--from` without `--branch` leaves it detached there.
//! - **Export without git in the guest.** Guest images need not have git (the test rig has
//!   none), so export brings `/root/repo` back with the agent's `TarOut` into a temporary
//!   directory and diffs it on the host: `git read-tree <base>` + `git add -A` into a
//!   temporary index (`GIT_INDEX_FILE`), then `git diff --cached --binary <base>`. The
//!   guest's own index is never read or written. Ignored files are left out, as `git add`
//!   leaves them out.
//! - **Locks.** This runs in the CLI straight over the VM's vsock socket, never through the
//!   VM's actor, so a long import never holds its lifecycle mailbox. Instead, `prepare` and
//!   `export` hold a per-VM workspace lock: an exclusive `flock` on the VM's directory
//!   (`banger vm show` names it), so two imports into one VM (or an export during an
//!   import) take turns, across processes, and a crashed CLI releases it with its fd.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use banger_api::{VmInfo, VmState};
use banger_guest::host;
use banger_guest::proto::{Request, Response};
use jsonrpsee::async_client::Client;

use crate::exit::CliError;

/// Where a workspace lands in the guest.
pub const GUEST_REPO: &str = "/root/repo";
/// The shipped ref, inside the guest's `.git`.
const BASE_FILE: &str = ".git/banger-base";

/// What to ship.
#[derive(Debug, Clone, Default)]
pub struct Opts {
    pub branch: Option<String>,
    pub from: Option<String>,
    pub full_copy: bool,
}

/// What `prepare` shipped.
#[derive(Debug)]
pub struct Shipped {
    pub bytes: u64,
    pub base: Option<String>,
}

fn io_err(what: impl std::fmt::Display, e: impl std::fmt::Display) -> CliError {
    CliError::Other(format!("{what}: {e}"))
}

/// Run git in `dir`; stdout on success, else an error with git's message.
fn git(dir: &Path, args: &[&str], env: &[(&str, &Path)]) -> Result<Vec<u8>, CliError> {
    let mut cmd = Command::new("git");
    cmd.arg("-C").arg(dir).args(args).stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().map_err(|e| {
        io_err(
            "cannot run git (install git to ship or export workspaces)",
            e,
        )
    })?;
    if !out.status.success() {
        return Err(CliError::Other(format!(
            "git {} in {}: {}",
            args.join(" "),
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out.stdout)
}

fn git_line(dir: &Path, args: &[&str], env: &[(&str, &Path)]) -> Result<String, CliError> {
    Ok(String::from_utf8_lossy(&git(dir, args, env)?)
        .trim()
        .to_owned())
}

/// The files of the tree, decided before the stream starts (errors surface early).
enum Source {
    Files(Vec<PathBuf>),
    Archive(Vec<u8>),
    Whole,
}

struct Plan {
    root: PathBuf,
    source: Source,
    /// `.git` is a directory to ship.
    git_dir: bool,
    base: Option<String>,
    head: Option<String>,
    branch: Option<String>,
}

fn plan(path: &Path, opts: &Opts) -> Result<Plan, CliError> {
    let root = path
        .canonicalize()
        .map_err(|e| io_err(format!("{}", path.display()), e))?;
    if !root.is_dir() {
        return Err(CliError::Usage(format!(
            "{} is not a directory",
            root.display()
        )));
    }
    let dot_git = root.join(".git");
    let is_git = dot_git.exists();
    let git_dir = dot_git.is_dir();
    if is_git && !git_dir && !opts.full_copy {
        return Err(CliError::Usage(format!(
            "{} is a linked git worktree (its .git is a file): ship its main checkout, or pass --full-copy",
            root.display()
        )));
    }
    if !git_dir {
        if opts.from.is_some() || opts.branch.is_some() {
            return Err(CliError::Usage(format!(
                "{} is not a git repo: --from and --branch need one",
                root.display()
            )));
        }
        return Ok(Plan {
            root,
            source: Source::Whole,
            git_dir: false,
            base: None,
            head: None,
            branch: None,
        });
    }
    if let Some(b) = &opts.branch {
        git(&root, &["check-ref-format", "--branch", b], &[])
            .map_err(|_| CliError::Usage(format!("--branch {b}: not a valid branch name")))?;
    }
    let (source, base, head) = if let Some(r) = &opts.from {
        let base = git_line(
            &root,
            &["rev-parse", "--verify", &format!("{r}^{{commit}}")],
            &[],
        )
        .map_err(|_| {
            CliError::Usage(format!("--from {r}: no such commit in {}", root.display()))
        })?;
        let tar = git(&root, &["archive", "--format=tar", &base], &[])?;
        (Source::Archive(tar), base.clone(), Some(base))
    } else {
        let list = git(&root, &["ls-files", "-z", "-co", "--exclude-standard"], &[])?;
        let files: Vec<PathBuf> = list
            .split(|b| *b == 0)
            .filter(|f| !f.is_empty())
            .map(|f| PathBuf::from(String::from_utf8_lossy(f).into_owned()))
            .collect();
        let base = snapshot(&root)?;
        let source = if opts.full_copy {
            Source::Whole
        } else {
            Source::Files(files)
        };
        // HEAD stays what it is on the host unless --branch.
        (source, base, None)
    };
    Ok(Plan {
        root,
        source,
        git_dir: true,
        base: Some(base),
        head,
        branch: opts.branch.clone(),
    })
}

/// The commit the guest's files match: HEAD when the working tree is clean, else a
/// snapshot commit (parent HEAD) written with a temporary index. No ref moves.
fn snapshot(root: &Path) -> Result<String, CliError> {
    let tmp = tempfile::tempdir().map_err(|e| io_err("a temporary directory", e))?;
    let index = tmp.path().join("index");
    let real = git_line(root, &["rev-parse", "--git-path", "index"], &[])?;
    let real = root.join(real);
    if real.exists() {
        std::fs::copy(&real, &index).map_err(|e| io_err("copying the git index", e))?;
    }
    let env = [("GIT_INDEX_FILE", index.as_path())];
    git(root, &["add", "-A", "--", "."], &env)?;
    let tree = git_line(root, &["write-tree"], &env)?;
    let head = git_line(root, &["rev-parse", "--verify", "-q", "HEAD"], &[]).ok();
    if let Some(h) = &head
        && git_line(root, &["rev-parse", &format!("{h}^{{tree}}")], &[])? == tree
    {
        return Ok(h.clone());
    }
    let mut args = vec![
        "commit-tree",
        tree.as_str(),
        "-m",
        "banger workspace snapshot",
    ];
    if let Some(h) = &head {
        args.extend(["-p", h.as_str()]);
    }
    // commit-tree needs an identity; the snapshot is banger's, not the user's.
    let mut cmd = Command::new("git");
    cmd.arg("-C")
        .arg(root)
        .args(&args)
        .env("GIT_AUTHOR_NAME", "banger")
        .env("GIT_AUTHOR_EMAIL", "banger@localhost")
        .env("GIT_COMMITTER_NAME", "banger")
        .env("GIT_COMMITTER_EMAIL", "banger@localhost")
        .stdin(Stdio::null());
    let out = cmd.output().map_err(|e| io_err("cannot run git", e))?;
    if !out.status.success() {
        return Err(CliError::Other(format!(
            "git commit-tree: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn append_tree<W: Write>(
    b: &mut tar::Builder<W>,
    root: &Path,
    skip_git: bool,
) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(root)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name();
        if skip_git && name == ".git" {
            continue;
        }
        let ft = e.file_type()?;
        if ft.is_dir() {
            b.append_dir_all(&name, e.path())?;
        } else if ft.is_file() || ft.is_symlink() {
            b.append_path_with_name(e.path(), &name)?;
        }
    }
    Ok(())
}

fn small_file<W: Write>(b: &mut tar::Builder<W>, path: &str, text: &str) -> std::io::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_size(text.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    );
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h, path, text.as_bytes())
}

fn write_tar<W: Write>(p: &Plan, w: W) -> std::io::Result<()> {
    let mut b = tar::Builder::new(w);
    b.follow_symlinks(false);
    match &p.source {
        Source::Files(files) => {
            for f in files {
                let full = p.root.join(f);
                // Tracked but deleted in the working tree: nothing to ship.
                if full.symlink_metadata().is_ok() {
                    b.append_path_with_name(&full, f)?;
                }
            }
        }
        Source::Archive(bytes) => {
            let mut a = tar::Archive::new(bytes.as_slice());
            for e in a.entries()? {
                let mut e = e?;
                let kind = e.header().entry_type();
                if matches!(
                    kind,
                    tar::EntryType::XGlobalHeader | tar::EntryType::XHeader
                ) {
                    continue;
                }
                let path = e.path()?.into_owned();
                let mut h = e.header().clone();
                if kind.is_symlink() {
                    let target = e.link_name()?.map(|t| t.into_owned()).unwrap_or_default();
                    b.append_link(&mut h, &path, target)?;
                } else {
                    b.append_data(&mut h, &path, &mut e)?;
                }
            }
        }
        Source::Whole => append_tree(&mut b, &p.root, p.git_dir)?,
    }
    if p.git_dir {
        let g = p.root.join(".git");
        let mut entries: Vec<_> = std::fs::read_dir(&g)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name();
            let rel = Path::new(".git").join(&name);
            let overridden = name == "HEAD" && (p.branch.is_some() || p.head.is_some());
            if overridden || name == "index.lock" || name == "banger-base" {
                continue;
            }
            let ft = e.file_type()?;
            if ft.is_dir() {
                b.append_dir_all(&rel, e.path())?;
            } else if ft.is_file() || ft.is_symlink() {
                b.append_path_with_name(e.path(), &rel)?;
            }
        }
        if let Some(base) = &p.base {
            small_file(&mut b, BASE_FILE, &format!("{base}\n"))?;
            if let Some(branch) = &p.branch {
                small_file(
                    &mut b,
                    &format!(".git/refs/heads/{branch}"),
                    &format!("{base}\n"),
                )?;
                small_file(&mut b, ".git/HEAD", &format!("ref: refs/heads/{branch}\n"))?;
            } else if let Some(head) = &p.head {
                small_file(&mut b, ".git/HEAD", &format!("{head}\n"))?;
            }
        }
    }
    b.into_inner()?.flush()
}

/// The per-VM workspace lock (see the module docs); waits, saying so, when it is held.
pub async fn lock(info: &VmInfo) -> Result<nix::fcntl::Flock<std::fs::File>, CliError> {
    use nix::fcntl::{Flock, FlockArg};
    let open = || {
        std::fs::File::open(&info.dir)
            .map_err(|e| io_err(format!("vm {}'s directory {}", info.name, info.dir), e))
    };
    match Flock::lock(open()?, FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(l),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            eprintln!(
                "banger: waiting for another workspace prepare/export on vm {} to finish",
                info.name
            );
            let f = open()?;
            tokio::task::spawn_blocking(move || Flock::lock(f, FlockArg::LockExclusive))
                .await
                .map_err(|e| io_err("the workspace lock", e))?
                .map_err(|(_, e)| io_err("the workspace lock", e))
        }
        Err((_, e)) => Err(io_err("the workspace lock", e)),
    }
}

/// The VM's agent socket, when it is running.
pub async fn agent_socket(client: &Client, vm: &str) -> Result<(VmInfo, PathBuf), CliError> {
    let info = super::exec::show_settled(client, vm).await?;
    if info.state != VmState::Running {
        return Err(super::exec::not_running(vm, info.state, ""));
    }
    let sock = info.vsock_socket.clone().ok_or_else(|| {
        CliError::Other(format!(
            "vm {vm} has no vsock socket; check `banger vm logs {vm}`"
        ))
    })?;
    Ok((info, PathBuf::from(sock)))
}

/// Ship `path` into the guest at [`GUEST_REPO`] over the agent socket `sock`.
pub async fn prepare(vm: &str, sock: &Path, path: &Path, opts: &Opts) -> Result<Shipped, CliError> {
    let path = path.to_owned();
    let o = opts.clone();
    let p = tokio::task::spawn_blocking(move || plan(&path, &o))
        .await
        .map_err(|e| io_err("planning the workspace", e))??;
    let base = p.base.clone();
    // The tar is built in a thread and streamed through a socket pair, never held whole.
    let (ours, theirs) =
        std::os::unix::net::UnixStream::pair().map_err(|e| io_err("a socket pair", e))?;
    let writer = std::thread::spawn(move || {
        let r = write_tar(&p, &theirs);
        let _ = theirs.shutdown(std::net::Shutdown::Write);
        r
    });
    ours.set_nonblocking(true)
        .map_err(|e| io_err("a socket pair", e))?;
    let reader = tokio::net::UnixStream::from_std(ours).map_err(|e| io_err("a socket pair", e))?;
    let sent = host::upload(
        sock,
        &Request::TarIn {
            dir: GUEST_REPO.into(),
        },
        reader,
    )
    .await;
    let built = writer
        .join()
        .map_err(|_| CliError::Other("the tar writer panicked".into()))?;
    built.map_err(|e| io_err("reading the files to ship", e))?;
    let resp = sent.map_err(|e| {
        CliError::Other(format!(
            "shipping the workspace to vm {vm}: {e}; check `banger vm logs {vm}`"
        ))
    })?;
    let bytes = match resp {
        Response::Written { bytes } => bytes,
        other => {
            return Err(CliError::Other(format!(
                "vm {vm}'s agent answered {other:?} to a tar upload"
            )));
        }
    };
    Ok(Shipped { bytes, base })
}

/// The binary diff of the guest's [`GUEST_REPO`] against its shipped ref.
pub async fn export(vm: &str, sock: &Path) -> Result<Vec<u8>, CliError> {
    let tmp = tempfile::tempdir().map_err(|e| io_err("a temporary directory", e))?;
    let tar_path = tmp.path().join("repo.tar");
    let mut f = tokio::fs::File::create(&tar_path)
        .await
        .map_err(|e| io_err(tar_path.display(), e))?;
    host::tar_out(sock, GUEST_REPO, &mut f).await.map_err(|e| {
        CliError::Other(format!(
            "reading {GUEST_REPO} from vm {vm}: {e}; was a workspace prepared (`banger vm workspace prepare {vm} <path>`)?"
        ))
    })?;
    drop(f);
    let vm = vm.to_owned();
    tokio::task::spawn_blocking(move || {
        let tree = tmp.path().join("tree");
        let file = std::fs::File::open(&tar_path).map_err(|e| io_err(tar_path.display(), e))?;
        let mut a = tar::Archive::new(file);
        a.set_preserve_permissions(true);
        a.unpack(&tree)
            .map_err(|e| io_err("unpacking the guest's tree", e))?;
        let base = std::fs::read_to_string(tree.join(BASE_FILE)).map_err(|_| {
            CliError::Other(format!(
                "vm {vm}'s {GUEST_REPO} has no {BASE_FILE}: it was not shipped by `banger vm workspace prepare`, so there is no ref to diff against"
            ))
        })?;
        let base = base.trim().to_owned();
        let index = tmp.path().join("index");
        let env = [
            ("GIT_INDEX_FILE", index.as_path()),
            ("GIT_DIR", &tree.join(".git")),
            ("GIT_WORK_TREE", tree.as_path()),
        ];
        git(&tree, &["read-tree", &base], &env)?;
        git(&tree, &["add", "-A", "--", "."], &env)?;
        git(&tree, &["diff", "--cached", "--binary", &base], &env)
    })
    .await
    .map_err(|e| io_err("computing the diff", e))?
}

/// `vm workspace prepare`.
pub async fn run_prepare(
    client: &Client,
    vm: &str,
    path: &Path,
    opts: &Opts,
) -> Result<(), CliError> {
    let (info, sock) = agent_socket(client, vm).await?;
    let _lock = lock(&info).await?;
    let shipped = prepare(vm, &sock, path, opts).await?;
    let base = shipped
        .base
        .map(|b| format!(" at {}", &b[..b.len().min(12)]))
        .unwrap_or_default();
    eprintln!(
        "shipped {} to {vm}:{GUEST_REPO}{base} ({})",
        path.display(),
        crate::commands::vm::bytes(shipped.bytes)
    );
    Ok(())
}

/// `vm workspace export`.
pub async fn run_export(client: &Client, vm: &str, out: Option<&Path>) -> Result<(), CliError> {
    let (info, sock) = agent_socket(client, vm).await?;
    let diff = {
        let _lock = lock(&info).await?;
        export(vm, &sock).await?
    };
    match out {
        Some(p) => std::fs::write(p, &diff).map_err(|e| io_err(p.display(), e))?,
        None => crate::render::stdout_bytes(&diff),
    }
    Ok(())
}
