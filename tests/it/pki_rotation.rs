//! Keys that change without re-enrolment: node certificates renewed over
//! the link (also across a controller restart), the step key and the CA
//! rotated, and a cloned node identity refused and shown instead of two
//! machines taking the link in turn. Addresses 127.0.19.x only.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use de_common::api::{ExecRequest, NodeView, PkiView};
use de_tests::{TestAgent, TestController, command, wait_until};

/// A controller on 127.0.19.1 whose node certificates last `cert_secs`
/// (the test-only knob), on `quic` (a fixed address, so agents find it
/// again after a restart).
fn controller(data: &Path, quic: &str, cert_secs: Option<u64>) -> Result<TestController> {
    let mut cmd = command("de-controller");
    cmd.args([
        "serve",
        "--api-listen",
        "127.0.19.1:0",
        "--quic-listen",
        quic,
    ])
    .arg("--data-dir")
    .arg(data);
    if let Some(secs) = cert_secs {
        cmd.args(["--test-node-cert-secs", &secs.to_string()]);
    }
    TestController::start_cmd(data, cmd)
}

fn enrolled(ctl: &TestController, dir: &Path, ip: &str) -> Result<TestAgent> {
    let code = ctl.new_code(None)?;
    let mut a = TestAgent::new(dir, ip)?;
    let out = a.enroll(&ctl.quic, &code)?;
    if !out.status.success() {
        bail!("enrol {ip}: {}", out.stderr);
    }
    a.start(1)?;
    online(ctl, &a.node_id()?)?;
    Ok(a)
}

fn node(ctl: &TestController, id: &str) -> Result<NodeView> {
    ctl.api("GET", &format!("/api/v1/nodes/{id}"), None)?
        .expect(200)
}

fn online(ctl: &TestController, id: &str) -> Result<NodeView> {
    wait_until(Duration::from_secs(30), &format!("{id} online"), || {
        node(ctl, id).ok().filter(|n| n.online)
    })
}

/// Runs `echo` on the node and checks it answered.
fn works(ctl: &TestController, ip: &str) -> Result<()> {
    let results = ctl.exec(&ExecRequest {
        script: format!("echo ran on {ip}"),
        targets: Some(vec![ip.to_owned()]),
        timeout_secs: Some(20),
        user: None,
    })?;
    let r = results.first().context("no result")?;
    if r.exit_code != Some(0) || !r.stdout.contains(&format!("ran on {ip}")) {
        bail!("exec on {ip}: {r:?}");
    }
    Ok(())
}

fn pki(ctl: &TestController, method: &str, what: &str) -> Result<PkiView> {
    let path = if what.is_empty() {
        "/api/v1/pki".to_owned()
    } else {
        format!("/api/v1/pki/{what}")
    };
    ctl.api(method, &path, None)?.expect(200)
}

/// The node's certificate end, once it differs from `before`.
fn renewed(ctl: &TestController, id: &str, before: &str, limit: Duration) -> Result<String> {
    wait_until(limit, &format!("{id}'s certificate renewed"), || {
        node(ctl, id)
            .ok()
            .and_then(|n| n.cert_not_after)
            .filter(|c| c != before)
    })
}

#[test]
fn certificates_renew_over_the_link_and_across_a_controller_restart() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let ctl = controller(&data, "127.0.19.1:0", Some(30))?;
    let a = enrolled(&ctl, dir.path(), "127.0.19.2")?;
    let id = a.node_id()?;
    let first = node(&ctl, &id)?
        .cert_not_after
        .context("the enrolled node shows its certificate's end")?;
    let pem = std::fs::read_to_string(a.state_dir.join("node.pem"))?;
    // 30 s certificates are due after about 20 s: the agent renews on its own.
    let second = renewed(&ctl, &id, &first, Duration::from_secs(60))?;
    assert!(second > first, "{first} -> {second}");
    // The controller records the new end when it issues the certificate;
    // the agent puts it on disk just after.
    wait_until(
        Duration::from_secs(30),
        "the new certificate on the node's disk",
        || {
            std::fs::read_to_string(a.state_dir.join("node.pem"))
                .ok()
                .filter(|now| *now != pem)
        },
    )?;
    online(&ctl, &id)?;
    works(&ctl, "127.0.19.2")?;

    // The controller restarts on the same address; the node keeps renewing.
    let quic = ctl.quic.to_string();
    drop(ctl);
    let ctl = controller(&data, &quic, Some(30))?;
    online(&ctl, &id)?;
    let third = renewed(&ctl, &id, &second, Duration::from_secs(60))?;
    assert!(third > second, "{second} -> {third}");
    works(&ctl, "127.0.19.2")?;
    assert_eq!(a.node_id()?, id, "no re-enrolment");
    assert!(
        a.log_text().contains("certificate renewed"),
        "{}",
        a.log_text()
    );
    Ok(())
}

/// Queues `echo` on the node (the agent may be stopped), returning the step id.
fn queue(ctl: &TestController, id: &str, text: &str) -> Result<String> {
    let body = serde_json::json!({
        "action": {"Script": {"script": format!("echo {text}"), "user": null, "env": [], "timeout_secs": 20}},
        "lane": "Adhoc",
        "wait_secs": 0,
    });
    let a = ctl.api(
        "POST",
        &format!("/api/v1/nodes/{id}/steps"),
        Some(&body.to_string()),
    )?;
    if a.status != 202 && a.status != 200 {
        bail!("queue: HTTP {} {}", a.status, a.body);
    }
    Ok(a.body["step"]["id"].as_str().context("step id")?.to_owned())
}

/// The step's record once it is final.
fn ended(ctl: &TestController, step: &str) -> Result<serde_json::Value> {
    wait_until(
        Duration::from_secs(60),
        &format!("step {step} ended"),
        || {
            ctl.api("GET", &format!("/api/v1/steps/{step}"), None)
                .ok()
                .map(|a| a.body)
                .filter(|b| {
                    ["done", "failed", "refused", "cancelled"]
                        .contains(&b["state"].as_str().unwrap_or(""))
                })
        },
    )
}

#[test]
fn steps_queued_before_a_step_key_rotation_run_and_a_retired_key_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ctl = controller(&dir.path().join("data"), "127.0.19.1:0", None)?;
    let mut a = enrolled(&ctl, dir.path(), "127.0.19.3")?;
    let id = a.node_id()?;
    let key = |a: &TestAgent| std::fs::read(a.state_dir.join("step-key.pub"));
    let first_key = key(&a)?;

    // Signed with the old key while the agent is away; it runs after the rotation.
    a.proc
        .as_mut()
        .context("agent")?
        .terminate(Duration::from_secs(20))?;
    let old = queue(&ctl, &id, "old-key")?;
    let k = pki(&ctl, "POST", "rotate-step-key")?;
    assert!(k.previous_step_key.is_some(), "{k:?}");
    a.start(1)?;
    let rec = ended(&ctl, &old)?;
    assert_eq!(rec["state"], "done", "{rec}");
    wait_until(
        Duration::from_secs(20),
        "the agent stores the new key",
        || key(&a).ok().filter(|k| *k != first_key),
    )?;
    works(&ctl, "127.0.19.3")?;

    // A step signed with a key two rotations back is refused.
    a.proc
        .as_mut()
        .context("agent")?
        .terminate(Duration::from_secs(20))?;
    let stale = queue(&ctl, &id, "retired-key")?;
    pki(&ctl, "POST", "rotate-step-key")?;
    pki(&ctl, "POST", "rotate-step-key")?;
    a.start(1)?;
    let rec = ended(&ctl, &stale)?;
    assert_eq!(rec["state"], "refused", "{rec}");
    assert!(
        rec["refusal"]
            .as_str()
            .is_some_and(|r| r.contains("signature does not verify")),
        "refused for its signature: {rec}"
    );
    online(&ctl, &id)?;
    works(&ctl, "127.0.19.3")?;
    // Only an admin rotates.
    let t: de_common::api::TokenCreated = ctl
        .api(
            "POST",
            "/api/v1/tokens",
            Some(r#"{"name": "ops", "role": "operator"}"#),
        )?
        .expect(201)?;
    let a = ctl.request("POST", "/api/v1/pki/rotate-step-key", Some(&t.token), None)?;
    assert_eq!(a.status, 403, "{}", a.body);
    Ok(())
}

#[test]
fn a_ca_rotation_keeps_the_links_and_nodes_renew_before_the_old_ca_is_retired() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let ctl = controller(&data, "127.0.19.1:0", None)?;
    let a = enrolled(&ctl, dir.path(), "127.0.19.4")?;
    let id = a.node_id()?;
    let before = std::fs::read_to_string(a.state_dir.join("node.pem"))?;

    let k = pki(&ctl, "POST", "rotate-ca")?;
    assert!(k.previous_ca.is_some(), "{k:?}");
    let bundle = std::fs::read_to_string(data.join("ca.pem"))?;
    assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 2, "{bundle}");
    // A second rotation waits for the first to end.
    let again = ctl.api("POST", "/api/v1/pki/rotate-ca", None)?;
    assert_eq!(
        (again.status, again.body["error"].as_str()),
        (409, Some("ca_in_use"))
    );
    // The node reconnects, learns both CAs and renews from the new one.
    wait_until(
        Duration::from_secs(60),
        "the node renewed from the new CA",
        || {
            pki(&ctl, "GET", "")
                .ok()
                .filter(|k| k.nodes_on_previous_ca.is_empty())
        },
    )?;
    // The node holds a new certificate (its end may fall in the same second
    // as the old one's: the file tells them apart).
    wait_until(
        Duration::from_secs(30),
        "the renewed certificate on the node's disk",
        || {
            std::fs::read_to_string(a.state_dir.join("node.pem"))
                .ok()
                .filter(|now| *now != before)
        },
    )?;
    online(&ctl, &id)?;
    works(&ctl, "127.0.19.4")?;

    let k = pki(&ctl, "POST", "retire-old-ca")?;
    assert!(k.previous_ca.is_none(), "{k:?}");
    let bundle = std::fs::read_to_string(data.join("ca.pem"))?;
    assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 1, "{bundle}");
    // The agent now meets a server certificate of the new CA only.
    wait_until(
        Duration::from_secs(30),
        "the agent stores the new CA only",
        || {
            std::fs::read_to_string(a.state_dir.join("ca.pem"))
                .ok()
                .filter(|p| *p == bundle)
        },
    )?;
    online(&ctl, &id)?;
    works(&ctl, "127.0.19.4")?;
    assert_eq!(a.node_id()?, id, "no re-enrolment");
    let nothing = ctl.api("POST", "/api/v1/pki/retire-old-ca", None)?;
    assert_eq!(nothing.status, 404, "{}", nothing.body);
    Ok(())
}

#[test]
fn a_cloned_identity_is_refused_shown_and_does_not_take_the_link_in_turn() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ctl = controller(&dir.path().join("data"), "127.0.19.1:0", None)?;
    let a = enrolled(&ctl, dir.path(), "127.0.19.5")?;
    let id = a.node_id()?;
    // NAT allowed, so the address check alone would let the clone in.
    ctl.api(
        "PUT",
        &format!("/api/v1/nodes/{id}"),
        Some(r#"{"allow_nat": true}"#),
    )?
    .expect::<NodeView>(200)?;
    online(&ctl, &id)?;

    // The clone: a copy of the state dir on a machine with another address.
    let mut b = TestAgent::new(dir.path(), "127.0.19.6")?;
    std::fs::create_dir_all(&b.state_dir)?;
    for e in std::fs::read_dir(&a.state_dir)? {
        let e = e?;
        // The identity is in files; the artifact cache (a directory) is not needed.
        if e.file_type()?.is_file() {
            std::fs::copy(e.path(), b.state_dir.join(e.file_name()))?;
        }
    }
    let meta = std::fs::read_to_string(b.state_dir.join("agent.json"))?
        .replace("127.0.19.5", "127.0.19.6");
    std::fs::write(b.state_dir.join("agent.json"), meta)?;
    b.start(1)?;

    let conflict = wait_until(Duration::from_secs(30), "the conflict shown", || {
        node(&ctl, &id).ok().and_then(|n| n.identity_conflict)
    })?;
    assert_eq!(conflict.holder.address, "127.0.19.5", "{conflict:?}");
    assert_eq!(conflict.refused.address, "127.0.19.6", "{conflict:?}");
    assert_ne!(conflict.holder.machine, conflict.refused.machine);
    wait_until(Duration::from_secs(20), "the clone logs the fix", || {
        b.log_text()
            .contains("remove its state dir and enrol it again")
            .then_some(())
    })?;
    // For a while the holder keeps the link: never replaced, always online.
    let links = |a: &TestAgent| a.log_text().matches("controller_version").count();
    let held = links(&a);
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        let n = node(&ctl, &id)?;
        assert!(n.online, "{n:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(
        links(&a),
        held,
        "the holder was not replaced: {}",
        a.log_text()
    );
    assert!(
        !b.log_text().contains("controller_version"),
        "the clone linked"
    );
    assert!(!a.log_text().contains("refused"), "{}", a.log_text());
    works(&ctl, "127.0.19.5")?;
    // The holder stops: the clone still does not get the link.
    drop(a);
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        assert!(
            !b.log_text().contains("controller_version"),
            "the clone linked"
        );
        assert!(node(&ctl, &id)?.identity_conflict.is_some());
        std::thread::sleep(Duration::from_millis(500));
    }
    let local = std::fs::read_to_string(ctl.data_dir.join("logs/local.log"))?;
    assert!(local.contains("another machine holds the link"), "{local}");
    Ok(())
}
