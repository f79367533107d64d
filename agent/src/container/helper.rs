//! `kata-agent __runtime <request JSON>`: the single-threaded helper performing ONE
//! libcontainer operation and printing one JSON [`Reply`] line on stdout.
//!
//! It runs before anything else in `main` (no PID-1 setup, no tokio). Container processes it
//! creates are its children (libcontainer's intermediate process clones them with
//! CLONE_PARENT); when the helper exits they are re-parented to the agent, which reaps them.

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Mutex};

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::error::LibcontainerError;
use libcontainer::syscall::syscall::SyscallType;

use super::cgroup::error_chain;
use super::exec_seccomp;
use super::runtime::{Kind, Op, Reply, Request};

/// libcontainer's log, kept for the reply; never written to fds 1 or 2 (in the container's
/// init those become the container's own stdout and stderr). The processes libcontainer forks
/// (intermediate, init) log their errors before reporting them, so the log goes to a file that
/// they share through the inherited (close-on-exec) descriptor; without one, to memory.
#[derive(Clone, Default)]
struct LogBuffer {
    mem: Arc<Mutex<Vec<u8>>>,
    file: Option<Arc<std::fs::File>>,
}

const LOG_MAX: usize = 64 * 1024;

impl LogBuffer {
    fn to_file(path: &Path) -> Self {
        let _ = std::fs::create_dir_all(path.parent().unwrap_or(Path::new("/")));
        let _ = std::fs::remove_file(path);
        let file = std::fs::OpenOptions::new().create_new(true).read(true).append(true).open(path).ok();
        let _ = std::fs::remove_file(path);
        Self { mem: Default::default(), file: file.map(Arc::new) }
    }

    fn contents(&self) -> String {
        let mut bytes = self.mem.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(f) = &self.file {
            use std::io::{Read, Seek};
            let mut f: &std::fs::File = f;
            let _ = f.seek(std::io::SeekFrom::Start(0));
            let _ = f.take(LOG_MAX as u64).read_to_end(&mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(f) = &self.file {
            let mut f: &std::fs::File = f;
            return f.write(buf);
        }
        let mut b = self.mem.lock().unwrap_or_else(|e| e.into_inner());
        let room = LOG_MAX.saturating_sub(b.len());
        b.extend_from_slice(&buf[..buf.len().min(room)]);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The helper's entry point; never returns.
pub fn main(args: &[String]) -> ! {
    // Rust ignores SIGPIPE; an ignored signal survives exec, so restore the default for the
    // container processes created from here.
    // SAFETY: plain signal disposition change in a single-threaded process.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let request = args.get(2).map(|a| serde_json::from_str::<Request>(a));
    let log = match &request {
        // An unlinked file in the (tmpfs) state directory.
        Some(Ok(req)) => LogBuffer::to_file(&req.root.join(format!(".helper-{}.log", std::process::id()))),
        _ => LogBuffer::default(),
    };
    let level = match &request {
        Some(Ok(req)) if req.debug => tracing_subscriber::filter::LevelFilter::DEBUG,
        _ => tracing_subscriber::filter::LevelFilter::WARN,
    };
    let writer = log.clone();
    let _ = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .without_time()
        .with_max_level(level)
        .try_init();

    let mut reply = match request {
        Some(Ok(req)) => match run(&req) {
            Ok(pid) => Reply { ok: true, pid, ..Default::default() },
            Err((kind, error)) => Reply { ok: false, kind, error, ..Default::default() },
        },
        Some(Err(e)) => Reply { ok: false, error: format!("bad helper request: {e}"), ..Default::default() },
        None => Reply { ok: false, error: "usage: kata-agent __runtime <request JSON>".into(), ..Default::default() },
    };
    reply.log = log.contents();
    let line = serde_json::to_string(&reply).unwrap_or_else(|_| r#"{"ok":false,"error":"encode reply"}"#.into());
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
    std::process::exit(if reply.ok { 0 } else { 1 })
}

fn classify(e: &LibcontainerError) -> Kind {
    match e {
        LibcontainerError::IncorrectStatus(_) => Kind::FailedPrecondition,
        LibcontainerError::Exist => Kind::AlreadyExists,
        LibcontainerError::NoDirectory => Kind::NotFound,
        LibcontainerError::InvalidID(_)
        | LibcontainerError::MissingSpec(_)
        | LibcontainerError::InvalidSpec(_)
        | LibcontainerError::Spec(_)
        | LibcontainerError::InvalidInput(_) => Kind::InvalidArgument,
        _ => Kind::Internal,
    }
}

type OpResult = Result<Option<i32>, (Kind, String)>;

fn lc(e: LibcontainerError) -> (Kind, String) {
    (classify(&e), error_chain(&e))
}

/// Container stdio: the fds 3, 4, 5 the agent set up before exec.
fn with_stdio(b: ContainerBuilder, stdio: bool) -> ContainerBuilder {
    if !stdio {
        return b;
    }
    // SAFETY: the agent dup2'ed the stdio fds onto 3, 4 and 5 right before exec; nothing else
    // in this process owns them.
    unsafe {
        b.with_stdin(OwnedFd::from_raw_fd(3)).with_stdout(OwnedFd::from_raw_fd(4)).with_stderr(OwnedFd::from_raw_fd(5))
    }
}

fn load(root: &Path, id: &str) -> Result<Container, (Kind, String)> {
    let dir = root.join(id);
    if !dir.exists() {
        return Err((Kind::NotFound, format!("container {id} has no runtime state in {}", root.display())));
    }
    Container::load(dir).map_err(lc)
}

fn run(req: &Request) -> OpResult {
    let id = req.id.clone();
    let builder = || -> Result<ContainerBuilder, (Kind, String)> {
        ContainerBuilder::new(id.clone(), SyscallType::default()).with_root_path(&req.root).map_err(lc)
    };
    match &req.op {
        Op::Create { bundle, console_socket } => {
            let b = with_stdio(builder()?.with_console_socket(console_socket.as_ref()), req.stdio);
            let no_pivot = root_is_initramfs(&std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default());
            let c =
                b.as_init(bundle).with_systemd(false).with_detach(true).with_no_pivot(no_pivot).build().map_err(lc)?;
            Ok(c.pid().map(|p| p.as_raw()))
        }
        Op::Start => load(&req.root, &id)?.start().map(|_| None).map_err(lc),
        Op::Exec { bundle, process, console_socket } => {
            let mut b = with_stdio(builder()?.with_console_socket(console_socket.as_ref()), req.stdio);
            // The container's seccomp filter applies to the exec'd process too (see exec_seccomp).
            let filter = exec_seccomp::container_filter(bundle).map_err(|e| (Kind::Internal, e))?;
            let mut process = process.clone();
            if let Some(filter) = filter {
                let (path, executor) = exec_seccomp::prepare(&process, filter).map_err(|e| (Kind::Internal, e))?;
                process = path;
                b = b.with_executor(executor);
            }
            let pid = b.as_tenant().with_detach(true).with_process(Some(&process)).build().map_err(lc)?;
            Ok(Some(pid.as_raw()))
        }
        Op::Pause => load(&req.root, &id)?.pause().map(|_| None).map_err(lc),
        Op::Resume => load(&req.root, &id)?.resume().map(|_| None).map_err(lc),
        Op::Delete => match load(&req.root, &id) {
            Ok(mut c) => c.delete(true).map(|_| None).map_err(lc),
            Err((Kind::NotFound, _)) => Ok(None),
            Err(e) => Err(e),
        },
    }
}

/// pivot_root(2) cannot move away from the initramfs ("rootfs"), the guest's root: there the
/// container's root is switched with MS_MOVE + chroot instead (runc's --no-pivot). The
/// initramfs stays mounted under the container's root; a container needs CAP_SYS_ADMIN to
/// unmount its root and see it.
fn root_is_initramfs(mountinfo: &str) -> bool {
    mountinfo.lines().any(|l| {
        let mut halves = l.splitn(2, " - ");
        let (left, right) = (halves.next().unwrap_or(""), halves.next().unwrap_or(""));
        left.split_whitespace().nth(4) == Some("/") && right.split_whitespace().next() == Some("rootfs")
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn initramfs_root_is_detected() {
        let guest = "1 1 0:2 / / rw shared:1 - rootfs rootfs rw,size=230000k\n22 1 0:20 / /proc rw - proc proc rw\n";
        let host = "23 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n";
        assert!(super::root_is_initramfs(guest));
        assert!(!super::root_is_initramfs(host));
    }

    use super::*;

    #[test]
    fn libcontainer_errors_map_to_kinds() {
        use libcontainer::container::ContainerStatus;
        assert_eq!(classify(&LibcontainerError::IncorrectStatus(ContainerStatus::Paused)), Kind::FailedPrecondition);
        assert_eq!(classify(&LibcontainerError::Exist), Kind::AlreadyExists);
        assert_eq!(classify(&LibcontainerError::NoDirectory), Kind::NotFound);
        assert_eq!(classify(&LibcontainerError::Other("x".into())), Kind::Internal);
    }

    #[test]
    fn file_log_is_shared_with_forked_children() {
        let path = std::env::temp_dir().join(format!("podvisor-helper-log-{}", std::process::id()));
        let mut b = LogBuffer::to_file(&path);
        assert!(b.file.is_some(), "log file not opened");
        assert!(!path.exists(), "the log file is unlinked at once");
        b.write_all(b"parent\n").unwrap();
        // SAFETY: the child only writes to an inherited fd and exits.
        match unsafe { libc::fork() } {
            0 => {
                let _ = b.write_all(b"child\n");
                unsafe { libc::_exit(0) };
            }
            pid => {
                nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None).unwrap();
            }
        }
        assert_eq!(b.contents(), "parent\nchild\n");
    }

    #[test]
    fn log_buffer_is_capped() {
        let mut b = LogBuffer::default();
        for _ in 0..100 {
            b.write_all(&[b'x'; 1024]).unwrap();
        }
        assert_eq!(b.mem.lock().unwrap().len(), LOG_MAX);
    }
}
