//! The web console: one page (HTML, CSS and a script) compiled into the
//! binary and served at `/`, so a controller in an offline intranet needs
//! nothing from anywhere else. The page signs in with the API token and then
//! uses the same `/api/v1` and `/deployment-engine` routes as `dectl` and
//! scripts do: the console has no routes or powers of its own.
//!
//! Invariant: every console response carries a Content-Security-Policy that
//! allows only this origin's own script, style and connections (no inline
//! script, no framing), so a value shown on a page can never run as code even
//! if some rendering bug let it into the markup.

use std::hash::{Hash, Hasher};
use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

use crate::Controller;

const INDEX_HTML: &str = include_str!("../../console/index.html");
const APP_JS: &str = include_str!("../../console/app.js");
const STYLE_CSS: &str = include_str!("../../console/style.css");
const ICON_SVG: &str = include_str!("../../console/icon.svg");

/// Scripts, styles, images and connections (fetch and the log WebSocket)
/// from this origin only.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// `/` (the console), its assets under `/console/`, and `/favicon.ico`.
pub(crate) fn routes() -> Router<Arc<Controller>> {
    Router::new()
        .route("/", get(index))
        // Relative, so that under a proxy's path prefix they stay under it.
        .route("/console", get(console_redirect))
        .route("/console/", get(console_slash_redirect))
        .route("/console/app.js", get(app_js))
        .route("/console/style.css", get(style_css))
        .route("/favicon.ico", get(favicon))
}

/// The console's page.
#[utoipa::path(
    get, path = "/", tag = "console",
    responses(
        (status = 200, description = "The console's page.", body = String, content_type = "text/html"),
        (status = 304, description = "Not modified (`If-None-Match` named its ETag).")
    )
)]
async fn index(h: HeaderMap) -> Response {
    asset(&h, Asset::Index)
}

/// The console's script.
#[utoipa::path(
    get, path = "/console/app.js", tag = "console",
    responses(
        (status = 200, description = "The console's script.", body = String, content_type = "text/javascript"),
        (status = 304, description = "Not modified (`If-None-Match` named its ETag).")
    )
)]
async fn app_js(h: HeaderMap) -> Response {
    asset(&h, Asset::Script)
}

/// The console's style sheet.
#[utoipa::path(
    get, path = "/console/style.css", tag = "console",
    responses(
        (status = 200, description = "The console's style sheet.", body = String, content_type = "text/css"),
        (status = 304, description = "Not modified (`If-None-Match` named its ETag).")
    )
)]
async fn style_css(h: HeaderMap) -> Response {
    asset(&h, Asset::Style)
}

/// The console's icon.
#[utoipa::path(
    get, path = "/favicon.ico", tag = "console",
    responses(
        (status = 200, description = "The console's icon.", body = String, content_type = "image/svg+xml"),
        (status = 304, description = "Not modified (`If-None-Match` named its ETag).")
    )
)]
async fn favicon(h: HeaderMap) -> Response {
    asset(&h, Asset::Icon)
}

/// `/console` is the console at `/`.
#[utoipa::path(
    get, path = "/console", tag = "console",
    responses((status = 308, description = "To the console, `./`.", headers(("location" = String))))
)]
async fn console_redirect() -> Redirect {
    Redirect::permanent("./")
}

/// `/console/` is the console at `/`.
#[utoipa::path(
    get, path = "/console/", tag = "console",
    responses((status = 308, description = "To the console, `../`.", headers(("location" = String))))
)]
async fn console_slash_redirect() -> Redirect {
    Redirect::permanent("../")
}

/// This module's routes in the OpenAPI document (`openapi.rs` merges them).
#[derive(utoipa::OpenApi)]
#[openapi(paths(
    index,
    app_js,
    style_css,
    favicon,
    console_redirect,
    console_slash_redirect
))]
pub(super) struct Doc;

#[derive(Debug, Clone, Copy)]
enum Asset {
    Index,
    Script,
    Style,
    Icon,
}

impl Asset {
    fn body(self) -> &'static str {
        match self {
            Asset::Index => INDEX_HTML,
            Asset::Script => APP_JS,
            Asset::Style => STYLE_CSS,
            Asset::Icon => ICON_SVG,
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Asset::Index => "text/html; charset=utf-8",
            Asset::Script => "text/javascript; charset=utf-8",
            Asset::Style => "text/css; charset=utf-8",
            Asset::Icon => "image/svg+xml",
        }
    }
}

/// One tag for all assets: they only change with the binary.
fn etag() -> &'static str {
    static ETAG: OnceLock<String> = OnceLock::new();
    ETAG.get_or_init(|| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        env!("CARGO_PKG_VERSION").hash(&mut h);
        for a in [Asset::Index, Asset::Script, Asset::Style, Asset::Icon] {
            a.body().hash(&mut h);
        }
        format!("\"{:016x}\"", h.finish())
    })
}

fn asset(req: &HeaderMap, which: Asset) -> Response {
    let tag = etag();
    let fresh = req
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag));
    let mut resp = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, which.content_type())], which.body()).into_response()
    };
    let h = resp.headers_mut();
    // Revalidate every time (a cheap 304), so an upgraded controller never
    // serves a stale script next to a new page.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(tag) {
        h.insert(header::ETAG, v);
    }
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    async fn get(
        ctl: &Arc<Controller>,
        path: &str,
        etag: Option<&str>,
    ) -> (StatusCode, HeaderMap, String) {
        let mut req = Request::get(path);
        if let Some(t) = etag {
            req = req.header(header::IF_NONE_MATCH, t);
        }
        let resp = crate::http::app(ctl.clone())
            .oneshot(req.body(Body::empty()).expect("request"))
            .await
            .expect("response");
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (status, headers, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn the_console_is_served_without_a_token_and_with_a_strict_policy() {
        let (_dir, ctl) = crate::testkit::controller();
        let (status, headers, body) = get(&ctl, "/", None).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("<script src=\"console/app.js\""), "{body}");
        assert!(!body.contains("<script>"), "no inline script: {body}");
        let csp = headers[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .expect("csp");
        assert!(csp.contains("script-src 'self'"), "{csp}");
        assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
        assert_eq!(headers[header::X_FRAME_OPTIONS], "DENY");

        let (status, headers, body) = get(&ctl, "/console/app.js", None).await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            headers[header::CONTENT_TYPE]
                .to_str()
                .expect("type")
                .starts_with("text/javascript")
        );
        assert!(body.contains("Authorization"), "the script sends the token");
    }

    #[tokio::test]
    async fn an_unchanged_asset_is_answered_not_modified() {
        let (_dir, ctl) = crate::testkit::controller();
        let (_, headers, _) = get(&ctl, "/console/style.css", None).await;
        let tag = headers[header::ETAG].to_str().expect("etag").to_owned();
        let (status, _, body) = get(&ctl, "/console/style.css", Some(&tag)).await;
        assert_eq!(status, StatusCode::NOT_MODIFIED);
        assert!(body.is_empty());
        let (status, _, _) = get(&ctl, "/console/style.css", Some("\"other\"")).await;
        assert_eq!(status, StatusCode::OK);
    }

    #[tokio::test]
    async fn console_paths_redirect_relatively_so_a_proxy_prefix_is_kept() {
        let (_dir, ctl) = crate::testkit::controller();
        for (path, to) in [("/console", "./"), ("/console/", "../")] {
            let (status, headers, _) = get(&ctl, path, None).await;
            assert_eq!(status, StatusCode::PERMANENT_REDIRECT, "{path}");
            assert_eq!(headers[header::LOCATION], to, "{path}");
        }
        // And the page names its assets relatively.
        let (_, _, body) = get(&ctl, "/", None).await;
        assert!(!body.contains("=\"/"), "an absolute path in {body}");
    }

    #[tokio::test]
    async fn the_api_still_needs_the_token() {
        let (_dir, ctl) = crate::testkit::controller();
        let (status, _, body) = get(&ctl, "/api/v1/nodes", None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    }
}
