//! `/api/v1/artifacts`: upload (the body streamed to disk, hashed as it
//! comes), list, download and delete the files `fetch` steps send to nodes.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use de_common::api::ArtifactView;
use serde::Deserialize;

use super::{ApiError, ErrorCode};
use crate::Controller;
use crate::artifacts::{ArtifactRecord, ArtifactsError};

pub(super) fn routes() -> Router<Arc<Controller>> {
    Router::new()
        .route(
            "/artifacts",
            get(list)
                .post(upload)
                // The body streams to disk; the size is checked against
                // `artifact_max_mb` as it comes.
                .layer(DefaultBodyLimit::disable()),
        )
        .route("/artifacts/{name}", delete(remove).get(download))
}

impl From<ArtifactsError> for ApiError {
    fn from(e: ArtifactsError) -> ApiError {
        match e {
            ArtifactsError::TooBig { .. } => {
                ApiError::new(ErrorCode::ArtifactTooLarge, e.to_string())
            }
            ArtifactsError::HashMismatch { .. } => {
                ApiError::new(ErrorCode::ArtifactMismatch, e.to_string())
            }
            ArtifactsError::BadName(_)
            | ArtifactsError::BadHash(_)
            | ArtifactsError::Body(_)
            | ArtifactsError::BadDeb { .. } => ApiError::bad_request(e.to_string()),
            ArtifactsError::NotFound(_) => ApiError::not_found(e.to_string()),
            ArtifactsError::Io { .. } | ArtifactsError::Store(_) => {
                ApiError::internal("artifact storage failed", &e)
            }
        }
    }
}

fn view(r: ArtifactRecord) -> ArtifactView {
    ArtifactView {
        name: r.name,
        sha256: r.sha256,
        size: r.size,
        uploaded_at: r.uploaded_at,
        deb: r.deb_control.as_deref().map(|c| {
            let field = |f: &str| {
                c.lines()
                    .find_map(|l| l.strip_prefix(&format!("{f}: ")))
                    .unwrap_or_default()
                    .to_owned()
            };
            format!(
                "{} {} {}",
                field("Package"),
                field("Version"),
                field("Architecture")
            )
        }),
    }
}

#[derive(Debug, Deserialize)]
struct UploadQuery {
    name: Option<String>,
    sha256: Option<String>,
}

#[utoipa::path(
    post, path = "/api/v1/artifacts", operation_id = "upload_artifact", tag = "artifacts",
    params(
        ("name" = String, Query, description = "The artifact's name."),
        ("sha256" = Option<String>, Query, description = "The SHA-256 (hex) the body must have.")
    ),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "The file."),
    responses((status = 201, description = "The artifact as stored.", body = ArtifactView))
)]
async fn upload(
    State(ctl): State<Arc<Controller>>,
    Query(q): Query<UploadQuery>,
    body: Body,
) -> Result<(StatusCode, axum::Json<ArtifactView>), ApiError> {
    let name = q.name.ok_or_else(|| {
        ApiError::bad_request(
            "name the artifact: POST /api/v1/artifacts?name=NAME[&sha256=HEX] with the file as the body",
        )
    })?;
    let record = ctl
        .artifacts
        .put(
            &name,
            q.sha256.as_deref(),
            body.into_data_stream(),
            ctl.artifact_max_bytes,
        )
        .await?;
    ctl.logs.record(&format!(
        "artifact {} stored: {} bytes, sha256 {}",
        record.name, record.size, record.sha256
    ));
    Ok((StatusCode::CREATED, axum::Json(view(record))))
}

#[utoipa::path(
    get, path = "/api/v1/artifacts", operation_id = "list_artifacts", tag = "artifacts",
    responses((status = 200, description = "Every artifact, by name.", body = Vec<ArtifactView>))
)]
async fn list(
    State(ctl): State<Arc<Controller>>,
) -> Result<axum::Json<Vec<ArtifactView>>, ApiError> {
    let mut all = ctl
        .artifacts
        .list()
        .map_err(|e| ApiError::internal("cannot list the artifacts", &e))?;
    all.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(axum::Json(all.into_iter().map(view).collect()))
}

#[utoipa::path(
    delete, path = "/api/v1/artifacts/{name}", operation_id = "delete_artifact", tag = "artifacts",
    params(("name" = String, Path, description = "The artifact's name.")),
    responses((status = 200, description = "The artifact that was deleted.", body = ArtifactView))
)]
async fn remove(
    State(ctl): State<Arc<Controller>>,
    Path(name): Path<String>,
) -> Result<axum::Json<ArtifactView>, ApiError> {
    let record = ctl.artifacts.delete(&name)?;
    ctl.logs
        .record(&format!("artifact {} deleted", record.name));
    Ok(axum::Json(view(record)))
}

#[utoipa::path(
    get, path = "/api/v1/artifacts/{name}", operation_id = "download_artifact", tag = "artifacts",
    params(("name" = String, Path, description = "The artifact's name.")),
    responses((status = 200, description = "The file.", body = Vec<u8>, content_type = "application/octet-stream",
        headers(("x-sha256" = String, description = "The file's SHA-256 (hex)."))))
)]
async fn download(
    State(ctl): State<Arc<Controller>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let record = ctl
        .artifacts
        .get(&name)?
        .ok_or_else(|| ArtifactsError::NotFound(name.clone()))?;
    let path = ctl
        .artifacts
        .path_of(&record.sha256)
        .ok_or_else(|| ArtifactsError::NotFound(name.clone()))?;
    let f = tokio::fs::File::open(&path)
        .await
        .map_err(|e| ApiError::internal("cannot read the artifact", &e))?;
    let mut r = Body::from_stream(tokio_util::io::ReaderStream::new(f)).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(v) = HeaderValue::from_str(&record.sha256) {
        r.headers_mut().insert("x-sha256", v);
    }
    Ok(r)
}

/// This module's routes in the OpenAPI document (`openapi.rs` merges them).
#[derive(utoipa::OpenApi)]
#[openapi(paths(upload, list, remove, download))]
pub(super) struct Doc;
