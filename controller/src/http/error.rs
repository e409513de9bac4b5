//! The HTTP error layer: one [`ApiError`] for every route, one JSON shape
//! (`{"error", "message"}`, plus `"problems"` for an invalid plan), the
//! error codes as one enum ([`ErrorCode`], listed in `docs/API.md`), and one
//! `From` per domain error that says which status, code and message each of
//! its variants answers with.
//!
//! Invariants: handlers never pick a status for a code nor build error JSON;
//! a 5xx logs the error's full chain and sends only a short text.

use std::error::Error;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use de_common::ErrorChain;
use de_common::api::ErrorBody;
pub(crate) use de_common::api::ErrorCode;
use tracing::error;

use crate::access::TokensError;
use crate::agents::{CodesError, PkiError, RotationError, StepsError};
use crate::deploy::DeployError;
use crate::oplog::LogFileError;
use crate::plan::{NO_PLAN, Problem};
use crate::store::StoreError;

/// The HTTP status of each [`ErrorCode`] (the codes live with the API
/// types in `de_common::api`; statuses are the HTTP layer's).
pub(crate) trait Status {
    fn status(self) -> StatusCode;
}

impl Status for ErrorCode {
    /// The status an error with this code is answered with (a failed
    /// WebSocket upgrade may answer 405 or 426 instead of 400).
    fn status(self) -> StatusCode {
        match self {
            ErrorCode::BadRequest | ErrorCode::InvalidPlan | ErrorCode::WebsocketRequired => {
                StatusCode::BAD_REQUEST
            }
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::NoPlan => StatusCode::FORBIDDEN,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::Conflict
            | ErrorCode::DeploymentRunning
            | ErrorCode::DeploymentNotRunning
            | ErrorCode::NoTargets => StatusCode::CONFLICT,
            ErrorCode::Internal | ErrorCode::Store | ErrorCode::PlanUnusable => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            ErrorCode::NodesOffline => StatusCode::BAD_GATEWAY,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::CaInUse => StatusCode::CONFLICT,
            ErrorCode::ArtifactTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::ArtifactMismatch => StatusCode::BAD_REQUEST,
            // Only a newer controller sends a code this one does not know.
            ErrorCode::Other => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// One error type for every route, rendered as `{"error": CODE, "message": TEXT}`
/// (and `"problems": [...]` for an invalid plan).
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: ErrorCode,
    message: String,
    problems: Vec<Problem>,
}

impl ApiError {
    /// An error with `code`'s status.
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status: code.status(),
            code,
            message: message.into(),
            problems: Vec::new(),
        }
    }

    /// 400 `invalid_plan` listing every problem; nothing was stored.
    pub(crate) fn invalid_plan(problems: Vec<Problem>) -> ApiError {
        let first = problems
            .first()
            .map(|p| p.problem.as_str())
            .unwrap_or("no details");
        let message = match problems.len() {
            1 => format!("the plan was not accepted: {first}"),
            n => format!(
                "the plan was not accepted: {n} problems (listed in \"problems\"), the first: {first}"
            ),
        };
        ApiError {
            problems,
            ..ApiError::new(ErrorCode::InvalidPlan, message)
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::BadRequest, message)
    }

    pub(crate) fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::NotFound, message)
    }

    /// 403 `no_plan`: the route works on the stored plan and none was submitted.
    pub(crate) fn no_plan() -> ApiError {
        ApiError::new(ErrorCode::NoPlan, NO_PLAN)
    }

    /// The request is not a WebSocket upgrade: the rejection's status (400,
    /// 405 or 426), code `websocket_required`, and `how` to connect.
    pub(crate) fn websocket_required(rejection: &WebSocketUpgradeRejection, how: &str) -> ApiError {
        ApiError {
            status: rejection.status(),
            ..ApiError::new(
                ErrorCode::WebsocketRequired,
                format!("{how} ({})", rejection.body_text()),
            )
        }
    }

    /// 500 `internal` for a failure outside the domain's errors (a task that
    /// died, the log dir): the chain is logged, the client is told `what`.
    pub(crate) fn internal(what: &str, err: &dyn Error) -> ApiError {
        ApiError::logged(
            ErrorCode::Internal,
            err,
            format!("{what}; see the controller's log"),
        )
    }

    /// A 5xx for `err`: its full chain goes to the log, `message` to the client.
    fn logged(code: ErrorCode, err: &dyn Error, message: String) -> ApiError {
        error!(code = ?code, error = %ErrorChain(err), "request failed");
        ApiError::new(code, message)
    }

    /// 500 `internal` saying what failed at `err`'s own level (its `Display`
    /// never includes its causes; those are logged).
    fn internal_from(err: &dyn Error) -> ApiError {
        ApiError::logged(
            ErrorCode::Internal,
            err,
            format!("{err}; see the controller's log"),
        )
    }
}

impl From<DeployError> for ApiError {
    fn from(e: DeployError) -> ApiError {
        match &e {
            DeployError::NoPlan => ApiError::new(ErrorCode::NoPlan, e.to_string()),
            DeployError::Busy(_) => ApiError::new(ErrorCode::DeploymentRunning, e.to_string()),
            DeployError::Offline(_) => ApiError::new(ErrorCode::NodesOffline, e.to_string()),
            DeployError::Store(_) => ApiError::logged(
                ErrorCode::Store,
                &e,
                format!("{e}; check the controller's data dir and log"),
            ),
            DeployError::NoCatalog(_) | DeployError::Render(_) => {
                ApiError::logged(ErrorCode::PlanUnusable, &e, e.to_string())
            }
            DeployError::NotFound(_) => ApiError::not_found(e.to_string()),
            DeployError::NotRunning { .. } => {
                ApiError::new(ErrorCode::DeploymentNotRunning, e.to_string())
            }
            DeployError::CancelSteps(_) | DeployError::NoRandomness(_) => {
                ApiError::internal_from(&e)
            }
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        ApiError::internal_from(&e)
    }
}

impl From<StepsError> for ApiError {
    fn from(e: StepsError) -> ApiError {
        ApiError::internal_from(&e)
    }
}

impl From<CodesError> for ApiError {
    fn from(e: CodesError) -> ApiError {
        ApiError::internal_from(&e)
    }
}

impl From<TokensError> for ApiError {
    fn from(e: TokensError) -> ApiError {
        match &e {
            TokensError::InvalidName(_) => ApiError::bad_request(e.to_string()),
            TokensError::Exists(_) | TokensError::LastAdmin(_) => {
                ApiError::new(ErrorCode::Conflict, e.to_string())
            }
            TokensError::NotFound(_) => ApiError::not_found(e.to_string()),
            TokensError::NoRandomness(_) | TokensError::Store(_) => ApiError::internal_from(&e),
        }
    }
}

impl From<PkiError> for ApiError {
    fn from(e: PkiError) -> ApiError {
        match &e {
            PkiError::RotationUnderWay => ApiError::new(ErrorCode::CaInUse, e.to_string()),
            _ => ApiError::internal_from(&e),
        }
    }
}

impl From<RotationError> for ApiError {
    fn from(e: RotationError) -> ApiError {
        match e {
            RotationError::Pki(e) => e.into(),
            RotationError::Store(e) => e.into(),
            e @ RotationError::NothingToRetire => ApiError::not_found(e.to_string()),
            e @ RotationError::NodesOnOldCa(_) => ApiError::new(ErrorCode::CaInUse, e.to_string()),
        }
    }
}

impl From<LogFileError> for ApiError {
    fn from(e: LogFileError) -> ApiError {
        match &e {
            LogFileError::InvalidName(_) => ApiError::bad_request(e.to_string()),
            LogFileError::NotFound(_) => ApiError::not_found(e.to_string()),
            LogFileError::Io(..) => ApiError::internal("could not read the log file", &e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.code,
            message: self.message,
            problems: self.problems,
        };
        (self.status, axum::Json(body)).into_response()
    }
}

/// `body` as JSON of type `T`, whatever the request's Content-Type (the
/// original clients send JSON as a form, or with no type); `shape` shows the
/// expected body in the 400 answer.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(
    body: &[u8],
    shape: &str,
) -> Result<T, ApiError> {
    // Every body parsed here is an object: serde would also read a struct
    // from an array of its fields in order (`[null, null]`), which no client
    // means to send. (A body that is not JSON at all keeps serde's message.)
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_some_and(|b| *b != b'{')
        && serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok()
    {
        return Err(ApiError::bad_request(format!(
            "body is not a JSON object; expected {shape}"
        )));
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "body is not valid JSON for this route ({e}); expected {shape}"
        ))
    })
}

/// [`parse_json`] for a route whose body may be left out: `None` when the
/// body is empty or only whitespace.
pub(crate) fn parse_optional_json<T: serde::de::DeserializeOwned>(
    body: &[u8],
    shape: &str,
) -> Result<Option<T>, ApiError> {
    if crate::util::is_blank(body) {
        return Ok(None);
    }
    parse_json(body, shape).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agents::StepsError;
    use http_body_util::BodyExt;

    const API_MD: &str = include_str!("../../../docs/API.md");

    fn code_name(code: ErrorCode) -> String {
        serde_json::to_value(code)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    async fn answer(e: ApiError) -> (StatusCode, serde_json::Value) {
        let resp = e.into_response();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        (status, serde_json::from_slice(&bytes).expect("JSON body"))
    }

    /// A struct is read from an object only, not from an array of its
    /// fields (which serde alone would accept).
    #[tokio::test]
    async fn a_body_that_is_not_an_object_is_refused_naming_the_shape() {
        use de_common::api::NewCode;
        for body in ["[null, null]", " [60]", "null", "\"x\"", "60"] {
            let e = parse_json::<NewCode>(body.as_bytes(), r#"{"ttl_secs": N}"#).expect_err(body);
            let (status, json) = answer(e).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(
                json["message"], r#"body is not a JSON object; expected {"ttl_secs": N}"#,
                "{body}"
            );
        }
        for not_json in ["", "x", "[1"] {
            let e = parse_json::<NewCode>(not_json.as_bytes(), "S").expect_err(not_json);
            let (status, json) = answer(e).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{not_json}");
            let msg = json["message"].as_str().unwrap_or_default();
            assert!(
                msg.starts_with("body is not valid JSON for this route (")
                    && msg.ends_with("); expected S"),
                "{not_json:?}: {msg}"
            );
        }
        let ok: NewCode = parse_json(b" {\"ttl_secs\": 60}", "").expect("an object");
        assert_eq!(ok.ttl_secs, Some(60));
        assert_eq!(parse_optional_json::<NewCode>(b" \n", "").ok(), Some(None));
    }

    #[test]
    fn the_codes_are_the_strings_clients_match_on() {
        let names: Vec<String> = ErrorCode::ALL.into_iter().map(code_name).collect();
        assert_eq!(
            names,
            [
                "bad_request",
                "invalid_plan",
                "websocket_required",
                "unauthorized",
                "no_plan",
                "not_found",
                "conflict",
                "deployment_running",
                "deployment_not_running",
                "no_targets",
                "internal",
                "store",
                "plan_unusable",
                "nodes_offline",
                "forbidden",
                "ca_in_use",
                "artifact_too_large",
                "artifact_mismatch",
            ]
        );
    }

    /// Each code has a row `| `code` | status | meaning |` in docs/API.md's
    /// table, with the status this enum gives it.
    #[test]
    fn every_code_is_listed_in_the_api_doc_with_its_status() {
        for code in ErrorCode::ALL {
            let name = code_name(code);
            let row = API_MD
                .lines()
                .find(|l| l.starts_with(&format!("| `{name}` |")))
                .unwrap_or_else(|| panic!("docs/API.md lists no error code `{name}`"));
            let status = row.split('|').nth(2).unwrap_or_default().trim();
            assert!(
                status.starts_with(code.status().as_str()),
                "docs/API.md gives `{name}` status {status:?}, the code {}",
                code.status().as_str()
            );
        }
    }

    #[tokio::test]
    async fn every_error_has_one_json_shape() {
        let (status, body) = answer(ApiError::no_plan()).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert_eq!(
            body,
            serde_json::json!({"error": "no_plan", "message": NO_PLAN})
        );
        let problem = Problem {
            kind: de_common::api::ProblemKind::MalformedJson,
            component: None,
            ip: None,
            property: None,
            problem: "the body is empty".into(),
            found: None,
            needed: None,
        };
        let (status, body) = answer(ApiError::invalid_plan(vec![problem])).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"], "invalid_plan");
        assert_eq!(
            body["message"],
            "the plan was not accepted: the body is empty"
        );
        assert_eq!(body["problems"][0]["kind"], "malformed_json", "{body}");
    }

    #[tokio::test]
    async fn deploy_errors_map_to_their_codes() {
        let cases = [
            (DeployError::NoPlan, StatusCode::FORBIDDEN, "no_plan"),
            (
                DeployError::Busy("d-1".into()),
                StatusCode::CONFLICT,
                "deployment_running",
            ),
            (
                DeployError::Offline("10.0.0.1".into()),
                StatusCode::BAD_GATEWAY,
                "nodes_offline",
            ),
            (
                DeployError::NoCatalog("webfarm".into()),
                StatusCode::INTERNAL_SERVER_ERROR,
                "plan_unusable",
            ),
            (
                DeployError::Render("nginx: template failed".into()),
                StatusCode::INTERNAL_SERVER_ERROR,
                "plan_unusable",
            ),
        ];
        for (e, status, code) in cases {
            let message = e.to_string();
            let (s, body) = answer(e.into()).await;
            assert_eq!((s, body["error"].as_str()), (status, Some(code)), "{body}");
            assert_eq!(body["message"], message);
        }
    }

    fn engine_failure() -> StoreError {
        StoreError::Corrupt {
            tree: "deployments",
            key: "d-1".into(),
            source: serde_json::from_str::<u8>("x").expect_err("not JSON"),
        }
    }

    /// A 5xx names what failed and points at the log; the causes (paths,
    /// parser positions) stay in the log, and nothing is said twice.
    #[tokio::test]
    async fn a_server_failure_sends_a_short_text_without_its_causes() {
        let (s, body) = answer(DeployError::Store(engine_failure()).into()).await;
        assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(body["error"], "store");
        assert_eq!(
            body["message"],
            "cannot read or write deployments in the store; check the controller's data dir and log"
        );
        let (s, body) = answer(StepsError::from(engine_failure()).into()).await;
        assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(body["error"], "internal");
        assert_eq!(
            body["message"],
            "record \"d-1\" in tree deployments is not valid JSON for this version; see the controller's log"
        );
        let (_, body) = answer(CodesError::from(engine_failure()).into()).await;
        assert_eq!(
            body["message"],
            "could not persist the install code; see the controller's log"
        );
    }

    #[tokio::test]
    async fn log_file_errors_are_a_client_error_unless_the_disk_failed() {
        let cases = [
            (
                LogFileError::InvalidName("../x".into()),
                StatusCode::BAD_REQUEST,
            ),
            (
                LogFileError::NotFound("x.log".into()),
                StatusCode::NOT_FOUND,
            ),
            (
                LogFileError::Io("x.log".into(), std::io::Error::other("disk on fire")),
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
        ];
        for (e, status) in cases {
            let (s, body) = answer(e.into()).await;
            assert_eq!(s, status, "{body}");
            assert!(!body.to_string().contains("disk on fire"), "{body}");
        }
    }

    #[test]
    fn a_blank_body_is_no_body_and_bad_json_names_the_shape() {
        #[derive(Debug, serde::Deserialize)]
        struct Ttl {
            ttl_secs: u64,
        }
        let blank = parse_optional_json::<Ttl>(b" \n", "{}");
        assert!(matches!(blank, Ok(None)), "{blank:?}");
        let given = parse_optional_json::<Ttl>(b"{\"ttl_secs\": 5}", "{}");
        assert!(matches!(given, Ok(Some(Ttl { ttl_secs: 5 }))), "{given:?}");
        let e = parse_optional_json::<Ttl>(b"{\"ttl\": 1}", "{\"ttl_secs\": N}")
            .expect_err("unknown shape");
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(
            e.message.ends_with("expected {\"ttl_secs\": N}"),
            "{}",
            e.message
        );
        assert_eq!(
            e.message.matches("line 1 column").count(),
            1,
            "the position once: {}",
            e.message
        );
    }
}
