//! Test helpers shared by the unit tests: enrolled nodes and plans without a store.

use std::collections::BTreeMap;

use de_common::{Hardware, Usage};

use crate::agents::nodes::NodeView;
use crate::plan::{Plan, Properties, Secret};

/// An online, enrolled node with one IP and the given hardware (MB).
pub(crate) fn node(id: &str, ip: &str, cpus: u32, ram_mb: u64, disk_mb: u64) -> NodeView {
    NodeView {
        id: id.to_owned(),
        hostname: format!("host-{id}"),
        ips: vec![ip.to_owned()],
        hardware: Hardware {
            cpus,
            ram_mb,
            disk_mb,
        },
        usage: Usage::default(),
        online: true,
        last_seen: None,
        agent_version: "test".to_owned(),
        enrolled_at: "2026-01-01T00:00:00Z".to_owned(),
        revoked: false,
        root: format!("/tmp/de-test/{id}"),
        components: Vec::new(),
        clock_skew_secs: None,
        allow_nat: false,
        source_ip: None,
        ip_mismatch: None,
        cert_not_after: None,
        identity_conflict: None,
    }
}

/// A plan of `catalog` with `components`, the original example's properties.
pub(crate) fn plan(catalog: &str, components: &[(&str, &[&str])]) -> Plan {
    Plan {
        components: components
            .iter()
            .map(|(c, ips)| {
                (
                    (*c).to_owned(),
                    ips.iter().map(|i| (*i).to_owned()).collect(),
                )
            })
            .collect(),
        properties: Properties {
            domain: "cf.local".to_owned(),
            home: Some("10.0.0.250".to_owned()),
            disksize: Some(15),
            checkdisk: true,
            adduser: true,
            user: Some("vcap".to_owned()),
            password: Some(Secret::new("pass'word")),
            root: Some(Secret::new("123456")),
            catalog: catalog.to_owned(),
            extra: BTreeMap::new(),
        },
        rollout: BTreeMap::new(),
    }
}

/// A controller on a fresh data dir.
pub(crate) fn controller() -> (tempfile::TempDir, std::sync::Arc<crate::Controller>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ctl, _) = crate::Controller::open(dir.path()).expect("open");
    (dir, std::sync::Arc::new(ctl))
}

/// Records an enrolled node (no live link) with one IP.
pub(crate) fn enrol(
    ctl: &crate::Controller,
    id: &str,
    ip: &str,
    cpus: u32,
    ram_mb: u64,
    disk_mb: u64,
) {
    ctl.nodes
        .enrolled(record(id, ip, cpus, ram_mb, disk_mb))
        .expect("enrol");
}

/// The record of an enrolled node with one IP.
pub(crate) fn record(
    id: &str,
    ip: &str,
    cpus: u32,
    ram_mb: u64,
    disk_mb: u64,
) -> crate::agents::nodes::NodeRecord {
    crate::agents::nodes::NodeRecord {
        id: id.into(),
        hostname: format!("host-{id}"),
        ips: vec![ip.to_owned()],
        hardware: Hardware {
            cpus,
            ram_mb,
            disk_mb,
        },
        agent_version: "test".to_owned(),
        enrolled_at: "2026-01-01T00:00:00Z".to_owned(),
        revoked: false,
        last_seen: None,
        root: "/".to_owned(),
        allow_nat: false,
        cert_not_after: None,
        cert_ca: None,
        identity_conflict: None,
    }
}

/// One request through `api::app` (oneshot); the answer's status and JSON body
/// (a string when the body is not JSON, null when empty).
pub(crate) async fn call(
    ctl: &std::sync::Arc<crate::Controller>,
    method: &str,
    uri: &str,
    token: Option<&str>,
    content_type: Option<&str>,
    body: &str,
) -> (axum::http::StatusCode, serde_json::Value) {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let mut req = axum::http::Request::builder().method(method).uri(uri);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    if let Some(c) = content_type {
        req = req.header("content-type", c);
    }
    let resp = crate::http::app(ctl.clone())
        .oneshot(
            req.body(axum::body::Body::from(body.to_owned()))
                .expect("request"),
        )
        .await
        .expect("response");
    let status = resp.status();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    let json = if bytes.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&bytes).into()))
    };
    (status, json)
}

/// The original example JSON with its IPs moved onto 10.0.0.1-3 (round robin).
pub(crate) fn seed_json() -> String {
    let mut text = include_str!("../../tests/fixtures/seed-config-example.json")
        .replace("\"10.10.101.180\"", "\"10.0.0.250\"");
    for i in 181..=199 {
        text = text.replace(
            &format!("\"10.10.101.{i}\""),
            &format!("\"10.0.0.{}\"", (i - 181) % 3 + 1),
        );
    }
    text
}

/// Reopens something backed by a sled store that this process has just
/// closed. sled lets go of its file lock only when its background flusher
/// drops the last handle, which on a loaded machine can be a moment after the
/// `Db` itself is dropped ("could not acquire lock ... WouldBlock"). Retries
/// while that is the error, for at most 10 s; any other error fails at once.
pub(crate) fn reopen<T, E: std::fmt::Debug>(mut open: impl FnMut() -> Result<T, E>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match open() {
            Ok(v) => return v,
            Err(e) => {
                let text = format!("{e:?}");
                if !text.contains("could not acquire lock") || std::time::Instant::now() > deadline
                {
                    panic!("reopen: {text}");
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
}
