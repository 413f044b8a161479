//! The HTTP/1.1 framing spoken over the control socket, by both ends: the daemon's server
//! (`control`) and the command line's client (`cli::client`). One request per connection
//! (`Connection: close`), bodies are JSON with a `Content-Length`; heads are parsed by `httparse`.
//! Every read and write is bounded by a deadline, and writes never raise SIGPIPE (`main` restores
//! its default action, which would kill the daemon when a client leaves early).

use std::io::{self, Read};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{send, MsgFlags};

/// The longest head (request or status line and headers) either end accepts.
pub const MAX_HEAD: usize = 16 * 1024;
/// The largest request body the daemon accepts: a batch of snapshot names (`snapshot rm
/// --from-file`) takes about 20 bytes a name, a million of them 20 MiB.
pub const MAX_REQUEST_BODY: usize = 64 << 20;
/// The largest answer the command accepts: a deletion answers with the snapshots it deleted,
/// about 130 bytes each (1.2 MiB for 10,000, 130 MiB for a million).
pub const MAX_RESPONSE_BODY: usize = 512 << 20;
const MAX_HEADERS: usize = 32;

/// Why a message could not be read.
#[derive(Debug)]
pub enum ReadError {
    /// The peer closed the connection before sending a byte.
    Closed,
    /// Not HTTP/1.1 as this end speaks it (the reason, for a 400 and the log).
    Malformed(String),
    /// The deadline passed before the message was complete.
    TimedOut,
    Io(io::Error),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Closed => f.write_str("the connection closed before a message"),
            ReadError::Malformed(why) => f.write_str(why),
            ReadError::TimedOut => f.write_str("no complete message in time"),
            ReadError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// A connected stream this framing speaks over: the control socket (Unix) or the metrics
/// listener (TCP).
pub trait Stream: AsRawFd {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
    fn read_into(&self, buf: &mut [u8]) -> io::Result<usize>;
}

impl Stream for UnixStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_write_timeout(self, timeout)
    }
    fn read_into(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Stream for TcpStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, timeout)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_write_timeout(self, timeout)
    }
    fn read_into(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

/// A request as the server reads it.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    /// The path without its query string.
    pub path: String,
    pub body: Vec<u8>,
}

/// A response as the client reads it.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Reads one request, within `deadline`.
pub fn read_request(stream: &impl Stream, deadline: Instant) -> Result<Request, ReadError> {
    let ((method, path), body) = read_message(stream, deadline, |buf| {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(buf) {
            Ok(httparse::Status::Complete(len)) => {
                let method = request.method.unwrap_or_default().to_string();
                let target = request.path.unwrap_or_default();
                let path = target.split('?').next().unwrap_or_default().to_string();
                let body_len = body_length(request.headers, MAX_REQUEST_BODY)?;
                Ok(Some((len, (method, path), body_len)))
            }
            Ok(httparse::Status::Partial) => Ok(None),
            Err(e) => Err(format!("not an HTTP/1.1 request: {e}")),
        }
    })?;
    Ok(Request { method, path, body })
}

/// Reads one response, within `deadline`.
pub fn read_response(stream: &impl Stream, deadline: Instant) -> Result<Response, ReadError> {
    let (status, body) = read_message(stream, deadline, |buf| {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(buf) {
            Ok(httparse::Status::Complete(len)) => {
                let status = response.code.unwrap_or_default();
                Ok(Some((
                    len,
                    status,
                    body_length(response.headers, MAX_RESPONSE_BODY)?,
                )))
            }
            Ok(httparse::Status::Partial) => Ok(None),
            Err(e) => Err(format!("not an HTTP/1.1 response: {e}")),
        }
    })?;
    Ok(Response { status, body })
}

/// The body's length from `Content-Length` (none: no body). Chunked bodies are not spoken here.
fn body_length(headers: &[httparse::Header], max: usize) -> Result<usize, String> {
    let mut length = None;
    for header in headers {
        if header.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err("Transfer-Encoding is not supported: send a Content-Length".into());
        }
        if header.name.eq_ignore_ascii_case("content-length") {
            let this = std::str::from_utf8(header.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| "invalid Content-Length".to_string())?;
            // Two lengths that disagree make the message's end ambiguous (RFC 9112, 6.3).
            if length.is_some_and(|earlier| earlier != this) {
                return Err("conflicting Content-Length headers".into());
            }
            length = Some(this);
        }
    }
    let length = length.unwrap_or(0);
    if length > max {
        return Err(format!(
            "a body of {length} bytes is over the {max} allowed"
        ));
    }
    Ok(length)
}

/// What a head parser says of the bytes so far: not yet complete (`None`), or the head's length,
/// what the caller keeps of it, and the body's length; or why it is not HTTP.
type Parsed<H> = Result<Option<(usize, H, usize)>, String>;

/// Reads until `parse` finds a complete head, then the body it announces.
fn read_message<H>(
    stream: &impl Stream,
    deadline: Instant,
    parse: impl Fn(&[u8]) -> Parsed<H>,
) -> Result<(H, Vec<u8>), ReadError> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        if let Some((head_len, head, body_len)) = parse(&buf).map_err(ReadError::Malformed)? {
            let total = head_len + body_len;
            while buf.len() < total {
                if read_some(stream, &mut buf, deadline)? == 0 {
                    return Err(ReadError::Malformed(
                        "the connection closed in the middle of the body".into(),
                    ));
                }
            }
            // Anything after the message is ignored: one request per connection.
            buf.truncate(total);
            return Ok((head, buf.split_off(head_len)));
        }
        if buf.len() >= MAX_HEAD {
            return Err(ReadError::Malformed(format!(
                "no complete head in the first {MAX_HEAD} bytes"
            )));
        }
        if read_some(stream, &mut buf, deadline)? == 0 {
            return Err(if buf.is_empty() {
                ReadError::Closed
            } else {
                ReadError::Malformed("the connection closed in the middle of the head".into())
            });
        }
    }
}

/// One read, waiting no later than `deadline`; appends to `buf` and returns how many bytes came.
fn read_some(
    stream: &impl Stream,
    buf: &mut Vec<u8>,
    deadline: Instant,
) -> Result<usize, ReadError> {
    let mut chunk = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ReadError::TimedOut);
        }
        stream.set_read_timeout(Some(left)).map_err(ReadError::Io)?;
        match stream.read_into(&mut chunk) {
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return Ok(n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ReadError::TimedOut)
            }
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
}

/// Writes all of `bytes` before `deadline`, without SIGPIPE when the peer has gone.
pub fn send_all(stream: &impl Stream, mut bytes: &[u8], deadline: Instant) -> io::Result<()> {
    while !bytes.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        stream.set_write_timeout(Some(left))?;
        match send(stream.as_raw_fd(), bytes, MsgFlags::MSG_NOSIGNAL) {
            Ok(n) => bytes = &bytes[n..],
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => return Err(io::ErrorKind::TimedOut.into()),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// A request with an optional JSON body.
pub fn encode_request(method: &str, path: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "{method} {path} HTTP/1.1\r\nHost: imgpool\r\nAccept: application/json\r\n{}Content-Length: {}\r\nConnection: close\r\n\r\n",
        if body.is_empty() { "" } else { "Content-Type: application/json\r\n" },
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// A response with a JSON body; `extra` headers are complete lines without the line end.
pub fn encode_response(status: u16, extra: &[String], body: &[u8]) -> Vec<u8> {
    encode_response_as(status, extra, JSON, body)
}

pub const JSON: &str = "application/json";

/// A response with a body of `content_type`.
pub fn encode_response_as(
    status: u16,
    extra: &[String],
    content_type: &str,
    body: &[u8],
) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    for line in extra {
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str(&format!(
        "Content-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(2)
    }

    #[test]
    fn a_request_and_a_response_go_through_both_ends() {
        let (client, server) = UnixStream::pair().unwrap();
        send_all(
            &client,
            &encode_request("POST", "/v1/cache/drop?x=1", b"{\"a\":1}"),
            soon(),
        )
        .unwrap();
        let request = read_request(&server, soon()).unwrap();
        assert_eq!(request.method, "POST");
        assert_eq!(request.path, "/v1/cache/drop");
        assert_eq!(request.body, b"{\"a\":1}");
        send_all(
            &server,
            &encode_response(405, &["Allow: GET".into()], b"{}"),
            soon(),
        )
        .unwrap();
        let response = read_response(&client, soon()).unwrap();
        assert_eq!(response.status, 405);
        assert_eq!(response.body, b"{}");
    }

    #[test]
    fn a_request_split_in_pieces_is_read_whole() {
        let (mut client, server) = UnixStream::pair().unwrap();
        let bytes = encode_request("GET", "/v1/stats", b"");
        let reader = std::thread::spawn(move || read_request(&server, soon()));
        for piece in bytes.chunks(7) {
            client.write_all(piece).unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
        let request = reader.join().unwrap().unwrap();
        assert_eq!(
            (request.method.as_str(), request.path.as_str()),
            ("GET", "/v1/stats")
        );
        assert!(request.body.is_empty());
    }

    #[test]
    fn garbage_half_requests_and_silence_are_told_apart() {
        let (mut client, server) = UnixStream::pair().unwrap();
        client.write_all(b"\x00\x01garbage\r\n\r\n").unwrap();
        assert!(matches!(
            read_request(&server, soon()),
            Err(ReadError::Malformed(_))
        ));

        let (mut client, server) = UnixStream::pair().unwrap();
        client
            .write_all(b"GET /v1/stats HTTP/1.1\r\nHost:")
            .unwrap();
        let deadline = Instant::now() + Duration::from_millis(100);
        assert!(matches!(
            read_request(&server, deadline),
            Err(ReadError::TimedOut)
        ));

        let (client, server) = UnixStream::pair().unwrap();
        drop(client);
        assert!(matches!(
            read_request(&server, soon()),
            Err(ReadError::Closed)
        ));

        let (mut client, server) = UnixStream::pair().unwrap();
        client
            .write_all(b"POST /v1/wake HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n")
            .unwrap();
        assert!(matches!(
            read_request(&server, soon()),
            Err(ReadError::Malformed(_))
        ));

        let (mut client, server) = UnixStream::pair().unwrap();
        client
            .write_all(
                b"POST /v1/wake HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 0\r\n\r\nab",
            )
            .unwrap();
        assert!(matches!(
            read_request(&server, soon()),
            Err(ReadError::Malformed(_))
        ));
    }

    #[test]
    fn writing_to_a_closed_peer_is_an_error_not_a_signal() {
        let (client, server) = UnixStream::pair().unwrap();
        drop(client);
        let err = send_all(&server, b"HTTP/1.1 200 OK\r\n\r\n", soon()).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPIPE));
    }
}
