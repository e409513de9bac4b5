//! Enrolment with install codes, nodes online with real hardware, restart and revocation.

use std::time::Duration;

use anyhow::{Context, Result};
use de_common::api::NodeView;
use de_tests::{TestAgent, TestController, wait_until};

const WAIT: Duration = Duration::from_secs(30);

fn this_machine_ram_mb() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .map(|kb| kb / 1024)
        .unwrap_or(0)
}

#[test]
fn three_agents_enrol_come_online_and_return_after_a_controller_restart() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let ctl = TestController::start(&data)?;
    assert!(
        ctl.banner
            .iter()
            .any(|l| l.contains("admin token") && l.contains(&ctl.token)),
        "the token is printed once at first start: {:?}",
        ctl.banner
    );
    let code = ctl.new_code(None)?;
    let mut agents = Vec::new();
    for ip in ["127.0.0.2", "127.0.0.3"] {
        let agent = TestAgent::new(dir.path(), ip)?;
        let out = agent.enroll(&ctl.quic, &code)?;
        assert!(out.status.success(), "enrol {ip}: {}", out.stderr);
        assert!(out.stdout.contains("enrolled as node n-"), "{}", out.stdout);
        agents.push(agent);
    }
    for a in &mut agents {
        a.start(1)?;
    }
    // The systemd path: `run` with a controller and a code enrols first.
    let mut third = TestAgent::new(dir.path(), "127.0.0.4")?;
    third.start_enrolling(&ctl.quic, &code)?;
    agents.push(third);
    let mut ids = Vec::new();
    for a in &agents {
        let node = wait_until(WAIT, &format!("{} online", a.ip), || {
            ctl.node_by_ip(&a.ip).ok().flatten().filter(|n| n.online)
        })?;
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1) as u64;
        assert!(u64::from(node.hardware.cpus) >= cpus, "{node:?}");
        let ram = node.hardware.ram_mb;
        assert!(
            ram > 0 && ram.abs_diff(this_machine_ram_mb()) <= 1,
            "{node:?}"
        );
        assert!(node.hardware.disk_mb > 0, "{node:?}");
        assert_eq!(node.agent_version, env!("CARGO_PKG_VERSION"));
        assert!(node.last_seen.is_some(), "{node:?}");
        ids.push(node.id);
    }
    // Heartbeats bring usage figures.
    wait_until(WAIT, "usage from heartbeats", || {
        ctl.nodes()
            .ok()
            .filter(|ns| ns.len() == 3 && ns.iter().all(|n| n.usage.mem_pct > 0.0))
    })?;
    // Node identity files are private.
    for a in &agents {
        for f in [
            "node.key",
            "node.pem",
            "ca.pem",
            "step-key.pub",
            "agent.json",
        ] {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(a.state_dir.join(f))?.permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
    }

    // Restart the controller on the same ports: the agents come back by themselves.
    let (api, quic) = (ctl.api, ctl.quic);
    let token = ctl.token.clone();
    drop(ctl);
    let ctl = TestController::start_on(&data, &api.to_string(), &quic.to_string())?;
    assert_eq!(ctl.token, token, "the token is reused");
    assert!(
        !ctl.banner.iter().any(|l| l.contains(&token)),
        "the token is not printed again: {:?}",
        ctl.banner
    );
    wait_until(WAIT, "all three back online", || {
        ctl.nodes()
            .ok()
            .filter(|ns| ns.len() == 3 && ns.iter().all(|n| n.online))
    })?;
    let mut after: Vec<String> = ctl.nodes()?.into_iter().map(|n| n.id).collect();
    after.sort();
    ids.sort();
    assert_eq!(after, ids, "same node ids after the restart");

    // A stopped agent goes offline after 3 silent heartbeat intervals.
    let stopped = &mut agents[0];
    let p = stopped.proc.as_mut().context("the first agent runs")?;
    let status = p.terminate(Duration::from_secs(10))?;
    assert!(status.success(), "agent exits cleanly on SIGTERM: {status}");
    wait_until(WAIT, "stopped agent offline", || {
        ctl.node_by_ip("127.0.0.2")
            .ok()
            .flatten()
            .filter(|n| !n.online)
    })?;
    Ok(())
}

fn refused(ctl: &TestController, agent: &TestAgent, code: &str, expect: &str) -> Result<()> {
    let out = agent.enroll(&ctl.quic, code)?;
    assert!(!out.status.success(), "code {code} should be refused");
    assert!(
        out.stderr.contains(expect),
        "expected {expect:?} in: {}",
        out.stderr
    );
    assert_eq!(
        out.stderr.trim().lines().count(),
        1,
        "one line: {}",
        out.stderr
    );
    assert!(
        !agent.state_dir.join("agent.json").exists(),
        "no identity saved"
    );
    Ok(())
}

fn wrong(code: &str) -> String {
    let n: u32 = code.parse().unwrap_or(0);
    format!("{:04}", (n + 1) % 10000)
}

#[test]
fn wrong_expired_ended_and_burned_codes_are_refused_with_the_right_message() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ctl = TestController::start(&dir.path().join("data"))?;
    let a = TestAgent::new(dir.path(), "127.0.0.5")?;

    refused(&ctl, &a, "1234", "no installation is open")?;

    let code = ctl.new_code(None)?;
    refused(&ctl, &a, &wrong(&code), "wrong install code")?;
    refused(&ctl, &a, "12a4", "exactly 4 digits")?;

    // Ended.
    assert_eq!(
        ctl.api("DELETE", "/api/v1/install-codes", None)?.status,
        204
    );
    refused(&ctl, &a, &code, "no installation is open")?;

    // Expired: wait until the controller no longer shows it as active.
    let code = ctl.new_code(Some(1))?;
    wait_until(Duration::from_secs(10), "code to expire", || {
        ctl.api("GET", "/api/v1/install-codes", None)
            .ok()
            .filter(|r| r.status == 404)
    })?;
    refused(&ctl, &a, &code, "expired")?;

    // Burned: five wrong tries (from different addresses, so the rate limit is not what stops them).
    let code = ctl.new_code(None)?;
    for i in 0..5 {
        let other = TestAgent::new(dir.path(), &format!("127.0.1.{}", i + 1))?;
        refused(&ctl, &other, &wrong(&code), "wrong install code")?;
    }
    let b = TestAgent::new(dir.path(), "127.0.0.6")?;
    refused(&ctl, &b, &code, "burned")?;

    // Rate limit: many tries from one address are slowed down.
    let code = ctl.new_code(None)?;
    let c = TestAgent::new(dir.path(), "127.0.0.7")?;
    let mut limited = false;
    for _ in 0..12 {
        let out = c.enroll(&ctl.quic, &wrong(&code))?;
        if out.stderr.contains("too many attempts from this address") {
            limited = true;
            break;
        }
        // Those beyond the burn limit are "burned"; a new code each time keeps the counter low.
        if out.stderr.contains("burned") {
            ctl.new_code(None)?;
        }
    }
    assert!(
        limited,
        "12 quick attempts from one address hit the rate limit"
    );

    // A right code still works from a fresh address.
    let code = ctl.new_code(None)?;
    let ok = TestAgent::new(dir.path(), "127.0.0.8")?;
    let out = ok.enroll(&ctl.quic, &code)?;
    assert!(out.status.success(), "{}", out.stderr);
    Ok(())
}

#[test]
fn unreachable_controller_is_reported() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let a = TestAgent::new(dir.path(), "127.0.0.9")?;
    // A UDP port nothing listens on.
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let addr = sock.local_addr()?;
    drop(sock);
    let out = a.enroll(&addr, "1234")?;
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("cannot reach the controller"),
        "{}",
        out.stderr
    );
    Ok(())
}

#[test]
fn a_revoked_node_is_dropped_and_cannot_reconnect() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ctl = TestController::start(&dir.path().join("data"))?;
    let code = ctl.new_code(None)?;
    let mut a = TestAgent::new(dir.path(), "127.0.0.10")?;
    let out = a.enroll(&ctl.quic, &code)?;
    assert!(out.status.success(), "{}", out.stderr);
    a.start(1)?;
    let node = wait_until(WAIT, "agent online", || {
        ctl.node_by_ip("127.0.0.10")
            .ok()
            .flatten()
            .filter(|n| n.online)
    })?;
    let id = node.id;
    assert_eq!(
        ctl.api("DELETE", &format!("/api/v1/nodes/{id}"), None)?
            .status,
        204
    );
    let node = wait_until(WAIT, "revoked node offline", || {
        ctl.api("GET", &format!("/api/v1/nodes/{id}"), None)
            .ok()
            .and_then(|r| r.expect::<NodeView>(200).ok())
            .filter(|n| !n.online)
    })?;
    assert!(node.revoked, "{node:?}");
    // The agent keeps trying and is refused every time, and says why.
    wait_until(WAIT, "agent to report the revocation", || {
        a.log_text().contains("revoked this node").then_some(())
    })?;
    let before = a.log_text().matches("revoked this node").count();
    wait_until(WAIT, "a second refused reconnect", || {
        (a.log_text().matches("revoked this node").count() > before).then_some(())
    })?;
    let node: NodeView = ctl
        .api("GET", &format!("/api/v1/nodes/{id}"), None)?
        .expect(200)?;
    assert!(!node.online, "{node:?}");
    Ok(())
}

#[test]
fn the_api_needs_a_token() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ctl = TestController::start(&dir.path().join("data"))?;
    for (method, path) in [
        ("GET", "/api/v1/nodes"),
        ("POST", "/api/v1/install-codes"),
        ("GET", "/api/v1/install-codes"),
        ("DELETE", "/api/v1/install-codes"),
        ("DELETE", "/api/v1/nodes/n-1"),
    ] {
        let a = ctl.request(method, path, None, None)?;
        assert_eq!(a.status, 401, "{method} {path}");
        assert_eq!(a.body["error"], "unauthorized", "{method} {path}");
        let a = ctl.request(method, path, Some("not-the-token"), None)?;
        assert_eq!(a.status, 401, "{method} {path} with a wrong token");
    }
    assert_eq!(ctl.request("GET", "/healthz", None, None)?.status, 200);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(ctl.data_dir.join("admin.token"))?
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    Ok(())
}
