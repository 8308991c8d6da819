//! The parts of the PostgreSQL wire protocol the proxy speaks itself: the startup packet
//! family (SSLRequest, GSSENCRequest, CancelRequest, StartupMessage), the framing of the
//! server's messages, and ErrorResponse.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt};

pub const SSL_REQUEST: i32 = 80877103;
pub const GSSENC_REQUEST: i32 = 80877104;
pub const CANCEL_REQUEST: i32 = 80877102;
/// Protocol major version 3; the minor version is negotiated by the server.
#[cfg(test)]
pub const PROTOCOL_MAJOR_3: i32 = 3 << 16;
/// A startup packet larger than this is refused (PostgreSQL's own limit is 10000).
const MAX_STARTUP_PACKET: usize = 10_000;

/// One packet of the startup phase (no type byte: a length then a code).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel {
        pid: i32,
        secret: i32,
    },
    Startup {
        version: i32,
        params: Vec<(String, String)>,
    },
}

/// Reads one startup-phase packet.
pub async fn read_startup<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<StartupPacket> {
    let len = r.read_i32().await?;
    if !(8..=MAX_STARTUP_PACKET as i32).contains(&len) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("invalid startup packet length {len}"),
        ));
    }
    let mut body = vec![0u8; len as usize - 4];
    r.read_exact(&mut body).await?;
    let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    let rest = &body[4..];
    Ok(match code {
        SSL_REQUEST => StartupPacket::SslRequest,
        GSSENC_REQUEST => StartupPacket::GssEncRequest,
        CANCEL_REQUEST if rest.len() >= 8 => StartupPacket::Cancel {
            pid: i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]),
            secret: i32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]),
        },
        v if v >> 16 == 3 => StartupPacket::Startup {
            version: v,
            params: parse_params(rest)?,
        },
        other => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "unsupported protocol version {}.{}",
                    other >> 16,
                    other & 0xffff
                ),
            ))
        }
    })
}

fn parse_params(mut rest: &[u8]) -> io::Result<Vec<(String, String)>> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed startup parameters");
    let mut out = Vec::new();
    // Bounded by the packet size: each round consumes at least one byte.
    loop {
        let end = rest.iter().position(|b| *b == 0).ok_or_else(bad)?;
        if end == 0 {
            return Ok(out);
        }
        let key = String::from_utf8_lossy(&rest[..end]).into_owned();
        rest = &rest[end + 1..];
        let end = rest.iter().position(|b| *b == 0).ok_or_else(bad)?;
        let value = String::from_utf8_lossy(&rest[..end]).into_owned();
        rest = &rest[end + 1..];
        out.push((key, value));
    }
}

/// Encodes a StartupMessage.
pub fn encode_startup(version: i32, params: &[(String, String)]) -> Vec<u8> {
    let mut body = Vec::with_capacity(256);
    body.extend_from_slice(&version.to_be_bytes());
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Encodes a CancelRequest.
pub fn encode_cancel(pid: i32, secret: i32) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&16i32.to_be_bytes());
    out[4..8].copy_from_slice(&CANCEL_REQUEST.to_be_bytes());
    out[8..12].copy_from_slice(&pid.to_be_bytes());
    out[12..].copy_from_slice(&secret.to_be_bytes());
    out
}

/// Encodes an ErrorResponse with severity FATAL.
pub fn error_response(sqlstate: &str, message: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for (field, value) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', sqlstate),
        (b'M', message),
    ] {
        body.push(field);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(b'E');
    out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Takes `branch=NAME` (or `--branch=NAME`) out of a startup `options` value; returns the
/// branch and what remains of the options.
pub fn take_branch_option(options: &str) -> (Option<String>, String) {
    let mut branch = None;
    let mut rest = Vec::new();
    for token in options.split_whitespace() {
        let t = token.trim_start_matches("--");
        match t.strip_prefix("branch=") {
            Some(b) if branch.is_none() => branch = Some(b.to_string()),
            _ => rest.push(token),
        }
    }
    (branch, rest.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn startup_round_trip() {
        let params = vec![
            ("user".to_string(), "alice".to_string()),
            ("database".to_string(), "app".to_string()),
        ];
        let bytes = encode_startup(PROTOCOL_MAJOR_3, &params);
        let mut r = &bytes[..];
        assert_eq!(
            read_startup(&mut r).await.unwrap(),
            StartupPacket::Startup {
                version: PROTOCOL_MAJOR_3,
                params
            }
        );
    }

    #[tokio::test]
    async fn cancel_and_ssl() {
        let bytes = encode_cancel(42, -7);
        let mut r = &bytes[..];
        assert_eq!(
            read_startup(&mut r).await.unwrap(),
            StartupPacket::Cancel {
                pid: 42,
                secret: -7
            }
        );
        let ssl = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
        let mut r = &ssl[..];
        assert_eq!(
            read_startup(&mut r).await.unwrap(),
            StartupPacket::SslRequest
        );
    }

    #[tokio::test]
    async fn garbage_is_refused() {
        let mut r = &[0u8, 0, 0, 3][..];
        assert!(read_startup(&mut r).await.is_err());
        let mut r = &[0u8, 0x10, 0, 0, 0, 0, 0, 0][..];
        assert!(read_startup(&mut r).await.is_err());
        let bad = [0, 0, 0, 12, 0, 3, 0, 0, b'u', b's', b'e', b'r'];
        let mut r = &bad[..];
        assert!(read_startup(&mut r).await.is_err());
    }

    #[test]
    fn branch_option() {
        assert_eq!(
            take_branch_option("branch=dev"),
            (Some("dev".into()), String::new())
        );
        assert_eq!(
            take_branch_option("-c work_mem=8MB --branch=dev/alice"),
            (Some("dev/alice".into()), "-c work_mem=8MB".into())
        );
        assert_eq!(take_branch_option("-c x=1"), (None, "-c x=1".into()));
    }

    #[test]
    fn error_response_is_framed() {
        let e = error_response("3D000", "branch \"x\" does not exist");
        assert_eq!(e[0], b'E');
        let len = i32::from_be_bytes([e[1], e[2], e[3], e[4]]) as usize;
        assert_eq!(len + 1, e.len());
        assert_eq!(*e.last().unwrap(), 0);
    }
}
