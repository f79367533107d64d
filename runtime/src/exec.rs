//! `kata-runtime exec <id>`: a shell in the guest through the agent's debug console. The shim's
//! monitor socket names the agent's hybrid-vsock socket (`GET /agent-url`); we connect to it,
//! ask for the console port (`CONNECT 1026\n`, answered `OK <port>\n`), then copy bytes both
//! ways: raw terminal mode when stdin is a terminal (restored on exit), a plain pipe otherwise.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// Kata's debug console port (`agent.debug_console_vport`).
pub const DEFAULT_DEBUG_PORT: u32 = 1026;
/// How long the handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How to enable the console, for every refusal.
pub const ENABLE_HINT: &str = "the debug console is not enabled for this sandbox: set \
    `debug_console_enabled = true` in [agent.kata] of configuration.toml, then start a new pod \
    (the setting is read when the pod's VM boots)";

/// The agent's address from `/agent-url`.
#[derive(Debug, PartialEq, Eq)]
pub enum AgentUrl {
    /// `hvsock://<unix socket path>:<port>`.
    Hybrid(PathBuf),
    /// `vsock://<cid>:<port>`.
    Vsock(u32),
}

/// Parses the shim's `/agent-url` answer.
pub fn parse_agent_url(text: &str) -> Result<AgentUrl, String> {
    let text = text.trim();
    if let Some(rest) = text.strip_prefix("hvsock://") {
        let (path, port) = rest.rsplit_once(':').ok_or_else(|| format!("agent url {text:?} has no port"))?;
        port.parse::<u32>().map_err(|_| format!("agent url {text:?}: bad port"))?;
        if !path.starts_with('/') {
            return Err(format!("agent url {text:?}: the socket path is not absolute"));
        }
        return Ok(AgentUrl::Hybrid(PathBuf::from(path)));
    }
    if let Some(rest) = text.strip_prefix("vsock://") {
        let (cid, _) = rest.split_once(':').ok_or_else(|| format!("agent url {text:?} has no port"))?;
        return cid.parse().map(AgentUrl::Vsock).map_err(|_| format!("agent url {text:?}: bad CID"));
    }
    if text.starts_with("remote://") {
        return Err(format!(
            "agent url {text:?}: this pod is a peer pod (remote hypervisor); its podvm has no debug console \
             reachable from the node"
        ));
    }
    Err(format!("agent url {text:?} is neither hvsock:// nor vsock://"))
}

/// A connected console stream.
pub enum Console {
    /// Over the hybrid-vsock unix socket.
    Unix(UnixStream),
    /// Over AF_VSOCK.
    Vsock(std::fs::File),
}

impl Console {
    fn try_clone(&self) -> std::io::Result<Console> {
        Ok(match self {
            Console::Unix(s) => Console::Unix(s.try_clone()?),
            Console::Vsock(f) => Console::Vsock(f.try_clone()?),
        })
    }
}

impl Read for Console {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Console::Unix(s) => s.read(buf),
            Console::Vsock(f) => f.read(buf),
        }
    }
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Console::Unix(s) => s.write(buf),
            Console::Vsock(f) => f.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Connects to the console of the agent at `url` on `port`, through the hybrid-vsock handshake
/// or AF_VSOCK. A refusal says how to enable the console.
pub fn connect(url: &AgentUrl, port: u32) -> Result<Console, String> {
    match url {
        AgentUrl::Hybrid(path) => connect_hybrid(path, port),
        AgentUrl::Vsock(cid) => {
            use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, VsockAddr};
            let fd = socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
                .map_err(|e| format!("vsock socket: {e}"))?;
            connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &VsockAddr::new(*cid, port)).map_err(|e| match e {
                nix::errno::Errno::ECONNREFUSED | nix::errno::Errno::ECONNRESET => {
                    format!("vsock {cid}:{port} refused the connection; {ENABLE_HINT}")
                }
                e => format!("connect to vsock {cid}:{port}: {e}"),
            })?;
            Ok(Console::Vsock(std::fs::File::from(fd)))
        }
    }
}

fn connect_hybrid(path: &Path, port: u32) -> Result<Console, String> {
    let mut s =
        UnixStream::connect(path).map_err(|e| format!("connect to the agent socket {}: {e}", path.display()))?;
    s.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(|e| e.to_string())?;
    s.write_all(format!("CONNECT {port}\n").as_bytes()).map_err(|e| format!("write to {}: {e}", path.display()))?;
    // Read the answer byte by byte so nothing of the console's output is consumed with it.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match s.read(&mut byte) {
            Ok(0) => break,
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if line.len() < 64 => line.push(byte[0]),
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                return Err(format!(
                    "the guest did not answer CONNECT {port} within {HANDSHAKE_TIMEOUT:?}; {ENABLE_HINT}"
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => return Err(format!("read from {}: {e}", path.display())),
        }
    }
    let answer = String::from_utf8_lossy(&line).to_string();
    if !answer.starts_with("OK ") {
        return Err(if answer.is_empty() {
            format!("the guest refused the connection to port {port}; {ENABLE_HINT}")
        } else {
            format!("the guest answered {answer:?} to CONNECT {port}; {ENABLE_HINT}")
        });
    }
    s.set_read_timeout(None).map_err(|e| e.to_string())?;
    Ok(Console::Unix(s))
}

/// Puts the terminal on fd 0 in raw mode until dropped.
struct RawMode(nix::sys::termios::Termios);

impl RawMode {
    fn enter() -> Option<RawMode> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        let saved = tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).ok()?;
        Some(RawMode(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(std::io::stdin().as_fd(), nix::sys::termios::SetArg::TCSANOW, &self.0);
    }
}

/// `kata-runtime exec <id>`.
pub fn run(id: &str, port: u32) -> Result<ExitCode, String> {
    let url = crate::sandbox::shim_get(Path::new(crate::sandbox::SBS_ROOT), id, "/agent-url")?;
    let url = parse_agent_url(&String::from_utf8_lossy(&url))?;
    let console = connect(&url, port)?;
    let tty = nix::unistd::isatty(0).unwrap_or(false);
    let raw = if tty { RawMode::enter() } else { None };
    if tty {
        eprint!("connected to the debug console of sandbox {id} (exit the shell to leave)\r\n");
    }
    let result = bridge(console);
    drop(raw);
    result.map(|()| ExitCode::SUCCESS)
}

/// Copies stdin to the console (then `exit`) and the console to stdout until the
/// guest closes it.
fn bridge(console: Console) -> Result<(), String> {
    let mut to_guest = console.try_clone().map_err(|e| format!("clone the console socket: {e}"))?;
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 4096];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to_guest.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
        // At the end of the input the shell is told to exit once it has run what it was given;
        // the agent then closes the connection. Neither a half-close (hybrid vsock passes it on
        // as a close, ending the session before the output came back) nor ^D (typed ahead on a
        // canonical-mode pty it reaches busybox's line editor as a NUL) would do.
        let _ = to_guest.write_all(b"\nexit\n");
    });
    let mut from_guest = console;
    let mut stdout = std::io::stdout().lock();
    let mut buf = [0u8; 4096];
    loop {
        match from_guest.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                stdout.write_all(&buf[..n]).map_err(|e| format!("write to stdout: {e}"))?;
                stdout.flush().map_err(|e| format!("write to stdout: {e}"))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(()),
            Err(e) => return Err(format!("read from the console: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn agent_urls() {
        assert_eq!(
            parse_agent_url("hvsock:///run/kata-containers/vm/x/hvsock:1024").unwrap(),
            AgentUrl::Hybrid("/run/kata-containers/vm/x/hvsock".into())
        );
        assert_eq!(parse_agent_url("vsock://3:1024\n").unwrap(), AgentUrl::Vsock(3));
        assert!(parse_agent_url("hvsock://relative:1024").unwrap_err().contains("not absolute"));
        assert!(parse_agent_url("http://x").is_err());
        assert!(parse_agent_url("hvsock:///a/b:x").unwrap_err().contains("bad port"));
        assert!(parse_agent_url("hvsock:///a/b").unwrap_err().contains("no port"));
    }

    fn fake_daemon(answer: &'static [u8]) -> (PathBuf, std::thread::JoinHandle<String>) {
        let dir = std::env::temp_dir().join(format!("kata-runtime-exec-{}-{}", std::process::id(), answer.len()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("hvsock");
        let _ = std::fs::remove_file(&sock);
        let l = UnixListener::bind(&sock).unwrap();
        let t = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while c.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
                line.push(b[0]);
            }
            c.write_all(answer).unwrap();
            String::from_utf8(line).unwrap()
        });
        (sock, t)
    }

    #[test]
    fn handshake_ok_keeps_the_following_bytes() {
        let (sock, t) = fake_daemon(b"OK 1026\n$ ");
        let mut c = connect(&AgentUrl::Hybrid(sock.clone()), 1026).map_err(|e| e.to_string()).unwrap();
        assert_eq!(t.join().unwrap(), "CONNECT 1026");
        let mut rest = String::new();
        c.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "$ ");
        std::fs::remove_dir_all(sock.parent().unwrap()).unwrap();
    }

    #[test]
    fn refusal_says_how_to_enable() {
        let (sock, t) = fake_daemon(b"");
        let e = connect(&AgentUrl::Hybrid(sock.clone()), 1026).err().unwrap();
        t.join().unwrap();
        assert!(e.contains("debug_console_enabled = true") && e.contains("[agent.kata]"), "{e}");
        std::fs::remove_dir_all(sock.parent().unwrap()).unwrap();
    }
}
