//! `GET /join.sh` and `GET /packages/{file}`: what a fresh node fetches to
//! join with the one line shown with an install code. No token: a node has
//! none yet; what makes these safe is the pinned HTTPS connection and the
//! SHA-256 of every package written into the script (`agents::join`).
//! Over plain HTTP neither is served: nothing could vouch for them.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::ApiError;
use crate::Controller;
use crate::agents::join::{INSTALL_AGENT, Join};

pub(crate) fn routes() -> Router<Arc<Controller>> {
    Router::new()
        .route("/join.sh", get(join_script))
        .route("/packages/{file}", get(package))
}

fn join_of(ctl: &Controller) -> Result<&Join, ApiError> {
    ctl.join.as_ref().ok_or_else(|| {
        ApiError::not_found(
            "the join script and packages are served only over HTTPS: start the controller with --api-tls (api_tls = true in controller.toml)",
        )
    })
}

fn no_store(mut r: Response, content_type: &'static str) -> Response {
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

#[utoipa::path(
    get, path = "/join.sh", tag = "join",
    responses((status = 200, description = "The script that joins a node (over HTTPS only).", body = String, content_type = "text/x-shellscript"))
)]
async fn join_script(State(ctl): State<Arc<Controller>>) -> Result<Response, ApiError> {
    let join = join_of(&ctl)?;
    let script = join.script(&ctl.agent_addr).ok_or_else(|| {
        ApiError::not_found(
            "this controller has no agent package to offer: put deployment-engine-agent_*.deb in its packages directory (packages_dir) and restart it",
        )
    })?;
    Ok(no_store(
        script.into_response(),
        "text/x-shellscript; charset=utf-8",
    ))
}

#[utoipa::path(
    get, path = "/packages/{file}", tag = "join",
    params(("file" = String, Path, description = "A file `/join.sh` names.")),
    responses((status = 200, description = "The package (or `install-agent.sh`).", content(
        (Vec<u8> = "application/vnd.debian.binary-package"),
        (String = "text/x-shellscript")
    )))
)]
async fn package(
    State(ctl): State<Arc<Controller>>,
    Path(file): Path<String>,
) -> Result<Response, ApiError> {
    let join = join_of(&ctl)?;
    let missing = || {
        ApiError::not_found(format!(
            "no package {file:?} here; /join.sh lists the files this controller offers"
        ))
    };
    let pkg = join.packages.get(&file).ok_or_else(missing)?;
    let Some(path) = &pkg.path else {
        return Ok(no_store(
            INSTALL_AGENT.into_response(),
            "text/x-shellscript; charset=utf-8",
        ));
    };
    // Streamed from disk: join.sh holds the SHA-256 taken at start, so a
    // file changed since is refused by the node.
    let f = tokio::fs::File::open(path).await.map_err(|e| {
        tracing::warn!(path = %path.display(), "a package offered to nodes cannot be read: {e}");
        missing()
    })?;
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(f));
    Ok(no_store(
        body.into_response(),
        "application/vnd.debian.binary-package",
    ))
}

/// This module's routes in the OpenAPI document (`openapi.rs` merges them).
#[derive(utoipa::OpenApi)]
#[openapi(paths(join_script, package))]
pub(super) struct Doc;
