//! A minimal HTTP/1.1 GET over a unix socket (the shim's monitor socket), bounded in size and
//! time: the answer is the shim's, but a stuck shim must not hang the CLI.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// The largest response accepted.
pub const MAX_RESPONSE: usize = 64 << 20;
/// Connect, write and each read.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// A response.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The body (chunked encoding undone).
    pub body: Vec<u8>,
}

/// `GET path` on the unix socket `socket`.
pub fn get(socket: &Path, path: &str) -> Result<Response, String> {
    let mut s = UnixStream::connect(socket).map_err(|e| format!("connect to {}: {e}", socket.display()))?;
    s.set_read_timeout(Some(TIMEOUT)).and_then(|_| s.set_write_timeout(Some(TIMEOUT))).map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAccept: */*\r\n\r\n")
        .map_err(|e| format!("write to {}: {e}", socket.display()))?;
    let mut raw = Vec::new();
    (&mut s)
        .take(MAX_RESPONSE as u64 + 1)
        .read_to_end(&mut raw)
        .map_err(|e| format!("read from {}: {e}", socket.display()))?;
    if raw.len() > MAX_RESPONSE {
        return Err(format!("the answer from {} is larger than {MAX_RESPONSE} bytes", socket.display()));
    }
    parse(&raw).map_err(|e| format!("bad HTTP answer from {}: {e}", socket.display()))
}

/// Parses a whole HTTP/1.x response (the connection was closed after it).
pub fn parse(raw: &[u8]) -> Result<Response, String> {
    let end = memchr::memmem::find(raw, b"\r\n\r\n").ok_or("no end of headers")?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| "headers are not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(format!("status line {status_line:?}"));
    }
    let status: u16 = parts.next().and_then(|c| c.parse().ok()).ok_or(format!("status line {status_line:?}"))?;
    let mut chunked = false;
    let mut length = None;
    for l in lines {
        let Some((k, v)) = l.split_once(':') else { continue };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        if k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked") {
            chunked = true;
        } else if k == "content-length" {
            length = Some(v.parse::<usize>().map_err(|_| format!("Content-Length {v:?}"))?);
        }
    }
    let rest = &raw[end + 4..];
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(n) = length {
        rest.get(..n).ok_or(format!("body shorter ({}) than Content-Length {n}", rest.len()))?.to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Response { status, body })
}

fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let eol = memchr::memmem::find(rest, b"\r\n").ok_or("truncated chunk size")?;
        let size_text = std::str::from_utf8(&rest[..eol]).map_err(|_| "bad chunk size")?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| format!("bad chunk size {size_text:?}"))?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok(body);
        }
        let chunk = rest.get(..size).ok_or("truncated chunk")?;
        body.extend_from_slice(chunk);
        rest = rest.get(size + 2..).ok_or("truncated chunk end")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_body() {
        let r = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello").unwrap();
        assert_eq!(r, Response { status: 200, body: b"hello".to_vec() });
    }

    #[test]
    fn chunked_body() {
        let r = parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n")
            .unwrap();
        assert_eq!(r.body, b"abcde");
    }

    #[test]
    fn body_to_eof_and_errors() {
        assert_eq!(
            parse(b"HTTP/1.0 404 Not Found\r\n\r\nnope").unwrap(),
            Response { status: 404, body: b"nope".to_vec() }
        );
        assert!(parse(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort").unwrap_err().contains("shorter"));
        assert!(parse(b"SSH-2.0\r\n\r\n").is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\n").is_err());
    }

    #[test]
    fn get_against_a_unix_server() {
        let dir = std::env::temp_dir().join(format!("kata-runtime-http-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("s.sock");
        let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let t = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut buf = [0u8; 1024];
            let n = c.read(&mut buf).unwrap();
            assert!(buf[..n].starts_with(b"GET /metrics HTTP/1.1\r\n"));
            c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").unwrap();
        });
        let r = get(&sock, "/metrics").unwrap();
        t.join().unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"ok"[..]));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(get(&sock, "/metrics").unwrap_err().contains("connect to"));
    }
}
