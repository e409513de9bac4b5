//! Named API tokens with roles through the real binaries (127.0.16.x): a
//! read-only token reads but may not exec, an operator's exec is in the
//! audit log under its name, a revoked token is refused, before and after
//! a restart; `dectl tokens` creates, lists and revokes.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use de_common::api::{AuditAction, AuditEntry, ExecRequest, ExecResult, NodeView};
use de_tests::{Output, TestController, bin, cluster, run_bounded};

fn dectl(ctl: &TestController, args: &[&str]) -> Result<Output> {
    let mut cmd = Command::new(bin("dectl"));
    cmd.arg("--controller")
        .arg(format!("http://{}", ctl.api))
        .arg("--token-file")
        .arg(ctl.data_dir.join("admin.token"))
        .args(args);
    run_bounded(cmd, Duration::from_secs(60))
}

/// `dectl tokens create NAME --role ROLE`: the token, printed once on stdout.
fn create(ctl: &TestController, name: &str, role: &str) -> Result<String> {
    let o = dectl(ctl, &["tokens", "create", name, "--role", role])?;
    anyhow::ensure!(o.status.success(), "create {name}: {}", o.stderr);
    assert!(o.stderr.contains("shown only this once"), "{}", o.stderr);
    Ok(o.stdout.trim().to_owned())
}

fn exec_body(node: &str) -> Result<String> {
    Ok(serde_json::to_string(&ExecRequest {
        script: "echo audited".to_owned(),
        targets: Some(vec![node.to_owned()]),
        timeout_secs: Some(30),
        user: None,
    })?)
}

#[test]
fn roles_limit_tokens_the_audit_names_who_asked_and_revocation_holds() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (mut ctl, _agents) = cluster(dir.path(), &["127.0.16.1"], false)?;
    let node = ctl
        .node_by_ip("127.0.16.1")?
        .context("the enrolled node")?
        .id;

    let viewer = create(&ctl, "viewer", "read-only")?;
    let ops = create(&ctl, "ops", "operator")?;
    assert_eq!(viewer.len(), 64);
    assert_ne!(viewer, ops);

    // read-only: reads nodes, may not exec, and is told which role can.
    let nodes: Vec<NodeView> = ctl
        .request("GET", "/api/v1/nodes", Some(&viewer), None)?
        .expect(200)?;
    assert_eq!(nodes.len(), 1);
    let refused = ctl.request(
        "POST",
        "/api/v1/exec",
        Some(&viewer),
        Some(&exec_body(&node)?),
    )?;
    assert_eq!(refused.status, 403, "{}", refused.body);
    assert_eq!(refused.body["error"], "forbidden");
    let msg = refused.body["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("needs the operator role") && msg.contains("viewer"),
        "{msg}"
    );

    // operator: runs it, and the audit log says it was "ops" on that node.
    let ran: Vec<ExecResult> = ctl
        .request("POST", "/api/v1/exec", Some(&ops), Some(&exec_body(&node)?))?
        .expect(200)?;
    assert_eq!(ran[0].stdout.trim(), "audited", "{ran:?}");
    let denied = ctl.request("GET", "/api/v1/audit", Some(&ops), None)?;
    assert_eq!(denied.status, 403, "the audit log is for admins");
    let audit: Vec<AuditEntry> = ctl.api("GET", "/api/v1/audit", None)?.expect(200)?;
    let newest = audit.first().context("an audit entry")?;
    assert_eq!(
        (newest.token.as_str(), newest.action, &newest.targets),
        ("ops", AuditAction::Exec, &vec![node.clone()])
    );
    assert_eq!(newest.detail, "echo audited");
    assert_eq!(
        audit
            .iter()
            .filter(|e| e.action == AuditAction::Exec)
            .count(),
        1,
        "the refused exec is not in the log: {audit:?}"
    );
    let local = std::fs::read_to_string(ctl.data_dir.join("logs/local.log"))?;
    assert!(
        local.contains(&format!(
            "audit: token \"ops\" asked exec on [{node}]: echo audited"
        )),
        "{local}"
    );
    assert!(
        !local.contains(&ops) && !local.contains(&viewer),
        "no token in local.log"
    );

    // dectl lists names and roles, never the tokens.
    let o = dectl(&ctl, &["tokens", "list"])?;
    assert!(o.status.success(), "{}", o.stderr);
    for (name, role) in [
        ("admin", "admin"),
        ("ops", "operator"),
        ("viewer", "read-only"),
    ] {
        assert!(
            o.stdout
                .lines()
                .any(|l| l.split_whitespace().take(2).eq([name, role])),
            "{name} {role} in:\n{}",
            o.stdout
        );
    }
    assert!(!o.stdout.contains(&ops) && !o.stdout.contains(&viewer));

    // Revoked: 401 at once, and still after a restart; the others still work.
    let o = dectl(&ctl, &["tokens", "revoke", "ops"])?;
    assert!(o.status.success(), "{}", o.stderr);
    let gone = ctl.request("GET", "/api/v1/nodes", Some(&ops), None)?;
    assert_eq!(
        (gone.status, &gone.body["error"]),
        (401, &"unauthorized".into())
    );
    ctl.proc.terminate(Duration::from_secs(30))?;
    let data = ctl.data_dir.clone();
    drop(ctl);
    let ctl = TestController::start(&data)?;
    assert_eq!(
        ctl.request("GET", "/api/v1/nodes", Some(&ops), None)?
            .status,
        401
    );
    assert_eq!(
        ctl.request("GET", "/api/v1/nodes", Some(&viewer), None)?
            .status,
        200
    );
    assert_eq!(
        ctl.api("GET", "/api/v1/tokens", None)?.status,
        200,
        "admin.token still admin"
    );
    let o = dectl(&ctl, &["tokens", "revoke", "ops"])?;
    assert!(
        !o.status.success() && o.stderr.contains("no token named"),
        "{}",
        o.stderr
    );
    Ok(())
}
