//! Components under a real private monit per agent: start, stop, restart,
//! and monit restarting a component killed from outside.

use std::time::Duration;

use anyhow::{Context, Result};
use de_common::api::{ComponentStatus, NodeView, StepRecordView, StepRequest, StepState};
use de_common::{MonitOp, StepAction};
use de_tests::{TestController, cluster, process_alive, wait_until};

const WAIT: Duration = Duration::from_secs(60);

/// Runs one raw step on `node` and waits for it; it must succeed.
fn step(ctl: &TestController, node: &str, action: StepAction) -> Result<StepRecordView> {
    let req = StepRequest {
        action,
        lane: None,
        wait_secs: Some(60),
    };
    let a = ctl.api(
        "POST",
        &format!("/api/v1/nodes/{node}/steps"),
        Some(&serde_json::to_string(&req)?),
    )?;
    let rec: StepRecordView = a.expect(200)?;
    assert_eq!(rec.state, StepState::Done, "{rec:?}");
    Ok(rec)
}

fn monit(name: &str, op: MonitOp) -> StepAction {
    StepAction::Monit {
        name: name.to_owned(),
        op,
    }
}

/// The component `name` as the node reports it; `Ok(None)` only when the
/// controller answered and the node has no such component.
fn component_of(ctl: &TestController, node: &str, name: &str) -> Result<Option<ComponentStatus>> {
    let n: NodeView = ctl
        .api("GET", &format!("/api/v1/nodes/{node}"), None)?
        .expect(200)?;
    Ok(n.components.into_iter().find(|c| c.name == name))
}

/// The component, or `None` when it is missing or the controller did not answer.
fn component(ctl: &TestController, node: &str, name: &str) -> Option<ComponentStatus> {
    component_of(ctl, node, name).ok().flatten()
}

fn wait_status(
    ctl: &TestController,
    node: &str,
    name: &str,
    status: &str,
) -> Result<ComponentStatus> {
    wait_until(WAIT, &format!("{name} {status}"), || {
        component(ctl, node, name).filter(|c| c.status == status)
    })
}

/// Installs the check of `sleeper` (a `sleep` with its pidfile under
/// `root`) on `node`; returns the pidfile.
fn add_sleeper(
    ctl: &TestController,
    node: &str,
    root: &std::path::Path,
) -> Result<std::path::PathBuf> {
    let pidfile = root.join("run/sleeper.pid");
    let check = format!(
        "check process sleeper with pidfile {pid}\n  \
         start program = \"/bin/sh -c 'mkdir -p {run}; nohup sleep 1000 >/dev/null 2>&1 & echo $! > {pid}'\"\n  \
         stop program = \"/bin/sh -c 'kill $(cat {pid})'\"\n",
        pid = pidfile.display(),
        run = root.join("run").display()
    );
    step(
        ctl,
        node,
        StepAction::MonitAdd {
            name: "sleeper".to_owned(),
            check,
        },
    )?;
    Ok(pidfile)
}

#[test]
fn components_run_under_monit_and_obey_start_stop_restart() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (ctl, agents) = cluster(dir.path(), &["127.0.4.1"], true)?;
    let agent = &agents[0];
    let node = agent.node_id()?;
    let root = std::fs::canonicalize(&agent.root)?;
    let pidfile = add_sleeper(&ctl, &node, &root)?;
    step(&ctl, &node, monit("sleeper", MonitOp::Start))?;
    let running = wait_status(&ctl, &node, "sleeper", "RUNNING")?;
    let pid = running.pid.context("pid")?;
    assert_eq!(std::fs::read_to_string(&pidfile)?.trim(), pid.to_string());

    step(&ctl, &node, monit("sleeper", MonitOp::Stop))?;
    wait_status(&ctl, &node, "sleeper", "STOPPED")?;
    wait_until(WAIT, "the stopped process to be gone", || {
        (!process_alive(pid)).then_some(())
    })?;

    step(&ctl, &node, monit("sleeper", MonitOp::Start))?;
    let first = wait_status(&ctl, &node, "sleeper", "RUNNING")?.pid;
    step(&ctl, &node, monit("sleeper", MonitOp::Restart))?;
    let restarted = wait_until(WAIT, "a new pid after restart", || {
        component(&ctl, &node, "sleeper").filter(|c| c.status == "RUNNING" && c.pid != first)
    })?;

    // Killed from outside: monit notices and starts it again.
    let victim = restarted.pid.context("pid")?;
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &victim.to_string()])
        .status()?;
    assert!(killed.success(), "kill -KILL {victim}: {killed}");
    let revived = wait_until(WAIT, "monit to restart the killed component", || {
        component(&ctl, &node, "sleeper")
            .filter(|c| c.status == "RUNNING" && c.pid.is_some_and(|p| p != victim))
    })?;
    // Its pid, read before the removal: once the removal is done, the next
    // heartbeat may already report the component gone.
    let last = revived.pid.context("the pid before the removal")?;

    // Removing the check stops it and it disappears from the node's components.
    step(
        &ctl,
        &node,
        StepAction::MonitRemove {
            name: "sleeper".to_owned(),
        },
    )?;
    wait_until(WAIT, "sleeper gone", || {
        matches!(component_of(&ctl, &node, "sleeper"), Ok(None)).then_some(())
    })?;
    wait_until(WAIT, "the removed component's process to be gone", || {
        (!process_alive(last)).then_some(())
    })?;
    Ok(())
}

/// An operator's monit whose HTTP interface is a TCP port with a password
/// (as Debian's commented example has it), given to the agent as is: the
/// agent reads status and drives it through that port and password.
#[test]
fn a_monit_on_a_tcp_port_with_a_password_is_used_as_it_is() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ip = "127.0.21.1";
    let mdir = dir.path().join(format!("agent-{ip}/monit"));
    std::fs::create_dir_all(mdir.join("conf.d"))?;
    let port = std::net::TcpListener::bind(format!("{ip}:0"))?
        .local_addr()?
        .port();
    let control = mdir.join("monitrc");
    std::fs::write(
        &control,
        format!(
            "set daemon 2\nset pidfile {d}/monit.pid\nset statefile {d}/monit.state\n\
             set idfile {d}/monit.id\nset logfile {d}/monit.log\n\
             set httpd port {port} and\n    use address {ip}\n    allow admin:s3cret\n\
             include {d}/conf.d/*.monitrc\n",
            d = mdir.display()
        ),
    )?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&control, std::fs::Permissions::from_mode(0o600))?;
    let (ctl, agents) = cluster(dir.path(), &[ip], true)?;
    let agent = &agents[0];
    assert_eq!(agent.monit_control.as_deref(), Some(control.as_path()));
    let node = agent.node_id()?;
    let root = std::fs::canonicalize(&agent.root)?;
    add_sleeper(&ctl, &node, &root)?;
    step(&ctl, &node, monit("sleeper", MonitOp::Start))?;
    let first = wait_status(&ctl, &node, "sleeper", "RUNNING")?.pid;
    step(&ctl, &node, monit("sleeper", MonitOp::Restart))?;
    wait_until(WAIT, "a new pid after restart", || {
        component(&ctl, &node, "sleeper").filter(|c| c.status == "RUNNING" && c.pid != first)
    })?;
    // The port wants the password: without it, monit refuses.
    let mut s = std::net::TcpStream::connect((ip, port))?;
    use std::io::{Read, Write};
    s.write_all(b"GET /_status?format=xml HTTP/1.0\r\n\r\n")?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    assert!(answer.starts_with("HTTP/1.0 401"), "{answer}");
    assert!(
        !control.with_file_name("monit.sock").exists(),
        "no socket was made up"
    );
    Ok(())
}
