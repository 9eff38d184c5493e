//! The operator API's HTTP server, a task of the CoServer's tokio runtime.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;

use super::{ActionAnswer, ControlError, OperatorAction, Status};

/// How long an action waits for the node's event loop to answer.
const ANSWER_WAIT: Duration = Duration::from_secs(10);

/// An action for the node's event loop, with the way back for its answer.
#[derive(Debug)]
pub struct ActionRequest {
    /// What the operator asks.
    pub action: OperatorAction,
    /// Where the answer goes: what the node does, or why not.
    pub reply: tokio::sync::oneshot::Sender<Result<String, String>>,
}

/// The node's end of the actions: taken between its turns.
pub type Requests = std::sync::mpsc::Receiver<ActionRequest>;

struct Ctx {
    status: Arc<Mutex<Status>>,
    actions: std::sync::mpsc::Sender<ActionRequest>,
    token: String,
}

impl Ctx {
    fn status(&self) -> Status {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// Whether a request from `from` carrying `headers` may act: from the loopback
/// interface, or with the state directory's token as a bearer token.
fn may_act(from: SocketAddr, headers: &HeaderMap, token: &str) -> bool {
    if from.ip().is_loopback() {
        return true;
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Compared in full whatever differs first.
    presented.len() == token.len()
        && presented
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn answer(code: StatusCode, accepted: bool, message: String) -> Response {
    (code, Json(ActionAnswer { accepted, message })).into_response()
}

async fn act(
    State(ctx): State<Arc<Ctx>>,
    ConnectInfo(from): ConnectInfo<SocketAddr>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Some(action) = OperatorAction::from_name(&name) else {
        let known: Vec<&str> = OperatorAction::ALL.iter().map(|a| a.name()).collect();
        return answer(
            StatusCode::NOT_FOUND,
            false,
            format!("no action {name:?}; actions: {}", known.join(", ")),
        );
    };
    if !may_act(from, &headers, &ctx.token) {
        tracing::warn!(%from, action = name, "operator action refused: no valid token");
        return answer(
            StatusCode::FORBIDDEN,
            false,
            format!("actions are taken from this host, or with the token in the CoServer's state directory ({})", super::TOKEN_FILE),
        );
    }
    let (reply, answered) = tokio::sync::oneshot::channel();
    if ctx.actions.send(ActionRequest { action, reply }).is_err() {
        return answer(
            StatusCode::SERVICE_UNAVAILABLE,
            false,
            "the CoServer is stopping".into(),
        );
    }
    match tokio::time::timeout(ANSWER_WAIT, answered).await {
        Ok(Ok(Ok(message))) => {
            tracing::info!(%from, action = name, "operator action: {message}");
            answer(StatusCode::OK, true, message)
        }
        Ok(Ok(Err(message))) => answer(StatusCode::CONFLICT, false, message),
        Ok(Err(_)) => answer(
            StatusCode::SERVICE_UNAVAILABLE,
            false,
            "the CoServer is stopping".into(),
        ),
        Err(_) => answer(
            StatusCode::GATEWAY_TIMEOUT,
            false,
            format!(
                "the CoServer's event loop did not answer within {} s",
                ANSWER_WAIT.as_secs()
            ),
        ),
    }
}

/// Serves the operator API on `addr` as a task of `runtime`: the status, the metrics
/// and the status page, and actions (sent to the node through the returned
/// [`Requests`]), acting only for the loopback interface or the holder of `token`.
pub fn serve(
    addr: SocketAddr,
    status: Arc<Mutex<Status>>,
    token: String,
    runtime: &tokio::runtime::Handle,
) -> Result<Requests, ControlError> {
    let listen = |e: std::io::Error| ControlError::Listen {
        addr,
        message: e.to_string(),
    };
    let std_listener = std::net::TcpListener::bind(addr).map_err(listen)?;
    std_listener.set_nonblocking(true).map_err(listen)?;
    let listener = {
        let _guard = runtime.enter();
        tokio::net::TcpListener::from_std(std_listener).map_err(listen)?
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let ctx = Arc::new(Ctx {
        status,
        actions: tx,
        token,
    });
    let app = axum::Router::new()
        .route(
            "/status",
            axum::routing::get(|State(ctx): State<Arc<Ctx>>| async move { Json(ctx.status()) }),
        )
        .route(
            "/metrics",
            axum::routing::get(|State(ctx): State<Arc<Ctx>>| async move {
                (
                    [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                    super::render_metrics(&ctx.status()),
                )
            }),
        )
        .route("/", axum::routing::get(|| async { Html(super::page::PAGE) }))
        .route("/actions/{name}", axum::routing::post(act))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                Json(serde_json::json!({ "error": "not found; try /status, /metrics, / or POST /actions/<name>" })),
            )
        })
        .with_state(ctx);
    runtime.spawn(async move {
        let service = app.into_make_service_with_connect_info::<SocketAddr>();
        if let Err(e) = axum::serve(listener, service).await {
            tracing::error!("control API stopped: {e}");
        }
    });
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{act as client_act, fetch, fetch_text, render};

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    fn free_addr() -> SocketAddr {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    }

    #[test]
    fn status_metrics_and_page_are_served() {
        let status = Arc::new(Mutex::new(Status {
            node: "a".into(),
            role: "primary".into(),
            ..Status::default()
        }));
        let addr = free_addr();
        let rt = runtime();
        let _requests = serve(addr, status, "t".into(), rt.handle()).unwrap();
        let got = fetch(&addr.to_string()).unwrap();
        assert_eq!((got.node.as_str(), got.role.as_str()), ("a", "primary"));
        assert!(render(&got).starts_with("node a: primary"));
        let metrics = fetch_text(&addr.to_string(), "/metrics").unwrap();
        assert!(
            metrics.contains("ftvm_role{node=\"a\",role=\"primary\"} 1"),
            "{metrics}"
        );
        let page = fetch_text(&addr.to_string(), "/").unwrap();
        assert!(page.contains("<html"), "{page}");
        assert!(fetch("127.0.0.1:1").is_err());
    }

    #[test]
    fn actions_reach_the_node_and_carry_its_answer() {
        let addr = free_addr();
        let rt = runtime();
        let requests = serve(addr, Arc::default(), "t".into(), rt.handle()).unwrap();
        let node = std::thread::spawn(move || {
            for expected in [OperatorAction::Leave, OperatorAction::Switchover] {
                let r = requests.recv().unwrap();
                assert_eq!(r.action, expected);
                let answer = match r.action {
                    OperatorAction::Leave => Ok("leaving".to_string()),
                    _ => Err("not protected".to_string()),
                };
                r.reply.send(answer).unwrap();
            }
        });
        let a = addr.to_string();
        assert_eq!(
            client_act(&a, OperatorAction::Leave, None).unwrap(),
            "leaving"
        );
        let refused = client_act(&a, OperatorAction::Switchover, None).unwrap_err();
        assert!(
            refused
                .to_string()
                .contains("switchover refused: not protected"),
            "{refused}"
        );
        node.join().unwrap();
    }

    #[test]
    fn only_loopback_or_the_token_may_act() {
        let token = "0123456789abcdef";
        let mut h = HeaderMap::new();
        let lan: SocketAddr = "10.0.0.5:40000".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        assert!(may_act(local, &h, token));
        assert!(!may_act(lan, &h, token));
        h.insert(
            header::AUTHORIZATION,
            "Bearer 0123456789abcdeX".parse().unwrap(),
        );
        assert!(!may_act(lan, &h, token));
        h.insert(
            header::AUTHORIZATION,
            "Bearer 0123456789abcde".parse().unwrap(),
        );
        assert!(!may_act(lan, &h, token));
        h.insert(
            header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        assert!(may_act(lan, &h, token));
    }
}
