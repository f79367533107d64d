//! Container process stdio: pipes or a PTY on the process side, buffers on the agent side.
//!
//! Output (stdout, stderr, or the PTY master) is pumped into an [`OutputBuffer`] from the
//! moment the process exists, so nothing is lost before the shim's first `ReadStdout`. A full
//! buffer stops the pump (the process then blocks writing: back-pressure, never data loss).
//! `read` blocks until at least one byte is buffered or the stream ended; at the end (writers
//! closed *and* buffer drained) it returns an empty chunk, and so does every later read.

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::Notify;

/// The most one read returns (a larger request is capped).
pub const READ_MAX: usize = 1 << 20;
/// Output kept per stream before the process is made to wait.
pub const BUFFER_CAP: usize = 4 << 20;
/// The terminal's end-of-file character (VEOF, ^D): `CloseStdin` on a PTY.
const VEOF: u8 = 0x04;

/// What a read found.
#[derive(Debug, PartialEq, Eq)]
pub enum Chunk {
    Data(Vec<u8>),
    /// Writers closed and everything was read.
    Eof,
    /// Nothing yet; wait.
    Empty,
}

/// The buffer state, without synchronisation (pure; unit-tested).
#[derive(Debug, Default)]
pub struct BufState {
    data: VecDeque<u8>,
    eof: bool,
    eof_read: bool,
}

impl BufState {
    pub fn room(&self, cap: usize) -> usize {
        cap.saturating_sub(self.data.len())
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.data.extend(bytes);
    }

    pub fn set_eof(&mut self) {
        self.eof = true;
    }

    /// Takes up to `max` bytes (`0` means [`READ_MAX`]).
    pub fn take(&mut self, max: usize) -> Chunk {
        let max = if max == 0 { READ_MAX } else { max.min(READ_MAX) };
        if !self.data.is_empty() {
            let n = max.min(self.data.len());
            let out: Vec<u8> = self.data.drain(..n).collect();
            if self.data.is_empty() {
                // Give back the memory of a burst.
                self.data = VecDeque::new();
            }
            return Chunk::Data(out);
        }
        if self.eof {
            self.eof_read = true;
            return Chunk::Eof;
        }
        Chunk::Empty
    }

    /// The end of the stream was handed to a reader.
    pub fn eof_read(&self) -> bool {
        self.eof_read
    }
}

/// One output stream of one process.
#[derive(Default)]
pub struct OutputBuffer {
    state: Mutex<BufState>,
    data_ready: Notify,
    room_ready: Notify,
}

impl OutputBuffer {
    /// A stream that has already ended (e.g. stderr of a PTY process).
    pub fn ended() -> Self {
        let b = Self::default();
        b.state.lock().unwrap().set_eof();
        b
    }

    /// Waits for data or the end; empty data means the end.
    pub async fn read(&self, max: usize) -> Vec<u8> {
        loop {
            let notified = self.data_ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.state.lock().unwrap().take(max) {
                Chunk::Data(d) => {
                    self.room_ready.notify_waiters();
                    return d;
                }
                Chunk::Eof => return Vec::new(),
                Chunk::Empty => {}
            }
            notified.await;
        }
    }

    /// Free space, waiting until there is some.
    async fn wait_room(&self) -> usize {
        loop {
            let notified = self.room_ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let room = self.state.lock().unwrap().room(BUFFER_CAP);
            if room > 0 {
                return room;
            }
            notified.await;
        }
    }

    pub fn push(&self, bytes: &[u8]) {
        self.state.lock().unwrap().push(bytes);
        self.data_ready.notify_waiters();
    }

    /// Marks the end of the stream (writers gone, or the container removed).
    pub fn close(&self) {
        self.state.lock().unwrap().set_eof();
        self.data_ready.notify_waiters();
    }

    pub fn eof_read(&self) -> bool {
        self.state.lock().unwrap().eof_read()
    }
}

/// Sets `O_NONBLOCK` on our side of a pipe or on a PTY master.
pub fn set_nonblocking(fd: &impl AsRawFd) -> std::io::Result<()> {
    let flags = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?;
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// Copies `fd` (a pipe read end or a PTY master, non-blocking) into `buf` until end of file;
/// EIO (a PTY whose slave side closed) is the end too. Stops reading while `buf` is full.
pub async fn pump(fd: OwnedFd, buf: std::sync::Arc<OutputBuffer>) {
    let fd = match register(fd, Interest::READABLE) {
        Ok(fd) => fd,
        Err(_) => return buf.close(),
    };
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let room = buf.wait_room().await.min(chunk.len());
        let mut guard = match fd.readable().await {
            Ok(g) => g,
            Err(_) => break,
        };
        match guard.try_io(|inner| read_fd(inner.as_raw_fd(), &mut chunk[..room])) {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => buf.push(&chunk[..n]),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Ok(Err(_)) => break, // EIO on a PTY master: the terminal is gone
            Err(_would_block) => {}
        }
    }
    buf.close();
}

/// Registers an owned fd with the tokio reactor.
fn register(fd: OwnedFd, interest: Interest) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd is open and keeps referring to the same file description until the
    // AsyncFd (its owner) drops it.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(|e| e.into_parts().1)
}

fn read_fd(fd: RawFd, out: &mut [u8]) -> std::io::Result<usize> {
    // SAFETY: `out` is a valid writable buffer of the given length.
    let n = unsafe { libc::read(fd, out.as_mut_ptr().cast(), out.len()) };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// The writable side of a process's stdin.
pub struct Stdin {
    fd: AsyncFd<OwnedFd>,
    tty: bool,
}

impl Stdin {
    /// A pipe write end, or a duplicate of a PTY master (`tty`); made non-blocking.
    pub fn new(fd: OwnedFd, tty: bool) -> std::io::Result<Self> {
        set_nonblocking(&fd)?;
        Ok(Self { fd: register(fd, Interest::WRITABLE)?, tty })
    }

    /// Writes everything, waiting while the pipe or terminal is full.
    pub async fn write_all(&self, mut data: &[u8]) -> std::io::Result<usize> {
        let total = data.len();
        while !data.is_empty() {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|inner| {
                // SAFETY: writes from a valid slice.
                let n = unsafe { libc::write(inner.as_raw_fd(), data.as_ptr().cast(), data.len()) };
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            }) {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => {}
            }
        }
        Ok(total)
    }

    /// End of input for the process: a pipe is closed; a terminal gets its EOF character.
    pub async fn close(self) -> std::io::Result<()> {
        if self.tty {
            self.write_all(&[VEOF]).await?;
        }
        Ok(())
    }
}

/// Pipes for a process without a terminal: `(child [stdin, stdout, stderr], parent stdin
/// write end, parent stdout read end, parent stderr read end)`. All close-on-exec; the parent
/// ends non-blocking.
pub struct Pipes {
    pub child: [OwnedFd; 3],
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

impl Pipes {
    pub fn new() -> std::io::Result<Self> {
        let (in_r, in_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        let (out_r, out_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        let (err_r, err_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        for fd in [&out_r, &err_r] {
            set_nonblocking(fd)?;
        }
        Ok(Self { child: [in_r, out_w, err_w], stdin: in_w, stdout: out_r, stderr: err_r })
    }
}

/// Sets the terminal size on a PTY master.
pub fn set_winsize(master: &impl AsFd, rows: u32, cols: u32) -> std::io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows.min(u16::MAX as u32) as u16,
        ws_col: cols.min(u16::MAX as u32) as u16,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize struct that lives across the call.
    if unsafe { libc::ioctl(master.as_fd().as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Duplicates an fd, close-on-exec.
pub fn dup_cloexec(fd: &impl AsRawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC returns a new fd that we own.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
    if new < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `new` is a fresh fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn take_returns_data_then_eof_forever() {
        let mut s = BufState::default();
        assert_eq!(s.take(10), Chunk::Empty);
        s.push(b"hello\n");
        s.set_eof();
        assert_eq!(s.take(3), Chunk::Data(b"hel".to_vec()));
        assert!(!s.eof_read());
        assert_eq!(s.take(100), Chunk::Data(b"lo\n".to_vec()));
        assert_eq!(s.take(100), Chunk::Eof);
        assert!(s.eof_read());
        assert_eq!(s.take(100), Chunk::Eof);
    }

    #[test]
    fn reads_are_capped_and_zero_means_the_cap() {
        let mut s = BufState::default();
        s.push(&vec![7u8; READ_MAX + 5]);
        match s.take(0) {
            Chunk::Data(d) => assert_eq!(d.len(), READ_MAX),
            other => panic!("{other:?}"),
        }
        match s.take(usize::MAX) {
            Chunk::Data(d) => assert_eq!(d.len(), 5),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn room_shrinks_to_zero_at_the_cap() {
        let mut s = BufState::default();
        assert_eq!(s.room(10), 10);
        s.push(b"0123456789ab");
        assert_eq!(s.room(10), 0);
    }

    #[tokio::test]
    async fn pump_applies_back_pressure_and_loses_nothing() {
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
        set_nonblocking(&r).unwrap();
        let buf = Arc::new(OutputBuffer::default());
        let pump_task = tokio::spawn(pump(r, buf.clone()));
        // Write 3x the cap from a thread; it must block once the buffer and the pipe are full.
        let total = 3 * BUFFER_CAP;
        let writer = std::thread::spawn(move || {
            let mut f = std::fs::File::from(w);
            let mut written = 0usize;
            let block: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
            while written < total {
                std::io::Write::write_all(&mut f, &block).unwrap();
                written += block.len();
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let buffered = buf.state.lock().unwrap().data.len();
        assert!(buffered <= BUFFER_CAP, "buffer grew past its cap: {buffered}");
        assert!(!writer.is_finished(), "the writer must be blocked by back-pressure");
        let mut got = 0usize;
        loop {
            let d = buf.read(100_000).await;
            if d.is_empty() {
                break;
            }
            for (i, b) in d.iter().enumerate() {
                assert_eq!(*b, ((got + i) % 65536 % 251) as u8, "byte {} corrupted", got + i);
            }
            got += d.len();
        }
        writer.join().unwrap();
        pump_task.await.unwrap();
        assert_eq!(got, total);
        assert!(buf.read(10).await.is_empty(), "later reads stay at EOF");
    }

    #[tokio::test]
    async fn read_blocks_until_data_or_close() {
        let buf = Arc::new(OutputBuffer::default());
        let reader = tokio::spawn({
            let buf = buf.clone();
            async move { buf.read(10).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!reader.is_finished());
        buf.push(b"x");
        assert_eq!(reader.await.unwrap(), b"x");
        let reader = tokio::spawn({
            let buf = buf.clone();
            async move { buf.read(10).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        buf.close();
        assert!(reader.await.unwrap().is_empty());
        assert!(buf.eof_read());
    }

    #[tokio::test]
    async fn stdin_pipe_writes_and_closes() {
        let p = Pipes::new().unwrap();
        let stdin = Stdin::new(p.stdin, false).unwrap();
        assert_eq!(stdin.write_all(b"hi").await.unwrap(), 2);
        stdin.close().await.unwrap();
        let mut s = String::new();
        let [child_in, _, _] = p.child;
        std::io::Read::read_to_string(&mut std::fs::File::from(child_in), &mut s).unwrap();
        assert_eq!(s, "hi");
    }
}
