//! The log routes: the live feed (`GET /deployment-engine/log`, a WebSocket of
//! text lines), the file list and download (`GET`/`PUT
//! /deployment-engine/download`), and the native aliases `GET /api/v1/logs`
//! and `GET /api/v1/logs/{name}`. The files and the feed are the `LogHub`'s
//! (`oplog.rs`); this module only speaks HTTP.
//!
//! Invariant: a WebSocket client is fed from its own `broadcast` receiver, so
//! a slow or stalled client only ever loses lines itself (and is told how
//! many); it never slows down whoever writes them.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, RawQuery, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;

use de_common::api::LogFiles;

use super::error::ApiError;
use crate::Controller;
use crate::oplog::OPLOG_FILE;

type Ctl = State<Arc<Controller>>;

/// The subprotocol of the live log, for clients that name one.
pub(crate) const LOG_PROTOCOL: &str = "de.log";

/// How long one frame may wait for a client that reads nothing before the
/// controller gives up on that client and closes its connection.
const SEND_TIMEOUT: Duration = Duration::from_secs(60);

/// `/deployment-engine/log` and `/deployment-engine/download`.
pub(crate) fn compat_routes() -> Router<Arc<Controller>> {
    Router::new()
        .route("/log", get(live))
        .route("/download", get(list).put(download_named_in_body))
}

/// `/api/v1/logs` and `/api/v1/logs/{name}`.
pub(crate) fn native_routes() -> Router<Arc<Controller>> {
    Router::new()
        .route("/logs", get(list_native))
        .route("/logs/{name}", get(download_by_path))
}

/// The notice a client gets in place of the `missed` lines it fell behind on.
pub(crate) fn dropped_notice(missed: u64) -> String {
    format!(
        "[de] {missed} lines were dropped because this client fell behind; the full log is in {OPLOG_FILE} (GET /deployment-engine/download)"
    )
}

/// Upgrades to a WebSocket fed with every line written from now on (nothing
/// older: the files have that). Subscribes before answering, so a client that
/// has its `101` misses no line written after it.
#[utoipa::path(
    get, path = "/deployment-engine/log", tag = "logs",
    responses((status = 101, description = "A WebSocket (subprotocol `de.log`) of the log lines written from now on, one per text frame."))
)]
async fn live(
    State(ctl): Ctl,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let ws = ws.map_err(|r| {
        ApiError::websocket_required(
            &r,
            "/deployment-engine/log is a WebSocket: connect with ws://HOST:PORT/deployment-engine/log?token=TOKEN",
        )
    })?;
    let rx = ctl.logs.subscribe();
    // A client that offered subprotocols (the console: `de.log` and its
    // token, see `api::WS_TOKEN_PROTOCOL`) is answered with `de.log`; the
    // token itself is never echoed.
    Ok(ws
        .protocols([LOG_PROTOCOL])
        .on_upgrade(move |socket| feed(socket, rx)))
}

async fn feed(mut socket: WebSocket, mut rx: broadcast::Receiver<Arc<str>>) {
    loop {
        tokio::select! {
            got = rx.recv() => {
                let text = match got {
                    Ok(line) => String::from(&*line),
                    Err(RecvError::Lagged(missed)) => dropped_notice(missed),
                    Err(RecvError::Closed) => break,
                };
                let frame = Message::Text(text.into());
                let sent = tokio::time::timeout(SEND_TIMEOUT, socket.send(frame)).await;
                if !matches!(sent, Ok(Ok(()))) {
                    break;
                }
            }
            msg = socket.recv() => match msg {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
                // What a client sends is not a command: ignored.
                Some(Ok(_)) => {}
            },
        }
    }
}

#[utoipa::path(
    get, path = "/deployment-engine/download", operation_id = "list_log_files", tag = "logs",
    responses((status = 200, description = "The log files' names, sorted.", body = Vec<String>))
)]
async fn list(State(ctl): Ctl) -> Result<axum::Json<LogFiles>, ApiError> {
    ctl.logs
        .files()
        .map(axum::Json)
        .map_err(|e| ApiError::internal("could not list the log files", &e))
}

/// `GET /api/v1/logs`: the same list as `GET /deployment-engine/download`
/// (a handler of its own so that the OpenAPI document has both paths).
#[utoipa::path(
    get, path = "/api/v1/logs", operation_id = "list_logs", tag = "logs",
    responses((status = 200, description = "The log files' names, sorted.", body = Vec<String>))
)]
async fn list_native(ctl: Ctl) -> Result<axum::Json<LogFiles>, ApiError> {
    list(ctl).await
}

/// The file name in a `PUT /deployment-engine/download` body: plain
/// (`local.log`, as `curl -d 'local.log'` sends it), a JSON string
/// (`"local.log"`), the original document's `{ "local.log"}`, or
/// `{"name": "local.log"}`.
pub(crate) fn name_in_body(body: &[u8]) -> Result<String, ApiError> {
    let shape = "the body must be the log file's name, plain (local.log) or as a JSON string (\"local.log\"); GET /deployment-engine/download lists them";
    if crate::util::is_blank(body) {
        return Err(ApiError::bad_request(format!("{shape}: the body is empty")));
    }
    let text = std::str::from_utf8(body)
        .map_err(|_| ApiError::bad_request(format!("{shape}: the body is not UTF-8")))?
        .trim();
    let mut inner = text;
    if let Some(braced) = text.strip_prefix('{').and_then(|t| t.strip_suffix('}')) {
        if let Ok(serde_json::Value::Object(map)) = serde_json::from_str(text) {
            return ["name", "Name", "file", "File"]
                .iter()
                .find_map(|k| map.get(*k).and_then(|v| v.as_str()))
                .map(str::to_owned)
                .ok_or_else(|| ApiError::bad_request(format!("{shape}: got {text}")));
        }
        inner = braced.trim();
    }
    if inner.starts_with('"') {
        return serde_json::from_str::<String>(inner)
            .map_err(|e| ApiError::bad_request(format!("{shape}: {e}")));
    }
    Ok(inner.to_owned())
}

#[utoipa::path(
    put, path = "/deployment-engine/download", tag = "logs",
    request_body(content = String, content_type = "text/plain", description = "The file's name, plain or as a JSON string."),
    responses((status = 200, description = "The file.", body = String, content_type = "text/plain"))
)]
async fn download_named_in_body(State(ctl): Ctl, body: Bytes) -> Result<Response, ApiError> {
    let name = name_in_body(&body)?;
    download(&ctl, &name)
}

/// The most lines `?tail=` may ask for.
pub(crate) const MAX_TAIL_LINES: usize = 10_000;

/// `GET /api/v1/logs/{name}`: the whole file, or with `?tail=N` its last N
/// lines (1..=10000, and at most 4 MiB), read from the end of the file.
#[utoipa::path(
    get, path = "/api/v1/logs/{name}", tag = "logs",
    params(
        ("name" = String, Path, description = "The log file's name (`GET /api/v1/logs` lists them)."),
        ("tail" = Option<u64>, Query, minimum = 1, maximum = 10000, description = "Only the last N lines.")
    ),
    responses((status = 200, description = "The file, or its last lines.", body = String, content_type = "text/plain"))
)]
async fn download_by_path(
    State(ctl): Ctl,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let Some(n) = tail_in_query(query.as_deref())? else {
        return download(&ctl, &name);
    };
    let (_, mut file) = ctl.logs.open_file(&name)?;
    let text = tokio::task::spawn_blocking(move || crate::oplog::tail_lines(&mut file, n))
        .await
        .map_err(|e| ApiError::internal("could not read the log file", &e))?
        .map_err(|e| ApiError::internal("could not read the log file", &e))?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}

/// The line count `?tail=N` asks for (1..=10000), `None` without one.
pub(crate) fn tail_in_query(query: Option<&str>) -> Result<Option<usize>, ApiError> {
    let tail = query
        .unwrap_or_default()
        .split('&')
        .find_map(|kv| kv.strip_prefix("tail="));
    let Some(tail) = tail else {
        return Ok(None);
    };
    tail.parse::<usize>()
        .ok()
        .filter(|n| (1..=MAX_TAIL_LINES).contains(n))
        .map(Some)
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "tail must be a number of lines from 1 to {MAX_TAIL_LINES}, got {tail:?}; leave it out for the whole file"
            ))
        })
}

/// The file's contents as `text/plain`, streamed (a log may be large).
fn download(ctl: &Controller, name: &str) -> Result<Response, ApiError> {
    let (_, file) = ctl.logs.open_file(name)?;
    let stream = tokio_util::io::ReaderStream::new(tokio::fs::File::from_std(file));
    Ok((
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8".to_owned()),
            // The name passed `valid_file_name`: no quote can be in it.
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

/// This module's routes in the OpenAPI document (`openapi.rs` merges them).
#[derive(utoipa::OpenApi)]
#[openapi(paths(live, list, list_native, download_named_in_body, download_by_path))]
pub(super) struct Doc;

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use axum::http::StatusCode;
    use futures_util::StreamExt;
    use serde_json::json;
    use tokio_tungstenite::tungstenite;

    use super::*;
    use crate::testkit::{call, controller};

    /// Every wait in these tests is bounded by this.
    const WAIT: Duration = Duration::from_secs(20);

    #[test]
    fn the_name_is_read_from_every_body_shape_the_clients_send() {
        for body in [
            "local.log",
            " local.log\n",
            "\"local.log\"",
            "{ \"local.log\"}",
            "{\"name\": \"local.log\"}",
        ] {
            assert_eq!(
                name_in_body(body.as_bytes()).ok().as_deref(),
                Some("local.log"),
                "{body:?}"
            );
        }
        for body in ["", "  ", "\"local.log", "{\"x\": 1}", "{}"] {
            assert!(name_in_body(body.as_bytes()).is_err(), "{body:?}");
        }
        assert!(name_in_body(&[0xff, 0xfe]).is_err());
    }

    #[tokio::test]
    async fn the_list_is_sorted_json_and_a_file_downloads_as_text() {
        let (_d, ctl) = controller();
        let t = ctl.pki.token().to_owned();
        ctl.logs.line(Some("nats_1"), "second instance");
        ctl.logs.line(Some("nats_0"), "first instance");
        let (s, names) = call(
            &ctl,
            "GET",
            "/deployment-engine/download",
            Some(&t),
            None,
            "",
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(names, json!(["local.log", "nats_0.log", "nats_1.log"]));
        let (s, native) = call(&ctl, "GET", "/api/v1/logs", Some(&t), None, "").await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(native, names);

        for body in ["nats_0.log", "\"nats_0.log\"", "{ \"nats_0.log\"}"] {
            let (s, text) = call(
                &ctl,
                "PUT",
                "/deployment-engine/download",
                Some(&t),
                Some("application/x-www-form-urlencoded"),
                body,
            )
            .await;
            assert_eq!(s, StatusCode::OK, "{body}: {text}");
            let text = text.as_str().unwrap_or_default();
            assert!(text.ends_with(" first instance\n"), "{text:?}");
            assert_eq!(text.lines().count(), 1);
        }
        let (s, text) = call(&ctl, "GET", "/api/v1/logs/local.log", Some(&t), None, "").await;
        assert_eq!(s, StatusCode::OK);
        let text = text.as_str().unwrap_or_default();
        assert!(text.contains(" [nats_1] second instance\n"), "{text:?}");
        assert!(text.contains(" [nats_0] first instance\n"), "{text:?}");

        let (s, _) = call(&ctl, "GET", "/api/v1/logs", None, None, "").await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn tail_answers_the_last_lines_and_refuses_a_bad_count() {
        let (_d, ctl) = controller();
        let t = ctl.pki.token().to_owned();
        for i in 0..50 {
            ctl.logs.line(Some("nats_0"), &format!("line {i}"));
        }
        let (s, text) = call(
            &ctl,
            "GET",
            "/api/v1/logs/nats_0.log?tail=3",
            Some(&t),
            None,
            "",
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{text}");
        let text = text.as_str().unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text:?}");
        assert!(
            lines[0].ends_with(" line 47") && lines[2].ends_with(" line 49"),
            "{text:?}"
        );
        for bad in ["0", "x", "10001", ""] {
            let uri = format!("/api/v1/logs/nats_0.log?tail={bad}");
            let (s, body) = call(&ctl, "GET", &uri, Some(&t), None, "").await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {body}");
            assert!(
                body["message"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("tail must be"),
                "{body}"
            );
        }
        let (s, body) = call(&ctl, "GET", "/api/v1/logs/..?tail=3", Some(&t), None, "").await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(body["error"], "bad_request");
        let (s, _) = call(
            &ctl,
            "GET",
            "/api/v1/logs/nope.log?tail=3",
            Some(&t),
            None,
            "",
        )
        .await;
        assert_eq!(s, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn an_unknown_name_is_404_and_a_traversal_is_400() {
        let (dir, ctl) = controller();
        let t = ctl.pki.token().to_owned();
        std::fs::write(dir.path().join("admin.copy"), "secret").expect("write");
        let (s, body) = call(
            &ctl,
            "PUT",
            "/deployment-engine/download",
            Some(&t),
            None,
            "nats_7.log",
        )
        .await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        assert_eq!(body["error"], "not_found");
        assert!(
            body["message"]
                .as_str()
                .unwrap_or_default()
                .contains("GET /deployment-engine/download"),
            "{body}"
        );
        for name in [
            "../admin.copy",
            "\"../admin.copy\"",
            "/etc/passwd",
            "..",
            "logs/../../admin.copy",
            "\"a\\u0000b\"",
        ] {
            let (s, body) = call(
                &ctl,
                "PUT",
                "/deployment-engine/download",
                Some(&t),
                None,
                name,
            )
            .await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{name}: {body}");
            assert_eq!(body["error"], "bad_request");
        }
        for uri in ["/api/v1/logs/..%2Fadmin.copy", "/api/v1/logs/.."] {
            let (s, body) = call(&ctl, "GET", uri, Some(&t), None, "").await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{uri}: {body}");
            assert_eq!(body["error"], "bad_request", "{uri}: {body}");
            assert!(!body.to_string().contains("secret"), "{uri}: {body}");
        }
        let (s, _) = call(&ctl, "GET", "/api/v1/logs/nats_7.log", Some(&t), None, "").await;
        assert_eq!(s, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn a_plain_get_of_the_websocket_route_says_how_to_connect() {
        let (_d, ctl) = controller();
        let t = ctl.pki.token().to_owned();
        let (s, body) = call(&ctl, "GET", "/deployment-engine/log", Some(&t), None, "").await;
        assert!(s.is_client_error(), "{s}");
        assert_eq!(body["error"], "websocket_required");
        assert!(
            body["message"]
                .as_str()
                .unwrap_or_default()
                .contains("ws://"),
            "{body}"
        );
    }

    /// Serves `api::app` on 127.0.0.1:0 in this test's runtime.
    async fn serve(ctl: &Arc<Controller>) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = crate::http::app(ctl.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    type Client = tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >;

    async fn connect(addr: std::net::SocketAddr, token: &str) -> Client {
        let url = format!("ws://{addr}/deployment-engine/log?token={token}");
        let (ws, resp) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("connected in time")
            .expect("connected");
        assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
        ws
    }

    async fn next_text(ws: &mut Client) -> String {
        loop {
            let msg = tokio::time::timeout(WAIT, ws.next())
                .await
                .expect("a frame in time")
                .expect("the stream is open")
                .expect("a frame");
            match msg {
                tungstenite::Message::Text(t) => return t.as_str().to_owned(),
                tungstenite::Message::Ping(_) | tungstenite::Message::Pong(_) => {}
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }

    /// Reads up to the line ending in ` END`: (lines reported dropped, lines
    /// received before END, the last of them). Checks each notice's wording.
    async fn drain_until_end(ws: &mut Client) -> (usize, usize, String) {
        let (mut missed, mut got, mut last) = (0, 0, String::new());
        loop {
            let line = next_text(ws).await;
            if line.ends_with(" END") {
                return (missed, got, last);
            }
            if let Some(rest) = line.strip_prefix("[de] ") {
                let n: u64 = rest
                    .split(' ')
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("a malformed notice {line:?}"));
                assert_eq!(line, dropped_notice(n));
                missed += n as usize;
            } else {
                got += 1;
                last = line;
            }
        }
    }

    #[tokio::test]
    async fn every_client_gets_each_line_live_and_needs_the_token() {
        let (_d, ctl) = controller();
        let t = ctl.pki.token().to_owned();
        let addr = serve(&ctl).await;
        let url = format!("ws://{addr}/deployment-engine/log?token=wrong");
        match tokio_tungstenite::connect_async(url).await {
            Err(tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status(), StatusCode::UNAUTHORIZED)
            }
            other => panic!("a wrong token must be refused, got {other:?}"),
        }
        ctl.logs.record("before anyone listened");
        let mut a = connect(addr, &t).await;
        let mut b = connect(addr, &t).await;
        ctl.logs.record("plan stored");
        ctl.logs.line(Some("nats_0"), "installing nats");
        for ws in [&mut a, &mut b] {
            let first = next_text(ws).await;
            assert!(first.ends_with(" plan stored"), "live only: {first}");
            let second = next_text(ws).await;
            assert!(second.ends_with(" [nats_0] installing nats"), "{second}");
        }
        // A client that goes away leaves the others and the writer alone.
        drop(a);
        ctl.logs.line(Some("nats_0"), "nats is up");
        assert!(next_text(&mut b).await.ends_with(" nats is up"));
    }

    /// What the console does: the token as a subprotocol, not in the URL.
    #[tokio::test]
    async fn a_browser_passes_the_token_as_a_subprotocol_and_gets_de_log_back() {
        use tungstenite::client::IntoClientRequest;
        let (_d, ctl) = controller();
        let t = ctl.pki.token().to_owned();
        let addr = serve(&ctl).await;
        let request = |offer: String| {
            let mut req = format!("ws://{addr}/deployment-engine/log")
                .into_client_request()
                .expect("request");
            req.headers_mut().insert(
                header::SEC_WEBSOCKET_PROTOCOL,
                offer.parse().expect("header value"),
            );
            req
        };
        let offer = format!("{LOG_PROTOCOL}, {}wrong", crate::http::WS_TOKEN_PROTOCOL);
        match tokio_tungstenite::connect_async(request(offer)).await {
            Err(tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status(), StatusCode::UNAUTHORIZED)
            }
            other => panic!("a wrong token must be refused, got {other:?}"),
        }
        let offer = format!("{LOG_PROTOCOL}, {}{t}", crate::http::WS_TOKEN_PROTOCOL);
        let (mut ws, resp) =
            tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request(offer)))
                .await
                .expect("connected in time")
                .expect("connected");
        assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(
            resp.headers()[header::SEC_WEBSOCKET_PROTOCOL],
            LOG_PROTOCOL,
            "the chosen protocol, never the token"
        );
        ctl.logs.record("through the subprotocol");
        assert!(
            next_text(&mut ws)
                .await
                .ends_with(" through the subprotocol")
        );
    }

    /// One thread: the client cannot read (nor the server send) while the
    /// lines are written, so it is certain to fall behind.
    #[tokio::test(flavor = "current_thread")]
    async fn a_client_that_reads_nothing_never_holds_up_the_writer_and_is_told_what_it_missed() {
        const LINES: usize = 20_000;
        let (dir, ctl) = controller();
        let t = ctl.pki.token().to_owned();
        let addr = serve(&ctl).await;
        let mut ws = connect(addr, &t).await;

        let started = Instant::now();
        for i in 0..LINES {
            ctl.logs.line(
                Some("nats_0"),
                &format!("output line {i} of the install step"),
            );
        }
        ctl.logs.record("END");
        let took = started.elapsed();
        println!("{LINES} lines written in {took:?} with a client reading nothing");
        assert!(took < WAIT, "writing {LINES} lines took {took:?}");

        let (missed, got, last) = drain_until_end(&mut ws).await;
        assert!(missed > 0, "the client cannot have kept up");
        assert_eq!(missed + got, LINES, "every line is delivered or counted");
        assert!(
            last.ends_with(&format!(" output line {} of the install step", LINES - 1)),
            "{last}"
        );

        let nats0 = std::fs::read_to_string(dir.path().join("logs/nats_0.log")).expect("nats_0");
        assert_eq!(nats0.lines().count(), LINES);
        let local = std::fs::read_to_string(dir.path().join("logs/local.log")).expect("local");
        assert_eq!(local.lines().count(), LINES + 1);
    }

    /// Two threads, and lines big enough to fill the client's TCP window: the
    /// server's send to this client stalls while the writer goes on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_connection_does_not_slow_the_writer() {
        const LINES: usize = 20_000;
        let (dir, ctl) = controller();
        let t = ctl.pki.token().to_owned();
        let addr = serve(&ctl).await;
        let mut ws = connect(addr, &t).await;
        let filler = "x".repeat(1000);
        let started = Instant::now();
        for i in 0..LINES {
            ctl.logs.line(Some("dea_0"), &format!("{i} {filler}"));
        }
        ctl.logs.record("END");
        let took = started.elapsed();
        let (missed, got, _) = drain_until_end(&mut ws).await;
        println!(
            "{LINES} lines of 1 kB written in {took:?}; the stalled client got {got}, {missed} reported dropped"
        );
        assert!(took < WAIT, "writing {LINES} lines took {took:?}");
        assert_eq!(missed + got, LINES, "every line is delivered or counted");
        let dea0 = std::fs::read_to_string(dir.path().join("logs/dea_0.log")).expect("dea_0");
        assert_eq!(dea0.lines().count(), LINES);
    }
}
