//! The `ftvm ctl` side of the operator API: plain HTTP/1.0 over TCP.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use super::{ActionAnswer, ControlError, OperatorAction, Status};

/// One request to the CoServer at `addr`; the status code and body of its answer.
fn request(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    wait: Duration,
) -> Result<(u16, String), ControlError> {
    let connect = |source| ControlError::Connect {
        addr: addr.to_string(),
        source,
    };
    let mut s = TcpStream::connect(addr).map_err(connect)?;
    s.set_read_timeout(Some(wait)).map_err(connect)?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\n\r\n"
    )
    .map_err(connect)?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).map_err(connect)?;
    let bad = |message: String| ControlError::Answer {
        addr: addr.to_string(),
        message,
    };
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("no HTTP header".into()))?;
    let code = head
        .strip_prefix("HTTP/1.")
        .and_then(|h| h.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad(head.lines().next().unwrap_or("").to_string()))?;
    Ok((code, body.to_string()))
}

/// The body of `GET path` from the CoServer at `addr` (host:port).
pub fn fetch_text(addr: &str, path: &str) -> Result<String, ControlError> {
    let (code, body) = request(addr, "GET", path, None, Duration::from_secs(5))?;
    if code != 200 {
        return Err(ControlError::Answer {
            addr: addr.to_string(),
            message: format!("GET {path}: HTTP {code}"),
        });
    }
    Ok(body)
}

/// Fetches the status from the CoServer at `addr` (host:port).
pub fn fetch(addr: &str) -> Result<Status, ControlError> {
    let body = fetch_text(addr, "/status")?;
    serde_json::from_str(&body).map_err(|e| ControlError::Answer {
        addr: addr.to_string(),
        message: e.to_string(),
    })
}

/// Asks the CoServer at `addr` to carry out `action` (with `token` when not on its
/// host): what it does, or why not.
pub fn act(
    addr: &str,
    action: OperatorAction,
    token: Option<&str>,
) -> Result<String, ControlError> {
    let path = format!("/actions/{}", action.name());
    let (_, body) = request(addr, "POST", &path, token, Duration::from_secs(15))?;
    let answer: ActionAnswer = serde_json::from_str(&body).map_err(|e| ControlError::Answer {
        addr: addr.to_string(),
        message: format!("{e}: {body}"),
    })?;
    if answer.accepted {
        Ok(answer.message)
    } else {
        Err(ControlError::Refused {
            action: action.name(),
            message: answer.message,
        })
    }
}
