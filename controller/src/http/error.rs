//! The HTTP error layer: one [`ApiError`] for every route, one JSON shape
//! (`{"error", "message"}`, plus `"problems"` for an invalid plan).

use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use de_common::api::ErrorBody;
use tracing::error;

use crate::plan::Problem;

/// One error type for every route, rendered as `{"error": CODE, "message": TEXT}`
/// (and `"problems": [...]` for an invalid plan).
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    problems: Vec<Problem>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            problems: Vec::new(),
        }
    }

    /// 400 `invalid_plan` listing every problem; nothing was stored.
    pub fn invalid_plan(problems: Vec<Problem>) -> ApiError {
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
            ..ApiError::new(StatusCode::BAD_REQUEST, "invalid_plan", message)
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// A server-side failure: the full chain is logged, the client gets a short text.
    pub fn internal(what: &str, err: &(dyn std::error::Error + 'static)) -> ApiError {
        let mut chain = err.to_string();
        let mut src = err.source();
        while let Some(s) = src {
            chain.push_str(": ");
            chain.push_str(&s.to_string());
            src = s.source();
        }
        error!(error = %chain, "{what}");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("{what}; see the controller's log"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.code.to_owned(),
            message: self.message,
            problems: self.problems,
        };
        (self.status, axum::Json(body)).into_response()
    }
}

pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(
    body: &Bytes,
    shape: &str,
) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "body is not valid JSON for this route at line {} column {} ({e}); expected {shape}",
            e.line(),
            e.column()
        ))
    })
}
